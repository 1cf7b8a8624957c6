// Tests of the fused attention (kernels/attention.cu) and of the tensor-core
// building blocks it is made of (kernels/mma.cuh). Built for a GPU by gpu.mk
// (make test-gpu) and for the CPU emulator by tests/emu/emu.mk (make test);
// one line per check, exit status 1 if any fails.
//
//  1. the building blocks alone (--mma runs only this part, and it is what
//     a first GPU run must pass before anything else, docs/gpu.md): tiles
//     staged by cp.async (with zero-filled rows) into swizzled shared
//     memory, multiplied by warp_gemm_abt (ldmatrix A and B) and
//     warp_gemm_cb (accumulators reused as A, ldmatrix.trans B), against a
//     plain matmul on the host. The inputs are small integers, so every
//     product and sum is exact in fp32 and bf16 alike: any misplaced
//     fragment element shows as a non-zero error;
//  2. attention forward and backward against the CPU model's own
//     attention_forward / attention_backward and rope_apply (model/ops.c,
//     fp32), on random inputs: T in {1, 15, 16, 17, 255, 256} with head
//     dims 16, 64 and 128 and several heads and sequences, head dim 32 once,
//     and T = 2048 at head dim 128 for one sequence and head; the per-row
//     log-sum-exp against a float64 brute force;
//  3. causality, directly: changing the later tokens (their q, k, v and
//     output gradients) leaves every earlier output, log-sum-exp and query
//     gradient unchanged, and with zero output gradients at the later
//     positions also the earlier key and value gradients -- while the later
//     outputs and the earlier key gradients do change (so the test is not
//     vacuous);
//  4. (emulator only) the same bits when the blocks, and the threads of a
//     block between barriers, run in reverse or shuffled order.
//
// Errors are max |gpu - ref| / max |ref| over a tensor; the log-sum-exp's
// is absolute. Tolerances: TOL_* below, with the measurements behind them.
//
//   test_attention [--mma] [--quick] [--case B,T,H,hd]
//     --quick: T <= 256 only; --case: that one case of part 2 alone (e.g. for
//     EMU_PROFILE=1 counts of one attention layer, docs/gpu.md)
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "model/ops.h"
}

#include "kernels/attention.cuh"
#include "kernels/mma.cuh"
#include "tests/check.h"

#ifdef ENABLE_FP32
// Both sides compute in fp32, in different orders (the CPU sums keys one by
// one, the kernels by tiles with an online softmax and exp2). Measured on the
// emulator over all cases below, the worst max |err| / max |ref|: out
// 1.0e-6, lse 1.7e-6 (absolute), dq 7.7e-7, dk 9.0e-7, dv 5.6e-7; the
// tolerance is 6-11x those.
#define TOL_OUT 1e-5
#define TOL_LSE 1e-5
#define TOL_GRAD 1e-5
#else
// bf16 keeps 8 significant bits: each rounding is a relative error of at
// most 2^-9 = 2.0e-3, and the kernels round the operands of their products
// (the rotated q and k, the probabilities, the score gradients) and store
// the output and the gradients in bf16. Measured on the emulator, which
// rounds exactly where the GPU does (its tensor-core sums are exact where a
// GPU's are fp32, 1e-7 relative: negligible here), over all cases below, the
// worst max |err| / max |ref|: out 4.5e-3, lse 7.1e-3 (absolute), dq 6.1e-3,
// dk 5.8e-3, dv 3.5e-3. The tolerances are 2.1-2.5x those.
#define TOL_OUT 1e-2
#define TOL_LSE 1.5e-2
#define TOL_GRAD 1.5e-2
#endif

// ----------------------------------------------------------------------------
// Helpers

