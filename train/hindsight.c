// The hindsight solver: min_b F(b) with a certified duality gap (train/hindsight.h,
// docs/balance.md "The hindsight solver"). Two phases:
//   1. dual: damped Newton on F, the Hessian estimated from the tokens at the
//      selection boundary, until F stalls (near balance);
//   2. exact: successive shortest paths from the TopK assignment at that b to a
//      feasible and optimal one, moving b along (min-cost flow with potentials);
//      the final b makes the assignment a TopK of s + b, so F(b) equals its value.
#include "hindsight.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../util/util.h"

void hindsight_options_default(HindsightOptions *o) {
    o->max_newton = 60;
}

// Rows per chunk of a pass. Floating sums are formed per chunk and added in
// chunk order, so results do not depend on the number of threads.
enum { CHUNK = 4096 };

// ---------------------------------------------------------------- passes

// Inserts (v, e) into the sorted list val/idx of *n <= K1 entries (decreasing,
// ties to the lower index: e comes after every kept entry, so an equal v loses).
static inline void topk_insert(double *val, int *idx, int *n, int K1, double v, int e) {
    if (*n == K1 && !(v > val[K1 - 1])) return;
    int j = *n < K1 ? (*n)++ : K1 - 1;
    while (j > 0 && val[j - 1] < v) {
        val[j] = val[j - 1];
        idx[j] = idx[j - 1];
        j--;
    }
    val[j] = v;
    idx[j] = e;
}

// The K1 largest of v = s + b over e, decreasing, ties to the lower index. The
// hot loop of every pass. Shortcut for E <= 64 and K1 <= 8: the scores, padded
// to 64, are cut into 8 strided groups (lane j holds experts j, j + 8, ...); the
// K1-th largest group maximum bounds the K1-th largest score from below (K1
// groups reach it), so only the experts at or above it (a few more than K1,
// found with a bit mask and no branch per expert) go through the insertion, in
// index order. Same result as inserting every expert.
static void top_k1(const float *s, const double *b, int E, int K1, double *val, int *idx) {
    int n = 0;
    if (E > 64 || K1 > 8) {
        for (int e = 0; e < E; e++) topk_insert(val, idx, &n, K1, (double)s[e] + b[e], e);
        return;
    }
    double v[64], gm[8]; // the biased scores, padded; the group maxima
    for (int e = 0; e < 64; e++) v[e] = e < E ? (double)s[e] + b[e] : -HUGE_VAL;
    for (int j = 0; j < 8; j++) gm[j] = v[j];
    for (int i = 1; i < 8; i++)
        for (int j = 0; j < 8; j++) gm[j] = v[8 * i + j] > gm[j] ? v[8 * i + j] : gm[j];
    for (int a = 1; a < 8; a++) { // the group maxima, decreasing
        double x = gm[a];
        int k = a;
        for (; k > 0 && gm[k - 1] < x; k--) gm[k] = gm[k - 1];
        gm[k] = x;
    }
    double bound = gm[K1 - 1];
    uint64_t mask = 0; // the experts at or above the bound
    for (int i = 0; i < 8; i++) {
        unsigned m8 = 0;
        for (int j = 0; j < 8; j++) m8 |= (unsigned)(v[8 * i + j] >= bound) << j;
        mask |= (uint64_t)m8 << (8 * i);
    }
    while (mask) {
        int e = __builtin_ctzll(mask);
        mask &= mask - 1;
        topk_insert(val, idx, &n, K1, v[e], e);
    }
}

// One pass at b: F(b), the counts, and when margin is not NULL each row's gap
// between its K-th and (K+1)-th biased score with the two experts (pair (n, 2)).
static double pass(const float *s, int64_t n, int E, int K, const double *b, int64_t *counts,
                   double *margin, int *pair) {
    int64_t nchunk = (n + CHUNK - 1) / CHUNK;
    double *part = xcalloc((size_t)nchunk, sizeof(double)); // (nchunk) sums of the top K
    int K1 = K < E ? K + 1 : K;
    if (counts) memset(counts, 0, sizeof(int64_t) * (size_t)E);
#pragma omp parallel if (n > 8 * CHUNK)
    {
        int64_t *cnt = xcalloc((size_t)E, sizeof(int64_t)); // (E) this thread's counts
        double val[K1];
        int idx[K1];
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunk; c++) {
            int64_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
            double sum = 0.0;
            for (int64_t i = c * CHUNK; i < end; i++) {
                top_k1(s + i * E, b, E, K1, val, idx);
                for (int j = 0; j < K; j++) {
                    sum += val[j];
                    cnt[idx[j]]++;
                }
                if (margin) {
                    margin[i] = K1 > K ? val[K - 1] - val[K] : HUGE_VAL;
                    pair[2 * i] = idx[K - 1];
                    pair[2 * i + 1] = K1 > K ? idx[K] : idx[K - 1];
                }
            }
            part[c] = sum;
        }
        if (counts) {
#pragma omp critical
            for (int e = 0; e < E; e++) counts[e] += cnt[e];
        }
        free(cnt);
    }
    double F = 0.0;
    for (int64_t c = 0; c < nchunk; c++) F += part[c];
    free(part);
    double cap = (double)K * (double)n / E, bsum = 0.0;
    for (int e = 0; e < E; e++) bsum += b[e];
    return F - cap * bsum;
}

