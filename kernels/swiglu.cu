// SwiGLU (see swiglu.cuh). One thread per hidden unit of one row.
#include "swiglu.cuh"

static __global__ void swiglu_forward_kernel(floatX *act, const floatX *h13, int64_t n, int m) {
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * m) return;
    int64_t t = idx / m, i = idx % m;
    float g = to_f(h13[t * 2 * m + i]), u = to_f(h13[t * 2 * m + m + i]);
    act[idx] = to_x(g / (1.0f + expf(-g)) * u);
}

static __global__ void swiglu_backward_kernel(floatX *d13, const floatX *dact, const floatX *h13, int64_t n, int m) {
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * m) return;
    int64_t t = idx / m, i = idx % m;
    float g = to_f(h13[t * 2 * m + i]), u = to_f(h13[t * 2 * m + m + i]), da = to_f(dact[idx]);
    float sig = 1.0f / (1.0f + expf(-g));
    float silu = g * sig;
    d13[t * 2 * m + m + i] = to_x(da * silu);
    d13[t * 2 * m + i] = to_x(da * u * sig * (1.0f + g * (1.0f - sig)));
}

void swiglu_forward(floatX *act, const floatX *h13, int64_t n, int m, cudaStream_t stream) {
    if (n == 0) return;
    const int threads = 256;
    swiglu_forward_kernel<<<cdiv_u(n * m, threads), threads, 0, stream>>>(act, h13, n, m);
    KERNEL_CHECK();
}

void swiglu_backward(floatX *d13, const floatX *dact, const floatX *h13, int64_t n, int m, cudaStream_t stream) {
    if (n == 0) return;
    const int threads = 256;
    swiglu_backward_kernel<<<cdiv_u(n * m, threads), threads, 0, stream>>>(d13, dact, h13, n, m);
    KERNEL_CHECK();
}
