// Dense linear layers (see matmul.cuh).
#include "matmul.cuh"

void matmul_forward(cublasHandle_t h, void *out, cudaDataType_t out_type, const floatX *inp, const floatX *W, int N,
                    int IC, int OC, int accumulate) {
    // Column-major: out^T (OC, N) = W (OC, IC) [stored as (IC, OC), transposed] @ inp^T (IC, N).
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &alpha, W, CUDA_R_FLOATX, IC, inp,
                              CUDA_R_FLOATX, IC, &beta, out, out_type, OC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void matmul_backward_input(cublasHandle_t h, void *dinp, cudaDataType_t dinp_type, const floatX *dout,
                           const floatX *W, int N, int IC, int OC, int accumulate) {
    // Column-major: dinp^T (IC, N) = W^T (IC, OC) [W as stored] @ dout^T (OC, N).
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &alpha, W, CUDA_R_FLOATX, IC, dout,
                              CUDA_R_FLOATX, OC, &beta, dinp, dinp_type, IC, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
}

void matmul_backward_weight(cublasHandle_t h, float *dW, const floatX *dout, const floatX *inp, int N, int IC,
                            int OC) {
    // Column-major: dW^T (IC, OC) += inp^T (IC, N) @ dout (N, OC) [dout stored as (OC, N), transposed].
    const float alpha = 1.0f, beta = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &alpha, inp, CUDA_R_FLOATX, IC, dout,
                              CUDA_R_FLOATX, OC, &beta, dW, CUDA_R_32F, IC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
