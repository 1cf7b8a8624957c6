#!/usr/bin/env bash
# Tests of moe_prepare (data/prepare.c, docs/prepare.md) on a small corpus that
# this script writes: several documents, unicode, blank and whitespace-only
# lines, CRLF lines, JSON escapes (\uXXXX, surrogate pairs, a lone surrogate).
# The shards are read back by an independent Python reader (struct, the header
# layout of docs/data.md) and every document is decoded with `moe_tok decode`;
# the expected documents and the train/val split are recomputed in Python from
# the rules in docs/prepare.md. Needs python3; takes a few seconds.
. "$(dirname "$0")/lib.sh"
test_begin test_prepare --tmp
# MOE_BIN_DIR: where the programs are (make test-asan: the sanitizer build).
export MOE_BIN_DIR=${MOE_BIN_DIR:-.}
PREP=$MOE_BIN_DIR/moe_prepare
TOKBIN=$MOE_BIN_DIR/moe_tok

for b in "$PREP" "$TOKBIN"; do
    [ -x "$b" ] || { bad "$b is not built (run make)"; test_end; }
done
command -v python3 > /dev/null || { bad "python3 is needed for the independent shard reader"; test_end; }

# ---------------------------------------------------------------- the checker
cat > "$TMP/check.py" << 'EOF'
import json, math, os, re, struct, subprocess, sys

WS = b" \t\r\n\v\f"

def blank(line):
    return all(c in WS for c in line)

def chomp(line):
    if line.endswith(b"\r"):
        line = line[:-1]
    return line

def lines_of(data):
    # Lines end at "\n"; a final line without "\n" still counts.
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return [chomp(p) for p in parts]

def docs_text(paths, sep):
    docs = []
    for p in paths:
        data = sys.stdin.buffer.read() if p == "-" else open(p, "rb").read()
        if sep == "file":
            if data:
                docs.append(data)
        elif sep == "lines":
            docs += [l for l in lines_of(data) if not blank(l)]
        else:  # blank: runs of non-blank lines joined with "\n"
            para = []
            for l in lines_of(data) + [b""]:
                if blank(l):
                    if para:
                        docs.append(b"\n".join(para))
                    para = []
                else:
                    para.append(l)
    return docs

def no_surrogates(s):
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in s)

def docs_jsonl(paths, field):
    docs, bad = [], 0
    for p in paths:
        for raw in open(p, "rb").read().split(b"\n"):
            if blank(raw):
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except ValueError:
                bad += 1
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                bad += 1
                continue
            d = no_surrogates(obj[field]).encode("utf-8")
            if d:
                docs.append(d)
    return docs, bad

def split(docs, frac):
    train, val = [], []
    for i, d in enumerate(docs):
        (val if frac > 0 and math.floor((i + 1) * frac) > math.floor(i * frac) else train).append(d)
    return train, val

def tok_info(tok):
    out = subprocess.run([os.environ["MOE_BIN_DIR"] + "/moe_tok", "info", tok, "--merges", "0"], capture_output=True, text=True).stdout
    m = re.search(r"vocab size (\d+),.*end-of-text id (\d+)", out)
    return int(m.group(1)), int(m.group(2))

def read_shards(outdir, prefix, name, vocab, shard_tokens, problems):
    pre = prefix + "_" if prefix else ""
    files = sorted(f for f in os.listdir(outdir) if re.fullmatch(re.escape(pre + name) + r"_\d{6}\.bin", f))
    ids = []
    for k, f in enumerate(files):
        if f != "%s%s_%06d.bin" % (pre, name, k):
            problems.append("shard names not consecutive: %s" % f)
        raw = open(os.path.join(outdir, f), "rb").read()
        magic, version, width, count, v = struct.unpack_from("<8sIIQI", raw, 0)
        if magic != b"MOESHARD" or version != 1 or width != 2 or v != vocab or raw[28:64] != bytes(36):
            problems.append("%s: bad header magic=%r version=%d width=%d vocab=%d (tokenizer %d)"
                            % (f, magic, version, width, v, vocab))
        if len(raw) != 64 + 2 * count:
            problems.append("%s: %d bytes, header says %d tokens" % (f, len(raw), count))
        if count > shard_tokens or count == 0 or (k < len(files) - 1 and count != shard_tokens):
            problems.append("%s: %d tokens, --shard-tokens %d (shard %d of %d)"
                            % (f, count, shard_tokens, k + 1, len(files)))
        ids += struct.unpack_from("<%dH" % count, raw, 64)
    return files, ids

