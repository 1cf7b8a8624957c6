// CUDA emulation on the CPU: cuBLAS and cuBLASLt (tests/emu; see
// emu_memory.cc). The GEMMs are loops over cuBLAS's definition in double,
// rounded once to the output type; their arguments are checked as cuBLAS
// checks them, and their matrices must be device memory. On a stream that
// captures (emu_graph.cc) a call is checked the same way and recorded:
// alpha, beta and the grouped call's per-group arrays are host values,
// taken at the call; the matrices and the grouped call's device pointer
// arrays are read when a replay runs it.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vector>

#include "cublasLt.h"
#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "emu_internal.h"

using namespace emu;

// ----------------------------------------------------------------------------
// cuBLAS

struct EmuCublas {
    cudaStream_t stream;
    cublasMath_t math;
};

extern "C" cublasStatus_t cublasCreate(cublasHandle_t *handle) {
    install_handler();
    *handle = new EmuCublas{NULL, CUBLAS_DEFAULT_MATH};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasDestroy(cublasHandle_t handle) {
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" const char *cublasGetStatusName(cublasStatus_t status) {
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
extern "C" const char *cublasGetStatusString(cublasStatus_t status) { return cublasGetStatusName(status); }

static size_t type_bytes(cudaDataType t) { return t == CUDA_R_32F ? 4 : t == CUDA_R_64F ? 8 : 2; }

static float load_elem(const void *p, cudaDataType t, size_t i) {
    if (t == CUDA_R_32F) return ((const float *)p)[i];
    return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
}
static void store_elem(void *p, cudaDataType t, size_t i, float v) {
    if (t == CUDA_R_32F)
        ((float *)p)[i] = v;
    else
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
}

// ----------------------------------------------------------------------------
// Type combinations. Each GEMM entry point accepts only the (compute type,
// scale type, A/B type, C type) rows its section of the cuBLAS documentation
// lists ("... supports the following Compute Type, Scale Type, Atype/Btype,
// and Ctype"); anything else is CUBLAS_STATUS_NOT_SUPPORTED, as on a GPU, so
// that a caller's fallback runs here as it would there. A listed combination
// the emulator does not compute (fp16, int8, fp64, complex) stops the run:
// it is legal, but nothing here could check its numbers.

struct TypeRow {
    cublasComputeType_t compute;
    cudaDataType_t scale, ab, c; // scale: alpha and beta; ab: A and B (one type); c: C (and D)
};

#define ROWS_32F(ct)                                                                                        \
    {ct, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF}, {ct, CUDA_R_32F, CUDA_R_16F, CUDA_R_16F},                  \
        {ct, CUDA_R_32F, CUDA_R_8I, CUDA_R_32F}, {ct, CUDA_R_32F, CUDA_R_16BF, CUDA_R_32F},                 \
        {ct, CUDA_R_32F, CUDA_R_16F, CUDA_R_32F}, {ct, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F},                 \
        {ct, CUDA_C_32F, CUDA_C_8I, CUDA_C_32F}, {ct, CUDA_C_32F, CUDA_C_32F, CUDA_C_32F}
#define ROWS_FAST(ct) {ct, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F}, {ct, CUDA_C_32F, CUDA_C_32F, CUDA_C_32F}
#define ROWS_64F(ct) {ct, CUDA_R_64F, CUDA_R_64F, CUDA_R_64F}, {ct, CUDA_C_64F, CUDA_C_64F, CUDA_C_64F}

// cuBLAS documentation, cublasGemmEx(): the table after the parameter list.
// cublasGemmStridedBatchedEx() (and cublasGemmBatchedEx()) document the same
// one, and cublasLtMatmul()'s non-FP8 table has all its rows too.
#define ROWS_GEMM_EX                                                                                        \
    {CUBLAS_COMPUTE_16F, CUDA_R_16F, CUDA_R_16F, CUDA_R_16F},                                               \
        {CUBLAS_COMPUTE_16F_PEDANTIC, CUDA_R_16F, CUDA_R_16F, CUDA_R_16F},                                  \
        {CUBLAS_COMPUTE_32I, CUDA_R_32I, CUDA_R_8I, CUDA_R_32I},                                            \
        {CUBLAS_COMPUTE_32I_PEDANTIC, CUDA_R_32I, CUDA_R_8I, CUDA_R_32I}, ROWS_32F(CUBLAS_COMPUTE_32F),     \
        ROWS_32F(CUBLAS_COMPUTE_32F_PEDANTIC), ROWS_FAST(CUBLAS_COMPUTE_32F_FAST_16F),                      \
        ROWS_FAST(CUBLAS_COMPUTE_32F_FAST_16BF), ROWS_FAST(CUBLAS_COMPUTE_32F_FAST_TF32),                   \
        ROWS_64F(CUBLAS_COMPUTE_64F), ROWS_64F(CUBLAS_COMPUTE_64F_PEDANTIC)
static const TypeRow GEMM_EX_TYPES[] = {ROWS_GEMM_EX};

// cuBLAS documentation, cublasGemmGroupedBatchedEx() (cuBLAS >= 12.5): a much
// shorter table -- one type for A, B and C, except the fp32 compute types; in
// particular no bf16 (or fp16) inputs with an fp32 C.
static const TypeRow GROUPED_TYPES[] = {
    {CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16F, CUDA_R_16F},
    {CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF},
    {CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F},
    {CUBLAS_COMPUTE_32F_FAST_TF32, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F},
    {CUBLAS_COMPUTE_64F, CUDA_R_64F, CUDA_R_64F, CUDA_R_64F},
};

// cuBLAS documentation, cublasLtMatmul(): the table of non-FP8 types (the
// scale type is the descriptor's; D has C's type): cublasGemmEx's rows and
// int8 output with the 32I compute types. The FP8 tables are left out: the
// emulator has no FP8 types.
static const TypeRow LT_TYPES[] = {
    ROWS_GEMM_EX,
    {CUBLAS_COMPUTE_32I, CUDA_R_32F, CUDA_R_8I, CUDA_R_8I},
    {CUBLAS_COMPUTE_32I_PEDANTIC, CUDA_R_32F, CUDA_R_8I, CUDA_R_8I},
};
#undef ROWS_GEMM_EX
#undef ROWS_32F
#undef ROWS_FAST
#undef ROWS_64F

#define N_ROWS(table) ((int)(sizeof table / sizeof table[0]))

// Whether a table lists the combination (scale < 0: any, for the cuBLAS
// functions whose scale type follows from the compute type).
static int types_listed(const TypeRow *table, int n, cublasComputeType_t compute, int scale, cudaDataType_t at,
                        cudaDataType_t bt, cudaDataType_t ct) {
    if (at != bt) return 0;
    for (int i = 0; i < n; i++)
        if (table[i].compute == compute && (scale < 0 || (int)table[i].scale == scale) && table[i].ab == at &&
            table[i].c == ct)
            return 1;
    return 0;
}

// A listed combination this emulator computes: fp32 arithmetic on fp32 or bf16 data.
static void need_emulated(const char *who, cublasComputeType_t compute, cudaDataType_t at, cudaDataType_t ct) {
    int fp32 = compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC ||
               compute == CUBLAS_COMPUTE_32F_FAST_16F || compute == CUBLAS_COMPUTE_32F_FAST_16BF ||
               compute == CUBLAS_COMPUTE_32F_FAST_TF32;
    int data = (at == CUDA_R_32F || at == CUDA_R_16BF) && (ct == CUDA_R_32F || ct == CUDA_R_16BF);
    if (!fp32 || !data)
        emu_fail("%s: compute type %d with A/B type %d and C type %d is supported by cuBLAS but not emulated", who,
                 (int)compute, (int)at, (int)ct);
}

// Bytes spanned by a column-major rows x cols matrix with leading dimension ld.
static size_t span_bytes(int rows, int cols, int ld, cudaDataType t) {
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * ld + rows) * type_bytes(t);
}

// A GEMM's sizes and leading dimensions as cuBLAS checks them.
static cublasStatus_t gemm_dims(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int lda, int ldb,
                                int ldc, int ldd) {
    int a_rows = ta == CUBLAS_OP_N ? m : k, b_rows = tb == CUBLAS_OP_N ? k : n;
    if (m < 0 || n < 0 || k < 0 || lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
        ldc < (m > 1 ? m : 1) || ldd < (m > 1 ? m : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

// One GEMM, D = alpha op(A) op(B) + beta C, column-major (cuBLAS's
// definition; cuBLAS itself has D = C, cuBLASLt may not). run = false: only
// the checks (a call being captured).
static cublasStatus_t gemm_cd(const char *who, bool run, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                              int k, float alpha, const void *A, cudaDataType at, int lda, const void *B,
                              cudaDataType bt, int ldb, float beta, const void *C, cudaDataType ct, int ldc, void *D,
                              cudaDataType dt, int ldd) {
    int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
    int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
    cublasStatus_t st = gemm_dims(ta, tb, m, n, k, lda, ldb, ldc, ldd);
    if (st != CUBLAS_STATUS_SUCCESS || m == 0 || n == 0) return st;
    char what[128];
    snprintf(what, sizeof what, "%s: matrix A", who);
    if (k > 0) need_device(A, span_bytes(a_rows, a_cols, lda, at), what);
    snprintf(what, sizeof what, "%s: matrix B", who);
    if (k > 0) need_device(B, span_bytes(b_rows, b_cols, ldb, bt), what);
    snprintf(what, sizeof what, "%s: matrix C", who);
    if (beta != 0.0f) need_device(C, span_bytes(m, n, ldc, ct), what);
    snprintf(what, sizeof what, "%s: matrix D", who);
    need_device(D, span_bytes(m, n, ldd, dt), what);
    if (!run) return CUBLAS_STATUS_SUCCESS;
    enter_device();
    std::vector<float> a((size_t)m * k), b((size_t)n * k); // a[i][p] = op(A)(i,p), b[j][p] = op(B)(p,j)
    for (int i = 0; i < m; i++)
        for (int p = 0; p < k; p++)
            a[(size_t)i * k + p] = load_elem(A, at, ta == CUBLAS_OP_N ? i + (size_t)p * lda : p + (size_t)i * lda);
    for (int j = 0; j < n; j++)
        for (int p = 0; p < k; p++)
            b[(size_t)j * k + p] = load_elem(B, bt, tb == CUBLAS_OP_N ? p + (size_t)j * ldb : j + (size_t)p * ldb);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double acc = 0.0;
            const float *ar = &a[(size_t)i * k], *br = &b[(size_t)j * k];
            for (int p = 0; p < k; p++) acc += (double)ar[p] * br[p];
            // beta == 0: C is not read (it may hold NaN), as cuBLAS documents.
            double c = alpha * acc + (beta != 0.0f ? (double)beta * load_elem(C, ct, i + (size_t)j * ldc) : 0.0);
            store_elem(D, dt, i + (size_t)j * ldd, (float)c);
        }
    exit_device();
    return CUBLAS_STATUS_SUCCESS;
}

static cublasStatus_t gemm_one(const char *who, bool run, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                               int k, float alpha, const void *A, cudaDataType at, int lda, const void *B,
                               cudaDataType bt, int ldb, float beta, void *C, cudaDataType ct, int ldc) {
    return gemm_cd(who, run, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, C, ct, ldc);
}

// Runs a call now, or, when its stream captures, checks it (call(false))
// and records it (call(true) at every replay). A stream the call may not
// use now (the legacy stream during a blocking capture, an invalidated
// capture) fails its launch, which cuBLAS reports as
// CUBLAS_STATUS_EXECUTION_FAILED.
template <class Call>
static cublasStatus_t blas_enqueue(cudaStream_t stream, const char *who, int prof, const Call &call) {
    bool record;
    if (capture_check(stream, who, &record) != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
    if (!record) {
        prof_count(prof);
        return call(true);
    }
    cublasStatus_t st = call(false);
    if (st == CUBLAS_STATUS_SUCCESS)
        capture_record(stream, who, [call, prof](cudaStream_t) {
            prof_count(prof);
            call(true);
        });
    return st;
}

extern "C" cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                       int m, int n, int k, const void *alpha, const void *A, cudaDataType Atype,
                                       int lda, const void *B, cudaDataType Btype, int ldb, const void *beta, void *C,
                                       cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                                       cublasGemmAlgo_t algo) {
    (void)algo;
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!types_listed(GEMM_EX_TYPES, N_ROWS(GEMM_EX_TYPES), computeType, -1, Atype, Btype, Ctype))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    need_emulated("cublasGemmEx", computeType, Atype, Ctype);
    need_host(alpha, "cublasGemmEx alpha (host pointer mode)");
    need_host(beta, "cublasGemmEx beta (host pointer mode)");
    float al = *(const float *)alpha, be = *(const float *)beta;
    return blas_enqueue(handle->stream, "cublasGemmEx", PROF_GEMM, [=](bool run) {
        return gemm_one("cublasGemmEx", run, transa, transb, m, n, k, al, A, Atype, lda, B, Btype, ldb, be, C, Ctype,
                        ldc);
    });
}

extern "C" cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                                     cublasOperation_t transb, int m, int n, int k, const void *alpha,
                                                     const void *A, cudaDataType Atype, int lda, long long int strideA,
                                                     const void *B, cudaDataType Btype, int ldb, long long int strideB,
                                                     const void *beta, void *C, cudaDataType Ctype, int ldc,
                                                     long long int strideC, int batchCount,
                                                     cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    (void)algo;
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!types_listed(GEMM_EX_TYPES, N_ROWS(GEMM_EX_TYPES), computeType, -1, Atype, Btype, Ctype))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    need_emulated("cublasGemmStridedBatchedEx", computeType, Atype, Ctype);
    if (batchCount < 0) return CUBLAS_STATUS_INVALID_VALUE;
    need_host(alpha, "cublasGemmStridedBatchedEx alpha (host pointer mode)");
    need_host(beta, "cublasGemmStridedBatchedEx beta (host pointer mode)");
    float al = *(const float *)alpha, be = *(const float *)beta;
    return blas_enqueue(handle->stream, "cublasGemmStridedBatchedEx", PROF_GEMM_STRIDED, [=](bool run) {
        for (int i = 0; i < batchCount; i++) {
            cublasStatus_t st = gemm_one("cublasGemmStridedBatchedEx", run, transa, transb, m, n, k, al,
                                         (const char *)A + i * strideA * (long long)type_bytes(Atype), Atype, lda,
                                         (const char *)B + i * strideB * (long long)type_bytes(Btype), Btype, ldb, be,
                                         (char *)C + i * strideC * (long long)type_bytes(Ctype), Ctype, ldc);
            if (st != CUBLAS_STATUS_SUCCESS) return st;
        }
        return CUBLAS_STATUS_SUCCESS;
    });
}

