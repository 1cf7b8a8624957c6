#!/usr/bin/env bash
# The project's trainer against its PyTorch peers (bench/peers/moe_torch.py),
# measured in one invocation on the same machine, alternately: every
# repetition runs the project, then each peer, so that a change in the
# machine's load falls on all of them. Prints a markdown table with the
# median and minimum over the repetitions and the ratios.
#
#   bench/compare.sh [--preset small] [-b 8] [--steps 12] [--reps 3] [--modes eager,compiled]
#                    [--trainer ./train_moe] [--device cpu] [--python python3] [--threads N]
#                    [--budget SECONDS] [--out DIR]
#
# Every run trains --steps steps of the preset on the same synthetic shards
# (tests/gen_shards.c) from its own random initialisation (the same scale);
# its figure is the median tokens/s of its steps after the first two (the
# peers compile there), from the JSON-lines logs both write. The project
# trainer is train_moe (CPU, fp32) or train_moecu (GPU, --device cuda); the
# peers run on --device in fp32 on a CPU and in bf16 autocast on a GPU (see
# moe_torch.py for what each mode uses and its fallbacks). --threads gives
# both sides the same CPU threads (default: all cores). --budget stops
# starting repetitions that would not finish in time (at least one runs).
# Output: DIR/compare.md, DIR/compare.tsv (one line per run), DIR/runs/.
set -u
cd "$(dirname "$0")/.."

PRESET=small
B=8
STEPS=12
REPS=3
MODES=eager,compiled
TRAINER=./train_moe
DEVICE=cpu
PY=python3
THREADS=$(nproc 2> /dev/null || echo 1)
BUDGET=0
OUT=build/compare
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case $1 in
        --preset) PRESET=$2; shift 2 ;;
        -b|--micro-batch) B=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --trainer) TRAINER=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "compare.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$B" "$STEPS" "$REPS" "$THREADS" "$BUDGET"; do
    [[ $v =~ ^[0-9]+$ ]] || { echo "compare.sh: '$v' is not a whole number" >&2; exit 2; }
done
[ "$STEPS" -ge 4 ] || { echo "compare.sh: --steps must be >= 4 (two are left out of the median)" >&2; exit 2; }
for m in ${MODES//,/ }; do
    [ "$m" = eager ] || [ "$m" = compiled ] || { echo "compare.sh: unknown mode '$m' (eager, compiled)" >&2; exit 2; }
done
[ -x "$TRAINER" ] || { echo "compare.sh: no trainer at $TRAINER" >&2; exit 2; }
"$PY" -c 'import torch' 2> /dev/null || { echo "compare.sh: $PY has no torch (--python)" >&2; exit 2; }
make -s --no-print-directory build/gen_shards || exit 2
mkdir -p "$OUT/runs" || exit 2
START=$(date +%s)

CFG=$OUT/$PRESET.config
"$TRAINER" --config "$PRESET" --print-config > "$CFG" 2>&1 || { echo "compare.sh: $(head -1 "$CFG")" >&2; exit 2; }
V=$(sed -n 's/^vocab_size=//p' "$CFG")
T=$(sed -n 's/^seq_len=//p' "$CFG")
DATA=$OUT/data-$PRESET
# Enough windows that a run never sees the same batch twice.
if [ ! -f "$DATA/train_000.bin" ]; then
    mkdir -p "$DATA" && ./build/gen_shards "$DATA" "$V" $((B * T * STEPS + 1)) $((T + 1)) 1 > /dev/null || exit 2
fi
COMMON=(-b "$B" --steps "$STEPS" --warmup-steps 1 --train-data "$DATA/train_*.bin")

. bench/log_rate.sh

TSV=$OUT/compare.tsv
printf 'rep\timplementation\ttokens_per_s\tseconds\tstatus\n' > "$TSV"
IMPLS=(project)
for m in ${MODES//,/ }; do IMPLS+=("peer-$m"); done
rep_s=0
for rep in $(seq 1 "$REPS"); do
    if [ "$rep" -gt 1 ] && [ "$BUDGET" -gt 0 ] && [ $(($(date +%s) - START + rep_s)) -gt "$BUDGET" ]; then
        echo "compare.sh: budget of $BUDGET s: stopping after $((rep - 1)) repetition(s)"
        break
    fi
    r0=$(date +%s)
    for impl in "${IMPLS[@]}"; do
        log=$OUT/runs/$impl-$rep
        rm -f "$log.jsonl"
        t0=$(date +%s)
        if [ "$impl" = project ]; then
            "$TRAINER" --config "$PRESET" "${COMMON[@]}" --threads "$THREADS" --print-every "$STEPS" \
                --log "$log.jsonl" > "$log.out" 2>&1
        else
            "$PY" bench/peers/moe_torch.py --model-config "$CFG" "${COMMON[@]}" --mode "${impl#peer-}" \
                --device "$DEVICE" --threads "$THREADS" --log "$log.jsonl" > "$log.out" 2>&1
        fi
        rc=$?
        rate=$([ $rc = 0 ] && log_rate "$log.jsonl")
        status=$([ $rc = 0 ] && [ -n "$rate" ] && echo ok || echo "failed (exit $rc, see runs/$impl-$rep.out)")
        printf '%s\t%s\t%s\t%s\t%s\n' "$rep" "$impl" "${rate:--}" $(($(date +%s) - t0)) "$status" >> "$TSV"
        echo "rep $rep $impl: ${rate:-failed} tokens/s"
    done
    rep_s=$(($(date +%s) - r0))
done

# Per implementation: median and minimum over the repetitions, and the ratio
# of the project's median to it.
{
    echo "$PRESET, micro-batch $B x $T, $STEPS steps per run, device $DEVICE, $THREADS CPU threads;"
    echo "each figure: the median tokens/s of a run's steps 3..$STEPS; median and minimum over the runs."
    echo
    echo "| implementation | runs | tokens/s (median) | tokens/s (min) | project / this (medians) |"
    echo "|---|---|---|---|---|"
    proj=$(awk -F'\t' '$2 == "project" && $5 == "ok" { print $3 }' "$TSV" | median)
    for impl in "${IMPLS[@]}"; do
        vals=$(awk -F'\t' -v i="$impl" '$2 == i && $5 == "ok" { print $3 }' "$TSV")
        n=$(echo -n "$vals" | grep -c .)
        if [ "$n" = 0 ]; then echo "| $impl | 0 | failed | | |"; continue; fi
        med=$(echo "$vals" | median)
        mn=$(echo "$vals" | sort -g | head -1)
        ratio=$([ -n "$proj" ] && awk -v p="$proj" -v m="$med" 'BEGIN { printf "%.2f", p / m }')
        printf '| %s | %d | %.0f | %.0f | %s |\n' "$impl" "$n" "$med" "$mn" "${ratio:--}"
    done
} > "$OUT/compare.md"
cat "$OUT/compare.md"
grep -q 'failed' "$TSV" && exit 1
exit 0
