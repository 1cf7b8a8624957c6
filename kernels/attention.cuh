// Causal multi-head attention, a first correct version: the (B, H, T, T)
// scores are materialised by strided-batched cuBLAS GEMMs (fp32 output), a
// softmax kernel turns them into probabilities (floatX, kept for the
// backward, zero above the diagonal), and a second batched GEMM applies them
// to the values. The GEMMs read q, k, v straight out of qkv (N, 3d) with
// leading dimension 3d and write the output heads straight into (N, d), one
// call per sequence batched over the heads, so no permute kernels are needed.
// The upper (masked) triangle is computed and discarded: 2x the FLOPs of a
// causal kernel; a flash-attention kernel is the known next step.
//
// Memory per layer kept for the backward: att (B, H, T, T) floatX. Shared
// scratch: scores (B, H, T, T) fp32 and dS (B, H, T, T) floatX.
#ifndef KERNELS_ATTENTION_CUH
#define KERNELS_ATTENTION_CUH

#include "common.cuh"

// out (B*T, d) floatX = heads of softmax(q k^T / sqrt(hd), causal) v;
// att (B, H, T, T) floatX = the probabilities; scores (B, H, T, T) fp32 scratch.
// qkv (B*T, 3d) floatX with RoPE applied.
void attention_forward(cublasHandle_t h, floatX *out, floatX *att, float *scores, const floatX *qkv, int B, int T,
                       int d, int H, cudaStream_t stream);

// dqkv (B*T, 3d) floatX = gradient of qkv (overwritten) given dout (B*T, d)
// floatX. dP (B, H, T, T) fp32 and dS (B, H, T, T) floatX are scratch.
void attention_backward(cublasHandle_t h, floatX *dqkv, const floatX *dout, const floatX *qkv, const floatX *att,
                        float *dP, floatX *dS, int B, int T, int d, int H, cudaStream_t stream);

#endif
