// Expert-order permutation, gather, combine and their backward (see permute.cuh).
#include "permute.cuh"

// (1) grid = chunks, block = PERMUTE_CHUNK; shared: hist (E) ints.
static __global__ void permute_hist_kernel(int *chunk_counts, const int *sel, int NK, int E) {
    extern __shared__ int hist[];
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    int64_t i = (int64_t)blockIdx.x * PERMUTE_CHUNK + threadIdx.x;
    if (i < NK) atomicAdd(&hist[sel[i]], 1); // integer counts: the order of the adds does not matter
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) chunk_counts[(int64_t)blockIdx.x * E + e] = hist[e];
}

// (2) one block: offsets from counts, then per expert (one thread each) the
// running first row of every chunk, in chunk order.
static __global__ void permute_scan_kernel(int *offsets, int *chunk_base, const int *counts, int E, int nchunks) {
    if (threadIdx.x == 0) {
        int run = 0;
        for (int e = 0; e < E; e++) {
            offsets[e] = run;
            run += counts[e];
        }
        offsets[E] = run;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int base = offsets[e];
        for (int c = 0; c < nchunks; c++) {
            int n = chunk_base[(int64_t)c * E + e];
            chunk_base[(int64_t)c * E + e] = base;
            base += n;
        }
        if (base != offsets[e] + counts[e]) offsets[E] = -1; // counts and sel disagree: a bug upstream
    }
}

// (3) grid = chunks, block = PERMUTE_CHUNK.
static __global__ void permute_place_kernel(int *row_of, int *slot_of, const int *chunk_base, const int *sel, int NK,
                                            int E) {
    __shared__ int s_sel[PERMUTE_CHUNK];
    int64_t i = (int64_t)blockIdx.x * PERMUTE_CHUNK + threadIdx.x;
    int e = i < NK ? sel[i] : -1;
    s_sel[threadIdx.x] = e;
    __syncthreads();
    if (i >= NK) return;
    int rank = 0;
    for (int j = 0; j < (int)threadIdx.x; j++) rank += s_sel[j] == e;
    int row = chunk_base[(int64_t)blockIdx.x * E + e] + rank;
    row_of[i] = row;
    slot_of[row] = (int)i;
}

void moe_permute(int *offsets, int *row_of, int *slot_of, int *scratch, const int *sel, const int *counts, int NK,
                 int E, cudaStream_t stream) {
    int nchunks = (int)cdiv_u(NK, PERMUTE_CHUNK);
    permute_hist_kernel<<<nchunks, PERMUTE_CHUNK, sizeof(int) * E, stream>>>(scratch, sel, NK, E);
    KERNEL_CHECK();
    permute_scan_kernel<<<1, 256, 0, stream>>>(offsets, scratch, counts, E, nchunks);
    KERNEL_CHECK();
    permute_place_kernel<<<nchunks, PERMUTE_CHUNK, 0, stream>>>(row_of, slot_of, scratch, sel, NK, E);
    KERNEL_CHECK();
}

// One block per row.
static __global__ void moe_gather_kernel(floatX *xe, const floatX *h, const int *slot_of, int K, int d) {
    int64_t r = blockIdx.x;
    const floatX *src = h + (int64_t)(slot_of[r] / K) * d;
    floatX *dst = xe + r * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

void moe_gather(floatX *xe, const floatX *h, const int *slot_of, int NK, int K, int d, cudaStream_t stream) {
    if (NK == 0) return;
    moe_gather_kernel<<<NK, 256, 0, stream>>>(xe, h, slot_of, K, d);
    KERNEL_CHECK();
}

// One block per token.
static __global__ void moe_combine_forward_kernel(float *out, const floatX *eout, const float *gates,
                                                  const int *row_of, int K, int d) {
    int64_t t = blockIdx.x;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float o = out[t * d + c];
        for (int j = 0; j < K; j++) o += gates[t * K + j] * to_f(eout[(int64_t)row_of[t * K + j] * d + c]);
        out[t * d + c] = o;
    }
}

void moe_combine_forward(float *out, const floatX *eout, const float *gates, const int *row_of, int N, int K, int d,
                         cudaStream_t stream) {
    moe_combine_forward_kernel<<<N, 256, 0, stream>>>(out, eout, gates, row_of, K, d);
    KERNEL_CHECK();
}

// One block per token; the K dot products are block reductions (fixed order).
static __global__ void moe_combine_backward_kernel(floatX *deout, float *dgates, const float *dout,
                                                   const floatX *eout, const float *gates, const int *row_of, int K,
                                                   int d) {
    __shared__ float shm[32];
    int64_t t = blockIdx.x;
    const float *go = dout + t * d;
    for (int j = 0; j < K; j++) {
        int64_t row = row_of[t * K + j];
        float g = gates[t * K + j], dot = 0.0f;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            dot += go[c] * to_f(eout[row * d + c]);
            deout[row * d + c] = to_x(g * go[c]);
        }
        dot = block_sum(dot, shm);
        if (threadIdx.x == 0) dgates[t * K + j] = dot;
    }
}

void moe_combine_backward(floatX *deout, float *dgates, const float *dout, const floatX *eout, const float *gates,
                          const int *row_of, int N, int K, int d, cudaStream_t stream) {
    moe_combine_backward_kernel<<<N, 256, 0, stream>>>(deout, dgates, dout, eout, gates, row_of, K, d);
    KERNEL_CHECK();
}

// One block per token.
static __global__ void moe_scatter_kernel(float *dh, const floatX *dxe, const int *row_of, int K, int d) {
    int64_t t = blockIdx.x;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float o = 0.0f;
        for (int j = 0; j < K; j++) o += to_f(dxe[(int64_t)row_of[t * K + j] * d + c]);
        dh[t * d + c] = o;
    }
}

void moe_scatter(float *dh, const floatX *dxe, const int *row_of, int N, int K, int d, cudaStream_t stream) {
    moe_scatter_kernel<<<N, 256, 0, stream>>>(dh, dxe, row_of, K, d);
    KERNEL_CHECK();
}
