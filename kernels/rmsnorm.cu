// RMSNorm forward/backward (see rmsnorm.cuh). One warp per row; each lane
// takes groups of VEC_X consecutive columns (kernels/vec.cuh).
#include "rmsnorm.cuh"

#include "vec.cuh"

template <bool ALIGNED>
static __global__ void rmsnorm_forward_kernel(floatX *out, float *rstd, const float *x, const float *w, int N, int d,
                                              float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *xr = x + (int64_t)row * d;
    float ss = 0.0f;
    for (int c = lane * VEC_X; c < d; c += 32 * VEC_X) {
        float xv[VEC_X];
        vec_load<ALIGNED>(xv, xr + c, d - c);
        for (int i = 0; i < VEC_X; i++) ss += xv[i] * xv[i];
    }
    ss = warp_sum(ss);
    float r = 1.0f / sqrtf(ss / d + eps);
    if (lane == 0) rstd[row] = r;
    floatX *o = out + (int64_t)row * d;
    for (int c = lane * VEC_X; c < d; c += 32 * VEC_X) {
        float xv[VEC_X], wv[VEC_X], y[VEC_X];
        vec_load<ALIGNED>(xv, xr + c, d - c); // again: the row is in L1 by now
        vec_load<ALIGNED>(wv, w + c, d - c);
        for (int i = 0; i < VEC_X; i++) y[i] = xv[i] * r * wv[i];
        vec_store<ALIGNED>(o + c, y, d - c);
    }
}

void rmsnorm_forward(floatX *out, float *rstd, const float *x, const float *w, int N, int d, float eps,
                     cudaStream_t stream) {
    const int threads = 256, rows = threads / 32;
    if (vec_path(d % VEC_X == 0, out, x, w))
        rmsnorm_forward_kernel<true><<<cdiv_u(N, rows), threads, 0, stream>>>(out, rstd, x, w, N, d, eps);
    else
        rmsnorm_forward_kernel<false><<<cdiv_u(N, rows), threads, 0, stream>>>(out, rstd, x, w, N, d, eps);
    KERNEL_CHECK();
}

// Warps per block of the backward: as many as fit their weight-gradient sums
// (d floats each) in 48 KiB of shared memory, at most 8.
static int rmsnorm_backward_warps(int d) {
    int w = RMSNORM_SMEM_FLOATS / d;
    return w > 8 ? 8 : w;
}

// Input gradient and the weight gradient's partial sums in one pass over dh
// and x. grid: one block per chunk of RMSNORM_ROWS rows; warp k of the block
// takes the chunk's rows k, k + W, k + 2W, ... (W warps); shared memory
// (W, d): each warp's sum over its rows of dh * x * rstd, every column kept by
// the lane that owns it, so no barrier is needed until the warps' sums are
// added, in warp order, into partial (nchunks, d).
template <bool ALIGNED>
static __global__ void rmsnorm_backward_kernel(float *dx, floatX *dxX, float *partial, const float *dh,
                                               const float *x, const float *w, const float *rstd, int N, int d,
                                               int accumulate) {
    extern __shared__ float dw_warp[]; // (W, d)
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, W = blockDim.x / 32;
    float *acc = dw_warp + (int64_t)warp * d;
    for (int c = lane * VEC_X; c < d; c += 32 * VEC_X)
        for (int i = 0; i < VEC_X && c + i < d; i++) acc[c + i] = 0.0f;
    int r1 = min(N, (int)blockIdx.x * RMSNORM_ROWS + RMSNORM_ROWS);
    for (int row = blockIdx.x * RMSNORM_ROWS + warp; row < r1; row += W) {
        int64_t base = (int64_t)row * d;
        float r = rstd[row], dot = 0.0f;
        for (int c = lane * VEC_X; c < d; c += 32 * VEC_X) {
            float g[VEC_X], xv[VEC_X], wv[VEC_X];
            vec_load<ALIGNED>(g, dh + base + c, d - c);
            vec_load<ALIGNED>(xv, x + base + c, d - c);
            vec_load<ALIGNED>(wv, w + c, d - c);
            for (int i = 0; i < VEC_X; i++) dot += g[i] * wv[i] * xv[i] * r;
        }
        dot = warp_sum(dot) / d;
        for (int c = lane * VEC_X; c < d; c += 32 * VEC_X) {
            float g[VEC_X], xv[VEC_X], wv[VEC_X], v[VEC_X] = {};
            vec_load<ALIGNED>(g, dh + base + c, d - c); // again: in L1 since the first loop
            vec_load<ALIGNED>(xv, x + base + c, d - c);
            vec_load<ALIGNED>(wv, w + c, d - c);
            if (accumulate) vec_load<ALIGNED>(v, dx + base + c, d - c);
            for (int i = 0; i < VEC_X; i++) {
                float gx = r * (g[i] * wv[i] - xv[i] * r * dot);
                v[i] = accumulate ? v[i] + gx : gx;
            }
            vec_store<ALIGNED>(dx + base + c, v, d - c);
            vec_store<ALIGNED>(dxX + base + c, v, d - c);
            for (int i = 0; i < VEC_X && c + i < d; i++) acc[c + i] += g[i] * xv[i] * r;
        }
    }
    __syncthreads(); // every warp's sums are complete
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < W; k++) s += dw_warp[(int64_t)k * d + c];
        partial[(int64_t)blockIdx.x * d + c] = s;
    }
}

// dw += the chunks' partial sums, in chunk order; one thread per column.
static __global__ void rmsnorm_backward_dw_kernel(float *dw, const float *partial, int nchunks, int d) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float acc = 0.0f;
    for (int k = 0; k < nchunks; k++) acc += partial[(int64_t)k * d + c];
    dw[c] += acc;
}

void rmsnorm_backward(float *dx, floatX *dxX, float *dw, float *scratch, const float *dh, const float *x,
                      const float *w, const float *rstd, int N, int d, int accumulate, cudaStream_t stream) {
    if (d > RMSNORM_SMEM_FLOATS)
        FATAL("RMSNorm backward: d_model %d is larger than %d, the most whose weight-gradient sums fit in 48 KiB of "
              "shared memory", d, (int)RMSNORM_SMEM_FLOATS);
    int nchunks = (int)cdiv_u(N, RMSNORM_ROWS), W = rmsnorm_backward_warps(d);
    size_t smem = sizeof(float) * (size_t)W * d;
    if (vec_path(d % VEC_X == 0, dx, dxX, dh, x, w))
        rmsnorm_backward_kernel<true><<<nchunks, 32 * W, smem, stream>>>(dx, dxX, scratch, dh, x, w, rstd, N, d,
                                                                          accumulate);
    else
        rmsnorm_backward_kernel<false><<<nchunks, 32 * W, smem, stream>>>(dx, dxX, scratch, dh, x, w, rstd, N, d,
                                                                           accumulate);
    KERNEL_CHECK();
    const int threads = 256;
    rmsnorm_backward_dw_kernel<<<cdiv_u(d, threads), threads, 0, stream>>>(dw, scratch, nchunks, d);
    KERNEL_CHECK();
}
