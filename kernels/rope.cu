// RoPE (see rope.cuh).
#include "rope.cuh"

void rope_tables_host(float *cos_t, float *sin_t, int T, int hd, float theta) {
    int half = hd / 2;
    for (int p = 0; p < T; p++)
        for (int i = 0; i < half; i++) {
            double f = pow((double)theta, -2.0 * i / hd);
            cos_t[p * half + i] = (float)cos(p * f);
            sin_t[p * half + i] = (float)sin(p * f);
        }
}

// One thread per rotated pair: (row, part in {q, k}, head, i < hd/2).
static __global__ void rope_kernel(floatX *qkv, const float *cos_t, const float *sin_t, int N, int T, int d, int H,
                                   float sign) {
    int hd = d / H, half = hd / 2;
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)N * 2 * H * half) return;
    int i = (int)(idx % half);
    int64_t rest = idx / half;
    int h = (int)(rest % H);
    rest /= H;
    int part = (int)(rest % 2);
    int64_t bt = rest / 2;
    int p = (int)(bt % T);
    floatX *u = qkv + bt * 3 * d + (int64_t)part * d + (int64_t)h * hd;
    float a = to_f(u[i]), b = to_f(u[i + half]);
    float c = cos_t[p * half + i], s = sign * sin_t[p * half + i];
    u[i] = to_x(a * c - b * s);
    u[i + half] = to_x(b * c + a * s);
}

void rope_apply(floatX *qkv, const float *cos_t, const float *sin_t, int B, int T, int d, int H, int inverse,
                cudaStream_t stream) {
    int N = B * T, half = d / H / 2;
    const int threads = 256;
    rope_kernel<<<cdiv_u((int64_t)N * 2 * H * half, threads), threads, 0, stream>>>(qkv, cos_t, sin_t, N, T, d, H,
                                                                                    inverse ? -1.0f : 1.0f);
    KERNEL_CHECK();
}
