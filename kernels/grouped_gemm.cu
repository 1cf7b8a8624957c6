// Grouped expert GEMMs (see grouped_gemm.cuh).
#include "grouped_gemm.cuh"

#include <string.h>

#include "mma.cuh"

void grouped_gemm_free(GroupedGemm *gg) {
    if (gg->h_ptrs) CUDA_CHECK(cudaFreeHost(gg->h_ptrs));
    if (gg->d_ptrs) CUDA_CHECK(cudaFree(gg->d_ptrs));
    free(gg->ta);
    free(gg->tb);
    free(gg->m);
    free(gg->n);
    free(gg->k);
    free(gg->lda);
    free(gg->ldb);
    free(gg->ldc);
    free(gg->gsize);
    free(gg->alpha);
    free(gg->beta);
    memset(gg, 0, sizeof *gg);
}

// Runs groups 0..ng-1 as described by gg's host arrays and the pointer region
// of `slot`, with one output type. use_grouped picks the path. Returns the
// cuBLAS status (the callers of the real work check it; the probe reads it).
static cublasStatus_t grouped_launch(GroupedGemm *gg, int slot, int ng, cudaDataType_t ctype, int use_grouped) {
    const void **hA = gg->h_ptrs + (size_t)slot * 3 * gg->E, **hB = hA + gg->E, **hC = hA + 2 * gg->E;
    if (use_grouped) {
        const void **dA = gg->d_ptrs + (size_t)slot * 3 * gg->E, **dB = dA + gg->E, **dC = dA + 2 * gg->E;
        CUDA_CHECK(cudaMemcpyAsync(dA, hA, sizeof(void *) * 3 * gg->E, cudaMemcpyHostToDevice, gg->stream));
        return cublasGemmGroupedBatchedEx(gg->handle, gg->ta, gg->tb, gg->m, gg->n, gg->k, gg->alpha,
                                          (const void *const *)dA, CUDA_R_FLOATX, gg->lda, (const void *const *)dB,
                                          CUDA_R_FLOATX, gg->ldb, gg->beta, (void *const *)dC, ctype, gg->ldc, ng,
                                          gg->gsize, CUBLAS_COMPUTE_32F);
    }
    for (int g = 0; g < ng; g++) {
        cublasStatus_t st = cublasGemmEx(gg->handle, gg->ta[g], gg->tb[g], gg->m[g], gg->n[g], gg->k[g], &gg->alpha[g],
                                         hA[g], CUDA_R_FLOATX, gg->lda[g], hB[g], CUDA_R_FLOATX, gg->ldb[g],
                                         &gg->beta[g], (void *)hC[g], ctype, gg->ldc[g], CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS) return st;
    }
    return CUBLAS_STATUS_SUCCESS;
}

// Sets group g's shapes (column-major, as cublasGemmEx takes them) and pointers.
static void grouped_set(GroupedGemm *gg, int slot, int g, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                        int k, const void *A, int lda, const void *B, int ldb, void *C, int ldc, float beta) {
    const void **hA = gg->h_ptrs + (size_t)slot * 3 * gg->E;
    gg->ta[g] = ta;
    gg->tb[g] = tb;
    gg->m[g] = m;
    gg->n[g] = n;
    gg->k[g] = k;
    gg->lda[g] = lda;
    gg->ldb[g] = ldb;
    gg->ldc[g] = ldc;
    gg->gsize[g] = 1;
    gg->alpha[g] = 1.0f;
    gg->beta[g] = beta;
    hA[g] = A;
    hA[gg->E + g] = B;
    hA[2 * gg->E + g] = C;
}

static void grouped_check_slot(const GroupedGemm *gg, int slot) {
    ASSERT(slot >= 0 && slot < gg->n_slots, "grouped GEMM slot %d outside 0..%d", slot, gg->n_slots - 1);
}

// The index of gg->grouped for an output type.
static int grouped_kind(cudaDataType_t ctype) { return ctype == CUDA_R_FLOATX ? 0 : 1; }

