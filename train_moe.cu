// train_moecu: the GPU trainer (CUDA, cuBLAS, NCCL). The counterpart of
// train_moe.c: same command line, data, checkpoints (fp32 master weights,
// AdamW moments, fp32 biases) and logs, the same model (docs/model.md) run
// layer by layer in the order of model/model.c, with the kernels of kernels/.
//
//   ./train_moecu --config small --train-data 'data/kjv/train_*.bin' ...
//   mpirun -np 8 ./train_moecu --ep 8 ...                     (one process per GPU)
//   torchrun-style / srun: ./train_moecu --nccl-init DIR ...  (build without MPI; docs/gpu.md)
//
// Reading path: one training step, in the order it runs.
//   train/trainer.c   the loop both trainers share (data, accumulation, clipping, AdamW, the
//                     balancing update, logs, checkpoints): see train_moe.c's head
//   this file         the GPU backend the loop calls (train/backend.h), top to bottom:
//                     GpuLayer / GpuModel (every buffer, with its shape), creation phase by phase
//                     (gpu_backend_create), parameters in and out, gpu_forward (embedding, per
//                     layer: RMSNorm, QKV matmul, attention with RoPE, output matmul, then a dense FFN
//                     or gpu_moe_forward), gpu_backward in reverse, gpu_micro_batch,
//                     gpu_sync_grads, gpu_grad_norm, gpu_update
//   gpu_moe_forward   router matmul, moe_route (affinities, TopK with the bias, gates, counts:
//                     kernels/routing.cu), moe_permute (expert order: kernels/permute.cu), the EP
//                     exchange (parallel/ep_layout.h, kernels/dispatch.cu), expert_ffn_forward
//                     (grouped GEMMs: kernels/grouped_gemm.cu), shared experts, gated combine,
//                     auxiliary loss
//   kernels/          one family per file: matmul (cuBLASLt), attention (fused, with RoPE; its
//                     tensor-core blocks in mma.cuh), rmsnorm, swiglu, classifier (cross-entropy),
//                     embedding, adamw, gradnorm, convert
//   parallel/         comm_nccl.c (NCCL groups), ep_layout.c (which experts, parameters and rows
//                     a rank holds), launch.c (starting ranks without MPI)
//
// Several GPUs (docs/gpu.md, "Multi-GPU"): data parallelism for every
// parameter and expert parallelism (--ep) for the routed experts, as the CPU
// trainer does with MPI. A rank holds the replicated tensors and only its EP
// group share of every expert tensor (its "local" buffer, ep_local_layout:
// replicated tensors first, then the local expert slices, so each group of
// tensors is one NCCL all-reduce); tokens reach their experts' ranks by an
// all-to-all-v of rows and come back by another, in the row orders of
// parallel/ep_layout.h. The collectives come through a GpuComm
// (parallel/comm_nccl.h): NCCL in a run, a simulation of several ranks in the tests.
//
// Precision (docs/gpu.md): floatX activations and a floatX copy of the
// weights for the matmuls (bf16 by default, fp32 with -DENABLE_FP32); fp32
// master weights, gradients (cuBLAS accumulates the weight gradients straight
// into them), AdamW moments, residual stream and its gradient, router logits
// and affinities, balancing biases; exact integer token counts.
//
// Host synchronisation (docs/gpu.md, "Host waits and CUDA graphs"): with one
// EP rank and the device grouped GEMM, none inside a micro-batch: the inputs
// go in by asynchronous copies, the expert offsets stay on the GPU, and the
// counts and losses are summed on the device (kernels/stats.cu) and read once
// per step (gpu_step_stats), as is the gradient norm (gpu_grad_norm). The
// micro-batch's work is then captured once into a CUDA graph and replayed
// (--cuda-graph). Under expert parallelism (the all-to-all-v needs the counts
// on the host) and with --grouped-gemm cublas (its GEMMs take host row
// counts) each MoE layer's forward keeps one host wait, and graphs are off.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "model/config.h"        // defines: MoeConfig, config_n_moe, config_is_moe
#include "model/layout.h"        // defines: ParamLayout, ParamKind, layout_offset, layout_is_expert
#include "model/route.h"         // defines: RouteOptions, RouteParams, route_params
#include "parallel/comm.h"       // defines: Comm, CommGroup (WORLD / EP / EDP)
#include "parallel/ep_layout.h"  // defines: EpShard, ep_local_layout, ep_exchange_rows, ep_expert_major_order
#include "parallel/launch.h"     // defines: launch_from_env (ranks from torchrun / srun variables)
#include "train/backend.h"       // defines: Backend, the interface the training loop calls
#include "train/memplan.h"       // defines: MemoryPlan, MemCategory (--print-memory)
#include "train/optim.h"         // defines: AdamWConfig, DecayRanges, adamw_scalars
#include "train/trainer.h"       // defines: trainer_main, the shared training loop
#include "util/util.h"           // defines: xcalloc, xmalloc, ASSERT
}

#include "kernels/adamw.cuh"        // defines: adamw_update (fused AdamW + the floatX copy)
#include "kernels/attention.cuh"    // defines: attention_supported, attention_rope_tables, attention_forward / _backward
#include "kernels/classifier.cuh"   // defines: classifier_forward (cross-entropy and its gradient)
#include "kernels/common.cuh"       // defines: floatX, CUBLAS_CHECK, KERNEL_CHECK, reductions
#include "kernels/convert.cuh"      // defines: convert_f32_to_x, convert_x_to_f32
#include "kernels/dispatch.cuh"     // defines: moe_rows_gather / _scatter (EP row moves), scale_f32
#include "kernels/embedding.cuh"    // defines: embedding_forward, embedding_backward and its index
#include "kernels/gpu_backend.cuh"  // defines: gpu_backend_init, gpu_backend_create, the test hooks
#include "kernels/gradnorm.cuh"     // defines: gradnorm_sumsq
#include "kernels/grouped_gemm.cuh" // defines: GroupedGemm, grouped_matmul_* (cuBLAS), grouped_dev_* (device offsets)
#include "kernels/matmul.cuh"       // defines: Matmul (cuBLASLt plans), matmul_forward / _backward_*
#include "kernels/permute.cuh"      // defines: moe_permute (with the gather), moe_combine_*, moe_scatter
#include "kernels/profiler.cuh"     // defines: GpuProfiler (--profile: per-phase CUDA events)
#include "kernels/rmsnorm.cuh"      // defines: rmsnorm_forward, rmsnorm_backward
#include "kernels/routing.cuh"      // defines: moe_route, moe_aux_forward, moe_route_backward
#include "kernels/stats.cuh"        // defines: StepStats, stats_accumulate (the step's counts and losses)
#include "kernels/swiglu.cuh"       // defines: swiglu_forward, swiglu_backward
#include "parallel/comm_nccl.h"     // defines: GpuComm, comm_nccl_open (NCCL collectives on a stream)

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
    // the primal-dual parts of the routing (kernels/routing.cuh RouteDualOut),
    // rows of gm->primal_all and gm->dual_all (stats_accumulate sums them)
    double *primal_tok; // (N) each token's primal part
    int *dual_cnt;  // (3, E) counts0, lost, gained
    int *offsets;   // (E + 1) first row of each expert (a row of gm->offsets_all)
    int *h_offsets; // (E + 1) pinned host copy (exchange or cuBLAS path only)
    int *row_of;    // (N K) row of each slot
    int *slot_of;   // (N K) slot of each row
    // The expert side: the R rows of this rank's local experts, expert-major
    // (kernels/dispatch.cuh). Without the EP exchange it is the token side:
    // R = N K rows by row, h_exp_off = h_offsets and exp_off = offsets.
    floatX *xe;     // (R, d) expert inputs
    floatX *e13;    // (R, 2 de) expert pre-activations
    floatX *eact;   // (R, de)
    int R;          // rows of the last forward
    int rows_cap;   // rows xe, e13, eact (and exp_src) can hold
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

// A training micro-batch's forward, backward and statistics captured as one
// CUDA graph, with what it was captured for: everything else it reads lives
// in device memory at fixed addresses (inputs, parameters, biases).
typedef struct {
    int B, T;
    float grad_scale;
    double loss_div;
    int keep_scores;       // the routing also wrote the traced scores (Backend keep_scores)
    cudaGraphExec_t exec;
} GpuGraph;
// Shapes kept at once (a run trains one; the tests a few).
enum { GPU_GRAPHS = 4 };

