// Expert parallelism in the GPU MoE layer: the bookkeeping and row moves
// between the token side (this rank's N K rows in expert order, see
// permute.cuh) and the expert side (the R rows this rank's El = E / P local
// experts receive from the P ranks of its EP group), exactly as model/moe.c's
// moe_dispatch / moe_return / moe_send do on the CPU, so both trainers give
// every expert the same rows in the same order:
//
//   token side, rank q:  rows of expert 0, 1, ..., E-1 (by token); the rows
//                        of experts [p El, (p+1) El) are contiguous and go to rank p
//   received, rank p:    [source rank q][local expert j][token]   (what the all-to-all-v delivers)
//   expert-major:        [local expert j][source rank q][token]   (what the grouped GEMMs want)
//
// exp_src[r] is the received-order index of expert-major row r. Forward:
// xe[r] = received[exp_src[r]] (moe_rows_gather); return trip:
// back[exp_src[r]] = ye[r] (moe_rows_scatter), then the reverse all-to-all-v.
// The exchange itself is the backend's (parallel/comm_nccl.h, GpuComm).
#ifndef KERNELS_DISPATCH_CUH
#define KERNELS_DISPATCH_CUH

#include "common.cuh"

// Host. offsets (E + 1 = P El + 1): this rank's token-side first row of each
// expert; recv_cnt (P, El): rows rank q sends for local expert j. Fills
// send_rows (P) and recv_rows (P); returns R, the rows received.
inline int moe_ep_rows(int P, int El, const int *offsets, const int *recv_cnt, int *send_rows, int *recv_rows) {
    int R = 0;
    for (int p = 0; p < P; p++) {
        send_rows[p] = offsets[(p + 1) * El] - offsets[p * El];
        recv_rows[p] = 0;
        for (int j = 0; j < El; j++) recv_rows[p] += recv_cnt[p * El + j];
        R += recv_rows[p];
    }
    return R;
}

// Host. The expert-major order: exp_off (El + 1) first row of each local
// expert, exp_src (R) as above (model/moe.c's loop, verbatim in meaning).
inline void moe_ep_order(int P, int El, const int *recv_cnt, const int *recv_rows, int *exp_off, int *exp_src) {
    int row = 0;
    for (int j = 0; j < El; j++) {
        exp_off[j] = row;
        for (int q = 0, base = 0; q < P; base += recv_rows[q], q++) {
            int start = base;
            for (int jj = 0; jj < j; jj++) start += recv_cnt[q * El + jj];
            for (int r = 0; r < recv_cnt[q * El + j]; r++) exp_src[row++] = start + r;
        }
    }
    exp_off[El] = row;
}

// dst row r = src row idx[r], r < R; rows of row_bytes (any size; 16-byte
// copies when rows and pointers allow).
void moe_rows_gather(void *dst, const void *src, const int *idx, int R, size_t row_bytes, cudaStream_t stream);
// dst row idx[r] = src row r, r < R (idx a permutation of [0, R)).
void moe_rows_scatter(void *dst, const void *src, const int *idx, int R, size_t row_bytes, cudaStream_t stream);

// x (n) fp32 *= s (the 1/world of the gradient average).
void scale_f32(float *x, int64_t n, float s, cudaStream_t stream);

#endif
