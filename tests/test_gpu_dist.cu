// GPU tests of the multi-GPU code on ONE GPU (make test-gpu; make test-emu on the CPU emulator).
// One line per check with the measured error; exit status 1 on any failure.
//
//  1. dispatch: the EP bookkeeping (parallel/ep_layout.h: ep_exchange_rows / ep_expert_major_order) and the row
//     kernels (moe_rows_gather / moe_rows_scatter) with P virtual ranks whose
//     all-to-alls are cudaMemcpy's: every expert rank must hold exactly
//     [local expert][source rank][token] rows, model/moe.c's order, and the
//     return trip must give every rank its rows back bit for bit;
//  2. NCCL with one rank (the build-without-MPI communicator, parallel/comm_nccl.c):
//     the host collectives' staging paths (self-test), then 3 training steps
//     (forward, backward, sync_grads, grad_norm, AdamW, bias update) of the
//     backend through NCCL, with and without the EP exchange forced, and
//     through the virtual transport below: losses, counts, gradient norms,
//     gradients, parameters, AdamW moments and biases bitwise equal to the
//     backend without any communicator; and the same 3 steps, their
//     micro-batch captured into a graph, while another thread allocates,
//     frees and uses the legacy default stream without pause (what ranks as
//     threads do; the capture waits for a whole round of its calls): the
//     other thread's calls succeed, the results are the same;
//  3. several virtual ranks: W backends in W threads on the one GPU, their
//     collectives simulated (tests-only GpuComm: barriers + device copies,
//     sums in rank order), data parallel and expert parallel (W, ep) =
//     (2, 1), (2, 2), (4, 2), (4, 4), against one backend that sees the same
//     W micro-batches as one: summed counts, mean loss, gradient norm,
//     synchronised gradients, parameters and AdamW moments after 3 steps,
//     biases; and what must hold exactly whatever the precision: replicated
//     gradients and all gathered parameters identical on every rank, the
//     gradient norm identical on every rank, rows conserved by the exchange,
//     get_params(set_params(p)) == p under expert parallelism.
//
// NCCL itself with several ranks needs several GPUs: not tested here (see
// docs/gpu.md, "What is untested").
//
//   test_gpu_dist [--quick]     (--quick: parts 1 and 2 and one case of 3, for compute-sanitizer)
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <thread>
#include <vector>

extern "C" {
#include "parallel/comm.h"
#include "parallel/ep_layout.h"
#include "model/balance.h"
#include "model/config.h"
#include "model/layout.h"
#include "train/optim.h"
}

#include "parallel/comm_nccl.h"
#include "kernels/common.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/gpu_backend.cuh"

#define GPU_CHECK_WIDTH 52
#include "tests/gpu_check.h"

#ifdef ENABLE_FP32
#define TOL_LOSS 1e-5   // relative
#define TOL_GRAD 1e-4   // relative to the tensor's largest entry (test_dist.sh's scale)
#define TOL_NORM 1e-5   // relative
#define TOL_PARAM 1e-4  // max abs after 3 steps (test_dist.sh: 1e-4 after 10)
#define TOL_MOM 1e-4    // AdamW moments relative to the largest
#else
// One GPU computing W micro-batches as one GEMM vs W GEMMs differs by fp32
// accumulation order, which bf16 rounding of the activations can turn into
// one-ulp (2^-9) differences. On the CPU emulator (whose GEMMs sum in the same
// order either way) the worst errors are loss 1.6e-4, gradient norm 3.9e-4,
// parameters 1.0e-2 and AdamW m 1.2e-2; cuBLAS's split of the work differs
// between the two shapes, so the GPU's will be larger: these are estimates.
#define TOL_LOSS 1e-2
#define TOL_GRAD 5e-2
#define TOL_NORM 5e-2
#define TOL_PARAM 0.25  // RMS(diff) / RMS(parameter change)
#define TOL_MOM 0.25    // RMS(diff) / RMS(moment)
#endif

// ----------------------------------------------------------------------------
// 1. Dispatch bookkeeping and row kernels, P virtual ranks, cudaMemcpy exchange

static uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Byte c of token-side row r of rank q.
static unsigned char row_byte(int q, int r, size_t c) {
    return (unsigned char)mix64(((uint64_t)q << 48) ^ ((uint64_t)r << 20) ^ c);
}