// 8-byte words of the step's statistics for nc = n_moe E counts and nm = n_moe layers.
#define STATS_WORDS(nc, nm) (4 * (nc) + 3 + (nm))

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
    GroupedGemm gg;        // the cuBLAS path of the expert GEMMs (host offsets)
    int gg_device;         // 1: the expert GEMMs by kernels/grouped_gemm.cu's device path (--grouped-gemm)
    GpuProfiler prof;      // --profile: CUDA events at the phase boundaries
    char device_name[256]; // cudaDeviceProp.name
    // every allocation, for destroy, and the bytes per category (printed at create)
    void **dev_ptrs, **host_ptrs;
    size_t *dev_size;          // (n_dev) bytes of each device allocation
    int *dev_cat;              // (n_dev) its category
    int n_dev, n_host, cap_dev, cap_host;
    size_t bytes[MEM_COUNT];   // device bytes per category (train/memplan.h)
    int category;              // the category of the allocations being made
    int dry;                   // 1: --print-memory: count the allocations, make none
    // the ranks (parallel/comm_nccl.h): without comm, one process holds everything
    GpuComm ranks;             // ranks and group sizes (1 each without comm), and the collectives
    int has_comm;              // 1: ranks' collectives are used (sync_grads, grad_norm, gathers)
    int exchange;              // 1: the MoE rows go through the EP exchange (ep > 1, or forced)
    EpShard shard;             // the EP group's size P, this rank's position, El = E / P local experts
    // this rank's parameters: the local layout (parallel/ep_layout.h:
    // replicated tensors in layout order, then the local experts' slices)
    ParamLayout local_lay;     // offsets into the local buffers
    int *local_to_whole;       // (local_lay.n) index of each local tensor in lay
    int64_t n_local;           // elements held
    int64_t n_replicated;      // elements of the replicated tensors (the expert slices start there)
    // parameters and optimizer (n_local each)
    float *params;             // fp32 master weights
    floatX *paramsX;           // floatX copy for the matmuls (== params in the FP32 build)
    float *grads, *adam_m, *adam_v;
    float *bias;               // (n_moe, E) balancing biases
    // Inputs of the last micro-batch, one device buffer at fixed places (so
    // that a captured graph reads each replay's inputs), and its host image,
    // copied in by one asynchronous copy from pageable memory (taken at the
    // call: the host may rewrite it at once). N = maxB maxT.
    int *in, *h_in;            // (5 N + 2) tokens | targets | n_uniq | uniq | offsets | positions: device, host
    int *tokens, *targets;     // (N) each, in `in`
    int *emb_n;                // (1) unique tokens of the micro-batch (sizes nothing: a launch covers N)
    int *emb_uniq, *emb_off, *emb_pos;       // (N), (N + 1), (N) embedding-backward index, in `in`
    int *h_count;              // (V) host scratch of the index
    // activations
    float *x;                  // (L + 1, N, d) residual stream entering each layer, and the final one
    GpuLayer *layer;           // (L)
    float *rstdf;              // (N) final RMSNorm
    floatX *hf;                // (N, d) final normed stream
    floatX *logits;            // (N, V) logits, then their gradient
    double *losses;            // (N) per-position cross-entropy
    double *aux;               // (n_moe) auxiliary loss per MoE layer
    int *offsets_all;          // (n_moe, E + 1) every MoE layer's expert offsets, for stats_accumulate
    double *primal_all;        // (n_moe, N) every MoE layer's per-token primal parts
    int *dual_all;             // (n_moe, 3, E) every MoE layer's counts0, lost, gained
    StepStats stats;           // the step's counts and losses, summed over its micro-batches, in stats_buf
    int64_t *stats_buf, *h_stats; // (STATS_WORDS) device, pinned (the same layout)
    int64_t stats_tokens;      // tokens of the micro-batches since the last step_stats
    int64_t read_tokens;       // ... and of those the last step_stats read (route_dual's n_tokens)
    // CUDA graphs (--cuda-graph): the captured training micro-batches, by shape
    int graphs;                // 1: training micro-batches are captured once and replayed
    const char *graphs_off;    // why not, when not
    GpuGraph graph[GPU_GRAPHS];
    int n_graphs, next_graph;  // entries in use; the one replaced when a new shape comes and all are in use
    void (*capture_hook)(void *); // tests: called inside each capture (gpu_debug_capture_hook)
    void *capture_ctx;
    float *rope_cos, *rope_sin; // (maxT, hd/2)
    // scratch shared by the layers
    float *att_D;              // (B, H, T) rowsum(dout * out) of the attention backward
    float *dres;               // (N, d) gradient of the residual stream
    floatX *dresX;             // (N, d) its floatX copy, for the matmuls
    float *dh;                 // (N, d) gradient of a norm's output
    float *dh_ffn;             // (N, d) parallel residual only: the FFN norm's output gradient,
                               // held while the attention block's backward uses dh
    floatX *dbig;              // (N, max(3d, 2 d_ff, 2 S de))
    floatX *dsmall;            // (N, max(d, d_ff, S de))
    float *dgates;             // (N, K)
    floatX *deout;             // (N K, d) expert output gradients, token side
    floatX *dact_e;            // (scratch_rows, de)
    floatX *d13_e;             // (scratch_rows, 2 de)
    floatX *dxe;               // (scratch_rows, d) expert input gradients, expert side
    floatX *dlr;               // (N, E) gradient of the router logits
    // the EP exchange's scratch (exchange only)
    int scratch_rows;          // rows the expert-side scratch holds (dact_e, d13_e, dxe, xr, ye)
    floatX *xs;                // (N K, d) token-side rows to send, and gradients received back
    floatX *xr;                // (scratch_rows, d) rows in received order
    floatX *ye;                // (scratch_rows, d) expert outputs (or output gradients), expert-major
    int *h_exp_src;            // (scratch_rows) pinned staging of a layer's exp_src
    float *gather_buf;         // (P, largest expert) checkpoint gathers of expert tensors
    float *norm_scratch;       // rmsnorm_scratch_floats(N, d)
    int *perm_scratch;         // moe_permute_scratch_ints(N K, E)
    double *aux_scratch;       // moe_aux_scratch_doubles(B, T, E): the aux statistics' partial sums
    double *gn_partials;       // gradnorm_partials(n_params)
    double *gn_out, *h_gn;     // (1 + P) device, pinned: sums of squares of the replicated tensors, of each EP position's experts
    float *row_f32, *h_row;    // (V) one logits row, device and pinned
    // router-score traces (Backend keep_scores / route_scores)
    int keep_scores;           // 1: the routing writes the scores the bias is added to into kept
    float *kept;               // (n_moe, N, E) those scores, allocated on the first traced step
} GpuModel;

static GpuModel *gpu_model(Backend *be) { return (GpuModel *)be->ctx; }

// Marks the start of a profiling phase on the model's stream (kernels/profiler.cuh);
// nothing unless --profile is timing.
#define PHASE(ph) profiler_mark(&gm->prof, (ph), gm->stream)

// ----------------------------------------------------------------------------
// Allocation

// Device memory, zeroed, counted in the current category, freed by destroy.
// In a dry run (gm->dry, --print-memory) only the bytes are counted and NULL
// comes back: nothing may use the buffers then.
static void *gpu_malloc(GpuModel *gm, size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 16;
    if (gm->dry) {
        gm->bytes[gm->category] += bytes;
        return NULL;
    }
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
        size_t so_far = 0;
        for (int i = 0; i < MEM_COUNT; i++) so_far += gm->bytes[i];
        fprintf(stderr, "error: out of GPU memory allocating %.1f MiB (%.2f GiB allocated so far; `--print-memory` "
                "shows what a micro-batch needs and the largest that fits): %s\n", bytes / 1048576.0,
                so_far / 1073741824.0, cudaGetErrorString(err));
        exit(1);
    }
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, gm->stream));
    if (gm->n_dev == gm->cap_dev) {
        gm->cap_dev = gm->cap_dev ? 2 * gm->cap_dev : 64;
        gm->dev_ptrs = (void **)xrealloc(gm->dev_ptrs, sizeof(void *) * gm->cap_dev);
        gm->dev_size = (size_t *)xrealloc(gm->dev_size, sizeof(size_t) * gm->cap_dev);
        gm->dev_cat = (int *)xrealloc(gm->dev_cat, sizeof(int) * gm->cap_dev);
    }
    gm->dev_ptrs[gm->n_dev] = p;
    gm->dev_size[gm->n_dev] = bytes;
    gm->dev_cat[gm->n_dev++] = gm->category;
    gm->bytes[gm->category] += bytes;
    return p;
}

// Replaces the device allocation old (from gpu_malloc) by a zeroed one of
// `bytes`; the contents are not kept. Only where the stream is idle.
static void *gpu_regrow(GpuModel *gm, void *old, size_t bytes) {
    int i = 0;
    while (i < gm->n_dev && gm->dev_ptrs[i] != old) i++;
    ASSERT(i < gm->n_dev, "gpu_regrow of an unknown allocation");
    CUDA_CHECK(cudaFree(old));
    int saved = gm->category;
    gm->category = gm->dev_cat[i];
    gm->bytes[gm->category] -= gm->dev_size[i];
    gm->n_dev--; // gpu_malloc appends: move the last entry into slot i, then append the new one
    gm->dev_ptrs[i] = gm->dev_ptrs[gm->n_dev];
    gm->dev_size[i] = gm->dev_size[gm->n_dev];
    gm->dev_cat[i] = gm->dev_cat[gm->n_dev];
    void *p = gpu_malloc(gm, bytes);
    gm->category = saved;
    return p;
}

// Pinned host memory, zeroed, freed by destroy (NULL in a dry run).
static void *gpu_malloc_host(GpuModel *gm, size_t bytes) {
    void *p = NULL;
    if (gm->dry) return NULL;
    if (bytes == 0) bytes = 16;
    CUDA_CHECK(cudaMallocHost(&p, bytes));
    memset(p, 0, bytes);
    if (gm->n_host == gm->cap_host) {
        gm->cap_host = gm->cap_host ? 2 * gm->cap_host : 32;
        gm->host_ptrs = (void **)xrealloc(gm->host_ptrs, sizeof(void *) * gm->cap_host);
    }
    gm->host_ptrs[gm->n_host++] = p;
    return p;
}

#define DEV(type, count) ((type *)gpu_malloc(gm, sizeof(type) * (size_t)(count)))
#define PINNED(type, count) ((type *)gpu_malloc_host(gm, sizeof(type) * (size_t)(count)))

// Pointers into the local buffers for one tensor (layer -1: model-level);
// for an expert tensor, its first local expert.
static float *gpu_param(const GpuModel *gm, int layer, ParamKind k) {
    return gm->params + layout_offset(&gm->local_lay, layer, k);
}
static floatX *gpu_paramX(const GpuModel *gm, int layer, ParamKind k) {
    return gm->paramsX + layout_offset(&gm->local_lay, layer, k);
}
static float *gpu_grad(const GpuModel *gm, int layer, ParamKind k) {
    return gm->grads + layout_offset(&gm->local_lay, layer, k);
}

// Where local tensor i's elements live in the whole model's flat buffer.
static int64_t gpu_whole_offset(const GpuModel *gm, int i) {
    int64_t offset, len;
    ep_owned_range(&gm->lay.t[gm->local_to_whole[i]], &gm->shard, &offset, &len);
    return offset;
}

// A copy ordered on the model's stream, complete on return (pageable host
// memory may be staged and return early with a plain cudaMemcpy).
static void gpu_copy(const GpuModel *gm, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, gm->stream));
    CUDA_CHECK(cudaStreamSynchronize(gm->stream));
}

