// Tests of the primal-dual quantities (model/dual.c) and the hindsight solver
// (train/hindsight.c) against brute force:
//  1. the fast TopK of dual_select equals route_topk (random scores, heavy ties,
//     NaN rows), for E <= 64 and beyond;
//  2. D(b), the primal score, the gap, the subgradient norms, MaxVio and the moved
//     slots of dual_finish equal their definitions computed by enumerating every
//     K-subset of every token; the subgradient c - C equals central finite
//     differences of the brute-force D; the multiplicative rule's log-space
//     quantities likewise; sums over micro-batches equal the whole batch;
//  3. hindsight_dual equals the brute-force D; hindsight_solve's bounds bracket
//     the optimum of the assignment LP found by exhaustive search over integer
//     assignments (totally unimodular, so the LP optimum is integral) and close on
//     it, with random, tied and fractional-capacity instances (a fractional C is
//     checked by replicating every token until the capacity is integral: the
//     replicated optimum is r times the fractional one); no b on a random sample
//     beats the optimum; a medium instance closes to a relative gap < 1e-11.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/dual.h"
#include "../model/route.h"
#include "../train/hindsight.h"
#include "check.h"

static uint64_t rng = 88172645463325252ull;
static double uniform(void) { // xorshift64*, a fixed stream
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (double)((rng * 2685821657736338717ull) >> 11) * (1.0 / 9007199254740992.0);
}

// ---------------------------------------------------------------- brute force

// The best K-subset of v (E) by sum (exact in double); its members in `best`.
static double best_subset(const double *v, int E, int K, int *best) {
    double top = -HUGE_VAL;
    for (uint32_t m = 0; m < (1u << E); m++) {
        if (__builtin_popcount(m) != K) continue;
        double sum = 0;
        for (int e = 0; e < E; e++)
            if (m >> e & 1) sum += v[e];
        if (sum > top) {
            top = sum;
            for (int e = 0, j = 0; e < E; e++)
                if (m >> e & 1) best[j++] = e;
        }
    }
    return top;
}

// D(b) by enumeration: sum over tokens of the best K-subset of s + b, minus C sum b.
static double brute_dual(const float *s, int n, int E, int K, const double *b) {
    double D = 0, v[64];
    int sel[64];
    for (int t = 0; t < n; t++) {
        for (int e = 0; e < E; e++) v[e] = (double)s[t * E + e] + b[e];
        D += best_subset(v, E, K, sel);
    }
    double bsum = 0;
    for (int e = 0; e < E; e++) bsum += b[e];
    return D - (double)K * n / E * bsum;
}

// The best assignment by exhaustive search: token t takes a K-subset, expert e
// gets exactly cap[e] (an integer) tokens. Depth-first with capacity pruning.
static double ex_best;
static void ex_search(const float *s, int n, int E, int K, int t, int *left, double acc) {
    if (t == n) {
        for (int e = 0; e < E; e++)
            if (left[e]) return;
        if (acc > ex_best) ex_best = acc;
        return;
    }
    for (uint32_t m = 0; m < (1u << E); m++) {
        if (__builtin_popcount(m) != K) continue;
        int ok = 1;
        for (int e = 0; e < E; e++)
            if ((m >> e & 1) && left[e] == 0) ok = 0;
        if (!ok) continue;
        double add = 0;
        for (int e = 0; e < E; e++)
            if (m >> e & 1) left[e]--, add += s[t * E + e];
        ex_search(s, n, E, K, t + 1, left, acc + add);
        for (int e = 0; e < E; e++)
            if (m >> e & 1) left[e]++;
    }
}

static double exhaustive_opt(const float *s, int n, int E, int K) {
    int left[16];
    for (int e = 0; e < E; e++) left[e] = K * n / E;
    ex_best = -HUGE_VAL;
    ex_search(s, n, E, K, 0, left, 0.0);
    return ex_best;
}

// ---------------------------------------------------------------- 1. selection

