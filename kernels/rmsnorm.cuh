// RMSNorm forward and backward (docs/model.md: rmsnorm(x) = x / sqrt(mean(x^2)
// + eps), times the weight). The input x is the fp32 residual stream; the
// output feeds a matmul, so it is floatX. The backward adds into the fp32
// residual gradient and writes a floatX copy of the result, which is what the
// next matmuls of the backward read: the add to the residual and the cast are
// fused into the norm's backward.
//
// Weight gradient: in the same pass over dh and x as the input gradient, per
// chunk of RMSNORM_ROWS rows a partial sum (each warp of the chunk's block
// sums its rows in order, then the warps' sums are added in warp order), then
// the chunks summed in chunk order; deterministic, no atomics.
#ifndef KERNELS_RMSNORM_CUH
#define KERNELS_RMSNORM_CUH

#include "common.cuh"

enum {
    RMSNORM_ROWS = 64,                      // rows per partial sum of the weight gradient
    RMSNORM_SMEM_FLOATS = 48 * 1024 / 4,    // shared memory of the backward: the largest d it takes
};

// Floats of scratch rmsnorm_backward needs for N rows of width d.
inline size_t rmsnorm_scratch_floats(int N, int d) { return (size_t)cdiv_u(N, RMSNORM_ROWS) * d; }

// out (N, d) floatX = x (N, d) fp32 * rstd * w (d) fp32; rstd (N) fp32 = 1 / sqrt(mean(x^2) + eps).
void rmsnorm_forward(floatX *out, float *rstd, const float *x, const float *w, int N, int d, float eps,
                     cudaStream_t stream);

// With n = x * rstd and dn = dh * w: dx (N, d) fp32 (+)= rstd * (dn - n * mean(dn * n))
// (accumulate = 0 overwrites), dxX (N, d) floatX = the new dx, dw (d) fp32 +=
// sum over rows of dh * n. dh (N, d) fp32 is the gradient of the norm's output.
// scratch: rmsnorm_scratch_floats(N, d) floats. d <= RMSNORM_SMEM_FLOATS.
void rmsnorm_backward(float *dx, floatX *dxX, float *dw, float *scratch, const float *dh, const float *x,
                      const float *w, const float *rstd, int N, int d, int accumulate, cudaStream_t stream);

#endif
