// Tests of the CUDA emulator itself (tests/emu): before its results are
// trusted, it must compute what CUDA defines and stop on what CUDA would get
// wrong. Compiled like the trainer's .cu files (cu2cc.sed, the emulated
// headers), run by `make test-emu`.
//
//  1. semantics: block reductions through shared memory, __syncthreads and
//     xor shuffles (2-D blocks included), the same bits in reverse thread and
//     block order while a missing barrier changes the result, atomics, the poison in fresh device
//     and shared memory, launch configurations CUDA rejects, and cuBLAS GEMMs
//     (every transpose pair, padded leading dimensions, beta = 0 over NaN,
//     strided and grouped batches, bf16, cuBLASLt with C != D) against loops
//     written from cuBLAS's definition C = alpha op(A) op(B) + beta C
//     (column-major);
//  2. detection: each bug below runs in a child process, which must stop with
//     the emulator's message: host code touching device memory, a kernel
//     writing past its allocation (into the guard page and into the slack),
//     a host pointer given to a kernel, a warp split between __syncthreads
//     and __syncwarp, a shuffle from an exited lane, a copy with the wrong kind, a
//     GEMM on host memory, a kernel on freed memory, host code reading or
//     writing pinned memory that an unfinished cudaMemcpyAsync uses;
//  3. cuBLAS type combinations: each GEMM entry point accepts the rows of its
//     table in the cuBLAS documentation and refuses the others;
//  4. warp masks: a __syncwarp or shuffle waits for the lanes its mask names
//     and no others (shuffles excuse exited lanes, __syncwarp does not), and
//     the misuses stop: a lane outside its own mask, a shuffle and a
//     __syncwarp mixed in one warp, half a warp gone from a __syncwarp, one
//     __syncthreads reached from two places;
//  5. in the race build (make test-emu-race) only: the kernels above run with
//     every access checked and are clean, and each race below is caught -- a
//     missing atomic within a block and between blocks, a missing
//     __syncthreads, a __syncwarp whose mask leaves out the lane that wrote,
//     a __syncthreads the writing threads never reached (they exited), a read
//     in an allocation's rounding slack.
//  6. graphs (stream capture and replay): a captured sequence of every kind
//     of work runs nothing at the capture and, replayed with new inputs in
//     the same buffers, gives the bits of running it directly; host values
//     (kernel arguments, alpha, a grouped GEMM's sizes) are the capture's,
//     device memory (data, pointer arrays) is read at the replay; each call
//     a GPU refuses during a capture returns CUDA's code and invalidates the
//     capture; in child processes, the emulator's checks at the replay, and
//     EMU_PROFILE's counts of replays (test_emu --graph-profile N).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <emu_mma.h>
#include <nccl.h>

#include <thread>

#include "tests/check.h"

#define CK(call)                                                                           \
    do {                                                                                   \
        if ((call) != 0) {                                                                 \
            fprintf(stderr, "%s:%d: %s failed\n", __FILE__, __LINE__, #call);              \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

// ----------------------------------------------------------------------------
// Kernels

// out[blockIdx.x] = sum of in over the block's 2-D tile, through warp shuffles
// and shared memory; every thread also checks that it got the same result.
__global__ void block_sum_kernel(float *out, int *disagree, const float *in) {
    __shared__ float partial[32];
    int t = threadIdx.y * blockDim.x + threadIdx.x, n = blockDim.x * blockDim.y;
    float v = in[blockIdx.x * n + t];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (t % 32 == 0) partial[t / 32] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < n / 32; w++) s += partial[w];
    __syncthreads();
    if (t == 0) out[blockIdx.x] = s;
    __syncthreads();
    if (out[blockIdx.x] != s) atomicAdd(disagree, 1);
}

// got[i] = the value lane (i ^ mask) offered.
__global__ void shuffle_kernel(int *got, int mask) {
    int lane = threadIdx.x;
    got[lane] = __shfl_xor_sync(0xffffffffu, lane * 10, mask);
}

__global__ void count_kernel(int *counts, const int *keys, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(&counts[keys[i]], 1);
}

// Copies dynamic shared memory as the block found it.
__global__ void smem_peek_kernel(unsigned int *out) {
    extern __shared__ unsigned int peek_smem[];
    out[threadIdx.x] = peek_smem[threadIdx.x];
}

// Thread 0 writes shared memory that the others read with no barrier in
// between: the result depends on the order threads run in (a bug).
__global__ void racy_kernel(unsigned int *out) {
    __shared__ unsigned int flag;
    if (threadIdx.x == 0) flag = 42;
    out[threadIdx.x] = flag;
}

__global__ void write_kernel(float *p, int i) { p[i] = 1.0f; }

// Half a warp at __syncthreads, the other half at __syncwarp: neither can
// complete. (Threads that have exited do count as arrived, as PTX's bar.sync
// defines, so an early return before a block barrier is not reported.)
__global__ void diverged_sync_kernel(float *p) {
    if (threadIdx.x < 16)
        __syncthreads();
    else
        __syncwarp();
    p[threadIdx.x] = 1.0f;
}

__global__ void exited_lane_kernel(float *p) {
    if (threadIdx.x >= 16) return;
    p[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 16);
}

// Each half of a warp synchronises only with itself, then reads what lane
// lane ^ 1 (its own half: ordered) or lane ^ 16 (the other half: a race) wrote.
__global__ void half_syncwarp_kernel(float *out, int cross) {
    __shared__ float v[32];
    int lane = threadIdx.x;
    v[lane] = (float)lane;
    __syncwarp(lane < 16 ? 0x0000ffffu : 0xffff0000u);
    out[lane] = v[cross ? lane ^ 16 : lane ^ 1];
}

// Lanes 16-31 leave; lanes 0-15 shuffle among themselves, with a mask naming only them.
__global__ void masked_shuffle_kernel(int *got) {
    int lane = threadIdx.x;
    if (lane >= 16) return;
    got[lane] = __shfl_xor_sync(0x0000ffffu, lane * 10, 1);
}

// Half of every warp leaves after a __syncwarp that passed its writes to the
// other half, which reaches the __syncthreads: the writes are ordered before
// the reads after it (the barrier is cumulative).
__global__ void publish_then_exit_kernel(float *out) {
    __shared__ float v[64];
    v[threadIdx.x] = (float)threadIdx.x;
    __syncwarp();
    if (threadIdx.x % 32 >= 16) return;
    __syncthreads();
    out[threadIdx.x] = v[63 - threadIdx.x];
}

// A plain read-modify-write of one counter by every thread of a block: a
// missing atomic (a lost update on a GPU).
__global__ void plain_count_kernel(int *counter) { counter[0] += 1; }

// The same by one thread of each block: a missing atomic between blocks.
__global__ void plain_count_blocks_kernel(int *counter) {
    if (threadIdx.x == 0) counter[0] += 1;
}

// The threads of the second warp write and leave; the first warp's barrier
// completes without them and it reads what they wrote: nothing orders it.
__global__ void partial_barrier_kernel(float *out) {
    __shared__ float v[64];
    v[threadIdx.x] = (float)threadIdx.x;
    if (threadIdx.x >= 32) return;
    __syncthreads();
    out[threadIdx.x] = v[threadIdx.x + 32];
}

// One barrier, two __syncthreads: each warp reaches a different one.
__global__ void divergent_barrier_kernel(float *out) {
    if (threadIdx.x < 32)
        __syncthreads();
    else
        __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// __syncwarp() names all 32 lanes, but half of them have left.
__global__ void half_warp_exits_kernel(float *out) {
    if (threadIdx.x >= 16) return;
    __syncwarp();
    out[threadIdx.x] = 1.0f;
}

__global__ void syncwarp_not_in_mask_kernel(float *out) {
    __syncwarp(0xfffffffeu); // lane 0 is not in it
    out[threadIdx.x] = 1.0f;
}

// Half a warp at __syncwarp, the other half at a shuffle.
__global__ void syncwarp_shuffle_mixed_kernel(float *out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x < 16)
        __syncwarp();
    else
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

__global__ void read_kernel(float *out, const float *p, int i) { out[0] = p[i]; }

// ----------------------------------------------------------------------------
// Semantics

static float frand(unsigned int *s) {
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) & 0xffff) / 65536.0f - 0.5f;
}

static void test_kernels(void) {
    // Block sums: 3 blocks of 32 x 8 threads.
    const int nb = 3, bx = 32, by = 8, n = nb * bx * by;
    float h_in[n], h_out[nb];
    unsigned int seed = 1;
    for (int i = 0; i < n; i++) h_in[i] = frand(&seed);
    float *d_in, *d_out;
    int *d_dis, h_dis = 0;
    CK(cudaMalloc(&d_in, sizeof h_in));
    CK(cudaMalloc(&d_out, sizeof h_out));
    CK(cudaMalloc(&d_dis, sizeof(int)));
    CK(cudaMemcpy(d_in, h_in, sizeof h_in, cudaMemcpyHostToDevice));
    CK(cudaMemset(d_dis, 0, sizeof(int)));
    block_sum_kernel<<<nb, dim3(bx, by)>>>(d_out, d_dis, d_in);
    CK(cudaGetLastError());
    CK(cudaMemcpy(h_out, d_out, sizeof h_out, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(&h_dis, d_dis, sizeof(int), cudaMemcpyDeviceToHost));
    double worst = 0.0;
    for (int b = 0; b < nb; b++) {
        double s = 0.0;
        for (int i = 0; i < bx * by; i++) s += h_in[b * bx * by + i];
        worst = fmax(worst, fabs(s - h_out[b]));
    }
    check(worst < 1e-5 && h_dis == 0, "block sums through shuffles, shared memory, __syncthreads (2-D blocks): "
          "err %.2e, %d threads saw another value", worst, h_dis);

    int *d_got, h_got[32], bad = 0;
    CK(cudaMalloc(&d_got, sizeof h_got));
    for (int mask = 1; mask < 32; mask <<= 1) {
        shuffle_kernel<<<1, 32>>>(d_got, mask);
        CK(cudaMemcpy(h_got, d_got, sizeof h_got, cudaMemcpyDeviceToHost));
        for (int l = 0; l < 32; l++) bad += h_got[l] != (l ^ mask) * 10;
    }
    check(bad == 0, "__shfl_xor_sync returns lane ^ mask's value (%d wrong of 160)", bad);

    const int nk = 1000, nbins = 7;
    int keys[nk], want[nbins] = {0}, got[nbins];
    for (int i = 0; i < nk; i++) {
        keys[i] = (i * 31 + i / 7) % nbins;
        want[keys[i]]++;
    }
    int *d_keys, *d_counts;
    CK(cudaMalloc(&d_keys, sizeof keys));
    CK(cudaMalloc(&d_counts, sizeof got));
    CK(cudaMemcpy(d_keys, keys, sizeof keys, cudaMemcpyHostToDevice));
    CK(cudaMemset(d_counts, 0, sizeof got));
    count_kernel<<<(nk + 127) / 128, 128>>>(d_counts, d_keys, nk);
    CK(cudaMemcpy(got, d_counts, sizeof got, cudaMemcpyDeviceToHost));
    check(memcmp(got, want, sizeof got) == 0, "atomicAdd counts (%d %d %d ... vs %d %d %d ...)", got[0], got[1], got[2],
          want[0], want[1], want[2]);

    unsigned int *d_peek, h_peek[64];
    CK(cudaMalloc(&d_peek, sizeof h_peek));
    CK(cudaMemcpy(h_peek, d_peek, sizeof h_peek, cudaMemcpyDeviceToHost));
    int fresh_poisoned = h_peek[0] == 0xffffffffu && h_peek[63] == 0xffffffffu;
    smem_peek_kernel<<<1, 64, 64 * sizeof(unsigned int)>>>(d_peek);
    CK(cudaMemcpy(h_peek, d_peek, sizeof h_peek, cudaMemcpyDeviceToHost));
    check(fresh_poisoned && h_peek[0] == 0xffffffffu && h_peek[63] == 0xffffffffu,
          "fresh device memory and dynamic shared memory read as 0xffffffff (NaN / -1)");

    // Thread and block order: a correct kernel gives the same bits in every
    // order; the racy one does not (so the order really changes). The race
    // build stops on the racy one instead (test_race_detection).
    float h_rev[nb];
    unsigned int racy_fwd[64], racy_rev[64];
    unsigned int *d_racy;
    CK(cudaMalloc(&d_racy, sizeof racy_fwd));
    if (!emu::race_on()) {
        racy_kernel<<<1, 64>>>(d_racy);
        CK(cudaMemcpy(racy_fwd, d_racy, sizeof racy_fwd, cudaMemcpyDeviceToHost));
    }
    emu::set_order("reverse");
    block_sum_kernel<<<nb, dim3(bx, by)>>>(d_out, d_dis, d_in);
    CK(cudaMemcpy(h_rev, d_out, sizeof h_rev, cudaMemcpyDeviceToHost));
    if (!emu::race_on()) {
        racy_kernel<<<1, 64>>>(d_racy);
        CK(cudaMemcpy(racy_rev, d_racy, sizeof racy_rev, cudaMemcpyDeviceToHost));
    }
    emu::set_order("forward");
    check(memcmp(h_rev, h_out, sizeof h_out) == 0, "reverse order: block sums bitwise equal");
    if (!emu::race_on())
        check(memcmp(racy_fwd, racy_rev, sizeof racy_fwd) != 0,
              "reverse order: a missing barrier changes the result (%u vs %u in the last thread)", racy_fwd[63],
              racy_rev[63]);
    cudaFree(d_racy);

    write_kernel<<<0, 32>>>(d_in, 0);
    cudaError_t e1 = cudaGetLastError(), e1b = cudaGetLastError();
    write_kernel<<<1, 2048>>>(d_in, 0);
    cudaError_t e2 = cudaGetLastError();
    smem_peek_kernel<<<1, 64, 64 * 1024>>>(d_peek);
    cudaError_t e3 = cudaGetLastError();
    check(e1 == cudaErrorInvalidConfiguration && e1b == cudaSuccess && e2 == cudaErrorInvalidConfiguration &&
              e3 != cudaSuccess,
          "an empty grid, 2048 threads, 64 KiB of dynamic shared memory: launch errors, cleared when read");
    cudaFree(d_in);
    cudaFree(d_out);
    cudaFree(d_dis);
    cudaFree(d_got);
    cudaFree(d_keys);
    cudaFree(d_counts);
    cudaFree(d_peek);
}

// cuBLAS's definition, written out: element (i, j) of op(X) for a
// column-major X with leading dimension ld.
static double op_elem(const float *X, int ld, cublasOperation_t t, int i, int j) {
    return t == CUBLAS_OP_N ? X[i + (size_t)j * ld] : X[j + (size_t)i * ld];
}

// Host reference for C = alpha op(A) op(B) + beta C; C0 is C before.
static void gemm_ref(float *C, const float *C0, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                     float alpha, const float *A, int lda, const float *B, int ldb, float beta, int ldc) {
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0.0;
            for (int p = 0; p < k; p++) s += op_elem(A, lda, ta, i, p) * op_elem(B, ldb, tb, p, j);
            C[i + (size_t)j * ldc] = (float)(alpha * s + (beta != 0.0f ? beta * C0[i + (size_t)j * ldc] : 0.0));
        }
}

static float *dev_copy(const float *h, size_t n) {
    float *d;
    CK(cudaMalloc(&d, n * sizeof(float)));
    CK(cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice));
    return d;
}

