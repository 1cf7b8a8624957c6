// The primal-dual view of one MoE layer's routing (Han & Zhong, arXiv
// 2512.03915; docs/balance.md "The primal-dual view"): for one batch of N tokens,
// E experts, top-K and scores s (N, E) (the affinities the bias is added to),
// the assignment problem
//
//   maximise sum_{t,e} s[t,e] x[t,e]  s.t.  sum_e x[t,e] = K,  sum_t x[t,e] = C,  0 <= x <= 1,
//
// C = K N / E, has the dual function (b = the routing bias, minus the capacity
// multipliers)
//
//   D(b) = sum_t (sum of the K largest s[t,e] + b[e] over e) - C sum_e b[e],
//
// which the TopK of s + b attains, with subgradient c(b) - C (the token counts
// minus the capacity). This module computes D(b), the primal score of the chosen
// assignment, their gap, the subgradient norms and how many token slots the bias
// moved, selecting exactly as the model does (model/route.h).
//
// It is built to be summed: a DualAccum holds only per-token sums and per-expert
// integer counts, so a trainer adds one per micro-batch and reduces them over
// ranks (dual_accum_add), and a GPU routing kernel can produce the same sums per
// token (which ones: docs/balance.md). dual_finish turns the sums into the
// statistics once the whole batch is in.
//
// The multiplicative rule (selection on s * b) is the same problem with the
// scores log s and the bias log b (TopK of s b = TopK of log s + log b for s, b
// > 0); with mult set, D, the primal and the gap are those of that problem.
#ifndef MOE_DUAL_H
#define MOE_DUAL_H

#include <float.h>
#include <math.h>
#include <stdint.h>

// The score of the log-space problem of the multiplicative rule: log s in fp32,
// with s below FLT_MIN taken as FLT_MIN (an affinity that underflowed to 0 would
// otherwise give -inf).
static inline float dual_log_score(float s) { return logf(s > FLT_MIN ? s : FLT_MIN); }

// The per-batch sums of one MoE layer. All fields add up over micro-batches and
// ranks (dual_accum_add).
typedef struct {
    int E, K;
    int mult;          // 1: selection on s * b, quantities in log space
    int64_t n_tokens;  // tokens added
    double primal;     // sum over tokens of the unbiased scores of its selected experts
                       // (log s for mult); the per-token part of D
    int64_t *counts;   // (E) tokens whose selection under the bias holds expert e
    int64_t *counts0;  // (E) the same under the reference bias (0; 1 for mult)
    int64_t *lost;     // (E) token slots expert e has under the reference and not under the bias
    int64_t *gained;   // (E) token slots expert e has under the bias and not under the reference
} DualAccum;

// Returns 0, or -1 when E < 1 or K is outside 1..E.
int dual_accum_init(DualAccum *a, int E, int K, int mult);
void dual_accum_reset(DualAccum *a);
void dual_accum_free(DualAccum *a);
// dst += src (same E, K, mult; else -1 and dst unchanged).
int dual_accum_add(DualAccum *dst, const DualAccum *src);

// sel (n, K): each token's K experts by the model's rule: score ROUTE_SCORE(s, b)
// formed in fp32 and widened, route_topk, ties to the lower index. bias (E), or
// NULL for the reference (0; 1 for mult, i.e. the affinities alone).
void dual_select(const float *scores /* (n, E) */, int64_t n, int E, int K,
                 const float *bias /* (E) or NULL */, int mult, int *sel /* (n, K) */);

// Adds n tokens given both selections: sel under the bias, sel0 under the
// reference (from dual_select). For mult every score must be > 0.
void dual_accum_tokens(DualAccum *a, const float *scores /* (n, E) */, int64_t n,
                       const int *sel /* (n, K) */, const int *sel0 /* (n, K) */);

// One token's part, for a caller that routes by itself (the trainers' models):
// p = dual_token_primal of the token, its selection sel (K) under the bias and
// sel0 (K) under the reference. dual_accum_tokens is this, token by token, so a
// model that adds its tokens in order gets the same sums bit for bit.
void dual_accum_token(DualAccum *a, double p, const int *sel /* (K) */, const int *sel0 /* (K) */);

// A token's primal part: the sum, in selection order and in double, of the
// unbiased scores of its K selected experts (log s for mult).
static inline double dual_token_primal(const float *s /* (E) */, const int *sel /* (K) */, int K, int mult) {
    double p = 0.0;
    for (int j = 0; j < K; j++) p += mult ? (double)dual_log_score(s[sel[j]]) : (double)s[sel[j]];
    return p;
}

// Selects under bias and under the reference, then dual_accum_tokens.
void dual_accum_batch(DualAccum *a, const float *scores /* (n, E) */, int64_t n,
                      const float *bias /* (E) */);

typedef struct {
    int64_t n_tokens;   // N
    double capacity;    // C = K N / E
    double dual;        // D(b) (log space for mult)
    double primal;      // sum of the unbiased scores of the selected slots
    double gap;         // dual - primal = sum_e b[e] (c[e] - C) (log b for mult)
    double subgrad_l1;  // sum_e |c[e] - C|
    double subgrad_l2;  // sqrt(sum_e (c[e] - C)^2)
    double maxvio;      // (max_e c[e] - C) / C
    int64_t moved;      // token slots the bias moved: sum_e lost[e] = sum_e gained[e]
    double moved_frac;  // moved / (K N)
    int64_t moved_from_over; // of them, taken from an expert overloaded at the reference (c0[e] > C)
    int64_t moved_to_under;  // given to an expert underloaded at the reference (c0[e] < C)
    double from_over;   // moved_from_over / moved; NaN when nothing moved
    double to_under;    // moved_to_under / moved; NaN when nothing moved
} DualStats;

// The statistics of the accumulated batch under bias (E), the bias that routed
// it. Returns 0, or -1 when nothing was added or (mult) a bias is not > 0.
int dual_finish(const DualAccum *a, const float *bias /* (E) */, DualStats *st);

// sum += x, for batches routed under different biases (a bias update between
// them, e.g. after every micro-batch): tokens, capacity, D, the primal, the
// gap, the L1 norms and the moved slots add; the L2 norms add in squares
// (the norm of all the batches' subgradients side by side); maxvio keeps the
// larger; the moved shares are recomputed. A zeroed sum is the start.
void dual_stats_add(DualStats *sum, const DualStats *x);

#endif
