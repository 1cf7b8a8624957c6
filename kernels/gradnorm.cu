// Deterministic sum of squares (see gradnorm.cuh).
#include "gradnorm.cuh"

#include "vec.cuh"

// One block per chunk; each thread takes groups of VEC_F consecutive
// elements (kernels/vec.cuh), squares and sums them in double.
template <bool ALIGNED> static __global__ void gradnorm_partial_kernel(double *partials, const float *g, int64_t n) {
    __shared__ double shm[32];
    int64_t base = (int64_t)blockIdx.x * GRADNORM_CHUNK;
    double acc = 0.0;
    for (int i = threadIdx.x * VEC_F; i < GRADNORM_CHUNK && base + i < n; i += blockDim.x * VEC_F) {
        float x[VEC_F];
        vec_load<ALIGNED>(x, g + base + i, (int)min((int64_t)VEC_F, n - base - i));
        for (int k = 0; k < VEC_F; k++) acc += (double)x[k] * x[k];
    }
    acc = block_sum_d(acc, shm);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

static __global__ void gradnorm_final_kernel(double *out, const double *partials, int64_t np) {
    __shared__ double shm[32];
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < np; i += blockDim.x) acc += partials[i];
    acc = block_sum_d(acc, shm);
    if (threadIdx.x == 0) out[0] = acc;
}

void gradnorm_sumsq(double *out, double *partials, const float *g, int64_t n, cudaStream_t stream) {
    int64_t np = (int64_t)gradnorm_partials(n);
    if (np == 0) {
        CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream));
        return;
    }
    if (vec_path(true, g))
        gradnorm_partial_kernel<true><<<(unsigned int)np, GRADNORM_THREADS, 0, stream>>>(partials, g, n);
    else
        gradnorm_partial_kernel<false><<<(unsigned int)np, GRADNORM_THREADS, 0, stream>>>(partials, g, n);
    KERNEL_CHECK();
    gradnorm_final_kernel<<<1, 1024, 0, stream>>>(out, partials, np);
    KERNEL_CHECK();
}