static void test_gemm(void) {
    cublasHandle_t h;
    CK(cublasCreate(&h));
    const int m = 5, n = 4, k = 3, pad = 2;
    unsigned int seed = 7;
    float A[(k + pad) * (m + pad)], B[(k + pad) * (n + pad)], C0[(m + pad) * n], C[(m + pad) * n],
        want[(m + pad) * n];
    for (float &x : A) x = frand(&seed);
    for (float &x : B) x = frand(&seed);
    float *dA = dev_copy(A, sizeof A / 4), *dB = dev_copy(B, sizeof B / 4);
    double worst = 0.0;
    int nan_seen = 0;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int bz = 0; bz < 2; bz++) {
                cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
                int lda = (ta ? k : m) + pad, ldb = (tb ? n : k) + pad, ldc = m + pad;
                float alpha = 1.5f, beta = bz ? 0.0f : 0.5f;
                for (float &x : C0) x = bz ? NAN : frand(&seed); // beta = 0: C must not be read
                float *dC = dev_copy(C0, sizeof C0 / 4);
                CK(cublasGemmEx(h, oa, ob, m, n, k, &alpha, dA, CUDA_R_32F, lda, dB, CUDA_R_32F, ldb, &beta, dC,
                                CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
                CK(cudaMemcpy(C, dC, sizeof C, cudaMemcpyDeviceToHost));
                gemm_ref(want, C0, oa, ob, m, n, k, alpha, A, lda, B, ldb, beta, ldc);
                for (int j = 0; j < n; j++)
                    for (int i = 0; i < m; i++) {
                        float g = C[i + j * ldc];
                        nan_seen += g != g;
                        worst = fmax(worst, fabs(g - want[i + j * ldc]));
                    }
                cudaFree(dC);
            }
    check(worst < 1e-6 && nan_seen == 0, "cublasGemmEx: 4 transpose pairs, padded ld, beta 0.5 and 0 over NaN: err %.2e",
          worst);

    float one = 1.0f, zero = 0.0f;
    float *dC;
    CK(cudaMalloc(&dC, sizeof C));
    cublasStatus_t st = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dA, CUDA_R_32F, m - 1, dB, CUDA_R_32F,
                                     k, &zero, dC, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    check(st == CUBLAS_STATUS_INVALID_VALUE, "lda < m is CUBLAS_STATUS_INVALID_VALUE (%s)", cublasGetStatusName(st));

    // Strided batch of 2 and a grouped batch of two groups (sizes 1 and 2) over
    // the same operands, against the single GEMMs.
    float Cs[2 * m * n], Cg[3 * m * n], ref[m * n], zeros[m * n] = {0};
    float *dCs, *dCg;
    CK(cudaMalloc(&dCs, sizeof Cs));
    CK(cudaMalloc(&dCg, sizeof Cg));
    CK(cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, dA, CUDA_R_32F, k, 0, dB, CUDA_R_32F, k,
                                  0, &zero, dCs, CUDA_R_32F, m, m * n, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    CK(cudaMemcpy(Cs, dCs, sizeof Cs, cudaMemcpyDeviceToHost));
    gemm_ref(ref, zeros, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, 1.0f, A, k, B, k, 0.0f, m);
    double ws = 0.0;
    for (int i = 0; i < m * n; i++) ws = fmax(ws, fmax(fabs(Cs[i] - ref[i]), fabs(Cs[m * n + i] - ref[i])));
    check(ws < 1e-6, "cublasGemmStridedBatchedEx (2 batches): err %.2e", ws);

    cublasOperation_t tas[2] = {CUBLAS_OP_T, CUBLAS_OP_N}, tbs[2] = {CUBLAS_OP_N, CUBLAS_OP_T};
    int ms[2] = {m, m}, ns[2] = {n, n}, ks[2] = {k, k}, ldas[2] = {k, m}, ldbs[2] = {k, n}, ldcs[2] = {m, m},
        sizes[2] = {1, 2};
    float alphas[2] = {1.0f, 2.0f}, betas[2] = {0.0f, 0.0f};
    const void *hptr[9] = {dA, dA, dA, dB, dB, dB, dCg, dCg + m * n, dCg + 2 * m * n};
    const void **dptr;
    CK(cudaMalloc(&dptr, sizeof hptr));
    CK(cudaMemcpy(dptr, hptr, sizeof hptr, cudaMemcpyHostToDevice));
    CK(cublasGemmGroupedBatchedEx(h, tas, tbs, ms, ns, ks, alphas, dptr, CUDA_R_32F, ldas, dptr + 3, CUDA_R_32F, ldbs,
                                  betas, (void *const *)(dptr + 6), CUDA_R_32F, ldcs, 2, sizes, CUBLAS_COMPUTE_32F));
    CK(cudaMemcpy(Cg, dCg, sizeof Cg, cudaMemcpyDeviceToHost));
    float ref2[m * n];
    gemm_ref(ref2, zeros, CUBLAS_OP_N, CUBLAS_OP_T, m, n, k, 2.0f, A, m, B, n, 0.0f, m);
    double wg = 0.0;
    for (int i = 0; i < m * n; i++)
        wg = fmax(wg, fmax(fabs(Cg[i] - ref[i]), fmax(fabs(Cg[m * n + i] - ref2[i]), fabs(Cg[2 * m * n + i] - ref2[i]))));
    check(wg < 1e-6, "cublasGemmGroupedBatchedEx (groups of 1 and 2, own transposes and alpha): err %.2e", wg);

    // bf16 operands and output: the result is the fp32 one rounded once.
    __nv_bfloat16 Ab[m * k], Bb[k * n], Cb[m * n];
    float Af[m * k], Bf[k * n];
    for (int i = 0; i < m * k; i++) Af[i] = __bfloat162float(Ab[i] = __float2bfloat16_rn(frand(&seed)));
    for (int i = 0; i < k * n; i++) Bf[i] = __bfloat162float(Bb[i] = __float2bfloat16_rn(frand(&seed)));
    gemm_ref(ref, zeros, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, 1.0f, Af, m, Bf, k, 0.0f, m);
    __nv_bfloat16 *dAb, *dBb, *dCb;
    CK(cudaMalloc(&dAb, sizeof Ab));
    CK(cudaMalloc(&dBb, sizeof Bb));
    CK(cudaMalloc(&dCb, sizeof Cb));
    CK(cudaMemcpy(dAb, Ab, sizeof Ab, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dBb, Bb, sizeof Bb, cudaMemcpyHostToDevice));
    CK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dAb, CUDA_R_16BF, m, dBb, CUDA_R_16BF, k, &zero, dCb,
                    CUDA_R_16BF, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    CK(cudaMemcpy(Cb, dCb, sizeof Cb, cudaMemcpyDeviceToHost));
    int bf_bad = 0;
    for (int i = 0; i < m * n; i++) bf_bad += __bfloat162float(Cb[i]) != __bfloat162float(__float2bfloat16_rn(ref[i]));
    check(bf_bad == 0, "bf16 GEMM = fp32 result rounded to nearest even (%d of %d differ)", bf_bad, m * n);
    check(__bfloat162float(__float2bfloat16_rn(1.00390625f)) == 1.0f &&
              __bfloat162float(__float2bfloat16_rn(1.01171875f)) == 1.015625f,
          "bf16 rounding: ties go to even");
    cudaFree(dA);
    cudaFree(dB);
    cudaFree(dC);
    cudaFree(dCs);
    cudaFree(dCg);
    cudaFree(dptr);
    cudaFree(dAb);
    cudaFree(dBb);
    cudaFree(dCb);
    cublasDestroy(h);
}

// cuBLASLt: D = op(A) op(B) + C with C != D (the residual add), in place,
// and a layout that does not fit is CUBLAS_STATUS_INVALID_VALUE.
static void test_lt(void) {
    const int m = 4, n = 3, k = 5;
    unsigned int seed = 11;
    float A[k * m], B[k * n], C[m * n], D[m * n], want[m * n];
    for (float &x : A) x = frand(&seed);
    for (float &x : B) x = frand(&seed);
    for (float &x : C) x = frand(&seed);
    float *dA = dev_copy(A, k * m), *dB = dev_copy(B, k * n), *dC = dev_copy(C, m * n), *dD;
    CK(cudaMalloc(&dD, sizeof D));
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc, bad;
    CK(cublasLtCreate(&lt));
    CK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    int32_t opT = CUBLAS_OP_T;
    CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof opT));
    CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, k, m, k)); // A stored k x m, used transposed
    CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, k, n, k));
    CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, m, n, m));
    CK(cublasLtMatrixLayoutCreate(&bad, CUDA_R_32F, k + 1, n, k + 1));
    cublasLtMatmulPreference_t pref;
    CK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = 0;
    CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    CK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &res, &found));
    float one = 1.0f;
    CK(cublasLtMatmul(lt, desc, &one, dA, la, dB, lb, &one, dC, lc, dD, lc, &res.algo, NULL, 0, 0));
    CK(cudaMemcpy(D, dD, sizeof D, cudaMemcpyDeviceToHost));
    gemm_ref(want, C, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, 1.0f, A, k, B, k, 1.0f, m);
    double e1 = 0.0;
    for (int i = 0; i < m * n; i++) e1 = fmax(e1, fabs(D[i] - want[i]));
    CK(cublasLtMatmul(lt, desc, &one, dA, la, dB, lb, &one, dC, lc, dC, lc, &res.algo, NULL, 0, 0)); // in place
    CK(cudaMemcpy(D, dC, sizeof D, cudaMemcpyDeviceToHost));
    double e2 = 0.0;
    for (int i = 0; i < m * n; i++) e2 = fmax(e2, fabs(D[i] - want[i]));
    float C2[m * n];
    CK(cudaMemcpy(C2, dC, sizeof C2, cudaMemcpyDeviceToHost));
    cublasStatus_t st = cublasLtMatmul(lt, desc, &one, dA, la, dB, bad, &one, dC, lc, dD, lc, NULL, NULL, 0, 0);
    check(found == 1 && e1 < 1e-6 && e2 < 1e-6 && st == CUBLAS_STATUS_INVALID_VALUE,
          "cublasLtMatmul: D = op(A) B + C out of place (err %.1e) and in place (err %.1e); a B layout of k+1 rows "
          "is refused (%s)", e1, e2, cublasGetStatusName(st));
    // The heuristic's algorithm assumed 256-byte alignment (the default): A
    // at 4 bytes past an allocation's start is refused.
    float *dA4;
    CK(cudaMalloc(&dA4, sizeof A + 256));
    CK(cudaMemcpy(dA4 + 1, A, sizeof A, cudaMemcpyHostToDevice));
    st = cublasLtMatmul(lt, desc, &one, dA4 + 1, la, dB, lb, &one, dC, lc, dD, lc, &res.algo, NULL, 0, 0);
    check(st == CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmul: a matrix less aligned than its algorithm assumed is "
          "refused (%s)", cublasGetStatusName(st));
    cudaFree(dA4);
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatrixLayoutDestroy(bad);
    cublasLtMatmulDescDestroy(desc);
    cublasLtDestroy(lt);
    cudaFree(dA);
    cudaFree(dB);
    cudaFree(dC);
    cudaFree(dD);
}

