// Expert-order permutation, gather, combine and their backward (see permute.cuh).
#include "permute.cuh"

#include "vec.cuh"

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
//
// The block then gathers the rows it placed: xe[row] = h[slot / K]
// for its PERMUTE_CHUNK slots. Fusing the gather here saves a launch and a
// pass over slot_of, and the block already holds its slots' rows (in shared
// memory). Each of the chunk's rows is copied by consecutive threads, one
// group of VEC_X columns each (kernels/vec.cuh), so reads of h and writes of
// xe are row-contiguous.
template <bool ALIGNED>
static __global__ void permute_place_kernel(int *row_of, int *slot_of, int *offsets, const int *chunk_base,
                                            const int *colsum, const int *counts, const int *sel, int NK, int E,
                                            floatX *xe, const floatX *h, int K, int d) {
    __shared__ int s_sel[PERMUTE_CHUNK];
    __shared__ int s_row[PERMUTE_CHUNK];
    if (blockIdx.x == 0) {
        int bad = 0;
        for (int x = threadIdx.x; x < E; x += blockDim.x) bad += colsum[x] != counts[x];
        block_scan_int(bad, s_sel);
        int n_bad = s_sel[blockDim.x - 1];
        __syncthreads(); // every thread has the total before s_sel is reused
        if (threadIdx.x == 0) offsets[E] = n_bad ? -1 : NK;
    }
    int64_t i0 = (int64_t)blockIdx.x * PERMUTE_CHUNK, i = i0 + threadIdx.x;
    int e = i < NK ? sel[i] : -1;
    s_sel[threadIdx.x] = e;
    __syncthreads();
    if (i < NK) {
        int rank = 0;
        for (int j = 0; j < (int)threadIdx.x; j++) rank += s_sel[j] == e;
        int row = chunk_base[(int64_t)blockIdx.x * E + e] + rank;
        row_of[i] = row;
        slot_of[row] = (int)i;
        s_row[threadIdx.x] = row;
    }
    __syncthreads(); // s_row complete
    int n = (int)min((int64_t)PERMUTE_CHUNK, (int64_t)NK - i0); // slots of this chunk
    int groups = (d + VEC_X - 1) / VEC_X;
    for (int idx = threadIdx.x; idx < n * groups; idx += blockDim.x) {
        int j = idx / groups, c = (idx % groups) * VEC_X;
        vec_copy<ALIGNED, VEC_X>(xe + (int64_t)s_row[j] * d + c, h + ((i0 + j) / K) * d + c, d - c);
    }
}

void moe_permute(int *offsets, int *row_of, int *slot_of, int *scratch, const int *sel, const int *counts, int NK,
                 int E, floatX *xe, const floatX *h, int K, int d, cudaStream_t stream) {
    int nchunks = (int)cdiv_u(NK, PERMUTE_CHUNK);
    int *chunk_base = scratch, *colsum = scratch + (size_t)nchunks * E; // (nchunks, E), (E)
    permute_hist_kernel<<<nchunks, PERMUTE_CHUNK, sizeof(int) * E, stream>>>(chunk_base, sel, NK, E);
    KERNEL_CHECK();
    permute_scan_kernel<<<E, PERMUTE_SCAN_THREADS, 0, stream>>>(offsets, chunk_base, colsum, counts, E, nchunks);
    KERNEL_CHECK();
    if (vec_path(d % VEC_X == 0, xe, h))
        permute_place_kernel<true><<<nchunks, PERMUTE_CHUNK, 0, stream>>>(row_of, slot_of, offsets, chunk_base,
                                                                          colsum, counts, sel, NK, E, xe, h, K, d);
    else
        permute_place_kernel<false><<<nchunks, PERMUTE_CHUNK, 0, stream>>>(row_of, slot_of, offsets, chunk_base,
                                                                           colsum, counts, sel, NK, E, xe, h, K, d);
    KERNEL_CHECK();
}

// The row kernels below give each thread a group of VEC_X consecutive
// columns of one row (kernels/vec.cuh): 16-byte accesses when d is a whole
// number of groups and the arrays are aligned.

