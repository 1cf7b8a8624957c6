// Shared by every CUDA file of the GPU trainer: the activation type floatX,
// the error-checking macros, and small device helpers (conversions, and warp
// and block reductions whose combination order is fixed, so that every result
// is the same from run to run).
//
// Precision (chosen at compile time, see docs/gpu.md):
//   default        floatX = __nv_bfloat16: activations and the matmul copy of the weights
//   -DENABLE_FP32  floatX = float: everything fp32 (the build the fixtures test tightly)
// Master weights, gradients, AdamW moments, the residual stream, the router
// affinities and the balancing biases are fp32 in both builds.
#ifndef KERNELS_COMMON_CUH
#define KERNELS_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "../util/cuda_check.h"

#ifdef ENABLE_FP32
typedef float floatX;
#define CUDA_R_FLOATX CUDA_R_32F
#define FLOATX_NAME "fp32"
#else
typedef __nv_bfloat16 floatX;
#define CUDA_R_FLOATX CUDA_R_16BF
#define FLOATX_NAME "bf16"
#endif

// Every CUDA runtime call goes through CUDA_CHECK (util/cuda_check.h), every
// cuBLAS call through CUBLAS_CHECK: a failure prints the file, line and call,
// and exits.
#define CUBLAS_CHECK(call)                                                                                  \
    do {                                                                                                    \
        cublasStatus_t cublas_st_ = (call);                                                                 \
        if (cublas_st_ != CUBLAS_STATUS_SUCCESS)                                                            \
            util_fatal(__FILE__, __LINE__, "cuBLAS error %s\n  in: %s", cublasGetStatusName(cublas_st_), #call); \
    } while (0)

// After every kernel launch. With -DGPU_DEBUG_SYNC (make GPU_DEBUG=1) it also
// waits for the kernel, so an asynchronous fault is reported at its launch.
#ifdef GPU_DEBUG_SYNC
#define KERNEL_CHECK()                                   \
    do {                                                 \
        CUDA_CHECK(cudaGetLastError());                  \
        CUDA_CHECK(cudaDeviceSynchronize());             \
    } while (0)
#else
#define KERNEL_CHECK() CUDA_CHECK(cudaGetLastError())
#endif

// Blocks needed to cover n items with `per` items per block.
inline unsigned int cdiv_u(int64_t n, int64_t per) { return (unsigned int)((n + per - 1) / per); }

// ----------------------------------------------------------------------------
// Conversions

// (Host code may use them too: the tests convert their inputs with them.)
__host__ __device__ __forceinline__ float to_f(float x) { return x; }
__host__ __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
// float -> floatX, rounding to nearest even.
__host__ __device__ __forceinline__ floatX to_x(float x) {
#ifdef ENABLE_FP32
    return x;
#else
    return __float2bfloat16_rn(x);
#endif
}

// ----------------------------------------------------------------------------
// Reductions. The xor butterfly leaves the same bits in every lane (each step
// adds the same two values, in either order), so every lane and every run
// agrees.

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to
// every thread. shm: 32 floats of shared memory; may be reused by the next call.
__device__ __forceinline__ float block_sum(float v, float *shm) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); // shm may still be read by a previous call
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    return warp_sum(lane < nwarps ? shm[lane] : 0.0f);
}

__device__ __forceinline__ double block_sum_d(double v, double *shm) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    return warp_sum_d(lane < nwarps ? shm[lane] : 0.0);
}

__device__ __forceinline__ float block_max(float v, float *shm) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    return warp_max(lane < nwarps ? shm[lane] : -INFINITY);
}

#endif
