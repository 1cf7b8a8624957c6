#!/usr/bin/env python3
"""MaxVio curves of trained runs side by side, optionally with open-loop replays.

    python3 scripts/lab_runs.py --out plot.png [--replay steps.csv] LABEL=run.jsonl ...

Reads each run's JSONL log (train_moe --log; the step records' maxvio_batch and
loss) and, with --replay, the per-step MaxVio of every setting of a moe_replay
steps.csv. Plots MaxVio_batch over the steps (log scale) and prints a markdown
table: MaxVio over the first 10 and the last 15 steps (means), the first step
whose MaxVio is below 1.5 (one step: a rough time to balance), and the loss
over the last 15 steps (mean, the per-step loss being one small batch's).
"""
import argparse
import csv
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def run_steps(path):
    """(step from 0, maxvio_batch, loss) of every step record of a train_moe log."""
    out = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not a JSON record ({e.msg})")
                if r.get("type") == "step":
                    out.append((r["step"] - 1, r["maxvio_batch"], r["loss"]))
    except OSError as e:
        raise SystemExit(f"lab_runs.py: cannot read {path}: {e.strerror}")
    if not out:
        raise SystemExit(f"{path}: no step records")
    return out


def mean(v):
    return sum(v) / len(v)


def first_below(pts, level=1.5):
    """The first step (from 0) whose MaxVio is below level, or '-'."""
    return next((p[0] for p in pts if p[1] < level), "-")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=train_moe.jsonl")
    ap.add_argument("--replay", help="a moe_replay steps.csv to draw next to the runs")
    ap.add_argument("--out", required=True, help="the plot (png)")
    ap.add_argument("--title", default="MaxVio_batch of trained runs")
    a = ap.parse_args()
    runs = []  # (label, steps) of every run, read before anything is drawn
    for spec in a.runs:
        label, sep, path = spec.rpartition("=")
        if not sep or not label or not path:
            raise SystemExit(f"lab_runs.py: {spec}: expected LABEL=run.jsonl")
        runs.append((label, run_steps(path)))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    print("| | MaxVio, first 10 steps | MaxVio, last 15 steps | first step below 1.5 | loss, last 15 steps |")
    print("|---|---|---|---|---|")
    if a.replay:
        by = {}
        for r in csv.DictReader(open(a.replay)):
            by.setdefault(r["setting"], []).append((int(r["step"]), float(r["maxvio"])))
        # The i-th replay setting shares its colour with the i-th run: list them in the same order.
        for i, (name, pts) in enumerate(by.items()):
            ax.plot(*zip(*pts), color=f"C{i}", lw=1, ls="--", label=f"replay {name} (open loop)")
            v = [m for _, m in pts]
            print(f"| replay {name} | {mean(v[:10]):.2f} | {mean(v[-15:]):.2f} | {first_below(pts)} | |")
    for i, (label, pts) in enumerate(runs):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", lw=1.6, label=f"{label} (trained)")
        v = [p[1] for p in pts]
        loss = [p[2] for p in pts]
        print(f"| {label} | {mean(v[:10]):.2f} | {mean(v[-15:]):.2f} | {first_below(pts)} | {mean(loss[-15:]):.3f} |")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio_batch")
    ax.set_title(a.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