// skew 0: uniform; 1: the experts of the last rank are never chosen (it
// receives no rows); 2: half the first choices go to local expert 0 of rank 0.
static void test_dispatch_case(const char *name, int P, int El, int K, const int *Nq, int skew, size_t rb,
                               uint64_t seed) {
    int E = P * El;
    std::vector<std::vector<int>> off(P), cnt(P);
    std::vector<unsigned char *> d_xs(P), d_ys(P);
    std::vector<std::vector<unsigned char>> h_xs(P);
    Rng rng = { seed };
    for (int q = 0; q < P; q++) {
        int N = Nq[q], NK = N * K;
        int lo = 0, hi = skew == 1 ? E - El : E; // choices in [lo, hi)
        std::vector<int> sel(NK);
        for (int t = 0; t < N; t++)
            for (int j = 0; j < K; j++) {
                int e;
                for (;;) { // K distinct experts
                    e = (skew == 2 && j == 0 && rng_u64(&rng) % 2 == 0) ? 0
                                                                        : lo + (int)(rng_u64(&rng) % (uint64_t)(hi - lo));
                    int dup = 0;
                    for (int jj = 0; jj < j; jj++) dup |= sel[t * K + jj] == e;
                    if (!dup) break;
                }
                sel[t * K + j] = e;
            }
        cnt[q].assign(E, 0);
        off[q].assign(E + 1, 0);
        for (int i = 0; i < NK; i++) cnt[q][sel[i]]++;
        for (int e = 0; e < E; e++) off[q][e + 1] = off[q][e] + cnt[q][e];
        h_xs[q].resize((size_t)NK * rb + 1);
        for (int r = 0; r < NK; r++)
            for (size_t c = 0; c < rb; c++) h_xs[q][(size_t)r * rb + c] = row_byte(q, r, c);
        CUDA_CHECK(cudaMalloc(&d_xs[q], (size_t)NK * rb + 1));
        CUDA_CHECK(cudaMalloc(&d_ys[q], (size_t)NK * rb + 1));
        CUDA_CHECK(cudaMemcpy(d_xs[q], h_xs[q].data(), (size_t)NK * rb, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemset(d_ys[q], 0, (size_t)NK * rb + 1));
    }
    int order_bad = 0, off_bad = 0, rows_bad = 0, empty_ranks = 0;
    std::vector<std::vector<int>> send_rows(P, std::vector<int>(P)), recv_rows(P, std::vector<int>(P));
    std::vector<int> Rp(P);
    std::vector<unsigned char *> d_xe(P), d_yr(P);
    std::vector<int *> d_idx(P);
    for (int p = 0; p < P; p++) {
        std::vector<int> recv_cnt(E); // (P, El): what the counts all-to-all delivers to rank p
        for (int q = 0; q < P; q++)
            for (int j = 0; j < El; j++) recv_cnt[q * El + j] = cnt[q][p * El + j];
        EpShard ep = { P, p, El };
        Rp[p] = ep_exchange_rows(&ep, off[p].data(), recv_cnt.data(), send_rows[p].data(), recv_rows[p].data());
        empty_ranks += Rp[p] == 0;
        std::vector<int> exp_off(El + 1), exp_src(Rp[p] + 1);
        ep_expert_major_order(&ep, recv_cnt.data(), recv_rows[p].data(), exp_off.data(), exp_src.data());
        // The all-to-all-v, simulated: rank q's block for p starts at its row off[q][p El].
        unsigned char *xr;
        CUDA_CHECK(cudaMalloc(&xr, (size_t)Rp[p] * rb + 1));
        CUDA_CHECK(cudaMalloc(&d_xe[p], (size_t)Rp[p] * rb + 1));
        CUDA_CHECK(cudaMalloc(&d_yr[p], (size_t)Rp[p] * rb + 1));
        CUDA_CHECK(cudaMalloc(&d_idx[p], sizeof(int) * (Rp[p] + 1)));
        size_t ro = 0;
        for (int q = 0; q < P; q++) {
            int n = off[q][(p + 1) * El] - off[q][p * El];
            rows_bad += n != recv_rows[p][q];
            CUDA_CHECK(cudaMemcpy(xr + ro * rb, d_xs[q] + (size_t)off[q][p * El] * rb, (size_t)n * rb,
                                  cudaMemcpyDeviceToDevice));
            ro += (size_t)n;
        }
        CUDA_CHECK(cudaMemcpy(d_idx[p], exp_src.data(), sizeof(int) * Rp[p], cudaMemcpyHostToDevice));
        moe_rows_gather(d_xe[p], xr, d_idx[p], Rp[p], rb, 0);
        std::vector<unsigned char> xe((size_t)Rp[p] * rb + 1);
        CUDA_CHECK(cudaMemcpy(xe.data(), d_xe[p], (size_t)Rp[p] * rb, cudaMemcpyDeviceToHost));
        // Expected: local expert j's rows from rank 0, then rank 1, ..., each in token-side order.
        int row = 0;
        for (int j = 0; j < El; j++) {
            off_bad += exp_off[j] != row;
            for (int q = 0; q < P; q++)
                for (int r = off[q][p * El + j]; r < off[q][p * El + j + 1]; r++, row++)
                    for (size_t c = 0; c < rb; c++) order_bad += xe[(size_t)row * rb + c] != row_byte(q, r, c);
        }
        off_bad += exp_off[El] != row || row != Rp[p];
        // Return trip, step one: back to received order.
        moe_rows_scatter(d_yr[p], d_xe[p], d_idx[p], Rp[p], rb, 0);
        CUDA_CHECK(cudaFree(xr));
    }
    // Step two: the reverse all-to-all-v into every rank's token side.
    for (int q = 0; q < P; q++)
        for (int p = 0; p < P; p++) {
            size_t ro = 0;
            for (int qq = 0; qq < q; qq++) ro += (size_t)recv_rows[p][qq];
            CUDA_CHECK(cudaMemcpy(d_ys[q] + (size_t)off[q][p * El] * rb, d_yr[p] + ro * rb,
                                  (size_t)recv_rows[p][q] * rb, cudaMemcpyDeviceToDevice));
        }
    int back_bad = 0;
    for (int q = 0; q < P; q++) {
        std::vector<unsigned char> ys(h_xs[q].size());
        CUDA_CHECK(cudaMemcpy(ys.data(), d_ys[q], (size_t)Nq[q] * K * rb, cudaMemcpyDeviceToHost));
        back_bad += memcmp(ys.data(), h_xs[q].data(), (size_t)Nq[q] * K * rb) != 0;
    }
    char detail[200];
    snprintf(detail, sizeof detail, "(%zu-byte rows; R per rank:", rb);
    for (int p = 0; p < P; p++) snprintf(detail + strlen(detail), sizeof detail - strlen(detail), " %d", Rp[p]);
    snprintf(detail + strlen(detail), sizeof detail - strlen(detail), ")");
    printf("dispatch: %s, P=%d El=%d K=%d %s\n", name, P, El, K, detail);
    snprintf(detail, sizeof detail, "(%d bytes differ, %d offsets, %d row counts)", order_bad, off_bad, rows_bad);
    report_bool("expert side is [expert][source rank][token]", order_bad == 0 && off_bad == 0 && rows_bad == 0,
                detail);
    snprintf(detail, sizeof detail, "(%d ranks differ)", back_bad);
    report_bool("return trip gives every rank its rows back", back_bad == 0, detail);
    if (skew == 1) report_bool("a rank whose experts get no rows (R = 0)", empty_ranks >= 1, "");
    for (int p = 0; p < P; p++) {
        CUDA_CHECK(cudaFree(d_xs[p]));
        CUDA_CHECK(cudaFree(d_ys[p]));
        CUDA_CHECK(cudaFree(d_xe[p]));
        CUDA_CHECK(cudaFree(d_yr[p]));
        CUDA_CHECK(cudaFree(d_idx[p]));
    }
}

static void test_dispatch(void) {
    const int n3[3] = { 40, 1, 17 }, n4[4] = { 64, 64, 64, 64 }, n2[2] = { 300, 5 };
    test_dispatch_case("uneven token counts, 16-byte rows", 3, 4, 2, n3, 0, 32, 1);
    test_dispatch_case("4-byte-aligned rows", 4, 2, 3, n4, 0, 20, 2);
    test_dispatch_case("odd-sized rows", 2, 8, 6, n2, 0, 6, 3);
    test_dispatch_case("the last rank's experts never chosen", 4, 2, 2, n4, 1, 2048, 4);
    test_dispatch_case("skewed: many rows to one expert", 2, 8, 4, n2, 2, 256, 5);
    test_dispatch_case("one rank (identity)", 1, 8, 2, n2, 0, 64, 6);
}

// ----------------------------------------------------------------------------
// A simulation of W ranks in one process (tests only): every collective
// waits for the group's ranks at a barrier after their streams are idle,
// then each rank copies from the others' device buffers. Sums are taken in
// rank order, so every rank gets the same bits.

enum { MAXW = 8 };

typedef struct {
    int W, ep;
    pthread_barrier_t bar_world, bar_ep[MAXW], bar_edp[MAXW];
    const void *ptr[MAXW];      // posted by each rank
    const int *rows[MAXW];      // posted send_rows of each rank
} VWorld;

typedef struct {
    VWorld *w;
    int rank;
    void *tmp;                  // device scratch for the sums
    size_t tmp_bytes;
} VRank;

static void vworld_init(VWorld *w, int W, int ep) {
    memset(w, 0, sizeof *w);
    w->W = W;
    w->ep = ep;
    pthread_barrier_init(&w->bar_world, NULL, (unsigned)W);
    for (int i = 0; i < W / ep; i++) pthread_barrier_init(&w->bar_ep[i], NULL, (unsigned)ep);
    for (int i = 0; i < ep; i++) pthread_barrier_init(&w->bar_edp[i], NULL, (unsigned)(W / ep));
}

static void vworld_free(VWorld *w) {
    pthread_barrier_destroy(&w->bar_world);
    for (int i = 0; i < w->W / w->ep; i++) pthread_barrier_destroy(&w->bar_ep[i]);
    for (int i = 0; i < w->ep; i++) pthread_barrier_destroy(&w->bar_edp[i]);
}

// The members of rank's group g in group order, its position, and the group's barrier.
static int vgroup(const VRank *vr, CommGroup g, int *members, int *pos, pthread_barrier_t **bar) {
    VWorld *w = vr->w;
    int r = vr->rank, ep = w->ep, n = 0;
    if (g == COMM_WORLD) {
        for (int q = 0; q < w->W; q++) members[n++] = q;
        *pos = r;
        *bar = &w->bar_world;
    } else if (g == COMM_EP) {
        for (int i = 0; i < ep; i++) members[n++] = r / ep * ep + i;
        *pos = r % ep;
        *bar = &w->bar_ep[r / ep];
    } else {
        for (int i = 0; i < w->W / ep; i++) members[n++] = r % ep + i * ep;
        *pos = r / ep;
        *bar = &w->bar_edp[r % ep];
    }
    return n;
}

template <typename T>
static __global__ void vadd_kernel(T *a, const T *b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += b[i];
}

template <typename T>
static void vallreduce(void *ctx, CommGroup g, T *buf, size_t n, cudaStream_t st) {
    VRank *vr = (VRank *)ctx;
    int members[MAXW], pos;
    pthread_barrier_t *bar;
    int P = vgroup(vr, g, members, &pos, &bar);
    if (n * sizeof(T) > vr->tmp_bytes) {
        if (vr->tmp) CUDA_CHECK(cudaFree(vr->tmp));
        vr->tmp_bytes = n * sizeof(T);
        CUDA_CHECK(cudaMalloc(&vr->tmp, vr->tmp_bytes));
    }
    CUDA_CHECK(cudaStreamSynchronize(st));
    vr->w->ptr[vr->rank] = buf;
    pthread_barrier_wait(bar);
    T *tmp = (T *)vr->tmp;
    if (n > 0) {
        CUDA_CHECK(cudaMemcpyAsync(tmp, vr->w->ptr[members[0]], n * sizeof(T), cudaMemcpyDeviceToDevice, st));
        for (int i = 1; i < P; i++) {
            vadd_kernel<T><<<cdiv_u((int64_t)n, 256), 256, 0, st>>>(tmp, (const T *)vr->w->ptr[members[i]], n);
            KERNEL_CHECK();
        }
    }
    CUDA_CHECK(cudaStreamSynchronize(st));
    pthread_barrier_wait(bar); // everyone has read every buffer
    if (n > 0) CUDA_CHECK(cudaMemcpyAsync(buf, tmp, n * sizeof(T), cudaMemcpyDeviceToDevice, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
}

static void v_allreduce_f32(void *ctx, CommGroup g, float *buf, size_t n, cudaStream_t st) {
    vallreduce<float>(ctx, g, buf, n, st);
}
static void v_allreduce_f64(void *ctx, CommGroup g, double *buf, size_t n, cudaStream_t st) {
    vallreduce<double>(ctx, g, buf, n, st);
}

static void v_alltoall_i32(void *ctx, const int *send, int *recv, int n, cudaStream_t st) {
    VRank *vr = (VRank *)ctx;
    int members[MAXW], pos;
    pthread_barrier_t *bar;
    int P = vgroup(vr, COMM_EP, members, &pos, &bar);
    CUDA_CHECK(cudaStreamSynchronize(st));
    vr->w->ptr[vr->rank] = send;
    pthread_barrier_wait(bar);
    for (int i = 0; i < P; i++)
        CUDA_CHECK(cudaMemcpyAsync(recv + (size_t)i * n, (const int *)vr->w->ptr[members[i]] + (size_t)pos * n,
                                   sizeof(int) * n, cudaMemcpyDeviceToDevice, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    pthread_barrier_wait(bar);
}

static void v_alltoallv(void *ctx, const void *send, const int *send_rows, void *recv, const int *recv_rows,
                        size_t rb, cudaStream_t st) {
    VRank *vr = (VRank *)ctx;
    int members[MAXW], pos;
    pthread_barrier_t *bar;
    int P = vgroup(vr, COMM_EP, members, &pos, &bar);
    CUDA_CHECK(cudaStreamSynchronize(st));
    vr->w->ptr[vr->rank] = send;
    vr->w->rows[vr->rank] = send_rows;
    pthread_barrier_wait(bar);
    size_t ro = 0;
    for (int i = 0; i < P; i++) {
        const int *theirs = vr->w->rows[members[i]];
        size_t so = 0;
        for (int p = 0; p < pos; p++) so += (size_t)theirs[p];
        if (theirs[pos] != recv_rows[i]) {
            fprintf(stderr, "FAIL all-to-all-v: rank %d expects %d rows from rank %d, which sends %d\n", vr->rank,
                    recv_rows[i], members[i], theirs[pos]);
            exit(1);
        }
        if (recv_rows[i] > 0)
            CUDA_CHECK(cudaMemcpyAsync((char *)recv + ro * rb, (const char *)vr->w->ptr[members[i]] + so * rb,
                                       (size_t)recv_rows[i] * rb, cudaMemcpyDeviceToDevice, st));
        ro += (size_t)recv_rows[i];
    }
    CUDA_CHECK(cudaStreamSynchronize(st));
    pthread_barrier_wait(bar);
}

static GpuComm vcomm(VRank *vr) {
    GpuComm gc;
    memset(&gc, 0, sizeof gc);
    // The layout of parallel/comm.h, as the real communicators have it.
    Comm c = {vr->rank, vr->w->W, 1, 0, 1, vr->rank, NULL};
    char err[128];
    if (comm_layout_ep(&c, vr->w->ep, err, sizeof err) != 0) {
        fprintf(stderr, "bad test layout: %s\n", err);
        exit(1);
    }
    gc.world = c.world;
    gc.rank = c.rank;
    gc.ep = c.ep;
    gc.ep_rank = c.ep_rank;
    gc.edp = c.edp;
    gc.edp_rank = c.edp_rank;
    gc.ctx = vr;
    gc.allreduce_f32 = v_allreduce_f32;
    gc.allreduce_f64 = v_allreduce_f64;
    gc.alltoall_i32 = v_alltoall_i32;
    gc.alltoallv = v_alltoallv;
    return gc;
}

// ----------------------------------------------------------------------------
// Training runs: W ranks (threads), S steps, as train/trainer.c does them

enum { MODE_ALONE, MODE_NCCL, MODE_VIRTUAL };

typedef struct {
    MoeConfig c;
    RouteOptions ro = { 0, AUX_NONE, 0.0f, 0 };
    int Bl, T, S;               // micro-batch per rank, steps
    int W, ep, mode, force_exchange;
    const GpuComm *nccl;        // MODE_NCCL: the one-rank NCCL collectives
    const int *tokens, *targets; // (S, W Bl, T)
    const float *p0;            // initial whole-model parameters
    void (*capture_hook)(void *) = NULL; // gpu_debug_capture_hook on every rank
    void *capture_ctx = NULL;
} RunSpec;

typedef struct {
    std::vector<double> loss;          // (S) mean over ranks
    std::vector<int64_t> counts;       // (S, nmoe, E) summed over ranks
    std::vector<float> gnorm;          // (W, S)
    std::vector<float> grads;          // (W, n) step 1's synchronised gradient of each rank (whole layout, 0 elsewhere)
    std::vector<float> params, m, v;   // (W, n) get_params / get_opt_state of each rank at the end
    std::vector<float> bias;           // (W, nb)
    std::vector<int> rows;             // (W, nmoe) expert-side rows of the last forward
    std::vector<int> rt;               // (W) get_params(set_params(p)) == p and the same for the AdamW state
    int roundtrip_ok;                  // on every rank
} RunOut;

typedef struct {
    pthread_barrier_t bar;
    int64_t *counts[MAXW];
    double loss[MAXW];
} HostSum;

static void rank_main(const RunSpec *sp, int r, VWorld *vw, HostSum *hs, RunOut *out) {
    const MoeConfig *c = &sp->c;
    int W = sp->W, Bl = sp->Bl, T = sp->T, S = sp->S, nmoe = config_n_moe(c), E = c->n_routed;
    size_t nb = (size_t)nmoe * E;
    VRank vr = { vw, r, NULL, 0 };
    GpuComm gc;
    GpuBackendOptions opt = { NULL, sp->force_exchange, 0, 0 };
    if (sp->mode == MODE_NCCL) opt.comm = sp->nccl;
    if (sp->mode == MODE_VIRTUAL) {
        gc = vcomm(&vr);
        opt.comm = &gc;
    }
    Backend be;
    gpu_backend_init(&be);
    if (gpu_backend_create(&be, c, &sp->ro, Bl, T, &opt) != 0) exit(1);
    gpu_debug_capture_hook(&be, sp->capture_hook, sp->capture_ctx);
    int64_t n = be.n_params;
    // Round trips of the whole-model buffers through the local ones.
    float *tmp = (float *)xmalloc(sizeof(float) * n), *tm = (float *)xmalloc(sizeof(float) * n);
    float *tv = (float *)xmalloc(sizeof(float) * n), *zero = (float *)calloc((size_t)n, sizeof(float));
    Rng rng = { 1000 };
    for (int64_t i = 0; i < n; i++) {
        tm[i] = (float)rng_normal(&rng);
        tv[i] = (float)rng_uniform(&rng);
    }
    be.set_params(&be, sp->p0);
    be.set_opt_state(&be, tm, tv);
    be.get_params(&be, tmp);
    int rt = memcmp(tmp, sp->p0, sizeof(float) * n) == 0;
    float *tm2 = (float *)xmalloc(sizeof(float) * n), *tv2 = (float *)xmalloc(sizeof(float) * n);
    be.get_opt_state(&be, tm2, tv2);
    rt &= memcmp(tm2, tm, sizeof(float) * n) == 0 && memcmp(tv2, tv, sizeof(float) * n) == 0;
    out->rt[r] = rt;
    be.set_opt_state(&be, zero, zero);

    float *bias = (float *)calloc(nb + 1, sizeof(float));
    be.set_bias(&be, bias);
    AdamWConfig adam;
    adamw_config_default(&adam);
    BalanceConfig bc;
    balance_config_default(&bc);
    char err[256];
    balance_set_option(&bc, "gamma", "0.01", err, sizeof err);
    int64_t *counts = (int64_t *)xmalloc(sizeof(int64_t) * (nb + 1)), *sum = (int64_t *)xmalloc(sizeof(int64_t) * (nb + 1));
    hs->counts[r] = counts;
    int Bg = W * Bl;
    for (int s = 0; s < S; s++) {
        const int *tk = sp->tokens + ((size_t)s * Bg + (size_t)r * Bl) * T;
        const int *tg = sp->targets + ((size_t)s * Bg + (size_t)r * Bl) * T;
        double loss, aux;
        be.zero_grad(&be);
        gpu_micro_batch_stats(&be, tk, tg, Bl, T, 1, 1.0f, counts, &loss, &aux);
        // The trainer's host sums: losses averaged, counts summed exactly.
        hs->loss[r] = loss;
        pthread_barrier_wait(&hs->bar);
        double ls = 0;
        memset(sum, 0, sizeof(int64_t) * nb);
        for (int q = 0; q < W; q++) {
            ls += hs->loss[q];
            for (size_t i = 0; i < nb; i++) sum[i] += hs->counts[q][i];
        }
        pthread_barrier_wait(&hs->bar);
        be.sync_grads(&be);
        if (s == 0) gpu_debug_get_grads(&be, out->grads.data() + (size_t)r * n);
        float gn = be.grad_norm(&be);
        out->gnorm[(size_t)r * S + s] = gn;
        if (r == 0) {
            out->loss[s] = ls / W;
            memcpy(out->counts.data() + (size_t)s * nb, sum, sizeof(int64_t) * nb);
        }
        be.update(&be, &adam, 1e-2, s + 1, grad_clip_scale(gn, 1.0f));
        balance_update(&bc, s, S, sum, nmoe, E, c->top_k, (int64_t)Bg * T, bias);
        be.set_bias(&be, bias);
    }
    for (int k = 0; k < nmoe; k++) out->rows[(size_t)r * nmoe + k] = gpu_debug_expert_rows(&be, k);
    be.get_params(&be, out->params.data() + (size_t)r * n);
    be.get_opt_state(&be, out->m.data() + (size_t)r * n, out->v.data() + (size_t)r * n);
    memcpy(out->bias.data() + (size_t)r * nb, bias, sizeof(float) * nb);
    be.destroy(&be);
    if (vr.tmp) CUDA_CHECK(cudaFree(vr.tmp));
    free(tmp); free(tm); free(tv); free(tm2); free(tv2); free(zero); free(bias); free(counts); free(sum);
}

static RunOut run_training(const RunSpec *sp) {
    int W = sp->W, nmoe = config_n_moe(&sp->c);
    ParamLayout lay;
    layout_build(&lay, &sp->c);
    size_t n = (size_t)lay.total, nb = (size_t)nmoe * sp->c.n_routed;
    layout_free(&lay);
    RunOut out;
    out.loss.assign(sp->S, 0);
    out.counts.assign((size_t)sp->S * nb + 1, 0);
    out.gnorm.assign((size_t)W * sp->S, 0);
    out.grads.assign((size_t)W * n, 0);
    out.params.assign((size_t)W * n, 0);
    out.m.assign((size_t)W * n, 0);
    out.v.assign((size_t)W * n, 0);
    out.bias.assign((size_t)W * nb + 1, 0);
    out.rows.assign((size_t)W * nmoe + 1, 0);
    out.rt.assign(W, 0);
    VWorld vw;
    vworld_init(&vw, W, sp->ep);
    HostSum hs;
    memset(&hs, 0, sizeof hs);
    pthread_barrier_init(&hs.bar, NULL, (unsigned)W);
    std::vector<std::thread> th;
    for (int r = 0; r < W; r++) th.emplace_back(rank_main, sp, r, &vw, &hs, &out);
    for (auto &t : th) t.join();
    out.roundtrip_ok = 1;
    for (int r = 0; r < W; r++) out.roundtrip_ok &= out.rt[r];
    pthread_barrier_destroy(&hs.bar);
    vworld_free(&vw);
    return out;
}

typedef struct {
    MoeConfig c;
    RouteOptions ro = { 0, AUX_NONE, 0.0f, 0 };
    int T, S, Bl;
    std::vector<int> tokens, targets; // for up to MAXW ranks
    std::vector<float> p0;
} Problem;

static Problem make_problem(const MoeConfig &c, RouteOptions ro, int Bl, int S, uint64_t seed) {
    Problem pb;
    pb.c = c;
    pb.ro = ro;
    pb.T = c.seq_len;
    pb.S = S;
    pb.Bl = Bl;
    size_t ntok = (size_t)S * MAXW * Bl * pb.T;
    pb.tokens.resize(ntok);
    pb.targets.resize(ntok);
    Rng rng = { seed };
    for (size_t i = 0; i < ntok; i++) {
        pb.tokens[i] = (int)(rng_u64(&rng) % (uint64_t)c.vocab_size);
        pb.targets[i] = (int)(rng_u64(&rng) % (uint64_t)c.vocab_size);
    }
    ParamLayout lay;
    layout_build(&lay, &c);
    pb.p0.resize(lay.total);
    layout_init_params(&lay, &c, seed + 1, pb.p0.data());
    layout_free(&lay);
    return pb;
}

// The tokens of W ranks' micro-batches, laid out as one batch of W Bl per step.
static std::vector<int> batch_view(const std::vector<int> &all, const Problem &pb, int W) {
    std::vector<int> v((size_t)pb.S * W * pb.Bl * pb.T);
    for (int s = 0; s < pb.S; s++)
        memcpy(v.data() + (size_t)s * W * pb.Bl * pb.T, all.data() + (size_t)s * MAXW * pb.Bl * pb.T,
               sizeof(int) * (size_t)W * pb.Bl * pb.T);
    return v;
}

static RunOut run_problem(const Problem &pb, int W, int ep, int Bl, int mode, int force, const GpuComm *nccl,
                          void (*capture_hook)(void *) = NULL, void *capture_ctx = NULL) {
    // W ranks of Bl sequences see the same tokens as one rank of W Bl.
    int Wdata = W * Bl / pb.Bl;
    std::vector<int> tk = batch_view(pb.tokens, pb, Wdata), tg = batch_view(pb.targets, pb, Wdata);
    RunSpec sp;
    sp.c = pb.c;
    sp.ro = pb.ro;
    sp.Bl = Bl;
    sp.T = pb.T;
    sp.S = pb.S;
    sp.W = W;
    sp.ep = ep;
    sp.mode = mode;
    sp.force_exchange = force;
    sp.nccl = nccl;
    sp.tokens = tk.data();
    sp.targets = tg.data();
    sp.p0 = pb.p0.data();
    sp.capture_hook = capture_hook;
    sp.capture_ctx = capture_ctx;
    return run_training(&sp);
}

// ----------------------------------------------------------------------------
// 2. One rank through NCCL (and the virtual transport): bitwise

// Another thread's device work, without pause until `stop`: what a rank
// running as a thread does next to one that captures its micro-batch.
typedef struct {
    std::atomic<int> stop{0};
    std::atomic<long> rounds{0};
    long failed = 0, in_capture = 0;
    char first[200] = "";
} BusyThread;

// The capture hook: waits until the busy thread has done at least one whole
// round of its calls while the micro-batch is being captured.
static void busy_during_capture(void *ctx) {
    BusyThread *b = (BusyThread *)ctx;
    long r0 = b->rounds.load();
    while (b->rounds.load() < r0 + 2) std::this_thread::yield();
    b->in_capture += b->rounds.load() - r0 - 1;
}

static void busy_main(BusyThread *b) {
    std::vector<unsigned char> host(4096, 7);
    while (!b->stop.load()) {
        void *d = NULL, *h = NULL;
        const char *call = "cudaMalloc";
        cudaError_t e = cudaMalloc(&d, 1 << 16);
        if (e == cudaSuccess) {
            call = "cudaMemset (legacy stream)";
            e = cudaMemset(d, 0, 1 << 16);
        }
        if (e == cudaSuccess) {
            call = "cudaMemcpy (legacy stream)";
            e = cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice);
        }
        if (e == cudaSuccess) {
            call = "cudaFree";
            e = cudaFree(d);
        }
        if (e == cudaSuccess) {
            call = "cudaMallocHost";
            e = cudaMallocHost(&h, 4096);
        }
        if (e == cudaSuccess) {
            call = "cudaFreeHost";
            e = cudaFreeHost(h);
        }
        if (e != cudaSuccess && b->failed++ == 0)
            snprintf(b->first, sizeof b->first, "first refusal: %s: %s", call, cudaGetErrorName(e));
        b->rounds++;
    }
}

static void test_one_rank(const Comm *comm) {
    char err[1024];
    printf("NCCL with one rank: host collectives through the staging buffer\n");
    int rc = comm_nccl_selftest(comm, err, sizeof err);
    report_bool("allreduce f32/f64/i64/max, bcast, alltoall(v)", rc == 0, rc ? err : "");
    GpuComm nccl;
    if (comm_nccl_open(comm, &nccl, err, sizeof err) != 0) {
        report_bool("comm_nccl_open", 0, err);
        return;
    }
    MoeConfig c = gpu_test_config(8, 2, GATE_SIGMOID, 1);
    RouteOptions ro = { 0, AUX_SEQ, 0.01f, 0 };
    Problem pb = make_problem(c, ro, 2, 3, 11);
    ParamLayout lay;
    layout_build(&lay, &c);
    size_t n = (size_t)lay.total, nb = (size_t)config_n_moe(&c) * c.n_routed;
    layout_free(&lay);
    RunOut ref = run_problem(pb, 1, 1, 2, MODE_ALONE, 0, NULL);
    const char *names[] = { "NCCL, 1 rank", "NCCL, 1 rank, EP exchange forced", "virtual, 1 rank, EP exchange forced" };
    int modes[] = { MODE_NCCL, MODE_NCCL, MODE_VIRTUAL }, forces[] = { 0, 1, 1 };
    for (int i = 0; i < 3; i++) {
        RunOut o = run_problem(pb, 1, 1, 2, modes[i], forces[i], &nccl);
        printf("backend, 3 training steps: %s vs no communicator\n", names[i]);
        int same_loss = memcmp(o.loss.data(), ref.loss.data(), sizeof(double) * pb.S) == 0;
        int same_counts = memcmp(o.counts.data(), ref.counts.data(), sizeof(int64_t) * pb.S * nb) == 0;
        int same_gn = memcmp(o.gnorm.data(), ref.gnorm.data(), sizeof(float) * pb.S) == 0;
        int same_g = memcmp(o.grads.data(), ref.grads.data(), sizeof(float) * n) == 0;
        int same_p = memcmp(o.params.data(), ref.params.data(), sizeof(float) * n) == 0;
        int same_mv = memcmp(o.m.data(), ref.m.data(), sizeof(float) * n) == 0 &&
                      memcmp(o.v.data(), ref.v.data(), sizeof(float) * n) == 0;
        int same_b = memcmp(o.bias.data(), ref.bias.data(), sizeof(float) * nb) == 0;
        char detail[160];
        snprintf(detail, sizeof detail, "(losses %d counts %d norms %d grads %d params %d adam %d bias %d)", same_loss,
                 same_counts, same_gn, same_g, same_p, same_mv, same_b);
        report_bool("bitwise equal", same_loss && same_counts && same_gn && same_g && same_p && same_mv && same_b,
                    detail);
        report_bool("get_params(set_params(p)) == p, AdamW state too", o.roundtrip_ok, "");
    }
    // The capture's mode and the model's stream let another thread work meanwhile.
    BusyThread busy;
    std::thread bt(busy_main, &busy);
    RunOut o = run_problem(pb, 1, 1, 2, MODE_ALONE, 0, NULL, busy_during_capture, &busy);
    busy.stop = 1;
    bt.join();
    printf("backend, 3 training steps (captured into a graph) while another thread allocates and uses the legacy "
           "stream\n");
    char detail[300];
    snprintf(detail, sizeof detail, "(%ld rounds of cudaMalloc, cudaMemset, cudaMemcpy, cudaFree, cudaMallocHost, "
             "cudaFreeHost, %ld of them whole inside a capture; %ld refused) %s", busy.rounds.load(), busy.in_capture,
             busy.failed, busy.first);
    report_bool("the other thread's calls all succeed, also inside the capture", busy.failed == 0 && busy.in_capture > 0,
                detail);
    int same = memcmp(o.loss.data(), ref.loss.data(), sizeof(double) * pb.S) == 0 &&
               memcmp(o.params.data(), ref.params.data(), sizeof(float) * n) == 0 &&
               memcmp(o.bias.data(), ref.bias.data(), sizeof(float) * nb) == 0;
    report_bool("losses, parameters and biases bitwise equal to the run alone", same, "");
}

// ----------------------------------------------------------------------------
// 3. Several virtual ranks against one backend with the whole batch

#ifndef ENABLE_FP32
// RMS(a - b) / RMS(b - base), or / RMS(b) when base is NULL.
static double rms_ratio(const float *a, const float *b, const float *base, int64_t n) {
    double se = 0, sd = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i], r = base ? (double)b[i] - base[i] : (double)b[i];
        se += d * d;
        sd += r * r;
    }
    return sqrt(se / fmax(sd, 1e-300));
}
#endif

static double max_abs(const float *a, const float *b, int64_t n) {
    double e = 0;
    for (int64_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i]));
    return e;
}