double hindsight_dual(const float *s, int64_t n, int E, int K, const double *b, int64_t *counts) {
    return pass(s, n, E, K, b, counts, NULL, NULL);
}

// ---------------------------------------------------------------- phase 1: Newton

// Solves A x = y for a symmetric positive definite A (E, E) by Cholesky, in place
// (A is destroyed, x overwrites y). Returns -1 when A is not positive definite.
static int cholesky_solve(double *A, double *y, int E) {
    for (int j = 0; j < E; j++) {
        double d = A[j * E + j];
        for (int k = 0; k < j; k++) d -= A[j * E + k] * A[j * E + k];
        if (!(d > 0.0)) return -1;
        d = sqrt(d);
        A[j * E + j] = d;
        for (int i = j + 1; i < E; i++) {
            double v = A[i * E + j];
            for (int k = 0; k < j; k++) v -= A[i * E + k] * A[j * E + k];
            A[i * E + j] = v / d;
        }
    }
    for (int i = 0; i < E; i++) { // L z = y
        double v = y[i];
        for (int k = 0; k < i; k++) v -= A[i * E + k] * y[k];
        y[i] = v / A[i * E + i];
    }
    for (int i = E - 1; i >= 0; i--) { // L^T x = z
        double v = y[i];
        for (int k = i + 1; k < E; k++) v -= A[k * E + i] * y[k];
        y[i] = v / A[i * E + i];
    }
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// The k-th smallest (0-based) of v (n), by sorting a strided subsample when n is
// large: the window only has to be about right.
static double kth_smallest(const double *v, int64_t n, int64_t k) {
    int64_t stride = n > 8192 ? n / 8192 : 1, m = n / stride;
    double *w = xmalloc(sizeof(double) * (size_t)m); // (m) the subsample
    for (int64_t i = 0; i < m; i++) w[i] = v[i * stride];
    qsort(w, (size_t)m, sizeof(double), cmp_double);
    int64_t j = k / stride;
    double r = w[j < m ? j : m - 1];
    free(w);
    return r;
}

// Damped Newton on F from b. F is piecewise linear, but over many tokens it is
// close to smooth: its gradient is c(b) - C and d c_e / d b_f = -rho_ef (e != f),
// rho_ef the density of tokens whose K-th and (K+1)-th biased scores are e and f
// at margin 0. rho is estimated from the tokens with margin below a window h,
// the Newton step solves (L(rho) / h + mu I) d = -(c - C) with L the graph
// Laplacian, and a backtracking line search on F itself accepts it. Returns the
// iterations taken; b becomes the best bias seen, *Fb its F.
static int newton(const float *s, int64_t n, int E, int K, double *b, double *Fb, int max_iter) {
    double cap = (double)K * (double)n / E;
    int64_t *counts = xmalloc(sizeof(int64_t) * (size_t)E); // (E)
    double *margin = xmalloc(sizeof(double) * (size_t)n);   // (n)
    int *pair = xmalloc(sizeof(int) * (size_t)(2 * n));     // (n, 2)
    double *H = xmalloc(sizeof(double) * (size_t)(E * E));  // (E, E)
    double *d = xmalloc(sizeof(double) * (size_t)E);        // (E) the step
    double *trial = xmalloc(sizeof(double) * (size_t)E);    // (E) a trial bias
    int64_t *trial_counts = xmalloc(sizeof(int64_t) * (size_t)E); // (E) counts kept while one is tried
    // No bias needs to move further than the spread of the scores.
    float lo = s[0], hi = s[0];
    for (int64_t i = 0; i < n * E; i++) {
        if (s[i] < lo) lo = s[i];
        if (s[i] > hi) hi = s[i];
    }
    double spread = (double)hi - (double)lo + 1e-12;
    double F = pass(s, n, E, K, b, counts, margin, pair), F_prev = HUGE_VAL, g1_prev = HUGE_VAL;
    int slow = 0; // iterations in a row that took less than a tenth off |c - C|_1
    int it = 0;
    for (; it < max_iter; it++) {
        double g1 = 0.0;
        for (int e = 0; e < E; e++) g1 += fabs((double)counts[e] - cap);
        // Near balance the shortest-path phase finishes the job exactly, at a
        // cost per unit of imbalance far below a pass over all tokens.
        if (g1 <= (double)n / 4096.0) break;
        // So does it when Newton stops making headway (the Hessian estimate of
        // a few tokens is poor): two iterations without a tenth off |c - C|_1,
        // once the imbalance is below n / 8 slots. Above it, slow Newton still
        // beats the shortest paths, which shift about one slot per path: on
        // real router scores (a few experts preferred by every token) Newton
        // takes 20-50 slow iterations from far off, and handing over early cost
        // thousands of paths (seconds for a few thousand tokens).
        slow = g1 > 0.9 * g1_prev ? slow + 1 : 0;
        if (slow >= 2 && g1 <= (double)n / 8.0) break;
        g1_prev = g1;
        // The window: small enough to be local (a few percent of the tokens,
        // where the density of the margins is still close to its value at 0).
        int64_t want = n / 32;
        if (want < 1) want = 1;
        double h = kth_smallest(margin, n, want);
        if (!(h > 0.0)) h = spread * 1e-9;
        memset(H, 0, sizeof(double) * (size_t)(E * E));
        for (int64_t i = 0; i < n; i++) {
            if (!(margin[i] <= h)) continue;
            int e = pair[2 * i], f = pair[2 * i + 1];
            H[e * E + f] -= 1.0;
            H[f * E + e] -= 1.0;
            H[e * E + e] += 1.0;
            H[f * E + f] += 1.0;
        }
        double tr = 0.0;
        for (int e = 0; e < E; e++) tr += H[e * E + e];
        double mu = 1e-3 * tr / E + 1e-9;
        for (int e = 0; e < E * E; e++) H[e] /= h;
        for (int e = 0; e < E; e++) {
            H[e * E + e] += mu / h;
            d[e] = -((double)counts[e] - cap);
        }
        if (cholesky_solve(H, d, E) != 0) break;
        // F is unchanged by a common shift of b: keep the step centred, and no
        // longer than the spread of the scores.
        double mean = 0.0, big = 0.0;
        for (int e = 0; e < E; e++) mean += d[e] / E;
        for (int e = 0; e < E; e++) {
            d[e] -= mean;
            if (fabs(d[e]) > big) big = fabs(d[e]);
        }
        double scale = big > spread ? spread / big : 1.0;
        // Backtracking on F itself; a rejected trial leaves b, F and counts as they were.
        int accepted = 0;
        int64_t *saved = trial_counts;
        // A step that fails even at 1/64 of its length is stuck on the
        // discreteness of F: the shortest-path phase takes over.
        for (int ls = 0; ls < 7 && !accepted; ls++, scale *= 0.5) {
            for (int e = 0; e < E; e++) trial[e] = b[e] + scale * d[e];
            memcpy(saved, counts, sizeof(int64_t) * (size_t)E);
            double Ft = pass(s, n, E, K, trial, counts, margin, pair);
            if (Ft < F - 1e-15 * fabs(F)) {
                F = Ft;
                memcpy(b, trial, sizeof(double) * (size_t)E);
                accepted = 1;
            } else {
                memcpy(counts, saved, sizeof(int64_t) * (size_t)E);
            }
        }
        // Far from the optimum F falls fast; near it, what is left is the
        // discreteness of the counts, which the shortest-path phase resolves
        // exactly: stop when F has stalled.
        if (!accepted || F_prev - F < 1e-10 * fabs(F)) break;
        F_prev = F;
    }
    *Fb = F;
    free(counts), free(margin), free(pair), free(H), free(d), free(trial), free(trial_counts);
    return it;
}

// ---------------------------------------------------------------- the assignment

// A feasible point of the LP. sel (n, K) holds each row's TopK at the bias b0
// of phase 1; rows whose x was changed live in dense (E) rows of `frac`, found
// through slot[i]. Moves are priced in reduced cost r = s_ie + b_e - s_if - b_f
// at a reference bias b (b0 at first). An unchanged row's moves cost at least
// its margin (least selected minus best unselected biased score), which at b0
// is margin0 and since then has moved by at most drift = max_e (b - b0) -
// min_e (b - b0): so the rows that can hold a move cheaper than delta are the
// changed ones and those with margin0 < delta + drift, a prefix of the rows
// sorted by margin0 (kept for the smallest eighth; beyond, every row is read).
typedef struct {
    int64_t n;
    int E, K;
    double *b0, *b;    // (E) the bias of sel and margin0, the reference bias
    double drift;      // max_e (b - b0) - min_e (b - b0)
    int *sel;          // (n, K)
    double *margin0;   // (n)
    int64_t *order;    // (n_order) rows by increasing margin0, those below theta
    int64_t n_order;
    double theta;
    int64_t *slot;     // (n) -1, or the row of frac holding row i's x
    double *frac;      // (nfrac, E)
    int64_t *frac_row; // (nfrac) the row of each
    int64_t nfrac, cap_frac;
} Assign;

static const double *sort_key; // margin0, for cmp_by_margin
static int cmp_by_margin(const void *p, const void *q) {
    double x = sort_key[*(const int64_t *)p], y = sort_key[*(const int64_t *)q];
    if (x != y) return x < y ? -1 : 1;
    return *(const int64_t *)p < *(const int64_t *)q ? -1 : 1;
}

static void assign_init(Assign *a, const float *s, int64_t n, int E, int K, const double *b) {
    memset(a, 0, sizeof(*a));
    a->n = n;
    a->E = E;
    a->K = K;
    a->b0 = xmalloc(sizeof(double) * (size_t)E);
    a->b = xmalloc(sizeof(double) * (size_t)E);
    memcpy(a->b0, b, sizeof(double) * (size_t)E);
    memcpy(a->b, b, sizeof(double) * (size_t)E);
    a->sel = xmalloc(sizeof(int) * (size_t)(n * K));
    a->margin0 = xmalloc(sizeof(double) * (size_t)n);
    a->slot = xmalloc(sizeof(int64_t) * (size_t)n);
    int K1 = K < E ? K + 1 : K;
#pragma omp parallel if (n > 8 * CHUNK)
    {
        double val[K1];
        int idx[K1];
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            top_k1(s + i * E, b, E, K1, val, idx);
            memcpy(a->sel + i * K, idx, sizeof(int) * (size_t)K);
            a->margin0[i] = K1 > K ? val[K - 1] - val[K] : HUGE_VAL;
            a->slot[i] = -1;
        }
    }
    a->theta = n > 64 ? kth_smallest(a->margin0, n, n / 8) : HUGE_VAL;
    a->order = xmalloc(sizeof(int64_t) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        if (a->margin0[i] < a->theta) a->order[a->n_order++] = i;
    sort_key = a->margin0;
    qsort(a->order, (size_t)a->n_order, sizeof(int64_t), cmp_by_margin);
}

static void assign_free(Assign *a) {
    free(a->b0), free(a->b), free(a->sel), free(a->margin0), free(a->order), free(a->slot), free(a->frac),
        free(a->frac_row);
}

// Moves the reference bias to b + phi.
static void assign_rebase(Assign *a, const double *phi) {
    double lo = HUGE_VAL, hi = -HUGE_VAL;
    for (int e = 0; e < a->E; e++) {
        a->b[e] += phi[e];
        lo = fmin(lo, a->b[e] - a->b0[e]);
        hi = fmax(hi, a->b[e] - a->b0[e]);
    }
    a->drift = hi - lo;
}

// Makes the reference bias the new b0: the margins of the unchanged rows (now
// the least selected minus the best unselected biased score, negative where
// the selection is no longer a TopK) and their order are recomputed, so drift
// is 0 again and the scans stay short.
static void assign_reanchor(Assign *a, const float *s) {
    int E = a->E, K = a->K;
    memcpy(a->b0, a->b, sizeof(double) * (size_t)E);
    a->drift = 0.0;
#pragma omp parallel for schedule(static) if (a->n > 8 * CHUNK)
    for (int64_t i = 0; i < a->n; i++) {
        if (a->slot[i] >= 0) {
            a->margin0[i] = -HUGE_VAL; // changed rows are always read
            continue;
        }
        const int *sel = a->sel + i * K;
        double lo = HUGE_VAL, hi = -HUGE_VAL;
        for (int e = 0; e < E; e++) {
            double v = (double)s[i * E + e] + a->b[e];
            int selected = 0;
            for (int j = 0; j < K; j++) selected |= sel[j] == e;
            if (selected) lo = fmin(lo, v);
            else hi = fmax(hi, v);
        }
        a->margin0[i] = lo - hi;
    }
    a->n_order = 0;
    for (int64_t i = 0; i < a->n; i++)
        if (a->margin0[i] < a->theta) a->order[a->n_order++] = i;
    sort_key = a->margin0;
    qsort(a->order, (size_t)a->n_order, sizeof(int64_t), cmp_by_margin);
}

// The rows that can hold a move cheaper than delta: the changed rows, then the
// unchanged ones with margin0 < delta + drift. Returns their number; *rows is
// grown as needed.
static int64_t rows_to_scan(const Assign *a, double delta, int64_t **rows, int64_t *cap) {
    int64_t m = 0;
    double limit = delta + a->drift;
    int64_t most = a->nfrac + (limit < a->theta ? a->n_order : a->n);
    if (most > *cap) {
        *cap = most;
        *rows = xrealloc(*rows, sizeof(int64_t) * (size_t)most);
    }
    for (int64_t k = 0; k < a->nfrac; k++) (*rows)[m++] = a->frac_row[k];
    if (limit < a->theta) {
        for (int64_t k = 0; k < a->n_order && a->margin0[a->order[k]] < limit; k++)
            if (a->slot[a->order[k]] < 0) (*rows)[m++] = a->order[k];
    } else {
        for (int64_t i = 0; i < a->n; i++)
            if (a->slot[i] < 0) (*rows)[m++] = i;
    }
    return m;
}

static double x_get(const Assign *a, int64_t i, int e) {
    if (a->slot[i] >= 0) return a->frac[a->slot[i] * a->E + e];
    for (int j = 0; j < a->K; j++)
        if (a->sel[i * a->K + j] == e) return 1.0;
    return 0.0;
}

// Row i's x as a dense row of frac (created on its first change).
static double *x_row(Assign *a, int64_t i) {
    if (a->slot[i] < 0) {
        if (a->nfrac == a->cap_frac) {
            a->cap_frac = a->cap_frac ? 2 * a->cap_frac : 1024;
            a->frac = xrealloc(a->frac, sizeof(double) * (size_t)(a->cap_frac * a->E));
            a->frac_row = xrealloc(a->frac_row, sizeof(int64_t) * (size_t)a->cap_frac);
        }
        a->frac_row[a->nfrac] = i;
        double *x = a->frac + a->nfrac * a->E;
        memset(x, 0, sizeof(double) * (size_t)a->E);
        for (int j = 0; j < a->K; j++) x[a->sel[i * a->K + j]] = 1.0;
        a->slot[i] = a->nfrac++;
    }
    return a->frac + a->slot[i] * a->E;
}

// Moves `amount` of row i's weight from expert e to expert f.
static void x_move(Assign *a, int64_t i, int e, int f, double amount) {
    double *x = x_row(a, i);
    x[e] -= amount;
    x[f] += amount;
    if (x[e] < 0.0) x[e] = 0.0; // rounding of a full move
    if (x[f] > 1.0) x[f] = 1.0;
}

static double assign_value(const Assign *a, const float *s) {
    int64_t n = a->n, nchunk = (n + CHUNK - 1) / CHUNK;
    double *part = xcalloc((size_t)nchunk, sizeof(double)); // (nchunk)
    int E = a->E, K = a->K;
#pragma omp parallel for schedule(dynamic, 1) if (n > 8 * CHUNK)
    for (int64_t c = 0; c < nchunk; c++) {
        int64_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
        double sum = 0.0;
        for (int64_t i = c * CHUNK; i < end; i++) {
            if (a->slot[i] >= 0) {
                for (int e = 0; e < E; e++) sum += a->frac[a->slot[i] * E + e] * (double)s[i * E + e];
            } else {
                for (int j = 0; j < K; j++) sum += (double)s[i * E + a->sel[i * K + j]];
            }
        }
        part[c] = sum;
    }
    double v = 0.0;
    for (int64_t c = 0; c < nchunk; c++) v += part[c];
    free(part);
    return v;
}

// The Q cheapest moves found per expert pair.
enum { Q = 4 };
typedef struct {
    double cost;
    int64_t row;
} Cand;

static void cand_offer(Cand *c /* (Q) sorted */, double cost, int64_t row) {
    if (!(cost < c[Q - 1].cost)) return;
    int j = Q - 1;
    while (j > 0 && c[j - 1].cost > cost) {
        c[j] = c[j - 1];
        j--;
    }
    c[j] = (Cand){cost, row};
}

// For every pair (e, f) with use_from[e] and use_to[f], the Q cheapest moves of
// a slot from e to f, by reduced cost r = s_ie + b_e - s_if - b_f at the
// reference bias, among rows with x_ie > 0 and x_if < 1: every move of a
// changed row, and the moves with r < delta of the others (only the rows of
// rows_to_scan, and in them only the experts near the boundary). best (E, E, Q).
static void scan_moves(const Assign *a, const float *s, const unsigned char *use_from, const unsigned char *use_to,
                       double delta, const int64_t *rows, int64_t m, Cand *best) {
    int E = a->E, K = a->K;
    const double *b = a->b;
    for (int64_t k = 0; k < (int64_t)E * E * Q; k++) best[k] = (Cand){HUGE_VAL, -1};
#pragma omp parallel if (m > 8 * CHUNK)
    {
        Cand *mine = xmalloc(sizeof(Cand) * (size_t)(E * E * Q)); // (E, E, Q) this thread's
        for (int64_t k = 0; k < (int64_t)E * E * Q; k++) mine[k] = (Cand){HUGE_VAL, -1};
        double *x = xmalloc(sizeof(double) * (size_t)E); // (E) one row's x
        double *v = xmalloc(sizeof(double) * (size_t)E); // (E) its biased scores
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < (m + CHUNK - 1) / CHUNK; c++) {
            int64_t end = (c + 1) * CHUNK < m ? (c + 1) * CHUNK : m;
            for (int64_t k = c * CHUNK; k < end; k++) {
                int64_t i = rows[k];
                int changed = a->slot[i] >= 0;
                for (int e = 0; e < E; e++) v[e] = (double)s[i * E + e] + b[e];
                // A move e -> f of an unchanged row costs v_e - v_f with v_e >= lo
                // (the least selected) and v_f <= hi (the best unselected): only
                // e with v_e < hi + delta and f with v_f > lo - delta can cost < delta.
                double from_below = HUGE_VAL, to_above = -HUGE_VAL;
                if (changed) {
                    memcpy(x, a->frac + a->slot[i] * E, sizeof(double) * (size_t)E);
                } else {
                    memset(x, 0, sizeof(double) * (size_t)E);
                    double lo = HUGE_VAL, hi = -HUGE_VAL;
                    for (int j = 0; j < K; j++) x[a->sel[i * K + j]] = 1.0;
                    for (int e = 0; e < E; e++) {
                        if (x[e] > 0.5) lo = fmin(lo, v[e]);
                        else hi = fmax(hi, v[e]);
                    }
                    if (!(lo - hi < delta)) continue;
                    from_below = hi + delta;
                    to_above = lo - delta;
                }
                for (int e = 0; e < E; e++) {
                    if (!use_from[e] || !(x[e] > 1e-12) || !(v[e] < from_below)) continue;
                    for (int f = 0; f < E; f++) {
                        if (f == e || !use_to[f] || !(x[f] < 1.0 - 1e-12) || !(v[f] > to_above)) continue;
                        cand_offer(mine + ((int64_t)e * E + f) * Q, v[e] - v[f], i);
                    }
                }
            }
        }
#pragma omp critical
        for (int64_t k = 0; k < (int64_t)E * E; k++)
            for (int q = 0; q < Q; q++)
                if (mine[k * Q + q].row >= 0) cand_offer(best + k * Q, mine[k * Q + q].cost, mine[k * Q + q].row);
        free(mine), free(x), free(v);
    }
}

