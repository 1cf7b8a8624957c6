// The primal-dual quantities of one MoE layer's routing: per-token sums and
// per-expert counts accumulated over a batch, then D(b), the primal score, the
// gap, the subgradient and the moved slots. Definitions: model/dual.h and
// docs/balance.md.
#include "dual.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../util/util.h"
#include "route.h"

int dual_accum_init(DualAccum *a, int E, int K, int mult) {
    memset(a, 0, sizeof(*a));
    if (E < 1 || K < 1 || K > E) return -1;
    a->E = E;
    a->K = K;
    a->mult = mult ? 1 : 0;
    // One allocation for the four (E) count vectors.
    a->counts = xcalloc((size_t)4 * E, sizeof(int64_t));
    a->counts0 = a->counts + E;
    a->lost = a->counts + 2 * E;
    a->gained = a->counts + 3 * E;
    return 0;
}

void dual_accum_reset(DualAccum *a) {
    a->n_tokens = 0;
    a->primal = 0.0;
    memset(a->counts, 0, sizeof(int64_t) * 4 * (size_t)a->E);
}

void dual_accum_free(DualAccum *a) {
    free(a->counts);
    memset(a, 0, sizeof(*a));
}

int dual_accum_add(DualAccum *dst, const DualAccum *src) {
    if (dst->E != src->E || dst->K != src->K || dst->mult != src->mult) return -1;
    dst->n_tokens += src->n_tokens;
    dst->primal += src->primal;
    for (int e = 0; e < 4 * dst->E; e++) dst->counts[e] += src->counts[e];
    return 0;
}

// The place of v[i] in route_topk's order (score descending, then index
// ascending): how many of v[0..n) come before it, counted without a branch on
// the data (sorting a few values by insertion spends its time on mispredicted
// branches).
static inline int dual_place(const float *v, int n, int i) {
    int before = 0;
    for (int j = 0; j < n; j++) before += (v[j] > v[i]) | ((v[j] == v[i]) & (j < i));
    return before;
}

// route_topk's selection, faster for E <= 64 and K <= 8 (the replay routes
// millions of tokens): the scores are padded to 64 and cut into 8 strided groups
// (lane j holds experts j, j + 8, ...); the K-th largest group maximum bounds the
// K-th largest score from below (K groups reach it), so only the experts at or
// above it (a few more than K) are candidates, each put at its place among
// them (dual_place). Same result as route_topk for finite scores; a row with a
// NaN goes to route_topk itself.
static void dual_topk_row(const float *v, double *score, int E, int K, int *sel) {
    if (E <= 64 && K <= 8) {
        float vp[64], gm[8];
        for (int e = 0; e < 64; e++) vp[e] = e < E ? v[e] : -INFINITY;
        int nan = 0;
        for (int e = 0; e < E; e++) nan |= v[e] != v[e];
        if (!nan) {
            for (int j = 0; j < 8; j++) gm[j] = vp[j];
            for (int i = 1; i < 8; i++)
                for (int j = 0; j < 8; j++) gm[j] = vp[8 * i + j] > gm[j] ? vp[8 * i + j] : gm[j];
            float bound = -INFINITY; // the K-th largest group maximum
            for (int a = 0; a < 8; a++) bound = dual_place(gm, 8, a) == K - 1 ? gm[a] : bound;
            uint64_t mask = 0; // the experts at or above the bound
            for (int i = 0; i < 8; i++) {
                unsigned m8 = 0;
                for (int j = 0; j < 8; j++) m8 |= (unsigned)(vp[8 * i + j] >= bound) << j;
                mask |= (uint64_t)m8 << (8 * i);
            }
            float cv[64]; // the candidates' scores, in index order
            int ci[64], c = 0;
            for (; mask; mask &= mask - 1) {
                int e = __builtin_ctzll(mask);
                cv[c] = vp[e];
                ci[c++] = e;
            }
            for (int i = 0; i < c; i++) {
                int place = dual_place(cv, c, i);
                if (place < K) sel[place] = ci[i];
            }
            return;
        }
    }
    for (int e = 0; e < E; e++) score[e] = (double)v[e];
    route_topk(score, E, K, sel);
}

void dual_select(const float *scores, int64_t n, int E, int K, const float *bias, int mult,
                 int *sel) {
    float *v = xmalloc(sizeof(float) * (size_t)E);      // (E) one token's selection scores
    double *score = xmalloc(sizeof(double) * (size_t)E); // (E) the same widened, for route_topk
    for (int64_t t = 0; t < n; t++) {
        const float *s = scores + t * E;
        // As the model does: the score formed in fp32 (then widened exactly).
        // The reference bias (0, or 1 for mult) leaves the score s itself.
        if (!bias) memcpy(v, s, sizeof(float) * (size_t)E);
        else if (mult)
            for (int e = 0; e < E; e++) v[e] = (float)ROUTE_SCORE(s[e], bias[e], 1);
        else
            for (int e = 0; e < E; e++) v[e] = (float)ROUTE_SCORE(s[e], bias[e], 0);
        dual_topk_row(v, score, E, K, sel + t * K);
    }
    free(v);
    free(score);
}

