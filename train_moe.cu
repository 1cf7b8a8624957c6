// train_moecu: the GPU trainer (CUDA, cuBLAS). This file is the GPU backend
// of the shared training loop (train/trainer.c), the counterpart of
// train_moe.c: same command line, data, checkpoints (fp32 master weights,
// AdamW moments, fp32 biases) and logs. It runs the model of docs/model.md,
// layer by layer in the order of model/model.c, with the kernels of kernels/.
//
//   ./train_moecu --config small --train-data 'data/kjv/train_*.bin' ...
//   mpirun -np 8 ./train_moecu --ep 8 ...                     (one process per GPU)
//   torchrun-style / srun: ./train_moecu --nccl-init DIR ...  (build without MPI; docs/gpu.md)
//
// Several GPUs (docs/gpu.md, "Multi-GPU"): data parallelism for every
// parameter and expert parallelism (--ep) for the routed experts, as the CPU
// trainer does with MPI. A rank holds the replicated tensors and only its EP
// group share of every expert tensor (its "local" buffer: replicated tensors
// first, then the local expert slices, so each group of tensors is one
// NCCL all-reduce); tokens reach their experts' ranks by an all-to-all-v of
// rows and come back by another (kernels/dispatch.cuh), in model/moe.c's
// row orders. The collectives come through a GpuComm (parallel/comm_nccl.h):
// NCCL in a run, a simulation of several ranks in the tests.
//
// Precision (docs/gpu.md): floatX activations and a floatX copy of the
// weights for the matmuls (bf16 by default, fp32 with -DENABLE_FP32); fp32
// master weights, gradients (cuBLAS accumulates the weight gradients straight
// into them), AdamW moments, residual stream and its gradient, router logits
// and affinities, balancing biases; exact integer token counts.
//
// Host synchronisation: one per MoE layer in the forward (the expert row
// counts, see gpu_moe_forward; under expert parallelism after the counts
// exchange, so it is still one), and one at the end of every backend call.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "parallel/comm.h"
#include "parallel/launch.h"
#include "model/config.h"
#include "model/layout.h"
#include "model/moe.h"
#include "train/backend.h"
#include "train/optim.h"
#include "train/options.h"
#include "train/trainer.h"
}

#include "parallel/comm_nccl.h"
#include "kernels/adamw.cuh"
#include "kernels/attention.cuh"
#include "kernels/classifier.cuh"
#include "kernels/common.cuh"
#include "kernels/convert.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/embedding.cuh"
#include "kernels/gpu_backend.cuh"
#include "kernels/gradnorm.cuh"
#include "kernels/grouped_gemm.cuh"
#include "kernels/matmul.cuh"
#include "kernels/permute.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/routing.cuh"
#include "kernels/swiglu.cuh"

// Grouped-GEMM call sites per MoE layer, each with its own pointer staging.
enum { GG_FWD13, GG_FWD2, GG_BWD_W2, GG_BWD_IN2, GG_BWD_W13, GG_BWD_IN13, GG_PER_LAYER };

// Activations of one layer, kept for the backward (N = maxB * maxT rows).
typedef struct {
    float *rstd1;   // (N) attention RMSNorm
    floatX *h1;     // (N, d) normed input of attention
    floatX *qkv;    // (N, 3d) before RoPE (the attention kernels rotate q and k as they load them)
    float *lse;     // (B, H, T) log-sum-exp of each row of attention scores (the backward recomputes P)
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
    // The expert side: the R rows of this rank's local experts, expert-major
    // (kernels/dispatch.cuh). Without the EP exchange it is the token side:
    // R = N K rows by row, h_exp_off = h_offsets and exp_off = offsets.
    floatX *xe;     // (R, d) expert inputs
    floatX *e13;    // (R, 2 de) expert pre-activations
    floatX *eact;   // (R, de)
    int R, R_cap;   // rows of the last forward; rows xe, e13, eact (and exp_src) can hold
    int *h_exp_off; // (El + 1) host: first expert-major row of each local expert
    int *exp_off;   // (El + 1) the same on the device (the device grouped GEMMs read it)
    // the EP exchange (NULL without it)
    int *recv_cnt;  // (P, El) rows EP rank q sends to local expert j, device
    int *h_recv_cnt; // (P, El) pinned copy
    int *exp_src;   // (R) received-order index of each expert-major row
    int *send_rows, *recv_rows; // (P) host: rows sent to / received from each EP rank
    floatX *eout;   // (N K, d) expert outputs before gating, token side, by row
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
    cublasHandle_t cublas; // the expert GEMMs
    Matmul mm;             // the dense matmuls (cuBLASLt)
    GroupedGemm gg;            // the cuBLAS path of the expert GEMMs (host offsets)
    int gg_device;             // 1: the expert GEMMs by kernels/grouped_gemm.cu's device path (--grouped-gemm)
    // every allocation, for destroy, and the bytes per category (printed at create)
    void **dev_ptrs, **host_ptrs;
    size_t *dev_size;          // (n_dev) bytes of each device allocation
    int *dev_cat;              // (n_dev) its category
    int n_dev, n_host, cap_dev, cap_host;
    size_t bytes[3];           // parameters + optimizer, activations, scratch
    int category;
    // the ranks (parallel/comm_nccl.h): without comm, one process holds everything
    GpuComm dist;              // ranks and group sizes (1 each without comm), and the collectives
    int has_comm;              // 1: dist's collectives are used (sync_grads, grad_norm, gathers)
    int exchange;              // 1: the MoE rows go through the EP exchange (ep > 1, or forced)
    int P, El;                 // EP group size, routed experts per rank (E / P)
    // this rank's parameters: the local layout (replicated tensors in layout
    // order, then the slice of every expert tensor holding the local experts)
    ParamLayout llay;          // offsets into the local buffers
    int *lglob;                // (llay.n) index of each local tensor in lay
    int64_t n_local, n_rep;    // elements held; elements of the replicated tensors (the experts start there)
    // parameters and optimizer (n_local each)
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
    float *att_D;              // (B, H, T) rowsum(dout * out) of the attention backward
    float *dres;               // (N, d) gradient of the residual stream
    floatX *dresX;             // (N, d) its floatX copy, for the matmuls
    float *dh;                 // (N, d) gradient of a norm's output
    floatX *dbig;              // (N, max(3d, 2 d_ff, 2 S de))
    floatX *dsmall;            // (N, max(d, d_ff, S de))
    float *dgates;             // (N, K)
    floatX *deout;             // (N K, d) expert output gradients, token side
    floatX *dact_e;            // (R_cap, de)
    floatX *d13_e;             // (R_cap, 2 de)
    floatX *dxe;               // (R_cap, d) expert input gradients, expert side
    floatX *dlr;               // (N, E) gradient of the router logits
    // the EP exchange's scratch (exchange only)
    int R_cap;                 // rows the expert-side scratch holds (dact_e, d13_e, dxe, xr, ye)
    floatX *xs;                // (N K, d) token-side rows to send, and gradients received back
    floatX *xr;                // (R_cap, d) rows in received order
    floatX *ye;                // (R_cap, d) expert outputs (or output gradients), expert-major
    int *h_exp_src;            // (R_cap) pinned staging of a layer's exp_src
    float *gather_buf;         // (P, largest expert) checkpoint gathers of expert tensors
    float *norm_scratch;       // rmsnorm_scratch_floats(N, d)
    int *perm_scratch;         // moe_permute_scratch_ints(N K, E)
    double *aux_P;             // (B, E)
    double *gn_partials;       // gradnorm_partials(n_params)
    double *gn_out, *h_gn;     // (1 + P) device, pinned: sums of squares of the replicated tensors, of each EP position's experts
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
        g->dev_size = (size_t *)realloc(g->dev_size, sizeof(size_t) * g->cap_dev);
        g->dev_cat = (int *)realloc(g->dev_cat, sizeof(int) * g->cap_dev);
        if (!g->dev_ptrs || !g->dev_size || !g->dev_cat) abort();
    }
    g->dev_ptrs[g->n_dev] = p;
    g->dev_size[g->n_dev] = bytes;
    g->dev_cat[g->n_dev++] = g->category;
    g->bytes[g->category] += bytes;
    return p;
}

