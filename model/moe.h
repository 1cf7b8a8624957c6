// The DeepSeekMoE feed-forward layer on the CPU: router, TopK selection with
// the balancing bias, shared experts, routed experts run per expert on their
// gathered tokens, the gated combine, the auxiliary losses, and the backward of
// all of it. See docs/model.md for the exact definition.
#ifndef MOE_MOE_H
#define MOE_MOE_H

#include <stdint.h>

#include "../parallel/ep_layout.h"
#include "config.h"
#include "dual.h"
#include "real.h"
#include "route.h"

typedef struct {
    const real *router; // (E, d)
    const real *sh13;   // (2 S de, d), NULL when S = 0
    const real *sh2;    // (d, S de)
    const real *ex13;   // (E, 2 de, d)
    const real *ex2;    // (E, d, de)
} MoeWeights;

typedef struct {
    real *router, *sh13, *sh2, *ex13, *ex2; // gradients, same shapes as MoeWeights
} MoeGrads;

// Expert parallelism (parallel/ep_layout.h): the routed experts are split
// over the P ranks of an expert-parallel group. Tokens reach the rank of their
// expert by an all-to-all-v and come back by another. Without an exchange
// (NULL) every expert is local and no rows move.
typedef struct {
    EpShard shard;  // the group's size, this rank's position, experts per rank
    void *ctx;      // the communicator behind the two exchanges
    // recv (P n) = all-to-all of send (P n): block p of n ints goes to rank p.
    void (*alltoall_int)(void *ctx, const int *send, int *recv, int n);
    // All-to-all-v of rows of `width` reals: send holds send_rows[p] rows for
    // each rank p in order; recv receives recv_rows[q] rows from each rank q.
    void (*alltoallv)(void *ctx, const real *send, const int *send_rows, real *recv, const int *recv_rows,
                      int width);
} MoeExchange;

// Activations of one MoE layer for N = B*T tokens, kept for the backward.
// "Slot" t*K + j is token t's j-th selected expert; "row" is its position in
// expert order (all of expert 0's slots, then expert 1's, ... by token).
// Rows sent to the experts of each EP rank are contiguous in this order. On
// the expert side, the R rows received from all ranks are kept "expert-major":
// local expert 0's rows from rank 0, from rank 1, ..., then local expert 1's
// (parallel/ep_layout.h).
typedef struct {
    real *s;       // (N, E) affinities
    real *z;       // (N, E) router logits, kept when the bias is added to them (RouteParams.bias_logits)
    int *sel;      // (N, K) selected experts, by decreasing score
    int *sel0;     // (N, K) the selection without the bias (for the primal-dual sums)
    double *primal_tok; // (N) each token's primal part (model/dual.h dual_token_primal)
    real *gates;   // (N, K) gate values
    int *offsets;  // (E + 1) first row of each expert
    int *slot_of;  // (N K) slot of each row
    int *row_of;   // (N K) row of each slot
    real *eout;    // (N K, d) expert outputs before gating, by row
    real *s13;     // (N, 2 S de) shared experts' pre-activations
    real *sact;    // (N, S de)
    double aux;    // this layer's auxiliary loss (0 when none)
    // the expert side (R rows)
    int *send_rows, *recv_rows; // (P) rows to / from each EP rank
    int *recv_cnt;              // (P, E/P) rows from rank q for local expert j
    int *exp_offsets;           // (E/P + 1) first expert-major row of each local expert
    int *exp_src;               // (R) received-order index of each expert-major row
    int R;                      // rows on the expert side
    int rows_cap;               // rows the expert-side buffers below can hold
    real *xe;      // (R, d) expert inputs, expert-major
    real *e13;     // (R, 2 de) expert pre-activations [g | u]
    real *eact;    // (R, de) silu(g) * u
} MoeActs;

// Allocates / frees the activations for up to N tokens (and any EP group).
void moe_acts_alloc(MoeActs *a, const MoeConfig *c, int N);
void moe_acts_free(MoeActs *a);

// out (N, d) = the MoE layer applied to h (N, d), N = B*T. bias (E) fp32.
// counts (E) receives the number of this rank's tokens routed to each expert.
// dual, when not NULL, gets this rank's tokens added (model/dual.h: the
// primal-dual sums of the routing, in token order). ex: the expert-parallel
// group (NULL: all experts local). Reading order: route (affinities, TopK,
// gates), permute into expert order, dispatch to the experts' ranks,
// expert_ffn_forward per local expert, return, shared experts, gated combine,
// auxiliary loss.
void moe_forward(const MoeConfig *c, const RouteOptions *ro, const MoeExchange *ex, const MoeWeights *w,
                 const float *bias, const real *h, int B, int T, MoeActs *a, real *out, int64_t *counts,
                 DualAccum *dual);

// The scores the bias was added to in the last forward (the logits with
// bias_logits, else the affinities), (N, E) as fp32: what a router-score trace
// records (train/trace.h).
void moe_bias_scores(const MoeActs *a, const RouteOptions *ro, int N, int E, float *out);

// Backward for the last forward: dout (N, d) the output gradient; dh (N, d)
// += the input gradient; dw += the parameter gradients (of the local experts
// only, under expert parallelism). grad_scale multiplies the auxiliary loss's
// own gradient, as the caller's loss scaling does for dout.
void moe_backward(const MoeConfig *c, const RouteOptions *ro, const MoeExchange *ex, const MoeWeights *w,
                  const real *h, const real *dout, int B, int T, MoeActs *a, real *dh, MoeGrads *dw,
                  real grad_scale);

#endif
