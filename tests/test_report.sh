#!/usr/bin/env bash
# Tests of scripts/report.py on real train_moe logs (synthetic shards, tests/gen_shards.c):
#  1. three short runs: alf (evaluations, loads and biases logged), aux (no loads
#     logged), prop + inv schedule (no validation data, killed after its step-20
#     checkpoint at step 25 and resumed into the same log, so steps 21-25 appear twice);
#  2. summary.md has one row per run, and its numbers equal those read from each
#     log independently here (last step, mean train loss of the last 10% of steps,
#     last val_loss / val_ppl / maxvio_global, median tokens/s), the per-layer
#     MaxVio_global equals the last eval record's, method columns come from the config;
#  3. the PNGs exist and are valid PNG files of a plausible size; none for a run
#     that logged no loads;
#  4. a file that is not a trainer log fails, naming the file and the line;
#  5. without matplotlib, --no-plots still writes summary.md and plotting fails
#     with a message saying what is missing.
. "$(dirname "$0")/lib.sh"
test_begin test_report --tmp

# A Python 3 with numpy and matplotlib: $PYTHON, python3 on PATH, or Debian's
# (a python3 earlier on PATH, e.g. from pyenv, may lack Debian's packages).
PY=""
for p in ${PYTHON:-} python3 /usr/bin/python3; do
    if "$p" -c 'import numpy, matplotlib' 2> /dev/null; then PY=$p; break; fi
done
if [ -z "$PY" ]; then
    bad "no python3 with numpy and matplotlib (apt-get install python3-matplotlib python3-numpy)"
    test_end
fi
REPORT=(scripts/report.py)

BIN=${MOE_BIN_DIR:-.}/train_moe
[ -x "$BIN" ] || { bad "build first (make train_moe)"; test_end; }
test_shards "$TMP" 200000 20000
COMMON=(--config tiny --train-data "$TMP/train_*.bin" -b 8 --lr 3e-3 --warmup-steps 5 --threads 2
        --print-every 1000)
VAL=(--val-data "$TMP/val_*.bin")
train() { "$BIN" "${COMMON[@]}" "$@" > "$TMP/train.out" 2>&1 || { bad "train_moe $* failed:"; cat "$TMP/train.out"; }; }

# 1. The runs.
train "${VAL[@]}" --steps 40 --eval-every 20 --log-loads-every 5 --log "$TMP/alf.jsonl"
train "${VAL[@]}" --steps 30 --eval-every 10 --log-loads-every 0 --balance aux --log "$TMP/aux.jsonl"
RES=(--steps 30 --gamma-rule prop --gamma-schedule inv --gamma-tau 10 --log-loads-every 5
     --ckpt-dir "$TMP/ck" --ckpt-every 10 --keep-last 0 --log "$TMP/prop_res.jsonl")
train "${RES[@]}" --run-steps 25
rm -f "$TMP/ck/ckpt_00000025.bin" # as if killed after step 25: resume from step 20
train "${RES[@]}" --resume
[ "$(grep -c '"type":"config"' "$TMP/prop_res.jsonl")" = 2 ] && [ "$(grep -c '"step":23,' "$TMP/prop_res.jsonl")" = 2 ] \
    && ok "resumed log holds two config records and steps 21-25 twice" || bad "resumed log is not as planned"

# 2. The summary table.
OUT="$TMP/report"
if "$PY" "${REPORT[@]}" --out "$OUT" --smooth 10 --title "report test" alf="$TMP/alf.jsonl" aux="$TMP/aux.jsonl" \
        "$TMP/prop_res.jsonl" > "$TMP/report.out" 2> "$TMP/report.err"; then
    ok "report.py ran on three logs"
else
    bad "report.py failed:"; cat "$TMP/report.out" "$TMP/report.err"
fi
# The first table of summary.md (before the first "## " section).
main_table() { sed -n '/^## /q;/^| /p' "$OUT/summary.md" | tail -n +2; }
[ "$(main_table | wc -l)" = 3 ] && ok "summary table has 3 rows" || { bad "summary table rows:"; main_table; }

