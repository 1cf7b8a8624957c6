// Precision conversions (see convert.cuh). One thread per group of VEC_X
// elements (kernels/vec.cuh); the last group may be partial.
#include "convert.cuh"

#include "vec.cuh"

template <bool ALIGNED, class D, class S> static __global__ void convert_kernel(D *dst, const S *src, int64_t n) {
    int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC_X;
    if (i >= n) return;
    int cnt = (int)min((int64_t)VEC_X, n - i);
    float v[VEC_X];
    vec_load<ALIGNED>(v, src + i, cnt);
    vec_store<ALIGNED>(dst + i, v, cnt);
}

// dst (n) = src (n) converted, through the 16-byte path when both are aligned.
template <class D, class S> static void convert_launch(D *dst, const S *src, int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    const int threads = 256;
    unsigned int blocks = cdiv_u(cdiv_u(n, VEC_X), threads);
    if (vec_path(true, dst, src))
        convert_kernel<true, D, S><<<blocks, threads, 0, stream>>>(dst, src, n);
    else
        convert_kernel<false, D, S><<<blocks, threads, 0, stream>>>(dst, src, n);
    KERNEL_CHECK();
}

void convert_f32_to_x(floatX *dst, const float *src, int64_t n, cudaStream_t stream) {
    convert_launch(dst, src, n, stream);
}

void convert_x_to_f32(float *dst, const floatX *src, int64_t n, cudaStream_t stream) {
    convert_launch(dst, src, n, stream);
}
