// AdamW (see adamw.cuh). One thread per group of VEC_X elements
// (kernels/vec.cuh): the four fp32 arrays and the floatX copy are read and
// written 16 bytes at a time when they are aligned; the last group may be partial.
#include "adamw.cuh"

#include "vec.cuh"

// params, paramsX, grads, m, v: the range's first element (len elements).
template <bool ALIGNED>
static __global__ void adamw_kernel(float *params, floatX *paramsX, const float *grads, float *m, float *v,
                                    int64_t len, int decay, AdamWScalars s, float grad_mult) {
    int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC_X;
    if (i >= len) return;
    int n = (int)min((int64_t)VEC_X, len - i);
    float p[VEC_X], g[VEC_X], mi[VEC_X], vi[VEC_X];
    vec_load<ALIGNED>(p, params + i, n);
    vec_load<ALIGNED>(g, grads + i, n);
    vec_load<ALIGNED>(mi, m + i, n);
    vec_load<ALIGNED>(vi, v + i, n);
    for (int k = 0; k < VEC_X; k++) {
        if (grad_mult != 1.0f) g[k] *= grad_mult;
        adamw_update_one(&p[k], g[k], &mi[k], &vi[k], decay, &s);
    }
    vec_store<ALIGNED>(params + i, p, n);
    vec_store<ALIGNED>(m + i, mi, n);
    vec_store<ALIGNED>(v + i, vi, n);
    if (paramsX) vec_store<ALIGNED>(paramsX + i, p, n);
}

void adamw_update(float *params, floatX *paramsX, const float *grads, float *m, float *v, int64_t off, int64_t len,
                  int decay, AdamWScalars s, float grad_mult, cudaStream_t stream) {
    if (len == 0) return;
    const int threads = 256;
    unsigned int blocks = cdiv_u(cdiv_u(len, VEC_X), threads);
    floatX *px = paramsX ? paramsX + off : NULL;
    if (vec_path(true, params + off, px, grads + off, m + off, v + off))
        adamw_kernel<true><<<blocks, threads, 0, stream>>>(params + off, px, grads + off, m + off, v + off, len, decay,
                                                           s, grad_mult);
    else
        adamw_kernel<false><<<blocks, threads, 0, stream>>>(params + off, px, grads + off, m + off, v + off, len,
                                                            decay, s, grad_mult);
    KERNEL_CHECK();
}