static size_t max3(size_t a, size_t b, size_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static int env_flag(const char *name) {
    const char *v = getenv(name);
    return v && v[0] && strcmp(v, "0") != 0;
}

// The expert GEMMs' path from the run's options (--grouped-gemm; the device
// path without options). MOE_GROUPED_GEMM=0, the cuBLAS path's per-expert
// fallback (kernels/grouped_gemm.cuh), implies the cuBLAS path.
static int gpu_grouped_cublas(const Backend *be) {
    const char *env = getenv("MOE_GROUPED_GEMM");
    return (be->opts && strcmp(be->opts->grouped_gemm, "cublas") == 0) || (env && strcmp(env, "0") == 0);
}

// Whether the run's options turn the CUDA graphs off: --cuda-graph 0, or
// --profile, whose per-phase events between kernels a graph would not time
// (kernels/profiler.cuh records plain events).
static int gpu_no_graphs(const Backend *be) {
    return be->opts && (!be->opts->cuda_graph || be->opts->profile > 0);
}

// The backend's create (train/backend.h): NCCL when the run has several ranks
// (or MOE_NCCL=1, to exercise the NCCL path on one GPU); MOE_EP_EXCHANGE=1
// routes the MoE rows through the EP exchange even with --ep 1 (a test).
static int gpu_create(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T) {
    GpuBackendOptions opt = { NULL, env_flag("MOE_EP_EXCHANGE"), gpu_grouped_cublas(be), gpu_no_graphs(be) };
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

// ----------------------------------------------------------------------------
// Creation, phase by phase: the ranks, the device, then the memory by category.

static void gpu_destroy(Backend *be);

// The ranks (one process holds every expert unless opt brings collectives),
// checked for consistency, what the kernels can run (the head dim, the
// number of routed experts), and this rank's expert shard. Returns 0 or -1.
static int gpu_check_ranks(GpuModel *gm, const GpuBackendOptions *opt) {
    const MoeConfig *c = &gm->cfg;
    if (opt && opt->comm) {
        gm->ranks = *opt->comm;
        gm->has_comm = 1;
    } else {
        gm->ranks.world = gm->ranks.ep = gm->ranks.edp = 1;
    }
    const GpuComm *rk = &gm->ranks;
    int P = rk->ep;
    if (P < 1 || rk->world % P != 0 || rk->edp != rk->world / P || rk->ep_rank != rk->rank % P ||
        rk->edp_rank != rk->rank / P) {
        fprintf(stderr, "error: inconsistent ranks: rank %d of %d, EP group of %d (position %d), EDP group of %d "
                "(position %d)\n", rk->rank, rk->world, rk->ep, rk->ep_rank, rk->edp, rk->edp_rank);
        return -1;
    }
    if (c->n_routed % P != 0) {
        fprintf(stderr, "error: --ep %d must divide n_routed (%d)\n", P, c->n_routed);
        return -1;
    }
    char aerr[256];
    if (attention_supported(c->d_model / c->n_heads, aerr, sizeof aerr) != 0) {
        fprintf(stderr, "error: %s\n", aerr);
        return -1;
    }
    if (gm->n_moe > 0 && c->n_routed > 8192) {
        fprintf(stderr, "error: the GPU routing kernels take at most 8192 routed experts (n_routed = %d)\n",
                c->n_routed);
        return -1;
    }
    // The device grouped GEMM copies whole 16-byte rows (cp.async): with
    // other sizes the expert GEMMs take the cuBLAS path, which takes any.
    gm->gg_device = !(opt && opt->grouped_cublas);
    if (gm->n_moe > 0 && gm->gg_device && !grouped_dev_supported(c->d_model, c->d_expert)) {
        gm->gg_device = 0;
        if (!gm->dry && rk->rank == 0)
            printf("note: the device grouped GEMM needs d_model and d_expert multiples of 8 (%d and %d): the expert "
                   "GEMMs take the cuBLAS path (--grouped-gemm cublas)\n", c->d_model, c->d_expert);
    }
    gm->shard = ep_shard(c->n_routed, P, rk->ep_rank);
    gm->exchange = gm->n_moe > 0 && (P > 1 || (opt && opt->force_exchange));
    ASSERT(!gm->exchange || gm->has_comm, "the expert-parallel exchange needs the ranks' collectives");
    // Graphs need a micro-batch whose work the host does not size: not under
    // the EP exchange (the all-to-all-v's row counts reach the host inside
    // the forward) nor the cuBLAS expert GEMMs (host row counts).
    const char *why = NULL;
    if (opt && opt->no_graphs) why = "--cuda-graph 0 or --profile, whose per-phase timers run between the kernels";
    else if (gm->n_moe > 0 && gm->exchange) why = "the EP all-to-all's row counts reach the host inside each MoE layer";
    else if (gm->n_moe > 0 && !gm->gg_device) why = "the cuBLAS expert GEMMs take their row counts on the host";
#ifdef GPU_DEBUG_SYNC
    else why = "GPU_DEBUG_SYNC waits for the device after every kernel";
#endif
    gm->graphs = why == NULL;
    gm->graphs_off = why;
    return 0;
}

// The device: names it, refuses a GPU older than the build's architecture,
// and opens the stream and the cuBLAS / cuBLASLt handles. Returns 0 or -1.
static int gpu_open_device(GpuModel *gm) {
    int dev;
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    char who[32] = "";
    if (gm->ranks.world > 1) snprintf(who, sizeof who, "rank %d: ", gm->ranks.rank);
    printf("%sGPU %d: %s (sm_%d%d, %d SMs, %.1f GiB), activations %s\n", who, dev, prop.name, prop.major, prop.minor,
           prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0, FLOATX_NAME);
    snprintf(gm->device_name, sizeof gm->device_name, "%s", prop.name);
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
    // A non-blocking stream, and every copy and memset of the model on it: the
    // legacy default stream of another thread (ranks run as threads in the
    // tests, a host program may embed the trainer) then neither orders with
    // this stream nor, while this stream captures a graph, joins the capture.
    CUDA_CHECK(cudaStreamCreateWithFlags(&gm->stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&gm->cublas));
    CUBLAS_CHECK(cublasSetStream(gm->cublas, gm->stream));
    // Plain fp32 accumulation, never TF32 (CUBLAS_COMPUTE_32F with the default math mode).
    CUBLAS_CHECK(cublasSetMathMode(gm->cublas, CUBLAS_DEFAULT_MATH));
    matmul_init(&gm->mm, gm->stream);
    profiler_init(&gm->prof, 4096);
    return 0;
}

// This rank's parameters (n_local: the replicated tensors and its experts'
// slices), their floatX copy, gradients, AdamW moments, and the biases.
static void gpu_alloc_params(GpuModel *gm) {
    size_t n = (size_t)gm->n_local;
    gm->category = MEM_MASTER;
    gm->params = DEV(float, n);
#ifdef ENABLE_FP32
    gm->paramsX = gm->params;
#else
    gm->category = MEM_WEIGHTS_X;
    gm->paramsX = DEV(floatX, n);
    gm->category = MEM_MASTER;
#endif
    gm->grads = DEV(float, n);
    gm->adam_m = DEV(float, n);
    gm->adam_v = DEV(float, n);
    gm->bias = DEV(float, (size_t)gm->n_moe * gm->cfg.n_routed);
}

// Layer l's activations kept for the backward, for N = maxB maxT tokens.
// Expert-side rows: exactly N K without the exchange; under it their number
// varies with the routing (N K on average) and the buffers grow on demand
// (gpu_reserve_rows).
static void gpu_alloc_layer(GpuModel *gm, GpuLayer *la, int l) {
    const MoeConfig *c = &gm->cfg;
    size_t B = gm->maxB, T = gm->maxT, N = B * T, d = c->d_model, H = c->n_heads, E = c->n_routed;
    size_t NK = N * c->top_k, de = c->d_expert, sh = (size_t)c->n_shared * de;
    size_t El = gm->shard.n_local, P = gm->shard.size;
    la->rstd1 = DEV(float, N);
    la->h1 = DEV(floatX, N * d);
    la->qkv = DEV(floatX, N * 3 * d);
    la->lse = DEV(float, B * H * T);
    la->a = DEV(floatX, N * d);
    la->xmid = DEV(float, N * d);
    la->rstd2 = DEV(float, N);
    la->h2 = DEV(floatX, N * d);
    if (!config_is_moe(c, l)) {
        la->f13 = DEV(floatX, N * 2 * c->d_ff);
        la->fact = DEV(floatX, N * c->d_ff);
        return;
    }
    la->s = DEV(float, N * E);
    la->zsum = DEV(double, N);
    la->sel = DEV(int, NK);
    la->gates = DEV(float, NK);
    la->counts = DEV(int, E);
    if (!gm->dry) {
        size_t m = (size_t)(l - c->n_dense);
        la->offsets = gm->offsets_all + m * (E + 1);
        la->primal_tok = gm->primal_all + m * N;
        la->dual_cnt = gm->dual_all + m * 3 * E;
    }
    if (gm->exchange || !gm->gg_device) la->h_offsets = PINNED(int, E + 1);
    la->row_of = DEV(int, NK);
    la->slot_of = DEV(int, NK);
    la->rows_cap = (int)NK;
    la->xe = DEV(floatX, NK * d);
    la->e13 = DEV(floatX, NK * 2 * de);
    la->eact = DEV(floatX, NK * de);
    la->eout = DEV(floatX, NK * d);
    if (gm->exchange) {
        la->h_exp_off = PINNED(int, El + 1);
        la->exp_off = DEV(int, El + 1);
        la->recv_cnt = DEV(int, E);
        la->h_recv_cnt = PINNED(int, E);
        la->exp_src = DEV(int, NK);
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
    la->aux_f = DEV(int, B * E);
}

// The inputs, the residual stream, every layer's activations, the head's.
static void gpu_alloc_activations(GpuModel *gm) {
    const MoeConfig *c = &gm->cfg;
    size_t N = (size_t)gm->maxB * gm->maxT, d = c->d_model, L = c->n_layers, V = c->vocab_size;
    gm->category = MEM_ACTIVATIONS;
    // tokens (N) | targets (N) | n_uniq (1) | uniq (N) | offsets (N + 1) | positions (N)
    gm->in = DEV(int, 5 * N + 2);
    if (!gm->dry) {
        gm->tokens = gm->in;
        gm->targets = gm->in + N;
        gm->emb_n = gm->in + 2 * N;
        gm->emb_uniq = gm->in + 2 * N + 1;
        gm->emb_off = gm->in + 3 * N + 1;
        gm->emb_pos = gm->in + 4 * N + 2;
        gm->h_in = (int *)xcalloc(5 * N + 2, sizeof(int));
    }
    gm->offsets_all = DEV(int, (size_t)gm->n_moe * (c->n_routed + 1));
    gm->primal_all = DEV(double, (size_t)gm->n_moe * N);
    gm->dual_all = DEV(int, (size_t)gm->n_moe * 3 * c->n_routed);
    gm->x = DEV(float, (L + 1) * N * d);
    gm->layer = (GpuLayer *)xcalloc(L, sizeof(GpuLayer));
    for (size_t l = 0; l < L; l++) gpu_alloc_layer(gm, &gm->layer[l], (int)l);
    gm->rstdf = DEV(float, N);
    gm->hf = DEV(floatX, N * d);
    gm->logits = DEV(floatX, N * V);
    gm->losses = DEV(double, N);
    gm->aux = DEV(double, (size_t)gm->n_moe + 1);
    // counts (n_moe E) | dual (n_moe 3 E) | sums (2 doubles) | primal (n_moe doubles) | bad (1 int, in an
    // 8-byte word): one copy to the host, one memset
    size_t nc = (size_t)gm->n_moe * c->n_routed, nm = (size_t)gm->n_moe;
    gm->stats_buf = DEV(int64_t, STATS_WORDS(nc, nm));
    int64_t *sb = gm->stats_buf;
    if (!gm->dry)
        gm->stats = (StepStats){ sb, sb + nc, (double *)(sb + 4 * nc), (double *)(sb + 4 * nc + 2),
                                 (int *)(sb + 4 * nc + 2 + nm) };
    gm->rope_cos = DEV(float, (size_t)gm->maxT * (d / c->n_heads / 2));
    gm->rope_sin = DEV(float, (size_t)gm->maxT * (d / c->n_heads / 2));
}

// Scratch the layers share (the backward's buffers, the EP exchange's rows,
// reductions), and the pinned host staging of what crosses to the host.
static void gpu_alloc_scratch(GpuModel *gm) {
    const MoeConfig *c = &gm->cfg;
    size_t B = gm->maxB, T = gm->maxT, N = B * T, d = c->d_model, V = c->vocab_size, H = c->n_heads;
    size_t E = c->n_routed, NK = N * c->top_k, de = c->d_expert, sh = (size_t)c->n_shared * de;
    size_t dff = c->n_dense > 0 ? (size_t)c->d_ff : 0;
    size_t nmoe = gm->n_moe, El = gm->shard.n_local, P = gm->shard.size;
    gm->category = MEM_SCRATCH;
    gm->att_D = DEV(float, B * H * T);
    gm->dres = DEV(float, N * d);
    gm->dresX = DEV(floatX, N * d);
    gm->dh = DEV(float, N * d);
    if (c->parallel_residual) gm->dh_ffn = DEV(float, N * d);
    gm->dbig = DEV(floatX, N * max3(3 * d, 2 * dff, 2 * sh));
    gm->dsmall = DEV(floatX, N * max3(d, dff, sh));
    gm->norm_scratch = DEV(float, rmsnorm_scratch_floats((int)N, (int)d));
    gm->gn_partials = DEV(double, gradnorm_partials(gm->n_local));
    gm->gn_out = DEV(double, P + 1);
    gm->row_f32 = DEV(float, V);
    if (nmoe > 0) {
        gm->scratch_rows = (int)NK;
        gm->dgates = DEV(float, NK);
        gm->deout = DEV(floatX, NK * d);
        gm->dact_e = DEV(floatX, NK * de);
        gm->d13_e = DEV(floatX, NK * 2 * de);
        gm->dxe = DEV(floatX, NK * d);
        gm->dlr = DEV(floatX, N * E);
        gm->perm_scratch = DEV(int, moe_permute_scratch_ints((int64_t)NK, (int)E));
        gm->aux_scratch = DEV(double, moe_aux_scratch_doubles((int)B, (int)T, (int)E));
        if (gm->exchange) {
            gm->xs = DEV(floatX, NK * d);
            gm->xr = DEV(floatX, NK * d);
            gm->ye = DEV(floatX, NK * d);
            // Not through PINNED: gpu_reserve_rows replaces it when the rows grow.
            if (!gm->dry) CUDA_CHECK(cudaMallocHost((void **)&gm->h_exp_src, sizeof(int) * NK));
        }
        if (P > 1) { // one expert per EP rank: the checkpoint gathers go through this
            size_t per = 0;
            for (int i = 0; i < gm->local_lay.n; i++)
                if (layout_is_expert(gm->local_lay.t[i].kind))
                    per = max3(per, (size_t)(gm->local_lay.t[i].numel / El), 0);
            gm->gather_buf = DEV(float, P * per);
        }
    }
    gm->h_stats = PINNED(int64_t, STATS_WORDS(nmoe * E, nmoe));
    gm->h_gn = PINNED(double, P + 1);
    gm->h_row = PINNED(float, V);
    gm->h_count = (int *)xcalloc(V, sizeof(int));
}

// What stays constant: the RoPE tables (computed on the host exactly as the
// CPU model does), and the cuBLAS grouped GEMMs' staging over this rank's
// experts (the device path needs none). The library workspaces are counted
// here (allocated by their own modules).
static void gpu_upload_constants(GpuModel *gm) {
    const MoeConfig *c = &gm->cfg;
    int gg_cublas = gm->n_moe > 0 && !gm->gg_device;
    gm->bytes[MEM_WORKSPACE] += MATMUL_WORKSPACE_BYTES;
    if (gg_cublas)
        gm->bytes[MEM_WORKSPACE] += grouped_gemm_device_bytes(gm->shard.n_local, gm->n_moe * GG_PER_LAYER);
    if (gm->dry) return;
    int T = gm->maxT, hd = c->d_model / c->n_heads;
    size_t half = (size_t)hd / 2;
    float *ct = (float *)xmalloc(sizeof(float) * T * half), *st = (float *)xmalloc(sizeof(float) * T * half);
    attention_rope_tables(ct, st, T, hd, c->rope_theta);
    gpu_copy(gm, gm->rope_cos, ct, sizeof(float) * T * half, cudaMemcpyHostToDevice);
    gpu_copy(gm, gm->rope_sin, st, sizeof(float) * T * half, cudaMemcpyHostToDevice);
    free(ct);
    free(st);
    if (gg_cublas) grouped_gemm_init(&gm->gg, gm->cublas, gm->stream, gm->shard.n_local, gm->n_moe * GG_PER_LAYER);
}

static void gpu_print_memory(const GpuModel *gm) {
    const GpuComm *rk = &gm->ranks;
    if (rk->rank != 0) return;
    const double GiB = 1073741824.0;
    printf("GPU memory%s: %.2f GiB parameters + gradients + AdamW, %.2f GiB weight copy, %.2f GiB activations, "
           "%.2f GiB scratch, %.2f GiB workspaces (micro-batch %d x %d)\n", rk->world > 1 ? " of rank 0" : "",
           gm->bytes[MEM_MASTER] / GiB, gm->bytes[MEM_WEIGHTS_X] / GiB, gm->bytes[MEM_ACTIVATIONS] / GiB,
           gm->bytes[MEM_SCRATCH] / GiB, gm->bytes[MEM_WORKSPACE] / GiB, gm->maxB, gm->maxT);
    if (rk->world > 1 || gm->exchange)
        printf("ranks: %d (EP groups of %d: %d of %d routed experts per rank, %.1f%% of the parameters held; "
               "EDP groups of %d)%s\n", rk->world, gm->shard.size, gm->shard.n_local, gm->cfg.n_routed,
               100.0 * (double)gm->n_local / (double)gm->lay.total, rk->edp,
               gm->exchange ? ", MoE rows through the EP all-to-all" : "");
}

int gpu_backend_create(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T,
                       const GpuBackendOptions *opt) {
    GpuModel *gm = (GpuModel *)xcalloc(1, sizeof(GpuModel));
    be->ctx = gm;
    gm->cfg = *c;
    gm->ro = *ro;
    gm->maxB = B;
    gm->maxT = T;
    gm->n_moe = config_n_moe(c);
    if (gpu_check_ranks(gm, opt) != 0 || gpu_open_device(gm) != 0) {
        gpu_destroy(be);
        return -1;
    }
    // The whole model's layout, and this rank's part of it (parallel/ep_layout.h).
    layout_build(&gm->lay, c);
    gm->n_replicated = ep_local_layout(&gm->lay, &gm->shard, &gm->local_lay, &gm->local_to_whole);
    gm->n_local = gm->local_lay.total;
    if (decay_ranges_from_layout(&gm->decay, &gm->local_lay) != 0) {
        gpu_destroy(be);
        return -1;
    }
    be->n_params = gm->lay.total;
    gpu_alloc_params(gm);
    gpu_alloc_activations(gm);
    gpu_alloc_scratch(gm);
    gpu_upload_constants(gm);
    gpu_print_memory(gm);
    if (gm->n_moe > 0 && gm->gg_device && gm->ranks.rank == 0)
        printf("expert GEMMs: device kernels, expert offsets on the GPU (--grouped-gemm device)\n");
    if (gm->ranks.rank == 0 && gm->graphs)
        printf("CUDA graphs: on (a training micro-batch captured once per shape, then replayed)\n");
    else if (gm->ranks.rank == 0)
        printf("CUDA graphs: off (%s)\n", gm->graphs_off);
    // The model's stream, not the device: another thread's stream may be capturing.
    CUDA_CHECK(cudaStreamSynchronize(gm->stream));
    return 0;
}

static void gpu_destroy(Backend *be) {
    GpuModel *gm = gpu_model(be);
    if (!gm) return;
    if (gm->stream) CUDA_CHECK(cudaStreamSynchronize(gm->stream));
    for (int i = 0; i < gm->n_graphs; i++) CUDA_CHECK(cudaGraphExecDestroy(gm->graph[i].exec));
    if (gm->n_moe > 0 && gm->gg.handle) grouped_gemm_free(&gm->gg);
    for (int i = 0; i < gm->n_dev; i++) CUDA_CHECK(cudaFree(gm->dev_ptrs[i]));
    for (int i = 0; i < gm->n_host; i++) CUDA_CHECK(cudaFreeHost(gm->host_ptrs[i]));
    if (gm->h_exp_src) CUDA_CHECK(cudaFreeHost(gm->h_exp_src));
    if (gm->mm.lt) matmul_free(&gm->mm);
    if (gm->prof.cap) profiler_free(&gm->prof);
    if (gm->cublas) CUBLAS_CHECK(cublasDestroy(gm->cublas));
    if (gm->stream) CUDA_CHECK(cudaStreamDestroy(gm->stream));
    free(gm->dev_ptrs);
    free(gm->dev_size);
    free(gm->dev_cat);
    free(gm->host_ptrs);
    free(gm->layer);
    free(gm->h_count);
    free(gm->h_in);
    free(gm->local_to_whole);
    layout_free(&gm->lay);
    layout_free(&gm->local_lay);
    decay_ranges_free(&gm->decay);
    free(gm);
    be->ctx = NULL;
}

// ----------------------------------------------------------------------------
// Parameters, optimizer state, biases. The host side always sees the whole
// model in layout order (n_params); this rank holds its local part.

// dev (n_local) = this rank's part of the whole-model buffer host (n_params).
static void gpu_scatter_local(GpuModel *gm, float *dev, const float *host) {
    for (int i = 0; i < gm->local_lay.n; i++) {
        const ParamTensor *t = &gm->local_lay.t[i];
        CUDA_CHECK(cudaMemcpyAsync(dev + t->offset, host + gpu_whole_offset(gm, i), sizeof(float) * t->numel,
                                   cudaMemcpyHostToDevice, gm->stream));
    }
    CUDA_CHECK(cudaStreamSynchronize(gm->stream));
}

// host (n_params) = the whole model from every rank's dev (n_local). The
// replicated tensors are this rank's; each expert tensor is gathered over the
// EP group one local expert index at a time, as train_moe.c's cpu_gather
// does: each rank puts its expert j into its slot of a zeroed (P, expert)
// buffer, a sum over the group fills every slot (x + 0 is exact), and slot q
// is expert q El + j. Collective over the EP group.
static void gpu_gather_whole(GpuModel *gm, const float *dev, float *host) {
    cudaStream_t st = gm->stream;
    for (int i = 0; i < gm->local_lay.n; i++) {
        const ParamTensor *t = &gm->local_lay.t[i];
        const ParamTensor *whole = &gm->lay.t[gm->local_to_whole[i]];
        if (!layout_is_expert(t->kind) || gm->shard.size == 1) {
            CUDA_CHECK(cudaMemcpyAsync(host + gpu_whole_offset(gm, i), dev + t->offset, sizeof(float) * t->numel,
                                       cudaMemcpyDeviceToHost, st));
            continue;
        }
        int64_t per = t->numel / gm->shard.n_local;
        for (int j = 0; j < gm->shard.n_local; j++) {
            CUDA_CHECK(cudaMemsetAsync(gm->gather_buf, 0, sizeof(float) * per * gm->shard.size, st));
            CUDA_CHECK(cudaMemcpyAsync(gm->gather_buf + (int64_t)gm->ranks.ep_rank * per, dev + t->offset + j * per,
                                       sizeof(float) * per, cudaMemcpyDeviceToDevice, st));
            gm->ranks.allreduce_f32(gm->ranks.ctx, COMM_EP, gm->gather_buf, (size_t)(per * gm->shard.size), st);
            for (int q = 0; q < gm->shard.size; q++)
                CUDA_CHECK(cudaMemcpyAsync(host + whole->offset + ((int64_t)q * gm->shard.n_local + j) * per,
                                           gm->gather_buf + q * per, sizeof(float) * per, cudaMemcpyDeviceToHost, st));
            CUDA_CHECK(cudaStreamSynchronize(st)); // before the buffer is zeroed again (and the host reads)
        }
    }
    CUDA_CHECK(cudaStreamSynchronize(st));
}

static void gpu_set_params(Backend *be, const float *p) {
    GpuModel *gm = gpu_model(be);
    gpu_scatter_local(gm, gm->params, p);
#ifndef ENABLE_FP32
    convert_f32_to_x(gm->paramsX, gm->params, gm->n_local, gm->stream);
#endif
    CUDA_CHECK(cudaStreamSynchronize(gm->stream));
}

static void gpu_get_params(Backend *be, float *p) {
    GpuModel *gm = gpu_model(be);
    gpu_gather_whole(gm, gm->params, p);
}

static void gpu_set_opt_state(Backend *be, const float *m, const float *v) {
    GpuModel *gm = gpu_model(be);
    gpu_scatter_local(gm, gm->adam_m, m);
    gpu_scatter_local(gm, gm->adam_v, v);
}

static void gpu_get_opt_state(Backend *be, float *m, float *v) {
    GpuModel *gm = gpu_model(be);
    gpu_gather_whole(gm, gm->adam_m, m);
    gpu_gather_whole(gm, gm->adam_v, v);
}

static void gpu_set_bias(Backend *be, const float *bias) {
    GpuModel *gm = gpu_model(be);
    size_t nb = (size_t)gm->n_moe * gm->cfg.n_routed;
    // No wait: a copy from pageable host memory has taken the data when it
    // returns, and the routing kernels that read the biases follow on this stream.
    PHASE(PH_OPTIMIZER);
    if (nb) CUDA_CHECK(cudaMemcpyAsync(gm->bias, bias, sizeof(float) * nb, cudaMemcpyHostToDevice, gm->stream));
    PHASE(PH_HOST); // until the next step's first work
}

static void gpu_zero_grad(Backend *be) {
    GpuModel *gm = gpu_model(be);
    // No wait: everything that reads the gradients is later on this stream.
    PHASE(PH_OPTIMIZER);
    CUDA_CHECK(cudaMemsetAsync(gm->grads, 0, sizeof(float) * (size_t)gm->n_local, gm->stream));
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
static void gpu_reserve_rows(GpuModel *gm, GpuLayer *la, int l, int R) {
    size_t d = gm->cfg.d_model, de = gm->cfg.d_expert;
    if (R > la->rows_cap) {
        int cap = grow_rows(R, la->rows_cap);
        la->xe = (floatX *)gpu_regrow(gm, la->xe, sizeof(floatX) * cap * d);
        la->e13 = (floatX *)gpu_regrow(gm, la->e13, sizeof(floatX) * cap * 2 * de);
        la->eact = (floatX *)gpu_regrow(gm, la->eact, sizeof(floatX) * cap * de);
        la->exp_src = (int *)gpu_regrow(gm, la->exp_src, sizeof(int) * cap);
        la->rows_cap = cap;
        char who[32] = "";
        if (gm->ranks.world > 1) snprintf(who, sizeof who, "rank %d: ", gm->ranks.rank);
        printf("%sexpert-side rows of layer %d: capacity now %d (%.2f x the micro-batch's N K) for %d rows received\n",
               who, l, cap, (double)cap / ((double)gm->maxB * gm->maxT * gm->cfg.top_k), R);
    }
    if (R > gm->scratch_rows) {
        int cap = grow_rows(R, gm->scratch_rows);
        gm->dact_e = (floatX *)gpu_regrow(gm, gm->dact_e, sizeof(floatX) * cap * de);
        gm->d13_e = (floatX *)gpu_regrow(gm, gm->d13_e, sizeof(floatX) * cap * 2 * de);
        gm->dxe = (floatX *)gpu_regrow(gm, gm->dxe, sizeof(floatX) * cap * d);
        gm->xr = (floatX *)gpu_regrow(gm, gm->xr, sizeof(floatX) * cap * d);
        gm->ye = (floatX *)gpu_regrow(gm, gm->ye, sizeof(floatX) * cap * d);
        CUDA_CHECK(cudaFreeHost(gm->h_exp_src));
        CUDA_CHECK(cudaMallocHost((void **)&gm->h_exp_src, sizeof(int) * cap));
        gm->scratch_rows = cap;
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
static void expert_ffn_forward(GpuModel *gm, GpuLayer *la, int l, int moe_idx, floatX *ye) {
    int d = gm->cfg.d_model, de = gm->cfg.d_expert, El = gm->shard.n_local, slot = moe_idx * GG_PER_LAYER;
    const floatX *w13 = gpu_paramX(gm, l, P_EXPERTS_W13), *w2 = gpu_paramX(gm, l, P_EXPERTS_W2);
    cudaStream_t st = gm->stream;
    if (gm->gg_device) {
        grouped_dev_forward(la->e13, la->xe, w13, la->exp_off, El, la->R, d, 2 * de, st);
        swiglu_forward(la->eact, la->e13, la->R, de, st);
        grouped_dev_forward(ye, la->eact, w2, la->exp_off, El, la->R, de, d, st);
    } else {
        grouped_matmul_forward(&gm->gg, slot + GG_FWD13, la->e13, la->xe, w13, la->h_exp_off, d, 2 * de);
        swiglu_forward(la->eact, la->e13, la->R, de, st);
        grouped_matmul_forward(&gm->gg, slot + GG_FWD2, ye, la->eact, w2, la->h_exp_off, de, d);
    }
}

// The MoE FFN of layer l (the moe_idx-th MoE layer): xout (N, d) fp32 = xmid + moe(h2).
static void gpu_moe_forward(GpuModel *gm, int l, int moe_idx, int B, int T, float *xout) {
    const MoeConfig *c = &gm->cfg;
    GpuLayer *la = &gm->layer[l];
    RouteParams rp = route_params(c, &gm->ro);
    int N = B * T, E = c->n_routed, K = c->top_k, d = c->d_model, de = c->d_expert, sh = c->n_shared * de;
    int NK = N * K;
    cudaStream_t st = gm->stream;

    // Router logits (N, E) in fp32, then the fused routing epilogue and the permutation.
    PHASE(PH_ROUTER);
    matmul_forward(&gm->mm, la->s, CUDA_R_32F, la->h2, gpu_paramX(gm, l, P_ROUTER), N, d, E, NULL);
    CUDA_CHECK(cudaMemsetAsync(la->counts, 0, sizeof(int) * E, st));
    CUDA_CHECK(cudaMemsetAsync(la->dual_cnt, 0, sizeof(int) * 3 * E, st));
    RouteDualOut dual = { la->primal_tok, la->dual_cnt,
                          gm->keep_scores ? gm->kept + (size_t)moe_idx * gm->maxB * gm->maxT * E : NULL };
    moe_route(la->s, la->zsum, la->sel, la->gates, la->counts, gm->bias + (size_t)moe_idx * E, N, &rp, &dual, st);
    // The primal-dual parts join the step's statistics (stats_accumulate).
    PHASE(PH_PERMUTE);
    // The permutation gathers the rows in expert order as it places them: into
    // the send buffer under expert parallelism, else the experts' input.
    moe_permute(la->offsets, la->row_of, la->slot_of, gm->perm_scratch, la->sel, la->counts, NK, E,
                gm->exchange ? gm->xs : la->xe, la->h2, K, d, st);
    const GpuComm *rk = &gm->ranks;
    const EpShard *ep = &gm->shard;
    size_t rb = sizeof(floatX) * d; // bytes per row
    if (gm->exchange) {
        // gm->xs holds this rank's rows in expert order (the rows of EP rank p's
        // experts are contiguous); every expert's count goes to the rank that
        // holds it.
        rk->alltoall_i32(rk->ctx, la->counts, la->recv_cnt, ep->n_local, st);
        CUDA_CHECK(cudaMemcpyAsync(la->h_recv_cnt, la->recv_cnt, sizeof(int) * E, cudaMemcpyDeviceToHost, st));
    }

    // The layer's host synchronisation, only where the algorithm needs it:
    // cublasGemmGroupedBatchedEx takes every expert's row count as a host
    // array, and under expert parallelism the counts received size the
    // all-to-all-v, so the offsets (and those counts) must reach the host
    // before the expert GEMMs can be enqueued. The device grouped GEMM reads
    // them on the GPU; the step's counts come from gm->stats either way.
    if (gm->exchange || !gm->gg_device) {
        CUDA_CHECK(cudaMemcpyAsync(la->h_offsets, la->offsets, sizeof(int) * (E + 1), cudaMemcpyDeviceToHost, st));
        PHASE(PH_HOST);
        CUDA_CHECK(cudaStreamSynchronize(st));
        PHASE(PH_PERMUTE);
        ASSERT(la->h_offsets[E] == NK, "layer %d routed %d slots, expected %d (routing counts and permutation "
               "disagree)", l, la->h_offsets[E], NK);
    }

    if (gm->exchange) {
        // Sizes and order of the expert side (parallel/ep_layout.h), then the
        // rows travel to their experts' ranks and are put expert-major.
        for (int i = 0; i < E; i++)
            ASSERT(la->h_recv_cnt[i] >= 0 && la->h_recv_cnt[i] <= NK * ep->size,
                   "layer %d: EP rank %d announces %d rows for local expert %d", l, i / ep->n_local, la->h_recv_cnt[i],
                   i % ep->n_local);
        int R = ep_exchange_rows(ep, la->h_offsets, la->h_recv_cnt, la->send_rows, la->recv_rows);
        gpu_reserve_rows(gm, la, l, R);
        ep_expert_major_order(ep, la->h_recv_cnt, la->recv_rows, la->h_exp_off, gm->h_exp_src);
        la->R = R;
        // The device grouped GEMMs read the expert-major offsets on the GPU (from
        // pinned memory: rewritten only by this layer's next forward, after its
        // synchronisation).
        if (gm->gg_device)
            CUDA_CHECK(cudaMemcpyAsync(la->exp_off, la->h_exp_off, sizeof(int) * (ep->n_local + 1),
                                       cudaMemcpyHostToDevice, st));
        // From pinned memory, asynchronously: the next writer of h_exp_src is the
        // next MoE layer, after its own synchronisation.
        if (R > 0)
            CUDA_CHECK(cudaMemcpyAsync(la->exp_src, gm->h_exp_src, sizeof(int) * R, cudaMemcpyHostToDevice, st));
        rk->alltoallv(rk->ctx, gm->xs, la->send_rows, gm->xr, la->recv_rows, rb, st);
        moe_rows_gather(la->xe, gm->xr, la->exp_src, R, rb, st);
    } else {
        la->R = NK; // la->xe was filled by moe_permute
    }

    // This rank's routed experts; their outputs back to received order and to
    // the tokens' ranks (model/moe.c's moe_return).
    PHASE(PH_EXPERT_GEMM);
    expert_ffn_forward(gm, la, l, moe_idx, gm->exchange ? gm->ye : la->eout);
    PHASE(PH_PERMUTE);
    if (gm->exchange) {
        moe_rows_scatter(gm->xr, gm->ye, la->exp_src, la->R, rb, st);
        rk->alltoallv(rk->ctx, gm->xr, la->recv_rows, la->eout, la->send_rows, rb, st);
    }

    // xout = xmid + shared(h2) + sum_j g_j expert_j(h2). The shared experts'
    // last matmul adds xmid (fused); without them it is copied.
    PHASE(PH_SHARED);
    if (sh > 0) {
        matmul_forward(&gm->mm, la->s13, CUDA_R_FLOATX, la->h2, gpu_paramX(gm, l, P_SHARED_W13), N, d, 2 * sh, NULL);
        swiglu_forward(la->sact, la->s13, N, sh, st);
        matmul_forward(&gm->mm, xout, CUDA_R_32F, la->sact, gpu_paramX(gm, l, P_SHARED_W2), N, sh, d, la->xmid);
    } else {
        CUDA_CHECK(cudaMemcpyAsync(xout, la->xmid, sizeof(float) * (size_t)N * d, cudaMemcpyDeviceToDevice, st));
    }
    PHASE(PH_PERMUTE);
    moe_combine_forward(xout, la->eout, la->gates, la->row_of, N, K, d, st);
    PHASE(PH_ROUTER);
    moe_aux_forward(gm->aux + moe_idx, la->aux_f, gm->aux_scratch, la->s, la->zsum, la->sel, B, T, &rp, st);
}

// The inputs of a micro-batch of tokens (B, T) into their fixed device
// buffers (gm->in): with targets the targets too, with want_grad the
// embedding-backward index. One asynchronous copy from pageable memory: CUDA
// takes the data before it returns, so the host neither waits nor keeps it.
static void gpu_stage_inputs(GpuModel *gm, const int *tokens, const int *targets, int B, int T, int want_grad) {
    ASSERT(B >= 1 && T >= 1 && B <= gm->maxB && T <= gm->maxT, "forward of %d x %d exceeds the allocated %d x %d",
           B, T, gm->maxB, gm->maxT);
    int N = B * T, maxN = gm->maxB * gm->maxT;
    int *h = gm->h_in;
    size_t n = (size_t)N; // ints to copy: a prefix of the buffer
    memcpy(h, tokens, sizeof(int) * N);
    if (targets) {
        memcpy(h + maxN, targets, sizeof(int) * N);
        n = (size_t)maxN + N;
    }
    if (want_grad) {
        int *uniq = h + 2 * maxN + 1, *off = h + 3 * maxN + 1, *pos = h + 4 * maxN + 2;
        h[2 * maxN] = embedding_backward_index(tokens, N, gm->cfg.vocab_size, gm->h_count, uniq, off, pos);
        n = (size_t)5 * maxN + 2;
    }
    PHASE(PH_EMBEDDING);
    CUDA_CHECK(cudaMemcpyAsync(gm->in, h, sizeof(int) * n, cudaMemcpyHostToDevice, gm->stream));
}

// Forward of the staged tokens (B, T); with targets also the per-position
// losses, and with want_grad the logits' gradient (grad_scale / N scaled) in
// place. Enqueues only, with nothing that depends on the host but the
// shapes: a micro-batch's forward can be captured into a graph.
static void gpu_forward(GpuModel *gm, int B, int T, int targets, int want_grad, float grad_scale) {
    const MoeConfig *c = &gm->cfg;
    int N = B * T, d = c->d_model, H = c->n_heads, V = c->vocab_size, L = c->n_layers;
    size_t Nd = (size_t)N * d;
    cudaStream_t st = gm->stream;
    gm->B = B;
    gm->T = T;

    PHASE(PH_EMBEDDING);
    embedding_forward(gm->x, gm->tokens, gpu_param(gm, -1, P_TOK_EMB), N, d, st);
    for (int l = 0; l < L; l++) {
        GpuLayer *la = &gm->layer[l];
        const float *x = gm->x + (size_t)l * Nd;
        float *xout = gm->x + (size_t)(l + 1) * Nd;
        // Attention block: xmid = x + wo(attention(rope(wqkv(norm(x))))).
        PHASE(PH_ELEMENTWISE);
        rmsnorm_forward(la->h1, la->rstd1, x, gpu_param(gm, l, P_ATTN_NORM), N, d, c->rms_eps, st);
        PHASE(PH_DENSE_MATMUL);
        matmul_forward(&gm->mm, la->qkv, CUDA_R_FLOATX, la->h1, gpu_paramX(gm, l, P_WQKV), N, d, 3 * d, NULL);
        PHASE(PH_ATTENTION);
        attention_forward(la->a, la->lse, la->qkv, gm->rope_cos, gm->rope_sin, B, T, d, H, st);
        PHASE(PH_DENSE_MATMUL);
        matmul_forward(&gm->mm, la->xmid, CUDA_R_32F, la->a, gpu_paramX(gm, l, P_WO), N, d, d, x); // + x: fused
        // FFN block: xout = xmid + ffn(norm(xmid)); with a parallel residual
        // the FFN reads the layer's input, xout = x + attn + ffn(norm(x)).
        PHASE(PH_ELEMENTWISE);
        rmsnorm_forward(la->h2, la->rstd2, c->parallel_residual ? x : la->xmid, gpu_param(gm, l, P_FFN_NORM), N, d,
                        c->rms_eps, st);
        if (!config_is_moe(c, l)) {
            PHASE(PH_DENSE_MATMUL);
            matmul_forward(&gm->mm, la->f13, CUDA_R_FLOATX, la->h2, gpu_paramX(gm, l, P_FFN_W13), N, d, 2 * c->d_ff,
                           NULL);
            PHASE(PH_ELEMENTWISE);
            swiglu_forward(la->fact, la->f13, N, c->d_ff, st);
            PHASE(PH_DENSE_MATMUL);
            matmul_forward(&gm->mm, xout, CUDA_R_32F, la->fact, gpu_paramX(gm, l, P_FFN_W2), N, c->d_ff, d, la->xmid);
        } else {
            gpu_moe_forward(gm, l, l - c->n_dense, B, T, xout);
        }
    }
    PHASE(PH_ELEMENTWISE);
    rmsnorm_forward(gm->hf, gm->rstdf, gm->x + (size_t)L * Nd, gpu_param(gm, -1, P_FINAL_NORM), N, d, c->rms_eps, st);
    const floatX *head = gpu_paramX(gm, -1, c->tie_embeddings ? P_TOK_EMB : P_LM_HEAD);
    PHASE(PH_DENSE_MATMUL);
    matmul_forward(&gm->mm, gm->logits, CUDA_R_FLOATX, gm->hf, head, N, d, V, NULL);
    PHASE(PH_CLASSIFIER);
    if (targets) classifier_forward(gm->logits, gm->losses, gm->targets, N, V, grad_scale / (float)N, want_grad, st);
}

// ----------------------------------------------------------------------------
// Backward

// Backward of expert_ffn_forward for the local experts: from dye (R, d), the
// gradient of their outputs, adds the weight gradients of W13_e and W2_e (to
// the fp32 gradient, which sums the micro-batches) and leaves the input
// gradient in gm->dxe (R, d).
static void expert_ffn_backward(GpuModel *gm, GpuLayer *la, int l, int moe_idx, const floatX *dye) {
    int d = gm->cfg.d_model, de = gm->cfg.d_expert, El = gm->shard.n_local, slot = moe_idx * GG_PER_LAYER;
    const floatX *w13 = gpu_paramX(gm, l, P_EXPERTS_W13), *w2 = gpu_paramX(gm, l, P_EXPERTS_W2);
    float *dw13 = gpu_grad(gm, l, P_EXPERTS_W13), *dw2 = gpu_grad(gm, l, P_EXPERTS_W2);
    cudaStream_t st = gm->stream;
    if (gm->gg_device) {
        grouped_dev_backward_weight(dw2, dye, la->eact, la->exp_off, El, de, d, st);
        grouped_dev_backward_input(gm->dact_e, dye, w2, la->exp_off, El, la->R, de, d, st);
        swiglu_backward(gm->d13_e, gm->dact_e, la->e13, la->R, de, st);
        grouped_dev_backward_weight(dw13, gm->d13_e, la->xe, la->exp_off, El, d, 2 * de, st);
        grouped_dev_backward_input(gm->dxe, gm->d13_e, w13, la->exp_off, El, la->R, d, 2 * de, st);
    } else {
        const int *off = la->h_exp_off; // the forward's expert-side row counts, still on the host
        grouped_matmul_backward_weight(&gm->gg, slot + GG_BWD_W2, dw2, dye, la->eact, off, de, d);
        grouped_matmul_backward_input(&gm->gg, slot + GG_BWD_IN2, gm->dact_e, dye, w2, off, de, d);
        swiglu_backward(gm->d13_e, gm->dact_e, la->e13, la->R, de, st);
        grouped_matmul_backward_weight(&gm->gg, slot + GG_BWD_W13, dw13, gm->d13_e, la->xe, off, d, 2 * de);
        grouped_matmul_backward_input(&gm->gg, slot + GG_BWD_IN13, gm->dxe, gm->d13_e, w13, off, d, 2 * de);
    }
}

// The MoE FFN of layer l: from dres (the gradient at xout), dh (N, d) fp32 =
// gradient of h2 (overwritten), and the layer's parameter gradients.
static void gpu_moe_backward(GpuModel *gm, int l, int moe_idx, int B, int T, float grad_scale) {
    const MoeConfig *c = &gm->cfg;
    GpuLayer *la = &gm->layer[l];
    RouteParams rp = route_params(c, &gm->ro);
    int N = B * T, E = c->n_routed, K = c->top_k, d = c->d_model, de = c->d_expert, sh = c->n_shared * de;
    cudaStream_t st = gm->stream;
    const GpuComm *rk = &gm->ranks;
    size_t rb = sizeof(floatX) * d;

    // Combine backward: the gates get dout . y, the expert outputs gate * dout.
    PHASE(PH_PERMUTE);
    moe_combine_backward(gm->deout, gm->dgates, gm->dres, la->eout, la->gates, la->row_of, N, K, d, st);
    // The output gradients travel to the experts' ranks (model/moe.c's moe_send).
    const floatX *dye = gm->deout;
    if (gm->exchange) {
        rk->alltoallv(rk->ctx, gm->deout, la->send_rows, gm->xr, la->recv_rows, rb, st);
        moe_rows_gather(gm->ye, gm->xr, la->exp_src, la->R, rb, st);
        dye = gm->ye;
    }
    PHASE(PH_EXPERT_GEMM);
    expert_ffn_backward(gm, la, l, moe_idx, dye);
    // The input gradients come back to the tokens' ranks (moe_return).
    PHASE(PH_PERMUTE);
    const floatX *dxs = gm->dxe;
    if (gm->exchange) {
        moe_rows_scatter(gm->xr, gm->dxe, la->exp_src, la->R, rb, st);
        rk->alltoallv(rk->ctx, gm->xr, la->recv_rows, gm->xs, la->send_rows, rb, st);
        dxs = gm->xs;
    }
    moe_scatter(gm->dh, dxs, la->row_of, N, K, d, st);
    // Shared experts.
    PHASE(PH_SHARED);
    if (sh > 0) {
        matmul_backward_weight(&gm->mm, gpu_grad(gm, l, P_SHARED_W2), gm->dresX, la->sact, N, sh, d);
        matmul_backward_input(&gm->mm, gm->dsmall, CUDA_R_FLOATX, gm->dresX, gpu_paramX(gm, l, P_SHARED_W2), N, sh, d,
                              0);
        swiglu_backward(gm->dbig, gm->dsmall, la->s13, N, sh, st);
        matmul_backward_weight(&gm->mm, gpu_grad(gm, l, P_SHARED_W13), gm->dbig, la->h2, N, d, 2 * sh);
        matmul_backward_input(&gm->mm, gm->dh, CUDA_R_32F, gm->dbig, gpu_paramX(gm, l, P_SHARED_W13), N, d, 2 * sh, 1);
    }
    // Gate values and auxiliary loss -> affinities -> router logits -> router.
    PHASE(PH_ROUTER);
    moe_route_backward(gm->dlr, la->s, la->zsum, la->sel, gm->dgates, la->aux_f, B, T, &rp, grad_scale, st);
    matmul_backward_weight(&gm->mm, gpu_grad(gm, l, P_ROUTER), gm->dlr, la->h2, N, d, E);
    matmul_backward_input(&gm->mm, gm->dh, CUDA_R_32F, gm->dlr, gpu_paramX(gm, l, P_ROUTER), N, d, E, 1);
}

// Accumulates into grads the gradient of grad_scale * (loss + aux) of the
// last forward, which ran with want_grad (the logits hold their gradient).
static void gpu_backward(GpuModel *gm, float grad_scale) {
    const MoeConfig *c = &gm->cfg;
    int B = gm->B, T = gm->T, N = B * T, d = c->d_model, H = c->n_heads, V = c->vocab_size, L = c->n_layers;
    size_t Nd = (size_t)N * d;
    cudaStream_t st = gm->stream;

    // LM head and final norm.
    ParamKind head = c->tie_embeddings ? P_TOK_EMB : P_LM_HEAD;
    PHASE(PH_DENSE_MATMUL);
    matmul_backward_weight(&gm->mm, gpu_grad(gm, -1, head), gm->logits, gm->hf, N, d, V);
    matmul_backward_input(&gm->mm, gm->dh, CUDA_R_32F, gm->logits, gpu_paramX(gm, -1, head), N, d, V, 0);
    PHASE(PH_ELEMENTWISE);
    rmsnorm_backward(gm->dres, gm->dresX, gpu_grad(gm, -1, P_FINAL_NORM), gm->norm_scratch, gm->dh,
                     gm->x + (size_t)L * Nd, gpu_param(gm, -1, P_FINAL_NORM), gm->rstdf, N, d, 0, st);

    for (int l = L - 1; l >= 0; l--) {
        GpuLayer *la = &gm->layer[l];
        // FFN block: dres flows through the residual unchanged and through the FFN.
        if (!config_is_moe(c, l)) {
            floatX *dact = gm->dsmall, *d13 = gm->dbig;
            PHASE(PH_DENSE_MATMUL);
            matmul_backward_weight(&gm->mm, gpu_grad(gm, l, P_FFN_W2), gm->dresX, la->fact, N, c->d_ff, d);
            matmul_backward_input(&gm->mm, dact, CUDA_R_FLOATX, gm->dresX, gpu_paramX(gm, l, P_FFN_W2), N, c->d_ff, d,
                                  0);
            PHASE(PH_ELEMENTWISE);
            swiglu_backward(d13, dact, la->f13, N, c->d_ff, st);
            PHASE(PH_DENSE_MATMUL);
            matmul_backward_weight(&gm->mm, gpu_grad(gm, l, P_FFN_W13), d13, la->h2, N, d, 2 * c->d_ff);
            matmul_backward_input(&gm->mm, gm->dh, CUDA_R_32F, d13, gpu_paramX(gm, l, P_FFN_W13), N, d, 2 * c->d_ff,
                                  0);
        } else {
            gpu_moe_backward(gm, l, l - c->n_dense, B, T, grad_scale);
        }
        PHASE(PH_ELEMENTWISE);
        // Sequential: dres becomes the gradient at xmid. Parallel: the gradient
        // at xmid is the one at xout, and the FFN norm's part reaches dres
        // through the layer input, after the attention block (below).
        if (c->parallel_residual)
            CUDA_CHECK(cudaMemcpyAsync(gm->dh_ffn, gm->dh, sizeof(float) * Nd, cudaMemcpyDeviceToDevice, st));
        else
            rmsnorm_backward(gm->dres, gm->dresX, gpu_grad(gm, l, P_FFN_NORM), gm->norm_scratch, gm->dh, la->xmid,
                             gpu_param(gm, l, P_FFN_NORM), la->rstd2, N, d, 1, st);
        // Attention block.
        floatX *da = gm->dsmall, *dqkv = gm->dbig;
        PHASE(PH_DENSE_MATMUL);
        matmul_backward_weight(&gm->mm, gpu_grad(gm, l, P_WO), gm->dresX, la->a, N, d, d);
        matmul_backward_input(&gm->mm, da, CUDA_R_FLOATX, gm->dresX, gpu_paramX(gm, l, P_WO), N, d, d, 0);
        PHASE(PH_ATTENTION);
        attention_backward(dqkv, gm->att_D, da, la->qkv, la->a, la->lse, gm->rope_cos, gm->rope_sin, B, T, d, H, st);
        PHASE(PH_DENSE_MATMUL);
        matmul_backward_weight(&gm->mm, gpu_grad(gm, l, P_WQKV), dqkv, la->h1, N, d, 3 * d);
        matmul_backward_input(&gm->mm, gm->dh, CUDA_R_32F, dqkv, gpu_paramX(gm, l, P_WQKV), N, d, 3 * d, 0);
        PHASE(PH_ELEMENTWISE);
        rmsnorm_backward(gm->dres, gm->dresX, gpu_grad(gm, l, P_ATTN_NORM), gm->norm_scratch, gm->dh,
                         gm->x + (size_t)l * Nd, gpu_param(gm, l, P_ATTN_NORM), la->rstd1, N, d, 1, st);
        if (c->parallel_residual)
            rmsnorm_backward(gm->dres, gm->dresX, gpu_grad(gm, l, P_FFN_NORM), gm->norm_scratch, gm->dh_ffn,
                             gm->x + (size_t)l * Nd, gpu_param(gm, l, P_FFN_NORM), la->rstd2, N, d, 1, st);
    }
    PHASE(PH_EMBEDDING);
    embedding_backward(gpu_grad(gm, -1, P_TOK_EMB), gm->dres, gm->emb_uniq, gm->emb_off, gm->emb_pos, gm->emb_n, N, d,
                       st);
}

// ----------------------------------------------------------------------------
// The rest of the Backend

// One micro-batch's device work, from the staged inputs: forward, backward
// (train), and its counts and losses added to the step's statistics.
// Enqueues only: this is what a graph captures.
static void gpu_micro_batch_work(GpuModel *gm, int B, int T, int targets, int train, float grad_scale,
                                 double loss_div) {
    const MoeConfig *c = &gm->cfg;
    int N = B * T;
    gpu_forward(gm, B, T, targets, train, grad_scale);
    stats_accumulate(gm->stats, gm->offsets_all, gm->dual_all, gm->primal_all, gm->maxB * gm->maxT, gm->n_moe,
                     c->n_routed, N * c->top_k, targets ? gm->losses : NULL, N, gm->aux, loss_div, gm->stream);
    if (train) gpu_backward(gm, grad_scale);
}

// The executable graph of a training micro-batch of this shape: captured
// the first time (the capture runs nothing; the caller launches it), then
// reused. With every entry in use the oldest is replaced, after the stream
// has finished with it.
static cudaGraphExec_t gpu_graph(GpuModel *gm, int B, int T, float grad_scale, double loss_div) {
    for (int i = 0; i < gm->n_graphs; i++) {
        const GpuGraph *g = &gm->graph[i];
        if (g->B == B && g->T == T && g->grad_scale == grad_scale && g->loss_div == loss_div &&
            g->keep_scores == gm->keep_scores)
            return g->exec;
    }
    GpuGraph *g;
    if (gm->n_graphs < GPU_GRAPHS) {
        g = &gm->graph[gm->n_graphs++];
    } else {
        g = &gm->graph[gm->next_graph];
        gm->next_graph = (gm->next_graph + 1) % GPU_GRAPHS;
        CUDA_CHECK(cudaStreamSynchronize(gm->stream)); // a new shape, rare: no replay of the old one in flight
        CUDA_CHECK(cudaGraphExecDestroy(g->exec));
    }
    cudaGraph_t graph;
    // ThreadLocal: this thread's allocations and host waits are refused during
    // the capture (none belongs there), other threads' are not (ranks as threads
    // allocate while this one captures; Global mode would fail both).
    CUDA_CHECK(cudaStreamBeginCapture(gm->stream, cudaStreamCaptureModeThreadLocal));
    gpu_micro_batch_work(gm, B, T, 1, 1, grad_scale, loss_div);
    if (gm->capture_hook) gm->capture_hook(gm->capture_ctx);
    CUDA_CHECK(cudaStreamEndCapture(gm->stream, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&g->exec, graph, 0));
    CUDA_CHECK(cudaGraphDestroy(graph));
    g->B = B;
    g->T = T;
    g->grad_scale = grad_scale;
    g->loss_div = loss_div;
    g->keep_scores = gm->keep_scores;
    return g->exec;
}

static void gpu_micro_batch(Backend *be, const int *tokens, const int *targets, int B, int T, int train,
                            float grad_scale, double loss_div) {
    GpuModel *gm = gpu_model(be);
    ASSERT(!train || targets, "a training micro-batch without targets");
    gpu_stage_inputs(gm, tokens, targets, B, T, train);
    gm->stats_tokens += (int64_t)B * T;
    if (train && gm->graphs) {
        cudaGraphExec_t exec = gpu_graph(gm, B, T, grad_scale, loss_div);
        gm->B = B; // what the captured work assumes, for the read-back hooks
        gm->T = T;
        CUDA_CHECK(cudaGraphLaunch(exec, gm->stream));
    } else {
        gpu_micro_batch_work(gm, B, T, targets != NULL, train, grad_scale, loss_div);
    }
    PHASE(PH_HOST); // the host prepares the next micro-batch while the device works
}

// The step's statistics (train/backend.h): one copy to pinned memory and the
// one host wait of this call; the device sums start again from zero.
static void gpu_step_stats(Backend *be, int64_t *counts, double *loss, double *aux) {
    GpuModel *gm = gpu_model(be);
    cudaStream_t st = gm->stream;
    size_t nc = (size_t)gm->n_moe * gm->cfg.n_routed, words = STATS_WORDS(nc, (size_t)gm->n_moe);
    PHASE(PH_HOST);
    CUDA_CHECK(cudaMemcpyAsync(gm->h_stats, gm->stats_buf, sizeof(int64_t) * words, cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaMemsetAsync(gm->stats_buf, 0, sizeof(int64_t) * words, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    profiler_flush(&gm->prof); // free while the stream is idle
    gm->read_tokens = gm->stats_tokens;
    gm->stats_tokens = 0;
    int bad = *(const int *)(gm->h_stats + words - 1);
    ASSERT(bad == 0, "MoE layer %d routed a number of slots other than N K (routing counts and permutation disagree)",
           bad - 1);
    memcpy(counts, gm->h_stats, sizeof(int64_t) * nc);
    *loss = ((const double *)(gm->h_stats + 4 * nc))[0];
    *aux = ((const double *)(gm->h_stats + 4 * nc))[1];
}

// The primal-dual sums of the micro-batches the last step_stats read
// (Backend route_dual), from its copy: the integer counts, and the tokens'
// primal parts, summed on the device (kernels/stats.cu) in a fixed order.
static void gpu_route_dual(Backend *be, DualAccum *dual) {
    GpuModel *gm = gpu_model(be);
    size_t E = gm->cfg.n_routed, nc = (size_t)gm->n_moe * E;
    const int64_t *counts = gm->h_stats, *dc = gm->h_stats + nc;
    const double *primal = (const double *)(gm->h_stats + 4 * nc + 2);
    for (int m = 0; m < gm->n_moe; m++) {
        dual[m].primal += primal[m];
        dual[m].n_tokens += gm->read_tokens;
        for (size_t e = 0; e < E; e++) {
            dual[m].counts[e] += counts[m * E + e];
            dual[m].counts0[e] += dc[(m * 3 + 0) * E + e];
            dual[m].lost[e] += dc[(m * 3 + 1) * E + e];
            dual[m].gained[e] += dc[(m * 3 + 2) * E + e];
        }
    }
}

// On traced steps the routing kernels also write the scores the bias is
// added to (the logits are gone after the routing, the affinities after the
// next forward); the buffer is made on the first traced step (and counted
// by --print-memory when the run traces).
static void gpu_keep_scores(Backend *be, int keep) {
    GpuModel *gm = gpu_model(be);
    if (keep && !gm->kept && gm->n_moe > 0) {
        gm->category = MEM_ACTIVATIONS;
        gm->kept = DEV(float, (size_t)gm->n_moe * gm->maxB * gm->maxT * gm->cfg.n_routed); // (n_moe, N, E)
    }
    gm->keep_scores = keep;
}

static void gpu_route_scores(Backend *be, int moe_idx, float *scores) {
    GpuModel *gm = gpu_model(be);
    size_t E = gm->cfg.n_routed, n = (size_t)gm->B * gm->T * E;
    ASSERT(gm->kept, "route_scores without keep_scores");
    gpu_copy(gm, scores, gm->kept + (size_t)moe_idx * gm->maxB * gm->maxT * E, sizeof(float) * n,
             cudaMemcpyDeviceToHost);
}

// As train_moe.c's cpu_sync_grads: each rank's loss is the mean over its own
// tokens, so the run's gradient is the mean over ranks. The replicated
// tensors (one contiguous run of the local buffer) are summed over all ranks,
// the local expert slices (the rest) over the EDP group (the EP exchange
// already brought the group's tokens to each expert), then everything is
// divided by the number of ranks. NCCL gives every rank the same sums, so
// the replicated weights stay identical bit for bit.
static void gpu_sync_grads(Backend *be) {
    GpuModel *gm = gpu_model(be);
    if (!gm->has_comm) return; // one process holds every parameter: nothing to average
    const GpuComm *dc = &gm->ranks;
    PHASE(PH_COMM);
    dc->allreduce_f32(dc->ctx, COMM_WORLD, gm->grads, (size_t)gm->n_replicated, gm->stream);
    dc->allreduce_f32(dc->ctx, COMM_EDP, gm->grads + gm->n_replicated, (size_t)(gm->n_local - gm->n_replicated), gm->stream);
    scale_f32(gm->grads, gm->n_local, 1.0f / (float)dc->world, gm->stream);
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
    GpuModel *gm = gpu_model(be);
    cudaStream_t st = gm->stream;
    PHASE(PH_OPTIMIZER);
    gradnorm_sumsq(gm->gn_out, gm->gn_partials, gm->grads, gm->n_replicated, st);
    CUDA_CHECK(cudaMemsetAsync(gm->gn_out + 1, 0, sizeof(double) * gm->shard.size, st));
    gradnorm_sumsq(gm->gn_out + 1 + gm->ranks.ep_rank, gm->gn_partials, gm->grads + gm->n_replicated, gm->n_local - gm->n_replicated, st);
    if (gm->has_comm) gm->ranks.allreduce_f64(gm->ranks.ctx, COMM_EP, gm->gn_out + 1, (size_t)gm->shard.size, st);
    CUDA_CHECK(cudaMemcpyAsync(gm->h_gn, gm->gn_out, sizeof(double) * (gm->shard.size + 1), cudaMemcpyDeviceToHost, st));
    PHASE(PH_HOST); // the host computes the clipping factor
    CUDA_CHECK(cudaStreamSynchronize(st));
    double experts = 0;
    for (int p = 0; p < gm->shard.size; p++) experts += gm->h_gn[1 + p];
    return (float)sqrt(gm->h_gn[0] + experts);
}

static void gpu_update(Backend *be, const AdamWConfig *opt, double lr, int64_t t, float grad_mult) {
    GpuModel *gm = gpu_model(be);
    AdamWScalars scal = adamw_scalars(opt, lr, t); // the step's bias corrections and rates
    PHASE(PH_OPTIMIZER);
#ifdef ENABLE_FP32
    floatX *px = NULL; // the matmuls read the master weights directly
#else
    floatX *px = gm->paramsX;
#endif
    for (int i = 0; i < gm->decay.n; i++) {
        const DecayRange *r = &gm->decay.r[i];
        adamw_update(gm->params, px, gm->grads, gm->adam_m, gm->adam_v, r->offset, r->len, r->decay, scal, grad_mult,
                     gm->stream);
    }
    // No wait: the next step's kernels follow on this stream, and the host
    // reads parameters or moments only through synchronising copies (gpu_copy).
}

static void gpu_last_logits(Backend *be, const int *tokens, int n, float *logits) {
    GpuModel *gm = gpu_model(be);
    int V = gm->cfg.vocab_size;
    gpu_stage_inputs(gm, tokens, NULL, 1, n, 0);
    gpu_forward(gm, 1, n, 0, 0, 0.0f);
    convert_x_to_f32(gm->row_f32, gm->logits + (size_t)(n - 1) * V, V, gm->stream);
    CUDA_CHECK(cudaMemcpyAsync(gm->h_row, gm->row_f32, sizeof(float) * V, cudaMemcpyDeviceToHost, gm->stream));
    CUDA_CHECK(cudaStreamSynchronize(gm->stream));
    memcpy(logits, gm->h_row, sizeof(float) * V);
}

// --print-memory (train/memplan.h): the creation phases of gpu_backend_create
// in a dry run, which count every allocation and make none, for rank 0 of an
// EP group of ep ranks; and the device, when there is one.
static int gpu_plan_memory(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T, int ep,
                           MemoryPlan *plan) {
    memset(plan, 0, sizeof *plan);
    int ndev = 0;
    cudaDeviceProp prop;
    if (cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0 && cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
        plan->device_bytes = prop.totalGlobalMem;
        snprintf(plan->device, sizeof plan->device, "%s", prop.name);
    }
    (void)cudaGetLastError(); // no device (or no driver) is an answer here, not an error
    GpuComm ranks;
    memset(&ranks, 0, sizeof ranks); // sizes only: a dry run calls no collective
    ranks.world = ranks.ep = ep;
    ranks.edp = 1;
    GpuBackendOptions opt = { &ranks, 0, gpu_grouped_cublas(be), 1 };
    GpuModel *gm = (GpuModel *)xcalloc(1, sizeof(GpuModel));
    Backend dry = *be;
    dry.ctx = gm;
    gm->dry = 1;
    gm->cfg = *c;
    gm->ro = *ro;
    gm->maxB = B;
    gm->maxT = T;
    gm->n_moe = config_n_moe(c);
    int rc = gpu_check_ranks(gm, &opt);
    if (rc == 0) {
        layout_build(&gm->lay, c);
        gm->n_replicated = ep_local_layout(&gm->lay, &gm->shard, &gm->local_lay, &gm->local_to_whole);
        gm->n_local = gm->local_lay.total;
        gpu_alloc_params(gm);
        gpu_alloc_activations(gm);
        gpu_alloc_scratch(gm);
        gpu_upload_constants(gm);
        if (be->opts && be->opts->trace_router[0]) gpu_keep_scores(&dry, 1); // the traced scores' buffer
        memcpy(plan->bytes, gm->bytes, sizeof plan->bytes);
    }
    gpu_destroy(&dry);
    return rc;
}

// --profile (train/profile.h): device time per phase between start and stop.
static void gpu_profile_start(Backend *be) {
    GpuModel *gm = gpu_model(be);
    profiler_start(&gm->prof);
    PHASE(PH_HOST); // the first interval: until the step's first work
}

static void gpu_profile_stop(Backend *be, double *ms, char *device, size_t len) {
    GpuModel *gm = gpu_model(be);
    PHASE(PH_HOST); // closes the last interval
    profiler_stop(&gm->prof, ms);
    snprintf(device, len, "%s", gm->device_name);
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
    be->step_stats = gpu_step_stats;
    be->sync_grads = gpu_sync_grads;
    be->grad_norm = gpu_grad_norm;
    be->update = gpu_update;
    be->last_logits = gpu_last_logits;
    be->route_dual = gpu_route_dual;
    be->keep_scores = gpu_keep_scores;
    be->route_scores = gpu_route_scores;
    be->profile_start = gpu_profile_start;
    be->profile_stop = gpu_profile_stop;
    be->plan_memory = gpu_plan_memory;
}

// ----------------------------------------------------------------------------
// Read-back hooks for the tests (kernels/gpu_backend.cuh)

void gpu_debug_get_grads(Backend *be, float *grads) {
    GpuModel *gm = gpu_model(be);
    memset(grads, 0, sizeof(float) * (size_t)be->n_params);
    for (int i = 0; i < gm->local_lay.n; i++) {
        const ParamTensor *t = &gm->local_lay.t[i];
        gpu_copy(gm, grads + gpu_whole_offset(gm, i), gm->grads + t->offset, sizeof(float) * t->numel,
                 cudaMemcpyDeviceToHost);
    }
}

void gpu_debug_capture_hook(Backend *be, void (*hook)(void *), void *ctx) {
    gpu_model(be)->capture_hook = hook;
    gpu_model(be)->capture_ctx = ctx;
}

void gpu_debug_memory(Backend *be, size_t *bytes) { memcpy(bytes, gpu_model(be)->bytes, sizeof gpu_model(be)->bytes); }

int gpu_debug_expert_rows(Backend *be, int moe_idx) {
    return gpu_model(be)->layer[gpu_model(be)->cfg.n_dense + moe_idx].R;
}

void gpu_debug_get_logits(Backend *be, float *logits) {
    GpuModel *gm = gpu_model(be);
    size_t n = (size_t)gm->B * gm->T * gm->cfg.vocab_size;
    float *tmp;
    CUDA_CHECK(cudaMalloc(&tmp, sizeof(float) * n));
    convert_x_to_f32(tmp, gm->logits, (int64_t)n, gm->stream);
    gpu_copy(gm, logits, tmp, sizeof(float) * n, cudaMemcpyDeviceToHost);
    CUDA_CHECK(cudaFree(tmp));
}

void gpu_debug_get_routing(Backend *be, int moe_idx, int *sel, float *gates) {
    GpuModel *gm = gpu_model(be);
    const GpuLayer *la = &gm->layer[gm->cfg.n_dense + moe_idx];
    size_t nk = (size_t)gm->B * gm->T * gm->cfg.top_k;
    gpu_copy(gm, sel, la->sel, sizeof(int) * nk, cudaMemcpyDeviceToHost);
    gpu_copy(gm, gates, la->gates, sizeof(float) * nk, cudaMemcpyDeviceToHost);
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
