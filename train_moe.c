// train_moe: the CPU trainer (fp32, OpenMP, MPI for several processes). The
// readable definition of the model and of a training step.
//
//   ./train_moe --config small --train-data 'data/kjv/train_*.bin' ...
//   mpirun -np 4 ./train_moe --ep 2 ...
//   ./train_moe --help
//
// Reading path: one training step, in the order it runs.
//   train/trainer.c  trainer_main -> trainer_run -> trainer_step: the loop both trainers share:
//                    a batch from data/loader.c, gradient accumulation over micro-batches,
//                    clipping and AdamW (train/optim.c) at the LR of train/lr.c, then the
//                    balancing update of the biases from the step's exact counts
//                    (model/balance.c); logs, evaluation, checkpoints (train/ckpt.c), sampling
//   this file        the CPU backend the loop calls through train/backend.h: cpu_micro_batch,
//                    cpu_sync_grads, cpu_grad_norm, cpu_update, ...
//   model/model.c    model_forward / model_backward: embedding, then per layer attention and a
//                    dense or MoE FFN, the final norm, the LM head and the loss
//   model/ops.c      embedding, RMSNorm, RoPE, causal attention, SwiGLU, cross-entropy
//   model/matmul.c   the matmuls (blocked, OpenMP)
//   model/moe.c      the MoE layer: router and TopK with the bias (model/route.h), permutation
//                    into expert order, expert_ffn_forward per expert, shared experts, gated
//                    combine, auxiliary losses, and their backward
//   parallel/        the ranks: comm.c (MPI groups), ep_layout.c (which experts, parameters and
//                    rows a rank of an expert-parallel group holds)
// The GPU trainer (train_moe.cu) is the same loop with a CUDA backend.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "model/model.h"         // defines: Model, model_create, model_forward, model_backward
#include "model/phase.h"         // defines: phase_mark, the host clock per phase for --profile
#include "parallel/comm.h"       // defines: Comm, the MPI collectives over the WORLD / EP / EDP groups
#include "parallel/ep_layout.h"  // defines: EpShard, ep_owned_range (a rank's expert slice)
#include "train/backend.h"       // defines: Backend, the interface the training loop calls
#include "train/optim.h"         // defines: AdamWConfig, adamw_step, grad_sumsq, grad_scale
#include "train/trainer.h"       // defines: trainer_main, the shared training loop
#include "util/util.h"           // defines: xcalloc

// A contiguous run of the parameter buffer that this rank owns and updates:
// a whole tensor, or the slice of an expert tensor holding the local experts.
typedef struct {
    int64_t offset, len;
    int decay;   // weight decay applies (matrices)
    int expert;  // 1: routed-expert weights, shared by the EDP group only
} Slice;

typedef struct {
    Model model;
    float *adam_m, *adam_v; // (n_params) AdamW moments
    Slice *slices;          // (n_slices) what this rank owns, in buffer order
    int n_slices;
    EpShard shard;          // this rank's place in its EP group
    MoeExchange exchange;   // the EP group, for the MoE layers
    // the statistics of the micro-batches since the last step_stats
    int64_t *counts;        // (n_moe, E) tokens per expert
    double loss, aux;       // sums of the mean losses and auxiliary losses, each / loss_div
    DualAccum *dual;        // (n_moe) their primal-dual sums (model/dual.h)
    DualAccum *dual_read;   // (n_moe) those the last step_stats read, for route_dual
} CpuState;

static CpuState *cpu_state(Backend *be) { return (CpuState *)be->ctx; }

// ----------------------------------------------------------------------------
// Expert parallelism: the model's exchange hooks, over the EP group.

static void cpu_alltoall_int(void *ctx, const int *send, int *recv, int n) {
    comm_alltoall_int((const Comm *)ctx, COMM_EP, send, recv, n);
}

static void cpu_alltoallv(void *ctx, const float *send, const int *send_rows, float *recv, const int *recv_rows,
                          int width) {
    comm_alltoallv_rows((const Comm *)ctx, COMM_EP, send, send_rows, recv, recv_rows, width);
}

