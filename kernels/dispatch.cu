// Row moves of expert parallelism, and the gradient scaling (see dispatch.cuh).
#include "dispatch.cuh"

// One block per row; T is the copy unit (uint4, unsigned int or unsigned char),
// n units per row. scatter = 0: dst[r] = src[idx[r]]; 1: dst[idx[r]] = src[r].
template <typename T>
static __global__ void rows_copy_kernel(T *dst, const T *src, const int *idx, int64_t n, int scatter) {
    int64_t r = blockIdx.x, from = scatter ? r : idx[r], to = scatter ? idx[r] : r;
    const T *s = src + from * n;
    T *d = dst + to * n;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) d[c] = s[c];
}

static void rows_copy(void *dst, const void *src, const int *idx, int R, size_t row_bytes, int scatter,
                      cudaStream_t stream) {
    if (R == 0 || row_bytes == 0) return;
    uintptr_t a = (uintptr_t)dst | (uintptr_t)src | (uintptr_t)row_bytes;
    if (a % 16 == 0) {
        rows_copy_kernel<uint4><<<R, 128, 0, stream>>>((uint4 *)dst, (const uint4 *)src, idx,
                                                       (int64_t)(row_bytes / 16), scatter);
    } else if (a % 4 == 0) {
        rows_copy_kernel<unsigned int><<<R, 256, 0, stream>>>((unsigned int *)dst, (const unsigned int *)src, idx,
                                                              (int64_t)(row_bytes / 4), scatter);
    } else {
        rows_copy_kernel<unsigned char><<<R, 256, 0, stream>>>((unsigned char *)dst, (const unsigned char *)src, idx,
                                                               (int64_t)row_bytes, scatter);
    }
    KERNEL_CHECK();
}

void moe_rows_gather(void *dst, const void *src, const int *idx, int R, size_t row_bytes, cudaStream_t stream) {
    rows_copy(dst, src, idx, R, row_bytes, 0, stream);
}

void moe_rows_scatter(void *dst, const void *src, const int *idx, int R, size_t row_bytes, cudaStream_t stream) {
    rows_copy(dst, src, idx, R, row_bytes, 1, stream);
}

static __global__ void scale_f32_kernel(float *x, int64_t n, float s) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

void scale_f32(float *x, int64_t n, float s, cudaStream_t stream) {
    if (n == 0 || s == 1.0f) return;
    const int threads = 256;
    scale_f32_kernel<<<cdiv_u(n, threads), threads, 0, stream>>>(x, n, s);
    KERNEL_CHECK();
}