void grouped_matmul_forward(GroupedGemm *gg, int slot, floatX *out, const floatX *inp, const floatX *W,
                            const int *offsets, int IC, int OC) {
    grouped_check_slot(gg, slot);
    int ng = 0;
    for (int e = 0; e < gg->n_experts; e++) {
        int r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        // Column-major: out_e^T (OC, n) = W_e (OC, IC) [stored (IC, OC), transposed] @ inp_e^T (IC, n).
        grouped_set(gg, slot, ng++, CUBLAS_OP_T, CUBLAS_OP_N, OC, n, IC, W + (int64_t)e * OC * IC, IC,
                    inp + (int64_t)r0 * IC, IC, out + (int64_t)r0 * OC, OC, 0.0f);
    }
    if (ng > 0) CUBLAS_CHECK(grouped_launch(gg, slot, ng, CUDA_R_FLOATX, gg->grouped[grouped_kind(CUDA_R_FLOATX)]));
}

void grouped_matmul_backward_input(GroupedGemm *gg, int slot, floatX *dinp, const floatX *dout, const floatX *W,
                                   const int *offsets, int IC, int OC) {
    grouped_check_slot(gg, slot);
    int ng = 0;
    for (int e = 0; e < gg->n_experts; e++) {
        int r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        // Column-major: dinp_e^T (IC, n) = W_e^T (IC, OC) [W_e as stored] @ dout_e^T (OC, n).
        grouped_set(gg, slot, ng++, CUBLAS_OP_N, CUBLAS_OP_N, IC, n, OC, W + (int64_t)e * OC * IC, IC,
                    dout + (int64_t)r0 * OC, OC, dinp + (int64_t)r0 * IC, IC, 0.0f);
    }
    if (ng > 0) CUBLAS_CHECK(grouped_launch(gg, slot, ng, CUDA_R_FLOATX, gg->grouped[grouped_kind(CUDA_R_FLOATX)]));
}

void grouped_matmul_backward_weight(GroupedGemm *gg, int slot, float *dW, const floatX *dout, const floatX *inp,
                                    const int *offsets, int IC, int OC) {
    grouped_check_slot(gg, slot);
    int ng = 0;
    for (int e = 0; e < gg->n_experts; e++) {
        int r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        // Column-major: dW_e^T (IC, OC) += inp_e^T (IC, n) @ dout_e (n, OC) [stored (OC, n), transposed].
        grouped_set(gg, slot, ng++, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, n, inp + (int64_t)r0 * IC, IC,
                    dout + (int64_t)r0 * OC, OC, dW + (int64_t)e * OC * IC, IC, 1.0f);
    }
    if (ng > 0) CUBLAS_CHECK(grouped_launch(gg, slot, ng, CUDA_R_32F, gg->grouped[grouped_kind(CUDA_R_32F)]));
}

// ----------------------------------------------------------------------------
// Probe: two groups of the forward shape (different row counts), inputs in
// {-1, 0, 1} so every result is a small exact integer in any precision; the
// grouped call must succeed and give exactly the per-group results.

static __global__ void grouped_probe_fill_kernel(floatX *x, int n, int seed) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = to_x((float)(((i * 7 + seed * 13) % 3) - 1));
}