def decode_docs(tok, ids, eot, problems, what):
    if ids and ids[-1] != eot:
        problems.append("%s: the stream does not end with end-of-text" % what)
    docs, cur = [], []
    for t in ids:
        if t == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    out = []
    for d in docs:
        r = subprocess.run([os.environ["MOE_BIN_DIR"] + "/moe_tok", "decode", "--tokenizer", tok],
                           input=" ".join(map(str, d)).encode(), capture_output=True)
        if r.returncode != 0:
            problems.append("%s: moe_tok decode failed: %s" % (what, r.stderr.decode()))
        out.append(r.stdout)
    return out, [len(d) + 1 for d in docs]

def main():
    # check.py check TOK OUTDIR PREFIX SHARD_TOKENS FRAC VALCAP MODE ARG INPUT...
    _, cmd, tok, outdir, prefix, shard_tokens, frac, valcap, mode, arg, *inputs = sys.argv
    shard_tokens, frac, valcap = int(shard_tokens), float(frac), int(valcap)
    vocab, eot = tok_info(tok)
    if mode == "jsonl":
        docs, _ = docs_jsonl(inputs, arg)
    else:
        docs = docs_text(inputs, arg)
    problems = []
    got = {}
    ntok = {}
    nfiles = {}
    for name in ("train", "val"):
        files, ids = read_shards(outdir, prefix, name, vocab, shard_tokens, problems)
        got[name], ntok[name] = decode_docs(tok, ids, eot, problems, name)
        nfiles[name] = len(files)
    print("  header: %d train + %d val shards, vocab %d, width 2, sizes match counts, <= %d tokens each"
          % (nfiles["train"], nfiles["val"], vocab, shard_tokens), file=sys.stderr)
    if valcap < 0:
        exp_train, exp_val = split(docs, frac)
    else:
        # --val-fraction 1 --val-tokens N: a prefix of the documents until val holds >= N tokens.
        nv = len(got["val"])
        exp_val, exp_train = docs[:nv], docs[nv:]
        held = sum(ntok["val"])
        if nv == 0 or held < valcap or held - ntok["val"][-1] >= valcap:
            problems.append("val cap: %d documents, %d tokens, cap %d" % (nv, held, valcap))
    if got["train"] != exp_train or got["val"] != exp_val:
        for name, exp in (("train", exp_train), ("val", exp_val)):
            if got[name] != exp:
                problems.append("%s: %d documents decoded, %d expected" % (name, len(got[name]), len(exp)))
                for a, b in zip(got[name], exp):
                    if a != b:
                        problems.append("  first difference: got %r, expected %r" % (a[:80], b[:80]))
                        break
    if set(got["train"]) & set(got["val"]):
        problems.append("a document is in both train and val")
    if sorted(got["train"] + got["val"]) != sorted(docs):
        problems.append("train + val is not the set of input documents")
    for p in problems:
        print("  " + p, file=sys.stderr)
    print("%d %d %d" % (len(docs), len(got["train"]), len(got["val"])))
    sys.exit(1 if problems else 0)

def gen(d):
    words = ["alpha", "beta", "gamma", "delta", "Grüße", "naïve", "café", "日本語", "текст", "🙂", "x²",
             "tab\there", "<|endoftext|>", "end.", "quote\"d", "back\\slash", "42", "ünïcödé"]
    paras = []
    for i in range(30):
        n_lines = 1 + i % 3
        lines = []
        for l in range(n_lines):
            lines.append(" ".join(words[(i * 7 + l * 3 + k) % len(words)] for k in range(4 + (i + l) % 6)) + " %d.%d" % (i, l))
        paras.append(lines)
    # a.txt: paragraphs separated by one or more blank lines, some whitespace-only, CRLF in places.
    with open(os.path.join(d, "a.txt"), "wb") as f:
        f.write(b"\n\n")
        for i, p in enumerate(paras[:20]):
            eol = b"\r\n" if i % 5 == 2 else b"\n"
            for l in p:
                f.write(l.encode() + eol)
            f.write([b"\n", b"   \n", b"\n\n\n", b"\t \r\n"][i % 4])
    # b.txt: no trailing newline, a NUL byte.
    with open(os.path.join(d, "b.txt"), "wb") as f:
        f.write(b"\n\n".join(b"\n".join(l.encode() for l in p) for p in paras[20:]) + b"\nnul\x00byte")
    with open(os.path.join(d, "c.txt"), "wb") as f:
        f.write(b"")  # an empty file: no document
    docs = ["\n".join(p) for p in paras]
    with open(os.path.join(d, "a.jsonl"), "wb") as f:
        for i, t in enumerate(docs):
            if i % 3 == 0:
                line = json.dumps({"id": i, "text": t, "meta": {"x": [1, -2.5e3, None, True, {"text": 1}]}})
            elif i % 3 == 1:
                line = json.dumps({"text": t, "n": 0}, ensure_ascii=False)
            else:
                line = "  {\"te\\u0078t\" : %s , \"text2\":\"\"}  " % json.dumps(t)
            f.write(line.encode() + b"\n")
            if i == 4:
                f.write(b"   \n")
        f.write(b'{"text": "escapes: \\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 \\u65e5 \\ud83d\\ude00 lone \\ud800x \\udc00 end"}\n')
        f.write(b'{"text": "first", "text": "duplicate key: the last wins"}\n')
        f.write(b'{"text": ""}\n')
    with open(os.path.join(d, "bad.jsonl"), "wb") as f:
        f.write(b'{"text": "good line one"}\n')
        f.write(b'{"body": "no text field"}\n')
        f.write(b'{"text": "unterminated}\n')
        f.write(b'{"text": 12}\n')
        f.write(b'["not", "an object"]\n')
        f.write(b'{"text": "good line two"} trailing\n')
        f.write(b'{"text": "good line three"}\n')