// Type combinations: each entry point accepts the rows of its table in the
// cuBLAS documentation (emu_blas.cc) and answers CUBLAS_STATUS_NOT_SUPPORTED
// to the others, as a GPU does -- in particular the grouped GEMM refuses bf16
// inputs with an fp32 C, which cublasGemmEx accepts.
static void test_gemm_types(void) {
    cublasHandle_t h;
    CK(cublasCreate(&h));
    const int n = 4; // n x n matrices of ones: every result is n
    float one = 1.0f, zero = 0.0f, ones[n * n], got[n * n];
    __nv_bfloat16 ones_b[n * n];
    for (int i = 0; i < n * n; i++) {
        ones[i] = 1.0f;
        ones_b[i] = __float2bfloat16_rn(1.0f);
    }
    float *dA = dev_copy(ones, n * n), *dC;
    __nv_bfloat16 *dAb, *dCb;
    CK(cudaMalloc(&dC, sizeof got));
    CK(cudaMalloc(&dAb, sizeof ones_b));
    CK(cudaMalloc(&dCb, sizeof got)); // room for an fp32 C: a wrongly accepted bf16 -> fp32 call fails a check, not the run
    CK(cudaMemcpy(dAb, ones_b, sizeof ones_b, cudaMemcpyHostToDevice));

    // cublasGemmEx: bf16 x bf16 -> fp32 is listed; fp32 x fp32 -> bf16, mixed A/B
    // types and fp32 data with the fp64 compute type are not.
    CK(cudaMemset(dC, 0, sizeof got));
    cublasStatus_t mixed_ok = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, dAb, CUDA_R_16BF, n, dAb,
                                           CUDA_R_16BF, n, &zero, dC, CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                                           CUBLAS_GEMM_DEFAULT);
    CK(cudaMemcpy(got, dC, sizeof got, cudaMemcpyDeviceToHost));
    cublasStatus_t e1 = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, dA, CUDA_R_32F, n, dA, CUDA_R_32F, n,
                                     &zero, dCb, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cublasStatus_t e2 = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, dAb, CUDA_R_16BF, n, dA, CUDA_R_32F,
                                     n, &zero, dC, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cublasStatus_t e3 = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, dA, CUDA_R_32F, n, dA, CUDA_R_32F, n,
                                     &zero, dC, CUDA_R_32F, n, CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT);
    check(mixed_ok == CUBLAS_STATUS_SUCCESS && got[0] == n && got[n * n - 1] == n &&
              e1 == CUBLAS_STATUS_NOT_SUPPORTED && e2 == CUBLAS_STATUS_NOT_SUPPORTED &&
              e3 == CUBLAS_STATUS_NOT_SUPPORTED,
          "cublasGemmEx: bf16 x bf16 -> fp32 runs (%s, C = %g); fp32 -> bf16 C, bf16 x fp32, fp32 with the fp64 "
          "compute type refused (%s, %s, %s)", cublasGetStatusName(mixed_ok), got[0], cublasGetStatusName(e1),
          cublasGetStatusName(e2), cublasGetStatusName(e3));

    cublasStatus_t s1 = cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, dA, CUDA_R_32F, n, 0,
                                                   dA, CUDA_R_32F, n, 0, &zero, dCb, CUDA_R_16BF, n, 0, 1,
                                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    check(s1 == CUBLAS_STATUS_NOT_SUPPORTED, "cublasGemmStridedBatchedEx: fp32 -> bf16 C refused (%s)",
          cublasGetStatusName(s1));

    // The grouped GEMM: bf16 -> bf16 runs, bf16 -> fp32 (what the trainer's
    // weight gradients would need) is refused, so its probe picks the fallback.
    cublasOperation_t op = CUBLAS_OP_N;
    int dims[1] = {n}, size1[1] = {1};
    const void *hptr[3] = {dAb, dAb, dCb};
    const void **dptr;
    CK(cudaMalloc(&dptr, sizeof hptr));
    CK(cudaMemcpy(dptr, hptr, sizeof hptr, cudaMemcpyHostToDevice));
    cublasStatus_t g1 = cublasGemmGroupedBatchedEx(h, &op, &op, dims, dims, dims, &one, dptr, CUDA_R_16BF, dims,
                                                   dptr + 1, CUDA_R_16BF, dims, &zero, (void *const *)(dptr + 2),
                                                   CUDA_R_16BF, dims, 1, size1, CUBLAS_COMPUTE_32F);
    __nv_bfloat16 gotb[n * n];
    CK(cudaMemcpy(gotb, dCb, sizeof gotb, cudaMemcpyDeviceToHost));
    cublasStatus_t g2 = cublasGemmGroupedBatchedEx(h, &op, &op, dims, dims, dims, &one, dptr, CUDA_R_16BF, dims,
                                                   dptr + 1, CUDA_R_16BF, dims, &zero, (void *const *)(dptr + 2),
                                                   CUDA_R_32F, dims, 1, size1, CUBLAS_COMPUTE_32F);
    check(g1 == CUBLAS_STATUS_SUCCESS && __bfloat162float(gotb[0]) == n && g2 == CUBLAS_STATUS_NOT_SUPPORTED,
          "cublasGemmGroupedBatchedEx: bf16 -> bf16 runs (%s, C = %g), bf16 -> fp32 refused (%s)",
          cublasGetStatusName(g1), __bfloat162float(gotb[0]), cublasGetStatusName(g2));

    // cuBLASLt: the descriptor's scale type counts too (fp64 alpha with the
    // fp32 compute type is not a row), and D must have C's type.
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t d32, d64;
    cublasLtMatrixLayout_t lf, lb;
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    CK(cublasLtCreate(&lt));
    CK(cublasLtMatmulDescCreate(&d32, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CK(cublasLtMatmulDescCreate(&d64, CUBLAS_COMPUTE_32F, CUDA_R_64F));
    CK(cublasLtMatrixLayoutCreate(&lf, CUDA_R_32F, n, n, n));
    CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, n, n, n));
    CK(cublasLtMatmulPreferenceCreate(&pref));
    cublasStatus_t l1 = cublasLtMatmulAlgoGetHeuristic(lt, d32, lb, lb, lf, lf, pref, 1, &res, &found);
    cublasStatus_t l2 = cublasLtMatmulAlgoGetHeuristic(lt, d64, lf, lf, lf, lf, pref, 1, &res, &found);
    cublasStatus_t l3 = cublasLtMatmulAlgoGetHeuristic(lt, d32, lb, lb, lb, lf, pref, 1, &res, &found);
    check(l1 == CUBLAS_STATUS_SUCCESS && l2 == CUBLAS_STATUS_NOT_SUPPORTED && l3 == CUBLAS_STATUS_NOT_SUPPORTED,
          "cublasLtMatmul: bf16 x bf16 -> fp32 has an algorithm (%s); an fp64 scale type with the fp32 compute type, "
          "a D type other than C's are refused (%s, %s)", cublasGetStatusName(l1), cublasGetStatusName(l2),
          cublasGetStatusName(l3));
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(lf);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatmulDescDestroy(d32);
    cublasLtMatmulDescDestroy(d64);
    cublasLtDestroy(lt);
    cudaFree(dptr);
    cudaFree(dA);
    cudaFree(dC);
    cudaFree(dAb);
    cudaFree(dCb);
    cublasDestroy(h);
}

static void expect_stop(const char *what, void (*fn)(void), const char *want);

// Warp masks: a __syncwarp or shuffle with a partial mask waits only for the
// lanes it names, and orders memory only among them (in the race build these
// kernels also run with every access checked: they must be clean, as must
// the atomics and barriers of test_kernels).
static void test_warp_masks(void) {
    float *d_out, h_out[64];
    int *d_got, h_got[16];
    CK(cudaMalloc(&d_out, sizeof h_out));
    CK(cudaMalloc(&d_got, sizeof h_got));
    half_syncwarp_kernel<<<1, 32>>>(d_out, 0);
    CK(cudaGetLastError());
    CK(cudaMemcpy(h_out, d_out, 32 * sizeof(float), cudaMemcpyDeviceToHost));
    int bad = 0;
    for (int l = 0; l < 32; l++) bad += h_out[l] != (float)(l ^ 1);
    check(bad == 0, "__syncwarp with the masks 0x0000ffff and 0xffff0000: each half exchanges values (%d wrong)", bad);

    masked_shuffle_kernel<<<1, 32>>>(d_got);
    CK(cudaGetLastError());
    CK(cudaMemcpy(h_got, d_got, sizeof h_got, cudaMemcpyDeviceToHost));
    bad = 0;
    for (int l = 0; l < 16; l++) bad += h_got[l] != (l ^ 1) * 10;
    check(bad == 0, "a shuffle with the mask 0x0000ffff while lanes 16-31 have exited (%d wrong)", bad);

    publish_then_exit_kernel<<<1, 64>>>(d_out);
    CK(cudaGetLastError());
    CK(cudaMemcpy(h_out, d_out, 16 * sizeof(float), cudaMemcpyDeviceToHost));
    bad = 0;
    for (int t = 0; t < 16; t++) bad += h_out[t] != (float)(63 - t);
    check(bad == 0, "values passed by __syncwarp to lanes that reach a __syncthreads, from lanes that exit (%d wrong)",
          bad);
    cudaFree(d_out);
    cudaFree(d_got);
}

static float *small_buffer(void) {
    float *d;
    cudaMalloc(&d, 64 * sizeof(float));
    return d;
}
static void bug_divergent_barrier(void) { divergent_barrier_kernel<<<1, 64>>>(small_buffer()); }
static void bug_half_warp_exits(void) { half_warp_exits_kernel<<<1, 32>>>(small_buffer()); }
static void bug_not_in_mask(void) { syncwarp_not_in_mask_kernel<<<1, 32>>>(small_buffer()); }
static void bug_syncwarp_shuffle_mixed(void) { syncwarp_shuffle_mixed_kernel<<<1, 32>>>(small_buffer()); }

// Barriers and warp operations that a GPU would hang on or get wrong: every build.
static void test_barrier_misuse(void) {
    expect_stop("one barrier reached from two __syncthreads", bug_divergent_barrier, "divergent __syncthreads");
    expect_stop("a __syncwarp() half of whose lanes have exited", bug_half_warp_exits,
                "in warp 0, lanes 0-15 wait at __syncwarp with mask 0xffffffff for lane 16, which has exited");
    expect_stop("a lane calling __syncwarp with a mask without it", bug_not_in_mask, "which is not in its mask");
    expect_stop("a shuffle and a __syncwarp in one warp", bug_syncwarp_shuffle_mixed,
                "a shuffle and a __syncwarp mixed in one warp");
}

static int *zero_counter(void) {
    int *d;
    cudaMalloc(&d, sizeof(int));
    cudaMemset(d, 0, sizeof(int));
    return d;
}
static void bug_plain_count(void) { plain_count_kernel<<<1, 64>>>(zero_counter()); }
static void bug_plain_count_blocks(void) { plain_count_blocks_kernel<<<4, 32>>>(zero_counter()); }
static void bug_missing_syncthreads(void) {
    unsigned int *d;
    cudaMalloc(&d, 64 * sizeof(unsigned int));
    racy_kernel<<<1, 64>>>(d);
}
static void bug_half_syncwarp(void) { half_syncwarp_kernel<<<1, 32>>>(small_buffer(), 1); }
static void bug_partial_barrier(void) { partial_barrier_kernel<<<1, 64>>>(small_buffer()); }
static void bug_slack_read(void) {
    float *d;
    cudaMalloc(&d, 100);
    cudaMemset(d, 0, 100);
    read_kernel<<<1, 1>>>(small_buffer(), d, 25); // bytes 100..103: in the allocation's page, past its size
}