static void grouped_probe(GroupedGemm *gg, int kind) {
    const int IC = 24, OC = 32, rows[2] = { 16, 40 }, R = 56;
    cudaDataType_t ctype = kind == 0 ? CUDA_R_FLOATX : CUDA_R_32F;
    size_t csize = kind == 0 ? sizeof(floatX) : sizeof(float);
    floatX *W, *inp;
    void *out_g, *out_l;
    CUDA_CHECK(cudaMalloc(&W, sizeof(floatX) * 2 * OC * IC));
    CUDA_CHECK(cudaMalloc(&inp, sizeof(floatX) * R * IC));
    CUDA_CHECK(cudaMalloc(&out_g, csize * R * OC));
    CUDA_CHECK(cudaMalloc(&out_l, csize * R * OC));
    grouped_probe_fill_kernel<<<cdiv_u(2 * OC * IC, 256), 256, 0, gg->stream>>>(W, 2 * OC * IC, 1);
    KERNEL_CHECK();
    grouped_probe_fill_kernel<<<cdiv_u(R * IC, 256), 256, 0, gg->stream>>>(inp, R * IC, 2);
    KERNEL_CHECK();
    void *outs[2] = { out_g, out_l };
    cublasStatus_t st[2];
    for (int path = 0; path < 2; path++) {
        int r0 = 0;
        for (int g = 0; g < 2; g++) {
            grouped_set(gg, 0, g, CUBLAS_OP_T, CUBLAS_OP_N, OC, rows[g], IC, W + (int64_t)g * OC * IC, IC,
                        inp + (int64_t)r0 * IC, IC, (char *)outs[path] + csize * r0 * OC, OC, 0.0f);
            r0 += rows[g];
        }
        st[path] = grouped_launch(gg, 0, 2, ctype, path == 0);
        CUDA_CHECK(cudaStreamSynchronize(gg->stream));
    }
    int ok = st[0] == CUBLAS_STATUS_SUCCESS && st[1] == CUBLAS_STATUS_SUCCESS;
    if (ok) {
        unsigned char *a = (unsigned char *)malloc(csize * R * OC), *b = (unsigned char *)malloc(csize * R * OC);
        CUDA_CHECK(cudaMemcpy(a, out_g, csize * R * OC, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(b, out_l, csize * R * OC, cudaMemcpyDeviceToHost));
        ok = memcmp(a, b, csize * R * OC) == 0;
        free(a);
        free(b);
        if (!ok) fprintf(stderr, "warning: grouped GEMM probe: cublasGemmGroupedBatchedEx gave different results\n");
    } else if (st[1] != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "error: grouped GEMM probe: cublasGemmEx failed: %s\n", cublasGetStatusName(st[1]));
        exit(1);
    } else {
        fprintf(stderr, "note: cublasGemmGroupedBatchedEx with C %s: %s\n", kind == 0 ? FLOATX_NAME : "fp32",
                cublasGetStatusName(st[0]));
    }
    gg->grouped[kind] = ok;
    CUDA_CHECK(cudaFree(W));
    CUDA_CHECK(cudaFree(inp));
    CUDA_CHECK(cudaFree(out_g));
    CUDA_CHECK(cudaFree(out_l));
}

size_t grouped_gemm_device_bytes(int E, int n_slots) {
    // The same sizes as grouped_gemm_init: 3 pointers per group per call site.
    return sizeof(void *) * (size_t)(n_slots > 1 ? n_slots : 1) * 3 * (E > 2 ? E : 2);
}

void grouped_gemm_init(GroupedGemm *gg, cublasHandle_t handle, cudaStream_t stream, int E, int n_slots) {
    memset(gg, 0, sizeof *gg);
    gg->handle = handle;
    gg->stream = stream;
    gg->n_experts = E;
    gg->E = E > 2 ? E : 2; // the probe uses two groups
    gg->n_slots = n_slots > 1 ? n_slots : 1;
    size_t np = (size_t)gg->n_slots * 3 * gg->E;
    CUDA_CHECK(cudaMallocHost((void **)&gg->h_ptrs, sizeof(void *) * np));
    memset(gg->h_ptrs, 0, sizeof(void *) * np);
    CUDA_CHECK(cudaMalloc((void **)&gg->d_ptrs, sizeof(void *) * np));
    size_t n = (size_t)gg->E;
    gg->ta = (cublasOperation_t *)malloc(sizeof(cublasOperation_t) * n);
    gg->tb = (cublasOperation_t *)malloc(sizeof(cublasOperation_t) * n);
    gg->m = (int *)malloc(sizeof(int) * n);
    gg->n = (int *)malloc(sizeof(int) * n);
    gg->k = (int *)malloc(sizeof(int) * n);
    gg->lda = (int *)malloc(sizeof(int) * n);
    gg->ldb = (int *)malloc(sizeof(int) * n);
    gg->ldc = (int *)malloc(sizeof(int) * n);
    gg->gsize = (int *)malloc(sizeof(int) * n);
    gg->alpha = (float *)malloc(sizeof(float) * n);
    gg->beta = (float *)malloc(sizeof(float) * n);
    if (!gg->ta || !gg->tb || !gg->m || !gg->n || !gg->k || !gg->lda || !gg->ldb || !gg->ldc || !gg->gsize ||
        !gg->alpha || !gg->beta) {
        fprintf(stderr, "error: out of host memory for the grouped GEMM arguments\n");
        exit(1);
    }
    const char *env = getenv("MOE_GROUPED_GEMM");
    if (env && strcmp(env, "0") == 0) {
        gg->grouped[0] = gg->grouped[1] = 0;
        printf("expert GEMMs: per-expert cublasGemmEx (MOE_GROUPED_GEMM=0)\n");
        return;
    }
    grouped_probe(gg, 0);
    grouped_probe(gg, 1);
    printf("expert GEMMs: C %s via %s; C fp32 (weight gradients) via %s\n", FLOATX_NAME,
           gg->grouped[0] ? "cublasGemmGroupedBatchedEx" : "per-expert cublasGemmEx",
           gg->grouped[1] ? "cublasGemmGroupedBatchedEx" : "per-expert cublasGemmEx");
}

