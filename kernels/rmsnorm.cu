// RMSNorm forward/backward (see rmsnorm.cuh). One warp per row.
#include "rmsnorm.cuh"

static __global__ void rmsnorm_forward_kernel(floatX *out, float *rstd, const float *x, const float *w, int N, int d,
                                              float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const float *xr = x + (int64_t)row * d;
    float ss = 0.0f;
    for (int c = lane; c < d; c += 32) ss += xr[c] * xr[c];
    ss = warp_sum(ss);
    float r = 1.0f / sqrtf(ss / d + eps);
    if (lane == 0) rstd[row] = r;
    floatX *o = out + (int64_t)row * d;
    for (int c = lane; c < d; c += 32) o[c] = to_x(xr[c] * r * w[c]);
}

void rmsnorm_forward(floatX *out, float *rstd, const float *x, const float *w, int N, int d, float eps,
                     cudaStream_t stream) {
    const int threads = 256, rows = threads / 32;
    rmsnorm_forward_kernel<<<cdiv_u(N, rows), threads, 0, stream>>>(out, rstd, x, w, N, d, eps);
    KERNEL_CHECK();
}

// Input gradient, one warp per row.
static __global__ void rmsnorm_backward_dx_kernel(float *dx, floatX *dxX, const float *dh, const float *x,
                                                  const float *w, const float *rstd, int N, int d, int accumulate) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    int64_t base = (int64_t)row * d;
    float r = rstd[row], dot = 0.0f;
    for (int c = lane; c < d; c += 32) dot += dh[base + c] * w[c] * x[base + c] * r;
    dot = warp_sum(dot) / d;
    for (int c = lane; c < d; c += 32) {
        float g = r * (dh[base + c] * w[c] - x[base + c] * r * dot);
        float v = accumulate ? dx[base + c] + g : g;
        dx[base + c] = v;
        dxX[base + c] = to_x(v);
    }
}

// Weight gradient, stage 1: grid (ceil(d / blockDim), chunks); each thread
// sums one column over the RMSNORM_ROWS rows of its chunk, in row order.
static __global__ void rmsnorm_backward_dw_partial_kernel(float *partial, const float *dh, const float *x,
                                                          const float *rstd, int N, int d) {
    int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (c >= d) return;
    int r0 = chunk * RMSNORM_ROWS, r1 = min(N, r0 + RMSNORM_ROWS);
    float acc = 0.0f;
    for (int t = r0; t < r1; t++) acc += dh[(int64_t)t * d + c] * x[(int64_t)t * d + c] * rstd[t];
    partial[(int64_t)chunk * d + c] = acc;
}

// Stage 2: each thread adds its column's chunk sums, in chunk order.
static __global__ void rmsnorm_backward_dw_final_kernel(float *dw, const float *partial, int nchunks, int d) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float acc = 0.0f;
    for (int k = 0; k < nchunks; k++) acc += partial[(int64_t)k * d + c];
    dw[c] += acc;
}

void rmsnorm_backward(float *dx, floatX *dxX, float *dw, float *scratch, const float *dh, const float *x,
                      const float *w, const float *rstd, int N, int d, int accumulate, cudaStream_t stream) {
    const int threads = 256, rows = threads / 32;
    rmsnorm_backward_dx_kernel<<<cdiv_u(N, rows), threads, 0, stream>>>(dx, dxX, dh, x, w, rstd, N, d, accumulate);
    KERNEL_CHECK();
    int nchunks = (int)cdiv_u(N, RMSNORM_ROWS);
    dim3 grid(cdiv_u(d, threads), nchunks);
    rmsnorm_backward_dw_partial_kernel<<<grid, threads, 0, stream>>>(scratch, dh, x, rstd, N, d);
    KERNEL_CHECK();
    rmsnorm_backward_dw_final_kernel<<<cdiv_u(d, threads), threads, 0, stream>>>(dw, scratch, nchunks, d);
    KERNEL_CHECK();
}