// Races a GPU would have and the plain emulator cannot see: the race build only.
static void test_race_detection(void) {
    if (!emu::race_on()) {
        printf("skip race detection: not the race build (make test-emu-race runs it)\n");
        return;
    }
    expect_stop("a plain += by 64 threads of a block (a missing atomic)", bug_plain_count,
                "data race in kernel plain_count_kernel");
    expect_stop("a plain += by one thread of each of 4 blocks", bug_plain_count_blocks,
                "in another block of the same launch");
    expect_stop("a shared-memory write read by other threads with no __syncthreads", bug_missing_syncthreads,
                "data race in kernel racy_kernel");
    expect_stop("__syncwarp masks that leave out the lane that wrote", bug_half_syncwarp,
                "with no __syncwarp naming both lanes");
    expect_stop("a __syncthreads the writing threads never reached", bug_partial_barrier,
                "exited before the __syncthreads between them");
    expect_stop("a kernel reading the rounding slack after 100 bytes", bug_slack_read,
                "out-of-bounds read at byte offset 100 of device allocation");
}

// ----------------------------------------------------------------------------
// Detection: each bug in a child process

static void bug_host_deref(void) {
    float *d;
    cudaMalloc(&d, 64);
    d[3] = 1.0f;
}
static void bug_guard_page(void) {
    float *d;
    cudaMalloc(&d, 4096); // fills its pages: the next float is in the guard page
    write_kernel<<<1, 1>>>(d, 1024);
}
static void bug_slack(void) {
    float *d;
    cudaMalloc(&d, 100);
    write_kernel<<<1, 1>>>(d, 25);
}
static void bug_host_pointer_arg(void) {
    static float h[4];
    write_kernel<<<1, 1>>>(h, 0);
}
static void bug_diverged_sync(void) {
    float *d;
    cudaMalloc(&d, 128);
    diverged_sync_kernel<<<1, 32>>>(d);
}
static void bug_exited_lane(void) {
    float *d;
    cudaMalloc(&d, 128);
    exited_lane_kernel<<<1, 32>>>(d);
}
static void bug_copy_kind(void) {
    float h[4] = {0}, *d;
    cudaMalloc(&d, sizeof h);
    cudaMemcpy(h, d, sizeof h, cudaMemcpyHostToDevice);
}
static void bug_gemm_host(void) {
    cublasHandle_t handle;
    cublasCreate(&handle);
    float a[4] = {0}, b[4] = {0}, *c, one = 1.0f;
    cudaMalloc(&c, sizeof a);
    cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, a, CUDA_R_32F, 2, b, CUDA_R_32F, 2, &one, c,
                 CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
// fp64 GEMMs are a listed combination, but the emulator does not compute them.
static void bug_gemm_fp64(void) {
    cublasHandle_t handle;
    cublasCreate(&handle);
    double *a, one = 1.0;
    cudaMalloc(&a, 4 * sizeof(double));
    cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, a, CUDA_R_64F, 2, a, CUDA_R_64F, 2, &one, a,
                 CUDA_R_64F, 2, CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT);
}
static void bug_use_after_free(void) {
    float *d;
    cudaMalloc(&d, 256);
    cudaFree(d);
    write_kernel<<<1, 1>>>(d, 0);
}

static void bug_read_before_sync(void) {
    cudaStream_t st;
    float *d, *h;
    cudaStreamCreate(&st);
    cudaMalloc(&d, 64);
    cudaMemset(d, 0, 64);
    cudaMallocHost(&h, 64);
    cudaMemcpyAsync(h, d, 64, cudaMemcpyDeviceToHost, st);
    printf("%f\n", h[0]); // no cudaStreamSynchronize
}
static void bug_write_before_sync(void) {
    cudaStream_t st;
    float *d, *h;
    cudaStreamCreate(&st);
    cudaMalloc(&d, 64);
    cudaMallocHost(&h, 64);
    cudaMemcpyAsync(d, h, 64, cudaMemcpyHostToDevice, st);
    h[0] = 1.0f; // the copy may not have read it yet
}

// A device-to-host copy into pinned memory lands at the synchronisation, with
// the device data of the moment it was enqueued.
static void test_async(void) {
    cudaStream_t st;
    float *d, *h, one = 1.0f, two = 2.0f;
    CK(cudaStreamCreate(&st));
    CK(cudaMalloc(&d, sizeof(float)));
    CK(cudaMallocHost(&h, sizeof(float)));
    CK(cudaMemcpy(d, &one, sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemcpyAsync(h, d, sizeof(float), cudaMemcpyDeviceToHost, st));
    CK(cudaMemcpy(d, &two, sizeof(float), cudaMemcpyHostToDevice)); // after the copy in stream order
    CK(cudaStreamSynchronize(st));
    check(*h == 1.0f, "cudaMemcpyAsync into pinned memory: the data of its place in the stream, readable after the sync "
          "(%g)", *h);
    CK(cudaFreeHost(h));
    CK(cudaFree(d));
    CK(cudaStreamDestroy(st));
}

// Events: timestamps in stream order; reading one before the host has
// synchronised with it is cudaErrorNotReady (a GPU may not have reached it),
// an unrecorded one cudaErrorInvalidResourceHandle; cudaEventSynchronize
// lands the copies enqueued before the record and not those after it.
static __global__ void spin_kernel(float *x, int n) {
    float v = 0.0f;
    for (int i = 0; i < n; i++) v += sinf((float)i);
    if (threadIdx.x == 0 && blockIdx.x == 0) x[0] = v; // one writer: the blocks run in no order
}

static void test_events(void) {
    cudaStream_t st;
    cudaEvent_t a, b, never;
    float *d, *h1, *h2, ms = -1.0f, ms_early = -1.0f;
    CK(cudaStreamCreate(&st));
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    CK(cudaEventCreate(&never));
    CK(cudaMalloc(&d, sizeof(float)));
    CK(cudaMallocHost(&h1, sizeof(float)));
    CK(cudaMallocHost(&h2, sizeof(float)));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CK(cudaEventRecord(a, st));
    spin_kernel<<<4, 32, 0, st>>>(d, 20000);
    CK(cudaGetLastError());
    CK(cudaMemcpyAsync(h1, d, sizeof(float), cudaMemcpyDeviceToHost, st));
    CK(cudaEventRecord(b, st));
    CK(cudaMemcpyAsync(h2, d, sizeof(float), cudaMemcpyDeviceToHost, st)); // after b
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double host_ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) * 1e-6;
    cudaError_t early = cudaEventElapsedTime(&ms_early, a, b);
    cudaError_t query = cudaEventQuery(b);
    cudaError_t unrec = cudaEventElapsedTime(&ms, a, never);
    CK(cudaEventSynchronize(b));
    int h1_readable = *h1 != 0.0f; // the copy before b has landed
    CK(cudaEventElapsedTime(&ms, a, b));
    check(early == cudaErrorNotReady && query == cudaErrorNotReady && unrec == cudaErrorInvalidResourceHandle,
          "events before the host synchronised with them: elapsed %s, query %s; never recorded: %s",
          cudaGetErrorName(early), cudaGetErrorName(query), cudaGetErrorName(unrec));
    check(h1_readable && ms > 0.0f && ms <= host_ms + 0.01,
          "cudaEventSynchronize lands the copy before the event; elapsed %.3f ms within the host's %.3f ms", ms,
          host_ms);
    CK(cudaStreamSynchronize(st)); // the copy after b
    CK(cudaEventDestroy(a));
    check(cudaEventElapsedTime(&ms, a, b) == cudaErrorInvalidResourceHandle, "a destroyed event is refused");
    CK(cudaEventDestroy(b));
    CK(cudaEventDestroy(never));
    CK(cudaFreeHost(h1));
    CK(cudaFreeHost(h2));
    CK(cudaFree(d));
    CK(cudaStreamDestroy(st));
}

// The copy after an event is still pending after cudaEventSynchronize.
static void bug_read_after_event(void) {
    cudaStream_t st;
    cudaEvent_t ev;
    float *d, *h;
    cudaStreamCreate(&st);
    cudaEventCreate(&ev);
    cudaMalloc(&d, 64);
    cudaMallocHost(&h, 64);
    cudaEventRecord(ev, st);
    cudaMemcpyAsync(h, d, 64, cudaMemcpyDeviceToHost, st);
    cudaEventSynchronize(ev);
    printf("%g\n", h[0]); // not synchronised with the copy
}

// ----------------------------------------------------------------------------
// Graphs: stream capture and replay (emu_graph.cc)

// y[i] = x[i] * s + i.
__global__ void affine_kernel(float *y, const float *x, float s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] * s + (float)i;
}

// A micro-batch in small, with every kind of work the trainer captures: a
// copy in from pinned memory, a kernel, a memset, a device-to-device copy, a
// cuBLAS GEMM and a cuBLASLt one, copies out into pinned memory.
enum { SEQ_N = 64, SEQ_M = 6, SEQ_K = 8, SEQ_C = 8 }; // x, y, z: SEQ_N; A: M x K; z as K x C; c, d: M x C
struct Seq {
    cudaStream_t st;
    cublasHandle_t h; // on st
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lz, lc;
    cublasLtMatmulHeuristicResult_t algo;
    float *h_in, *h_out;          // pinned: SEQ_N inputs; c then d (2 M C)
    float *x, *y, *z, *A, *c, *d; // device
    float hA[SEQ_M * SEQ_K];
};

