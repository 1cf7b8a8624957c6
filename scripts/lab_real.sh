#!/usr/bin/env bash
# The balancing lab on a real router-score trace (docs/results/lab/README.md,
# "On a real trace"): the `small` preset trained on the quickstart's data with
# every token traced (--trace-router), then
#   (a) its first batch repeated: D(b_t) for sign and prop across gamma
#   (c) the replay of a gamma grid against the closed loop (the traced run itself)
#   (b) regret on the trace for the const, inv and invsqrt schedules (the slow part:
#       the hindsight solves over up to 150 x 512 tokens)
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

# (c) Replay against the closed loop: the gamma grid replayed open-loop from
# the bias init, and the run's own MaxVio (it trained with gamma 0.01).
mkdir -p "$RUN/closed"
./moe_replay --trace "$RUN/small.trace" --gamma-rule sign --gamma 0.001,0.01,0.1 --horizons 0 \
    --out "$RUN/closed" > "$RUN/closed/replay.md"
$PY - "$RUN/closed/steps.csv" "$RUN/small.jsonl" "$DOC/real_closed_loop.png" << 'PYEOF'
import csv, json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
steps, log, out = sys.argv[1:4]
by = {}
for r in csv.DictReader(open(steps)):
    by.setdefault(r["setting"], []).append((int(r["step"]), float(r["maxvio"])))
run = [(r["step"] - 1, r["maxvio_batch"]) for r in map(json.loads, open(log)) if r.get("type") == "step"]
fig, ax = plt.subplots(figsize=(9, 4.5))
for name, pts in by.items():
    ax.plot(*zip(*pts), lw=1, label=f"replay {name} (open loop)")
ax.plot(*zip(*run), "k", lw=1.6, label="the trained run, sign/const/g=0.01 (closed loop, its logged MaxVio_batch)")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("MaxVio_batch")
ax.set_title("replay from the trace vs the run itself (small, 3 MoE layers)")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
PYEOF
cp "$RUN/closed/summary.md" "$DOC/real_closed.md"
# (b) Online on the trace: schedules.
mkdir -p "$RUN/online"
./moe_replay --trace "$RUN/small.trace" --gamma-rule sign,prop --gamma 0.01,0.1 \
    --gamma-schedule const,inv,invsqrt --gamma-tau 10 --horizons 4 \
    --out "$RUN/online" > "$RUN/online/replay.md"
$PY scripts/replay_plots.py "$RUN/online" --title "regret on the small preset's trace (E 64, K 6, 3 MoE layers)"
cp "$RUN/online/summary.md" "$DOC/real_online.md"
for p in regret maxvio dual; do cp "$RUN/online/$p.png" "$DOC/real_online_$p.png"; done

echo "wrote $DOC/real_*.md and png"