static void test_virtual_case(const Problem &pb, int W, int ep) {
    const MoeConfig &c = pb.c;
    int nmoe = config_n_moe(&c), E = c.n_routed, S = pb.S;
    ParamLayout lay;
    layout_build(&lay, &c);
    int64_t n = lay.total;
    size_t nb = (size_t)nmoe * E;
    printf("virtual ranks: W=%d, ep=%d (E=%d K=%d, %d sequences per rank) vs one backend with %d sequences\n", W, ep, E,
           c.top_k, pb.Bl, W * pb.Bl);
    RunOut ref = run_problem(pb, 1, 1, W * pb.Bl, MODE_ALONE, 0, NULL);
    RunOut o = run_problem(pb, W, ep, pb.Bl, MODE_VIRTUAL, 0, NULL);
    char detail[256], what[128];

    // Exact whatever the precision.
    int gn_same = 1, p_same = 1, rep_same = 1, edp_same = 1;
    for (int r = 1; r < W; r++) {
        gn_same &= memcmp(&o.gnorm[(size_t)r * S], &o.gnorm[0], sizeof(float) * S) == 0;
        p_same &= memcmp(&o.params[(size_t)r * n], &o.params[0], sizeof(float) * n) == 0 &&
                  memcmp(&o.m[(size_t)r * n], &o.m[0], sizeof(float) * n) == 0 &&
                  memcmp(&o.v[(size_t)r * n], &o.v[0], sizeof(float) * n) == 0 &&
                  memcmp(&o.bias[(size_t)r * nb], &o.bias[0], sizeof(float) * nb) == 0;
    }
    std::vector<float> g(n); // the whole synchronised gradient: replicated from rank 0, experts from their owners
    for (int i = 0; i < lay.n; i++) {
        const ParamTensor *t = &lay.t[i];
        int expert = layout_is_expert(t->kind);
        for (int r = 0; r < W; r++) {
            const float *gr = &o.grads[(size_t)r * n];
            if (!expert) {
                rep_same &= memcmp(gr + t->offset, &o.grads[t->offset], sizeof(float) * t->numel) == 0;
                continue;
            }
            EpShard shard = ep_shard(E, ep, r % ep);
            int64_t own, len;
            ep_owned_range(t, &shard, &own, &len);
            if (r < ep) memcpy(&g[own], gr + own, sizeof(float) * len);
            else edp_same &= memcmp(gr + own, &o.grads[(size_t)(r % ep) * n + own], sizeof(float) * len) == 0;
        }
        if (!expert) memcpy(&g[t->offset], &o.grads[t->offset], sizeof(float) * t->numel);
    }
    report_bool("gradient norm identical on every rank", gn_same, "(bitwise)");
    report_bool("replicated gradients identical on every rank", rep_same, "(bitwise, after sync_grads)");
    report_bool("expert gradients identical across each EDP group", edp_same, "(bitwise)");
    report_bool("gathered parameters, AdamW state, biases identical", p_same, "(bitwise, every rank)");
    report_bool("get_params(set_params(p)) == p, AdamW state too", o.roundtrip_ok, "(every rank)");
    int rows_ok = 1;
    for (int grp = 0; grp < W / ep; grp++)
        for (int k = 0; k < nmoe; k++) {
            int64_t R = 0;
            for (int i = 0; i < ep; i++) R += o.rows[(size_t)(grp * ep + i) * nmoe + k];
            rows_ok &= R == (int64_t)ep * pb.Bl * pb.T * c.top_k;
        }
    snprintf(detail, sizeof detail, "(rank 0's last forward:");
    for (int k = 0; k < nmoe; k++) snprintf(detail + strlen(detail), sizeof detail - strlen(detail), " %d", o.rows[k]);
    snprintf(detail + strlen(detail), sizeof detail - strlen(detail), " rows of N K = %d)", pb.Bl * pb.T * c.top_k);
    report_bool("exchanged rows add up to N K per EP group", rows_ok, detail);

    // Against the single backend.
    int64_t cdiff = 0, cdiff1 = 0;
    for (size_t i = 0; i < (size_t)S * nb; i++) cdiff += o.counts[i] != ref.counts[i];
    for (size_t i = 0; i < nb; i++) cdiff1 += o.counts[i] != ref.counts[i];
    int soft = cdiff > 0, soft1 = cdiff1 > 0; // in bf16 a flipped near tie changes what is compared
    snprintf(detail, sizeof detail, "(%lld of %lld entries differ)", (long long)cdiff, (long long)(S * nb));
#ifdef ENABLE_FP32
    report_bool("counts summed over ranks == one backend's", cdiff == 0, detail);
#else
    printf("  %-52s %s %s\n", "counts summed over ranks vs one backend's", cdiff ? "differ (bf16 near ties)" : "identical",
           detail);
#endif
    double le = 0, ne = 0;
    for (int s = 0; s < S; s++) {
        le = fmax(le, fabs(o.loss[s] - ref.loss[s]) / fabs(ref.loss[s]));
        ne = fmax(ne, fabs((double)o.gnorm[s] - ref.gnorm[s]) / ref.gnorm[s]);
    }
    report("losses (mean over ranks)", le, TOL_LOSS, soft);
    report("gradient norms", ne, TOL_NORM, soft);
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < lay.n; i++) {
        const ParamTensor *t = &lay.t[i];
        double e = rel_err_ff(&g[t->offset], &ref.grads[t->offset], t->numel);
        if (e > worst) {
            worst = e;
            worst_name = t->name;
        }
    }
    snprintf(what, sizeof what, "step-1 gradients (worst %s)", worst_name);
    report(what, worst, TOL_GRAD, soft1);