static void test_select(void) {
    int sizes[][2] = {{64, 6}, {64, 8}, {16, 2}, {20, 7}, {8, 1}, {5, 4}, {100, 6}};
    int mismatches = 0, rows = 0;
    for (size_t z = 0; z < sizeof(sizes) / sizeof(sizes[0]); z++) {
        int E = sizes[z][0], K = sizes[z][1];
        enum { N = 3000 };
        float *s = malloc(sizeof(float) * N * E), *b = malloc(sizeof(float) * E);
        int *sel = malloc(sizeof(int) * N * K), ref[64];
        double score[128];
        for (int mode = 0; mode < 3; mode++) { // 0 random, 1 heavy ties, 2 some NaN rows
            for (int i = 0; i < N * E; i++) {
                s[i] = (float)uniform();
                if (mode == 1) s[i] = floorf(s[i] * 4) / 4;
                if (mode == 2 && i % (7 * E) == 3) s[i] = NAN;
            }
            for (int e = 0; e < E; e++) b[e] = mode == 1 ? (float)(floor(uniform() * 3) / 4) : (float)(uniform() - 0.5);
            for (int mult = 0; mult < 2; mult++)
                for (int with_bias = 0; with_bias < 2; with_bias++) {
                    const float *bb = with_bias ? b : NULL;
                    float bm[128]; // a positive bias for mult
                    if (mult && with_bias) {
                        for (int e = 0; e < E; e++) bm[e] = b[e] + 1.0f;
                        bb = bm;
                    }
                    dual_select(s, N, E, K, bb, mult, sel);
                    for (int t = 0; t < N; t++) {
                        for (int e = 0; e < E; e++)
                            score[e] = (double)(float)ROUTE_SCORE(s[t * E + e], bb ? bb[e] : (mult ? 1.0f : 0.0f), mult);
                        route_topk(score, E, K, ref);
                        mismatches += memcmp(ref, sel + t * K, sizeof(int) * K) != 0;
                        rows++;
                    }
                }
        }
        free(s), free(b), free(sel);
    }
    check(mismatches == 0, "dual_select equals route_topk on %d rows (E 5..100, ties, NaN rows, +/- mult): %d differ",
          rows, mismatches);
}

// ---------------------------------------------------------------- 2. dual quantities