extern "C" cublasStatus_t cublasGemmGroupedBatchedEx(
    cublasHandle_t handle, const cublasOperation_t transa_array[], const cublasOperation_t transb_array[],
    const int m_array[], const int n_array[], const int k_array[], const void *alpha_array, const void *const Aarray[],
    cudaDataType_t Atype, const int lda_array[], const void *const Barray[], cudaDataType_t Btype,
    const int ldb_array[], const void *beta_array, void *const Carray[], cudaDataType_t Ctype, const int ldc_array[],
    int group_count, const int group_size[], cublasComputeType_t computeType) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!types_listed(GROUPED_TYPES, N_ROWS(GROUPED_TYPES), computeType, -1, Atype, Btype, Ctype))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    need_emulated("cublasGemmGroupedBatchedEx", computeType, Atype, Ctype);
    if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
    // The per-group parameters are host arrays; the matrix pointer arrays are device arrays.
    const char *who = "cublasGemmGroupedBatchedEx";
    need_host(transa_array, "cublasGemmGroupedBatchedEx transa_array");
    need_host(m_array, "cublasGemmGroupedBatchedEx m_array");
    need_host(alpha_array, "cublasGemmGroupedBatchedEx alpha_array (host pointer mode)");
    need_host(group_size, "cublasGemmGroupedBatchedEx group_size");
    int total = 0;
    for (int g = 0; g < group_count; g++) {
        if (group_size[g] < 0) return CUBLAS_STATUS_INVALID_VALUE;
        total += group_size[g];
    }
    need_device(Aarray, sizeof(void *) * total, "cublasGemmGroupedBatchedEx Aarray");
    need_device(Barray, sizeof(void *) * total, "cublasGemmGroupedBatchedEx Barray");
    need_device(Carray, sizeof(void *) * total, "cublasGemmGroupedBatchedEx Carray");
    // The per-group parameters as they are now (host memory, read at the call).
    std::vector<cublasOperation_t> ta(transa_array, transa_array + group_count), tb(transb_array, transb_array + group_count);
    std::vector<int> ms(m_array, m_array + group_count), ns(n_array, n_array + group_count),
        ks(k_array, k_array + group_count), ldas(lda_array, lda_array + group_count),
        ldbs(ldb_array, ldb_array + group_count), ldcs(ldc_array, ldc_array + group_count),
        sizes(group_size, group_size + group_count);
    std::vector<float> alphas((const float *)alpha_array, (const float *)alpha_array + group_count),
        betas((const float *)beta_array, (const float *)beta_array + group_count);
    return blas_enqueue(handle->stream, who, PROF_GEMM_GROUPED, [=](bool run) {
        if (!run) { // captured: the pointer arrays may be filled by earlier work of the capture, so only the sizes
            for (int g = 0; g < group_count; g++) {
                cublasStatus_t st = gemm_dims(ta[g], tb[g], ms[g], ns[g], ks[g], ldas[g], ldbs[g], ldcs[g], ldcs[g]);
                if (st != CUBLAS_STATUS_SUCCESS) return st;
            }
            return CUBLAS_STATUS_SUCCESS;
        }
        std::vector<const void *> pa(total), pb(total);
        std::vector<void *> pc(total);
        enter_device();
        for (int i = 0; i < total; i++) {
            pa[i] = Aarray[i];
            pb[i] = Barray[i];
            pc[i] = Carray[i];
        }
        exit_device();
        for (int g = 0, idx = 0; g < group_count; g++)
            for (int i = 0; i < sizes[g]; i++, idx++) {
                cublasStatus_t st = gemm_one(who, true, ta[g], tb[g], ms[g], ns[g], ks[g], alphas[g], pa[idx], Atype,
                                             ldas[g], pb[idx], Btype, ldbs[g], betas[g], pc[idx], Ctype, ldcs[g]);
                if (st != CUBLAS_STATUS_SUCCESS) return st;
            }
        return CUBLAS_STATUS_SUCCESS;
    });
}