#ifdef ENABLE_FP32
    report("parameters after 3 steps (max abs)", max_abs(&o.params[0], &ref.params[0], n), TOL_PARAM, 0);
    report("AdamW m, v after 3 steps (rel to max)",
           fmax(rel_err_ff(&o.m[0], &ref.m[0], n), rel_err_ff(&o.v[0], &ref.v[0], n)), TOL_MOM, 0);
    report("biases after 3 steps (max abs)", max_abs(&o.bias[0], &ref.bias[0], (int64_t)nb), 0.0, 0);
#else
    report("parameters after 3 steps (RMS err / RMS change)", rms_ratio(&o.params[0], &ref.params[0], pb.p0.data(), n),
           TOL_PARAM, soft);
    report("AdamW m after 3 steps (RMS err / RMS)", rms_ratio(&o.m[0], &ref.m[0], NULL, n), TOL_MOM, soft);
    printf("  %-52s %.3e (bf16: reported only)\n", "biases after 3 steps (max abs)",
           max_abs(&o.bias[0], &ref.bias[0], (int64_t)nb));
#endif
    layout_free(&lay);
}

int main(int argc, char **argv) {
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        fprintf(stderr, "test_gpu_dist: no CUDA device\n");
        return 1;
    }
    // One process: the launcher variables must not make it wait for others.
    const char *vars[] = { "RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK",
                           "PMI_SIZE", "SLURM_STEP_ID", "SLURM_STEPID" };
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) unsetenv(vars[i]);
    Comm comm;
    if (comm_init(&comm, &argc, &argv) != 0) return 1;
    printf("GPU tests of the multi-GPU code, one GPU (activations %s)\n", FLOATX_NAME);
    test_dispatch();
    test_one_rank(&comm);
    // DP and EP against one backend: sigmoid top-2 of 8 with a shared expert
    // and the sequence-wise auxiliary loss (independent of the split), then
    // softmax top-3 of 16 without shared experts.
    MoeConfig c = gpu_test_config(8, 2, GATE_SIGMOID, 1);
    RouteOptions ro = { 0, AUX_SEQ, 0.01f, 0 };
    Problem pb = make_problem(c, ro, 2, 3, 21);
    const int cases[][2] = { { 2, 2 }, { 2, 1 }, { 4, 2 }, { 4, 4 } };
    for (size_t i = 0; i < (quick ? 1 : sizeof cases / sizeof cases[0]); i++) test_virtual_case(pb, cases[i][0], cases[i][1]);
    if (!quick) {
        MoeConfig c2 = gpu_test_config(16, 3, GATE_SOFTMAX, 0);
        RouteOptions ro2 = { 0, AUX_NONE, 0.0f, 0 };
        Problem pb2 = make_problem(c2, ro2, 1, 3, 31);
        test_virtual_case(pb2, 4, 4);
        test_virtual_case(pb2, 8, 4);
    }
    comm_finalize(&comm);
    return report_summary("test_gpu_dist");
}
