// MoE routing on the GPU (docs/model.md, "MoE layer"), forward and backward.
//
// Forward, one fused kernel per token (one warp each) after the router GEMM:
// affinities s = sigmoid or softmax of the fp32 router logits, selection
// scores s + b (s * b for the multiplicative rule) in fp32, TopK with ties to
// the lower expert index listed by decreasing score (exactly model/route.h's
// route_topk: K rounds of a warp arg-max whose order is (score desc, index
// asc)), the gate values from the unbiased s (normalised over the selected
// ones when norm_topk, times route_scale, summed in selection order like the
// CPU), the per-expert token counts (integer atomicAdd: exact), and the row
// sum z = sum_e s in double that the sequence-wise auxiliary loss needs. With
// the bias on the logits (rp->bias_logits) the selection score is logit + b,
// formed before the gate overwrites the logits. On request the same warp also
// selects without the bias and writes the token's primal-dual parts
// (RouteDualOut): per-expert integer counts by atomicAdd (exact in any
// order) and one double per token, which the host sums in token order, as
// model/moe.c does, so the metrics do not depend on the schedule.
//
// Auxiliary losses (AUX_EXPERT, AUX_SEQ of model/moe.c): per group (the whole
// batch, or each sequence) f_e = tokens choosing e (exact integers) and
// P_e = sum_t s'[t, e] in double, then the loss, all in double and in a fixed
// order.
//
// Backward, one warp per token: gate values -> affinities (the norm_topk
// quotient rule), plus the auxiliary loss's gradient through P, then
// affinities -> router logits (sigmoid or softmax backward). Output floatX for
// the two router GEMMs of the backward.
#ifndef KERNELS_ROUTING_CUH
#define KERNELS_ROUTING_CUH

#include "common.cuh"

extern "C" {
#include "../model/config.h"
#include "../model/route.h"
}

// What the routing kernel also writes for the primal-dual metrics and the
// router-score traces (model/dual.h, docs/balance.md "In the trainers"); any
// pointer may be NULL. u below is the score the bias is added to: the router
// logit with rp->bias_logits, else the affinity.
typedef struct {
    double *primal; // (N) each token's primal part: sum over its selected experts of u
                    // (log u for the multiplicative rule), in selection order, in double
    int *cnt;       // (3, E) += counts0 (the selection on u alone), lost and gained
                    // slots (model/dual.h's DualAccum); zeroed by the caller
    float *kept;    // (N, E) u, for a trace
} RouteDualOut;

// s (N, E) fp32: router logits in, affinities out. zsum (N) double = row sums
// of s. sel (N, K) int and gates (N, K) fp32 as in model/moe.c. counts (E) int
// += tokens per expert (the caller zeroes it). bias (E) fp32. rp: the layer's
// routing (model/route.h). dual: NULL, or what it asks for.
void moe_route(float *s, double *zsum, int *sel, float *gates, int *counts, const float *bias, int N,
               const RouteParams *rp, const RouteDualOut *dual, cudaStream_t stream);

// Auxiliary loss of one layer (groups: route_aux_groups): aux (1) double on the
// device = aux_alpha * the mean over groups of sum_e (E / (K len) f_e)
// (P_e / len). f (groups, E) int is kept for the backward. scratch:
// moe_aux_scratch_doubles(B, T, E) doubles (partial sums over slices of
// AUX_SLICE tokens). For AUX_NONE aux is set to 0.
enum { AUX_SLICE = 256 };
size_t moe_aux_scratch_doubles(int B, int T, int E);
void moe_aux_forward(double *aux, int *f, double *scratch, const float *s, const double *zsum, const int *sel, int B,
                     int T, const RouteParams *rp, cudaStream_t stream);

// dlogits (N, E) floatX = gradient of the router logits, from dgates (N, K)
// fp32 (the gradient of the gate values) and, when rp->aux_kind != AUX_NONE,
// the auxiliary loss times grad_scale (f from moe_aux_forward). s, zsum, sel
// as the forward left them.
void moe_route_backward(floatX *dlogits, const float *s, const double *zsum, const int *sel, const float *dgates,
                        const int *f, int B, int T, const RouteParams *rp, float grad_scale, cudaStream_t stream);

#endif