if __name__ == "__main__":
    if sys.argv[1] == "gen":
        gen(sys.argv[2])
    else:
        main()
EOF

python3 "$TMP/check.py" gen "$TMP" || { bad "could not write the test corpus"; test_end; }
cat "$TMP/a.txt" "$TMP/b.txt" > "$TMP/all.txt"
if $TOKBIN train --input "$TMP/all.txt" --vocab-size 300 --output "$TMP/t.tok" --quiet > "$TMP/tok.out" 2>&1; then
    ok "moe_tok train: vocab 300 tokenizer on $(wc -c < "$TMP/all.txt") bytes"
else
    bad "moe_tok train failed:"; cat "$TMP/tok.out"; test_end
fi
TOK="$TMP/t.tok"

# prep NAME ARGS...: runs moe_prepare into $TMP/NAME, output in $TMP/NAME.out.
prep() {
    local name=$1; shift
    $PREP --tokenizer "$TOK" --out "$TMP/$name" --quiet "$@" > "$TMP/$name.out" 2>&1
}
# check NAME PREFIX SHARD_TOKENS FRAC VALCAP MODE ARG INPUT...: verifies the shards of run NAME.
check() {
    local name=$1 prefix=$2 st=$3 frac=$4 cap=$5 mode=$6 arg=$7; shift 7
    local res
    if res=$(python3 "$TMP/check.py" check "$TOK" "$TMP/$name" "$prefix" "$st" "$frac" "$cap" "$mode" "$arg" "$@" \
             2> "$TMP/$name.check"); then
        set -- $res
        ok "$name: $1 documents decode back exactly, $2 train / $3 val, disjoint; $(sed -n 's/^  header: //p' "$TMP/$name.check")"
    else
        bad "$name: shards do not match the input:"; cat "$TMP/$name.check"
    fi
}

# 1. text, paragraphs, several files, small shards.
if prep blank --doc-sep blank --shard-tokens 200 --val-fraction 0.25 "$TMP/a.txt" "$TMP/b.txt" "$TMP/c.txt"; then
    check blank "" 200 0.25 -1 text blank "$TMP/a.txt" "$TMP/b.txt" "$TMP/c.txt"
else
    bad "prepare --doc-sep blank failed:"; cat "$TMP/blank.out"
fi
# 2. one document per line, a prefix.
if prep lines --doc-sep lines --prefix lp --shard-tokens 1000 --val-fraction 0.1 "$TMP/a.txt" "$TMP/b.txt"; then
    check lines lp 1000 0.1 -1 text lines "$TMP/a.txt" "$TMP/b.txt"
else
    bad "prepare --doc-sep lines failed:"; cat "$TMP/lines.out"
fi
# 3. one document per file, stdin among the inputs, an empty file skipped.
if $PREP --tokenizer "$TOK" --out "$TMP/files" --quiet --val-fraction 0.5 --shard-tokens 100k \
        "$TMP/a.txt" - "$TMP/c.txt" "$TMP/all.txt" < "$TMP/b.txt" > "$TMP/files.out" 2>&1; then
    check files "" 100000 0.5 -1 text file "$TMP/a.txt" "$TMP/b.txt" "$TMP/c.txt" "$TMP/all.txt"
else
    bad "prepare --doc-sep file with stdin failed:"; cat "$TMP/files.out"
fi
# 4. JSON lines: escapes, surrogate pairs, a lone surrogate, an escaped key, duplicate keys.
if prep jsonl --format jsonl --shard-tokens 300 --val-fraction 0.2 "$TMP/a.jsonl"; then
    check jsonl "" 300 0.2 -1 jsonl text "$TMP/a.jsonl"