// Phase 2: successive shortest paths (the classic exact method for min-cost
// flow). Invariant: every move costs r >= 0 at the reference bias b, so x is
// optimal for its own loads, as the TopK at b0 is. While an expert holds more
// than C: Dijkstra from every overloaded expert over the arcs e -> f (cost: the
// cheapest move of a slot from e to f) to the nearest underloaded expert t;
// shift the weight along that path (the amount its rows, the excess and the
// deficit allow); move b to b + min(d, d_t), d the distances, which keeps every
// r >= 0 and makes the path's moves cost 0. When no excess is left x is
// feasible and optimal, and b certifies it: x is a TopK of s + b, so F(b) equals
// its value.
//
// The arcs come from a table of the Q cheapest moves per expert pair, read by a
// scan of the changed rows and of the moves below a window delta, and kept over
// many paths: a stored move's cost only shifts with b (by the change of b_e -
// b_f), a move no longer possible is skipped, the rows changed since the scan
// are read again for every path, and an arc with no stored move gets the least
// cost its unread moves can have. Dijkstra with such lower bounds still gives
// distances that keep every r >= 0; only a path through a bound has no move to
// shift, and then the window widens and the table is read afresh.
// Returns 0, or -1 when stuck (not expected).
static int ssp(Assign *a, const float *s, int64_t *augments, int *scans) {
    int E = a->E;
    double cap = (double)a->K * (double)a->n / E;
    double *ex = xcalloc((size_t)E, sizeof(double)); // (E) load - C
    for (int64_t i = 0; i < a->n * a->K; i++) ex[a->sel[i]] += 1.0;
    for (int e = 0; e < E; e++) ex[e] -= cap;
    unsigned char *all = xmalloc((size_t)E);
    memset(all, 1, (size_t)E);
    Cand *best = xmalloc(sizeof(Cand) * (size_t)(E * E * Q)); // (E, E, Q) the table, costs at b_tab
    double *b_tab = xmalloc(sizeof(double) * (size_t)E);      // (E) the bias of the table's costs
    double *len = xmalloc(sizeof(double) * (size_t)(E * E));  // (E, E) arc lengths at b
    int64_t *arow = xmalloc(sizeof(int64_t) * (size_t)(E * E)); // (E, E) the arc's row, -1: a bound
    double *d = xmalloc(sizeof(double) * (size_t)E);          // (E) distances
    int *pred = xmalloc(sizeof(int) * (size_t)E);
    unsigned char *done = xmalloc((size_t)E);
    double *v = xmalloc(sizeof(double) * (size_t)E);          // (E) one row's biased scores
    int64_t *rows = NULL, cap_rows = 0;
    int64_t *since = NULL, n_since = 0, cap_since = 0;        // rows changed since the scan
    const double tol = 1e-9; // loads are exact to far better than this
    double delta = a->n > 64 ? kth_smallest(a->margin0, a->n, a->n / 256) : HUGE_VAL;
    if (!(delta > 0.0)) delta = 1e-12;
    int rc = 0, fresh = 0; // fresh: the table is up to date
    *augments = 0;
    *scans = 0;
    for (;;) {
        int any = 0;
        for (int e = 0; e < E; e++) any |= ex[e] > tol;
        if (!any) break;
        if (*scans > 1000000) {
            rc = -1;
            break;
        }
        if (!fresh) {
            // The rows to read grow with the drift of b: start afresh when it
            // is a large part of the sorted prefix.
            if (a->drift > 0.5 * a->theta) assign_reanchor(a, s);
            int64_t m = rows_to_scan(a, delta, &rows, &cap_rows);
            scan_moves(a, s, all, all, delta, rows, m, best);
            memcpy(b_tab, a->b, sizeof(double) * (size_t)E);
            n_since = 0;
            fresh = 1;
            (*scans)++;
        }
        // The arcs at the current b: the first stored move still possible, else
        // the bound of the unseen ones (unread: >= delta; read but not stored:
        // >= the Q-th stored); then the moves of the rows changed since.
        for (int e = 0; e < E; e++)
            for (int f = 0; f < E; f++) {
                int64_t k = (int64_t)e * E + f;
                double shift = (a->b[e] - b_tab[e]) - (a->b[f] - b_tab[f]);
                const Cand *c = best + k * Q;
                double bound = c[Q - 1].row >= 0 ? fmin(delta, c[Q - 1].cost) : delta;
                len[k] = bound + shift;
                arow[k] = -1;
                for (int q = 0; q < Q && c[q].row >= 0; q++)
                    if (x_get(a, c[q].row, e) > 1e-12 && x_get(a, c[q].row, f) < 1.0 - 1e-12) {
                        if (c[q].cost + shift <= len[k]) {
                            len[k] = c[q].cost + shift;
                            arow[k] = c[q].row;
                        }
                        break;
                    }
            }
        for (int64_t k = 0; k < n_since; k++) {
            int64_t i = since[k];
            for (int e = 0; e < E; e++) v[e] = (double)s[i * E + e] + a->b[e];
            for (int e = 0; e < E; e++) {
                if (!(x_get(a, i, e) > 1e-12)) continue;
                for (int f = 0; f < E; f++)
                    if (f != e && x_get(a, i, f) < 1.0 - 1e-12 && v[e] - v[f] < len[e * E + f]) {
                        len[e * E + f] = v[e] - v[f];
                        arow[e * E + f] = i;
                    }
            }
        }
        // Dijkstra on E nodes from every overloaded expert.
        for (int e = 0; e < E; e++) {
            d[e] = ex[e] > tol ? 0.0 : HUGE_VAL;
            pred[e] = -1;
            done[e] = 0;
        }
        int t = -1; // the nearest underloaded expert
        for (;;) {
            int u = -1;
            for (int e = 0; e < E; e++)
                if (!done[e] && d[e] < HUGE_VAL && (u < 0 || d[e] < d[u])) u = e;
            if (u < 0) break;
            done[u] = 1;
            if (ex[u] < -tol) {
                t = u;
                break;
            }
            for (int f = 0; f < E; f++) {
                double c = fmax(len[u * E + f], 0.0); // fmax: the rounding of a 0
                if (c < HUGE_VAL && d[u] + c < d[f]) {
                    d[f] = d[u] + c;
                    pred[f] = u;
                }
            }
        }
        int through_bound = t < 0;
        for (int f = t; f >= 0 && pred[f] >= 0; f = pred[f]) through_bound |= arow[pred[f] * E + f] < 0;
        if (through_bound) { // no move behind some arc of the path: read more
            if (isinf(delta) && n_since == 0) {
                rc = -1; // every move was read and no path exists: cannot happen
                break;
            }
            delta = delta < 1e300 ? 4.0 * delta : HUGE_VAL;
            fresh = 0;
            continue;
        }
        // The amount: the source's excess, the target's deficit, every row's room.
        int src = t;
        while (pred[src] >= 0) src = pred[src];
        double amt = fmin(ex[src], -ex[t]);
        for (int f = t; pred[f] >= 0; f = pred[f]) {
            int e = pred[f];
            int64_t i = arow[e * E + f];
            amt = fmin(amt, fmin(x_get(a, i, e), 1.0 - x_get(a, i, f)));
        }
        for (int f = t; pred[f] >= 0; f = pred[f]) {
            int e = pred[f];
            int64_t i = arow[e * E + f];
            x_move(a, i, e, f, amt);
            if (n_since == cap_since) {
                cap_since = cap_since ? 2 * cap_since : 256;
                since = xrealloc(since, sizeof(int64_t) * (size_t)cap_since);
            }
            since[n_since++] = i;
        }
        ex[src] -= amt;
        ex[t] += amt;
        (*augments)++;
        // b += min(d, d_t): moves stay >= 0, the path's moves cost 0.
        for (int e = 0; e < E; e++) d[e] = fmin(d[e], d[t]);
        assign_rebase(a, d);
        // Many changed rows make every path slow to price: read afresh.
        if (n_since > 64 * (int64_t)E) fresh = 0;
    }
    free(ex), free(all), free(best), free(b_tab), free(len), free(arow), free(d), free(pred), free(done), free(v),
        free(rows), free(since);
    return rc;
}

