// Fused softmax + cross-entropy + gradient (see classifier.cuh). One block
// per row; each thread takes groups of VEC_X consecutive logits
// (kernels/vec.cuh). Two passes over the row instead of three: the first
// reads it once for both the maximum and the sum of exponentials (an online
// softmax: the running sum is rescaled whenever the running maximum grows,
// Milakov & Gimelshein, arXiv 1805.02867), the second writes the gradient.
#include "classifier.cuh"

#include "vec.cuh"

// A running maximum m and sum s of exp(x - m) over some logits.
struct MaxSum {
    float m, s;
};

// The pair of the union of two sets of logits. Symmetric in a and b (the
// same two products added), so an xor butterfly leaves the same bits in
// every lane.
__device__ __forceinline__ MaxSum maxsum_combine(MaxSum a, MaxSum b) {
    float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return { m, 0.0f }; // both empty
    return { m, a.s * expf(a.m - m) + b.s * expf(b.m - m) };
}

// Over the block (as block_sum in common.cuh), returned to every thread.
// shm: 32 pairs of shared memory.
__device__ __forceinline__ MaxSum block_maxsum(MaxSum v, MaxSum *shm) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int off = 16; off > 0; off >>= 1)
        v = maxsum_combine(v, { __shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off) });
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shm[lane] : MaxSum{ -INFINITY, 0.0f };
    for (int off = 16; off > 0; off >>= 1)
        v = maxsum_combine(v, { __shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off) });
    return v;
}

template <bool ALIGNED>
static __global__ void classifier_kernel(floatX *logits, double *losses, const int *targets, int V, float dscale,
                                         int write_grad) {
    __shared__ MaxSum shm[32];
    int64_t row = blockIdx.x;
    floatX *l = logits + row * V;
    int target = targets[row];
    // Read before the block reduction, whose barrier orders it before any
    // thread overwrites the row with its gradient.
    float target_logit = threadIdx.x == 0 ? to_f(l[target]) : 0.0f;
    MaxSum acc = { -INFINITY, 0.0f };
    for (int c = threadIdx.x * VEC_X; c < V; c += blockDim.x * VEC_X) {
        float x[VEC_X];
        int n = min(VEC_X, V - c);
        vec_load<ALIGNED>(x, l + c, n);
        float gm = x[0];
        for (int i = 1; i < VEC_X; i++)
            if (i < n) gm = fmaxf(gm, x[i]);
        if (gm > acc.m) { // a new maximum: the sum so far is relative to the old one
            acc.s *= expf(acc.m - gm);
            acc.m = gm;
        }
        for (int i = 0; i < VEC_X; i++)
            if (i < n) acc.s += expf(x[i] - acc.m);
    }
    MaxSum tot = block_maxsum(acc, shm);
    if (threadIdx.x == 0) losses[row] = (double)tot.m + log((double)tot.s) - (double)target_logit;
    if (!write_grad) return;
    for (int c = threadIdx.x * VEC_X; c < V; c += blockDim.x * VEC_X) {
        float x[VEC_X];
        int n = min(VEC_X, V - c);
        vec_load<ALIGNED>(x, l + c, n);
        for (int i = 0; i < VEC_X; i++) {
            float p = expf(x[i] - tot.m) / tot.s;
            x[i] = (p - (c + i == target ? 1.0f : 0.0f)) * dscale;
        }
        vec_store<ALIGNED>(l + c, x, n);
    }
}

void classifier_forward(floatX *logits, double *losses, const int *targets, int N, int V, float dscale,
                        int write_grad, cudaStream_t stream) {
    const int threads = 512;
    if (vec_path(V % VEC_X == 0, logits))
        classifier_kernel<true><<<N, threads, 0, stream>>>(logits, losses, targets, V, dscale, write_grad);
    else
        classifier_kernel<false><<<N, threads, 0, stream>>>(logits, losses, targets, V, dscale, write_grad);
    KERNEL_CHECK();
}