static uint64_t rng_state;
static float urand(void) { // uniform in [-1, 1)
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

// A device copy of n floats, as floatX (exact for the values used here: they
// are rounded to floatX first).
static floatX *dev_x(const float *h, size_t n) {
    floatX *tmp = (floatX *)xmalloc(sizeof(floatX) * n), *d;
    for (size_t i = 0; i < n; i++) tmp[i] = to_x(h[i]);
    CUDA_CHECK(cudaMalloc(&d, sizeof(floatX) * (n ? n : 1)));
    CUDA_CHECK(cudaMemcpy(d, tmp, sizeof(floatX) * n, cudaMemcpyHostToDevice));
    free(tmp);
    return d;
}
static float *dev_f(const float *h, size_t n) {
    float *d;
    CUDA_CHECK(cudaMalloc(&d, sizeof(float) * (n ? n : 1)));
    if (h) CUDA_CHECK(cudaMemcpy(d, h, sizeof(float) * n, cudaMemcpyHostToDevice));
    return d;
}
// Device floatX (x = 1) or float (x = 0) back to host floats.
static void host_f(float *h, const void *d, size_t n, int x) {
    CUDA_CHECK(cudaDeviceSynchronize());
    if (!x) {
        CUDA_CHECK(cudaMemcpy(h, d, sizeof(float) * n, cudaMemcpyDeviceToHost));
        return;
    }
    floatX *tmp = (floatX *)xmalloc(sizeof(floatX) * n);
    CUDA_CHECK(cudaMemcpy(tmp, d, sizeof(floatX) * n, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) h[i] = to_f(tmp[i]);
    free(tmp);
}

// max |a - ref| / max |ref| (absolute when ref is all zero) over n elements
// taken every `stride` starting at column `col0` of `width` columns.
static double rel_err(const float *a, const float *ref, int64_t rows, int64_t stride, int64_t col0, int64_t width) {
    double emax = 0, rmax = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = col0; c < col0 + width; c++) {
            emax = fmax(emax, fabs((double)a[r * stride + c] - (double)ref[r * stride + c]));
            rmax = fmax(rmax, fabs((double)ref[r * stride + c]));
        }
    return rmax > 0 ? emax / rmax : emax;
}

// ----------------------------------------------------------------------------
// 1. The building blocks

// c (16, N) = rows [16, 32) of a (32, CA) times b (N, CB)^T over k < K. One warp.
template <int N, int K, int CA, int CB>
__global__ void mma_abt_kernel(float *c, const floatX *a, int a_rows, const floatX *b) {
    extern __shared__ uint4 mma_abt_smem[];
    floatX *sa = (floatX *)mma_abt_smem, *sb = sa + 32 * CA;
    tile_load_async<32, CA>(sa, a, CA, a_rows);
    tile_load_async<N, CB>(sb, b, CB, N);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    FragC acc[N / 8];
    warp_gemm_abt<N, K, CA, CB>(acc, sa, 16, sb);
    int g = threadIdx.x >> 2 & 7, t = threadIdx.x & 3;
    for (int n = 0; n < N / 8; n++)
        for (int i = 0; i < 4; i++) c[(g + 8 * (i >> 1)) * N + 8 * n + 2 * t + (i & 1)] = acc[n].x[i];
}

// c (16, N) += p (16, K) b (K, CB)[:, :N], p given as accumulator fragments. One warp.
template <int N, int K, int CB> __global__ void mma_cb_kernel(float *c, const float *p, const floatX *b, int b_rows) {
    extern __shared__ uint4 mma_cb_smem[];
    floatX *sb = (floatX *)mma_cb_smem;
    tile_load_async<K, CB>(sb, b, CB, b_rows);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    int g = threadIdx.x >> 2 & 7, t = threadIdx.x & 3;
    FragC pf[K / 8], acc[N / 8];
    for (int n = 0; n < K / 8; n++)
        for (int i = 0; i < 4; i++) pf[n].x[i] = p[(g + 8 * (i >> 1)) * K + 8 * n + 2 * t + (i & 1)];
    for (int n = 0; n < N / 8; n++)
        for (int i = 0; i < 4; i++) acc[n].x[i] = c[(g + 8 * (i >> 1)) * N + 8 * n + 2 * t + (i & 1)];
    warp_gemm_cb<N, K, CB>(acc, pf, sb);
    for (int n = 0; n < N / 8; n++)
        for (int i = 0; i < 4; i++) c[(g + 8 * (i >> 1)) * N + 8 * n + 2 * t + (i & 1)] = acc[n].x[i];
}

static float small_int(void) { return (float)(int)(urand() * 5.0f); } // in [-4, 4]

template <int N, int K, int CA, int CB> static void test_abt(int a_rows) {
    float *a = (float *)xcalloc(32 * CA, sizeof(float)), *b = (float *)xcalloc(N * CB, sizeof(float));
    float *c = (float *)xcalloc(16 * N, sizeof(float));
    for (int i = 0; i < 32 * CA; i++) a[i] = small_int();
    for (int i = 0; i < N * CB; i++) b[i] = small_int();
    floatX *da = dev_x(a, 32 * CA), *db = dev_x(b, N * CB);
    float *dc = dev_f(NULL, 16 * N);
    size_t smem = (32 * CA + N * CB) * sizeof(floatX);
    mma_abt_kernel<N, K, CA, CB><<<1, 32, smem>>>(dc, da, a_rows, db);
    CUDA_CHECK(cudaGetLastError());
    host_f(c, dc, 16 * N, 0);
    double err = 0;
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            if (16 + r < a_rows)
                for (int k = 0; k < K; k++) s += (double)a[(16 + r) * CA + k] * b[n * CB + k];
            err = fmax(err, fabs(s - c[r * N + n]));
        }
    check(err == 0, "mma: cp.async + warp_gemm_abt, C (16 x %d) = A (rows 16-31 of 32 x %d, %d rows given) "
          "B (%d x %d)^T over k < %d: max error %g (exact: small integers)", N, CA, a_rows, N, CB, K, err);
    cudaFree(da);
    cudaFree(db);
    cudaFree(dc);
    free(a);
    free(b);
    free(c);
}