static void seq_create(Seq *q, unsigned int seed) {
    CK(cudaStreamCreate(&q->st)); // a blocking stream, as the trainer's
    CK(cublasCreate(&q->h));
    CK(cublasSetStream(q->h, q->st));
    CK(cublasLtCreate(&q->lt));
    CK(cublasLtMatmulDescCreate(&q->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CK(cublasLtMatrixLayoutCreate(&q->la, CUDA_R_32F, SEQ_M, SEQ_K, SEQ_M));
    CK(cublasLtMatrixLayoutCreate(&q->lz, CUDA_R_32F, SEQ_K, SEQ_C, SEQ_K));
    CK(cublasLtMatrixLayoutCreate(&q->lc, CUDA_R_32F, SEQ_M, SEQ_C, SEQ_M));
    cublasLtMatmulPreference_t pref;
    int found = 0;
    CK(cublasLtMatmulPreferenceCreate(&pref));
    CK(cublasLtMatmulAlgoGetHeuristic(q->lt, q->desc, q->la, q->lz, q->lc, q->lc, pref, 1, &q->algo, &found));
    CK(cublasLtMatmulPreferenceDestroy(pref));
    CK(cudaMallocHost(&q->h_in, SEQ_N * sizeof(float)));
    CK(cudaMallocHost(&q->h_out, 2 * SEQ_M * SEQ_C * sizeof(float)));
    float **dev[] = {&q->x, &q->y, &q->z, &q->A, &q->c, &q->d};
    for (float **p : dev) CK(cudaMalloc(p, SEQ_N * sizeof(float)));
    for (float &v : q->hA) v = frand(&seed);
    CK(cudaMemcpy(q->A, q->hA, sizeof q->hA, cudaMemcpyHostToDevice));
}

static void seq_destroy(Seq *q) {
    float *dev[] = {q->x, q->y, q->z, q->A, q->c, q->d};
    for (float *p : dev) CK(cudaFree(p));
    CK(cudaFreeHost(q->h_in));
    CK(cudaFreeHost(q->h_out));
    cublasLtMatrixLayoutDestroy(q->la);
    cublasLtMatrixLayoutDestroy(q->lz);
    cublasLtMatrixLayoutDestroy(q->lc);
    cublasLtMatmulDescDestroy(q->desc);
    cublasLtDestroy(q->lt);
    cublasDestroy(q->h);
    CK(cudaStreamDestroy(q->st));
}

// Enqueues the sequence on q->st; s and alpha are host values (a kernel
// argument, a GEMM's alpha). Returns how many calls did not succeed.
static int seq_enqueue(const Seq *q, float s, float alpha) {
    float zero = 0.0f, one = 1.0f;
    int bad = 0;
    bad += cudaMemcpyAsync(q->x, q->h_in, SEQ_N * sizeof(float), cudaMemcpyHostToDevice, q->st) != cudaSuccess;
    affine_kernel<<<2, 32, 0, q->st>>>(q->y, q->x, s, SEQ_N);
    bad += cudaGetLastError() != cudaSuccess;
    bad += cudaMemsetAsync(q->z, 0, SEQ_N * sizeof(float), q->st) != cudaSuccess;
    bad += cudaMemcpyAsync(q->z, q->y, SEQ_N / 2 * sizeof(float), cudaMemcpyDeviceToDevice, q->st) != cudaSuccess;
    bad += cublasGemmEx(q->h, CUBLAS_OP_N, CUBLAS_OP_N, SEQ_M, SEQ_C, SEQ_K, &alpha, q->A, CUDA_R_32F, SEQ_M, q->z,
                        CUDA_R_32F, SEQ_K, &zero, q->c, CUDA_R_32F, SEQ_M, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS;
    bad += cublasLtMatmul(q->lt, q->desc, &one, q->A, q->la, q->z, q->lz, &one, q->c, q->lc, q->d, q->lc, &q->algo.algo,
                          NULL, 0, q->st) != CUBLAS_STATUS_SUCCESS;
    bad += cudaMemcpyAsync(q->h_out, q->c, SEQ_M * SEQ_C * sizeof(float), cudaMemcpyDeviceToHost, q->st) != cudaSuccess;
    bad += cudaMemcpyAsync(q->h_out + SEQ_M * SEQ_C, q->d, SEQ_M * SEQ_C * sizeof(float), cudaMemcpyDeviceToHost,
                           q->st) != cudaSuccess;
    return bad;
}

// The sequence written out on the host: c = alpha A z, d = A z + c, with
// z = (x s + i for the first half, 0 after).
static void seq_ref(const Seq *q, const float *in, float s, float alpha, double *out) {
    double z[SEQ_N] = {0};
    for (int i = 0; i < SEQ_N / 2; i++) z[i] = (double)in[i] * s + i;
    for (int j = 0; j < SEQ_C; j++)
        for (int i = 0; i < SEQ_M; i++) {
            double az = 0.0;
            for (int p = 0; p < SEQ_K; p++) az += (double)q->hA[i + p * SEQ_M] * z[p + j * SEQ_K];
            out[i + j * SEQ_M] = alpha * az;
            out[SEQ_M * SEQ_C + i + j * SEQ_M] = az + alpha * az;
        }
}

static void seq_input(const Seq *q, unsigned int seed) {
    for (int i = 0; i < SEQ_N; i++) q->h_in[i] = frand(&seed);
}

// Captures the sequence (s = 1.5, alpha = 2) into an executable graph.
static cudaGraphExec_t seq_capture(const Seq *q, int *bad) {
    cudaGraph_t g = NULL;
    cudaGraphExec_t exec = NULL;
    CK(cudaStreamBeginCapture(q->st, cudaStreamCaptureModeGlobal));
    *bad = seq_enqueue(q, 1.5f, 2.0f);
    CK(cudaStreamEndCapture(q->st, &g));
    CK(cudaGraphInstantiate(&exec, g, 0));
    CK(cudaGraphDestroy(g)); // the executable graph does not need it
    return exec;
}

// The captured sequence replayed twice, with new inputs in the same pinned
// buffer each time, gives the bits of running it directly with those inputs
// (which match the host's definition); nothing runs during the capture; the
// host values are the capture's; a replay runs on the stream it is launched on.
static void test_graph_replay(void) {
    Seq q;
    seq_create(&q, 21);
    const int nout = 2 * SEQ_M * SEQ_C;
    float direct[2][nout];
    double ref[nout], err = 0.0;
    int bad = 0;
    for (int r = 0; r < 2; r++) {
        seq_input(&q, 100 + r);
        float in[SEQ_N];
        memcpy(in, q.h_in, sizeof in);
        bad += seq_enqueue(&q, 1.5f, 2.0f);
        CK(cudaStreamSynchronize(q.st));
        memcpy(direct[r], q.h_out, sizeof direct[r]);
        seq_ref(&q, in, 1.5f, 2.0f, ref);
        for (int i = 0; i < nout; i++) err = fmax(err, fabs(direct[r][i] - ref[i]));
    }
    check(bad == 0 && err < 1e-5, "the sequence run directly (H2D copy, kernel, memset, D2D copy, cublasGemmEx, "
          "cublasLtMatmul, D2H copies): max error %.1e against the host", err);

    // Poison what the sequence writes, then capture it: it must not run.
    float *outs[] = {q.x, q.y, q.z, q.c, q.d};
    for (float *p : outs) CK(cudaMemset(p, 0xff, SEQ_N * sizeof(float)));
    for (int i = 0; i < nout; i++) q.h_out[i] = 7.0f;
    seq_input(&q, 999);
    int capture_bad;
    cudaGraphExec_t exec = seq_capture(&q, &capture_bad);
    int untouched = 1;
    for (float *p : outs) {
        unsigned int back[SEQ_N];
        CK(cudaMemcpy(back, p, sizeof back, cudaMemcpyDeviceToHost));
        for (unsigned int b : back) untouched &= b == 0xffffffffu;
    }
    for (int i = 0; i < nout; i++) untouched &= q.h_out[i] == 7.0f;
    check(capture_bad == 0 && untouched, "a capture records the sequence and runs none of it (%d calls failed; device "
          "buffers and the pinned output %s)", capture_bad, untouched ? "untouched" : "CHANGED");

    // Replays read the inputs the host has put in place by then.
    int same[2];
    for (int r = 0; r < 2; r++) {
        seq_input(&q, 100 + r);
        CK(cudaGraphLaunch(exec, q.st));
        CK(cudaStreamSynchronize(q.st));
        same[r] = memcmp(q.h_out, direct[r], sizeof direct[r]) == 0;
    }
    check(same[0] && same[1], "two replays with new inputs in the same buffers: bitwise the direct runs' outputs (%s, %s)",
          same[0] ? "same" : "DIFFERENT", same[1] ? "same" : "DIFFERENT");

    cudaStream_t other;
    CK(cudaStreamCreate(&other));
    seq_input(&q, 100);
    CK(cudaGraphLaunch(exec, other));
    CK(cudaStreamSynchronize(other)); // the copies into h_out land with the launch stream's synchronisation
    int same_other = memcmp(q.h_out, direct[0], sizeof direct[0]) == 0;
    // Launched into a capture, the graph becomes part of the new one (a child graph).
    cudaGraph_t outer;
    cudaGraphExec_t outer_exec;
    CK(cudaStreamBeginCapture(other, cudaStreamCaptureModeGlobal));
    CK(cudaGraphLaunch(exec, other));
    CK(cudaStreamEndCapture(other, &outer));
    CK(cudaGraphInstantiate(&outer_exec, outer, 0));
    seq_input(&q, 101);
    CK(cudaGraphLaunch(outer_exec, other));
    CK(cudaStreamSynchronize(other));
    int same_child = memcmp(q.h_out, direct[1], sizeof direct[1]) == 0;
    CK(cudaGraphExecDestroy(outer_exec));
    CK(cudaGraphDestroy(outer));
    cudaError_t destroyed = cudaGraphExecDestroy(exec);
    cudaError_t again = cudaGraphLaunch(exec, q.st);
    check(same_other && same_child && destroyed == cudaSuccess && again == cudaErrorInvalidResourceHandle,
          "a replay on another stream, and of a graph holding it as a child graph, give the same bits (%s, %s); a "
          "destroyed executable graph is refused (%s)", same_other ? "same" : "DIFFERENT",
          same_child ? "same" : "DIFFERENT", cudaGetErrorName(again));
    CK(cudaStreamDestroy(other));
    seq_destroy(&q);
}

// test_emu --graph-profile N (run with EMU_PROFILE=1 by test_graph_profile):
// capture the sequence and replay it N times.
static int graph_profile(int replays) {
    Seq q;
    seq_create(&q, 21);
    seq_input(&q, 100);
    int bad;
    cudaGraphExec_t exec = seq_capture(&q, &bad);
    for (int r = 0; r < replays; r++) {
        CK(cudaGraphLaunch(exec, q.st));
        CK(cudaStreamSynchronize(q.st));
    }
    CK(cudaGraphExecDestroy(exec));
    seq_destroy(&q);
    return bad != 0;
}

// Runs fn(arg) in a child process and returns its wait status; what the
// child wrote to stderr is in buf (size bytes at most, NUL-terminated).
static int run_child(void (*fn)(void *), void *arg, char *buf, size_t size) {
    int fds[2];
    if (pipe(fds) != 0) exit(1);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        fn(arg);
        _exit(0);
    }
    close(fds[1]);
    size_t len = 0;
    ssize_t r;
    while ((r = read(fds[0], buf + len, size - 1 - len)) > 0) len += (size_t)r;
    buf[len] = 0;
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    return status;
}

// In the child: this program again, as `test_emu --graph-profile N` with
// EMU_PROFILE=1 (the profile is set up once per process, so a fork of this
// one would not count).
static void exec_graph_profile(void *replays) {
    if (!freopen("/dev/null", "w", stdout)) _exit(127);
    setenv("EMU_PROFILE", "1", 1);
    char n[16];
    snprintf(n, sizeof n, "%d", *(int *)replays);
    execl("/proc/self/exe", "test_emu", "--graph-profile", n, (char *)NULL);
    _exit(127);
}

// The profile of `test_emu --graph-profile N`: the counts of the graph
// launches, the sequence's kernel, cublasGemmEx, cublasLtMatmul, copies to
// the host and memsets. Returns the child's wait status.
static int graph_profile_counts(int replays, long counts[6]) {
    static const char *names[6] = {"cudaGraphLaunch", "affine_kernel", "cublasGemmEx", "cublasLtMatmul",
                                   "cudaMemcpyAsync to host", "cudaMemset(Async)"};
    static char buf[1 << 14];
    int status = run_child(exec_graph_profile, &replays, buf, sizeof buf);
    // Lines "  <count>  <name>" (kernels: "<name> (<n> threads per launch)").
    for (int i = 0; i < 6; i++) counts[i] = 0;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        long c;
        int at;
        if (sscanf(line, " %ld %n", &c, &at) != 1) continue;
        char *name = line + at, *paren = strstr(name, " (");
        if (paren && strstr(paren, "threads per launch)")) *paren = 0;
        for (int i = 0; i < 6; i++)
            if (strcmp(name, names[i]) == 0) counts[i] = c;
    }
    return status;
}

// EMU_PROFILE counts what replays run -- one graph launch per replay, and
// the sequence's work each time -- and nothing at the capture.
static void test_graph_profile(void) {
    long three[6], none[6];
    int st3 = graph_profile_counts(3, three), st0 = graph_profile_counts(0, none);
    const long want[6] = {3, 3, 3, 3, 6, 3};
    int ok3 = WIFEXITED(st3) && WEXITSTATUS(st3) == 0, ok0 = WIFEXITED(st0) && WEXITSTATUS(st0) == 0;
    for (int i = 0; i < 6; i++) {
        ok3 &= three[i] == want[i];
        ok0 &= none[i] == 0;
    }
    check(ok3 && ok0, "EMU_PROFILE: 3 replays count %ld graph launches, %ld kernel launches, %ld cublasGemmEx, %ld "
          "cublasLtMatmul, %ld copies to the host, %ld memsets (want 3 3 3 3 6 3); the capture alone %ld %ld %ld %ld "
          "%ld %ld (want none)", three[0], three[1], three[2], three[3], three[4], three[5], none[0], none[1], none[2],
          none[3], none[4], none[5]);
}

// A grouped GEMM in a graph: its device pointer arrays are read at each
// replay (here filled by a copy captured before it), its per-group sizes and
// alpha are the capture's.
static void test_graph_grouped(void) {
    const int n = 4;
    cudaStream_t st;
    cublasHandle_t h;
    CK(cudaStreamCreate(&st));
    CK(cublasCreate(&h));
    CK(cublasSetStream(h, st));
    float ones[n * n], twos[n * n], *dA1, *dA2, *dC, *out;
    for (int i = 0; i < n * n; i++) {
        ones[i] = 1.0f;
        twos[i] = 2.0f;
    }
    dA1 = dev_copy(ones, n * n);
    dA2 = dev_copy(twos, n * n);
    CK(cudaMalloc(&dC, sizeof ones));
    CK(cudaMallocHost(&out, sizeof ones));
    const void **hptr, **dptr;
    CK(cudaMallocHost(&hptr, 3 * sizeof(void *)));
    CK(cudaMalloc(&dptr, 3 * sizeof(void *)));
    cublasOperation_t op = CUBLAS_OP_N;
    int dims[1] = {n}, size1[1] = {1};
    float alpha[1] = {1.0f}, beta[1] = {0.0f};
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    CK(cudaMemcpyAsync(dptr, hptr, 3 * sizeof(void *), cudaMemcpyHostToDevice, st));
    cublasStatus_t cs = cublasGemmGroupedBatchedEx(h, &op, &op, dims, dims, dims, alpha, dptr, CUDA_R_32F, dims,
                                                   dptr + 1, CUDA_R_32F, dims, beta, (void *const *)(dptr + 2),
                                                   CUDA_R_32F, dims, 1, size1, CUBLAS_COMPUTE_32F);
    CK(cudaMemcpyAsync(out, dC, sizeof ones, cudaMemcpyDeviceToHost, st));
    CK(cudaStreamEndCapture(st, &g));
    CK(cudaGraphInstantiate(&exec, g, 0));
    dims[0] = 2; // after the capture: the graph keeps 4
    alpha[0] = 10.0f;
    float got[2];
    const void *a_of[2] = {dA1, dA2};
    for (int r = 0; r < 2; r++) {
        hptr[0] = a_of[r];
        hptr[1] = dA1;
        hptr[2] = dC;
        CK(cudaGraphLaunch(exec, st));
        CK(cudaStreamSynchronize(st));
        got[r] = out[n * n - 1];
    }
    check(cs == CUBLAS_STATUS_SUCCESS && got[0] == n && got[1] == 2 * n,
          "cublasGemmGroupedBatchedEx in a graph: pointer arrays read at each replay, sizes and alpha from the capture "
          "(C = %g, then %g with the other A; want %d, %d)", got[0], got[1], n, 2 * n);
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(g));
    cudaFree(dA1);
    cudaFree(dA2);
    cudaFree(dC);
    cudaFree(dptr);
    cudaFreeHost(out);
    cudaFreeHost(hptr);
    cublasDestroy(h);
    CK(cudaStreamDestroy(st));
}

