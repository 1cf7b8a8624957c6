// The step's statistics, accumulated on the device so that a micro-batch
// needs no host wait: per MoE layer and expert the routed tokens (exact
// int64), the sum of the micro-batches' mean losses and auxiliary losses
// (fp64), and a flag for a routing whose permutation lost slots. The host
// reads them once per step (train_moe.cu, gpu_step_stats) and zeroes them.
#ifndef KERNELS_STATS_CUH
#define KERNELS_STATS_CUH

#include "common.cuh"

// The accumulators, one device allocation each (zeroed by the caller).
typedef struct {
    int64_t *counts; // (n_moe, E) tokens routed to each expert, summed over micro-batches
    double *sums;    // (2) [0]: sum of mean losses / loss_div; [1]: sum of aux losses / loss_div
    int *bad;        // (1) 0, or 1 + the first MoE layer whose offsets do not end at N K
} StepStats;

// After one micro-batch's forward: counts (n_moe, E) += the row counts of
// offsets (n_moe, E + 1) (each layer's expert offsets, in one buffer);
// sums[0] += (the mean of losses (N) fp64) / loss_div when losses is not
// NULL; sums[1] += (the sum of aux (n_moe)) / loss_div. One block of fixed
// size sums the losses in a fixed order: the same bits on every run.
void stats_accumulate(StepStats st, const int *offsets, int n_moe, int E, int NK, const double *losses, int N,
                      const double *aux, double loss_div, cudaStream_t stream);

#endif
