// Grouped expert GEMMs (see grouped_gemm.cuh).
#include "grouped_gemm.cuh"

#include <string.h>

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
