// train_moecu: the GPU trainer (CUDA, cuBLAS). This file is the GPU backend
// of the shared training loop (train/trainer.c), the counterpart of
// train_moe.c: same command line, data, checkpoints (fp32 master weights,
// AdamW moments, fp32 biases) and logs. It runs the model of docs/model.md,
// layer by layer in the order of model/model.c, with the kernels of kernels/.
//
//   ./train_moecu --config small --train-data 'data/kjv/train_*.bin' ...
//
// Precision (docs/gpu.md): floatX activations and a floatX copy of the
// weights for the matmuls (bf16 by default, fp32 with -DENABLE_FP32); fp32
// master weights, gradients (cuBLAS accumulates the weight gradients straight
// into them), AdamW moments, residual stream and its gradient, router logits
// and affinities, balancing biases; exact integer token counts.
//
// Host synchronisation: one per MoE layer in the forward (the expert row
// counts, see gpu_moe_forward), and one at the end of every backend call.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "dist/comm.h"
#include "model/config.h"
#include "model/layout.h"
#include "model/moe.h"
#include "train/backend.h"
#include "train/optim.h"
#include "train/trainer.h"
}

#include "kernels/adamw.cuh"
#include "kernels/attention.cuh"
#include "kernels/classifier.cuh"
#include "kernels/common.cuh"
#include "kernels/convert.cuh"
#include "kernels/embedding.cuh"
#include "kernels/gpu_backend.cuh"
#include "kernels/gradnorm.cuh"
#include "kernels/grouped_gemm.cuh"
#include "kernels/matmul.cuh"
#include "kernels/permute.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/routing.cuh"
#include "kernels/swiglu.cuh"

// Grouped-GEMM call sites per MoE layer, each with its own pointer staging.
enum { GG_FWD13, GG_FWD2, GG_BWD_W2, GG_BWD_IN2, GG_BWD_W13, GG_BWD_IN13, GG_PER_LAYER };

// Activations of one layer, kept for the backward (N = maxB * maxT rows).
typedef struct {
    float *rstd1;   // (N) attention RMSNorm
    floatX *h1;     // (N, d) normed input of attention
    floatX *qkv;    // (N, 3d) with RoPE applied to q and k
    floatX *att;    // (B, H, T, T) attention probabilities, zero above the diagonal
    floatX *a;      // (N, d) attention output, heads concatenated
    float *xmid;    // (N, d) residual stream after attention
    float *rstd2;   // (N) FFN RMSNorm
    floatX *h2;     // (N, d) normed input of the FFN
    // dense FFN layers
    floatX *f13;    // (N, 2 d_ff) pre-activations [g | u]
    floatX *fact;   // (N, d_ff) silu(g) * u
    // MoE layers ("slot" t*K + j is token t's j-th choice; "row" its place in expert order)
    float *s;       // (N, E) router logits, then affinities
    double *zsum;   // (N) sum over experts of s
    int *sel;       // (N, K) selected experts, by decreasing score
    float *gates;   // (N, K) gate values
    int *counts;    // (E) tokens per expert
    int *offsets;   // (E + 1) first row of each expert
    int *h_offsets; // (E + 1) pinned host copy, read by the grouped GEMMs
    int *row_of;    // (N K) row of each slot
    int *slot_of;   // (N K) slot of each row
    floatX *xe;     // (N K, d) expert inputs, by row
    floatX *e13;    // (N K, 2 de) expert pre-activations, by row
    floatX *eact;   // (N K, de)
    floatX *eout;   // (N K, d) expert outputs before gating, by row
    floatX *s13;    // (N, 2 S de) shared experts' pre-activations
    floatX *sact;   // (N, S de)
    int *aux_f;     // (B, E) tokens per expert per auxiliary-loss group
} GpuLayer;

typedef struct {
    MoeConfig cfg;
    RouteOptions ro;
    ParamLayout lay;
    DecayRanges decay;
    int maxB, maxT, n_moe;
    int B, T;                  // shape of the last forward
    cudaStream_t stream;
    cublasHandle_t cublas;
    GroupedGemm gg;
    // every allocation, for destroy, and the bytes per category (printed at create)
    void **dev_ptrs, **host_ptrs;
    int n_dev, n_host, cap_dev, cap_host;
    size_t bytes[3];           // parameters + optimizer, activations, scratch
    int category;
    // parameters and optimizer (n_params each)
    float *params;             // fp32 master weights
    floatX *paramsX;           // floatX copy for the matmuls (== params in the FP32 build)
    float *grads, *adam_m, *adam_v;
    float *bias;               // (n_moe, E) balancing biases
    // inputs of the last micro-batch
    int *tokens, *targets;     // (N) device
    int *h_tokens, *h_targets; // (N) pinned staging
    int *emb_uniq, *emb_off, *emb_pos;       // (N), (N + 1), (N) embedding-backward index, device
    int *h_emb_uniq, *h_emb_off, *h_emb_pos; // pinned staging
    int *h_count;              // (V) host scratch of the index
    int n_uniq;
    // activations
    float *x;                  // (L + 1, N, d) residual stream entering each layer, and the final one
    GpuLayer *layer;           // (L)
    float *rstdf;              // (N) final RMSNorm
    floatX *hf;                // (N, d) final normed stream
    floatX *logits;            // (N, V) logits, then their gradient
    double *losses, *h_losses; // (N) per-position cross-entropy, device and pinned
    double *aux, *h_aux;       // (n_moe) auxiliary loss per MoE layer, device and pinned
    float *rope_cos, *rope_sin; // (maxT, hd/2)
    // scratch shared by the layers
    float *att_f32;            // (B, H, T, T) scores, then dP
    floatX *dS;                // (B, H, T, T) gradient of the scores
    float *dres;               // (N, d) gradient of the residual stream
    floatX *dresX;             // (N, d) its floatX copy, for the matmuls
    float *dh;                 // (N, d) gradient of a norm's output
    floatX *dbig;              // (N, max(3d, 2 d_ff, 2 S de))
    floatX *dsmall;            // (N, max(d, d_ff, S de))
    float *dgates;             // (N, K)
    floatX *deout;             // (N K, d)
    floatX *dact_e;            // (N K, de)
    floatX *d13_e;             // (N K, 2 de)
    floatX *dxe;               // (N K, d)
    floatX *dlr;               // (N, E) gradient of the router logits
    float *norm_scratch;       // rmsnorm_scratch_floats(N, d)
    int *perm_scratch;         // moe_permute_scratch_ints(N K, E)
    double *aux_P;             // (B, E)
    double *gn_partials;       // gradnorm_partials(n_params)
    double *gn_out, *h_gn;     // (1) device, pinned
    float *row_f32, *h_row;    // (V) one logits row, device and pinned
} GpuState;

