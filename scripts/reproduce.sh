#!/usr/bin/env bash
# The papers' comparisons at small scale: the `small` preset on the King James
# Bible (the quickstart corpus), on the CPU (or the GPU trainer when present).
#
#   main       alf (sign rule, gamma 1e-3) vs aux (alpha 1e-3) vs none, two seeds:
#              Wang et al., arXiv 2408.15664, Table 2
#   gamma      alf with gamma 1e-4, 1e-3, 1e-2 (arXiv 2408.15664, Fig. 4)
#   rule       sign vs prop vs mult (arXiv 2408.15664, Tables 3-4; the prop rule
#              is the constant-step dual update of Han & Zhong, arXiv 2512.03915)
#   schedule   const vs inv vs invsqrt vs stop step sizes (arXiv 2512.03915;
#              stop is DeepSeek-V3's switch-off, arXiv 2412.19437)
#   long       alf vs aux again, 4x longer, two seeds (gamma 1e-3 needs time to balance)
#
# Every run is the same model, data order, learning rate and length; only the
# balancing differs. Finished runs are skipped, so the script can be stopped
# and started again. Then scripts/report.py writes a table and plots per group
# into $OUT/report/<group>, and with --publish copies them to docs/results/.
#
#   scripts/reproduce.sh [--steps N] [--groups "main gamma rule schedule long"] [--publish]
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${REPRO_STEPS:-400}
GROUPS_=${REPRO_GROUPS:-"main gamma rule schedule long"}
OUT=${REPRO_OUT:-runs/repro}
PUBLISH=0
while [ $# -gt 0 ]; do
    case $1 in
        --steps) STEPS=${2:?}; shift 2 ;;
        --groups) GROUPS_=${2:?}; shift 2 ;;
        --out) OUT=${2:?}; shift 2 ;;
        --publish) PUBLISH=1; shift ;;
        -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "reproduce: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ $STEPS =~ ^[1-9][0-9]*$ ]] || { echo "reproduce: --steps must be a positive number" >&2; exit 2; }