template <int N, int K, int CB> static void test_cb(int b_rows) {
    float *p = (float *)xcalloc(16 * K, sizeof(float)), *b = (float *)xcalloc(K * CB, sizeof(float));
    float *c0 = (float *)xcalloc(16 * N, sizeof(float)), *c = (float *)xcalloc(16 * N, sizeof(float));
    for (int i = 0; i < 16 * K; i++) p[i] = small_int();
    for (int i = 0; i < K * CB; i++) b[i] = small_int();
    for (int i = 0; i < 16 * N; i++) c0[i] = small_int();
    floatX *db = dev_x(b, K * CB);
    float *dp = dev_f(p, 16 * K), *dc = dev_f(c0, 16 * N);
    mma_cb_kernel<N, K, CB><<<1, 32, K * CB * sizeof(floatX)>>>(dc, dp, db, b_rows);
    CUDA_CHECK(cudaGetLastError());
    host_f(c, dc, 16 * N, 0);
    double err = 0;
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < N; n++) {
            double s = c0[r * N + n];
            for (int k = 0; k < b_rows; k++) s += (double)p[r * K + k] * b[k * CB + n];
            err = fmax(err, fabs(s - c[r * N + n]));
        }
    check(err == 0, "mma: cp.async + warp_gemm_cb, C (16 x %d) += P (16 x %d, accumulators as A) B (%d of %d rows "
          "given, x %d): max error %g (exact: small integers)", N, K, b_rows, K, CB, err);
    cudaFree(db);
    cudaFree(dp);
    cudaFree(dc);
    free(p);
    free(b);
    free(c0);
    free(c);
}

static void test_mma(void) {
    rng_state = 7;
    test_abt<16, 16, 16, 16>(32);
    test_abt<32, 64, 64, 64>(27);
    test_abt<16, 128, 128, 128>(32);
    test_abt<16, 32, 64, 128>(20); // k < K of wider tiles
    test_cb<16, 16, 16>(16);
    test_cb<64, 32, 64>(29);
    test_cb<128, 16, 128>(16);
}

// ----------------------------------------------------------------------------
// 2, 3. Attention

typedef struct {
    int B, T, H, hd;
    float *qkv, *dout;                // (B*T, 3d), (B*T, d): the inputs, exactly floatX values
    float *out, *lse, *dqkv;          // the kernels' results
} Run;

