#!/usr/bin/env bash
# Tests of the moe_replay program and scripts/replay_plots.py:
#  1. --help lists the options; an unknown option, a bad value, a method that
#     cannot be replayed, an unknown stream and a missing source are refused with
#     a message naming them and a non-zero exit;
#  2. a grid over a stream writes summary.md and the CSV files with one row per
#     setting and step (steps.csv), per setting and horizon (regret.csv), and the
#     table's R(T) equals sum_t D_t(b_t) - F(b*) recomputed here from the CSVs;
#  3. the stream saved as a trace replays to the same table (bias vs trace 0 with
#     --bias-start trace), in fp32; a bf16 trace is read too;
#  4. a corrupt and a truncated trace are refused naming the file; --save-trace
#     refuses an existing file and leaves it as it was;
#  5. replay_plots.py writes valid PNGs (when numpy and matplotlib exist).
. "$(dirname "$0")/lib.sh"
test_begin test_replay --tmp
MOE_REPLAY=${MOE_BIN_DIR:-.}/moe_replay # MOE_BIN_DIR: the sanitizer build (make test-asan)
[ -x "$MOE_REPLAY" ] || { bad "build first (make moe_replay)"; test_end; }
R=("$MOE_REPLAY" --threads 2)

# 1. Refusals.
"${R[@]}" --help > "$TMP/help" && grep -q -- "--gamma-schedule" "$TMP/help" && grep -q -- "--stream" "$TMP/help" \
    && ok "--help lists the stream and balance options" || bad "--help"
refused() { # expect a non-zero exit and the given text in stderr
    local want=$1; shift
    if "${R[@]}" "$@" > /dev/null 2> "$TMP/err"; then bad "accepted: $*"; return; fi
    grep -q -- "$want" "$TMP/err" && ok "refused ($want): $(head -c 150 "$TMP/err")" \
        || bad "refused without naming '$want': $(cat "$TMP/err")"
}
refused "--frobnicate" --stream stationary --frobnicate 3
refused "--gamma" --stream stationary --gamma=-1
refused "--gamma-rule" --stream stationary --gamma-rule sign,bogus
refused "aux" --stream stationary --balance aux
refused "wobbly" --stream wobbly
refused "--trace FILE or --stream" --gamma 0.01
refused "--top-k" --stream stationary --experts 4 --top-k 5

# 2. A grid over a stream.
SMALL=(--steps 30 --tokens 200 --experts 16 --top-k 2 --layers 2 --seed 3)
"${R[@]}" --stream stationary "${SMALL[@]}" --gamma-rule sign,prop --gamma 0.01,0.03 --horizons 5 \
    --out "$TMP/grid" > "$TMP/grid.out" 2> "$TMP/grid.err" || { bad "grid run failed"; cat "$TMP/grid.err"; }
for f in summary.md steps.csv regret.csv hindsight.csv; do
    [ -s "$TMP/grid/$f" ] || bad "missing $f"
done
rows=$(($(wc -l < "$TMP/grid/steps.csv") - 1))
[ "$rows" = 120 ] && ok "steps.csv: 4 settings x 30 steps = $rows rows" || bad "steps.csv has $rows rows, expected 120"
/usr/bin/python3 - "$TMP/grid" > "$TMP/check.out" << 'EOF' && ok "$(cat "$TMP/check.out")" || bad "R(T) recomputed: $(cat "$TMP/check.out")"
import csv, sys
d = sys.argv[1]
steps = list(csv.DictReader(open(d + "/steps.csv")))
regret = list(csv.DictReader(open(d + "/regret.csv")))
hind = {int(r["T"]): float(r["upper"]) for r in csv.DictReader(open(d + "/hindsight.csv"))}
worst = 0.0
for r in regret:
    T = int(r["T"])
    D = [float(s["dual"]) for s in steps if s["setting"] == r["setting"]][:T]
    want = sum(D) - hind[T]
    worst = max(worst, abs(want - float(r["regret"])) / max(1.0, abs(want)))
# The table's R(T) is the last horizon's.
table = {l.split("|")[1].strip(): float(l.split("|")[3]) for l in open(d + "/summary.md") if l.startswith("| sign") or l.startswith("| prop")}
last = {r["setting"]: float(r["regret"]) for r in regret if int(r["T"]) == 30}
worst_t = max(abs(table[k] - last[k]) / max(1.0, abs(last[k])) for k in last)
print(f"R(T) = sum of D_t(b_t) - F(b*) at every horizon (worst rel. diff {worst:.1e}), table = regret.csv ({worst_t:.1e})")
sys.exit(0 if worst < 1e-8 and worst_t < 1e-3 and len(table) == 4 else 1)
EOF