// ---------------------------------------------------------------- the solver

static void center(double *b, int E) {
    double mean = 0.0;
    for (int e = 0; e < E; e++) mean += b[e] / E;
    for (int e = 0; e < E; e++) b[e] -= mean;
}

int hindsight_solve(const float *s, int64_t n, int E, int K, double *b, const HindsightOptions *opt,
                    HindsightResult *res) {
    memset(res, 0, sizeof(*res));
    if (n < 1 || E < 1 || K < 1 || K > E) return -1;
    HindsightOptions def;
    if (!opt) {
        hindsight_options_default(&def);
        opt = &def;
    }
    double t0 = omp_get_wtime();
    // F does not change when every b moves by the same amount: keep b centred,
    // so that the biases of successive horizons compare.
    center(b, E);
    double Fn;
    if (K < E) {
        res->newton_iters = newton(s, n, E, K, b, &Fn, opt->max_newton);
    } else {
        Fn = pass(s, n, E, K, b, NULL, NULL, NULL); // every slot taken: F is constant
    }

    Assign a;
    assign_init(&a, s, n, E, K, b);
    if (ssp(&a, s, &res->augments, &res->scans) != 0) {
        fprintf(stderr, "hindsight: the shortest-path phase did not converge\n");
        assign_free(&a);
        return -1;
    }
    res->lower = assign_value(&a, s);
    // The bias that certifies the assignment; centred as b was.
    double *b_opt = xmalloc(sizeof(double) * (size_t)E);
    memcpy(b_opt, a.b, sizeof(double) * (size_t)E);
    center(b_opt, E);
    double Fo = pass(s, n, E, K, b_opt, NULL, NULL, NULL);
    res->upper = Fn;
    if (Fo <= Fn) {
        res->upper = Fo;
        memcpy(b, b_opt, sizeof(double) * (size_t)E);
    }
    free(b_opt);
    res->gap = res->upper - res->lower;
    res->rel_gap = res->gap / fmax(fabs(res->upper), 1e-300);
    res->seconds = omp_get_wtime() - t0;
    assign_free(&a);
    return 0;
}
