// Causal multi-head attention with RoPE, fused: FlashAttention-2 (Dao, arXiv
// 2307.08691) on the tensor-core building blocks of kernels/mma.cuh.
//
// Forward, one kernel: a block takes a tile of queries of one (sequence,
// head), rotates it (RoPE) as it lands in shared memory, and walks the key
// and value tiles up to the diagonal (tiles entirely above it are never
// loaded), rotating each key tile as it lands; scores, an online softmax in
// fp32 and the output accumulate in registers. Kept for the backward: the
// output and the log-sum-exp of each row of scaled scores, (B, H, T) fp32.
// No (T, T) buffer exists anywhere.
//
// Backward, two kernels that recompute the probabilities tile by tile from
// the log-sum-exp: the first, per query tile, computes D = rowsum(dO * O)
// and dQ (walking the key tiles up to the diagonal); the second, per key
// tile, dK and dV (walking the query tiles from the diagonal on). The
// gradients of the rotated q and k are rotated back in registers before
// they are written, so dqkv is the gradient of the QKV matmul's output and
// no separate RoPE pass exists in either direction. Two kernels instead of
// FlashAttention-2's one with atomic dQ updates: no float atomics, so the
// gradients are the same bits in every run (the project's rule), for two
// recomputed products (7 tile products per tile pair instead of 5).
//
// Precision: bf16 tensor cores with fp32 accumulation in the default build
// (the rotated q and k, the probabilities and the score gradients are
// rounded to bf16 as the operands of their products, as the cuBLAS version
// rounded them when it stored them); the FP32 build runs the same tiles
// with fp32 FMAs (kernels/mma.cuh). Softmax statistics are fp32 throughout.
//
// Layouts, row-major: qkv (B*T, 3d), query columns [0, d), keys [d, 2d),
// values [2d, 3d), head h at columns h*hd of each; out and dout (B*T, d).
// Head dims: 16, 32, 64 and 128 (attention_supported).
#ifndef KERNELS_ATTENTION_CUH
#define KERNELS_ATTENTION_CUH

#include "common.cuh"

// 0 when the kernels are compiled for head dim hd; else -1 and a message in err.
int attention_supported(int hd, char *err, size_t errlen);

// Host: the RoPE tables cos_t, sin_t (T, hd/2) fp32 for base theta, computed
// in double exactly as model/ops.c's rope_tables, so both trainers use the
// same angles.
void attention_rope_tables(float *cos_t, float *sin_t, int T, int hd, float theta);

// out (B*T, d) floatX = heads of softmax(rope(q) rope(k)^T / sqrt(hd), causal) v;
// lse (B, H, T) fp32 = the natural log-sum-exp of each row of scaled scores.
// qkv (B*T, 3d) floatX as the QKV matmul wrote it (before RoPE); cos_t,
// sin_t (>= T, hd/2) device tables.
void attention_forward(floatX *out, float *lse, const floatX *qkv, const float *cos_t, const float *sin_t, int B,
                       int T, int d, int H, cudaStream_t stream);

// dqkv (B*T, 3d) floatX = gradient of qkv before RoPE (overwritten), given
// dout (B*T, d) floatX and the forward's qkv, out and lse. D (B, H, T) fp32
// is scratch (rowsum(dout * out)).
void attention_backward(floatX *dqkv, float *D, const floatX *dout, const floatX *qkv, const floatX *out,
                        const float *lse, const float *cos_t, const float *sin_t, int B, int T, int d, int H,
                        cudaStream_t stream);

#endif