// ----------------------------------------------------------------------------
// cuBLASLt

struct EmuLt {
    int dummy;
};
struct EmuLtDesc {
    cublasComputeType_t compute;
    cudaDataType_t scale;
    cublasOperation_t ta, tb;
    int epilogue;
};
struct EmuLtLayout {
    cudaDataType type;
    uint64_t rows, cols;
    int64_t ld;
};
struct EmuLtPref {
    uint64_t max_workspace;
    uint32_t align[4]; // minimum alignment of A, B, C, D the algorithm may assume
};

extern "C" cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    install_handler();
    *h = new EmuLt{0};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute,
                                                   cudaDataType_t scale) {
    *d = new EmuLtDesc{compute, scale, CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                                         const void *buf, size_t size) {
    // Sizes as cuBLASLt checks them: the transposes are int32 (cublasOperation_t), the epilogue uint32.
    if (!d || !buf || size != 4) return CUBLAS_STATUS_INVALID_VALUE;
    int v;
    memcpy(&v, buf, 4);
    if (attr == CUBLASLT_MATMUL_DESC_TRANSA) d->ta = (cublasOperation_t)v;
    else if (attr == CUBLASLT_MATMUL_DESC_TRANSB) d->tb = (cublasOperation_t)v;
    else if (attr == CUBLASLT_MATMUL_DESC_EPILOGUE) d->epilogue = v;
    else return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType type, uint64_t rows,
                                                     uint64_t cols, int64_t ld) {
    *l = new EmuLtLayout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = new EmuLtPref{0, {256, 256, 256, 256}};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                               cublasLtMatmulPreferenceAttributes_t attr,
                                                               const void *buf, size_t size) {
    if (!p || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES && size == 8) {
        memcpy(&p->max_workspace, buf, 8);
        return CUBLAS_STATUS_SUCCESS;
    }
    if (attr >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES && attr <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES &&
        size == 4) {
        memcpy(&p->align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, 4);
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_INVALID_VALUE;
}

// The problem the descriptors describe, or an error: m, n, k from D and op(A),
// everything else consistent with them, types supported.
static cublasStatus_t lt_shape(cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                               cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D, int *m, int *n, int *k) {
    if (!d || !A || !B || !C || !D) return CUBLAS_STATUS_INVALID_VALUE;
    if (d->epilogue != CUBLASLT_EPILOGUE_DEFAULT) return CUBLAS_STATUS_NOT_SUPPORTED;
    *m = (int)D->rows;
    *n = (int)D->cols;
    *k = (int)(d->ta == CUBLAS_OP_N ? A->cols : A->rows);
    uint64_t a_rows = d->ta == CUBLAS_OP_N ? *m : *k, b_rows = d->tb == CUBLAS_OP_N ? *k : *n,
             b_cols = d->tb == CUBLAS_OP_N ? *n : *k;
    if (A->rows != a_rows || B->rows != b_rows || B->cols != b_cols || C->rows != D->rows || C->cols != D->cols)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (C->type != D->type || !types_listed(LT_TYPES, N_ROWS(LT_TYPES), d->compute, d->scale, A->type, B->type, C->type))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    need_emulated("cublasLtMatmul", d->compute, A->type, C->type);
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                                         cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                                                         cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D,
                                                         cublasLtMatmulPreference_t pref, int requested,
                                                         cublasLtMatmulHeuristicResult_t results[], int *returned) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!pref || requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    int m, n, k;
    cublasStatus_t st = lt_shape(d, A, B, C, D, &m, &n, &k);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    memset(&results[0], 0, sizeof results[0]);
    results[0].algo.data[0] = 0x454d55; // "EMU": the only algorithm, for the preference's alignments
    for (int i = 0; i < 4; i++) results[0].algo.data[1 + i] = pref->align[i];
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *A,
                                         cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                                         const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                                         cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo,
                                         void *workspace, size_t workspace_bytes, cudaStream_t stream) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    int m, n, k;
    cublasStatus_t st = lt_shape(d, Adesc, Bdesc, Cdesc, Ddesc, &m, &n, &k);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    if (algo && algo->data[0] != 0x454d55) return CUBLAS_STATUS_INVALID_VALUE; // not from the heuristic
    const void *ptrs[4] = {A, B, C, D};
    for (int i = 0; algo && i < 4; i++)
        if ((uintptr_t)ptrs[i] % algo->data[1 + i]) {
            fprintf(stderr, "emulator: cublasLtMatmul: matrix %c at %p is not aligned to the %u bytes its algorithm "
                    "was chosen for (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_%c_BYTES)\n", "ABCD"[i], ptrs[i],
                    (unsigned)algo->data[1 + i], "ABCD"[i]);
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
    if (workspace_bytes) need_device(workspace, workspace_bytes, "cublasLtMatmul workspace");
    // In place only with the same layout.
    if (C == D && (Cdesc->ld != Ddesc->ld || Cdesc->type != Ddesc->type)) return CUBLAS_STATUS_INVALID_VALUE;
    need_host(alpha, "cublasLtMatmul alpha (host pointer mode)");
    need_host(beta, "cublasLtMatmul beta (host pointer mode)");
    // The descriptors' contents as they are now (the caller may change or destroy them after the call).
    float al = *(const float *)alpha, be = *(const float *)beta;
    cublasOperation_t ta = d->ta, tb = d->tb;
    EmuLtLayout la = *Adesc, lb = *Bdesc, lc = *Cdesc, ld = *Ddesc;
    return blas_enqueue(stream, "cublasLtMatmul", PROF_LT_MATMUL, [=](bool run) {
        return gemm_cd("cublasLtMatmul", run, ta, tb, m, n, k, al, A, la.type, (int)la.ld, B, lb.type, (int)lb.ld, be,
                       C, lc.type, (int)lc.ld, D, ld.type, (int)ld.ld);
    });
}

