#!/usr/bin/env python3
"""The hindsight solver (train/hindsight.c) against an independent linear
program. min_b F(b), F(b) = sum_i (sum of the K largest s[i,e] + b[e]) - C
sum_e b[e], C = K n / E, is by LP duality the assignment LP

    maximise sum s x   subject to  sum_e x[i,e] = K (each row),
                                   sum_i x[i,e] = C (each expert),  0 <= x <= 1,

which scipy's HiGHS solves here from its own formulation. On random instances
(Gaussian scores, heavy-tailed scores, many exact ties, a dominant expert, C
not an integer) the solver's two bounds must bracket the LP optimum within
1e-9 relative, and its certified gap must be below 1e-9.

    tests/test_hindsight_lp.py HINDSIGHT_LP     (build/hindsight_lp)

Without scipy (python3-scipy) the test says so and fails: CI installs it
(scripts/deps.sh test)."""
import subprocess
import sys

import numpy as np

try:
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix
except ImportError:
    sys.exit("FAIL test_hindsight_lp: scipy is not installed (apt-get install python3-scipy, or scripts/deps.sh test)")

TOL = 1e-9


def lp_optimum(s, K):
    n, E = s.shape
    C = K * n / E
    # Variables x[i,e] at index i E + e; equality rows: n token rows, then E expert rows.
    i, e = np.meshgrid(np.arange(n), np.arange(E), indexing="ij")
    var = (i * E + e).ravel()
    rows = np.concatenate([i.ravel(), n + e.ravel()])
    A = coo_matrix((np.ones(2 * n * E), (rows, np.concatenate([var, var]))), shape=(n + E, n * E))
    b = np.concatenate([np.full(n, float(K)), np.full(E, C)])
    r = linprog(-s.astype(np.float64).ravel(), A_eq=A.tocsr(), b_eq=b, bounds=(0, 1), method="highs")
    if r.status != 0:
        raise RuntimeError("linprog: %s" % r.message)
    return -r.fun


def instances(rng):
    for n, E, K in [(7, 3, 1), (20, 4, 2), (50, 8, 2), (101, 6, 3), (200, 16, 4), (300, 32, 6), (64, 64, 6)]:
        yield "gaussian", rng.standard_normal((n, E)).astype(np.float32), K
        yield "zipf", (np.log(rng.zipf(1.5, (n, E)).astype(np.float64)) + 0.01 * rng.standard_normal((n, E))).astype(np.float32), K
        yield "ties", rng.integers(0, 3, (n, E)).astype(np.float32) * 0.5, K
        dom = rng.standard_normal((n, E)).astype(np.float32)
        dom[:, 0] += 5.0  # every token prefers expert 0
        yield "dominant", dom, K


def main():
    tool = sys.argv[1] if len(sys.argv) > 1 else "build/hindsight_lp"
    rng = np.random.default_rng(7)
    fails, worst, worst_gap, count = 0, 0.0, 0.0, 0
    for kind, s, K in instances(rng):
        count += 1
        n, E = s.shape
        text = "%d %d %d\n" % (n, E, K) + "\n".join(" ".join("%.9g" % v for v in row) for row in s) + "\n"
        out = subprocess.run([tool], input=text, capture_output=True, text=True)
        if out.returncode != 0:
            print("FAIL test_hindsight_lp: %s n %d E %d K %d: the solver failed: %s" % (kind, n, E, K, out.stderr.strip()))
            fails += 1
            continue
        upper, lower, rel_gap = map(float, out.stdout.split())
        opt = lp_optimum(s, K)
        scale = max(abs(opt), 1.0)
        err = max(upper - opt, opt - lower, 0.0) / scale  # how far outside [lower, upper] the LP optimum lies, or 0
        dev = max(abs(upper - opt), abs(lower - opt)) / scale
        worst, worst_gap = max(worst, dev), max(worst_gap, rel_gap)
        if dev > TOL or rel_gap > TOL or err > TOL:
            print("FAIL test_hindsight_lp: %s n %d E %d K %d: solver [%.12g, %.12g], LP %.12g (rel dev %.2e)"
                  % (kind, n, E, K, lower, upper, opt, dev))
            fails += 1
    if fails:
        print("test_hindsight_lp: %d of %d instances failed" % (fails, count))
        sys.exit(1)
    print("ok   test_hindsight_lp: %d instances (gaussian, zipf, ties, dominant; n 7..300, E 3..64): the solver's "
          "bounds within %.1e of scipy HiGHS's LP optimum (tol %.0e), certified gaps <= %.1e" % (count, worst, TOL, worst_gap))


if __name__ == "__main__":
    main()
