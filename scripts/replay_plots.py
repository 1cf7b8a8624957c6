#!/usr/bin/env python3
"""Plots of a moe_replay output folder.

Usage:
    python3 scripts/replay_plots.py DIR [--title T]

Reads DIR/regret.csv and DIR/steps.csv (written by `moe_replay --out DIR`) and
writes into DIR, one panel per source (trace or stream):

    regret.png    regret R(T) against the horizon T, log axes (a symmetric log
                  scale where a regret is negative), with the least-squares fit
                  a + c f(T) of the best of f = ln T, sqrt T, T drawn dashed, and
                  slopes 1/2 and 1 for reference
    maxvio.png    MaxVio (averaged over MoE layers) per step
    dual.png      per step D(b_t) - D(b*) summed (the regret against the final b*,
                  the per-step comparator), log x axis

R(T) = sum_{t < T} D_t(b_t) - min_b sum_{t < T} D_t(b); the minimum is the
hindsight solver's certified upper bound (docs/balance.md "The replay").
Needs Python 3 with numpy and matplotlib (Debian: python3-numpy,
python3-matplotlib).
"""

import argparse
import csv
import math
import os
import sys

FITS = ("log T", "sqrt T", "T")


def read_csv(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        sys.exit(f"replay_plots.py: cannot read {path}: {e.strerror}")


def group(rows, *keys):
    """{(key values): [rows]} in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def fit(T, R):
    """(name, a, c, r2) of the best least-squares a + c f(T), or None."""
    import numpy as np

    T, R = np.asarray(T, float), np.asarray(R, float)
    best = None
    if len(T) < 3 or np.ptp(R) == 0:
        return None
    for name, f in zip(FITS, (np.log, np.sqrt, lambda t: t)):
        x = f(T)
        A = np.vstack([np.ones_like(x), x]).T
        (a, c), *_ = np.linalg.lstsq(A, R, rcond=None)
        r2 = 1 - np.sum((R - a - c * x) ** 2) / np.sum((R - R.mean()) ** 2)
        if best is None or r2 > best[3]:
            best = (name, a, c, r2)
    return best


def fit_curve(name, a, c, T):
    import numpy as np

    f = {"log T": np.log, "sqrt T": np.sqrt, "T": lambda t: t}[name]
    return a + c * f(T)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError as e:
        sys.exit(f"replay_plots.py: needs numpy and matplotlib ({e}); "
                 "on Debian: apt-get install python3-numpy python3-matplotlib")

    regret = read_csv(os.path.join(args.dir, "regret.csv"))
    steps = read_csv(os.path.join(args.dir, "steps.csv"))
    if not steps:
        sys.exit(f"replay_plots.py: {args.dir}/steps.csv has no rows")
    sources = list(group(steps, "source"))
    n = len(sources)

    def panels(name):
        fig, axes = plt.subplots(n, 1, figsize=(8, 3.6 * n), squeeze=False)
        if args.title:
            fig.suptitle(args.title)
        return fig, [ax[0] for ax in axes]

    def save(fig, name):
        fig.tight_layout(rect=(0, 0, 1, 0.98) if args.title else None)
        fig.savefig(os.path.join(args.dir, name), dpi=110)
        plt.close(fig)
        print(f"wrote {os.path.join(args.dir, name)}")

    # Regret against T, with the fitted growth.
    if regret:
        fig, axes = panels("regret")
        by_source = group(regret, "source")
        for ax, (src,) in zip(axes, sources):
            rows = by_source.get((src,), [])
            negative = any(float(r["regret"]) <= 0 for r in rows)
            for i, ((setting,), rs) in enumerate(group(rows, "setting").items()):
                T = np.array([float(r["T"]) for r in rs])
                R = np.array([float(r["regret"]) for r in rs])
                color = plt.cm.tab20(i % 20)
                f = fit(T, R)
                label = setting + (f" ~ {f[0]} (R^2 {f[3]:.2f})" if f else "")
                ax.plot(T, R, "o-", ms=3, color=color, label=label)
                if f:
                    y = fit_curve(f[0], f[1], f[2], T)
                    if not negative:
                        y = np.where(y > 0, y, np.nan)  # a log axis cannot show the fit below 0
                    ax.plot(T, y, "--", color=color, lw=0.8)
            Tmax = max(float(r["T"]) for r in rows) if rows else 1.0
            ax.set_xscale("log")
            if negative:
                ax.set_yscale("symlog", linthresh=1.0)
            else:
                ax.set_yscale("log")
                # Reference slopes through the largest regret at T = Tmax.
                top = max(float(r["regret"]) for r in rows)
                Tref = np.array([max(1.0, Tmax / 100), Tmax])
                for p, ls in ((0.5, ":"), (1.0, "-.")):
                    ax.plot(Tref, top * (Tref / Tmax) ** p, ls, color="gray", lw=0.8, label=f"slope {p:g}")
            ax.set_title(src, fontsize=9)
            ax.set_xlabel("horizon T (steps)")
            ax.set_ylabel("regret R(T)")
            ax.legend(fontsize=6)
        save(fig, "regret.png")

    # MaxVio per step, and the per-step regret against the final b*.
    for name, column, ylabel in (("maxvio.png", "maxvio", "MaxVio (mean over layers)"),
                                 ("dual.png", "regret_vs_final", "sum_t D_t(b_t) - D_t(b*)")):
        if column == "regret_vs_final" and not steps[0].get(column):
            continue
        fig, axes = panels(name)
        by_source = group(steps, "source")
        for ax, (src,) in zip(axes, sources):
            for i, ((setting,), rs) in enumerate(group(by_source[(src,)], "setting").items()):
                x = np.arange(1, len(rs) + 1)
                y = np.array([float(r[column]) if r[column] not in ("", "nan") else math.nan for r in rs])
                ax.plot(x, y, lw=0.9, color=plt.cm.tab20(i % 20), label=setting)
            if column == "maxvio":
                ax.set_yscale("log")
            else:
                ax.set_xscale("log")
                ax.set_yscale("symlog", linthresh=1.0)
            ax.set_title(src, fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=6)
        save(fig, name)


if __name__ == "__main__":
    main()