// NCCL in a graph (one rank): the all-reduce and a send/receive group run at
// the replay, not at the capture.
static void test_graph_nccl(void) {
    cudaStream_t st;
    ncclComm_t comm;
    ncclUniqueId id;
    CK(cudaStreamCreate(&st));
    CK(ncclGetUniqueId(&id));
    CK(ncclCommInitRank(&comm, 1, id, 0));
    float h[8], back[2][8];
    for (int i = 0; i < 8; i++) h[i] = (float)(i + 1);
    float *x = dev_copy(h, 8), *y, *z;
    CK(cudaMalloc(&y, sizeof h));
    CK(cudaMalloc(&z, sizeof h));
    CK(cudaMemset(y, 0xff, sizeof h));
    CK(cudaMemset(z, 0xff, sizeof h));
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    ncclResult_t r1 = ncclAllReduce(x, y, 8, ncclFloat32, ncclSum, comm, st);
    ncclResult_t r2 = ncclGroupStart(), r3 = ncclSend(y, 8, ncclFloat32, 0, comm, st),
                 r4 = ncclRecv(z, 8, ncclFloat32, 0, comm, st), r5 = ncclGroupEnd();
    CK(cudaStreamEndCapture(st, &g));
    CK(cudaMemcpy(back[0], z, sizeof h, cudaMemcpyDeviceToHost));
    CK(cudaGraphInstantiate(&exec, g, 0));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(back[1], z, sizeof h, cudaMemcpyDeviceToHost));
    unsigned int poison;
    memcpy(&poison, &back[0][0], 4);
    check(r1 == ncclSuccess && r2 == ncclSuccess && r3 == ncclSuccess && r4 == ncclSuccess && r5 == ncclSuccess &&
              poison == 0xffffffffu && memcmp(back[1], h, sizeof h) == 0,
          "ncclAllReduce and a send/receive group captured: nothing moved at the capture, the replay delivers "
          "(z[7] = %g)", back[1][7]);
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(g));
    CK(ncclCommDestroy(comm));
    cudaFree(x);
    cudaFree(y);
    cudaFree(z);
    CK(cudaStreamDestroy(st));
}

// Events in a capture: a plain record is no node (the host cannot wait for
// it); cudaEventRecordExternal records the event at every replay, and is
// invalid outside a capture.
static void test_graph_events(void) {
    cudaStream_t st;
    cudaEvent_t a, b, plain;
    float *d;
    CK(cudaStreamCreate(&st));
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    CK(cudaEventCreate(&plain));
    CK(cudaMalloc(&d, sizeof(float)));
    cudaError_t outside = cudaEventRecordWithFlags(a, st, cudaEventRecordExternal);
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    CK(cudaEventRecordWithFlags(a, st, cudaEventRecordExternal));
    spin_kernel<<<1, 32, 0, st>>>(d, 2000);
    CK(cudaEventRecordWithFlags(b, st, cudaEventRecordExternal));
    CK(cudaEventRecord(plain, st));
    CK(cudaStreamEndCapture(st, &g));
    float ms = -1.0f;
    cudaError_t before = cudaEventElapsedTime(&ms, a, b); // never recorded yet
    cudaError_t plain_q = cudaEventQuery(plain);
    CK(cudaGraphInstantiate(&exec, g, 0));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaEventSynchronize(b));
    cudaError_t after = cudaEventElapsedTime(&ms, a, b);
    CK(cudaEventRecord(plain, st)); // recorded again outside a capture: usable again
    CK(cudaStreamSynchronize(st));
    cudaError_t plain_again = cudaEventQuery(plain);
    check(outside == cudaErrorInvalidValue && before == cudaErrorInvalidResourceHandle &&
              plain_q == cudaErrorCapturedEvent && after == cudaSuccess && ms >= 0.0f && plain_again == cudaSuccess,
          "events: cudaEventRecordExternal outside a capture %s; its records in a graph happen at the replay (elapsed "
          "%s before, %s and %.3f ms after); a plain record in a capture %s, until recorded again (%s)",
          cudaGetErrorName(outside), cudaGetErrorName(before), cudaGetErrorName(after), ms, cudaGetErrorName(plain_q),
          cudaGetErrorName(plain_again));
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(g));
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    CK(cudaEventDestroy(plain));
    cudaFree(d);
    CK(cudaStreamDestroy(st));
}

// A capture on st (mode) holding one kernel, the refused call's return code
// `got` (want), then: the capture reads as invalidated, further work on it is
// refused, and ending it gives cudaErrorStreamCaptureInvalidated and no graph.
static void expect_invalidated(const char *what, cudaStream_t st, float *d, long got, long want, const char *got_name) {
    cudaStreamCaptureStatus during = cudaStreamCaptureStatusNone, after = cudaStreamCaptureStatusActive;
    CK(cudaStreamIsCapturing(st, &during));
    cudaError_t later = cudaMemsetAsync(d, 0, sizeof(float), st);
    cudaGraph_t g = (cudaGraph_t)d; // any non-NULL value: must come back NULL
    cudaError_t end = cudaStreamEndCapture(st, &g);
    CK(cudaStreamIsCapturing(st, &after));
    check(got == want && during == cudaStreamCaptureStatusInvalidated && later == cudaErrorStreamCaptureInvalidated &&
              end == cudaErrorStreamCaptureInvalidated && g == NULL && after == cudaStreamCaptureStatusNone,
          "%s during a capture: %s; the capture is invalidated (then: work %s, end %s, graph %s)", what, got_name,
          cudaGetErrorName(later), cudaGetErrorName(end), g ? "returned" : "NULL");
}

static void begin_with_kernel(cudaStream_t st, cudaStreamCaptureMode mode, float *d) {
    CK(cudaStreamBeginCapture(st, mode));
    write_kernel<<<1, 1, 0, st>>>(d, 0);
    CK(cudaGetLastError());
}

