#!/usr/bin/env bash
# Hugging Face export and import (docs/hf.md), checked with transformers itself:
#  1. a trained `tiny` (sigmoid gate, Glm4Moe), a softmax variant (Ernie4_5_Moe,
#     no shared experts, tied embeddings) and a sigmoid variant with raw scaled
#     gates and no dense layer, exported in fp32: transformers' logits equal the
#     C model's (build/hf_logits) within 1e-4 relative, and the same experts;
#  2. `small` trained for 3 steps (the balancing biases move and change
#     selections; greedy text still varies token by token) with its tokenizer,
#     sharded: the same, plus the tokenizer against moe_tok, and greedy
#     generation against `train_moe sample --temperature 0` (ids, and text
#     after a prompt);
#  3. `small` in bf16: the exact weights (loaded in fp32, against the C model
#     on the imported bf16 checkpoint), and bf16 inference within a tolerance;
#  4. export -> import -> export is byte-identical; the imported checkpoint has
#     the original's loss bit for bit, samples the same, serves --init-from;
#     a directory written by transformers' save_pretrained imports too;
#  5. refusals and corrupt inputs: messages naming the field or file, exit 1,
#     nothing written.
#   bash tests/test_hf.sh PY_VENV
. "$(dirname "$0")/lib.sh"
test_begin test_hf --tmp
# One thread everywhere: the batches are small, and on a busy machine two
# OpenMP threads waiting for each other cost several times the work.
export OMP_NUM_THREADS=1
VENV=${1:?usage: tests/test_hf.sh PY_VENV}
PY="$VENV/bin/python"
run() { "$@" > "$TMP/cmd.out" 2>&1 || { bad "$* failed:"; cat "$TMP/cmd.out"; }; }

# A missing package fails the test: it never skips.
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
        ("torch", "transformers", "safetensors", "numpy")))' 2> "$TMP/py.err"; then
    bad "$PY lacks torch, transformers, safetensors or numpy $(tail -1 "$TMP/py.err"); run scripts/deps.sh venv"
    test_end
fi

# ---------------------------------------------------------------- models
TRAIN=(./train_moe --print-every 1000 --warmup-steps 2 --lr 1e-2)
test_shards "$TMP/d64" 100000 10000
# gamma 0.05: within 30 steps the biases grow large enough to change selections.
tiny() { run "${TRAIN[@]}" --config tiny "${@:2}" --train-data "$TMP/d64/train_*.bin" -b 8 --steps 30 \
             --gamma 0.05 --ckpt-dir "$TMP/$1"; }
tiny tiny
tiny tsoft --gate softmax --n-shared 0 --tie-embeddings 1
tiny traw --norm-topk 0 --route-scale 2.5 --n-shared 0 --n-dense 0 --n-layers 2

