// Token embedding forward/backward (see embedding.cuh).
#include "embedding.cuh"

#include <string.h>

// One thread per element of x (N, d).
static __global__ void embedding_forward_kernel(float *x, const int *tokens, const float *emb, int N, int d) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)N * d) return;
    int64_t t = i / d, c = i % d;
    x[i] = emb[(int64_t)tokens[t] * d + c];
}

void embedding_forward(float *x, const int *tokens, const float *emb, int N, int d, cudaStream_t stream) {
    const int threads = 256;
    embedding_forward_kernel<<<cdiv_u((int64_t)N * d, threads), threads, 0, stream>>>(x, tokens, emb, N, d);
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

// grid (n_uniq, ceil(d / blockDim)): block (u, cb) owns columns [cb*blockDim, ...) of token uniq[u].
static __global__ void embedding_backward_kernel(float *demb, const float *dx, const int *uniq, const int *offsets,
                                                 const int *positions, int d) {
    int u = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float acc = 0.0f;
    for (int i = offsets[u]; i < offsets[u + 1]; i++) acc += dx[(int64_t)positions[i] * d + c];
    demb[(int64_t)uniq[u] * d + c] += acc;
}

void embedding_backward(float *demb, const float *dx, const int *uniq, const int *offsets, const int *positions,
                        int n_uniq, int d, cudaStream_t stream) {
    if (n_uniq == 0) return;
    const int threads = 256;
    dim3 grid(n_uniq, cdiv_u(d, threads));
    embedding_backward_kernel<<<grid, threads, 0, stream>>>(demb, dx, uniq, offsets, positions, d);
    KERNEL_CHECK();
}
