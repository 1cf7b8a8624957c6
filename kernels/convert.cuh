// Precision conversions: the fp32 master weights to their floatX matmul copy
// (after set_params), and floatX activations back to fp32 (last_logits, the
// tests). In the FP32 build both are plain copies.
#ifndef KERNELS_CONVERT_CUH
#define KERNELS_CONVERT_CUH

#include "common.cuh"

// dst (n) floatX = src (n) fp32, rounded to nearest even.
void convert_f32_to_x(floatX *dst, const float *src, int64_t n, cudaStream_t stream);
// dst (n) fp32 = src (n) floatX (exact).
void convert_x_to_f32(float *dst, const floatX *src, int64_t n, cudaStream_t stream);

#endif