// Runs the kernels on r->qkv, r->dout; fills r->out, r->lse, r->dqkv.
static void gpu_attention(Run *r) {
    int B = r->B, T = r->T, H = r->H, hd = r->hd, d = H * hd, N = B * T, half = hd / 2;
    float *ct = (float *)xmalloc(sizeof(float) * T * half), *st = (float *)xmalloc(sizeof(float) * T * half);
    attention_rope_tables(ct, st, T, hd, 10000.0f);
    float *d_cos = dev_f(ct, (size_t)T * half), *d_sin = dev_f(st, (size_t)T * half);
    floatX *d_qkv = dev_x(r->qkv, (size_t)N * 3 * d), *d_dout = dev_x(r->dout, (size_t)N * d);
    floatX *d_out, *d_dqkv;
    CUDA_CHECK(cudaMalloc(&d_out, sizeof(floatX) * N * d));
    CUDA_CHECK(cudaMalloc(&d_dqkv, sizeof(floatX) * N * 3 * d));
    float *d_lse = dev_f(NULL, (size_t)B * H * T), *d_D = dev_f(NULL, (size_t)B * H * T);
    attention_forward(d_out, d_lse, d_qkv, d_cos, d_sin, B, T, d, H, 0);
    attention_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, d_cos, d_sin, B, T, d, H, 0);
    host_f(r->out, d_out, (size_t)N * d, 1);
    host_f(r->lse, d_lse, (size_t)B * H * T, 0);
    host_f(r->dqkv, d_dqkv, (size_t)N * 3 * d, 1);
    cudaFree(d_cos);
    cudaFree(d_sin);
    cudaFree(d_qkv);
    cudaFree(d_dout);
    cudaFree(d_out);
    cudaFree(d_dqkv);
    cudaFree(d_lse);
    cudaFree(d_D);
    free(ct);
    free(st);
}

static void run_alloc(Run *r, int B, int T, int H, int hd) {
    int d = H * hd, N = B * T;
    r->B = B, r->T = T, r->H = H, r->hd = hd;
    r->qkv = (float *)xmalloc(sizeof(float) * N * 3 * d);
    r->dout = (float *)xmalloc(sizeof(float) * N * d);
    r->out = (float *)xmalloc(sizeof(float) * N * d);
    r->lse = (float *)xmalloc(sizeof(float) * B * H * T);
    r->dqkv = (float *)xmalloc(sizeof(float) * N * 3 * d);
}

static void run_free(Run *r) {
    free(r->qkv);
    free(r->dout);
    free(r->out);
    free(r->lse);
    free(r->dqkv);
}

// Random inputs in floatX: q, k, v uniform in [-2, 2) (scores of a few
// units: peaked but not one-hot softmax rows), output gradients in [-1, 1).
static void random_inputs(Run *r, int64_t row0) {
    int d = r->H * r->hd;
    for (int64_t i = row0 * 3 * d; i < (int64_t)r->B * r->T * 3 * d; i++) r->qkv[i] = to_f(to_x(2.0f * urand()));
    for (int64_t i = row0 * d; i < (int64_t)r->B * r->T * d; i++) r->dout[i] = to_f(to_x(urand()));
}

static double worst_out, worst_lse, worst_dq, worst_dk, worst_dv; // over all cases, for the tolerances' comment