static GpuState *gpu(Backend *be) { return (GpuState *)be->ctx; }

// ----------------------------------------------------------------------------
// Allocation

enum { MEM_PARAMS, MEM_ACTS, MEM_SCRATCH };

// Device memory, zeroed, counted in the current category, freed by destroy.
static void *gpu_malloc(GpuState *g, size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 16;
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
        fprintf(stderr, "error: out of GPU memory allocating %.1f MiB (%.2f GiB allocated so far): %s\n",
                bytes / 1048576.0, (g->bytes[0] + g->bytes[1] + g->bytes[2]) / 1073741824.0, cudaGetErrorString(err));
        exit(1);
    }
    CUDA_CHECK(cudaMemset(p, 0, bytes));
    if (g->n_dev == g->cap_dev) {
        g->cap_dev = g->cap_dev ? 2 * g->cap_dev : 64;
        g->dev_ptrs = (void **)realloc(g->dev_ptrs, sizeof(void *) * g->cap_dev);
        if (!g->dev_ptrs) abort();
    }
    g->dev_ptrs[g->n_dev++] = p;
    g->bytes[g->category] += bytes;
    return p;
}

// Pinned host memory, zeroed, freed by destroy.
static void *gpu_malloc_host(GpuState *g, size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 16;
    CUDA_CHECK(cudaMallocHost(&p, bytes));
    memset(p, 0, bytes);
    if (g->n_host == g->cap_host) {
        g->cap_host = g->cap_host ? 2 * g->cap_host : 32;
        g->host_ptrs = (void **)realloc(g->host_ptrs, sizeof(void *) * g->cap_host);
        if (!g->host_ptrs) abort();
    }
    g->host_ptrs[g->n_host++] = p;
    return p;
}

#define DEV(type, count) ((type *)gpu_malloc(g, sizeof(type) * (size_t)(count)))
#define PINNED(type, count) ((type *)gpu_malloc_host(g, sizeof(type) * (size_t)(count)))

// Pointers into the flat buffers for one tensor (layer -1: model-level).
static float *gpu_param(const GpuState *g, int layer, ParamKind k) {
    return g->params + layout_offset(&g->lay, layer, k);
}
static floatX *gpu_paramX(const GpuState *g, int layer, ParamKind k) {
    return g->paramsX + layout_offset(&g->lay, layer, k);
}
static float *gpu_grad(const GpuState *g, int layer, ParamKind k) {
    return g->grads + layout_offset(&g->lay, layer, k);
}

