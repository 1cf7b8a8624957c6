// Expert parallelism in the GPU MoE layer: the row moves between the token
// side (this rank's N K rows in expert order, see permute.cuh) and the expert
// side (the R rows this rank's local experts receive, expert-major). The
// orders and the bookkeeping (exp_src, the row counts) are
// parallel/ep_layout.h's, shared with the CPU model, so both trainers give
// every expert the same rows in the same order. Forward:
// xe[r] = received[exp_src[r]] (moe_rows_gather); return trip:
// back[exp_src[r]] = ye[r] (moe_rows_scatter), then the reverse all-to-all-v.
// The exchange itself is the backend's (parallel/comm_nccl.h, GpuComm).
#ifndef KERNELS_DISPATCH_CUH
#define KERNELS_DISPATCH_CUH

#include "common.cuh"

// dst row r = src row idx[r], r < R; rows of row_bytes (any size; 16-byte
// copies when rows and pointers allow).
void moe_rows_gather(void *dst, const void *src, const int *idx, int R, size_t row_bytes, cudaStream_t stream);
// dst row idx[r] = src row r, r < R (idx a permutation of [0, R)).
void moe_rows_scatter(void *dst, const void *src, const int *idx, int R, size_t row_bytes, cudaStream_t stream);

// x (n) fp32 *= s (the 1/world of the gradient average).
void scale_f32(float *x, int64_t n, float s, cudaStream_t stream);

#endif