static void test_dual_quantities(void) {
    enum { N = 7, E = 5, K = 2 };
    double worst_D = 0, worst_P = 0, worst_fd = 0, worst_norm = 0;
    int moved_bad = 0, count_bad = 0, trials = 0;
    for (int trial = 0; trial < 200; trial++) {
        float s[N * E], b[E];
        double bd[E];
        for (int i = 0; i < N * E; i++) s[i] = (float)uniform();
        // Read back through volatile: GCC 12 at -O3 -mavx2 (SLP vectorizer)
        // copies the unrounded double when a value rounded to float is widened.
        for (int e = 0; e < E; e++) b[e] = (float)(uniform() - 0.5);
        for (int e = 0; e < E; e++) bd[e] = *(volatile float *)&b[e];
        DualAccum a;
        dual_accum_init(&a, E, K, 0);
        dual_accum_batch(&a, s, N, b);
        DualStats st;
        dual_finish(&a, b, &st);
        // Brute force: D, the primal of the best subsets, counts, moved slots.
        double P = 0, v[E], C = (double)K * N / E;
        int64_t c[E] = {0}, c0[E] = {0}, lost[E] = {0}, gained[E] = {0};
        for (int t = 0; t < N; t++) {
            int sb[K], s0[K];
            for (int e = 0; e < E; e++) v[e] = (double)s[t * E + e] + bd[e];
            best_subset(v, E, K, sb);
            for (int e = 0; e < E; e++) v[e] = (double)s[t * E + e];
            best_subset(v, E, K, s0);
            for (int j = 0; j < K; j++) {
                P += s[t * E + sb[j]];
                c[sb[j]]++;
                c0[s0[j]]++;
                int in0 = 0, in = 0;
                for (int k = 0; k < K; k++) in0 |= s0[k] == sb[j], in |= sb[k] == s0[j];
                if (!in0) gained[sb[j]]++;
                if (!in) lost[s0[j]]++;
            }
        }
        double D = brute_dual(s, N, E, K, bd);
        worst_D = fmax(worst_D, fabs(st.dual - D));
        worst_P = fmax(worst_P, fabs(st.primal - P));
        double l1 = 0, l2 = 0, gap = 0, cmax = 0;
        int64_t moved = 0, fo = 0, tu = 0;
        for (int e = 0; e < E; e++) {
            count_bad += a.counts[e] != c[e];
            l1 += fabs(c[e] - C), l2 += (c[e] - C) * (c[e] - C), gap += bd[e] * (c[e] - C);
            cmax = fmax(cmax, (double)c[e]);
            moved += lost[e];
            if (c0[e] > C) fo += lost[e];
            if (c0[e] < C) tu += gained[e];
            moved_bad += a.lost[e] != lost[e] || a.gained[e] != gained[e] || a.counts0[e] != c0[e];
        }
        worst_norm = fmax(worst_norm, fabs(st.subgrad_l1 - l1) + fabs(st.subgrad_l2 - sqrt(l2)) +
                                          fabs(st.gap - gap) + fabs(st.dual - st.primal - gap) +
                                          fabs(st.maxvio - (cmax - C) / C));
        moved_bad += st.moved != moved || st.moved_from_over != fo || st.moved_to_under != tu;
        if (moved && (fabs(st.from_over - (double)fo / moved) > 0 || fabs(st.to_under - (double)tu / moved) > 0))
            moved_bad++;
        // Subgradient: central differences of the brute-force D in each b_e.
        for (int e = 0; e < E; e++) {
            double h = 1e-7, bp[E], bm[E];
            memcpy(bp, bd, sizeof(bp));
            memcpy(bm, bd, sizeof(bm));
            bp[e] += h;
            bm[e] -= h;
            double fd = (brute_dual(s, N, E, K, bp) - brute_dual(s, N, E, K, bm)) / (2 * h);
            worst_fd = fmax(worst_fd, fabs(fd - (c[e] - C)));
        }
        dual_accum_free(&a);
        trials++;
    }
    check(worst_D < 1e-9, "D(b) equals the enumeration over K-subsets (%d batches, N 7, E 5, K 2): max diff %.2e",
          trials, worst_D);
    check(worst_P < 1e-9, "primal score equals the enumeration: max diff %.2e", worst_P);
    check(count_bad == 0, "counts equal the enumeration's: %d differ", count_bad);
    check(worst_fd < 1e-6, "subgradient c - C equals central differences of D (h 1e-7): max diff %.2e", worst_fd);
    check(worst_norm < 1e-12, "gap = b.(c - C) = D - primal, |c - C|_1, |c - C|_2, MaxVio: max diff %.2e", worst_norm);
    check(moved_bad == 0, "moved slots, their experts and the over/under shares equal the enumeration: %d differ",
          moved_bad);

    // The multiplicative rule: the same problem in log space.
    double worst_log = 0;
    for (int trial = 0; trial < 50; trial++) {
        float s[N * E], b[E];
        double lb[E], ls[N * E];
        for (int i = 0; i < N * E; i++) s[i] = (float)(0.05 + 0.9 * uniform());
        for (int e = 0; e < E; e++) b[e] = (float)(0.5 + uniform());
        for (int e = 0; e < E; e++) lb[e] = log((double)*(volatile float *)&b[e]);
        for (int i = 0; i < N * E; i++) ls[i] = (double)dual_log_score(s[i]);
        DualAccum a;
        dual_accum_init(&a, E, K, 1);
        dual_accum_batch(&a, s, N, b);
        DualStats st;
        dual_finish(&a, b, &st);
        double D = 0, v[E], bsum = 0;
        int sel[K];
        for (int t = 0; t < N; t++) {
            for (int e = 0; e < E; e++) v[e] = ls[t * E + e] + lb[e];
            D += best_subset(v, E, K, sel);
        }
        for (int e = 0; e < E; e++) bsum += lb[e];
        D -= (double)K * N / E * bsum;
        worst_log = fmax(worst_log, fabs(st.dual - D));
        dual_accum_free(&a);
    }
    check(worst_log < 1e-5, "mult: D in log space (log s, log b) equals the enumeration: max diff %.2e", worst_log);

    // Sums over micro-batches (and ranks) equal the whole batch.
    {
        enum { NB = 1000, EB = 64, KB = 6 };
        float *s = malloc(sizeof(float) * NB * EB), b[EB];
        for (int i = 0; i < NB * EB; i++) s[i] = (float)uniform();
        for (int e = 0; e < EB; e++) b[e] = (float)(0.3 * (uniform() - 0.5));
        DualAccum whole, part, sum;
        dual_accum_init(&whole, EB, KB, 0);
        dual_accum_init(&part, EB, KB, 0);
        dual_accum_init(&sum, EB, KB, 0);
        dual_accum_batch(&whole, s, NB, b);
        int cuts[] = {0, 1, 250, 600, 999, NB};
        for (int k = 0; k + 1 < (int)(sizeof(cuts) / sizeof(cuts[0])); k++) {
            dual_accum_reset(&part);
            dual_accum_batch(&part, s + (int64_t)cuts[k] * EB, cuts[k + 1] - cuts[k], b);
            dual_accum_add(&sum, &part);
        }
        DualStats a, c;
        dual_finish(&whole, b, &a);
        dual_finish(&sum, b, &c);
        check(memcmp(whole.counts, sum.counts, sizeof(int64_t) * 4 * EB) == 0 && whole.n_tokens == sum.n_tokens &&
                  fabs(a.dual - c.dual) < 1e-9 * fabs(a.dual) && a.moved == c.moved,
              "five micro-batches summed with dual_accum_add equal the whole batch (D %.6f vs %.6f)", a.dual, c.dual);
        DualAccum other;
        dual_accum_init(&other, EB, KB, 1);
        check(dual_accum_add(&sum, &other) == -1, "dual_accum_add refuses a mult accumulator into an additive one");
        dual_accum_free(&other), dual_accum_free(&whole), dual_accum_free(&part), dual_accum_free(&sum);
        free(s);
    }
}

