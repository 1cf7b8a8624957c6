// Dense linear layers (see matmul.cuh).
#include "matmul.cuh"

#include <string.h>

void matmul_init(Matmul *mm, cudaStream_t stream) {
    memset(mm, 0, sizeof *mm);
    mm->stream = stream;
    CUBLAS_CHECK(cublasLtCreate(&mm->lt));
    mm->workspace_bytes = MATMUL_WORKSPACE_BYTES;
    CUDA_CHECK(cudaMalloc(&mm->workspace, mm->workspace_bytes));
}

static void plan_free(MatmulPlan *p) {
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(p->a));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(p->b));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(p->c));
    CUBLAS_CHECK(cublasLtMatmulDescDestroy(p->desc));
}

void matmul_free(Matmul *mm) {
    for (int i = 0; i < mm->n_plans; i++) plan_free(&mm->plans[i]);
    if (mm->workspace) CUDA_CHECK(cudaFree(mm->workspace));
    if (mm->lt) CUBLAS_CHECK(cublasLtDestroy(mm->lt));
    memset(mm, 0, sizeof *mm);
}

// The largest power of two up to 256 that divides the address. cuBLASLt's
// heuristic assumes 256-byte aligned matrices unless told otherwise, and a
// layer's weights inside the one parameter buffer are aligned to less.
static uint32_t alignment(const void *p) {
    uint32_t a = 256;
    while (a > 1 && (uintptr_t)p % a) a >>= 1;
    return a;
}

// The plan of a column-major problem D (m, n) = op(A) op(B) [+ C], C and D of
// one type and layout, for matrices of the given alignments: found, or made
// (descriptors + heuristic) in a free or the oldest slot.
static const MatmulPlan *plan_get(Matmul *mm, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int lda,
                                  int ldb, int ldc, cudaDataType_t ab_type, cudaDataType_t cd_type,
                                  const uint32_t align[4]) {
    for (int i = 0; i < mm->n_plans; i++) {
        const MatmulPlan *p = &mm->plans[i];
        if (p->ta == ta && p->tb == tb && p->m == m && p->n == n && p->k == k && p->lda == lda && p->ldb == ldb &&
            p->ldc == ldc && p->ab_type == ab_type && p->cd_type == cd_type && !memcmp(p->align, align, sizeof p->align))
            return p;
    }
    MatmulPlan *p;
    if (mm->n_plans < MATMUL_MAX_PLANS) {
        p = &mm->plans[mm->n_plans++];
    } else {
        p = &mm->plans[mm->next_victim];
        mm->next_victim = (mm->next_victim + 1) % MATMUL_MAX_PLANS;
        plan_free(p);
    }
    memset(p, 0, sizeof *p);
    p->ta = ta;
    p->tb = tb;
    p->m = m;
    p->n = n;
    p->k = k;
    p->lda = lda;
    p->ldb = ldb;
    p->ldc = ldc;
    p->ab_type = ab_type;
    p->cd_type = cd_type;
    memcpy(p->align, align, sizeof p->align);
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    int32_t op_a = ta, op_b = tb;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b));
    // Stored shapes: op(A) is m x k, op(B) is k x n.
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, ab_type, ta == CUBLAS_OP_N ? m : k, ta == CUBLAS_OP_N ? k : m, lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, ab_type, tb == CUBLAS_OP_N ? k : n, tb == CUBLAS_OP_N ? n : k, ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->c, cd_type, m, n, ldc));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = mm->workspace_bytes;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++)
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &p->align[i], sizeof p->align[i]));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(mm->lt, p->desc, p->a, p->b, p->c, p->c, pref, 1, &res, &found));
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    if (found == 0) {
        fprintf(stderr, "error: cuBLASLt has no algorithm for a %d x %d x %d matmul (op %d %d, types %d -> %d)\n", m, n,
                k, (int)ta, (int)tb, (int)ab_type, (int)cd_type);
        exit(1);
    }
    p->algo = res.algo;
    return p;
}

// D = op(A) op(B) + beta C (C == D, or C another buffer of D's type and layout).
static void lt_matmul(Matmul *mm, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *A,
                      int lda, const void *B, int ldb, cudaDataType_t ab_type, const void *C, void *D, int ldc,
                      cudaDataType_t cd_type, float beta) {
    if (m == 0 || n == 0) return;
    const uint32_t align[4] = {alignment(A), alignment(B), alignment(C ? C : D), alignment(D)};
    const MatmulPlan *p = plan_get(mm, ta, tb, m, n, k, lda, ldb, ldc, ab_type, cd_type, align);
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasLtMatmul(mm->lt, p->desc, &alpha, A, p->a, B, p->b, &beta, C ? C : D, p->c, D, p->c, &p->algo,
                                mm->workspace, mm->workspace_bytes, mm->stream));
}

void matmul_forward(Matmul *mm, void *out, cudaDataType_t out_type, const floatX *inp, const floatX *W, int N, int IC,
                    int OC, const float *residual) {
    ASSERT(!residual || out_type == CUDA_R_32F, "matmul_forward adds an fp32 residual into a non-fp32 output");
    // Column-major: out^T (OC, N) = W (OC, IC) [stored as (IC, OC), transposed] @ inp^T (IC, N) [+ residual^T].
    lt_matmul(mm, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, W, IC, inp, IC, CUDA_R_FLOATX, residual, out, OC, out_type,
              residual ? 1.0f : 0.0f);
}

void matmul_backward_input(Matmul *mm, void *dinp, cudaDataType_t dinp_type, const floatX *dout, const floatX *W, int N,
                           int IC, int OC, int accumulate) {
    // Column-major: dinp^T (IC, N) (+)= W^T (IC, OC) [W as stored] @ dout^T (OC, N).
    lt_matmul(mm, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, W, IC, dout, OC, CUDA_R_FLOATX, NULL, dinp, IC, dinp_type,
              accumulate ? 1.0f : 0.0f);
}

void matmul_backward_weight(Matmul *mm, float *dW, const floatX *dout, const floatX *inp, int N, int IC, int OC) {
    // Column-major: dW^T (IC, OC) += inp^T (IC, N) @ dout (N, OC) [dout stored as (OC, N), transposed].
    lt_matmul(mm, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, inp, IC, dout, OC, CUDA_R_FLOATX, NULL, dW, IC, CUDA_R_32F, 1.0f);
}