# Independent reading of a log: last step, mean loss of the last ceil(10%) steps,
# last eval's val_loss, val_ppl, maxvio_global and per-layer values, median tokens/s.
# A config record with resumed_at R drops the records after step R logged before it.
expect() {
    "$PY" - "$1" << 'EOF'
import json, math, re, statistics, sys
steps, evals = {}, {}
for line in open(sys.argv[1]):
    kind = re.search(r'"type":"(\w+)"', line).group(1)
    if kind == "config":
        r = int(re.search(r'"resumed_at":(\d+)', line).group(1))
        steps = {k: v for k, v in steps.items() if k <= r}
        evals = {k: v for k, v in evals.items() if k <= r}
    elif kind == "step":
        s = int(re.search(r'"step":(\d+)', line).group(1))
        steps[s] = (float(re.search(r'"loss":([0-9.]+)', line).group(1)),
                    float(re.search(r'"tokens_per_s":([0-9.]+)', line).group(1)))
    elif kind == "eval":
        e = json.loads(line)
        evals[e["step"]] = e
losses = [steps[k][0] for k in sorted(steps)]
n = math.ceil(len(losses) * 0.1)
train = sum(losses[-n:]) / n
e = evals[max(evals)] if evals else None
f = lambda key, spec: format(e[key], spec) if e else "–"
layers = " ".join(format(v, ".4f") for v in e["maxvio_global_layers"]) if e else ""
print(max(steps), f"{train:.4f}", f("val_loss", ".4f"), f("val_ppl", ".2f"), f("maxvio_global", ".4f"),
      format(statistics.median(v[1] for v in steps.values()), ",.0f"), layers, sep="|")
EOF
}
# Cells of a row (1: run, 2-5: method, 6: steps, 7: train loss, 8: val loss, 9: val ppl,
# 10: MaxVio_global, 11-12: MaxVio_batch, 13: idle, 14: tokens/s).
cells() { main_table | awk -F' [|] ' -v run="$1" '{ sub(/^[|] /, ""); sub(/ [|]$/, "") } $1 == run { $1 = $1; print }' OFS='|'; }
for run in alf aux prop_res; do
    IFS='|' read -r steps train val ppl mvg tps layers <<< "$(expect "$TMP/$run.jsonl")"
    IFS='|' read -r -a c <<< "$(cells "$run")"
    got="${c[5]:-}|${c[6]:-}|${c[7]:-}|${c[8]:-}|${c[9]:-}|${c[13]:-}"
    want="$steps|$train|$val|$ppl|$mvg|$tps"
    [ "$got" = "$want" ] && ok "$run: steps, train loss, val loss, val ppl, MaxVio_global, tokens/s = $got" \
        || bad "$run: table has $got, the log says $want"
    if [ -n "$layers" ]; then
        row=$(sed -n '/^## MaxVio_global per MoE layer/,/^## /p' "$OUT/summary.md" | grep "^| $run |")
        per=$(echo "$row" | awk -F' [|] ' '{ sub(/ [|]$/, "", $NF); s = $4; for (i = 5; i <= NF; i++) s = s " " $i; print s }')
        [ "$per" = "$layers" ] && ok "$run: per-layer MaxVio_global $per" || bad "$run: per-layer MaxVio_global '$per', log '$layers'"
    fi
done
IFS='|' read -r -a c <<< "$(cells aux)"
[ "${c[1]}|${c[2]}|${c[3]}" = "aux (α=0.001)|–|–" ] && ok "aux: method columns '${c[1]}', no gamma" \
    || bad "aux: method columns '${c[1]}|${c[2]}|${c[3]}'"
IFS='|' read -r -a c <<< "$(cells prop_res)"
[ "${c[1]}|${c[2]}|${c[3]}|${c[4]}" = "alf|prop|0.001|inv (tau=10)" ] && ok "prop_res: method columns ${c[1]}, ${c[2]}, ${c[3]}, ${c[4]}" \
    || bad "prop_res: method columns '${c[1]}|${c[2]}|${c[3]}|${c[4]}'"
# Resumed steps replace the earlier ones: an exact resume logs the same values, so
# mark the first invocation's steps 21-25 (loss, maxvio_batch 99); the row must not change.
awk '/"resumed_at":20/ { second = 1 } !second && /"type":"step"/ { split($0, a, /"step":/); s = a[2] + 0;
     if (s > 20) { sub(/"loss":[0-9.]+/, "\"loss\":99"); sub(/"maxvio_batch":[0-9.]+/, "\"maxvio_batch\":99") } }
     { print }' "$TMP/prop_res.jsonl" > "$TMP/stale.jsonl"
