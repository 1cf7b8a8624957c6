// The DeepSeekMoE feed-forward layer on the CPU: router, TopK selection with
// the balancing bias, shared experts, routed experts run per expert on their
// gathered tokens, the gated combine, the auxiliary losses, and the backward of
// all of it. See docs/model.md for the exact definition.
#ifndef MOE_MOE_H
#define MOE_MOE_H

#include <stdint.h>

#include "config.h"
#include "real.h"

enum { AUX_NONE = 0, AUX_EXPERT = 1, AUX_SEQ = 2 };

// How routing and the auxiliary losses behave; set by the balancing policy.
typedef struct {
    int bias_mult;   // 1: select on s * b (multiplicative rule), 0: on s + b
    int aux_kind;    // AUX_NONE, AUX_EXPERT (DeepSeekMoE) or AUX_SEQ (DeepSeek-V3)
    float aux_alpha; // weight of the auxiliary loss
} RouteOptions;

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

// Expert parallelism: the routed experts are split over the P ranks of an
// expert-parallel group; rank r holds experts [r E/P, (r+1) E/P). Tokens reach
// the rank of their expert by an all-to-all-v and come back by another. With
// size 1 (the default) every expert is local and no exchange happens.
typedef struct {
    int size, rank; // P and this rank's index in the group
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
// local expert 0's rows from rank 0, from rank 1, ..., then local expert 1's.
typedef struct {
    real *s;       // (N, E) affinities
    int *sel;      // (N, K) selected experts, by decreasing score
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
    int R, R_cap;               // rows on the expert side; capacity of the buffers below
    real *xe;      // (R, d) expert inputs, expert-major
    real *e13;     // (R, 2 de) expert pre-activations [g | u]
    real *eact;    // (R, de) silu(g) * u
} MoeActs;

// Allocates / frees the activations for up to N tokens (and any EP group).
void moe_acts_alloc(MoeActs *a, const MoeConfig *c, int N);
void moe_acts_free(MoeActs *a);

// out (N, d) = the MoE layer applied to h (N, d), N = B*T. bias (E) fp32.
// counts (E) receives the number of this rank's tokens routed to each expert.
// ex: the expert-parallel group (NULL: all experts local).
void moe_forward(const MoeConfig *c, const RouteOptions *ro, const MoeExchange *ex, const MoeWeights *w,
                 const float *bias, const real *h, int B, int T, MoeActs *a, real *out, int64_t *counts);

// Backward for the last forward: dout (N, d) the output gradient; dh (N, d)
// += the input gradient; g += the parameter gradients (of the local experts
// only, under expert parallelism). grad_scale multiplies the auxiliary loss's
// own gradient, as the caller's loss scaling does for dout.
void moe_backward(const MoeConfig *c, const RouteOptions *ro, const MoeExchange *ex, const MoeWeights *w,
                  const real *h, const real *dout, int B, int T, MoeActs *a, real *dh, MoeGrads *g,
                  real grad_scale);

#endif