static void test_case(int B, int T, int H, int hd, uint64_t seed) {
    Run r;
    run_alloc(&r, B, T, H, hd);
    int d = H * hd, N = B * T, half = hd / 2;
    rng_state = seed;
    random_inputs(&r, 0);
    gpu_attention(&r);

    // The CPU model: rotate, attend, backward, rotate the gradient back.
    float *ct = (float *)xmalloc(sizeof(float) * T * half), *st = (float *)xmalloc(sizeof(float) * T * half);
    float *gt = (float *)xmalloc(sizeof(float) * T * half), *gs = (float *)xmalloc(sizeof(float) * T * half);
    rope_tables(ct, st, T, hd, 10000.0f);
    attention_rope_tables(gt, gs, T, hd, 10000.0f);
    int same_tables = memcmp(ct, gt, sizeof(float) * T * half) == 0 && memcmp(st, gs, sizeof(float) * T * half) == 0;
    float *qkv_r = (float *)xmalloc(sizeof(float) * N * 3 * d), *out = (float *)xmalloc(sizeof(float) * N * d);
    float *att = (float *)xmalloc(sizeof(float) * B * H * T * T), *dqkv = (float *)xmalloc(sizeof(float) * N * 3 * d);
    memcpy(qkv_r, r.qkv, sizeof(float) * N * 3 * d);
    rope_apply(qkv_r, ct, st, B, T, d, H, 0);
    attention_forward(out, att, qkv_r, B, T, d, H);
    attention_backward(dqkv, r.dout, qkv_r, att, B, T, d, H);
    rope_apply(dqkv, ct, st, B, T, d, H, 1);
    // The log-sum-exp of each row of scaled scores, in double.
    double lse_err = 0, scale = 1.0 / sqrt((double)hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < T; i++) {
                const float *q = qkv_r + ((size_t)b * T + i) * 3 * d + h * hd;
                double mx = -INFINITY, sum = 0, *s = (double *)xmalloc(sizeof(double) * (i + 1));
                for (int j = 0; j <= i; j++) {
                    const float *k = qkv_r + ((size_t)b * T + j) * 3 * d + d + h * hd;
                    double dot = 0;
                    for (int c = 0; c < hd; c++) dot += (double)q[c] * k[c];
                    s[j] = dot * scale;
                    mx = fmax(mx, s[j]);
                }
                for (int j = 0; j <= i; j++) sum += exp(s[j] - mx);
                lse_err = fmax(lse_err, fabs(mx + log(sum) - r.lse[((size_t)b * H + h) * T + i]));
                free(s);
            }

    double e_out = rel_err(r.out, out, N, d, 0, d), e_dq = rel_err(r.dqkv, dqkv, N, 3 * d, 0, d);
    double e_dk = rel_err(r.dqkv, dqkv, N, 3 * d, d, d), e_dv = rel_err(r.dqkv, dqkv, N, 3 * d, 2 * d, d);
    int ok = same_tables && e_out <= TOL_OUT && lse_err <= TOL_LSE && e_dq <= TOL_GRAD && e_dk <= TOL_GRAD &&
             e_dv <= TOL_GRAD;
    check(ok, "attention B %d T %4d H %d hd %3d: out %.2e, lse %.2e, dq %.2e, dk %.2e, dv %.2e (tol %g, %g, %g)%s", B, T, H, hd, e_out, lse_err, e_dq, e_dk, e_dv, TOL_OUT, TOL_LSE, TOL_GRAD,
          same_tables ? "" : ", RoPE tables differ from model/ops.c's");
    worst_out = fmax(worst_out, e_out), worst_lse = fmax(worst_lse, lse_err), worst_dq = fmax(worst_dq, e_dq);
    worst_dk = fmax(worst_dk, e_dk), worst_dv = fmax(worst_dv, e_dv);
    free(ct);
    free(st);
    free(gt);
    free(gs);
    free(qkv_r);
    free(out);
    free(att);
    free(dqkv);
    run_free(&r);
}

// Rows [r0, r1] of every sequence of a and b (row stride `stride`, columns
// [col0, col0 + width)): equal values (1) or not.
static int rows_equal(const float *a, const float *b, int B, int T, int r0, int r1, int col0, int width, int stride) {
    for (int s = 0; s < B; s++)
        for (int t = r0; t <= r1; t++)
            for (int c = col0; c < col0 + width; c++)
                if (a[((size_t)s * T + t) * stride + c] != b[((size_t)s * T + t) * stride + c]) return 0;
    return 1;
}

static void test_causality(int B, int T, int H, int hd, int p) {
    int d = H * hd;
    Run a, b;
    run_alloc(&a, B, T, H, hd);
    run_alloc(&b, B, T, H, hd);
    rng_state = 11;
    random_inputs(&a, 0);
    memcpy(b.qkv, a.qkv, sizeof(float) * B * T * 3 * d);
    memcpy(b.dout, a.dout, sizeof(float) * B * T * d);
    // b: other q, k, v and output gradients after position p, in every sequence.
    for (int s = 0; s < B; s++)
        for (int t = p + 1; t < T; t++) {
            for (int c = 0; c < 3 * d; c++) b.qkv[((size_t)s * T + t) * 3 * d + c] = to_f(to_x(2.0f * urand()));
            for (int c = 0; c < d; c++) b.dout[((size_t)s * T + t) * d + c] = to_f(to_x(urand()));
        }
    gpu_attention(&a);
    gpu_attention(&b);
    int lse_same = 1;
    for (int s = 0; s < B * H; s++)
        for (int t = 0; t <= p; t++) lse_same &= a.lse[(size_t)s * T + t] == b.lse[(size_t)s * T + t];
    int out_same = rows_equal(a.out, b.out, B, T, 0, p, 0, d, d);
    int dq_same = rows_equal(a.dqkv, b.dqkv, B, T, 0, p, 0, d, 3 * d);
    int later_differ = !rows_equal(a.out, b.out, B, T, p + 1, T - 1, 0, d, d);
    int dk_differ = !rows_equal(a.dqkv, b.dqkv, B, T, 0, p, d, d, 3 * d);
    check(out_same && lse_same && dq_same && later_differ && dk_differ,
          "causality (B %d T %d H %d hd %d): other tokens after position %d leave the outputs, log-sum-exps and "
          "query gradients up to it unchanged (%s, %s, %s), and change the later outputs (%s) and the earlier key "
          "gradients (%s)", B, T, H, hd, p, out_same ? "yes" : "NO", lse_same ? "yes" : "NO", dq_same ? "yes" : "NO",
          later_differ ? "yes" : "NO", dk_differ ? "yes" : "NO");
    // With zero output gradients after p, nothing after p reaches the gradients up to p.
    for (int s = 0; s < B; s++)
        for (int t = p + 1; t < T; t++)
            for (int c = 0; c < d; c++) a.dout[((size_t)s * T + t) * d + c] = b.dout[((size_t)s * T + t) * d + c] = 0;
    gpu_attention(&a);
    gpu_attention(&b);
    int all_same = rows_equal(a.dqkv, b.dqkv, B, T, 0, p, 0, 3 * d, 3 * d);
    check(all_same, "causality: with zero output gradients after position %d, other tokens there leave every "
          "gradient (q, k, v) up to it unchanged", p);
    run_free(&a);
    run_free(&b);
}