// ----------------------------------------------------------------------------
// The device path: offsets on the device, tensor cores (kernels/mma.cuh)
//
// A block of GG_WARPS warps computes a GG_M x GG_N output tile, each warp
// 16 of its rows across all GG_N columns, stepping through the reduction
// GG_K at a time with two shared-memory stages: the next step's tiles are in
// flight (cp.async) while this step's are multiplied. Tiles past a matrix's
// edge are zero-filled, so partial tiles need no other case.

#define GG_M 64
#define GG_N 64
#define GG_K 32
#define GG_WARPS (GG_M / 16)
#define GG_THREADS (GG_WARPS * 32)

// One shared-memory stage: the A tile and the B tile of one reduction step.
#define GG_STAGE (GG_M * GG_K + GG_N * GG_K)

// Writes the warp's 16 x GG_N accumulators to dst (row r at dst + r * ld),
// rows [r0, r0 + 16) of which the first `rows` exist and columns [c0, c0 +
// GG_N) of which the first `cols`; ADD: dst (fp32) += acc, else dst = acc
// rounded to the output type.
template <bool ADD, class T>
__device__ __forceinline__ void grouped_store(T *dst, int64_t ld, const FragC *acc, int r0, int rows, int c0,
                                              int cols) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    UNROLL
    for (int n = 0; n < GG_N / 8; n++)
        UNROLL
        for (int i = 0; i < 4; i++) {
            int r = g + 8 * (i >> 1), c = 8 * n + 2 * t + (i & 1);
            if (r >= rows || c >= cols) continue;
            T *p = dst + (int64_t)(r0 + r) * ld + c0 + c;
            if constexpr (ADD)
                *p = *p + acc[n].x[i];
            else
                *p = to_x(acc[n].x[i]);
        }
}

// One reduction step of the m-grouped product into `stage`, as one
// cp.async group: A = columns [k0, k0 + GG_K) of the block's `rows` rows of
// xa (rows, K); B = the same k range of the columns [n0, n0 + cols) of the
// output in We, stored (N, K), or (K, N) when W_KM.
template <bool W_KM>
__device__ __forceinline__ void grouped_mgemm_load(floatX *stage, const floatX *xa, const floatX *We, int k0, int K,
                                                   int N, int n0, int rows, int cols) {
    int kv = min(GG_K, K - k0);
    tile_load_async<GG_M, GG_K>(stage, xa + k0, K, rows, kv);
    if (W_KM)
        tile_load_async<GG_K, GG_N>(stage + GG_M * GG_K, We + (int64_t)k0 * N + n0, N, kv, cols);
    else
        tile_load_async<GG_N, GG_K>(stage + GG_M * GG_K, We + (int64_t)n0 * K + k0, K, cols, kv);
    cp_async_commit();
}

// One reduction step of the k-grouped product into `stage`, as one cp.async
// group: rows [k0, k0 + GG_K) of the expert's n_e rows, of dya (columns m0 ..
// m0 + mv of dY, row width M) and of xa (columns n0 .. n0 + nv of X, width N).
__device__ __forceinline__ void grouped_kgemm_load(floatX *stage, const floatX *dya, const floatX *xa, int k0, int n_e,
                                                   int M, int N, int mv, int nv) {
    int kv = min(GG_K, n_e - k0);
    tile_load_async<GG_K, GG_M>(stage, dya + (int64_t)k0 * M, M, kv, mv);
    tile_load_async<GG_K, GG_N>(stage + GG_K * GG_M, xa + (int64_t)k0 * N, N, kv, nv);
    cp_async_commit();
}