// One thread per (token, group): the K gated rows added in slot order.
template <bool ALIGNED>
static __global__ void moe_combine_forward_kernel(float *out, const floatX *eout, const float *gates,
                                                  const int *row_of, int N, int K, int d) {
    int groups = (d + VEC_X - 1) / VEC_X;
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)N * groups) return;
    int64_t t = idx / groups;
    int c = (int)(idx % groups) * VEC_X;
    float o[VEC_X];
    vec_load<ALIGNED>(o, out + t * d + c, d - c);
    for (int j = 0; j < K; j++) {
        float e[VEC_X], g = gates[t * K + j];
        vec_load<ALIGNED>(e, eout + (int64_t)row_of[t * K + j] * d + c, d - c);
        for (int i = 0; i < VEC_X; i++) o[i] += g * e[i];
    }
    vec_store<ALIGNED>(out + t * d + c, o, d - c);
}

void moe_combine_forward(float *out, const floatX *eout, const float *gates, const int *row_of, int N, int K, int d,
                         cudaStream_t stream) {
    const int threads = 256;
    unsigned int blocks = cdiv_u((int64_t)N * cdiv_u(d, VEC_X), threads);
    if (vec_path(d % VEC_X == 0, out, eout))
        moe_combine_forward_kernel<true><<<blocks, threads, 0, stream>>>(out, eout, gates, row_of, N, K, d);
    else
        moe_combine_forward_kernel<false><<<blocks, threads, 0, stream>>>(out, eout, gates, row_of, N, K, d);
    KERNEL_CHECK();
}

// One warp per token; the K dot products are warp reductions (fixed order),
// with no block-wide barrier.
template <bool ALIGNED>
static __global__ void moe_combine_backward_kernel(floatX *deout, float *dgates, const float *dout,
                                                   const floatX *eout, const float *gates, const int *row_of, int N,
                                                   int K, int d) {
    int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (t >= N) return;
    const float *go = dout + t * d;
    for (int j = 0; j < K; j++) {
        int64_t row = row_of[t * K + j];
        float g = gates[t * K + j], dot = 0.0f;
        for (int c = lane * VEC_X; c < d; c += 32 * VEC_X) {
            float gv[VEC_X], e[VEC_X], de[VEC_X];
            vec_load<ALIGNED>(gv, go + c, d - c); // from L1 after the first j
            vec_load<ALIGNED>(e, eout + row * d + c, d - c);
            for (int i = 0; i < VEC_X; i++) {
                dot += gv[i] * e[i];
                de[i] = g * gv[i];
            }
            vec_store<ALIGNED>(deout + row * d + c, de, d - c);
        }
        dot = warp_sum(dot);
        if (lane == 0) dgates[t * K + j] = dot;
    }
}

void moe_combine_backward(floatX *deout, float *dgates, const float *dout, const floatX *eout, const float *gates,
                          const int *row_of, int N, int K, int d, cudaStream_t stream) {
    const int threads = 256, tokens = threads / 32;
    if (vec_path(d % VEC_X == 0, deout, dout, eout))
        moe_combine_backward_kernel<true><<<cdiv_u(N, tokens), threads, 0, stream>>>(deout, dgates, dout, eout, gates,
                                                                                     row_of, N, K, d);
    else
        moe_combine_backward_kernel<false><<<cdiv_u(N, tokens), threads, 0, stream>>>(deout, dgates, dout, eout,
                                                                                      gates, row_of, N, K, d);
    KERNEL_CHECK();
}

// One thread per (token, group): the K rows added in slot order.
template <bool ALIGNED>
static __global__ void moe_scatter_kernel(float *dh, const floatX *dxe, const int *row_of, int N, int K, int d) {
    int groups = (d + VEC_X - 1) / VEC_X;
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)N * groups) return;
    int64_t t = idx / groups;
    int c = (int)(idx % groups) * VEC_X;
    float o[VEC_X] = {};
    for (int j = 0; j < K; j++) {
        float e[VEC_X];
        vec_load<ALIGNED>(e, dxe + (int64_t)row_of[t * K + j] * d + c, d - c);
        for (int i = 0; i < VEC_X; i++) o[i] += e[i];
    }
    vec_store<ALIGNED>(dh + t * d + c, o, d - c);
}

void moe_scatter(float *dh, const floatX *dxe, const int *row_of, int N, int K, int d, cudaStream_t stream) {
    const int threads = 256;
    unsigned int blocks = cdiv_u((int64_t)N * cdiv_u(d, VEC_X), threads);
    if (vec_path(d % VEC_X == 0, dh, dxe))
        moe_scatter_kernel<true><<<blocks, threads, 0, stream>>>(dh, dxe, row_of, N, K, d);
    else
        moe_scatter_kernel<false><<<blocks, threads, 0, stream>>>(dh, dxe, row_of, N, K, d);
    KERNEL_CHECK();
}
