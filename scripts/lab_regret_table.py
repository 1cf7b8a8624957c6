#!/usr/bin/env python3
"""R(T) at every hindsight horizon of a moe_replay output, as a markdown table.

    python3 scripts/lab_regret_table.py DIR

Reads DIR/regret.csv (moe_replay --out DIR): one row per setting, one column per
horizon T, the regret R(T) = sum_{t < T} D_t(b_t) - min_b sum_{t < T} D_t(b)
summed over the MoE layers (docs/balance.md "The replay"). Negative: the
online bias did better than every fixed bias over the first T steps.
"""
import csv
import sys


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    path = f"{sys.argv[1]}/regret.csv"
    try:
        rows = list(csv.DictReader(open(path, newline="")))
    except OSError as e:
        sys.exit(f"lab_regret_table.py: cannot read {path}: {e.strerror}")
    if not rows:
        sys.exit(f"{path}: no regret rows (run moe_replay with --horizons > 0)")
    by = {}
    for r in rows:
        by.setdefault(r["setting"], {})[int(r["T"])] = float(r["regret"])
    Ts = sorted({t for v in by.values() for t in v})
    print("| setting | " + " | ".join(f"T={t}" for t in Ts) + " |")
    print("|---" * (len(Ts) + 1) + "|")
    for name, v in by.items():
        print(f"| {name} | " + " | ".join(f"{v[t]:.3g}" if t in v else "" for t in Ts) + " |")


if __name__ == "__main__":
    main()
