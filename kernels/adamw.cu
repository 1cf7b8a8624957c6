// AdamW (see adamw.cuh). One thread per element.
#include "adamw.cuh"

static __global__ void adamw_kernel(float *params, floatX *paramsX, const float *grads, float *m, float *v,
                                    int64_t off, int64_t len, int decay, AdamWScalars s, float grad_mult) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    i += off;
    float g = grads[i];
    if (grad_mult != 1.0f) g *= grad_mult;
    float p = params[i], mi = m[i], vi = v[i];
    adamw_update_one(&p, g, &mi, &vi, decay, &s);
    params[i] = p;
    m[i] = mi;
    v[i] = vi;
    if (paramsX) paramsX[i] = to_x(p);
}

void adamw_update(float *params, floatX *paramsX, const float *grads, float *m, float *v, int64_t off, int64_t len,
                  int decay, AdamWScalars s, float grad_mult, cudaStream_t stream) {
    if (len == 0) return;
    const int threads = 256;
    adamw_kernel<<<cdiv_u(len, threads), threads, 0, stream>>>(params, paramsX, grads, m, v, off, len, decay, s,
                                                               grad_mult);
    KERNEL_CHECK();
}