// Each call a GPU refuses during a capture, with CUDA's return code, and the
// capture it conflicts with invalidated.
static void test_graph_refusals(void) {
    cudaStream_t st;
    cudaEvent_t ev;
    cublasHandle_t legacy_h; // its stream is the legacy default stream
    float *d, *p = NULL, h[4] = {0};
    CK(cudaStreamCreate(&st));
    CK(cudaEventCreate(&ev));
    CK(cublasCreate(&legacy_h));
    CK(cudaMalloc(&d, 64 * sizeof(float)));
    const cudaStreamCaptureMode G = cudaStreamCaptureModeGlobal;
    cudaError_t e;
#define REFUSED(what, call, want)                                 \
    do {                                                          \
        begin_with_kernel(st, G, d);                              \
        e = (call);                                               \
        expect_invalidated(what, st, d, e, want, cudaGetErrorName(e)); \
    } while (0)
    REFUSED("cudaStreamSynchronize of the capturing stream", cudaStreamSynchronize(st), cudaErrorStreamCaptureUnsupported);
    REFUSED("cudaStreamSynchronize of the legacy stream", cudaStreamSynchronize(0), cudaErrorStreamCaptureImplicit);
    REFUSED("cudaDeviceSynchronize", cudaDeviceSynchronize(), cudaErrorStreamCaptureUnsupported);
    REFUSED("cudaEventSynchronize of an event recorded in the capture",
            (cudaEventRecord(ev, st), cudaEventSynchronize(ev)), cudaErrorCapturedEvent);
    REFUSED("cudaEventQuery of an event recorded in the capture", (cudaEventRecord(ev, st), cudaEventQuery(ev)),
            cudaErrorCapturedEvent);
    REFUSED("a synchronous cudaMemcpy", cudaMemcpy(d, h, sizeof h, cudaMemcpyHostToDevice),
            cudaErrorStreamCaptureImplicit);
    REFUSED("a synchronous cudaMemset", cudaMemset(d, 0, 16), cudaErrorStreamCaptureImplicit);
    REFUSED("cudaMalloc (global mode)", cudaMalloc(&p, 64), cudaErrorStreamCaptureUnsupported);
    REFUSED("cudaMallocHost (global mode)", cudaMallocHost(&p, 64), cudaErrorStreamCaptureUnsupported);
    float *spare;
    CK(cudaMalloc(&spare, 64));
    REFUSED("cudaFree (global mode)", cudaFree(spare), cudaErrorStreamCaptureUnsupported);
    CK(cudaFree(spare)); // it was not freed
    REFUSED("a kernel on the legacy stream", (write_kernel<<<1, 1>>>(d, 0), cudaGetLastError()),
            cudaErrorStreamCaptureImplicit);
    REFUSED("cudaMemcpyAsync on the legacy stream", cudaMemcpyAsync(d + 1, d, 4, cudaMemcpyDeviceToDevice, 0),
            cudaErrorStreamCaptureImplicit);
    float one = 1.0f;
    begin_with_kernel(st, G, d);
    cublasStatus_t bs = cublasGemmEx(legacy_h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, d, CUDA_R_32F, 2, d + 4,
                                     CUDA_R_32F, 2, &one, d + 8, CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    expect_invalidated("cublasGemmEx with a handle on the legacy stream", st, d, bs, CUBLAS_STATUS_EXECUTION_FAILED,
                       cublasGetStatusName(bs));
    check(p == NULL, "the refused allocations returned nothing");

    // Modes: ThreadLocal prohibits unsafe calls on the capturing thread;
    // Relaxed (the capture's, or the thread's) allows them.
    begin_with_kernel(st, cudaStreamCaptureModeThreadLocal, d);
    e = cudaMalloc(&p, 64);
    expect_invalidated("cudaMalloc (thread-local mode, same thread)", st, d, e, cudaErrorStreamCaptureUnsupported,
                       cudaGetErrorName(e));
    cudaGraph_t g;
    cudaStreamCaptureStatus s1, s2;
    begin_with_kernel(st, cudaStreamCaptureModeRelaxed, d);
    cudaError_t relaxed = cudaMalloc(&p, 64);
    CK(cudaStreamIsCapturing(st, &s1));
    cudaError_t relaxed_end = cudaStreamEndCapture(st, &g);
    if (relaxed_end == cudaSuccess) CK(cudaGraphDestroy(g));
    if (relaxed == cudaSuccess) CK(cudaFree(p));
    begin_with_kernel(st, G, d);
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    CK(cudaThreadExchangeStreamCaptureMode(&mode));
    cudaError_t thread_relaxed = cudaMalloc(&p, 64);
    CK(cudaThreadExchangeStreamCaptureMode(&mode)); // back to Global
    CK(cudaStreamIsCapturing(st, &s2));
    cudaError_t thread_relaxed_end = cudaStreamEndCapture(st, &g);
    if (thread_relaxed_end == cudaSuccess) CK(cudaGraphDestroy(g));
    if (thread_relaxed == cudaSuccess) CK(cudaFree(p));
    check(relaxed == cudaSuccess && s1 == cudaStreamCaptureStatusActive && relaxed_end == cudaSuccess &&
              thread_relaxed == cudaSuccess && s2 == cudaStreamCaptureStatusActive && thread_relaxed_end == cudaSuccess &&
              mode == cudaStreamCaptureModeRelaxed, // the exchange gives back the mode it replaces
          "cudaMalloc in a relaxed capture (%s, end %s) and from a thread in relaxed mode during a global one (%s, end "
          "%s): allowed, the capture stays valid", cudaGetErrorName(relaxed), cudaGetErrorName(relaxed_end),
          cudaGetErrorName(thread_relaxed), cudaGetErrorName(thread_relaxed_end));

    // Other threads: a global capture prohibits their unsafe calls, a thread-local one does not.
    begin_with_kernel(st, G, d);
    std::thread([&] { e = cudaMalloc(&p, 64); }).join();
    expect_invalidated("cudaMalloc from another thread (global mode)", st, d, e, cudaErrorStreamCaptureUnsupported,
                       cudaGetErrorName(e));
    begin_with_kernel(st, cudaStreamCaptureModeThreadLocal, d);
    std::thread([&] { e = cudaMalloc(&p, 64); }).join();
    CK(cudaStreamIsCapturing(st, &s1));
    cudaError_t tl_end = cudaStreamEndCapture(st, &g);
    if (tl_end == cudaSuccess) CK(cudaGraphDestroy(g));
    if (e == cudaSuccess) CK(cudaFree(p));
    check(e == cudaSuccess && s1 == cudaStreamCaptureStatusActive && tl_end == cudaSuccess,
          "cudaMalloc from another thread during a thread-local capture: allowed (%s), the capture stays valid (end %s)",
          cudaGetErrorName(e), cudaGetErrorName(tl_end));

    // Ending from another thread: refused for a global capture, allowed for a relaxed one.
    begin_with_kernel(st, G, d);
    cudaError_t wrong = cudaSuccess, relaxed_other = cudaSuccess;
    std::thread([&] { wrong = cudaStreamEndCapture(st, &g); }).join();
    cudaError_t own = cudaStreamEndCapture(st, &g);
    if (own == cudaSuccess) CK(cudaGraphDestroy(g));
    begin_with_kernel(st, cudaStreamCaptureModeRelaxed, d);
    std::thread([&] { relaxed_other = cudaStreamEndCapture(st, &g); }).join();
    if (relaxed_other == cudaSuccess) CK(cudaGraphDestroy(g));
    check(wrong == cudaErrorStreamCaptureWrongThread && own == cudaSuccess && relaxed_other == cudaSuccess,
          "cudaStreamEndCapture from another thread: %s for a global capture (its own thread then ends it: %s), %s for "
          "a relaxed one", cudaGetErrorName(wrong), cudaGetErrorName(own), cudaGetErrorName(relaxed_other));

    // Refused without invalidating anything.
    cudaStream_t other;
    CK(cudaStreamCreate(&other));
    cudaError_t legacy = cudaStreamBeginCapture(0, G);
    cudaError_t bad_mode = cudaStreamBeginCapture(st, (cudaStreamCaptureMode)7);
    begin_with_kernel(st, G, d);
    cudaError_t twice = cudaStreamBeginCapture(st, G);
    cudaError_t wrong_stream = cudaStreamEndCapture(other, &g);
    cudaStreamCaptureStatus legacy_status;
    cudaError_t legacy_query = cudaStreamIsCapturing(0, &legacy_status);
    CK(cudaStreamIsCapturing(st, &s1));
    cudaError_t end = cudaStreamEndCapture(st, &g);
    if (end == cudaSuccess) CK(cudaGraphDestroy(g));
    cudaError_t not_capturing = cudaStreamEndCapture(st, &g);
    check(legacy == cudaErrorStreamCaptureUnsupported && bad_mode == cudaErrorInvalidValue &&
              twice == cudaErrorIllegalState && wrong_stream == cudaErrorIllegalState &&
              legacy_query == cudaErrorStreamCaptureImplicit && s1 == cudaStreamCaptureStatusActive && end == cudaSuccess &&
              not_capturing == cudaErrorIllegalState,
          "capturing the legacy stream %s, an unknown mode %s, a stream that captures %s, ending on another stream %s, "
          "asking the legacy stream %s -- the capture stays valid (end %s); ending when not capturing %s",
          cudaGetErrorName(legacy), cudaGetErrorName(bad_mode), cudaGetErrorName(twice), cudaGetErrorName(wrong_stream),
          cudaGetErrorName(legacy_query), cudaGetErrorName(end), cudaGetErrorName(not_capturing));

    // A non-blocking stream's capture: the legacy stream does not wait for it.
    cudaStream_t nb;
    CK(cudaStreamCreateWithFlags(&nb, cudaStreamNonBlocking));
    CK(cudaMemset(d, 0, sizeof(float)));
    begin_with_kernel(nb, G, d + 1);
    write_kernel<<<1, 1>>>(d, 0); // legacy stream: runs now
    cudaError_t nb_launch = cudaGetLastError();
    cudaError_t nb_query = cudaStreamIsCapturing(0, &legacy_status);
    CK(cudaStreamIsCapturing(nb, &s1));
    cudaError_t nb_end = cudaStreamEndCapture(nb, &g);
    if (nb_end == cudaSuccess) CK(cudaGraphDestroy(g));
    float ran = 0.0f;
    CK(cudaMemcpy(&ran, d, sizeof ran, cudaMemcpyDeviceToHost));
    check(nb_launch == cudaSuccess && ran == 1.0f && nb_query == cudaSuccess &&
              legacy_status == cudaStreamCaptureStatusNone && s1 == cudaStreamCaptureStatusActive && nb_end == cudaSuccess,
          "during a cudaStreamNonBlocking capture the legacy stream works (kernel %s, ran: %g; query %s) and the capture "
          "stays valid (end %s)", cudaGetErrorName(nb_launch), ran, cudaGetErrorName(nb_query), cudaGetErrorName(nb_end));
#undef REFUSED
    CK(cudaStreamDestroy(nb));
    CK(cudaStreamDestroy(other));
    CK(cudaEventDestroy(ev));
    cublasDestroy(legacy_h);
    CK(cudaFree(d));
    CK(cudaStreamDestroy(st));
}

// One kernel on st, captured, and its executable graph.
static cudaGraphExec_t one_kernel_graph(cudaStream_t st, float *d) {
    cudaGraph_t g;
    cudaGraphExec_t exec;
    begin_with_kernel(st, cudaStreamCaptureModeGlobal, d);
    cudaStreamEndCapture(st, &g);
    cudaGraphInstantiate(&exec, g, 0);
    return exec;
}

// The replay's copy into pinned memory lands at the launch stream's synchronisation.
static void bug_graph_read_before_sync(void) {
    cudaStream_t st;
    float *d, *h;
    cudaGraph_t g;
    cudaGraphExec_t exec;
    cudaStreamCreate(&st);
    cudaMalloc(&d, 64);
    cudaMemset(d, 0, 64);
    cudaMallocHost(&h, 64);
    cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal);
    cudaMemcpyAsync(h, d, 64, cudaMemcpyDeviceToHost, st);
    cudaStreamEndCapture(st, &g);
    cudaGraphInstantiate(&exec, g, 0);
    printf("%g\n", h[0]); // before any replay: nothing pending, allowed
    cudaGraphLaunch(exec, st);
    printf("%g\n", h[0]); // no cudaStreamSynchronize after the replay
}
// A buffer the graph uses, freed before the replay.
static void bug_graph_freed_buffer(void) {
    cudaStream_t st;
    float *d;
    cudaStreamCreate(&st);
    cudaMalloc(&d, 64);
    cudaGraphExec_t exec = one_kernel_graph(st, d);
    cudaFree(d);
    cudaGraphLaunch(exec, st);
}
static void bug_graph_pageable(void) {
    cudaStream_t st;
    float *d, h[16];
    cudaStreamCreate(&st);
    cudaMalloc(&d, sizeof h);
    cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal);
    cudaMemcpyAsync(d, h, sizeof h, cudaMemcpyHostToDevice, st);
}
// A racy kernel captured: nothing runs at the capture, the replay is checked.
static void bug_graph_race(void) {
    cudaStream_t st;
    cudaGraph_t g;
    cudaGraphExec_t exec;
    unsigned int *d;
    cudaStreamCreate(&st);
    cudaMalloc(&d, 64 * sizeof(unsigned int));
    cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal);
    racy_kernel<<<1, 64, 0, st>>>(d);
    cudaStreamEndCapture(st, &g);
    cudaGraphInstantiate(&exec, g, 0);
    fprintf(stderr, "captured without a report; replaying\n");
    cudaGraphLaunch(exec, st);
}

static void test_graphs(void) {
    test_graph_replay();
    test_graph_profile();
    test_graph_grouped();
    test_graph_nccl();
    test_graph_events();
    test_graph_refusals();
    expect_stop("host reading a pinned buffer a replayed copy fills, before the stream's synchronisation",
                bug_graph_read_before_sync, "before the stream was synchronised");
    expect_stop("a replay using a buffer freed since the capture", bug_graph_freed_buffer, "is a host pointer");
    expect_stop("a captured copy from pageable host memory", bug_graph_pageable,
                "pageable host memory in a stream capture: not emulated");
    if (emu::race_on())
        expect_stop("a racy kernel in a graph, at its replay", bug_graph_race, "data race in kernel racy_kernel");
}

static void call_fn(void *fn) { (*(void (**)(void))fn)(); }

// Runs fn in a child; the child must die and its stderr must contain want.
static void expect_stop(const char *what, void (*fn)(void), const char *want) {
    static char buf[1 << 16];
    int status = run_child(call_fn, &fn, buf, sizeof buf);
    int stopped = !(WIFEXITED(status) && WEXITSTATUS(status) == 0); // exit 0: the emulator missed it
    int named = strstr(buf, want) != NULL;
    check(stopped && named, "stops on %s (\"%s\")", what, want);
    if (!(stopped && named)) fprintf(stderr, "child's stderr:\n%s\n", buf);
}

// ----------------------------------------------------------------------------
// Warp-level matrix instructions and cp.async (emu_mma.cc), against the PTX
// ISA's definitions written out here on their own: each lane fills its
// registers from plain matrices by the ISA's formulas for the fragment
// layouts, and the results are compared with plain loops.

static uint16_t mma_bf16_bits(float f) { return __float2bfloat16_rn(f).x; }

// d (16 x 8) = a (16 x 16) b (16 x 8) + c, through emu::mma_m16n8k16_bf16;
// a, b as bf16 bits, row-major.
__global__ void mma_emu_kernel(float *d, const uint16_t *a, const uint16_t *b, const float *c) {
    int lane = threadIdx.x, g = lane >> 2, t = lane % 4;
    uint32_t ra[4] = {0, 0, 0, 0}, rb[2] = {0, 0};
    float rc[4], rd[4];
    for (int i = 0; i < 8; i++) { // A: row groupID (+ 8 for a2, a3, a6, a7), col 2 t + (i & 1) (+ 8 for i >= 4)
        int row = (i % 4 < 2) ? g : g + 8, col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
        ra[i / 2] |= (uint32_t)a[row * 16 + col] << (16 * (i % 2));
    }
    for (int i = 0; i < 4; i++) { // B: row 2 t + (i & 1) (+ 8 for i >= 2), col groupID
        int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
        rb[i / 2] |= (uint32_t)b[row * 8 + g] << (16 * (i % 2));
    }
    for (int i = 0; i < 4; i++) rc[i] = c[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)];
    emu::mma_m16n8k16_bf16(rd, ra, rb, rc);
    for (int i = 0; i < 4; i++) d[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)] = rd[i];
}

// Lane l of the warp gives row (perm[l % 8] + 8 (l / 8)) of a 32 x 8 matrix of
// 16-bit values in shared memory; out[l * 4 + i] = its register i.
__global__ void ldmatrix_emu_kernel(uint32_t *out, const uint16_t *m, const int *perm, int num, int trans) {
    extern __shared__ uint16_t ldm_smem[];
    for (int i = threadIdx.x; i < 32 * 8; i += 32) ldm_smem[i] = m[i];
    __syncthreads();
    int lane = threadIdx.x;
    uint32_t r[4] = {0, 0, 0, 0};
    emu::ldmatrix_m8n8(r, num, trans, ldm_smem + (perm[lane % 8] + 8 * (lane / 8)) * 8);
    for (int i = 0; i < 4; i++) out[lane * 4 + i] = r[i];
}

