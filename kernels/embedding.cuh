// Token embedding, forward and backward (docs/model.md: x = tok_emb[tokens]).
// The residual stream is fp32 and is read straight from the fp32 master
// embedding, so the lookup is exact in both precisions.
//
// The backward is deterministic: the host sorts the positions of the
// micro-batch by token (a stable counting sort, embedding_backward_index),
// and one thread per (token, column) sums that token's positions in order.
// No atomics, so the result does not depend on scheduling.
#ifndef KERNELS_EMBEDDING_CUH
#define KERNELS_EMBEDDING_CUH

#include "common.cuh"

// x (N, d) fp32 = emb (V, d) fp32 [tokens (N)].
void embedding_forward(float *x, const int *tokens, const float *emb, int N, int d, cudaStream_t stream);

// Host: groups the N positions by token, stably. count (V) is scratch.
// uniq (<= N) receives the distinct tokens in increasing order, offsets
// (n_uniq + 1) the start of each token's run in positions (N), which lists the
// positions token by token, each run in increasing position order. Returns
// n_uniq.
int embedding_backward_index(const int *tokens, int N, int V, int *count, int *uniq, int *offsets, int *positions);

// demb (V, d) fp32 += for each distinct token u: the sum over its positions p
// (in order) of dx[p] (N, d) fp32. The index arrays are device copies of
// embedding_backward_index's output, n_uniq (1) on the device too: the launch
// covers max_uniq >= n_uniq tokens (N), the blocks beyond n_uniq do nothing,
// so the launch's shape does not depend on the tokens (a CUDA graph replays it).
void embedding_backward(float *demb, const float *dx, const int *uniq, const int *offsets, const int *positions,
                        const int *n_uniq, int max_uniq, int d, cudaStream_t stream);

#endif
