// SwiGLU (see swiglu.cuh). One thread per group of VEC_X hidden units of one
// row (kernels/vec.cuh): the g and u halves of h13 and the output are each
// one 16-byte access per group when the rows are aligned.
#include "swiglu.cuh"

#include "vec.cuh"

template <bool ALIGNED>
static __global__ void swiglu_forward_kernel(floatX *act, const floatX *h13, int64_t n, int m) {
    int groups = (m + VEC_X - 1) / VEC_X; // per row
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * groups) return;
    int64_t t = idx / groups;
    int i = (int)(idx % groups) * VEC_X, cnt = m - i;
    float g[VEC_X], u[VEC_X], a[VEC_X];
    vec_load<ALIGNED>(g, h13 + t * 2 * m + i, cnt);
    vec_load<ALIGNED>(u, h13 + t * 2 * m + m + i, cnt);
    for (int k = 0; k < VEC_X; k++) a[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
    vec_store<ALIGNED>(act + t * m + i, a, cnt);
}

template <bool ALIGNED>
static __global__ void swiglu_backward_kernel(floatX *d13, const floatX *dact, const floatX *h13, int64_t n, int m) {
    int groups = (m + VEC_X - 1) / VEC_X;
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * groups) return;
    int64_t t = idx / groups;
    int i = (int)(idx % groups) * VEC_X, cnt = m - i;
    float g[VEC_X], u[VEC_X], da[VEC_X], dg[VEC_X], du[VEC_X];
    vec_load<ALIGNED>(g, h13 + t * 2 * m + i, cnt);
    vec_load<ALIGNED>(u, h13 + t * 2 * m + m + i, cnt);
    vec_load<ALIGNED>(da, dact + t * m + i, cnt);
    for (int k = 0; k < VEC_X; k++) {
        float sig = 1.0f / (1.0f + expf(-g[k]));
        float silu = g[k] * sig;
        du[k] = da[k] * silu;
        dg[k] = da[k] * u[k] * sig * (1.0f + g[k] * (1.0f - sig));
    }
    vec_store<ALIGNED>(d13 + t * 2 * m + m + i, du, cnt);
    vec_store<ALIGNED>(d13 + t * 2 * m + i, dg, cnt);
}

void swiglu_forward(floatX *act, const floatX *h13, int64_t n, int m, cudaStream_t stream) {
    if (n == 0) return;
    const int threads = 256;
    unsigned int blocks = cdiv_u(n * cdiv_u(m, VEC_X), threads);
    if (vec_path(m % VEC_X == 0, act, h13))
        swiglu_forward_kernel<true><<<blocks, threads, 0, stream>>>(act, h13, n, m);
    else
        swiglu_forward_kernel<false><<<blocks, threads, 0, stream>>>(act, h13, n, m);
    KERNEL_CHECK();
}

void swiglu_backward(floatX *d13, const floatX *dact, const floatX *h13, int64_t n, int m, cudaStream_t stream) {
    if (n == 0) return;
    const int threads = 256;
    unsigned int blocks = cdiv_u(n * cdiv_u(m, VEC_X), threads);
    if (vec_path(m % VEC_X == 0, d13, dact, h13))
        swiglu_backward_kernel<true><<<blocks, threads, 0, stream>>>(d13, dact, h13, n, m);
    else
        swiglu_backward_kernel<false><<<blocks, threads, 0, stream>>>(d13, dact, h13, n, m);
    KERNEL_CHECK();
}
