// Global L2 norm of the fp32 gradient, deterministic: fixed chunks of
// GRADNORM_CHUNK elements, each summed in double by one block with a fixed
// reduction tree, then the chunk sums added by one block in a fixed order.
// The result is the same bits on every run (it may differ from the CPU's
// grad_sumsq in the last bits: a different, equally fixed, order).
#ifndef KERNELS_GRADNORM_CUH
#define KERNELS_GRADNORM_CUH

#include "common.cuh"

enum { GRADNORM_THREADS = 256, GRADNORM_CHUNK = GRADNORM_THREADS * 64 };

// Doubles of scratch gradnorm_sumsq needs for n elements.
inline size_t gradnorm_partials(int64_t n) { return cdiv_u(n, GRADNORM_CHUNK); }

// out (1) double on the device = sum of g[i]^2 over g (n) fp32.
// partials: gradnorm_partials(n) doubles of scratch.
void gradnorm_sumsq(double *out, double *partials, const float *g, int64_t n, cudaStream_t stream);

#endif
