// Dense linear layers through cuBLASLt, fp32 accumulation
// (CUBLAS_COMPUTE_32F; never TF32: the FP32 build must match the CPU model to
// fp32 tolerances). Operands are floatX; the output type is chosen per call:
// floatX for activations, CUDA_R_32F where the result feeds the fp32 residual
// stream or an fp32 gradient (bf16 inputs with an fp32 output are supported).
//
// What cuBLASLt fuses here: the residual add. A matmul that ends a residual
// branch computes D = x + W h with C = x and D a different buffer, so the
// residual stream is not copied first (cublasGemmEx has C == D). The model has
// no biases and its activation (SwiGLU) takes two inputs, so no other
// epilogue applies.
//
// Row-major convention of the CPU model (model/matmul.h): a weight W is
// (OC, IC) and y = x @ W^T. cuBLAS is column-major; a row-major (r, c) matrix
// is the column-major (c, r) matrix with the same leading dimension, which is
// all the mapping below uses.
#ifndef KERNELS_MATMUL_CUH
#define KERNELS_MATMUL_CUH

#include <cublasLt.h>

#include "common.cuh"

// The cuBLASLt workspace: 32 MiB, the size the cuBLAS documentation recommends
// for Hopper (cublasSetWorkspace); more buys nothing.
#define MATMUL_WORKSPACE_BYTES ((size_t)32 << 20)

// One problem's cuBLASLt descriptors and the algorithm its heuristic chose.
typedef struct {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc;
    cudaDataType_t ab_type, cd_type;
    uint32_t align[4]; // of A, B, C, D in bytes (up to 256): the algorithm is chosen for them
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
} MatmulPlan;

#define MATMUL_MAX_PLANS 64 // shapes kept (sampling sees a new N per token: the oldest plan makes room)

typedef struct {
    cublasLtHandle_t lt;
    cudaStream_t stream;
    void *workspace; // device
    size_t workspace_bytes;
    MatmulPlan plans[MATMUL_MAX_PLANS];
    int n_plans, next_victim;
} Matmul;

void matmul_init(Matmul *mm, cudaStream_t stream);
void matmul_free(Matmul *mm);

// out (N, OC) = inp (N, IC) @ W (OC, IC)^T [+ residual (N, OC)]. residual:
// NULL; out itself (accumulate); or another fp32 buffer (out must be fp32).
// out_type: CUDA_R_FLOATX or CUDA_R_32F.
void matmul_forward(Matmul *mm, void *out, cudaDataType_t out_type, const floatX *inp, const floatX *W, int N, int IC,
                    int OC, const float *residual);
// dinp (N, IC) (+)= dout (N, OC) @ W (OC, IC).
void matmul_backward_input(Matmul *mm, void *dinp, cudaDataType_t dinp_type, const floatX *dout, const floatX *W, int N,
                           int IC, int OC, int accumulate);
// dW (OC, IC) fp32 += dout (N, OC)^T @ inp (N, IC).
void matmul_backward_weight(Matmul *mm, float *dW, const floatX *dout, const floatX *inp, int N, int IC, int OC);

#endif