// Replaces the device allocation old (from gpu_malloc) by a zeroed one of
// `bytes`; the contents are not kept. Only where the stream is idle.
static void *gpu_regrow(GpuState *g, void *old, size_t bytes) {
    int i = 0;
    while (i < g->n_dev && g->dev_ptrs[i] != old) i++;
    if (i == g->n_dev) {
        fprintf(stderr, "internal error: gpu_regrow of an unknown allocation\n");
        abort();
    }
    CUDA_CHECK(cudaFree(old));
    int saved = g->category;
    g->category = g->dev_cat[i];
    g->bytes[g->category] -= g->dev_size[i];
    g->n_dev--; // gpu_malloc appends: move the last entry into slot i, then append the new one
    g->dev_ptrs[i] = g->dev_ptrs[g->n_dev];
    g->dev_size[i] = g->dev_size[g->n_dev];
    g->dev_cat[i] = g->dev_cat[g->n_dev];
    void *p = gpu_malloc(g, bytes);
    g->category = saved;
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

// Pointers into the local buffers for one tensor (layer -1: model-level);
// for an expert tensor, its first local expert.
static float *gpu_param(const GpuState *g, int layer, ParamKind k) {
    return g->params + layout_offset(&g->llay, layer, k);
}
static floatX *gpu_paramX(const GpuState *g, int layer, ParamKind k) {
    return g->paramsX + layout_offset(&g->llay, layer, k);
}
static float *gpu_grad(const GpuState *g, int layer, ParamKind k) {
    return g->grads + layout_offset(&g->llay, layer, k);
}

static int is_expert_kind(ParamKind k) { return k == P_EXPERTS_W13 || k == P_EXPERTS_W2; }

// The local layout (see GpuState): replicated tensors in layout order, then
// every expert tensor cut to its El experts from ep_rank El on. Returns 0 or -1.
static int gpu_build_local_layout(GpuState *g) {
    const ParamLayout *lay = &g->lay;
    ParamLayout *loc = &g->llay;
    memset(loc, 0, sizeof *loc);
    loc->n_layers = lay->n_layers;
    loc->t = (ParamTensor *)calloc((size_t)lay->n + 1, sizeof(ParamTensor));
    loc->index = (int *)malloc(sizeof(int) * (size_t)(lay->n_layers + 1) * P_NKINDS);
    g->lglob = (int *)calloc((size_t)lay->n + 1, sizeof(int));
    if (!loc->t || !loc->index || !g->lglob) return -1;
    for (int i = 0; i < (lay->n_layers + 1) * P_NKINDS; i++) loc->index[i] = -1;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < lay->n; i++) {
            ParamTensor t = lay->t[i];
            if (is_expert_kind(t.kind) != pass) continue;
            if (pass == 1) {
                int64_t per = t.numel / t.shape[0];
                t.shape[0] = g->El;
                t.numel = (int64_t)g->El * per;
            }
            t.offset = loc->total;
            loc->total += t.numel;
            int row = t.layer >= 0 ? t.layer : lay->n_layers;
            loc->index[row * P_NKINDS + t.kind] = loc->n;
            g->lglob[loc->n] = i;
            loc->t[loc->n++] = t;
        }
        if (pass == 0) g->n_rep = loc->total;
    }
    g->n_local = loc->total;
    return 0;
}

// Where local tensor i's elements live in the whole model's flat buffer.
static int64_t gpu_global_offset(const GpuState *g, int i) {
    const ParamTensor *t = &g->lay.t[g->lglob[i]];
    int64_t off = t->offset;
    if (is_expert_kind(t->kind)) off += (int64_t)g->dist.ep_rank * g->El * (t->numel / t->shape[0]);
    return off;
}

// A copy ordered on the model's stream, complete on return (pageable host
// memory may be staged and return early with a plain cudaMemcpy).
static void gpu_copy(const GpuState *g, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, g->stream));
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

