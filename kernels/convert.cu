// Precision conversions (see convert.cuh).
#include "convert.cuh"

static __global__ void convert_f32_to_x_kernel(floatX *dst, const float *src, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = to_x(src[i]);
}

static __global__ void convert_x_to_f32_kernel(float *dst, const floatX *src, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = to_f(src[i]);
}

void convert_f32_to_x(floatX *dst, const float *src, int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    const int threads = 256;
    convert_f32_to_x_kernel<<<cdiv_u(n, threads), threads, 0, stream>>>(dst, src, n);
    KERNEL_CHECK();
}

void convert_x_to_f32(float *dst, const floatX *src, int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    const int threads = 256;
    convert_x_to_f32_kernel<<<cdiv_u(n, threads), threads, 0, stream>>>(dst, src, n);
    KERNEL_CHECK();
}
