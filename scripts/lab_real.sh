#!/usr/bin/env bash
# The balancing lab on a real router-score trace (docs/results/lab/README.md,
# "On a real trace"): the `small` preset trained on the quickstart's data with
# every token traced (--trace-router), then
#   (a) its first batch repeated: D(b_t) for sign and prop across gamma
#   (c) the replay of a gamma grid against the closed loop (the traced run and
#       two untraced runs at the other gammas)
#   (b) regret on the trace for the const, inv and invsqrt schedules, on the
#       whole trace and on its second half
#   (d) the bias updated every micro-batch vs once per step (five untraced runs)
# Each run takes 3-7 minutes on one thread of a shared core; a run whose log
# exists is not trained again.
# The run's outputs go to runs/lab/real/; tables and plots to docs/results/lab/.
# Needs train_moe, moe_replay (make train_moe moe_replay), the quickstart's
# shards (scripts/quickstart.sh --prepare-only) and /usr/bin/python3 with
# numpy and matplotlib. STEPS and B choose the run's length and micro-batch.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/lab/real
DOC=docs/results/lab
PY=/usr/bin/python3
STEPS=${STEPS:-150}
B=${B:-2}
mkdir -p "$RUN" "$DOC"
DATA=runs/quickstart/data
[ -e "$DATA/train_00000.bin" ] || ls "$DATA"/train_*.bin > /dev/null || { echo "run scripts/quickstart.sh --prepare-only first"; exit 1; }

# The traced run: `small` (3 MoE layers, E 64, top-6), B x 256 tokens a step,
# gamma 0.01 (the quickstart's), every token of every step traced.
if [ ! -s "$RUN/small.trace" ]; then
    ./train_moe --config small --vocab-size 4096 --balance alf --gamma 0.01 --train-data "$DATA/train_*.bin" \
        -b "$B" --steps "$STEPS" --lr 3e-3 --warmup-steps 15 --lr-min 1e-4 --threads 1 --print-every 10 \
        --log "$RUN/small.jsonl" --trace-router "$RUN/small.trace" > "$RUN/small.out"
fi

# (a) The first traced batch, repeated 300 times.
mkdir -p "$RUN/deterministic"
./moe_replay --trace "$RUN/small.trace" --repeat 1 --steps 300 \
    --gamma-rule sign,prop --gamma 1e-4,1e-3,1e-2,3e-2,1e-1 --horizons 2 \
    --out "$RUN/deterministic" > "$RUN/deterministic/replay.md"
$PY scripts/lab_monotone.py "$RUN/deterministic" > "$RUN/deterministic/monotone.md"
cp "$RUN/deterministic/monotone.md" "$DOC/real_deterministic.md"
cp "$RUN/deterministic/dual_gap.png" "$DOC/real_deterministic_dual_gap.png"

# (c) Replay against the closed loop (two more runs): the gamma grid replayed open-loop from
# the bias init, next to the same gammas trained for real (the traced run is
# gamma 0.01; 0.001 and 0.1 are trained here with the same settings, untraced).
small_run() { # small_run NAME [train_moe options]: the traced run's settings, logged to $RUN/NAME.jsonl
    local name=$1; shift
    if [ ! -s "$RUN/$name.jsonl" ]; then
        mkdir -p "$(dirname "$RUN/$name")"
        ./train_moe --config small --vocab-size 4096 --balance alf --train-data "$DATA/train_*.bin" \
            -b "$B" --steps "$STEPS" --lr 3e-3 --warmup-steps 15 --lr-min 1e-4 --threads 1 --print-every 10 \
            --log "$RUN/$name.jsonl.part" "$@" > "$RUN/$name.out"
        mv "$RUN/$name.jsonl.part" "$RUN/$name.jsonl"
    fi
}
small_run closed_loop/g0.001 --gamma 0.001
small_run closed_loop/g0.1 --gamma 0.1
mkdir -p "$RUN/closed"
./moe_replay --trace "$RUN/small.trace" --gamma-rule sign --gamma 0.001,0.01,0.1 --horizons 0 \
    --out "$RUN/closed" > "$RUN/closed/replay.md"