// A copy ordered on the model's stream, complete on return (pageable host
// memory may be staged and return early with a plain cudaMemcpy).
static void gpu_copy(const GpuState *g, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

static size_t max3(size_t a, size_t b, size_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static int gpu_create(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T) {
    if (be->comm && (be->comm->world > 1 || be->comm->ep > 1)) {
        fprintf(stderr, "error: train_moecu runs one process on one GPU; several ranks (%d) or --ep %d need the "
                "multi-GPU (NCCL) backend, which does not exist yet\n", be->comm->world, be->comm->ep);
        return -1;
    }
    GpuState *g = (GpuState *)calloc(1, sizeof(GpuState));
    if (!g) return -1;
    be->ctx = g;
    g->cfg = *c;
    g->ro = *ro;
    g->maxB = B;
    g->maxT = T;
    g->n_moe = config_n_moe(c);
    if (layout_build(&g->lay, c) != 0 || decay_ranges_from_layout(&g->decay, &g->lay) != 0) {
        fprintf(stderr, "error: out of memory building the parameter layout\n");
        return -1;
    }
    be->n_params = g->lay.total;
    if (g->n_moe > 0 && c->n_routed > 8192) {
        fprintf(stderr, "error: the GPU routing kernels take at most 8192 routed experts (n_routed = %d)\n",
                c->n_routed);
        return -1;
    }

    int dev;
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    printf("GPU %d: %s (sm_%d%d, %d SMs, %.1f GiB), activations %s\n", dev, prop.name, prop.major, prop.minor,
           prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0, FLOATX_NAME);
    // A blocking stream: the legacy default stream (cudaMemset in gpu_malloc) orders with it.
    CUDA_CHECK(cudaStreamCreate(&g->stream));
    CUBLAS_CHECK(cublasCreate(&g->cublas));
    CUBLAS_CHECK(cublasSetStream(g->cublas, g->stream));
    // Plain fp32 accumulation, never TF32 (CUBLAS_COMPUTE_32F with the default math mode).
    CUBLAS_CHECK(cublasSetMathMode(g->cublas, CUBLAS_DEFAULT_MATH));

    size_t n = (size_t)g->lay.total, N = (size_t)B * T, d = c->d_model, V = c->vocab_size, L = c->n_layers;
    size_t H = c->n_heads, E = c->n_routed, K = c->top_k, de = c->d_expert, sh = (size_t)c->n_shared * de;
    size_t NK = N * K, dff = c->n_dense > 0 ? (size_t)c->d_ff : 0, att = (size_t)B * H * T * T;
    size_t nmoe = (size_t)g->n_moe;

    g->category = MEM_PARAMS;
    g->params = DEV(float, n);
#ifdef ENABLE_FP32
    g->paramsX = g->params;
#else
    g->paramsX = DEV(floatX, n);
#endif
    g->grads = DEV(float, n);
    g->adam_m = DEV(float, n);
    g->adam_v = DEV(float, n);
    g->bias = DEV(float, nmoe * E);

    g->category = MEM_ACTS;
    g->tokens = DEV(int, N);
    g->targets = DEV(int, N);
    g->emb_uniq = DEV(int, N);
    g->emb_off = DEV(int, N + 1);
    g->emb_pos = DEV(int, N);
    g->x = DEV(float, (L + 1) * N * d);
    g->layer = (GpuLayer *)calloc(L, sizeof(GpuLayer));
    if (!g->layer) return -1;
    for (size_t l = 0; l < L; l++) {
        GpuLayer *la = &g->layer[l];
        la->rstd1 = DEV(float, N);
        la->h1 = DEV(floatX, N * d);
        la->qkv = DEV(floatX, N * 3 * d);
        la->att = DEV(floatX, att);
        la->a = DEV(floatX, N * d);
        la->xmid = DEV(float, N * d);
        la->rstd2 = DEV(float, N);
        la->h2 = DEV(floatX, N * d);
        if (!config_is_moe(c, (int)l)) {
            la->f13 = DEV(floatX, N * 2 * c->d_ff);
            la->fact = DEV(floatX, N * c->d_ff);
            continue;
        }
        la->s = DEV(float, N * E);
        la->zsum = DEV(double, N);
        la->sel = DEV(int, NK);
        la->gates = DEV(float, NK);
        la->counts = DEV(int, E);
        la->offsets = DEV(int, E + 1);
        la->h_offsets = PINNED(int, E + 1);
        la->row_of = DEV(int, NK);
        la->slot_of = DEV(int, NK);
        la->xe = DEV(floatX, NK * d);
        la->e13 = DEV(floatX, NK * 2 * de);
        la->eact = DEV(floatX, NK * de);
        la->eout = DEV(floatX, NK * d);
        if (sh > 0) {
            la->s13 = DEV(floatX, N * 2 * sh);
            la->sact = DEV(floatX, N * sh);
        }
        la->aux_f = DEV(int, (size_t)B * E);
    }
    g->rstdf = DEV(float, N);
    g->hf = DEV(floatX, N * d);
    g->logits = DEV(floatX, N * V);
    g->losses = DEV(double, N);
    g->aux = DEV(double, nmoe + 1);
    g->rope_cos = DEV(float, (size_t)T * (d / H / 2));
    g->rope_sin = DEV(float, (size_t)T * (d / H / 2));

    g->category = MEM_SCRATCH;
    g->att_f32 = DEV(float, att);
    g->dS = DEV(floatX, att);
    g->dres = DEV(float, N * d);
    g->dresX = DEV(floatX, N * d);
    g->dh = DEV(float, N * d);
    g->dbig = DEV(floatX, N * max3(3 * d, 2 * dff, 2 * sh));
    g->dsmall = DEV(floatX, N * max3(d, dff, sh));
    g->norm_scratch = DEV(float, rmsnorm_scratch_floats((int)N, (int)d));
    g->gn_partials = DEV(double, gradnorm_partials((int64_t)n));
    g->gn_out = DEV(double, 1);
    g->row_f32 = DEV(float, V);
    if (nmoe > 0) {
        g->dgates = DEV(float, NK);
        g->deout = DEV(floatX, NK * d);
        g->dact_e = DEV(floatX, NK * de);
        g->d13_e = DEV(floatX, NK * 2 * de);
        g->dxe = DEV(floatX, NK * d);
        g->dlr = DEV(floatX, N * E);
        g->perm_scratch = DEV(int, moe_permute_scratch_ints((int64_t)NK, (int)E));
        g->aux_P = DEV(double, (size_t)B * E);
    }

    g->h_tokens = PINNED(int, N);
    g->h_targets = PINNED(int, N);
    g->h_emb_uniq = PINNED(int, N);
    g->h_emb_off = PINNED(int, N + 1);
    g->h_emb_pos = PINNED(int, N);
    g->h_losses = PINNED(double, N);
    g->h_aux = PINNED(double, nmoe + 1);
    g->h_gn = PINNED(double, 1);
    g->h_row = PINNED(float, V);
    g->h_count = (int *)calloc(V, sizeof(int));
    if (!g->h_count) return -1;

    // RoPE tables, computed on the host exactly as the CPU model does.
    size_t half = d / H / 2;
    float *ct = (float *)malloc(sizeof(float) * T * half), *st = (float *)malloc(sizeof(float) * T * half);
    if (!ct || !st) return -1;
    rope_tables_host(ct, st, T, (int)(d / H), c->rope_theta);
    gpu_copy(g, g->rope_cos, ct, sizeof(float) * T * half, cudaMemcpyHostToDevice);
    gpu_copy(g, g->rope_sin, st, sizeof(float) * T * half, cudaMemcpyHostToDevice);
    free(ct);
    free(st);

    if (g->n_moe > 0) grouped_gemm_init(&g->gg, g->cublas, g->stream, (int)E, g->n_moe * GG_PER_LAYER);
    printf("GPU memory: %.2f GiB parameters + gradients + AdamW, %.2f GiB activations, %.2f GiB scratch "
           "(micro-batch %d x %d)\n",
           g->bytes[MEM_PARAMS] / 1073741824.0, g->bytes[MEM_ACTS] / 1073741824.0,
           g->bytes[MEM_SCRATCH] / 1073741824.0, B, T);
    CUDA_CHECK(cudaDeviceSynchronize());
    return 0;
}

static void gpu_destroy(Backend *be) {
    GpuState *g = gpu(be);
    if (!g) return;
    if (g->stream) CUDA_CHECK(cudaStreamSynchronize(g->stream));
    if (g->n_moe > 0 && g->gg.handle) grouped_gemm_free(&g->gg);
    for (int i = 0; i < g->n_dev; i++) CUDA_CHECK(cudaFree(g->dev_ptrs[i]));
    for (int i = 0; i < g->n_host; i++) CUDA_CHECK(cudaFreeHost(g->host_ptrs[i]));
    if (g->cublas) CUBLAS_CHECK(cublasDestroy(g->cublas));
    if (g->stream) CUDA_CHECK(cudaStreamDestroy(g->stream));
    free(g->dev_ptrs);
    free(g->host_ptrs);
    free(g->layer);
    free(g->h_count);
    layout_free(&g->lay);
    decay_ranges_free(&g->decay);
    free(g);
    be->ctx = NULL;
}

// ----------------------------------------------------------------------------
// Parameters, optimizer state, biases

static void gpu_set_params(Backend *be, const float *p) {
    GpuState *g = gpu(be);
    gpu_copy(g, g->params, p, sizeof(float) * (size_t)be->n_params, cudaMemcpyHostToDevice);
#ifndef ENABLE_FP32
    convert_f32_to_x(g->paramsX, g->params, be->n_params, g->stream);
#endif
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

static void gpu_get_params(Backend *be, float *p) {
    GpuState *g = gpu(be);
    gpu_copy(g, p, g->params, sizeof(float) * (size_t)be->n_params, cudaMemcpyDeviceToHost);
}

static void gpu_set_opt_state(Backend *be, const float *m, const float *v) {
    GpuState *g = gpu(be);
    gpu_copy(g, g->adam_m, m, sizeof(float) * (size_t)be->n_params, cudaMemcpyHostToDevice);
    gpu_copy(g, g->adam_v, v, sizeof(float) * (size_t)be->n_params, cudaMemcpyHostToDevice);
}

static void gpu_get_opt_state(Backend *be, float *m, float *v) {
    GpuState *g = gpu(be);
    gpu_copy(g, m, g->adam_m, sizeof(float) * (size_t)be->n_params, cudaMemcpyDeviceToHost);
    gpu_copy(g, v, g->adam_v, sizeof(float) * (size_t)be->n_params, cudaMemcpyDeviceToHost);
}

static void gpu_set_bias(Backend *be, const float *bias) {
    GpuState *g = gpu(be);
    size_t nb = (size_t)g->n_moe * g->cfg.n_routed;
    gpu_copy(g, g->bias, bias, sizeof(float) * nb, cudaMemcpyHostToDevice);
}

static void gpu_zero_grad(Backend *be) {
    GpuState *g = gpu(be);
    CUDA_CHECK(cudaMemsetAsync(g->grads, 0, sizeof(float) * (size_t)be->n_params, g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

// ----------------------------------------------------------------------------
// Forward

// The MoE FFN of layer l (k-th MoE layer): xout (N, d) fp32 = xmid + moe(h2).
static void gpu_moe_forward(GpuState *g, int l, int k, int B, int T, float *xout) {
    const MoeConfig *c = &g->cfg;
    GpuLayer *la = &g->layer[l];
    int N = B * T, E = c->n_routed, K = c->top_k, d = c->d_model, de = c->d_expert, sh = c->n_shared * de;
    int NK = N * K;
    cudaStream_t st = g->stream;

    // Router logits (N, E) in fp32, then the fused routing epilogue and the permutation.
    matmul_forward(g->cublas, la->s, CUDA_R_32F, la->h2, gpu_paramX(g, l, P_ROUTER), N, d, E, 0);
    CUDA_CHECK(cudaMemsetAsync(la->counts, 0, sizeof(int) * E, st));
    moe_route(la->s, la->zsum, la->sel, la->gates, la->counts, g->bias + (size_t)k * E, N, E, K, c->gate,
              c->norm_topk, c->route_scale, g->ro.bias_mult, st);
    moe_permute(la->offsets, la->row_of, la->slot_of, g->perm_scratch, la->sel, la->counts, NK, E, st);

    // The layer's one host synchronisation, which the algorithm needs:
    // cublasGemmGroupedBatchedEx takes every expert's row count as a host
    // array, so the offsets must reach the host before the expert GEMMs can be
    // enqueued. They also give the host its exact per-expert counts.
    CUDA_CHECK(cudaMemcpyAsync(la->h_offsets, la->offsets, sizeof(int) * (E + 1), cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    if (la->h_offsets[E] != NK) {
        fprintf(stderr, "internal error: layer %d routed %d slots, expected %d (routing counts and permutation "
                "disagree)\n", l, la->h_offsets[E], NK);
        exit(1);
    }

    // Routed experts on their expert-ordered rows.
    moe_gather(la->xe, la->h2, la->slot_of, NK, K, d, st);
    grouped_matmul_forward(&g->gg, k * GG_PER_LAYER + GG_FWD13, la->e13, la->xe, gpu_paramX(g, l, P_EXPERTS_W13),
                           la->h_offsets, d, 2 * de);
    swiglu_forward(la->eact, la->e13, NK, de, st);
    grouped_matmul_forward(&g->gg, k * GG_PER_LAYER + GG_FWD2, la->eout, la->eact, gpu_paramX(g, l, P_EXPERTS_W2),
                           la->h_offsets, de, d);

    // xout = xmid + shared(h2) + sum_j g_j expert_j(h2).
    CUDA_CHECK(cudaMemcpyAsync(xout, la->xmid, sizeof(float) * (size_t)N * d, cudaMemcpyDeviceToDevice, st));
    if (sh > 0) {
        matmul_forward(g->cublas, la->s13, CUDA_R_FLOATX, la->h2, gpu_paramX(g, l, P_SHARED_W13), N, d, 2 * sh, 0);
        swiglu_forward(la->sact, la->s13, N, sh, st);
        matmul_forward(g->cublas, xout, CUDA_R_32F, la->sact, gpu_paramX(g, l, P_SHARED_W2), N, sh, d, 1);
    }
    moe_combine_forward(xout, la->eout, la->gates, la->row_of, N, K, d, st);
    moe_aux_forward(g->aux + k, la->aux_f, g->aux_P, la->s, la->zsum, la->sel, B, T, E, K, g->ro.aux_kind,
                    g->ro.aux_alpha, st);
}

// Forward of tokens (B, T); with targets also the per-position losses, and
// with want_grad the logits' gradient (grad_scale / N scaled) in place and the
// embedding-backward index.
static void gpu_forward(GpuState *g, const int *tokens, const int *targets, int B, int T, int want_grad,
                        float grad_scale) {
    const MoeConfig *c = &g->cfg;
    if (B > g->maxB || T > g->maxT || B < 1 || T < 1) {
        fprintf(stderr, "internal error: forward of %d x %d exceeds the allocated %d x %d\n", B, T, g->maxB, g->maxT);
        abort();
    }
    int N = B * T, d = c->d_model, H = c->n_heads, V = c->vocab_size, L = c->n_layers;
    size_t Nd = (size_t)N * d;
    cudaStream_t st = g->stream;
    g->B = B;
    g->T = T;

    // Inputs through the pinned staging (free: every backend call ends synchronised).
    memcpy(g->h_tokens, tokens, sizeof(int) * N);
    CUDA_CHECK(cudaMemcpyAsync(g->tokens, g->h_tokens, sizeof(int) * N, cudaMemcpyHostToDevice, st));
    if (targets) {
        memcpy(g->h_targets, targets, sizeof(int) * N);
        CUDA_CHECK(cudaMemcpyAsync(g->targets, g->h_targets, sizeof(int) * N, cudaMemcpyHostToDevice, st));
    }
    if (want_grad) {
        g->n_uniq = embedding_backward_index(tokens, N, V, g->h_count, g->h_emb_uniq, g->h_emb_off, g->h_emb_pos);
        CUDA_CHECK(cudaMemcpyAsync(g->emb_uniq, g->h_emb_uniq, sizeof(int) * g->n_uniq, cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(g->emb_off, g->h_emb_off, sizeof(int) * (g->n_uniq + 1), cudaMemcpyHostToDevice,
                                   st));
        CUDA_CHECK(cudaMemcpyAsync(g->emb_pos, g->h_emb_pos, sizeof(int) * N, cudaMemcpyHostToDevice, st));
    }

    embedding_forward(g->x, g->tokens, gpu_param(g, -1, P_TOK_EMB), N, d, st);
    for (int l = 0; l < L; l++) {
        GpuLayer *la = &g->layer[l];
        const float *x = g->x + (size_t)l * Nd;
        float *xout = g->x + (size_t)(l + 1) * Nd;
        // Attention block: xmid = x + wo(attention(rope(wqkv(norm(x))))).
        rmsnorm_forward(la->h1, la->rstd1, x, gpu_param(g, l, P_ATTN_NORM), N, d, c->rms_eps, st);
        matmul_forward(g->cublas, la->qkv, CUDA_R_FLOATX, la->h1, gpu_paramX(g, l, P_WQKV), N, d, 3 * d, 0);
        rope_apply(la->qkv, g->rope_cos, g->rope_sin, B, T, d, H, 0, st);
        attention_forward(g->cublas, la->a, la->att, g->att_f32, la->qkv, B, T, d, H, st);
        CUDA_CHECK(cudaMemcpyAsync(la->xmid, x, sizeof(float) * Nd, cudaMemcpyDeviceToDevice, st));
        matmul_forward(g->cublas, la->xmid, CUDA_R_32F, la->a, gpu_paramX(g, l, P_WO), N, d, d, 1);
        // FFN block: xout = xmid + ffn(norm(xmid)).
        rmsnorm_forward(la->h2, la->rstd2, la->xmid, gpu_param(g, l, P_FFN_NORM), N, d, c->rms_eps, st);
        if (!config_is_moe(c, l)) {
            matmul_forward(g->cublas, la->f13, CUDA_R_FLOATX, la->h2, gpu_paramX(g, l, P_FFN_W13), N, d, 2 * c->d_ff,
                           0);
            swiglu_forward(la->fact, la->f13, N, c->d_ff, st);
            CUDA_CHECK(cudaMemcpyAsync(xout, la->xmid, sizeof(float) * Nd, cudaMemcpyDeviceToDevice, st));
            matmul_forward(g->cublas, xout, CUDA_R_32F, la->fact, gpu_paramX(g, l, P_FFN_W2), N, c->d_ff, d, 1);
        } else {
            gpu_moe_forward(g, l, l - c->n_dense, B, T, xout);
        }
    }
    rmsnorm_forward(g->hf, g->rstdf, g->x + (size_t)L * Nd, gpu_param(g, -1, P_FINAL_NORM), N, d, c->rms_eps, st);
    const floatX *head = gpu_paramX(g, -1, c->tie_embeddings ? P_TOK_EMB : P_LM_HEAD);
    matmul_forward(g->cublas, g->logits, CUDA_R_FLOATX, g->hf, head, N, d, V, 0);
    if (targets) {
        classifier_forward(g->logits, g->losses, g->targets, N, V, grad_scale / (float)N, want_grad, st);
        CUDA_CHECK(cudaMemcpyAsync(g->h_losses, g->losses, sizeof(double) * N, cudaMemcpyDeviceToHost, st));
    }
    if (g->n_moe > 0)
        CUDA_CHECK(cudaMemcpyAsync(g->h_aux, g->aux, sizeof(double) * g->n_moe, cudaMemcpyDeviceToHost, st));
}

// ----------------------------------------------------------------------------
// Backward

// The MoE FFN of layer l: from dres (the gradient at xout), dh (N, d) fp32 =
// gradient of h2 (overwritten), and the layer's parameter gradients.
static void gpu_moe_backward(GpuState *g, int l, int k, int B, int T, float grad_scale) {
    const MoeConfig *c = &g->cfg;
    GpuLayer *la = &g->layer[l];
    int N = B * T, E = c->n_routed, K = c->top_k, d = c->d_model, de = c->d_expert, sh = c->n_shared * de;
    int NK = N * K;
    cudaStream_t st = g->stream;
    const int *off = la->h_offsets; // the forward's row counts, still on the host
    int s0 = k * GG_PER_LAYER;

    // Combine backward: the gates get dout . y, the expert outputs g * dout.
    moe_combine_backward(g->deout, g->dgates, g->dres, la->eout, la->gates, la->row_of, N, K, d, st);
    // Routed experts.
    grouped_matmul_backward_weight(&g->gg, s0 + GG_BWD_W2, gpu_grad(g, l, P_EXPERTS_W2), g->deout, la->eact, off, de,
                                   d);
    grouped_matmul_backward_input(&g->gg, s0 + GG_BWD_IN2, g->dact_e, g->deout, gpu_paramX(g, l, P_EXPERTS_W2), off,
                                  de, d);
    swiglu_backward(g->d13_e, g->dact_e, la->e13, NK, de, st);
    grouped_matmul_backward_weight(&g->gg, s0 + GG_BWD_W13, gpu_grad(g, l, P_EXPERTS_W13), g->d13_e, la->xe, off, d,
                                   2 * de);
    grouped_matmul_backward_input(&g->gg, s0 + GG_BWD_IN13, g->dxe, g->d13_e, gpu_paramX(g, l, P_EXPERTS_W13), off,
                                  d, 2 * de);
    moe_scatter(g->dh, g->dxe, la->row_of, N, K, d, st);
    // Shared experts.
    if (sh > 0) {
        matmul_backward_weight(g->cublas, gpu_grad(g, l, P_SHARED_W2), g->dresX, la->sact, N, sh, d);
        matmul_backward_input(g->cublas, g->dsmall, CUDA_R_FLOATX, g->dresX, gpu_paramX(g, l, P_SHARED_W2), N, sh, d,
                              0);
        swiglu_backward(g->dbig, g->dsmall, la->s13, N, sh, st);
        matmul_backward_weight(g->cublas, gpu_grad(g, l, P_SHARED_W13), g->dbig, la->h2, N, d, 2 * sh);
        matmul_backward_input(g->cublas, g->dh, CUDA_R_32F, g->dbig, gpu_paramX(g, l, P_SHARED_W13), N, d, 2 * sh, 1);
    }
    // Gate values and auxiliary loss -> affinities -> router logits -> router.
    moe_route_backward(g->dlr, la->s, la->zsum, la->sel, g->dgates, la->aux_f, B, T, E, K, c->gate, c->norm_topk,
                       c->route_scale, g->ro.aux_kind, g->ro.aux_alpha, grad_scale, st);
    matmul_backward_weight(g->cublas, gpu_grad(g, l, P_ROUTER), g->dlr, la->h2, N, d, E);
    matmul_backward_input(g->cublas, g->dh, CUDA_R_32F, g->dlr, gpu_paramX(g, l, P_ROUTER), N, d, E, 1);
}

// Accumulates into grads the gradient of grad_scale * (loss + aux) of the
// last forward, which ran with want_grad (the logits hold their gradient).
static void gpu_backward(GpuState *g, float grad_scale) {
    const MoeConfig *c = &g->cfg;
    int B = g->B, T = g->T, N = B * T, d = c->d_model, H = c->n_heads, V = c->vocab_size, L = c->n_layers;
    size_t Nd = (size_t)N * d;
    cudaStream_t st = g->stream;

    // LM head and final norm.
    ParamKind head = c->tie_embeddings ? P_TOK_EMB : P_LM_HEAD;
    matmul_backward_weight(g->cublas, gpu_grad(g, -1, head), g->logits, g->hf, N, d, V);
    matmul_backward_input(g->cublas, g->dh, CUDA_R_32F, g->logits, gpu_paramX(g, -1, head), N, d, V, 0);
    rmsnorm_backward(g->dres, g->dresX, gpu_grad(g, -1, P_FINAL_NORM), g->norm_scratch, g->dh,
                     g->x + (size_t)L * Nd, gpu_param(g, -1, P_FINAL_NORM), g->rstdf, N, d, 0, st);

    for (int l = L - 1; l >= 0; l--) {
        GpuLayer *la = &g->layer[l];
        // FFN block: dres flows through the residual unchanged and through the FFN.
        if (!config_is_moe(c, l)) {
            floatX *dact = g->dsmall, *d13 = g->dbig;
            matmul_backward_weight(g->cublas, gpu_grad(g, l, P_FFN_W2), g->dresX, la->fact, N, c->d_ff, d);
            matmul_backward_input(g->cublas, dact, CUDA_R_FLOATX, g->dresX, gpu_paramX(g, l, P_FFN_W2), N, c->d_ff, d,
                                  0);
            swiglu_backward(d13, dact, la->f13, N, c->d_ff, st);
            matmul_backward_weight(g->cublas, gpu_grad(g, l, P_FFN_W13), d13, la->h2, N, d, 2 * c->d_ff);
            matmul_backward_input(g->cublas, g->dh, CUDA_R_32F, d13, gpu_paramX(g, l, P_FFN_W13), N, d, 2 * c->d_ff,
                                  0);
        } else {
            gpu_moe_backward(g, l, l - c->n_dense, B, T, grad_scale);
        }
        rmsnorm_backward(g->dres, g->dresX, gpu_grad(g, l, P_FFN_NORM), g->norm_scratch, g->dh, la->xmid,
                         gpu_param(g, l, P_FFN_NORM), la->rstd2, N, d, 1, st);
        // Attention block.
        floatX *da = g->dsmall, *dqkv = g->dbig;
        matmul_backward_weight(g->cublas, gpu_grad(g, l, P_WO), g->dresX, la->a, N, d, d);
        matmul_backward_input(g->cublas, da, CUDA_R_FLOATX, g->dresX, gpu_paramX(g, l, P_WO), N, d, d, 0);
        attention_backward(g->cublas, dqkv, da, la->qkv, la->att, g->att_f32, g->dS, B, T, d, H, st);
        rope_apply(dqkv, g->rope_cos, g->rope_sin, B, T, d, H, 1, st);
        matmul_backward_weight(g->cublas, gpu_grad(g, l, P_WQKV), dqkv, la->h1, N, d, 3 * d);
        matmul_backward_input(g->cublas, g->dh, CUDA_R_32F, dqkv, gpu_paramX(g, l, P_WQKV), N, d, 3 * d, 0);
        rmsnorm_backward(g->dres, g->dresX, gpu_grad(g, l, P_ATTN_NORM), g->norm_scratch, g->dh,
                         g->x + (size_t)l * Nd, gpu_param(g, l, P_ATTN_NORM), la->rstd1, N, d, 1, st);
    }
    embedding_backward(gpu_grad(g, -1, P_TOK_EMB), g->dres, g->emb_uniq, g->emb_off, g->emb_pos, g->n_uniq, d, st);
}

// ----------------------------------------------------------------------------
// The rest of the Backend

static void gpu_micro_batch(Backend *be, const int *tokens, const int *targets, int B, int T, int train,
                            float grad_scale, int64_t *counts, double *loss, double *aux) {
    GpuState *g = gpu(be);
    const MoeConfig *c = &g->cfg;
    if (train && !targets) {
        fprintf(stderr, "internal error: a training micro-batch without targets\n");
        abort();
    }
    gpu_forward(g, tokens, targets, B, T, train, grad_scale);
    if (train) gpu_backward(g, grad_scale);
    CUDA_CHECK(cudaStreamSynchronize(g->stream));

    int N = B * T, E = c->n_routed;
    double sum = 0.0;
    if (targets)
        for (int i = 0; i < N; i++) sum += g->h_losses[i];
    *loss = targets ? sum / N : 0.0;
    double a = 0.0;
    for (int k = 0; k < g->n_moe; k++) a += g->h_aux[k];
    *aux = a;
    for (int k = 0; k < g->n_moe; k++) {
        const int *off = g->layer[c->n_dense + k].h_offsets;
        for (int e = 0; e < E; e++) counts[(size_t)k * E + e] = off[e + 1] - off[e];
    }
}

// One process holds every parameter, so there is nothing to average.
static void gpu_sync_grads(Backend *be) { (void)be; }

static float gpu_grad_norm(Backend *be) {
    GpuState *g = gpu(be);
    gradnorm_sumsq(g->gn_out, g->gn_partials, g->grads, be->n_params, g->stream);
    CUDA_CHECK(cudaMemcpyAsync(g->h_gn, g->gn_out, sizeof(double), cudaMemcpyDeviceToHost, g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return (float)sqrt(*g->h_gn);
}

static void gpu_update(Backend *be, const AdamWConfig *opt, double lr, int64_t t, float grad_mult) {
    GpuState *g = gpu(be);
    AdamWScalars s = adamw_scalars(opt, lr, t);
#ifdef ENABLE_FP32
    floatX *px = NULL; // the matmuls read the master weights directly
#else
    floatX *px = g->paramsX;
#endif
    for (int i = 0; i < g->decay.n; i++) {
        const DecayRange *r = &g->decay.r[i];
        adamw_update(g->params, px, g->grads, g->adam_m, g->adam_v, r->offset, r->len, r->decay, s, grad_mult,
                     g->stream);
    }
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

static void gpu_last_logits(Backend *be, const int *tokens, int n, float *logits) {
    GpuState *g = gpu(be);
    int V = g->cfg.vocab_size;
    gpu_forward(g, tokens, NULL, 1, n, 0, 0.0f);
    convert_x_to_f32(g->row_f32, g->logits + (size_t)(n - 1) * V, V, g->stream);
    CUDA_CHECK(cudaMemcpyAsync(g->h_row, g->row_f32, sizeof(float) * V, cudaMemcpyDeviceToHost, g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
    memcpy(logits, g->h_row, sizeof(float) * V);
}

void gpu_backend_init(Backend *be) {
    memset(be, 0, sizeof *be);
    be->name = "gpu-" FLOATX_NAME;
    be->create = gpu_create;
    be->destroy = gpu_destroy;
    be->set_params = gpu_set_params;
    be->get_params = gpu_get_params;
    be->set_opt_state = gpu_set_opt_state;
    be->get_opt_state = gpu_get_opt_state;
    be->set_bias = gpu_set_bias;
    be->zero_grad = gpu_zero_grad;
    be->micro_batch = gpu_micro_batch;
    be->sync_grads = gpu_sync_grads;
    be->grad_norm = gpu_grad_norm;
    be->update = gpu_update;
    be->last_logits = gpu_last_logits;
}

// ----------------------------------------------------------------------------
// Read-back hooks for the tests (kernels/gpu_backend.cuh)

void gpu_debug_get_grads(Backend *be, float *grads) {
    GpuState *g = gpu(be);
    gpu_copy(g, grads, g->grads, sizeof(float) * (size_t)be->n_params, cudaMemcpyDeviceToHost);
}

void gpu_debug_get_logits(Backend *be, float *logits) {
    GpuState *g = gpu(be);
    size_t n = (size_t)g->B * g->T * g->cfg.vocab_size;
    float *tmp;
    CUDA_CHECK(cudaMalloc(&tmp, sizeof(float) * n));
    convert_x_to_f32(tmp, g->logits, (int64_t)n, g->stream);
    gpu_copy(g, logits, tmp, sizeof(float) * n, cudaMemcpyDeviceToHost);
    CUDA_CHECK(cudaFree(tmp));
}

void gpu_debug_get_routing(Backend *be, int k, int *sel, float *gates) {
    GpuState *g = gpu(be);
    const GpuLayer *la = &g->layer[g->cfg.n_dense + k];
    size_t nk = (size_t)g->B * g->T * g->cfg.top_k;
    gpu_copy(g, sel, la->sel, sizeof(int) * nk, cudaMemcpyDeviceToHost);
    gpu_copy(g, gates, la->gates, sizeof(float) * nk, cudaMemcpyDeviceToHost);
}

#ifndef TRAIN_MOECU_NO_MAIN
int main(int argc, char **argv) {
    Backend be;
    gpu_backend_init(&be);
    return trainer_main(argc, argv, "train_moecu", &be);
}
#endif