# small: a tokenizer and shards from this repository's documentation.
cat README.md docs/*.md > "$TMP/corpus.txt"
run ./moe_tok train --input "$TMP/corpus.txt" --vocab-size 4096 --output "$TMP/tok.tok" --quiet
run ./moe_prepare --tokenizer "$TMP/tok.tok" --out "$TMP/dsmall" --doc-sep blank --quiet "$TMP/corpus.txt"
run "${TRAIN[@]}" --config small --train-data "$TMP/dsmall/train_*.bin" -b 2 --steps 3 --warmup-steps 0 \
    --gamma 0.02 --lr 3e-3 --ckpt-dir "$TMP/small"
CK_TINY=$TMP/tiny/ckpt_00000030.bin CK_SOFT=$TMP/tsoft/ckpt_00000030.bin CK_RAW=$TMP/traw/ckpt_00000030.bin
CK_SMALL=$TMP/small/ckpt_00000003.bin
for f in "$CK_TINY" "$CK_SOFT" "$CK_RAW" "$CK_SMALL"; do [ -f "$f" ] || { bad "no checkpoint $f"; test_end; }; done

# ---------------------------------------------------------------- export
export_ok() { # DIR CKPT ARGS...: export, expecting success
    if ./moe_ckpt export "$2" "$TMP/$1" "${@:3}" > "$TMP/$1.out" 2>&1; then ok "export $1: $(cat "$TMP/$1.out")"
    else bad "export $1 failed: $(cat "$TMP/$1.out")"; fi
}
export_ok hf_tiny "$CK_TINY"
export_ok hf_soft "$CK_SOFT"
export_ok hf_raw "$CK_RAW"
export_ok hf_small "$CK_SMALL" --tokenizer "$TMP/tok.tok" --max-shard-size 20MB
export_ok hf_small16 "$CK_SMALL" --tokenizer "$TMP/tok.tok" --dtype bf16
grep -q '"architectures": \["Ernie4_5_MoeForCausalLM"\]' "$TMP/hf_soft/config.json" \
    && grep -q '"architectures": \["Glm4MoeForCausalLM"\]' "$TMP/hf_raw/config.json" \
    && ok "the softmax model is an Ernie4_5_MoeForCausalLM, the sigmoid ones Glm4MoeForCausalLM" \
    || bad "unexpected architectures in config.json"
n=$(ls "$TMP"/hf_small/model-*-of-*.safetensors 2>/dev/null | wc -l)
[ "$n" -gt 1 ] && [ -f "$TMP/hf_small/model.safetensors.index.json" ] && [ ! -f "$TMP/hf_small/model.safetensors" ] \
    && ok "54 MB of fp32 small in $n shards of at most 20 MB with model.safetensors.index.json" \
    || bad "small was not sharded: $(ls "$TMP/hf_small")"

# The C model's logits: random tokens, and (small) the tokenised corpus.
./moe_tok encode --tokenizer "$TMP/tok.tok" --input "$TMP/corpus.txt" --output "$TMP/corpus.ids"
logits() { ./build/hf_logits "$@" | sed 's/^loss //'; }
logits "$CK_TINY" "$TMP/l_tiny.bin" 4 16 1 > /dev/null
logits "$CK_SOFT" "$TMP/l_soft.bin" 4 16 2 > /dev/null
logits "$CK_RAW" "$TMP/l_raw.bin" 4 16 3 > /dev/null
logits "$CK_SMALL" "$TMP/l_small.bin" 2 128 "@$TMP/corpus.ids" > /dev/null
logits "$CK_SMALL" "$TMP/l_small_rand.bin" 2 64 4 > /dev/null

# ---------------------------------------------------------------- round trips
roundtrip() { # NAME: export -> import -> export, byte for byte
    local d=$TMP/$1 ck=$TMP/$1.imported.bin; shift
    run ./moe_ckpt import "$d" "$ck"
    run ./moe_ckpt export "$ck" "$d.again" "$@"
    if [ -f "$ck" ] && diff -r "$d" "$d.again" > /dev/null; then
        ok "$(basename "$d"): export -> import -> export gives the same $(ls "$d" | wc -l) files byte for byte"
    else
        bad "$(basename "$d"): the second export differs: $(diff -rq "$d" "$d.again" 2>&1 | head -3)"
    fi
}
roundtrip hf_tiny
roundtrip hf_soft
roundtrip hf_raw
roundtrip hf_small --tokenizer "$TMP/tok.tok" --max-shard-size 20MB
roundtrip hf_small16 --tokenizer "$TMP/tok.tok" --dtype bf16
for m in tiny:hf_tiny:1 small:hf_small:4; do
    IFS=: read -r name d seed <<< "$m"
    ck=$([ "$name" = tiny ] && echo "$CK_TINY" || echo "$CK_SMALL")
    a=$(logits "$ck" "$TMP/x.bin" 2 16 "$seed") b=$(logits "$TMP/$d.imported.bin" "$TMP/y.bin" 2 16 "$seed")
    [ -n "$a" ] && [ "$a" = "$b" ] && ok "$name: the imported checkpoint's loss on a batch equals the original's bit for bit ($a)" \
        || bad "$name: loss of the imported checkpoint '$b' differs from the original's '$a'"
done
# The bf16 export's exact weights: its import, through the C model.
logits "$TMP/hf_small16.imported.bin" "$TMP/l_small16w.bin" 2 128 "@$TMP/corpus.ids" > /dev/null

# ---------------------------------------------------------------- sampling
sample() { ./train_moe sample "$@" --temperature 0 2> "$TMP/sample.err"; }
sample "$CK_TINY" --sample-tokens 12 > "$TMP/s_tiny.out"
sample "$CK_SMALL" --sample-tokens 32 > "$TMP/s_small.out"
PROMPT="In the beginning"
sample "$CK_SMALL" --sample-tokens 32 --tokenizer "$TMP/tok.tok" --prompt "$PROMPT" > "$TMP/s_text.out"
sample "$TMP/hf_tiny.imported.bin" --sample-tokens 12 > "$TMP/s_tiny_imp.out"
cmp -s "$TMP/s_tiny.out" "$TMP/s_tiny_imp.out" && grep -q '^---$' "$TMP/s_tiny.out" \
    && ok "train_moe sample --temperature 0 of the imported tiny equals the original's" \
    || bad "greedy samples of the imported and the original tiny differ"
a=$(sample "$CK_TINY" --sample-tokens 12 --seed 1) b=$(sample "$CK_TINY" --sample-tokens 12 --seed 2)
[ "$a" = "$b" ] && ok "--temperature 0 is greedy: seeds 1 and 2 give the same tokens" || bad "--temperature 0 depends on the seed"
if "${TRAIN[@]}" --config small --train-data "$TMP/dsmall/train_*.bin" -b 2 --steps 2 --warmup-steps 0 \
        --init-from "$TMP/hf_small.imported.bin" > "$TMP/init.out" 2>&1 && grep -q "initialised from" "$TMP/init.out"; then
    ok "--init-from the imported checkpoint trains: $(grep 'step     2/2' "$TMP/init.out" | cut -c1-40)"
else
    bad "--init-from the imported checkpoint failed: $(tail -2 "$TMP/init.out")"
fi
if ./train_moe sample "$CK_TINY" --temperature -1 > "$TMP/neg.out" 2>&1; then bad "--temperature -1 accepted"
else ok "--temperature -1 rejected: $(grep -m1 error "$TMP/neg.out")"; fi

# ---------------------------------------------------------------- transformers
# bf16 tolerance: bf16 keeps 8 significant bits (a relative rounding of up to
# 2^-9 = 2e-3 per value, in weights and in every activation), and a token whose
# expert choice flips gets a different expert's output. Measured on this batch:
# 4.1e-3 to 8.5e-3 of the largest logit over four runs (1.3e-2 for the same
# model trained 20 steps), with 3-4% of the token-layers routed differently.
# 5e-2 leaves room for other seeds and machines and still catches a wrong
# tensor (errors of order 1).
echo "     (C side done after ${SECONDS}s)"
"$PY" tests/hf_check.py --moe-tok ./moe_tok \
    "logits:$TMP/hf_tiny:$TMP/l_tiny.bin:float32:1e-4" \
    "logits:$TMP/hf_soft:$TMP/l_soft.bin:float32:1e-4" \
    "logits:$TMP/hf_raw:$TMP/l_raw.bin:float32:1e-4" \
    "logits:$TMP/hf_small:$TMP/l_small.bin:float32:1e-4" \
    "logits:$TMP/hf_small:$TMP/l_small_rand.bin:float32:1e-4" \
    "logits:$TMP/hf_small16:$TMP/l_small16w.bin:float32:1e-4" \
    "logits:$TMP/hf_small16:$TMP/l_small.bin:bfloat16:5e-2" \
    "tokenizer:$TMP/hf_small:$TMP/tok.tok" \
    "generate:$TMP/hf_tiny:$TMP/s_tiny.out:12" \
    "generate:$TMP/hf_small:$TMP/s_small.out:32" \
    "text:$TMP/hf_small:$TMP/s_text.out:32:$PROMPT" \
    "save:$TMP/hf_small:$TMP/saved_small" \
    "save:$TMP/hf_soft:$TMP/saved_soft" || fails=$((fails + 1))

echo "     (transformers side done after ${SECONDS}s)"
# A directory written by transformers imports to the same model.
for m in small:"$CK_SMALL":4 soft:"$CK_SOFT":2; do
    IFS=: read -r name ck seed <<< "$m"
    run ./moe_ckpt import "$TMP/saved_$name" "$TMP/saved_$name.bin"
    a=$(logits "$ck" "$TMP/x.bin" 2 16 "$seed") b=$(logits "$TMP/saved_$name.bin" "$TMP/y.bin" 2 16 "$seed")
    [ -n "$a" ] && [ "$a" = "$b" ] && ok "$name saved by transformers' save_pretrained imports with the same loss bit for bit ($a)" \
        || bad "$name: import of transformers' save_pretrained output: loss '$b', original '$a'"
done

# ---------------------------------------------------------------- refusals and bad input
expect_status() { # STATUS WHAT PATTERN CMD...: exit STATUS, a message matching PATTERN
    local want=$1 what=$2 pat=$3 rc=0; shift 3
    "$@" > "$TMP/f.out" 2>&1 || rc=$?
    if [ $rc = 0 ]; then bad "$what: accepted"
    elif [ $rc = "$want" ] && grep -q -- "$pat" "$TMP/f.out"; then ok "$what: $(head -1 "$TMP/f.out" | cut -c1-190)"
    else bad "$what: exit status $rc (want $want) or message: $(cat "$TMP/f.out")"; fi
}
expect_fail() { expect_status 1 "$@"; }
refuse() { # NAME PATTERN TRAIN-ARGS...: a 1-step model that must not export
    local name=$1 pat=$2; shift 2
    run "${TRAIN[@]}" --config tiny "$@" --train-data "$TMP/d64/train_*.bin" -b 2 --steps 1 --warmup-steps 0 \
        --ckpt-dir "$TMP/$name"
    expect_fail "refuses $name" "$pat" ./moe_ckpt export "$TMP/$name/ckpt_00000001.bin" "$TMP/out_$name"
    [ -e "$TMP/out_$name" ] && bad "$name: the refused export created $TMP/out_$name"
}
refuse mult "gamma-rule mult" --gamma-rule mult
refuse softmax_raw "norm_topk = 0 with gate = softmax" --gate softmax --norm-topk 0
refuse softmax_scaled "route_scale = 2 with gate = softmax" --gate softmax --route-scale 2
refuse one_expert "n_routed = 1" --n-routed 1 --top-k 1
refuse parallel "parallel_residual = 1" --parallel-residual 1
refuse logit_bias "bias-on logits" --gate softmax --bias-on logits
head -c 20000 "$CK_TINY" > "$TMP/trunc.bin"
expect_fail "refuses a truncated checkpoint" "trunc.bin: truncated" ./moe_ckpt export "$TMP/trunc.bin" "$TMP/o0"
expect_fail "tokenizer larger than the vocabulary" "vocab_size is 64" ./moe_ckpt export "$CK_TINY" "$TMP/o1" --tokenizer "$TMP/tok.tok"
expect_status 2 "unknown option" "unknown option" ./moe_ckpt export "$CK_TINY" "$TMP/o2" --frobnicate 1
expect_status 2 "bad dtype" "fp32 or bf16" ./moe_ckpt export "$CK_TINY" "$TMP/o3" --dtype fp16

# Broken directories: each a copy of hf_tiny with one thing wrong.
broken() { rm -rf "$TMP/b"; cp -r "$TMP/hf_tiny" "$TMP/b"; }
edit_config() { "$PY" -c "import json,sys; p='$TMP/b/config.json'; c=json.load(open(p)); $1; json.dump(c, open(p,'w'))"; }
broken; edit_config "c['rope_parameters']['partial_rotary_factor'] = 0.5"
expect_fail "import refuses partial_rotary_factor 0.5" "partial_rotary_factor" ./moe_ckpt import "$TMP/b" "$TMP/b.bin"
broken; edit_config "del c['n_shared_experts']"
expect_fail "import refuses a config without n_shared_experts" "'n_shared_experts' is missing" ./moe_ckpt import "$TMP/b" "$TMP/b.bin"
broken; edit_config "c['num_key_value_heads'] = 1"
expect_fail "import refuses grouped-query attention" "num_key_value_heads" ./moe_ckpt import "$TMP/b" "$TMP/b.bin"
broken; edit_config "c['model_type'] = 'llama'"
expect_fail "import refuses another model_type" "model_type" ./moe_ckpt import "$TMP/b" "$TMP/b.bin"
broken; edit_config "c['moe_intermediate_size'] = 8"
expect_fail "import refuses shapes that disagree with the config" "the config implies \[16, 32\]" \
    ./moe_ckpt import "$TMP/b" "$TMP/b.bin"
broken; printf '{broken' > "$TMP/b/config.json"
expect_fail "import refuses a config.json that is not JSON" "config.json: invalid JSON" ./moe_ckpt import "$TMP/b" "$TMP/b.bin"
broken; head -c 5000 "$TMP/hf_tiny/model.safetensors" > "$TMP/b/model.safetensors"
expect_fail "import refuses a truncated model.safetensors" "model.safetensors: truncated" ./moe_ckpt import "$TMP/b" "$TMP/b.bin"
broken; "$PY" - "$TMP/b/model.safetensors" <<'EOF'
import sys
from safetensors.numpy import load_file, save_file
p = sys.argv[1]; t = load_file(p)
del t["model.layers.1.mlp.experts.3.up_proj.weight"]
save_file(t, p, metadata={"format": "pt"})
EOF
expect_fail "import refuses a missing expert tensor" "experts.3.up_proj.weight' is missing" ./moe_ckpt import "$TMP/b" "$TMP/b.bin"
broken; "$PY" - "$TMP/b/model.safetensors" <<'EOF'
import sys, numpy
from safetensors.numpy import load_file, save_file
p = sys.argv[1]; t = load_file(p)
t["model.layers.9.extra.weight"] = numpy.zeros(2, numpy.float32)
save_file(t, p, metadata={"format": "pt"})
EOF
expect_fail "import refuses an unexpected tensor" "unexpected tensor 'model.layers.9.extra.weight'" ./moe_ckpt import "$TMP/b" "$TMP/b.bin"
rm -rf "$TMP/b2"; cp -r "$TMP/hf_small" "$TMP/b2"
rm "$TMP/b2/$(ls "$TMP/b2" | grep -m1 'model-00002')"
expect_fail "import refuses a missing shard" "model-00002-of" ./moe_ckpt import "$TMP/b2" "$TMP/b.bin"
[ -e "$TMP/b.bin" ] && bad "a refused import wrote $TMP/b.bin"

test_end
