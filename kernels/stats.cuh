// The step's statistics, accumulated on the device so that a micro-batch
// needs no host wait: per MoE layer and expert the routed tokens (exact
// int64), the sum of the micro-batches' mean losses and auxiliary losses
// (fp64), the routing's primal-dual parts (model/dual.h: per expert the
// counts under the reference bias, the slots lost and gained, int64; per
// layer the sum of the tokens' primal parts, fp64), and a flag for a routing
// whose permutation lost slots. The host reads them once per step
// (train_moe.cu, gpu_step_stats) and zeroes them.
#ifndef KERNELS_STATS_CUH
#define KERNELS_STATS_CUH

#include "common.cuh"

// The accumulators, one device allocation each (zeroed by the caller).
typedef struct {
    int64_t *counts; // (n_moe, E) tokens routed to each expert, summed over micro-batches
    int64_t *dual;   // (n_moe, 3, E) counts0, lost, gained (kernels/routing.cuh RouteDualOut), summed
    double *sums;    // (2) [0]: sum of mean losses / loss_div; [1]: sum of aux losses / loss_div
    double *primal;  // (n_moe) the tokens' primal parts, summed
    int *bad;        // (1) 0, or 1 + the first MoE layer whose offsets do not end at N K
} StepStats;

// After one micro-batch's forward: counts (n_moe, E) += the row counts of
// offsets (n_moe, E + 1) (each layer's expert offsets, in one buffer);
// dual += dual_cnt (n_moe, 3, E); primal[m] += the sum of primal_tok (n_moe,
// tok_stride) over the first N tokens of row m; sums[0] += (the mean of
// losses (N) fp64) / loss_div when losses is not NULL; sums[1] += (the sum of
// aux (n_moe)) / loss_div. One block of fixed size sums in a fixed order:
// the same bits on every run.
void stats_accumulate(StepStats st, const int *offsets, const int *dual_cnt, const double *primal_tok, int tok_stride,
                      int n_moe, int E, int NK, const double *losses, int N, const double *aux, double loss_div,
                      cudaStream_t stream);

#endif
