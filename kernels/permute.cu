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

// Inclusive prefix sum over the block of one int per thread (Hillis-Steele in
// shared memory: log2(blockDim.x) rounds; integer sums, so any order gives the
// same result). shm: blockDim.x ints; the block's total is shm[blockDim.x - 1]
// until the next call.
static __device__ int block_scan_int(int v, int *shm) {
    __syncthreads(); // shm may still be read by a previous call
    shm[threadIdx.x] = v;
    __syncthreads();
    for (int off = 1; off < (int)blockDim.x; off <<= 1) {
        int add = threadIdx.x >= (unsigned)off ? shm[threadIdx.x - off] : 0;
        __syncthreads();
        shm[threadIdx.x] += add;
        __syncthreads();
    }
    return shm[threadIdx.x];
}

// (2) grid = E, block = PERMUTE_SCAN_THREADS: block e writes offsets[e], the
// rows of the experts before e, then walks the chunks in order, a tile of
// PERMUTE_SCAN_THREADS chunks per round, turning chunk_base[c, e] from chunk
// c's count of expert e into the first row those slots take. colsum[e]
// receives the rows the chunks gave expert e, for the check in (3).
static __global__ void permute_scan_kernel(int *offsets, int *chunk_base, int *colsum, const int *counts, int E,
                                           int nchunks) {
    __shared__ int shm[PERMUTE_SCAN_THREADS];
    int e = blockIdx.x;
    int before = 0;
    for (int i = threadIdx.x; i < e; i += blockDim.x) before += counts[i];
    block_scan_int(before, shm);
    int first = shm[blockDim.x - 1]; // offsets[e]
    int base = first;
    for (int c0 = 0; c0 < nchunks; c0 += blockDim.x) {
        int c = c0 + threadIdx.x;
        int n = c < nchunks ? chunk_base[(int64_t)c * E + e] : 0;
        int incl = block_scan_int(n, shm);
        if (c < nchunks) chunk_base[(int64_t)c * E + e] = base + incl - n;
        base += shm[blockDim.x - 1];
    }
    if (threadIdx.x == 0) {
        offsets[e] = first;
        colsum[e] = base - first;
    }
}

// (3) grid = chunks, block = PERMUTE_CHUNK. Block 0 also writes offsets[E]:
// NK when every expert got from the chunks the rows its count promised, -1
// otherwise (the counts disagree with sel: a bug upstream).
static __global__ void permute_place_kernel(int *row_of, int *slot_of, int *offsets, const int *chunk_base,
                                            const int *colsum, const int *counts, const int *sel, int NK, int E) {
    __shared__ int s_sel[PERMUTE_CHUNK];
    if (blockIdx.x == 0) {
        int bad = 0;
        for (int x = threadIdx.x; x < E; x += blockDim.x) bad += colsum[x] != counts[x];
        block_scan_int(bad, s_sel);
        int n_bad = s_sel[blockDim.x - 1];
        __syncthreads(); // every thread has the total before s_sel is reused
        if (threadIdx.x == 0) offsets[E] = n_bad ? -1 : NK;
    }
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
    int *chunk_base = scratch, *colsum = scratch + (size_t)nchunks * E; // (nchunks, E), (E)
    permute_hist_kernel<<<nchunks, PERMUTE_CHUNK, sizeof(int) * E, stream>>>(chunk_base, sel, NK, E);
    KERNEL_CHECK();
    permute_scan_kernel<<<E, PERMUTE_SCAN_THREADS, 0, stream>>>(offsets, chunk_base, colsum, counts, E, nchunks);
    KERNEL_CHECK();
    permute_place_kernel<<<nchunks, PERMUTE_CHUNK, 0, stream>>>(row_of, slot_of, offsets, chunk_base, colsum, counts,
                                                                sel, NK, E);
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