# The corpus, tokenizer and shards of the quickstart (made once).
DATA=runs/quickstart/data
TOK=runs/quickstart/tokenizer.tok
if ! ls "$DATA"/*train_*.bin > /dev/null 2>&1 || [ ! -f "$TOK" ]; then
    bash scripts/quickstart.sh --prepare-only
fi
make -s train_moe
TRAIN=./train_moe
if nvidia-smi > /dev/null 2>&1 && make -s train_moecu > /dev/null 2>&1; then TRAIN=./train_moecu; fi
mkdir -p "$OUT"

# Shared by every run: 4 sequences of 256 tokens per step, cosine LR, an
# evaluation over the whole validation set every quarter of the run, expert
# loads and biases logged every 10 steps.
COMMON=(--config small --train-data "$DATA/*train_*.bin" --val-data "$DATA/*val_*.bin" --tokenizer "$TOK"
        -b 4 --steps "$STEPS" --lr 3e-3 --lr-min 3e-4 --warmup-steps 20 --eval-every $((STEPS / 4))
        --log-loads-every 10 --print-every 50)
TAU=$((STEPS / 10)) # inv/invsqrt decay over the run, not over the default 1000 steps

run() { # NAME [options...]: one training run, skipped when its log says it finished
    local name=$1; shift
    local log="$OUT/$name.jsonl" steps=$STEPS a
    for a in "$@"; do [ "${prev:-}" = --steps ] && steps=$a; prev=$a; done
    prev=
    if [ -f "$log" ] && grep -q "\"type\":\"eval\",\"step\":$steps," "$log"; then
        echo "== $name: done, skipped"; return
    fi
    rm -f "$log"
    echo "== $name: $*"
    local t0; t0=$(date +%s)
    "$TRAIN" "${COMMON[@]}" --log "$log" "$@" > "$OUT/$name.out" 2>&1 \
        || { echo "reproduce: run $name failed, see $OUT/$name.out" >&2; tail -5 "$OUT/$name.out" >&2; exit 1; }
    grep '^eval' "$OUT/$name.out" | tail -1
    echo "   ($(( $(date +%s) - t0 )) s)"
}

# A Python with numpy and matplotlib for the plots: $PYTHON, python3, or Debian's.
PY=
for p in ${PYTHON:-} python3 /usr/bin/python3; do
    if "$p" -c 'import numpy, matplotlib' 2> /dev/null; then PY=$p; break; fi
done
[ -n "$PY" ] || { echo "reproduce: the report needs python3 with numpy and matplotlib (apt-get install python3-matplotlib)" >&2; exit 1; }

report() { # GROUP STEPS NAME...
    local group=$1 steps=$2; shift 2
    local args=()
    for n in "$@"; do args+=("$n=$OUT/$n.jsonl"); done
    "$PY" scripts/report.py --out "$OUT/report/$group" --title "$group ($steps steps of 4 x 256 tokens, small preset)" "${args[@]}"
}

for g in $GROUPS_; do
    case $g in
    main)
        for seed in 1 2; do
            run "alf_s$seed" --seed $seed --balance alf --gamma 1e-3
            run "aux_s$seed" --seed $seed --balance aux --aux-alpha 1e-3
            run "none_s$seed" --seed $seed --balance none
        done
        report main $STEPS alf_s1 aux_s1 none_s1 alf_s2 aux_s2 none_s2 ;;
    gamma)
        run alf_s1 --seed 1 --balance alf --gamma 1e-3
        run gamma_1e-4 --seed 1 --balance alf --gamma 1e-4
        run gamma_1e-2 --seed 1 --balance alf --gamma 1e-2
        report gamma $STEPS gamma_1e-4 alf_s1 gamma_1e-2 ;;
    rule)
        run alf_s1 --seed 1 --balance alf --gamma 1e-3
        run rule_prop --seed 1 --balance alf --gamma-rule prop --gamma 1e-3
        run rule_mult --seed 1 --balance alf --gamma-rule mult --gamma 1e-3
        report rule $STEPS alf_s1 rule_prop rule_mult ;;
    schedule)
        run alf_s1 --seed 1 --balance alf --gamma 1e-3
        run sched_inv --seed 1 --balance alf --gamma 1e-3 --gamma-schedule inv --gamma-tau $TAU
        run sched_invsqrt --seed 1 --balance alf --gamma 1e-3 --gamma-schedule invsqrt --gamma-tau $TAU
        run sched_stop --seed 1 --balance alf --gamma 1e-3 --gamma-schedule stop --gamma-stop-frac 0.5
        # The same decays with tau = the whole run: gamma halves (inv) by the end.
        run sched_inv_slow --seed 1 --balance alf --gamma 1e-3 --gamma-schedule inv --gamma-tau $STEPS
        run sched_invsqrt_slow --seed 1 --balance alf --gamma 1e-3 --gamma-schedule invsqrt --gamma-tau $STEPS
        report schedule $STEPS alf_s1 sched_inv sched_invsqrt sched_stop sched_inv_slow sched_invsqrt_slow ;;
    long)
        L=$((STEPS * 4))
        for seed in 1 2; do
            run long_alf_s$seed --seed $seed --balance alf --gamma 1e-3 --steps $L --eval-every $((L / 8))
            run long_aux_s$seed --seed $seed --balance aux --aux-alpha 1e-3 --steps $L --eval-every $((L / 8))
        done
        report long $L long_alf_s1 long_aux_s1 long_alf_s2 long_aux_s2 ;;
    *) echo "reproduce: unknown group '$g' (main gamma rule schedule long)" >&2; exit 2 ;;
    esac
done

if [ "$PUBLISH" = 1 ]; then
    # Each group's report replaces its folder; docs/results/README.md (the
    # discussion of the results) stays.
    for d in "$OUT/report/"*/; do
        g=$(basename "$d")
        rm -rf "docs/results/$g"
        mkdir -p docs/results
        cp -r "$d" "docs/results/$g"
    done
    echo "copied the reports to docs/results/"
fi
echo "reports: $OUT/report/<group>/summary.md"
