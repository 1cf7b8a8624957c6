// Causal attention through batched GEMMs and softmax kernels (see attention.cuh).
//
// Layouts, row-major: for sequence b and head h, Q_h (T, hd) starts at
// qkv + b*T*3d + h*hd with row stride 3d (K_h at +d, V_h at +2d); head h of the
// output starts at out + b*T*d + h*hd with row stride d; the score matrix of
// (b, h) is (T, T) contiguous at (b*H + h)*T*T. Consecutive heads are hd
// elements apart in qkv and out, and T*T apart in the scores, which is the
// batch stride of each per-sequence call.
#include "attention.cuh"

// C(b, h) = alpha * op(A) op(B) for the H heads of one sequence (column-major
// arguments as cuBLAS takes them).
static void attention_gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           float alpha, const floatX *A, int lda, long long sA, const floatX *B, int ldb, long long sB,
                           void *C, cudaDataType_t ctype, int ldc, long long sC, int H) {
    const float beta = 0.0f;
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, &alpha, A, CUDA_R_FLOATX, lda, sA, B, CUDA_R_FLOATX,
                                            ldb, sB, &beta, C, ctype, ldc, sC, H, CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
}

// One warp per row (b, h, i): P[j] = exp(S[j] - max) / sum for j <= i, 0 above.
static __global__ void attention_softmax_kernel(floatX *att, const float *scores, int64_t rows, int T) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int i = (int)(row % T); // query position
    const float *s = scores + row * T;
    floatX *p = att + row * T;
    float mx = -INFINITY;
    for (int j = lane; j <= i; j += 32) mx = fmaxf(mx, s[j]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j <= i; j += 32) sum += expf(s[j] - mx);
    sum = warp_sum(sum);
    for (int j = lane; j < T; j += 32) p[j] = to_x(j <= i ? expf(s[j] - mx) / sum : 0.0f);
}

// One warp per row: dS[j] = P[j] (dP[j] - sum_k P[k] dP[k]) * scale for j <= i, 0 above.
static __global__ void attention_softmax_backward_kernel(floatX *dS, const floatX *att, const float *dP, int64_t rows,
                                                         int T, float scale) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int i = (int)(row % T);
    const floatX *p = att + row * T;
    const float *g = dP + row * T;
    floatX *o = dS + row * T;
    float dot = 0.0f;
    for (int j = lane; j <= i; j += 32) dot += to_f(p[j]) * g[j];
    dot = warp_sum(dot);
    for (int j = lane; j < T; j += 32) o[j] = to_x(j <= i ? to_f(p[j]) * (g[j] - dot) * scale : 0.0f);
}

void attention_forward(cublasHandle_t h, floatX *out, floatX *att, float *scores, const floatX *qkv, int B, int T,
                       int d, int H, cudaStream_t stream) {
    int hd = d / H;
    float scale = 1.0f / sqrtf((float)hd);
    long long TT = (long long)T * T;
    for (int b = 0; b < B; b++) {
        const floatX *q = qkv + (int64_t)b * T * 3 * d, *k = q + d;
        // S (Tq, Tk) = scale Q K^T; column-major S^T (Tk, Tq) = K (Tk, hd) @ Q^T (hd, Tq).
        attention_gemm(h, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd, scale, k, 3 * d, hd, q, 3 * d, hd,
                       scores + (int64_t)b * H * TT, CUDA_R_32F, T, TT, H);
    }
    int64_t rows = (int64_t)B * H * T;
    const int threads = 256, per_block = threads / 32;
    attention_softmax_kernel<<<cdiv_u(rows, per_block), threads, 0, stream>>>(att, scores, rows, T);
    KERNEL_CHECK();
    for (int b = 0; b < B; b++) {
        const floatX *v = qkv + (int64_t)b * T * 3 * d + 2 * d;
        // O (Tq, hd) = P V; column-major O^T (hd, Tq) = V^T (hd, Tk) @ P^T (Tk, Tq).
        attention_gemm(h, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, 1.0f, v, 3 * d, hd, att + (int64_t)b * H * TT, T, TT,
                       out + (int64_t)b * T * d, CUDA_R_FLOATX, d, hd, H);
    }
}

void attention_backward(cublasHandle_t h, floatX *dqkv, const floatX *dout, const floatX *qkv, const floatX *att,
                        float *dP, floatX *dS, int B, int T, int d, int H, cudaStream_t stream) {
    int hd = d / H;
    float scale = 1.0f / sqrtf((float)hd);
    long long TT = (long long)T * T;
    for (int b = 0; b < B; b++) {
        const floatX *v = qkv + (int64_t)b * T * 3 * d + 2 * d, *go = dout + (int64_t)b * T * d;
        const floatX *p = att + (int64_t)b * H * TT;
        // dP (Tq, Tk) = dO V^T; column-major dP^T (Tk, Tq) = V (Tk, hd) @ dO^T (hd, Tq).
        attention_gemm(h, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hd, 1.0f, v, 3 * d, hd, go, d, hd,
                       dP + (int64_t)b * H * TT, CUDA_R_32F, T, TT, H);
        // dV (Tk, hd) = P^T dO; column-major dV^T (hd, Tk) = dO^T (hd, Tq) @ P (Tq, Tk).
        attention_gemm(h, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, 1.0f, go, d, hd, p, T, TT,
                       dqkv + (int64_t)b * T * 3 * d + 2 * d, CUDA_R_FLOATX, 3 * d, hd, H);
    }
    int64_t rows = (int64_t)B * H * T;
    const int threads = 256, per_block = threads / 32;
    attention_softmax_backward_kernel<<<cdiv_u(rows, per_block), threads, 0, stream>>>(dS, att, dP, rows, T, scale);
    KERNEL_CHECK();
    for (int b = 0; b < B; b++) {
        const floatX *q = qkv + (int64_t)b * T * 3 * d, *k = q + d;
        const floatX *ds = dS + (int64_t)b * H * TT;
        floatX *dq = dqkv + (int64_t)b * T * 3 * d, *dk = dq + d;
        // dQ (Tq, hd) = dS K; column-major dQ^T (hd, Tq) = K^T (hd, Tk) @ dS^T (Tk, Tq).
        attention_gemm(h, CUBLAS_OP_N, CUBLAS_OP_N, hd, T, T, 1.0f, k, 3 * d, hd, ds, T, TT, dq, CUDA_R_FLOATX, 3 * d,
                       hd, H);
        // dK (Tk, hd) = dS^T Q; column-major dK^T (hd, Tk) = Q^T (hd, Tq) @ dS (Tq, Tk).
        attention_gemm(h, CUBLAS_OP_N, CUBLAS_OP_T, hd, T, T, 1.0f, q, 3 * d, hd, ds, T, TT, dk, CUDA_R_FLOATX, 3 * d,
                       hd, H);
    }
}