"$PY" "${REPORT[@]}" --no-plots --out "$TMP/r_stale" "$TMP/stale.jsonl" > /dev/null 2>&1
stale=$(sed -n '/^## /q;/^| stale |/p' "$TMP/r_stale/summary.md" | cut -d'|' -f3-)
want=$(main_table | grep '^| prop_res |' | cut -d'|' -f3-)
[ "$(grep -c '"loss":99,.*"maxvio_batch":99,' "$TMP/stale.jsonl")" = 5 ] && [ "$stale" = "$want" ] \
    && ok "resumed steps replace the earlier records of the same steps (row of the marked log = row of prop_res)" \
    || bad "stale records of a resumed run leak into the table: $stale, want $want"
grep -q '`prop_res`: resumed 1 time' "$OUT/summary.md" && grep -q '`prop_res`: no evaluation records' "$OUT/summary.md" \
    && ok "notes: prop_res resumed once, without evaluations" || bad "notes on prop_res missing"

# 3. The plots.
pngs=(maxvio_batch loss gamma dual loads_alf bias_alf loads_prop_res bias_prop_res)
check_png() {
    "$PY" - "$1" << 'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "no PNG signature and IHDR"
w, h = struct.unpack(">II", data[16:24])
assert w >= 200 and h >= 200 and len(data) > 5000 and data[-8:-4] == b"IEND", f"{w}x{h}, {len(data)} bytes"
print(f"{w}x{h}")
EOF
}
for p in "${pngs[@]}"; do
    if size=$(check_png "$OUT/$p.png" 2>&1); then ok "$p.png: valid PNG, $size"; else bad "$p.png: $size"; fi
done
[ ! -e "$OUT/loads_aux.png" ] && [ ! -e "$OUT/bias_aux.png" ] && ok "no loads/bias plots for aux (it logged no loads)" \
    || bad "loads_aux.png or bias_aux.png written for a run without loads"

# 4. Not a log.
printf 'step 1 | loss 4.1\n' > "$TMP/stdout.txt"
if "$PY" "${REPORT[@]}" --no-plots --out "$TMP/r4" "$TMP/stdout.txt" 2> "$TMP/err.txt"; then
    bad "report.py accepted a file that is not a log"
elif grep -q "stdout.txt:1:" "$TMP/err.txt"; then
    ok "a non-log file is rejected: $(cat "$TMP/err.txt")"
else
    bad "unclear error for a non-log file: $(cat "$TMP/err.txt")"
fi
{ head -n 5 "$TMP/alf.jsonl"; echo '{"type":"step","step":'; tail -n +6 "$TMP/alf.jsonl"; } > "$TMP/broken.jsonl"
if ! "$PY" "${REPORT[@]}" --no-plots --out "$TMP/r4" "$TMP/broken.jsonl" 2> "$TMP/err.txt" \
        && grep -q "broken.jsonl:6:" "$TMP/err.txt"; then
    ok "a broken line is reported with its number: $(cat "$TMP/err.txt")"
else
    bad "broken line 6 not reported: $(cat "$TMP/err.txt")"
fi

# 5. Without matplotlib (a module of that name that fails to import shadows it).
mkdir -p "$TMP/nompl"
echo 'raise ImportError("matplotlib hidden by the test")' > "$TMP/nompl/matplotlib.py"
if PYTHONPATH="$TMP/nompl" "$PY" "${REPORT[@]}" --no-plots --out "$TMP/r5" "$TMP/alf.jsonl" > /dev/null 2>&1 \
        && [ -s "$TMP/r5/summary.md" ] && [ -z "$(ls "$TMP/r5" | grep png)" ]; then
    ok "--no-plots writes summary.md without matplotlib"
else
    bad "--no-plots fails without matplotlib"
fi
if ! PYTHONPATH="$TMP/nompl" "$PY" "${REPORT[@]}" --out "$TMP/r6" "$TMP/alf.jsonl" > /dev/null 2> "$TMP/err.txt" \
        && grep -q "matplotlib" "$TMP/err.txt" && grep -q -- "--no-plots" "$TMP/err.txt"; then
    ok "plotting without matplotlib fails clearly: $(cat "$TMP/err.txt")"
else
    bad "no clear error without matplotlib: $(cat "$TMP/err.txt")"
fi

test_end