#ifndef __CUDACC__
// 4. The emulator runs blocks and threads in an order it is told: the
// kernels must give the same bits in any.
static void test_orders(void) {
    Run r[3];
    const char *orders[3] = {"forward", "reverse", "shuffle"};
    for (int i = 0; i < 3; i++) {
        run_alloc(&r[i], 2, 40, 2, 16);
        rng_state = 5;
        random_inputs(&r[i], 0);
        emu::set_order(orders[i]);
        gpu_attention(&r[i]);
    }
    emu::set_order("forward");
    size_t n_out = 2 * 40 * 32, n_lse = 2 * 2 * 40, n_dqkv = 2 * 40 * 96;
    for (int i = 1; i < 3; i++)
        check(memcmp(r[0].out, r[i].out, sizeof(float) * n_out) == 0 &&
                  memcmp(r[0].lse, r[i].lse, sizeof(float) * n_lse) == 0 &&
                  memcmp(r[0].dqkv, r[i].dqkv, sizeof(float) * n_dqkv) == 0,
              "blocks and threads in %s order: output, log-sum-exp and gradients bitwise equal", orders[i]);
    for (int i = 0; i < 3; i++) run_free(&r[i]);
}
#endif

int main(int argc, char **argv) {
    int mma_only = 0, quick = 0, one[4] = {0, 0, 0, 0};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--mma") == 0)
            mma_only = 1;
        else if (strcmp(argv[i], "--quick") == 0)
            quick = 1;
        else if (strcmp(argv[i], "--case") == 0 && i + 1 < argc &&
                 sscanf(argv[i + 1], "%d,%d,%d,%d", &one[0], &one[1], &one[2], &one[3]) == 4 && one[0] > 0 &&
                 one[1] > 0 && one[2] > 0 && attention_supported(one[3], NULL, 0) == 0)
            i++;
        else {
            fprintf(stderr, "usage: test_attention [--mma] [--quick] [--case B,T,H,hd]   (hd 16, 32, 64 or 128)\n");
            return 2;
        }
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        fprintf(stderr, "test_attention: no CUDA device\n");
        return 1;
    }
    printf("attention tests (%s)\n", FLOATX_NAME);
    if (one[0]) {
        test_case(one[0], one[1], one[2], one[3], 1);
        return check_summary("test_attention");
    }
    test_mma();
    if (!mma_only) {
        const int hds[3] = {16, 64, 128}, Ts[6] = {1, 15, 16, 17, 255, 256};
        uint64_t seed = 100;
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 6; j++) test_case(2, Ts[j], 2, hds[i], seed++);
        test_case(1, 33, 3, 32, seed++);
        if (!quick) test_case(1, 2048, 1, 128, seed++);
        test_causality(2, 150, 2, 64, 70);
#ifndef __CUDACC__
        test_orders();
#endif
        printf("worst errors: out %.2e, lse %.2e, dq %.2e, dk %.2e, dv %.2e\n", worst_out, worst_lse, worst_dq,
               worst_dk, worst_dv);
    }
    return check_summary("test_attention");
}
