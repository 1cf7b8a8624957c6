// Token embedding forward/backward (see embedding.cuh).
#include "embedding.cuh"

#include <string.h>

#include "vec.cuh"

// One thread per group of VEC_F columns of one row of x (N, d) (kernels/vec.cuh).
template <bool ALIGNED>
static __global__ void embedding_forward_kernel(float *x, const int *tokens, const float *emb, int N, int d) {
    int groups = (d + VEC_F - 1) / VEC_F;
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)N * groups) return;
    int64_t t = idx / groups;
    int c = (int)(idx % groups) * VEC_F;
    vec_copy<ALIGNED, VEC_F>(x + t * d + c, emb + (int64_t)tokens[t] * d + c, d - c);
}

void embedding_forward(float *x, const int *tokens, const float *emb, int N, int d, cudaStream_t stream) {
    const int threads = 256;
    unsigned int blocks = cdiv_u((int64_t)N * cdiv_u(d, VEC_F), threads);
    if (vec_path(d % VEC_F == 0, x, emb))
        embedding_forward_kernel<true><<<blocks, threads, 0, stream>>>(x, tokens, emb, N, d);
    else
        embedding_forward_kernel<false><<<blocks, threads, 0, stream>>>(x, tokens, emb, N, d);
    KERNEL_CHECK();
}

int embedding_backward_index(const int *tokens, int N, int V, int *count, int *uniq, int *offsets, int *positions) {
    memset(count, 0, sizeof(int) * (size_t)V);
    for (int p = 0; p < N; p++) count[tokens[p]]++;
    int n_uniq = 0, run = 0;
    for (int v = 0; v < V; v++) {
        if (count[v] == 0) continue;
        uniq[n_uniq] = v;
        offsets[n_uniq] = run;
        n_uniq++;
        int c = count[v];
        count[v] = run; // becomes the next free slot of token v
        run += c;
    }
    offsets[n_uniq] = run;
    for (int p = 0; p < N; p++) positions[count[tokens[p]]++] = p;
    return n_uniq;
}

// grid (max_uniq, ceil(d / (VEC_F blockDim))): block (u, cb) owns column
// groups [cb blockDim, ...) of token uniq[u], u < *n_uniq; each thread sums its
// VEC_F columns over the token's positions, in order.
template <bool ALIGNED>
static __global__ void embedding_backward_kernel(float *demb, const float *dx, const int *uniq, const int *offsets,
                                                 const int *positions, const int *n_uniq, int d) {
    int u = blockIdx.x;
    int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC_F;
    if (u >= *n_uniq || c >= d) return;
    float acc[VEC_F] = {}, g[VEC_F];
    for (int i = offsets[u]; i < offsets[u + 1]; i++) {
        vec_load<ALIGNED>(g, dx + (int64_t)positions[i] * d + c, d - c);
        for (int k = 0; k < VEC_F; k++) acc[k] += g[k];
    }
    float *row = demb + (int64_t)uniq[u] * d + c;
    vec_load<ALIGNED>(g, row, d - c);
    for (int k = 0; k < VEC_F; k++) g[k] += acc[k];
    vec_store<ALIGNED>(row, g, d - c);
}

void embedding_backward(float *demb, const float *dx, const int *uniq, const int *offsets, const int *positions,
                        const int *n_uniq, int max_uniq, int d, cudaStream_t stream) {
    if (max_uniq == 0) return;
    const int threads = 256;
    dim3 grid(max_uniq, cdiv_u(cdiv_u(d, VEC_F), threads));
    if (vec_path(d % VEC_F == 0, demb, dx))
        embedding_backward_kernel<true><<<grid, threads, 0, stream>>>(demb, dx, uniq, offsets, positions, n_uniq, d);
    else
        embedding_backward_kernel<false><<<grid, threads, 0, stream>>>(demb, dx, uniq, offsets, positions, n_uniq, d);
    KERNEL_CHECK();
}
