// The step's statistics on the device (see stats.cuh).
#include "stats.cuh"

enum { STATS_THREADS = 256 };

// The sum of x (n) fp64 by the block: strided partial sums in order, then a fixed tree.
static __device__ double stats_block_sum(const double *x, int n, double *shm) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
    return block_sum_d(acc, shm);
}

static __global__ void stats_accumulate_kernel(StepStats st, const int *offsets, const int *dual_cnt,
                                               const double *primal_tok, int tok_stride, int n_moe, int E, int NK,
                                               const double *losses, int N, const double *aux, double loss_div) {
    __shared__ double shm[32];
    // Counts from the permutation's offsets (what the experts received), and
    // its consistency: every layer's last offset is the N K routed slots.
    for (int i = threadIdx.x; i < n_moe * E; i += blockDim.x) {
        const int *off = offsets + (size_t)(i / E) * (E + 1) + i % E;
        st.counts[i] += off[1] - off[0];
    }
    if (threadIdx.x == 0)
        for (int m = n_moe - 1; m >= 0; m--) // the first bad layer is written last
            if (offsets[(size_t)m * (E + 1) + E] != NK) *st.bad = m + 1;
    for (int i = threadIdx.x; i < n_moe * 3 * E; i += blockDim.x) st.dual[i] += dual_cnt[i];
    for (int m = 0; m < n_moe; m++) {
        double p = stats_block_sum(primal_tok + (size_t)m * tok_stride, N, shm);
        if (threadIdx.x == 0) st.primal[m] += p;
    }
    if (losses) {
        double acc = stats_block_sum(losses, N, shm);
        if (threadIdx.x == 0) st.sums[0] += acc / N / loss_div;
    }
    if (threadIdx.x == 0) {
        double a = 0.0;
        for (int m = 0; m < n_moe; m++) a += aux[m]; // in layer order, as the host did
        st.sums[1] += a / loss_div;
    }
}

void stats_accumulate(StepStats st, const int *offsets, const int *dual_cnt, const double *primal_tok, int tok_stride,
                      int n_moe, int E, int NK, const double *losses, int N, const double *aux, double loss_div,
                      cudaStream_t stream) {
    stats_accumulate_kernel<<<1, STATS_THREADS, 0, stream>>>(st, offsets, dual_cnt, primal_tok, tok_stride, n_moe, E,
                                                             NK, losses, N, aux, loss_div);
    KERNEL_CHECK();
}