// The owned slices: every tensor, and of expert tensors the local experts' rows.
static void cpu_build_slices(CpuState *cs) {
    const ParamLayout *lay = &cs->model.lay;
    cs->slices = xcalloc((size_t)lay->n, sizeof(Slice));
    for (int i = 0; i < lay->n; i++) {
        const ParamTensor *t = &lay->t[i];
        Slice *sl = &cs->slices[cs->n_slices++];
        ep_owned_range(t, &cs->shard, &sl->offset, &sl->len);
        sl->decay = t->is_matrix;
        sl->expert = layout_is_expert(t->kind);
    }
}

// ----------------------------------------------------------------------------
// The backend

static int cpu_create(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T) {
    CpuState *cs = xcalloc(1, sizeof *cs);
    model_create(&cs->model, c, B, T);
    cs->model.route = *ro;
    cs->shard = ep_shard(c->n_routed, be->comm->ep, be->comm->ep_rank);
    if (be->comm->ep > 1) {
        cs->exchange = (MoeExchange){ .shard = cs->shard, .ctx = (void *)be->comm,
                                      .alltoall_int = cpu_alltoall_int, .alltoallv = cpu_alltoallv };
        cs->model.ep = &cs->exchange;
    }
    int64_t n = cs->model.lay.total;
    cs->adam_m = xcalloc((size_t)n, sizeof(float));
    cs->adam_v = xcalloc((size_t)n, sizeof(float));
    cs->counts = xcalloc((size_t)config_n_moe(c) * c->n_routed + 1, sizeof(int64_t));
    cs->dual = xcalloc((size_t)config_n_moe(c) + 1, sizeof(DualAccum));
    cs->dual_read = xcalloc((size_t)config_n_moe(c) + 1, sizeof(DualAccum));
    for (int l = 0; l < config_n_moe(c); l++)
        if (dual_accum_init(&cs->dual[l], c->n_routed, c->top_k, ro->bias_mult) != 0 ||
            dual_accum_init(&cs->dual_read[l], c->n_routed, c->top_k, ro->bias_mult) != 0)
            FATAL("the primal-dual sums cannot take E = %d, top_k = %d", c->n_routed, c->top_k);
    cpu_build_slices(cs);
    be->ctx = cs;
    be->n_params = n;
    return 0;
}

static void cpu_destroy(Backend *be) {
    CpuState *cs = cpu_state(be);
    if (!cs) return;
    model_free(&cs->model);
    free(cs->adam_m);
    free(cs->adam_v);
    free(cs->slices);
    free(cs->counts);
    for (int l = 0; l < config_n_moe(&cs->model.cfg); l++) {
        dual_accum_free(&cs->dual[l]);
        dual_accum_free(&cs->dual_read[l]);
    }
    free(cs->dual);
    free(cs->dual_read);
    free(cs);
    be->ctx = NULL;
}

// dst = src with every expert row this rank does not own gathered from the
// rank that does: zero them, then sum over the EP group (x + 0 is exact).
static void cpu_gather(Backend *be, const float *src, float *dst) {
    memcpy(dst, src, sizeof(float) * (size_t)be->n_params);
    const Comm *comm = be->comm;
    if (comm->ep == 1) return;
    CpuState *cs = cpu_state(be);
    for (int i = 0; i < cs->model.lay.n; i++) {
        const ParamTensor *t = &cs->model.lay.t[i];
        if (!cs->slices[i].expert) continue;
        float *p = dst + t->offset;
        int64_t own0 = cs->slices[i].offset - t->offset, own1 = own0 + cs->slices[i].len;
        memset(p, 0, sizeof(float) * own0);
        memset(p + own1, 0, sizeof(float) * (t->numel - own1));
        comm_allreduce_f32(comm, COMM_EP, p, (size_t)t->numel);
    }
}

static void cpu_set_params(Backend *be, const float *p) { model_set_params(&cpu_state(be)->model, p); }
static void cpu_get_params(Backend *be, float *p) { cpu_gather(be, cpu_state(be)->model.params, p); }