// Thread i: 16 bytes of src[i] into the first half of shared memory (group
// 0), then 8 of src[32 + i], zero-filled to 16, into the second (group 1);
// reads each half after the wait that must have landed it.
__global__ void cp_async_emu_kernel(uint32_t *out, const uint32_t *src) {
    extern __shared__ uint32_t cpa_smem[];
    int i = threadIdx.x;
    emu::cp_async(cpa_smem + 4 * i, src + 4 * i, 16, 16);
    emu::cp_async_commit();
    emu::cp_async(cpa_smem + 128 + 4 * i, src + 128 + 4 * i, 16, 8);
    emu::cp_async_commit();
    emu::cp_async_wait(1); // group 0 landed, group 1 may still be in flight
    for (int k = 0; k < 4; k++) {
        emu::smem_read_check(cpa_smem + 4 * i + k, 4);
        out[4 * i + k] = cpa_smem[4 * i + k];
    }
    emu::cp_async_wait(0);
    __syncthreads(); // other threads' copies become visible
    int j = (i + 1) % 32; // a neighbour's data, after the barrier
    for (int k = 0; k < 4; k++) {
        emu::smem_read_check(cpa_smem + 128 + 4 * j + k, 4);
        out[128 + 4 * i + k] = cpa_smem[128 + 4 * j + k];
    }
}

static void test_mma_instructions(void) {
    unsigned int seed = 3;
    uint16_t a[256], b[128];
    float af[256], bf[128], c[128], d[128];
    for (int i = 0; i < 256; i++) af[i] = (float)(int)(frand(&seed) * 16.0f), a[i] = mma_bf16_bits(af[i]);
    for (int i = 0; i < 128; i++) bf[i] = (float)(int)(frand(&seed) * 16.0f), b[i] = mma_bf16_bits(bf[i]);
    for (int i = 0; i < 128; i++) c[i] = (float)(int)(frand(&seed) * 64.0f);
    uint16_t *da, *db;
    float *dc, *dd;
    CK(cudaMalloc(&da, sizeof a));
    CK(cudaMalloc(&db, sizeof b));
    CK(cudaMalloc(&dc, sizeof c));
    CK(cudaMalloc(&dd, sizeof d));
    CK(cudaMemcpy(da, a, sizeof a, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, b, sizeof b, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dc, c, sizeof c, cudaMemcpyHostToDevice));
    mma_emu_kernel<<<1, 32>>>(dd, da, db, dc);
    CK(cudaMemcpy(d, dd, sizeof d, cudaMemcpyDeviceToHost));
    double err = 0;
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 8; n++) {
            double s = c[r * 8 + n];
            for (int k = 0; k < 16; k++) s += (double)af[r * 16 + k] * bf[k * 8 + n];
            err = fmax(err, fabs(s - d[r * 8 + n]));
        }
    check(err == 0, "mma.sync.m16n8k16 bf16 (fragments filled by the ISA's layout formulas) equals A B + C: max "
          "error %g (small integers: exact)", err);

    uint16_t m[256];
    int perm[8] = {3, 0, 7, 5, 1, 6, 2, 4}, *dperm;
    for (int i = 0; i < 256; i++) m[i] = (uint16_t)(1000 + i);
    uint16_t *dm;
    uint32_t *dout, got[128];
    CK(cudaMalloc(&dm, sizeof m));
    CK(cudaMalloc(&dperm, sizeof perm));
    CK(cudaMalloc(&dout, sizeof got));
    CK(cudaMemcpy(dm, m, sizeof m, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dperm, perm, sizeof perm, cudaMemcpyHostToDevice));
    int bad = 0;
    for (int num = 1; num <= 4; num *= 2)
        for (int trans = 0; trans < 2; trans++) {
            ldmatrix_emu_kernel<<<1, 32, sizeof m>>>(dout, dm, dperm, num, trans);
            CK(cudaMemcpy(got, dout, sizeof got, cudaMemcpyDeviceToHost));
            for (int l = 0; l < 32; l++)
                for (int i = 0; i < num; i++) {
                    // element (row, col) of matrix i = the row lane 8 i + row gave
                    int g = l / 4, t = l % 4;
                    int r0 = trans ? 2 * t : g, c0 = trans ? g : 2 * t, r1 = trans ? 2 * t + 1 : g,
                        c1 = trans ? g : 2 * t + 1;
                    uint32_t want = (uint32_t)m[(perm[r0] + 8 * i) * 8 + c0] |
                                    (uint32_t)m[(perm[r1] + 8 * i) * 8 + c1] << 16;
                    bad += got[l * 4 + i] != want;
                }
        }
    check(bad == 0, "ldmatrix .x1 .x2 .x4, plain and .trans: every lane's registers as the ISA defines them (%d wrong)",
          bad);

    uint32_t src[256], out[256];
    for (int i = 0; i < 256; i++) src[i] = 0x01000000u + (uint32_t)i;
    uint32_t *dsrc, *dres;
    CK(cudaMalloc(&dsrc, sizeof src));
    CK(cudaMalloc(&dres, sizeof out));
    CK(cudaMemcpy(dsrc, src, sizeof src, cudaMemcpyHostToDevice));
    cp_async_emu_kernel<<<1, 32, 256 * sizeof(uint32_t)>>>(dres, dsrc);
    CK(cudaMemcpy(out, dres, sizeof out, cudaMemcpyDeviceToHost));
    bad = 0;
    for (int i = 0; i < 32; i++)
        for (int k = 0; k < 4; k++) {
            int j = (i + 1) % 32;
            bad += out[4 * i + k] != src[4 * i + k];
            bad += out[128 + 4 * i + k] != (k < 2 ? src[128 + 4 * j + k] : 0u);
        }
    check(bad == 0, "cp.async: wait_group 1 lands the older group, wait_group 0 the newer; src-size 8 of 16 "
          "zero-fills; visible to other threads after __syncthreads (%d wrong words)", bad);
    cudaFree(da);
    cudaFree(db);
    cudaFree(dc);
    cudaFree(dd);
    cudaFree(dm);
    cudaFree(dperm);
    cudaFree(dout);
    cudaFree(dsrc);
    cudaFree(dres);
}

// The bugs the emulator must stop on.
__global__ void cp_async_bug_kernel(const uint32_t *src, int bug) {
    extern __shared__ uint32_t cpb_smem[];
    int i = threadIdx.x;
    if (bug == 0) { // reads its destination before waiting
        emu::cp_async(cpb_smem + 4 * i, src + 4 * i, 16, 16);
        emu::cp_async_commit();
        emu::smem_read_check(cpb_smem + 4 * i, 4);
    } else if (bug == 1) { // waits, but reads the other warp's copy with no __syncthreads
        emu::cp_async(cpb_smem + 4 * i, src + 4 * i, 16, 16);
        emu::cp_async_commit();
        emu::cp_async_wait(0);
        __syncwarp(); // orders this warp only
        emu::smem_read_check(cpb_smem + 4 * ((i + 32) % 64), 4);
    } else if (bug == 2) { // an ldmatrix of rows whose copies are in flight
        emu::cp_async(cpb_smem + 4 * i, src + 4 * i, 16, 16);
        emu::cp_async_commit();
        uint32_t r[4];
        emu::ldmatrix_m8n8(r, 4, 0, cpb_smem + 4 * i);
    } else if (bug == 3) { // a copy to global memory
        emu::cp_async((void *)(src + 4 * i), src + 4 * i, 16, 16);
    } else if (bug == 4) { // an ldmatrix row address off by 4 bytes
        uint32_t r[4];
        emu::ldmatrix_m8n8(r, 4, 0, cpb_smem + 4 * i + 1);
    } else if (bug == 5) { // mma with half the warp gone
        if (i >= 16) return;
        uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
        float c[4] = {0, 0, 0, 0};
        emu::mma_m16n8k16_bf16(c, a, b, c);
    } else if (bug == 8) { // half the warp at a shuffle, half at an mma.sync
        uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
        float c[4] = {0, 0, 0, 0};
        if (i % 32 < 16)
            c[0] = __shfl_xor_sync(0xffffffffu, c[0], 1);
        else
            emu::mma_m16n8k16_bf16(c, a, b, c);
    } else if (bug == 6) { // race build: warp 0's ldmatrix reads the rows warp 1 writes, with no __syncthreads
        if (i >= 32) {
            for (int k = 0; k < 4; k++) cpb_smem[4 * i + k] = (uint32_t)k;
        } else {
            uint32_t r[4];
            emu::ldmatrix_m8n8(r, 4, 0, cpb_smem + 4 * (i + 32));
        }
    } else if (bug == 7) { // race build: warp 0's cp.async overwrites what warp 1 reads, with no __syncthreads
        if (i >= 32) {
            volatile uint32_t x = cpb_smem[4 * (i - 32)];
            (void)x;
        } else {
            emu::cp_async(cpb_smem + 4 * i, src + 4 * i, 16, 16);
            emu::cp_async_commit();
            emu::cp_async_wait(0);
        }
    }
}

static void cp_async_bug(int bug) {
    uint32_t *d;
    cudaMalloc(&d, 1024);
    cudaMemset(d, 0, 1024);
    cp_async_bug_kernel<<<1, 64, 1024>>>(d, bug); // 2 warps
}
static void bug_cp_async_read_early(void) { cp_async_bug(0); }
static void bug_cp_async_no_barrier(void) { cp_async_bug(1); }
static void bug_ldmatrix_in_flight(void) { cp_async_bug(2); }
static void bug_cp_async_to_global(void) { cp_async_bug(3); }
static void bug_ldmatrix_unaligned(void) { cp_async_bug(4); }
static void bug_mma_half_warp(void) { cp_async_bug(5); }
static void bug_mma_shuffle_mixed(void) { cp_async_bug(8); }
static void bug_ldmatrix_race(void) { cp_async_bug(6); }
static void bug_cp_async_race(void) { cp_async_bug(7); }

static void test_mma_detection(void) {
    expect_stop("a read of a cp.async destination before cp.async.wait_group", bug_cp_async_read_early,
                "has not landed: cp.async.wait_group is missing");
    expect_stop("a read of another warp's cp.async with no __syncthreads after its wait", bug_cp_async_no_barrier,
                "with no __syncthreads since");
    expect_stop("an ldmatrix of rows whose cp.async is in flight", bug_ldmatrix_in_flight, "ldmatrix by thread");
    expect_stop("a cp.async into global memory", bug_cp_async_to_global, "is not shared memory");
    expect_stop("an ldmatrix row address not 16-byte aligned", bug_ldmatrix_unaligned, "is not 16-byte aligned");
    expect_stop("an mma.sync with half the warp exited", bug_mma_half_warp, "needs all 32 lanes");
    expect_stop("half a warp at an mma.sync, half at a shuffle", bug_mma_shuffle_mixed,
                "a warp-wide instruction (mma.sync, ldmatrix) and a shuffle mixed in one warp");
    // Plain stores read by an ldmatrix, and a plain load overwritten by a
    // cp.async: no copy is in flight, so only the race build sees them.
    if (emu::race_on()) {
        expect_stop("an ldmatrix of rows another warp writes, with no __syncthreads", bug_ldmatrix_race,
                    "data race in kernel cp_async_bug_kernel");
        expect_stop("a cp.async into bytes another warp reads, with no __syncthreads", bug_cp_async_race,
                    "data race in kernel cp_async_bug_kernel");
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--graph-profile") == 0) return graph_profile(atoi(argv[2]));
    printf("CUDA emulator self-test\n");
    test_kernels();
    test_gemm();
    test_lt();
    test_gemm_types();
    expect_stop("host code writing device memory", bug_host_deref, "host code dereferenced device memory");
    expect_stop("a kernel writing into the guard page", bug_guard_page, "at byte offset 4096 of device allocation");
    expect_stop("a kernel writing into the slack after 100 bytes", bug_slack, "out-of-bounds write at byte offset 100");
    expect_stop("a host pointer as kernel argument", bug_host_pointer_arg, "is a host pointer");
    expect_stop("half a warp at __syncthreads, half at __syncwarp", bug_diverged_sync, "deadlock");
    expect_stop("a shuffle from an exited lane", bug_exited_lane, "has exited");
    expect_stop("cudaMemcpyHostToDevice from device to host memory", bug_copy_kind, "cudaMemcpyHostToDevice");
    expect_stop("a GEMM on host matrices", bug_gemm_host, "is not device memory");
    expect_stop("a kernel on freed memory", bug_use_after_free, "is a host pointer");
    expect_stop("an fp64 GEMM (listed by cuBLAS, not emulated)", bug_gemm_fp64, "supported by cuBLAS but not emulated");
    test_warp_masks();
    test_barrier_misuse();
    test_race_detection();
    test_async();
    test_mma_instructions();
    test_mma_detection();
    expect_stop("host reading a pinned buffer a pending copy fills", bug_read_before_sync,
                "before the stream was synchronised");
    expect_stop("host writing a pinned buffer a pending copy reads", bug_write_before_sync,
                "before the stream was synchronised");
    test_events();
    expect_stop("host reading a copy enqueued after the event it synchronised with", bug_read_after_event,
                "before the stream was synchronised");
    test_graphs();
    return check_summary("test_emu");
}