// ---------------------------------------------------------------- 3. hindsight

static void test_hindsight(void) {
    // hindsight_dual against the enumeration.
    double worst = 0;
    for (int trial = 0; trial < 50; trial++) {
        enum { N = 9, E = 6, K = 3 };
        float s[N * E];
        double b[E];
        int64_t counts[E];
        for (int i = 0; i < N * E; i++) s[i] = (float)uniform();
        for (int e = 0; e < E; e++) b[e] = uniform() - 0.5;
        worst = fmax(worst, fabs(hindsight_dual(s, N, E, K, b, counts) - brute_dual(s, N, E, K, b)));
    }
    check(worst < 1e-12, "hindsight_dual equals the enumeration: max diff %.2e", worst);

    // The solver against exhaustive search.
    int shapes[][3] = {{4, 2, 1}, {6, 3, 1}, {6, 3, 2}, {4, 4, 1}, {8, 4, 2}, {8, 4, 3}, {6, 2, 1}, {3, 3, 2}, {2, 4, 2}};
    int n_inst = 0, bad = 0, weak_bad = 0;
    double worst_gap = 0, worst_err = 0;
    for (size_t z = 0; z < sizeof(shapes) / sizeof(shapes[0]); z++)
        for (int trial = 0; trial < 24; trial++) {
            int n = shapes[z][0], E = shapes[z][1], K = shapes[z][2];
            float s[64];
            for (int i = 0; i < n * E; i++) {
                s[i] = (float)uniform();
                if (trial % 3 == 1) s[i] = floorf(s[i] * 3) / 3; // many ties
                if (trial % 3 == 2) s[i] = (float)(uniform() < 0.7 ? 0.5 : uniform()); // degenerate
            }
            double opt = exhaustive_opt(s, n, E, K);
            double b[16] = {0};
            if (trial % 2) // a poor start must not matter
                for (int e = 0; e < E; e++) b[e] = 3.0 * (uniform() - 0.5);
            HindsightResult r;
            if (hindsight_solve(s, n, E, K, b, NULL, &r) != 0) {
                bad++;
                continue;
            }
            double tol = 1e-9 * fmax(1.0, fabs(opt));
            if (!(r.lower <= opt + tol && r.upper >= opt - tol)) bad++;
            worst_gap = fmax(worst_gap, r.gap);
            worst_err = fmax(worst_err, fmax(fabs(r.upper - opt), fabs(r.lower - opt)));
            // Weak duality: no b beats the optimum, and the returned b gives `upper`.
            for (int k = 0; k < 20; k++) {
                double bb[16];
                for (int e = 0; e < E; e++) bb[e] = 2.0 * (uniform() - 0.5);
                if (hindsight_dual(s, n, E, K, bb, NULL) < opt - tol) weak_bad++;
            }
            if (fabs(hindsight_dual(s, n, E, K, b, NULL) - r.upper) > tol) weak_bad++;
            n_inst++;
        }
    check(bad == 0, "hindsight bounds bracket the exhaustive optimum on %d instances (n <= 8, E <= 4, ties): %d fail",
          n_inst, bad);
    check(worst_err < 1e-9 && worst_gap < 1e-9, "and close on it: max |bound - optimum| %.2e, max gap %.2e", worst_err,
          worst_gap);
    check(weak_bad == 0, "no random b has F below the optimum, and F(returned b) = upper: %d fail", weak_bad);

    // Fractional capacity: replicate the tokens r times (capacity r C, integral).
    int frac[][4] = {{3, 4, 2, 2}, {5, 3, 1, 3}, {2, 3, 1, 3}, {1, 3, 2, 3}};
    double worst_frac = 0;
    for (size_t z = 0; z < sizeof(frac) / sizeof(frac[0]); z++)
        for (int trial = 0; trial < 4; trial++) {
            int n = frac[z][0], E = frac[z][1], K = frac[z][2], rep = frac[z][3];
            float s[64], sr[256];
            for (int i = 0; i < n * E; i++) s[i] = (float)uniform();
            for (int k = 0; k < rep; k++) memcpy(sr + k * n * E, s, sizeof(float) * n * E);
            double opt = exhaustive_opt(sr, n * rep, E, K) / rep;
            double b[16] = {0};
            HindsightResult r;
            hindsight_solve(s, n, E, K, b, NULL, &r);
            worst_frac = fmax(worst_frac, fmax(fabs(r.upper - opt), fabs(r.lower - opt)));
        }
    check(worst_frac < 1e-9, "fractional capacity (C = 3/2, 5/3, 2/3): bounds equal the replicated optimum / r: "
                             "max diff %.2e", worst_frac);

    // A medium instance: the certificate closes.
    {
        enum { N = 20000, E = 16, K = 3 };
        float *s = malloc(sizeof(float) * N * E);
        double mu[E];
        for (int e = 0; e < E; e++) mu[e] = 2.0 * uniform();
        for (int i = 0; i < N * E; i++) s[i] = (float)(1.0 / (1.0 + exp(-(mu[i % E] + 2.0 * (uniform() - 0.5)))));
        double b[E] = {0};
        double F0 = hindsight_dual(s, N, E, K, b, NULL);
        HindsightResult r;
        int rc = hindsight_solve(s, N, E, K, b, NULL, &r);
        check(rc == 0 && r.rel_gap < 1e-11 && r.upper <= F0,
              "20000 tokens, E 16, K 3: upper %.6f, lower %.6f, relative gap %.1e (F(0) = %.3f), %d Newton steps, "
              "%lld shortest paths", r.upper, r.lower, r.rel_gap, F0, r.newton_iters, (long long)r.augments);
        free(s);
    }
}

int main(void) {
    test_select();
    test_dual_quantities();
    test_hindsight();
    return check_summary("test_dual");
}