static void cpu_set_opt_state(Backend *be, const float *m, const float *v) {
    size_t n = (size_t)be->n_params * sizeof(float);
    memcpy(cpu_state(be)->adam_m, m, n);
    memcpy(cpu_state(be)->adam_v, v, n);
}

static void cpu_get_opt_state(Backend *be, float *m, float *v) {
    cpu_gather(be, cpu_state(be)->adam_m, m);
    cpu_gather(be, cpu_state(be)->adam_v, v);
}

static void cpu_set_bias(Backend *be, const float *bias) {
    Model *m = &cpu_state(be)->model;
    phase_mark(PH_OPTIMIZER);
    memcpy(m->bias, bias, sizeof(float) * (size_t)config_n_moe(&m->cfg) * m->cfg.n_routed);
    phase_mark(PH_HOST);
}

static void cpu_zero_grad(Backend *be) {
    phase_mark(PH_OPTIMIZER);
    model_zero_grad(&cpu_state(be)->model);
    phase_mark(PH_HOST);
}

static void cpu_micro_batch(Backend *be, const int *tokens, const int *targets, int B, int T, int train,
                            float grad_scale, double loss_div) {
    CpuState *cs = cpu_state(be);
    Model *m = &cs->model;
    model_forward(m, tokens, targets, B, T);
    if (train) model_backward(m, grad_scale);
    size_t nc = (size_t)config_n_moe(&m->cfg) * m->cfg.n_routed;
    for (size_t i = 0; i < nc; i++) cs->counts[i] += m->counts[i];
    for (int l = 0; l < config_n_moe(&m->cfg); l++) dual_accum_add(&cs->dual[l], &m->dual[l]);
    cs->loss += m->loss / loss_div;
    cs->aux += m->aux_loss / loss_div;
    phase_mark(PH_HOST); // the model marked its phases (model/phase.h)
}

static void cpu_step_stats(Backend *be, int64_t *counts, double *loss, double *aux) {
    CpuState *cs = cpu_state(be);
    size_t nc = (size_t)config_n_moe(&cs->model.cfg) * cs->model.cfg.n_routed;
    memcpy(counts, cs->counts, sizeof(int64_t) * nc);
    *loss = cs->loss;
    *aux = cs->aux;
    memset(cs->counts, 0, sizeof(int64_t) * nc);
    cs->loss = cs->aux = 0;
    for (int l = 0; l < config_n_moe(&cs->model.cfg); l++) { // the sums read become route_dual's
        DualAccum t = cs->dual_read[l];
        cs->dual_read[l] = cs->dual[l];
        cs->dual[l] = t;
        dual_accum_reset(&cs->dual[l]);
    }
}

// Each rank's loss is the mean over its own tokens, so the run's gradient is
// the mean over ranks: sum replicated tensors over all ranks and expert slices
// over their EDP group (the EP group already summed the tokens of its ranks
// into each expert), then divide by the number of ranks.
static void cpu_sync_grads(Backend *be) {
    const Comm *comm = be->comm;
    if (comm->world == 1) return;
    CpuState *cs = cpu_state(be);
    float inv = 1.0f / (float)comm->world;
    phase_mark(PH_COMM);
    for (int i = 0; i < cs->n_slices; i++) {
        float *grad = cs->model.grads + cs->slices[i].offset;
        size_t n = (size_t)cs->slices[i].len;
        comm_allreduce_f32(comm, cs->slices[i].expert ? COMM_EDP : COMM_WORLD, grad, n);
        for (size_t j = 0; j < n; j++) grad[j] *= inv;
    }
    phase_mark(PH_HOST);
}