// 1 when expert e is among the K of sel.
static int dual_has(const int *sel, int K, int e) {
    for (int j = 0; j < K; j++)
        if (sel[j] == e) return 1;
    return 0;
}

void dual_accum_token(DualAccum *a, double p, const int *sel, const int *sel0) {
    int E = a->E, K = a->K;
    for (int j = 0; j < K; j++) {
        a->counts[sel[j]]++;
        a->counts0[sel0[j]]++;
    }
    // A slot moved by the bias: in one selection and not in the other.
    if (E <= 64) {
        uint64_t in = 0, in0 = 0;
        for (int j = 0; j < K; j++) {
            in |= (uint64_t)1 << sel[j];
            in0 |= (uint64_t)1 << sel0[j];
        }
        for (uint64_t m = in & ~in0; m; m &= m - 1) a->gained[__builtin_ctzll(m)]++;
        for (uint64_t m = in0 & ~in; m; m &= m - 1) a->lost[__builtin_ctzll(m)]++;
    } else {
        for (int j = 0; j < K; j++) {
            if (!dual_has(sel0, K, sel[j])) a->gained[sel[j]]++;
            if (!dual_has(sel, K, sel0[j])) a->lost[sel0[j]]++;
        }
    }
    a->primal += p;
    a->n_tokens++;
}

void dual_accum_tokens(DualAccum *a, const float *scores, int64_t n, const int *sel, const int *sel0) {
    int E = a->E, K = a->K;
    for (int64_t t = 0; t < n; t++)
        dual_accum_token(a, dual_token_primal(scores + t * E, sel + t * K, K, a->mult), sel + t * K, sel0 + t * K);
}

void dual_accum_batch(DualAccum *a, const float *scores, int64_t n, const float *bias) {
    int *sel = xmalloc(sizeof(int) * (size_t)(2 * n * a->K)); // (2, n, K) biased, reference
    dual_select(scores, n, a->E, a->K, bias, a->mult, sel);
    dual_select(scores, n, a->E, a->K, NULL, a->mult, sel + n * a->K);
    dual_accum_tokens(a, scores, n, sel, sel + n * a->K);
    free(sel);
}

int dual_finish(const DualAccum *a, const float *bias, DualStats *st) {
    memset(st, 0, sizeof(*st));
    if (a->n_tokens <= 0) return -1;
    int E = a->E;
    int64_t kn = (int64_t)a->K * a->n_tokens; // K N = E C, exact
    st->n_tokens = a->n_tokens;
    st->capacity = (double)kn / E;
    st->primal = a->primal;
    double l1 = 0.0, l2 = 0.0, gap = 0.0;
    int64_t cmax = a->counts[0], moved = 0, from_over = 0, to_under = 0;
    for (int e = 0; e < E; e++) {
        if (a->mult && !(bias[e] > 0.0f)) return -1;
        double b = a->mult ? log((double)bias[e]) : (double)bias[e];
        // c - C = (E c - K N) / E with an exact integer numerator.
        double g = (double)((int64_t)E * a->counts[e] - kn) / E;
        gap += b * g;
        l1 += fabs(g);
        l2 += g * g;
        if (a->counts[e] > cmax) cmax = a->counts[e];
        moved += a->lost[e];
        if ((int64_t)E * a->counts0[e] > kn) from_over += a->lost[e];
        if ((int64_t)E * a->counts0[e] < kn) to_under += a->gained[e];
    }
    // D(b) = sum_t sum_{e in S_t} (s + b) - C sum_e b = primal + sum_e b (c - C).
    st->gap = gap;
    st->dual = a->primal + gap;
    st->subgrad_l1 = l1;
    st->subgrad_l2 = sqrt(l2);
    st->maxvio = (double)((int64_t)E * cmax - kn) / (double)kn;
    st->moved = moved;
    st->moved_from_over = from_over;
    st->moved_to_under = to_under;
    st->moved_frac = (double)moved / (double)kn;
    st->from_over = moved ? (double)from_over / (double)moved : NAN;
    st->to_under = moved ? (double)to_under / (double)moved : NAN;
    return 0;
}

void dual_stats_add(DualStats *sum, const DualStats *x) {
    sum->maxvio = sum->n_tokens ? fmax(sum->maxvio, x->maxvio) : x->maxvio;
    sum->n_tokens += x->n_tokens;
    sum->capacity += x->capacity;
    sum->dual += x->dual;
    sum->primal += x->primal;
    sum->gap += x->gap;
    sum->subgrad_l1 += x->subgrad_l1;
    sum->subgrad_l2 = sqrt(sum->subgrad_l2 * sum->subgrad_l2 + x->subgrad_l2 * x->subgrad_l2);
    // moved_frac = moved / (K N): the slots K N are capacity E, unknown here; weigh by tokens.
    double w = (double)x->n_tokens / (double)sum->n_tokens;
    sum->moved_frac += w * (x->moved_frac - sum->moved_frac);
    sum->moved += x->moved;
    sum->moved_from_over += x->moved_from_over;
    sum->moved_to_under += x->moved_to_under;
    sum->from_over = sum->moved ? (double)sum->moved_from_over / (double)sum->moved : NAN;
    sum->to_under = sum->moved ? (double)sum->moved_to_under / (double)sum->moved : NAN;
}