# 3. Through a trace.
"${R[@]}" --stream stationary "${SMALL[@]}" --gamma-rule prop --gamma 0.03 --horizons 5 \
    --save-trace "$TMP/s.trace" > "$TMP/save.out" 2>&1 || { bad "--save-trace failed"; cat "$TMP/save.out"; }
"${R[@]}" --stream stationary "${SMALL[@]}" --gamma-rule prop --gamma 0.03 --horizons 5 > "$TMP/stream.out" 2>&1
"${R[@]}" --trace "$TMP/s.trace" --gamma-rule prop --gamma 0.03 --horizons 5 --bias-start trace \
    > "$TMP/trace.out" 2>&1 || { bad "replaying the trace failed"; cat "$TMP/trace.out"; }
row_s=$(grep '^| prop' "$TMP/stream.out" | cut -d'|' -f2-10)
row_t=$(grep '^| prop' "$TMP/trace.out" | cut -d'|' -f2-10)
vs=$(grep '^| prop' "$TMP/trace.out" | cut -d'|' -f11 | tr -d ' ')
[ -n "$row_s" ] && [ "$row_s" = "$row_t" ] && [ "$vs" = 0 ] \
    && ok "the stream and its saved trace give the same row, bias vs trace $vs" \
    || bad "stream row '$row_s' vs trace row '$row_t' (bias vs trace '$vs')"
"${R[@]}" --stream stationary "${SMALL[@]}" --gamma-rule sign --gamma 0.01 --horizons 0 \
    --save-trace "$TMP/b.trace" --save-trace-dtype bf16 > /dev/null 2>&1
"${R[@]}" --trace "$TMP/b.trace" --horizons 0 > "$TMP/bf16.out" 2>&1 && grep -q '^| sign' "$TMP/bf16.out" \
    && [ "$(stat -c %s "$TMP/b.trace")" -lt "$(stat -c %s "$TMP/s.trace")" ] \
    && ok "a bf16 trace (smaller: $(stat -c %s "$TMP/b.trace") vs $(stat -c %s "$TMP/s.trace") bytes) replays" \
    || bad "bf16 trace: $(cat "$TMP/bf16.out")"

# 4. Damaged traces, and an existing file.
size=$(stat -c %s "$TMP/s.trace")
cp "$TMP/s.trace" "$TMP/corrupt.trace"
printf '\x55' | dd of="$TMP/corrupt.trace" bs=1 seek=$((size / 2)) conv=notrunc status=none
refused "$TMP/corrupt.trace" --trace "$TMP/corrupt.trace"
head -c $((size - 1000)) "$TMP/s.trace" > "$TMP/cut.trace"
refused "$TMP/cut.trace" --trace "$TMP/cut.trace"
"${R[@]}" --trace "$TMP/cut.trace" --trace-unfinished --horizons 0 > "$TMP/unf.out" 2>&1 \
    && grep -q "29 steps" "$TMP/unf.out" && ok "--trace-unfinished replays the 29 whole steps of the cut trace" \
    || bad "--trace-unfinished: $(cat "$TMP/unf.out")"
cp "$TMP/s.trace" "$TMP/keep.trace"
refused "keep.trace" --stream stationary "${SMALL[@]}" --horizons 0 --save-trace "$TMP/keep.trace"
cmp -s "$TMP/s.trace" "$TMP/keep.trace" && ok "the existing file is unchanged" || bad "the existing file was changed"

# 5. Plots.
if /usr/bin/python3 -c 'import numpy, matplotlib' 2> /dev/null; then
    /usr/bin/python3 scripts/replay_plots.py "$TMP/grid" > "$TMP/plots.out" 2>&1 || bad "replay_plots.py: $(cat "$TMP/plots.out")"
    for p in regret maxvio dual; do
        f="$TMP/grid/$p.png"
        [ -s "$f" ] && [ "$(head -c 8 "$f" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] \
            && ok "$p.png is a PNG of $(stat -c %s "$f") bytes" || bad "$p.png missing or not a PNG"
    done
else
    bad "no /usr/bin/python3 with numpy and matplotlib for the plots (apt-get install python3-numpy python3-matplotlib)"
fi

test_end
