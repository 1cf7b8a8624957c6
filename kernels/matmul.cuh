// Dense linear layers through cublasGemmEx, fp32 accumulation
// (CUBLAS_COMPUTE_32F; never TF32: the FP32 build must match the CPU model to
// fp32 tolerances). Operands are floatX; the output type is chosen per call:
// floatX for activations, CUDA_R_32F where the result feeds the fp32 residual
// stream or an fp32 gradient (cuBLAS supports bf16 inputs with an fp32 C).
//
// Row-major convention of the CPU model (model/matmul.h): a weight W is
// (OC, IC) and y = x @ W^T. cuBLAS is column-major; a row-major (r, c) matrix
// is the column-major (c, r) matrix with the same leading dimension, which is
// all the mapping below uses.
#ifndef KERNELS_MATMUL_CUH
#define KERNELS_MATMUL_CUH

#include "common.cuh"

// out (N, OC) (+)= inp (N, IC) @ W (OC, IC)^T. out_type: CUDA_R_FLOATX or CUDA_R_32F.
void matmul_forward(cublasHandle_t h, void *out, cudaDataType_t out_type, const floatX *inp, const floatX *W, int N,
                    int IC, int OC, int accumulate);
// dinp (N, IC) (+)= dout (N, OC) @ W (OC, IC).
void matmul_backward_input(cublasHandle_t h, void *dinp, cudaDataType_t dinp_type, const floatX *dout,
                           const floatX *W, int N, int IC, int OC, int accumulate);
// dW (OC, IC) fp32 += dout (N, OC)^T @ inp (N, IC).
void matmul_backward_weight(cublasHandle_t h, float *dW, const floatX *dout, const floatX *inp, int N, int IC,
                            int OC);

#endif