$PY scripts/lab_runs.py --replay "$RUN/closed/steps.csv" --out "$DOC/real_closed_loop.png" \
    --title "replay from the trace vs trained runs (small, 3 MoE layers, sign rule)" \
    "sign/const/g=0.001=$RUN/closed_loop/g0.001.jsonl" "sign/const/g=0.01 (the traced run)=$RUN/small.jsonl" \
    "sign/const/g=0.1=$RUN/closed_loop/g0.1.jsonl" > "$RUN/closed/runs.md"
{
    cat "$RUN/closed/summary.md"
    echo
    echo "The replays next to the trained runs (their logged MaxVio_batch and loss):"
    echo
    cat "$RUN/closed/runs.md"
} > "$DOC/real_closed.md"
# (b) Online on the trace: schedules, 12 hindsight horizons (about 70 s of
# hindsight solves). The whole trace from a zero bias, then its second half
# (steps 75-149, where the router drifts less) from the run's own bias at step
# 75 with the schedules restarted (--first-step 0).
online() { # online DIR TRACE [moe_replay options]: the schedules grid, tables and plots
    local dir=$1 trace=$2; shift 2
    mkdir -p "$dir"
    ./moe_replay --trace "$trace" --gamma-rule sign,prop --gamma 0.01,0.1 \
        --gamma-schedule const,inv,invsqrt --gamma-tau 10 --horizons 12 "$@" \
        --out "$dir" > "$dir/replay.md"
    $PY scripts/replay_plots.py "$dir" --title "regret on the small preset's trace (E 64, K 6, 3 MoE layers)"
    $PY scripts/lab_regret_table.py "$dir" > "$dir/regret.md"
}
online "$RUN/online" "$RUN/small.trace"
[ -s "$RUN/small_from75.trace" ] || $PY scripts/lab_trace_tail.py "$RUN/small.trace" 75 "$RUN/small_from75.trace"
online "$RUN/online_tail" "$RUN/small_from75.trace" --trace-unfinished --bias-start trace --first-step 0
{
    echo "# Regret on the real trace"
    echo
    echo "Written by scripts/lab_real.sh; discussion in [README.md](README.md)."
    echo
    echo "## The whole trace (steps 0-149), from a zero bias"
    cat "$RUN/online/summary.md"
    echo
    echo "R(T), summed over the 3 MoE layers:"
    echo
    cat "$RUN/online/regret.md"
    echo
    echo "## Steps 75-149, from the run's bias at step 75, schedules restarted"
    cat "$RUN/online_tail/summary.md"
    echo
    echo "R(T), summed over the 3 MoE layers:"
    echo
    cat "$RUN/online_tail/regret.md"
} > "$DOC/real_online.md"
for p in regret maxvio dual; do
    cp "$RUN/online/$p.png" "$DOC/real_online_$p.png"
    cp "$RUN/online_tail/$p.png" "$DOC/real_online_tail_$p.png"
done

# (d) The bias updated after every micro-batch (Han & Zhong) or once per
# optimizer step (Wang et al.): two micro-batches per step, same seed.
# GAMMAS_D: the gammas to compare ("0.01 0.001"). Per step, `micro` updates
# twice: `step` at twice gamma (STEP_CONTROL_D, 0.02) moves the bias as far.
MICRO_RUNS=()
for g in ${GAMMAS_D:-0.01 0.001}; do
    for every in micro step; do
        small_run "micro/${every}_g$g" --gamma "$g" --batch-tokens $((2 * B * 256)) --bias-update-every "$every"
        MICRO_RUNS+=("$every/g=$g=$RUN/micro/${every}_g$g.jsonl")
    done
done
for g in ${STEP_CONTROL_D:-0.02}; do
    small_run "micro/step_g$g" --gamma "$g" --batch-tokens $((2 * B * 256)) --bias-update-every step
    MICRO_RUNS+=("step/g=$g=$RUN/micro/step_g$g.jsonl")
done
{
    echo "# Bias update every micro-batch vs once per step"
    echo
    echo "Written by scripts/lab_real.sh from the runs' logs; discussion in [README.md](README.md)."
    echo
    $PY scripts/lab_runs.py --out "$DOC/real_micro.png" \
        --title "bias update every micro-batch vs once per step (small, 2 micro-batches of $B x 256 tokens a step)" \
        "${MICRO_RUNS[@]}"
} > "$DOC/real_micro.md"

echo "wrote $DOC/real_*.md and png"
