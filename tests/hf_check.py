"""Checks of exported models with transformers, for tests/test_hf.sh.

One process runs every check (importing torch and transformers costs seconds):

  hf_check.py --moe-tok PATH CHECK...

  logits:DIR:BIN:DTYPE:TOL   load DIR with AutoModelForCausalLM in DTYPE (float32 or
                             bfloat16); no missing, unexpected or mismatched tensor;
                             logits on BIN's batch (written by build/hf_logits) within
                             TOL of the C model's, relative to its largest |logit|;
                             selected experts identical (fp32) or counted (bf16)
  tokenizer:DIR:TOK          AutoTokenizer of DIR against `moe_tok encode/decode` with
                             TOK on texts with control bytes, multi-byte UTF-8, special
                             tokens and 100 random strings
  generate:DIR:OUT:N         greedy model.generate of N tokens after token 0 against the
                             ids `train_moe sample --temperature 0` printed into OUT
  text:DIR:OUT:N:PROMPT      the same after PROMPT, comparing the bytes printed in OUT
  save:DIR:OUTDIR            load DIR and save_pretrained it into OUTDIR (for import)

Prints one "ok"/"FAIL" line per check with the measured numbers; exits 1 on a failure.
"""
import random
import struct
import subprocess
import sys
import warnings

import numpy as np
import torch
import transformers

transformers.utils.logging.disable_progress_bar()
# Glm4Moe without shared experts builds zero-size ones (exported as such); torch warns at their creation.
warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")

failures = 0


def report(ok, msg):
    global failures
    print(("ok   " if ok else "FAIL ") + msg, flush=True)
    failures += 0 if ok else 1


def read_logits(path):
    """The batch, logits, selections and loss written by build/hf_logits."""
    raw = open(path, "rb").read()
    assert raw[:4] == b"HFLG", path
    B, T, V, n_moe, K = struct.unpack("<5i", raw[4:24])
    o = 24
    tokens = np.frombuffer(raw, np.int32, B * (T + 1), o).reshape(B, T + 1)
    o += 4 * B * (T + 1)
    logits = np.frombuffer(raw, np.float32, B * T * V, o).reshape(B, T, V)
    o += 4 * B * T * V
    sel = np.frombuffer(raw, np.int32, n_moe * B * T * K, o).reshape(n_moe, B * T, K)
    return tokens[:, :T], logits, sel


def load_model(d, dtype):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    return model.eval(), problems


def check_logits(d, path, dtype_name, tol):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    model, problems = load_model(d, dtype)
    report(not problems, f"{d}: {type(model).__name__} loads in {dtype_name} with every tensor used "
           f"(missing/unexpected/mismatched: {problems or 'none'})")
    tokens, want, sel = read_logits(path)
    # The router's third output is the selected experts, (tokens, K).
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    caught = []
    hooks = [r.register_forward_hook(lambda m, i, out: caught.append(out[2])) for r in routers]
    with torch.no_grad():
        got = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    for h in hooks:
        h.remove()
    err = float(np.abs(got - want).max() / np.abs(want).max())
    report(err <= tol, f"{d} ({dtype_name}): logits of a {tokens.shape[0]}x{tokens.shape[1]} batch vs the C "
           f"model: max |diff| / max |logit| = {err:.2e} (tolerance {tol:.0e})")
    if dtype == torch.bfloat16:
        kept = {n: p.dtype for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
        kept.update({n: b.dtype for n, b in model.named_buffers() if "e_score_correction_bias" in n})
        report(kept and all(t == torch.float32 for t in kept.values()),
               f"{d}: router weights and selection biases stay fp32 in the bf16 model ({len(kept)} tensors)")
    # A token-layer differs when its set of experts differs (transformers does not sort them).
    differ = sum(int((np.sort(c.numpy(), 1) != np.sort(s, 1)).any(1).sum()) for c, s in zip(caught, sel))
    total = sum(s.shape[0] for s in sel)
    if dtype == torch.float32:
        report(len(caught) == len(sel) and differ == 0,
               f"{d}: top-k selections identical in all {len(sel)} MoE layers ({differ} of {total} token-layers differ)")
    else:
        print(f"     {d}: bf16 activations route {differ} of {total} token-layers differently (measured, not a check)")


def moe_tok(tool, tok, args, data):
    p = subprocess.run([tool, *args, "--tokenizer", tok], input=data, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.decode())
    return p.stdout


def check_tokenizer(tool, d, tok_path):
    tok = transformers.AutoTokenizer.from_pretrained(d)
    eos = tok.eos_token_id
    eot = int(moe_tok(tool, tok_path, ["encode", "--allow-special"], b"<|endoftext|>").split()[0])
    report(eos == eot and tok.eos_token == "<|endoftext|>",
           f"{d}: AutoTokenizer ({type(tok).__name__}) loads; eos {tok.eos_token!r} = id {eos} (moe_tok: {eot})")
    samples = [
        "In the beginning God created the heaven and the earth.",
        "".join(chr(c) for c in range(0x00, 0x20)) + "\x7f tabs\tand\r\nnewlines\x0b\x0c  spaces   end   ",
        "it's don't I'M we've 1234567 3.14159 x—y “quoted” naïve café Ærøskøbing",
        "Ελληνικά русский 中文 日本語 한국어 עברית العربية ١٢٣ 🙂🚀 \u00a0nbsp\u2009thin\u3000wide",
        "mixed<|endoftext|>special <|endoftext|> tokens",
    ]
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(128)] + list("éüßñ—“”…€°±µ¶·¿×÷αβγДжЯ中文語한🙂🚀\u00a0\u2009\u3000١٢")
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(100)]
    enc_bad = dec_bad = 0
    for s in samples:
        got = tok(s)["input_ids"]
        # transformers turns special-token strings into their ids; moe_tok does with --allow-special.
        want = [int(x) for x in moe_tok(tool, tok_path, ["encode", "--allow-special"], s.encode()).split()]
        back = moe_tok(tool, tok_path, ["decode"], " ".join(map(str, got)).encode())
        if got != want:
            enc_bad += 1
            if enc_bad <= 3:
                print(f"     encode differs on {s!r}:\n       transformers {got}\n       moe_tok      {want}")
        if tok.decode(got) != s or back != s.encode():
            dec_bad += 1
    report(enc_bad == 0, f"{d}: ids equal moe_tok's on {len(samples)} texts (control bytes, multi-byte UTF-8, "
           f"special tokens, random strings): {enc_bad} differ")
    report(dec_bad == 0, f"{d}: transformers' decode and moe_tok decode of those ids give each text back: "
           f"{dec_bad} differ")