static size_t max3(size_t a, size_t b, size_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static int env_flag(const char *name) {
    const char *v = getenv(name);
    return v && v[0] && strcmp(v, "0") != 0;
}

// The backend's create (train/backend.h): NCCL when the run has several ranks
// (or MOE_NCCL=1, to exercise the NCCL path on one GPU); MOE_EP_EXCHANGE=1
// routes the MoE rows through the EP exchange even with --ep 1 (a test).
static int gpu_create(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T) {
    // MOE_GROUPED_GEMM=0 (the cuBLAS path's per-expert fallback) implies the cuBLAS path.
    const char *gg_env = getenv("MOE_GROUPED_GEMM");
    GpuBackendOptions opt = { NULL, env_flag("MOE_EP_EXCHANGE"),
                              !options_grouped_gemm_device() || (gg_env && strcmp(gg_env, "0") == 0) };
    GpuComm gc;
    const Comm *comm = be->comm;
    // A build with MPI started by a launcher that MPI does not know (torchrun,
    // srun without PMI) sees one rank per process: every process would train
    // alone on the same GPU. The launcher's variables tell.
    LaunchInfo li;
    char lerr[512];
    if (comm && comm_has_mpi() && launch_from_env(&li, lerr, sizeof lerr) == 0 && li.world != comm->world) {
        fprintf(stderr, "error: the launcher started %d processes (%s variables) but MPI sees %d: this "
                "train_moecu is built with MPI, start it with mpirun (or srun --mpi=pmix), or build it with "
                "`make train_moecu USE_MPI=0` for torchrun / srun / scripts (docs/gpu.md)\n", li.world, li.source,
                comm->world);
        return -1;
    }
    if (comm && (comm->world > 1 || comm->ep > 1 || env_flag("MOE_NCCL"))) {
        char err[2048];
        // First: with MPI this also selects the rank's GPU, before any other CUDA call.
        if (comm_nccl_open(comm, &gc, err, sizeof err) != 0) {
            fprintf(stderr, "error: %s\n", err);
            return -1;
        }
        opt.comm = &gc;
    }
    return gpu_backend_create(be, c, ro, B, T, &opt);
}

int gpu_backend_create(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T,
                       const GpuBackendOptions *opt) {
    GpuState *g = (GpuState *)calloc(1, sizeof(GpuState));
    if (!g) return -1;
    be->ctx = g;
    g->cfg = *c;
    g->ro = *ro;
    g->maxB = B;
    g->maxT = T;
    g->n_moe = config_n_moe(c);
    if (opt && opt->comm) {
        g->dist = *opt->comm;
        g->has_comm = 1;
    } else {
        g->dist.world = g->dist.ep = g->dist.edp = 1;
    }
    g->P = g->dist.ep;
    const GpuComm *dc = &g->dist;
    if (g->P < 1 || dc->world % g->P != 0 || dc->edp != dc->world / g->P || dc->ep_rank != dc->rank % g->P ||
        dc->edp_rank != dc->rank / g->P) {
        fprintf(stderr, "error: inconsistent ranks: rank %d of %d, EP group of %d (position %d), EDP group of %d "
                "(position %d)\n", dc->rank, dc->world, dc->ep, dc->ep_rank, dc->edp, dc->edp_rank);
        return -1;
    }
    if (c->n_routed % g->P != 0) {
        fprintf(stderr, "error: --ep %d must divide n_routed (%d)\n", g->P, c->n_routed);
        return -1;
    }
    g->El = c->n_routed / g->P;
    g->exchange = g->n_moe > 0 && (g->P > 1 || (opt && opt->force_exchange));
    if (g->exchange && !g->has_comm) {
        fprintf(stderr, "internal error: the expert-parallel exchange needs the ranks' collectives\n");
        return -1;
    }
    g->gg_device = !(opt && opt->grouped_cublas);
    if (g->n_moe > 0 && g->gg_device && !grouped_dev_supported(c->d_model, c->d_expert)) {
        fprintf(stderr, "error: --grouped-gemm device needs d_model and d_expert multiples of 8 (got %d and %d); "
                "use --grouped-gemm cublas\n", c->d_model, c->d_expert);
        return -1;
    }
    layout_build(&g->lay, c);
    if (gpu_build_local_layout(g) != 0 ||
        decay_ranges_from_layout(&g->decay, &g->llay) != 0) {
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
    char who[32] = "";
    if (dc->world > 1) snprintf(who, sizeof who, "rank %d: ", dc->rank);
    printf("%sGPU %d: %s (sm_%d%d, %d SMs, %.1f GiB), activations %s\n", who, dev, prop.name, prop.major, prop.minor,
           prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0, FLOATX_NAME);
#ifdef MOE_GPU_ARCH
    // The kernels are compiled for one architecture (GPU_ARCH in gpu.mk): an
    // older GPU cannot run them; a newer one compiles their PTX at start-up.
    int cc = prop.major * 10 + prop.minor;
    if (cc < MOE_GPU_ARCH) {
        fprintf(stderr, "error: %sthis train_moecu is built for sm_%d but GPU %d is sm_%d: rebuild it with "
                "make train_moecu GPU_ARCH=sm_%d\n", who, MOE_GPU_ARCH, dev, cc, cc);
        return -1;
    }
    if (cc > MOE_GPU_ARCH)
        printf("%snote: kernels built for sm_%d run on this sm_%d GPU through PTX compilation at start-up; "
               "make train_moecu GPU_ARCH=sm_%d builds native code\n", who, MOE_GPU_ARCH, cc, cc);
#endif
    // A blocking stream: the legacy default stream (cudaMemset in gpu_malloc) orders with it.
    CUDA_CHECK(cudaStreamCreate(&g->stream));
    CUBLAS_CHECK(cublasCreate(&g->cublas));
    CUBLAS_CHECK(cublasSetStream(g->cublas, g->stream));
    // Plain fp32 accumulation, never TF32 (CUBLAS_COMPUTE_32F with the default math mode).
    CUBLAS_CHECK(cublasSetMathMode(g->cublas, CUBLAS_DEFAULT_MATH));
    matmul_init(&g->mm, g->stream);

    size_t n = (size_t)g->n_local, N = (size_t)B * T, d = c->d_model, V = c->vocab_size, L = c->n_layers;
    size_t H = c->n_heads, E = c->n_routed, K = c->top_k, de = c->d_expert, sh = (size_t)c->n_shared * de;
    size_t NK = N * K, dff = c->n_dense > 0 ? (size_t)c->d_ff : 0, bht = (size_t)B * H * T;
    char aerr[256];
    if (attention_supported((int)(d / H), aerr, sizeof aerr) != 0) {
        fprintf(stderr, "error: %s\n", aerr);
        return -1;
    }
    size_t nmoe = (size_t)g->n_moe, El = (size_t)g->El, P = (size_t)g->P;
    // Expert-side rows: exactly N K without the exchange; under it their number
    // varies with the routing (N K on average) and the buffers grow on demand.
    size_t R0 = NK;

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
        la->lse = DEV(float, bht);
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
        la->R_cap = (int)R0;
        la->xe = DEV(floatX, R0 * d);
        la->e13 = DEV(floatX, R0 * 2 * de);
        la->eact = DEV(floatX, R0 * de);
        la->eout = DEV(floatX, NK * d);
        if (g->exchange) {
            la->h_exp_off = PINNED(int, El + 1);
            la->exp_off = DEV(int, El + 1);
            la->recv_cnt = DEV(int, E);
            la->h_recv_cnt = PINNED(int, E);
            la->exp_src = DEV(int, R0);
            la->send_rows = PINNED(int, P);
            la->recv_rows = PINNED(int, P);
        } else {
            la->h_exp_off = la->h_offsets;
            la->exp_off = la->offsets;
        }
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
    g->att_D = DEV(float, bht);
    g->dres = DEV(float, N * d);
    g->dresX = DEV(floatX, N * d);
    g->dh = DEV(float, N * d);
    g->dbig = DEV(floatX, N * max3(3 * d, 2 * dff, 2 * sh));
    g->dsmall = DEV(floatX, N * max3(d, dff, sh));
    g->norm_scratch = DEV(float, rmsnorm_scratch_floats((int)N, (int)d));
    g->gn_partials = DEV(double, gradnorm_partials((int64_t)n));
    g->gn_out = DEV(double, P + 1);
    g->row_f32 = DEV(float, V);
    if (nmoe > 0) {
        g->R_cap = (int)R0;
        g->dgates = DEV(float, NK);
        g->deout = DEV(floatX, NK * d);
        g->dact_e = DEV(floatX, R0 * de);
        g->d13_e = DEV(floatX, R0 * 2 * de);
        g->dxe = DEV(floatX, R0 * d);
        g->dlr = DEV(floatX, N * E);
        g->perm_scratch = DEV(int, moe_permute_scratch_ints((int64_t)NK, (int)E));
        g->aux_P = DEV(double, (size_t)B * E);
        if (g->exchange) {
            g->xs = DEV(floatX, NK * d);
            g->xr = DEV(floatX, R0 * d);
            g->ye = DEV(floatX, R0 * d);
            CUDA_CHECK(cudaMallocHost((void **)&g->h_exp_src, sizeof(int) * R0));
        }
        if (P > 1) { // one expert per EP rank: the checkpoint gathers go through this
            size_t per = 0;
            for (int i = 0; i < g->llay.n; i++)
                if (is_expert_kind(g->llay.t[i].kind)) per = max3(per, (size_t)(g->llay.t[i].numel / El), 0);
            g->gather_buf = DEV(float, P * per);
        }
    }

    g->h_tokens = PINNED(int, N);
    g->h_targets = PINNED(int, N);
    g->h_emb_uniq = PINNED(int, N);
    g->h_emb_off = PINNED(int, N + 1);
    g->h_emb_pos = PINNED(int, N);
    g->h_losses = PINNED(double, N);
    g->h_aux = PINNED(double, nmoe + 1);
    g->h_gn = PINNED(double, P + 1);
    g->h_row = PINNED(float, V);
    g->h_count = (int *)calloc(V, sizeof(int));
    if (!g->h_count) return -1;

    // RoPE tables, computed on the host exactly as the CPU model does.
    size_t half = d / H / 2;
    float *ct = (float *)malloc(sizeof(float) * T * half), *st = (float *)malloc(sizeof(float) * T * half);
    if (!ct || !st) return -1;
    attention_rope_tables(ct, st, T, (int)(d / H), c->rope_theta);
    gpu_copy(g, g->rope_cos, ct, sizeof(float) * T * half, cudaMemcpyHostToDevice);
    gpu_copy(g, g->rope_sin, st, sizeof(float) * T * half, cudaMemcpyHostToDevice);
    free(ct);
    free(st);

    // The grouped GEMMs run over this rank's El experts.
    if (g->n_moe > 0 && !g->gg_device)
        grouped_gemm_init(&g->gg, g->cublas, g->stream, (int)El, g->n_moe * GG_PER_LAYER);
    if (g->n_moe > 0 && g->gg_device && dc->rank == 0)
        printf("expert GEMMs: device kernels, expert offsets on the GPU (--grouped-gemm device)\n");
    if (dc->rank == 0) {
        printf("GPU memory%s: %.2f GiB parameters + gradients + AdamW, %.2f GiB activations, %.2f GiB scratch "
               "(micro-batch %d x %d)\n", dc->world > 1 ? " of rank 0" : "",
               g->bytes[MEM_PARAMS] / 1073741824.0, g->bytes[MEM_ACTS] / 1073741824.0,
               g->bytes[MEM_SCRATCH] / 1073741824.0, B, T);
        if (dc->world > 1 || g->exchange)
            printf("ranks: %d (EP groups of %d: %d of %d routed experts per rank, %.1f%% of the parameters held; "
                   "EDP groups of %d)%s\n", dc->world, g->P, g->El, c->n_routed,
                   100.0 * (double)g->n_local / (double)g->lay.total, dc->edp,
                   g->exchange ? ", MoE rows through the EP all-to-all" : "");
    }
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
    if (g->h_exp_src) CUDA_CHECK(cudaFreeHost(g->h_exp_src));
    if (g->mm.lt) matmul_free(&g->mm);
    if (g->cublas) CUBLAS_CHECK(cublasDestroy(g->cublas));
    if (g->stream) CUDA_CHECK(cudaStreamDestroy(g->stream));
    free(g->dev_ptrs);
    free(g->dev_size);
    free(g->dev_cat);
    free(g->host_ptrs);
    free(g->layer);
    free(g->h_count);
    free(g->lglob);
    layout_free(&g->lay);
    layout_free(&g->llay);
    decay_ranges_free(&g->decay);
    free(g);
    be->ctx = NULL;
}

// ----------------------------------------------------------------------------
// Parameters, optimizer state, biases. The host side always sees the whole
// model in layout order (n_params); this rank holds its local part.

// dev (n_local) = this rank's part of the whole-model buffer host (n_params).
static void gpu_scatter_local(GpuState *g, float *dev, const float *host) {
    for (int i = 0; i < g->llay.n; i++) {
        const ParamTensor *t = &g->llay.t[i];
        CUDA_CHECK(cudaMemcpyAsync(dev + t->offset, host + gpu_global_offset(g, i), sizeof(float) * t->numel,
                                   cudaMemcpyHostToDevice, g->stream));
    }
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

// host (n_params) = the whole model from every rank's dev (n_local). The
// replicated tensors are this rank's; each expert tensor is gathered over the
// EP group one local expert index at a time, as train_moe.c's cpu_gather
// does: each rank puts its expert j into its slot of a zeroed (P, expert)
// buffer, a sum over the group fills every slot (x + 0 is exact), and slot q
// is expert q El + j. Collective over the EP group.
static void gpu_gather_whole(GpuState *g, const float *dev, float *host) {
    cudaStream_t st = g->stream;
    for (int i = 0; i < g->llay.n; i++) {
        const ParamTensor *t = &g->llay.t[i];
        const ParamTensor *whole = &g->lay.t[g->lglob[i]];
        if (!is_expert_kind(t->kind) || g->P == 1) {
            CUDA_CHECK(cudaMemcpyAsync(host + gpu_global_offset(g, i), dev + t->offset, sizeof(float) * t->numel,
                                       cudaMemcpyDeviceToHost, st));
            continue;
        }
        int64_t per = t->numel / g->El;
        for (int j = 0; j < g->El; j++) {
            CUDA_CHECK(cudaMemsetAsync(g->gather_buf, 0, sizeof(float) * per * g->P, st));
            CUDA_CHECK(cudaMemcpyAsync(g->gather_buf + (int64_t)g->dist.ep_rank * per, dev + t->offset + j * per,
                                       sizeof(float) * per, cudaMemcpyDeviceToDevice, st));
            g->dist.allreduce_f32(g->dist.ctx, COMM_EP, g->gather_buf, (size_t)(per * g->P), st);
            for (int q = 0; q < g->P; q++)
                CUDA_CHECK(cudaMemcpyAsync(host + whole->offset + ((int64_t)q * g->El + j) * per,
                                           g->gather_buf + q * per, sizeof(float) * per, cudaMemcpyDeviceToHost, st));
            CUDA_CHECK(cudaStreamSynchronize(st)); // before the buffer is zeroed again (and the host reads)
        }
    }
    CUDA_CHECK(cudaStreamSynchronize(st));
}

static void gpu_set_params(Backend *be, const float *p) {
    GpuState *g = gpu(be);
    gpu_scatter_local(g, g->params, p);
#ifndef ENABLE_FP32
    convert_f32_to_x(g->paramsX, g->params, g->n_local, g->stream);
#endif
    CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

static void gpu_get_params(Backend *be, float *p) {
    GpuState *g = gpu(be);
    gpu_gather_whole(g, g->params, p);
}

static void gpu_set_opt_state(Backend *be, const float *m, const float *v) {
    GpuState *g = gpu(be);
    gpu_scatter_local(g, g->adam_m, m);
    gpu_scatter_local(g, g->adam_v, v);
}

static void gpu_get_opt_state(Backend *be, float *m, float *v) {
    GpuState *g = gpu(be);
    gpu_gather_whole(g, g->adam_m, m);
    gpu_gather_whole(g, g->adam_v, v);
}

static void gpu_set_bias(Backend *be, const float *bias) {
    GpuState *g = gpu(be);
    size_t nb = (size_t)g->n_moe * g->cfg.n_routed;
    // No wait: a copy from pageable host memory has taken the data when it
    // returns, and the routing kernels that read the biases follow on this stream.
    if (nb) CUDA_CHECK(cudaMemcpyAsync(g->bias, bias, sizeof(float) * nb, cudaMemcpyHostToDevice, g->stream));
}

static void gpu_zero_grad(Backend *be) {
    GpuState *g = gpu(be);
    // No wait: everything that reads the gradients is later on this stream.
    CUDA_CHECK(cudaMemsetAsync(g->grads, 0, sizeof(float) * (size_t)g->n_local, g->stream));
}

// ----------------------------------------------------------------------------
// Expert parallelism: the expert-side buffers

// Capacity for at least R rows: 25% over the previous one, a multiple of 256.
static int grow_rows(int R, int cap) {
    int64_t n = (int64_t)cap + cap / 4;
    if (n < R) n = R;
    n = (n + 255) / 256 * 256;
    return n > INT32_MAX ? INT32_MAX : (int)n;
}

// Makes layer la's expert-side buffers and the shared expert-side scratch
// hold R rows. Called right after the layer's host synchronisation (the
// stream is idle, and no earlier content is needed).
static void gpu_reserve_rows(GpuState *g, GpuLayer *la, int l, int R) {
    size_t d = g->cfg.d_model, de = g->cfg.d_expert;
    if (R > la->R_cap) {
        int cap = grow_rows(R, la->R_cap);
        la->xe = (floatX *)gpu_regrow(g, la->xe, sizeof(floatX) * cap * d);
        la->e13 = (floatX *)gpu_regrow(g, la->e13, sizeof(floatX) * cap * 2 * de);
        la->eact = (floatX *)gpu_regrow(g, la->eact, sizeof(floatX) * cap * de);
        la->exp_src = (int *)gpu_regrow(g, la->exp_src, sizeof(int) * cap);
        la->R_cap = cap;
        char who[32] = "";
        if (g->dist.world > 1) snprintf(who, sizeof who, "rank %d: ", g->dist.rank);
        printf("%sexpert-side rows of layer %d: capacity now %d (%.2f x the micro-batch's N K) for %d rows received\n",
               who, l, cap, (double)cap / ((double)g->maxB * g->maxT * g->cfg.top_k), R);
    }
    if (R > g->R_cap) {
        int cap = grow_rows(R, g->R_cap);
        g->dact_e = (floatX *)gpu_regrow(g, g->dact_e, sizeof(floatX) * cap * de);
        g->d13_e = (floatX *)gpu_regrow(g, g->d13_e, sizeof(floatX) * cap * 2 * de);
        g->dxe = (floatX *)gpu_regrow(g, g->dxe, sizeof(floatX) * cap * d);
        g->xr = (floatX *)gpu_regrow(g, g->xr, sizeof(floatX) * cap * d);
        g->ye = (floatX *)gpu_regrow(g, g->ye, sizeof(floatX) * cap * d);
        CUDA_CHECK(cudaFreeHost(g->h_exp_src));
        CUDA_CHECK(cudaMallocHost((void **)&g->h_exp_src, sizeof(int) * cap));
        g->R_cap = cap;
    }
}

// ----------------------------------------------------------------------------
// Forward

// The routed experts of this rank on their expert-major rows (la->xe, R
// rows): ye (R, d) = W2_e (silu(g) * u) with [g | u] = la->e13 = W13_e x,
// expert by expert through the grouped GEMMs: the device path reads the
// offsets on the GPU (la->exp_off), the cuBLAS path on the host
// (la->h_exp_off). The GPU counterpart of model/moe.c's expert_ffn_forward,
// for all local experts at once.
static void expert_ffn_forward(GpuState *g, GpuLayer *la, int l, int k, floatX *ye) {
    int d = g->cfg.d_model, de = g->cfg.d_expert, El = g->El, slot = k * GG_PER_LAYER;
    const floatX *w13 = gpu_paramX(g, l, P_EXPERTS_W13), *w2 = gpu_paramX(g, l, P_EXPERTS_W2);
    cudaStream_t st = g->stream;
    if (g->gg_device) {
        grouped_dev_forward(la->e13, la->xe, w13, la->exp_off, El, la->R, d, 2 * de, st);
        swiglu_forward(la->eact, la->e13, la->R, de, st);
        grouped_dev_forward(ye, la->eact, w2, la->exp_off, El, la->R, de, d, st);
    } else {
        grouped_matmul_forward(&g->gg, slot + GG_FWD13, la->e13, la->xe, w13, la->h_exp_off, d, 2 * de);
        swiglu_forward(la->eact, la->e13, la->R, de, st);
        grouped_matmul_forward(&g->gg, slot + GG_FWD2, ye, la->eact, w2, la->h_exp_off, de, d);
    }
}

// Its backward from dye (R, d): the expert weights' gradients (added to the
// fp32 gradient) and g->dxe (R, d), the gradient of la->xe.
static void expert_ffn_backward(GpuState *g, GpuLayer *la, int l, int k, const floatX *dye) {
    int d = g->cfg.d_model, de = g->cfg.d_expert, El = g->El, slot = k * GG_PER_LAYER;
    const floatX *w13 = gpu_paramX(g, l, P_EXPERTS_W13), *w2 = gpu_paramX(g, l, P_EXPERTS_W2);
    float *dw13 = gpu_grad(g, l, P_EXPERTS_W13), *dw2 = gpu_grad(g, l, P_EXPERTS_W2);
    cudaStream_t st = g->stream;
    if (g->gg_device) {
        grouped_dev_backward_weight(dw2, dye, la->eact, la->exp_off, El, de, d, st);
        grouped_dev_backward_input(g->dact_e, dye, w2, la->exp_off, El, la->R, de, d, st);
        swiglu_backward(g->d13_e, g->dact_e, la->e13, la->R, de, st);
        grouped_dev_backward_weight(dw13, g->d13_e, la->xe, la->exp_off, El, d, 2 * de, st);
        grouped_dev_backward_input(g->dxe, g->d13_e, w13, la->exp_off, El, la->R, d, 2 * de, st);
    } else {
        const int *off = la->h_exp_off; // the forward's expert-side row counts, still on the host
        grouped_matmul_backward_weight(&g->gg, slot + GG_BWD_W2, dw2, dye, la->eact, off, de, d);
        grouped_matmul_backward_input(&g->gg, slot + GG_BWD_IN2, g->dact_e, dye, w2, off, de, d);
        swiglu_backward(g->d13_e, g->dact_e, la->e13, la->R, de, st);
        grouped_matmul_backward_weight(&g->gg, slot + GG_BWD_W13, dw13, g->d13_e, la->xe, off, d, 2 * de);
        grouped_matmul_backward_input(&g->gg, slot + GG_BWD_IN13, g->dxe, g->d13_e, w13, off, d, 2 * de);
    }
}

// The MoE FFN of layer l (k-th MoE layer): xout (N, d) fp32 = xmid + moe(h2).
static void gpu_moe_forward(GpuState *g, int l, int k, int B, int T, float *xout) {
    const MoeConfig *c = &g->cfg;
    GpuLayer *la = &g->layer[l];
    int N = B * T, E = c->n_routed, K = c->top_k, d = c->d_model, de = c->d_expert, sh = c->n_shared * de;
    int NK = N * K;
    cudaStream_t st = g->stream;

    // Router logits (N, E) in fp32, then the fused routing epilogue and the permutation.
    matmul_forward(&g->mm, la->s, CUDA_R_32F, la->h2, gpu_paramX(g, l, P_ROUTER), N, d, E, NULL);
    CUDA_CHECK(cudaMemsetAsync(la->counts, 0, sizeof(int) * E, st));
    moe_route(la->s, la->zsum, la->sel, la->gates, la->counts, g->bias + (size_t)k * E, N, E, K, c->gate,
              c->norm_topk, c->route_scale, g->ro.bias_mult, st);
    moe_permute(la->offsets, la->row_of, la->slot_of, g->perm_scratch, la->sel, la->counts, NK, E, st);
    const GpuComm *dc = &g->dist;
    int P = g->P, El = g->El;
    size_t rb = sizeof(floatX) * d; // bytes per row
    if (g->exchange) {
        // This rank's rows in expert order (the rows of EP rank p's experts are
        // contiguous), and every expert's count to the rank that holds it.
        moe_gather(g->xs, la->h2, la->slot_of, NK, K, d, st);
        dc->alltoall_i32(dc->ctx, la->counts, la->recv_cnt, El, st);
        CUDA_CHECK(cudaMemcpyAsync(la->h_recv_cnt, la->recv_cnt, sizeof(int) * E, cudaMemcpyDeviceToHost, st));
    }

    // The layer's one host synchronisation, which the algorithm needs:
    // cublasGemmGroupedBatchedEx takes every expert's row count as a host
    // array, so the offsets (and under expert parallelism the counts received,
    // which size the all-to-all-v) must reach the host before the expert GEMMs
    // can be enqueued. They also give the host its exact per-expert counts.
    CUDA_CHECK(cudaMemcpyAsync(la->h_offsets, la->offsets, sizeof(int) * (E + 1), cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    if (la->h_offsets[E] != NK) {
        fprintf(stderr, "internal error: layer %d routed %d slots, expected %d (routing counts and permutation "
                "disagree)\n", l, la->h_offsets[E], NK);
        exit(1);
    }

    if (g->exchange) {
        // Sizes and order of the expert side (model/moe.c's moe_dispatch),
        // then the rows travel to their experts' ranks and are put expert-major.
        for (int i = 0; i < E; i++)
            if (la->h_recv_cnt[i] < 0 || la->h_recv_cnt[i] > NK * P) {
                fprintf(stderr, "internal error: layer %d: EP rank %d announces %d rows for local expert %d\n", l,
                        i / El, la->h_recv_cnt[i], i % El);
                exit(1);
            }
        int R = moe_ep_rows(P, El, la->h_offsets, la->h_recv_cnt, la->send_rows, la->recv_rows);
        gpu_reserve_rows(g, la, l, R);
        moe_ep_order(P, El, la->h_recv_cnt, la->recv_rows, la->h_exp_off, g->h_exp_src);
        la->R = R;
        // The device grouped GEMMs read the expert-major offsets on the GPU (from
        // pinned memory: rewritten only by this layer's next forward, after its
        // synchronisation).
        if (g->gg_device)
            CUDA_CHECK(cudaMemcpyAsync(la->exp_off, la->h_exp_off, sizeof(int) * (El + 1), cudaMemcpyHostToDevice,
                                       st));
        // From pinned memory, asynchronously: the next writer of h_exp_src is the
        // next MoE layer, after its own synchronisation.
        if (R > 0)
            CUDA_CHECK(cudaMemcpyAsync(la->exp_src, g->h_exp_src, sizeof(int) * R, cudaMemcpyHostToDevice, st));
        dc->alltoallv(dc->ctx, g->xs, la->send_rows, g->xr, la->recv_rows, rb, st);
        moe_rows_gather(la->xe, g->xr, la->exp_src, R, rb, st);
    } else {
        la->R = NK;
        moe_gather(la->xe, la->h2, la->slot_of, NK, K, d, st);
    }

    // This rank's routed experts on their expert-major rows.
    floatX *ye = g->exchange ? g->ye : la->eout;
    expert_ffn_forward(g, la, l, k, ye);
    if (g->exchange) {
        // Back to received order, and to the tokens' ranks (model/moe.c's moe_return).
        moe_rows_scatter(g->xr, g->ye, la->exp_src, la->R, rb, st);
        dc->alltoallv(dc->ctx, g->xr, la->recv_rows, la->eout, la->send_rows, rb, st);
    }

    // xout = xmid + shared(h2) + sum_j g_j expert_j(h2). The shared experts'
    // last matmul adds xmid (fused); without them it is copied.
    if (sh > 0) {
        matmul_forward(&g->mm, la->s13, CUDA_R_FLOATX, la->h2, gpu_paramX(g, l, P_SHARED_W13), N, d, 2 * sh, NULL);
        swiglu_forward(la->sact, la->s13, N, sh, st);
        matmul_forward(&g->mm, xout, CUDA_R_32F, la->sact, gpu_paramX(g, l, P_SHARED_W2), N, sh, d, la->xmid);
    } else {
        CUDA_CHECK(cudaMemcpyAsync(xout, la->xmid, sizeof(float) * (size_t)N * d, cudaMemcpyDeviceToDevice, st));
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
        matmul_forward(&g->mm, la->qkv, CUDA_R_FLOATX, la->h1, gpu_paramX(g, l, P_WQKV), N, d, 3 * d, NULL);
        attention_forward(la->a, la->lse, la->qkv, g->rope_cos, g->rope_sin, B, T, d, H, st);
        matmul_forward(&g->mm, la->xmid, CUDA_R_32F, la->a, gpu_paramX(g, l, P_WO), N, d, d, x); // + x: fused
        // FFN block: xout = xmid + ffn(norm(xmid)).
        rmsnorm_forward(la->h2, la->rstd2, la->xmid, gpu_param(g, l, P_FFN_NORM), N, d, c->rms_eps, st);
        if (!config_is_moe(c, l)) {
            matmul_forward(&g->mm, la->f13, CUDA_R_FLOATX, la->h2, gpu_paramX(g, l, P_FFN_W13), N, d, 2 * c->d_ff,
                           NULL);
            swiglu_forward(la->fact, la->f13, N, c->d_ff, st);
            matmul_forward(&g->mm, xout, CUDA_R_32F, la->fact, gpu_paramX(g, l, P_FFN_W2), N, c->d_ff, d, la->xmid);
        } else {
            gpu_moe_forward(g, l, l - c->n_dense, B, T, xout);
        }
    }
    rmsnorm_forward(g->hf, g->rstdf, g->x + (size_t)L * Nd, gpu_param(g, -1, P_FINAL_NORM), N, d, c->rms_eps, st);
    const floatX *head = gpu_paramX(g, -1, c->tie_embeddings ? P_TOK_EMB : P_LM_HEAD);
    matmul_forward(&g->mm, g->logits, CUDA_R_FLOATX, g->hf, head, N, d, V, NULL);
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
    cudaStream_t st = g->stream;
    const GpuComm *dc = &g->dist;
    size_t rb = sizeof(floatX) * d;

    // Combine backward: the gates get dout . y, the expert outputs g * dout.
    moe_combine_backward(g->deout, g->dgates, g->dres, la->eout, la->gates, la->row_of, N, K, d, st);
    // The output gradients travel to the experts' ranks (model/moe.c's moe_send).
    const floatX *dye = g->deout;
    if (g->exchange) {
        dc->alltoallv(dc->ctx, g->deout, la->send_rows, g->xr, la->recv_rows, rb, st);
        moe_rows_gather(g->ye, g->xr, la->exp_src, la->R, rb, st);
        dye = g->ye;
    }
    // This rank's routed experts.
    expert_ffn_backward(g, la, l, k, dye);
    // The input gradients come back to the tokens' ranks (moe_return).
    const floatX *dxs = g->dxe;
    if (g->exchange) {
        moe_rows_scatter(g->xr, g->dxe, la->exp_src, la->R, rb, st);
        dc->alltoallv(dc->ctx, g->xr, la->recv_rows, g->xs, la->send_rows, rb, st);
        dxs = g->xs;
    }
    moe_scatter(g->dh, dxs, la->row_of, N, K, d, st);
    // Shared experts.
    if (sh > 0) {
        matmul_backward_weight(&g->mm, gpu_grad(g, l, P_SHARED_W2), g->dresX, la->sact, N, sh, d);
        matmul_backward_input(&g->mm, g->dsmall, CUDA_R_FLOATX, g->dresX, gpu_paramX(g, l, P_SHARED_W2), N, sh, d,
                              0);
        swiglu_backward(g->dbig, g->dsmall, la->s13, N, sh, st);
        matmul_backward_weight(&g->mm, gpu_grad(g, l, P_SHARED_W13), g->dbig, la->h2, N, d, 2 * sh);
        matmul_backward_input(&g->mm, g->dh, CUDA_R_32F, g->dbig, gpu_paramX(g, l, P_SHARED_W13), N, d, 2 * sh, 1);
    }
    // Gate values and auxiliary loss -> affinities -> router logits -> router.
    moe_route_backward(g->dlr, la->s, la->zsum, la->sel, g->dgates, la->aux_f, B, T, E, K, c->gate, c->norm_topk,
                       c->route_scale, g->ro.aux_kind, g->ro.aux_alpha, grad_scale, st);
    matmul_backward_weight(&g->mm, gpu_grad(g, l, P_ROUTER), g->dlr, la->h2, N, d, E);
    matmul_backward_input(&g->mm, g->dh, CUDA_R_32F, g->dlr, gpu_paramX(g, l, P_ROUTER), N, d, E, 1);
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
    matmul_backward_weight(&g->mm, gpu_grad(g, -1, head), g->logits, g->hf, N, d, V);
    matmul_backward_input(&g->mm, g->dh, CUDA_R_32F, g->logits, gpu_paramX(g, -1, head), N, d, V, 0);
    rmsnorm_backward(g->dres, g->dresX, gpu_grad(g, -1, P_FINAL_NORM), g->norm_scratch, g->dh,
                     g->x + (size_t)L * Nd, gpu_param(g, -1, P_FINAL_NORM), g->rstdf, N, d, 0, st);

    for (int l = L - 1; l >= 0; l--) {
        GpuLayer *la = &g->layer[l];
        // FFN block: dres flows through the residual unchanged and through the FFN.
        if (!config_is_moe(c, l)) {
            floatX *dact = g->dsmall, *d13 = g->dbig;
            matmul_backward_weight(&g->mm, gpu_grad(g, l, P_FFN_W2), g->dresX, la->fact, N, c->d_ff, d);
            matmul_backward_input(&g->mm, dact, CUDA_R_FLOATX, g->dresX, gpu_paramX(g, l, P_FFN_W2), N, c->d_ff, d,
                                  0);
            swiglu_backward(d13, dact, la->f13, N, c->d_ff, st);
            matmul_backward_weight(&g->mm, gpu_grad(g, l, P_FFN_W13), d13, la->h2, N, d, 2 * c->d_ff);
            matmul_backward_input(&g->mm, g->dh, CUDA_R_32F, d13, gpu_paramX(g, l, P_FFN_W13), N, d, 2 * c->d_ff,
                                  0);
        } else {
            gpu_moe_backward(g, l, l - c->n_dense, B, T, grad_scale);
        }
        rmsnorm_backward(g->dres, g->dresX, gpu_grad(g, l, P_FFN_NORM), g->norm_scratch, g->dh, la->xmid,
                         gpu_param(g, l, P_FFN_NORM), la->rstd2, N, d, 1, st);
        // Attention block.
        floatX *da = g->dsmall, *dqkv = g->dbig;
        matmul_backward_weight(&g->mm, gpu_grad(g, l, P_WO), g->dresX, la->a, N, d, d);
        matmul_backward_input(&g->mm, da, CUDA_R_FLOATX, g->dresX, gpu_paramX(g, l, P_WO), N, d, d, 0);
        attention_backward(dqkv, g->att_D, da, la->qkv, la->a, la->lse, g->rope_cos, g->rope_sin, B, T, d, H, st);
        matmul_backward_weight(&g->mm, gpu_grad(g, l, P_WQKV), dqkv, la->h1, N, d, 3 * d);
        matmul_backward_input(&g->mm, g->dh, CUDA_R_32F, dqkv, gpu_paramX(g, l, P_WQKV), N, d, 3 * d, 0);
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

// As train_moe.c's cpu_sync_grads: each rank's loss is the mean over its own
// tokens, so the run's gradient is the mean over ranks. The replicated
// tensors (one contiguous run of the local buffer) are summed over all ranks,
// the local expert slices (the rest) over the EDP group (the EP exchange
// already brought the group's tokens to each expert), then everything is
// divided by the number of ranks. NCCL gives every rank the same sums, so
// the replicated weights stay identical bit for bit.
static void gpu_sync_grads(Backend *be) {
    GpuState *g = gpu(be);
    if (!g->has_comm) return; // one process holds every parameter: nothing to average
    const GpuComm *dc = &g->dist;
    dc->allreduce_f32(dc->ctx, COMM_WORLD, g->grads, (size_t)g->n_rep, g->stream);
    dc->allreduce_f32(dc->ctx, COMM_EDP, g->grads + g->n_rep, (size_t)(g->n_local - g->n_rep), g->stream);
    scale_f32(g->grads, g->n_local, 1.0f / (float)dc->world, g->stream);
    // No wait: the gradient norm and AdamW read the result later on this stream.
}

// The global norm of the synchronised gradient, the same bits on every rank:
// the replicated tensors' sum of squares (equal everywhere) plus every EP
// position's expert sum, each expert counted once (cpu_grad_norm's formula).
// The expert sums are gathered, not summed, by NCCL: each rank writes its sum
// into its own slot of a zeroed (P) vector and the group adds the vectors
// (x + 0 is exact whatever the order), then the host adds the slots in rank
// order. A plain all-reduce of one double per rank could round differently
// in different EP groups (each group's ring has its own order), and ranks
// whose clipping factors differ in the last bit would let their replicated
// weights drift apart.
static float gpu_grad_norm(Backend *be) {
    GpuState *g = gpu(be);
    cudaStream_t st = g->stream;
    gradnorm_sumsq(g->gn_out, g->gn_partials, g->grads, g->n_rep, st);
    CUDA_CHECK(cudaMemsetAsync(g->gn_out + 1, 0, sizeof(double) * g->P, st));
    gradnorm_sumsq(g->gn_out + 1 + g->dist.ep_rank, g->gn_partials, g->grads + g->n_rep, g->n_local - g->n_rep, st);
    if (g->has_comm) g->dist.allreduce_f64(g->dist.ctx, COMM_EP, g->gn_out + 1, (size_t)g->P, st);
    CUDA_CHECK(cudaMemcpyAsync(g->h_gn, g->gn_out, sizeof(double) * (g->P + 1), cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    double experts = 0;
    for (int p = 0; p < g->P; p++) experts += g->h_gn[1 + p];
    return (float)sqrt(g->h_gn[0] + experts);
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
    // No wait: the next step's kernels follow on this stream, and the host
    // reads parameters or moments only through synchronising copies (gpu_copy).
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
    memset(grads, 0, sizeof(float) * (size_t)be->n_params);
    for (int i = 0; i < g->llay.n; i++) {
        const ParamTensor *t = &g->llay.t[i];
        gpu_copy(g, grads + gpu_global_offset(g, i), g->grads + t->offset, sizeof(float) * t->numel,
                 cudaMemcpyDeviceToHost);
    }
}

int gpu_debug_expert_rows(Backend *be, int k) { return gpu(be)->layer[gpu(be)->cfg.n_dense + k].R; }

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
    // --nccl-init DIR (or --nccl-init=DIR): the rendezvous directory of a
    // start without MPI (parallel/launch.h). It reaches parallel/comm_nccl.c as
    // MOE_NCCL_INIT and is taken out before the shared option parser runs.
    int n = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--nccl-init") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "error: --nccl-init needs a directory\n");
                return 1;
            }
            setenv("MOE_NCCL_INIT", argv[++i], 1);
        } else if (strncmp(argv[i], "--nccl-init=", 12) == 0) {
            setenv("MOE_NCCL_INIT", argv[i] + 12, 1);
        } else {
            argv[n++] = argv[i];
        }
    }
    argv[n] = NULL;
    // Each rank's GPU before anything initialises CUDA (a CUDA-aware MPI may in
    // MPI_Init), when the launcher says the local rank; parallel/comm_nccl.c
    // chooses the same one later, and reports any problem.
    LaunchInfo li;
    char err[512];
    if (launch_from_env(&li, err, sizeof err) == 0 && li.world > 1 && li.local_rank >= 0) {
        int ndev = 0;
        if (cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 1 && li.local_rank < ndev) cudaSetDevice(li.local_rank);
        (void)cudaGetLastError(); // leave no error behind for the kernels' checks
    }
    Backend be;
    gpu_backend_init(&be);
    int rc = trainer_main(n, argv, "train_moecu", &be);
    comm_nccl_close(); // after MPI_Finalize in the MPI build: NCCL does not need MPI to tear down
    return rc;
}
#endif
