#!/usr/bin/env bash
# The balancing lab's experiments on synthetic streams (docs/balance.md "Lab
# results"). Full outputs (CSV files) go to runs/lab/; the tables and plots are
# copied to docs/results/lab/:
#   deterministic  one batch repeated: D(b_t) for sign and prop across gamma
#   online         regret against T for const / inv / invsqrt on six streams
# Needs moe_replay (make moe_replay) and /usr/bin/python3 with numpy and matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/lab
DOC=docs/results/lab
PY=/usr/bin/python3
mkdir -p "$RUN/deterministic" "$RUN/online" "$DOC"

# (a) The deterministic setting: one batch of the small preset's size, again and again.
./moe_replay --stream stationary --repeat 1 --steps 300 --tokens 2048 \
    --gamma-rule sign,prop --gamma 1e-4,1e-3,1e-2,3e-2,1e-1 --horizons 2 \
    --out "$RUN/deterministic" > "$RUN/deterministic/replay.md"
$PY scripts/lab_monotone.py "$RUN/deterministic" > "$RUN/deterministic/monotone.md"
cp "$RUN/deterministic/monotone.md" "$DOC/deterministic.md"
cp "$RUN/deterministic/dual_gap.png" "$DOC/deterministic_dual_gap.png"

# (b) Online: six streams, constant steps and two decaying schedules.
./moe_replay --stream stationary,zipf,drift,adversarial --zipf-a 0.5,1,2 --steps 2000 --tokens 512 \
    --gamma-rule sign,prop --gamma 0.01,0.1 --gamma-schedule const,inv,invsqrt --gamma-tau 10 \
    --horizons 16 --drift-period 500 --alt-period 50 \
    --out "$RUN/online" > "$RUN/online/replay.md"
$PY scripts/replay_plots.py "$RUN/online" --title "regret on synthetic streams (E 64, K 6, 512 tokens per step)"
cp "$RUN/online/summary.md" "$DOC/online.md"
for p in regret maxvio dual; do cp "$RUN/online/$p.png" "$DOC/online_$p.png"; done