def greedy(model, ids, n):
    """n greedy tokens after ids, and how far the logits of each generation step
    (made with the key/value cache) are from one forward over the whole sequence."""
    # No stop at the end-of-text token: train_moe sample runs all n tokens.
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None,
                                           pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=config,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        full = model(out.sequences).logits[0, len(ids) - 1:-1]
    steps = torch.stack(out.logits)[:, 0]
    cache_err = float((steps - full).abs().max() / full.abs().max())
    return out.sequences[0, len(ids):].tolist(), cache_err


def sample_output(path):
    """What train_moe sample printed between its two '---' lines, as bytes."""
    raw = open(path, "rb").read()
    start = raw.index(b"---\n") + 4
    return raw[start:raw.rindex(b"\n---\n")]


def check_generate(d, out_path, n):
    model, _ = load_model(d, torch.float32)
    want = [int(x) for x in sample_output(out_path).split()]
    got, cache_err = greedy(model, [0], n)
    report(got == want and len(got) == n, f"{d}: greedy model.generate after token 0 equals train_moe sample "
           f"--temperature 0 on all {n} tokens: {got[:12]}...")
    report(cache_err <= 1e-5, f"{d}: the logits of each cached generation step equal one forward over the "
           f"generated sequence: max |diff| / max |logit| = {cache_err:.1e}")


def check_text(d, out_path, n, prompt):
    model, _ = load_model(d, torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    prompt_ids = tok(prompt)["input_ids"]
    got, _ = greedy(model, prompt_ids, n)
    # The bytes train_moe prints: each token's bytes, a special as "\n<|special ID|>\n".
    byte_of = {ch: b for b, ch in enumerate(bytes_to_unicode())}
    printed = prompt.encode()
    for i, t in zip(got, tok.convert_ids_to_tokens(got)):
        printed += (f"\n<|special {i}|>\n".encode() if i in tok.all_special_ids
                    else bytes(byte_of[c] for c in t))
    want = sample_output(out_path)
    report(printed == want, f"{d}: greedy generation after {prompt!r} prints what train_moe sample "
           f"--temperature 0 printed ({n} tokens): {tok.decode(got)[:60]!r}...")


def bytes_to_unicode():
    """The character of each byte in GPT-2's byte-level alphabet, by byte value."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 256
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(extra))
        extra += b not in printable
    return chars


def check_save(d, out):
    model, _ = load_model(d, torch.float32)
    model.save_pretrained(out)
    report(True, f"{d}: saved by transformers' save_pretrained into {out}")


def main(argv):
    tool = None
    if argv[:1] == ["--moe-tok"]:
        tool, argv = argv[1], argv[2:]
    print(f"     torch {torch.__version__}, transformers {transformers.__version__}")
    torch.manual_seed(0)
    for c in argv:
        kind, *a = c.split(":")
        if kind == "logits":
            check_logits(a[0], a[1], a[2], float(a[3]))
        elif kind == "tokenizer":
            check_tokenizer(tool, a[0], a[1])
        elif kind == "generate":
            check_generate(a[0], a[1], int(a[2]))
        elif kind == "text":
            check_text(a[0], a[1], int(a[2]), ":".join(a[3:]))
        elif kind == "save":
            check_save(a[0], a[1])
        else:
            raise SystemExit(f"hf_check.py: unknown check {c!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
