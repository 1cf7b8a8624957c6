// The step's statistics on the device (see stats.cuh).
#include "stats.cuh"

enum { STATS_THREADS = 256 };

static __global__ void stats_accumulate_kernel(StepStats st, const int *offsets, int n_moe, int E, int NK,
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
    if (losses) {
        // Each thread sums a strided subset in order, then a fixed tree.
        double acc = 0.0;
        for (int i = threadIdx.x; i < N; i += blockDim.x) acc += losses[i];
        acc = block_sum_d(acc, shm);
        if (threadIdx.x == 0) st.sums[0] += acc / N / loss_div;
    }
    if (threadIdx.x == 0) {
        double a = 0.0;
        for (int m = 0; m < n_moe; m++) a += aux[m]; // in layer order, as the host did
        st.sums[1] += a / loss_div;
    }
}

void stats_accumulate(StepStats st, const int *offsets, int n_moe, int E, int NK, const double *losses, int N,
                      const double *aux, double loss_div, cudaStream_t stream) {
    stats_accumulate_kernel<<<1, STATS_THREADS, 0, stream>>>(st, offsets, n_moe, E, NK, losses, N, aux, loss_div);
    KERNEL_CHECK();
}