static float cpu_grad_norm(Backend *be) {
    CpuState *cs = cpu_state(be);
    // sum[0]: replicated tensors (equal on every rank); sum[1]: this rank's
    // experts, summed over the EP group so that each expert counts once.
    double sum[2] = { 0, 0 };
    phase_mark(PH_OPTIMIZER);
    for (int i = 0; i < cs->n_slices; i++)
        sum[cs->slices[i].expert] += grad_sumsq(cs->model.grads + cs->slices[i].offset, cs->slices[i].len);
    phase_mark(PH_COMM);
    comm_allreduce_f64(be->comm, COMM_EP, &sum[1], 1);
    // Every rank must clip by the same factor or the replicas drift apart; an
    // all-reduce may round differently in different EP groups, so rank 0's
    // norm is the one everybody uses.
    double norm = sqrt(sum[0] + sum[1]);
    comm_bcast(be->comm, &norm, sizeof norm, 0);
    phase_mark(PH_HOST);
    return (float)norm;
}

static void cpu_update(Backend *be, const AdamWConfig *opt, double lr, int64_t t, float grad_mult) {
    CpuState *cs = cpu_state(be);
    AdamWConfig no_decay = *opt;
    no_decay.weight_decay = 0;
    phase_mark(PH_OPTIMIZER);
    for (int i = 0; i < cs->n_slices; i++) {
        const Slice *sl = &cs->slices[i];
        grad_scale(cs->model.grads + sl->offset, sl->len, grad_mult);
        adamw_step(cs->model.params + sl->offset, cs->model.grads + sl->offset, cs->adam_m + sl->offset,
                   cs->adam_v + sl->offset, sl->len, NULL, sl->decay ? opt : &no_decay, lr, t);
    }
    phase_mark(PH_HOST);
}

// --profile: the host clock per phase (model/phase.h), from the marks above
// and the model's own.
static void cpu_profile_start(Backend *be) {
    (void)be;
    phase_timer_start();
}

static void cpu_profile_stop(Backend *be, double *ms, char *device, size_t len) {
    (void)be;
    phase_timer_stop(ms);
#ifdef _OPENMP
    snprintf(device, len, "CPU, %d OpenMP threads", omp_get_max_threads());
#else
    snprintf(device, len, "CPU, 1 thread");
#endif
}

// The model computes the primal-dual sums in every forward (model/moe.c's
// moe_select); cpu_micro_batch sums them until step_stats reads them.
static void cpu_route_dual(Backend *be, DualAccum *dual) {
    CpuState *cs = cpu_state(be);
    for (int l = 0; l < config_n_moe(&cs->model.cfg); l++) dual_accum_add(&dual[l], &cs->dual_read[l]);
}

// The activations keep the scores anyway: nothing to arm.
static void cpu_keep_scores(Backend *be, int keep) {
    (void)be;
    (void)keep;
}

static void cpu_route_scores(Backend *be, int moe_idx, float *scores) {
    Model *m = &cpu_state(be)->model;
    const MoeActs *a = &m->layer[m->cfg.n_dense + moe_idx].moe;
    moe_bias_scores(a, &m->route, m->B * m->T, m->cfg.n_routed, scores);
}

static void cpu_last_logits(Backend *be, const int *tokens, int n, float *logits) {
    Model *m = &cpu_state(be)->model;
    model_forward(m, tokens, NULL, 1, n);
    memcpy(logits, m->logits + (size_t)(n - 1) * m->cfg.vocab_size, sizeof(float) * m->cfg.vocab_size);
}

int main(int argc, char **argv) {
    Backend be = {
        .name = "cpu-fp32",
        .create = cpu_create,
        .destroy = cpu_destroy,
        .set_params = cpu_set_params,
        .get_params = cpu_get_params,
        .set_opt_state = cpu_set_opt_state,
        .get_opt_state = cpu_get_opt_state,
        .set_bias = cpu_set_bias,
        .zero_grad = cpu_zero_grad,
        .micro_batch = cpu_micro_batch,
        .step_stats = cpu_step_stats,
        .sync_grads = cpu_sync_grads,
        .grad_norm = cpu_grad_norm,
        .update = cpu_update,
        .last_logits = cpu_last_logits,
        .profile_start = cpu_profile_start,
        .profile_stop = cpu_profile_stop,
        .route_dual = cpu_route_dual,
        .keep_scores = cpu_keep_scores,
        .route_scores = cpu_route_scores,
    };
    return trainer_main(argc, argv, "train_moe", &be);
}
