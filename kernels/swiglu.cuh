// SwiGLU activation (docs/model.md): h13 (n, 2m) holds [g | u] per row,
// act = silu(g) * u. Used by the dense FFN, the shared experts and the routed
// experts (on their expert-ordered rows). Math in fp32, storage floatX.
#ifndef KERNELS_SWIGLU_CUH
#define KERNELS_SWIGLU_CUH

#include "common.cuh"

// act (n, m) = silu(h13[:, :m]) * h13[:, m:].
void swiglu_forward(floatX *act, const floatX *h13, int64_t n, int m, cudaStream_t stream);
// d13 (n, 2m) = gradient of [g | u] given dact (n, m) (overwritten).
void swiglu_backward(floatX *d13, const floatX *dact, const floatX *h13, int64_t n, int m, cudaStream_t stream);

#endif