// m-grouped: out (rows, N) = x (rows, K) W_e^T row by row, expert e's rows
// against its own weights, W_e (N, K) (forward) or, W_KM, W_e (K, N) (the
// input gradient: out = dY W_e). Grid (cdiv(rows, GG_M) + E, cdiv(N, GG_N)).
template <bool W_KM>
__global__ void __launch_bounds__(GG_THREADS)
    grouped_mgemm_kernel(floatX *out, const floatX *x, const floatX *W, const int *offsets, int E, int K, int N) {
    extern __shared__ uint4 grouped_m_smem[];
    floatX *smem = (floatX *)grouped_m_smem; // (2, GG_STAGE): A (GG_M, GG_K), B (GG_N, GG_K) or (GG_K, GG_N)

    // This block's tile: the j-th over the experts' segments in order, each
    // segment cdiv(n_e, GG_M) tiles. Every thread walks the offsets (E + 1
    // ints, the same for all: broadcast reads) so no barrier is needed.
    int j = blockIdx.x, e = 0, r0 = 0, rows = 0;
    for (; e < E; e++) {
        int a = offsets[e], n_e = offsets[e + 1] - a, tiles = (n_e + GG_M - 1) / GG_M;
        if (j < tiles) {
            r0 = a + j * GG_M;
            rows = min(GG_M, n_e - j * GG_M);
            break;
        }
        j -= tiles;
    }
    if (e == E) return; // past the last tile (uniform over the block)
    const int n0 = blockIdx.y * GG_N, cols = min(GG_N, N - n0), warp = threadIdx.x >> 5;
    const floatX *xa = x + (int64_t)r0 * K;  // (rows, K)
    const floatX *We = W + (int64_t)e * N * K; // (N, K) or (K, N)

    FragC acc[GG_N / 8];
    frag_zero(acc, GG_N / 8);
    const int nk = (K + GG_K - 1) / GG_K;
    grouped_mgemm_load<W_KM>(smem, xa, We, 0, K, N, n0, rows, cols);
    for (int kt = 0; kt < nk; kt++) {
        floatX *cur = smem + (kt & 1) * GG_STAGE;
        if (kt + 1 < nk) { // the next step's tiles into the other stage, then wait for this one's
            grouped_mgemm_load<W_KM>(smem + ((kt + 1) & 1) * GG_STAGE, xa, We, (kt + 1) * GG_K, K, N, n0, rows, cols);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads(); // this stage's tiles visible to every warp
        warp_gemm_acc<GG_N, GG_K, GG_K, W_KM ? GG_N : GG_K, false, W_KM>(acc, cur, 16 * warp, cur + GG_M * GG_K);
        __syncthreads(); // every warp done with this stage before the next step refills it
    }
    grouped_store<false>(out, N, acc, r0 + 16 * warp, rows - 16 * warp, n0, cols);
}

// k-grouped: dW_e (M, N) += dY_e^T (M, rows_e) X_e (rows_e, N), the rows of
// expert e the reduction. Grid (cdiv(N, GG_N), cdiv(M, GG_M), E); an expert
// without rows leaves its gradient as it is.
__global__ void __launch_bounds__(GG_THREADS)
    grouped_kgemm_kernel(float *dW, const floatX *dy, const floatX *x, const int *offsets, int M, int N) {
    extern __shared__ uint4 grouped_k_smem[];
    floatX *smem = (floatX *)grouped_k_smem; // (2, GG_STAGE): A (GG_K, GG_M) and B (GG_K, GG_N), both k-major
    const int e = blockIdx.z, r0 = offsets[e], n_e = offsets[e + 1] - r0;
    if (n_e <= 0) return;
    const int m0 = blockIdx.y * GG_M, n0 = blockIdx.x * GG_N, warp = threadIdx.x >> 5;
    const int mv = min(GG_M, M - m0), nv = min(GG_N, N - n0);
    const floatX *dya = dy + (int64_t)r0 * M + m0, *xa = x + (int64_t)r0 * N + n0; // row 0 of the expert's segment

    FragC acc[GG_N / 8];
    frag_zero(acc, GG_N / 8);
    const int nk = (n_e + GG_K - 1) / GG_K;
    grouped_kgemm_load(smem, dya, xa, 0, n_e, M, N, mv, nv);
    for (int kt = 0; kt < nk; kt++) {
        floatX *cur = smem + (kt & 1) * GG_STAGE;
        if (kt + 1 < nk) {
            grouped_kgemm_load(smem + ((kt + 1) & 1) * GG_STAGE, dya, xa, (kt + 1) * GG_K, n_e, M, N, mv, nv);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        warp_gemm_acc<GG_N, GG_K, GG_M, GG_N, true, true>(acc, cur, 16 * warp, cur + GG_K * GG_M);
        __syncthreads();
    }
    grouped_store<true>(dW + (int64_t)e * M * N, N, acc, m0 + 16 * warp, mv - 16 * warp, n0, nv);
}

int grouped_dev_supported(int IC, int OC) { return IC > 0 && OC > 0 && IC % 8 == 0 && OC % 8 == 0; }

// The shapes and pointers every launch needs: whole 16-byte chunks per row.
static void grouped_dev_check(const char *what, int IC, int OC, const void *a, const void *b) {
    if (!grouped_dev_supported(IC, OC))
        FATAL("grouped GEMM (device path, %s): the sizes %d x %d must be multiples of 8", what, OC, IC);
    if (((uintptr_t)a | (uintptr_t)b) % 16 != 0)
        FATAL("grouped GEMM (device path, %s): inputs not 16-byte aligned", what);
}

static void grouped_mgemm_launch(floatX *out, const floatX *x, const floatX *W, int w_kmajor, const int *offsets,
                                 int E, int rows, int K, int N, cudaStream_t st) {
    if (rows <= 0 || E <= 0) return;
    // Tiles over the segments: sum_e cdiv(n_e, GG_M) < rows / GG_M + (experts with rows).
    dim3 grid(cdiv_u(rows, GG_M) + (unsigned int)(E < rows ? E : rows), cdiv_u(N, GG_N));
    size_t smem = sizeof(floatX) * 2 * GG_STAGE;
    if (w_kmajor)
        grouped_mgemm_kernel<true><<<grid, GG_THREADS, smem, st>>>(out, x, W, offsets, E, K, N);
    else
        grouped_mgemm_kernel<false><<<grid, GG_THREADS, smem, st>>>(out, x, W, offsets, E, K, N);
    KERNEL_CHECK();
}

void grouped_dev_forward(floatX *out, const floatX *inp, const floatX *W, const int *offsets, int E, int rows, int IC,
                         int OC, cudaStream_t st) {
    grouped_dev_check("forward", IC, OC, inp, W);
    grouped_mgemm_launch(out, inp, W, 0, offsets, E, rows, IC, OC, st); // out_e = inp_e W_e^T, W_e (OC, IC)
}

void grouped_dev_backward_input(floatX *dinp, const floatX *dout, const floatX *W, const int *offsets, int E, int rows,
                                int IC, int OC, cudaStream_t st) {
    grouped_dev_check("input gradient", IC, OC, dout, W);
    grouped_mgemm_launch(dinp, dout, W, 1, offsets, E, rows, OC, IC, st); // dinp_e = dout_e W_e, W_e (OC, IC)
}

void grouped_dev_backward_weight(float *dW, const floatX *dout, const floatX *inp, const int *offsets, int E, int IC,
                                 int OC, cudaStream_t st) {
    grouped_dev_check("weight gradient", IC, OC, dout, inp);
    if (E <= 0) return;
    dim3 grid(cdiv_u(IC, GG_N), cdiv_u(OC, GG_M), E);
    grouped_kgemm_kernel<<<grid, GG_THREADS, sizeof(floatX) * 2 * GG_STAGE, st>>>(dW, dout, inp, offsets, OC, IC);
    KERNEL_CHECK();
}