else
    bad "prepare --format jsonl failed:"; cat "$TMP/jsonl.out"
fi
# 5. bad JSON lines without --strict: reported with file:line, counted, skipped.
if prep badj --format jsonl --val-fraction 0 "$TMP/bad.jsonl" \
        && grep -q "bad.jsonl:3: bad JSON at column" "$TMP/badj.out" && grep -q "bad.jsonl:2: no such field" "$TMP/badj.out" \
        && grep -q "5 bad lines skipped" "$TMP/badj.out"; then
    check badj "" 10000000 0 -1 jsonl text "$TMP/bad.jsonl"
else
    bad "bad JSON lines not reported as expected:"; cat "$TMP/badj.out"
fi
# 6. --val-tokens caps the validation set (fraction 1: a prefix of the documents).
if prep cap --doc-sep blank --val-fraction 1 --val-tokens 150 "$TMP/a.txt"; then
    check cap "" 10000000 1 150 text blank "$TMP/a.txt"
else
    bad "prepare --val-tokens failed:"; cat "$TMP/cap.out"
fi
# 7. The thread count does not change the output.
prep t1 --doc-sep lines --threads 1 --shard-tokens 500 "$TMP/all.txt" \
    && prep t2 --doc-sep lines --threads 2 --shard-tokens 500 "$TMP/all.txt" \
    && diff -r "$TMP/t1" "$TMP/t2" > /dev/null \
    && ok "--threads 1 and --threads 2 write identical shards ($(ls "$TMP/t1" | wc -l) files)" \
    || bad "--threads 1 and 2 differ"

# ---------------------------------------------------------------- errors
# expect_fail NAME CODE PATTERN CMD...: CMD must exit with CODE and print PATTERN.
expect_fail() {
    local name=$1 code=$2 pat=$3; shift 3
    "$@" > "$TMP/err.out" 2>&1
    local rc=$?
    if [ "$rc" = "$code" ] && grep -q -- "$pat" "$TMP/err.out"; then
        ok "$name: exit $rc, \"$(grep -m1 -- "$pat" "$TMP/err.out")\""
    else
        bad "$name: exit $rc (expected $code), output:"; cat "$TMP/err.out"
    fi
}
expect_fail "missing input file" 1 "nosuch.txt: cannot read" \
    $PREP --tokenizer "$TOK" --out "$TMP/e1" "$TMP/a.txt" "$TMP/nosuch.txt"
[ -z "$(ls -A "$TMP/e1" 2> /dev/null)" ] && ok "missing input: nothing written" || bad "missing input: files written"
expect_fail "bad JSON line with --strict" 1 "bad.jsonl:2: no such field \"text\" (fatal with --strict)" \
    $PREP --tokenizer "$TOK" --out "$TMP/e2" --format jsonl --strict "$TMP/bad.jsonl"
[ -z "$(ls -A "$TMP/e2" 2> /dev/null)" ] && ok "--strict failure leaves no shards" || bad "--strict failure left files"
expect_fail "existing shards without --force" 1 "use --force" \
    $PREP --tokenizer "$TOK" --out "$TMP/blank" --doc-sep blank "$TMP/a.txt"
expect_fail "unknown option" 2 "unknown option '--frobnicate'" \
    $PREP --tokenizer "$TOK" --out "$TMP/e3" --frobnicate "$TMP/a.txt"
expect_fail "bad option value" 2 "--val-fraction must be" \
    $PREP --tokenizer "$TOK" --out "$TMP/e3" --val-fraction 1.5 "$TMP/a.txt"
expect_fail "missing tokenizer" 1 "nosuch.tok" \
    $PREP --tokenizer "$TMP/nosuch.tok" --out "$TMP/e3" "$TMP/a.txt"
expect_fail "no documents" 1 "no documents" \
    $PREP --tokenizer "$TOK" --out "$TMP/e4" "$TMP/c.txt"
# --force replaces the whole set: no stale shard of the old, longer set remains.
before=$(ls "$TMP/blank" | wc -l)
if prep blank --force --doc-sep blank --val-fraction 0.25 "$TMP/a.txt" "$TMP/b.txt" "$TMP/c.txt" \
        && [ "$(ls "$TMP/blank")" = "$(printf 'train_000000.bin\nval_000000.bin')" ]; then
    check blank "" 10000000 0.25 -1 text blank "$TMP/a.txt" "$TMP/b.txt" "$TMP/c.txt"
    ok "--force replaced $before shards by 2"
else
    bad "--force did not replace the old shards:"; ls "$TMP/blank"; cat "$TMP/blank.out"
fi
$PREP --help | grep -q "usage: moe_prepare" && ok "--help" || bad "--help"

test_end
