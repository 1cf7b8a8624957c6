#!/usr/bin/env python3
"""The deterministic experiment of the balancing lab: does D(b_t) fall step by step?

Usage:
    python3 scripts/lab_monotone.py DIR

DIR is a `moe_replay --stream KIND --repeat 1 --out DIR` folder: every step routes
the same batch, so D_t is one convex function D and min_b sum_{t<T} D_t(b) = T D*.
For each setting this prints, from DIR/steps.csv and DIR/hindsight.csv, how many
steps raised D (D(b_{t+1}) > D(b_t)), the first such step, D(b_T) - D* at the end,
and MaxVio at the end, as a markdown table; and writes DIR/dual_gap.png, D(b_t) - D*
per step on a log scale (needs numpy and matplotlib).
"""
import csv
import os
import sys


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    steps = list(csv.DictReader(open(os.path.join(d, "steps.csv"))))
    hind = list(csv.DictReader(open(os.path.join(d, "hindsight.csv"))))
    last = max(hind, key=lambda r: int(r["T"]))
    dstar = float(last["upper"]) / int(last["T"])
    print(f"D* = {dstar:.6f} (the hindsight optimum over {last['T']} repeats / {last['T']}, "
          f"relative gap {float(last['rel_gap']):.1e})\n")
    print("| setting | steps raising D | first rise | D(b_T) - D* | MaxVio at T |")
    print("|---|---|---|---|---|")
    series = {}
    for r in steps:
        series.setdefault(r["setting"], []).append((float(r["dual"]), float(r["maxvio"])))
    for name, rows in series.items():
        D = [x[0] for x in rows]
        rises = [t for t in range(len(D) - 1) if D[t + 1] > D[t]]
        first = str(rises[0] + 1) if rises else "-"
        print(f"| {name} | {len(rises)} of {len(D) - 1} | {first} | {D[-1] - dstar:.4g} | {rows[-1][1]:.4f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, rows) in enumerate(series.items()):
        ax.plot(range(len(rows)), [max(x[0] - dstar, 1e-9) for x in rows], lw=0.9, color=f"C{i % 10}",
                ls="-" if name.startswith("prop") else "--", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step t (the same batch every step)")
    ax.set_ylabel("D(b_t) - D*")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(d, "dual_gap.png"), dpi=110)


if __name__ == "__main__":
    main()
