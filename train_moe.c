// train_moe: the CPU trainer (fp32, OpenMP, MPI for several processes). This
// file is the CPU backend of the shared training loop (train/trainer.c): it
// owns the model's parameters, gradients and AdamW moments, runs the reference
// model of model/, and spreads work over ranks: data parallelism for every
// parameter, expert parallelism (--ep) for the routed experts.
//
//   ./train_moe --config small --train-data 'data/kjv/train_*.bin' ...
//   mpirun -np 4 ./train_moe --ep 2 ...
//   ./train_moe --help
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/comm.h"
#include "model/model.h"
#include "train/backend.h"
#include "train/optim.h"
#include "train/trainer.h"
#include "util/util.h"

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
    MoeExchange exchange;   // the EP group, for the MoE layers
} CpuState;

static CpuState *cpu(Backend *be) { return (CpuState *)be->ctx; }

// ----------------------------------------------------------------------------
// Expert parallelism: the model's exchange hooks, over the EP group.

static void cpu_alltoall_int(void *ctx, const int *send, int *recv, int n) {
    comm_alltoall_int((const Comm *)ctx, COMM_EP, send, recv, n);
}

static void cpu_alltoallv(void *ctx, const float *send, const int *send_rows, float *recv, const int *recv_rows,
                          int width) {
    comm_alltoallv_rows((const Comm *)ctx, COMM_EP, send, send_rows, recv, recv_rows, width);
}

// The owned slices: every tensor, except that expert tensors keep only the
// local experts' rows [ep_rank E/ep, (ep_rank+1) E/ep).
static int cpu_build_slices(CpuState *s, const Comm *comm) {
    const ParamLayout *lay = &s->model.lay;
    s->slices = calloc((size_t)lay->n, sizeof(Slice));
    if (!s->slices) return -1;
    int El = s->model.cfg.n_routed / comm->ep;
    for (int i = 0; i < lay->n; i++) {
        const ParamTensor *t = &lay->t[i];
        Slice *sl = &s->slices[s->n_slices++];
        sl->offset = t->offset;
        sl->len = t->numel;
        sl->decay = t->is_matrix;
        sl->expert = t->kind == P_EXPERTS_W13 || t->kind == P_EXPERTS_W2;
        if (sl->expert) {
            int64_t per_expert = t->numel / t->shape[0];
            sl->offset += (int64_t)comm->ep_rank * El * per_expert;
            sl->len = (int64_t)El * per_expert;
        }
    }
    return 0;
}

// ----------------------------------------------------------------------------
// The backend

static int cpu_create(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T) {
    CpuState *s = xcalloc(1, sizeof *s);
    model_create(&s->model, c, B, T);
    s->model.route = *ro;
    if (be->comm->ep > 1) {
        s->exchange = (MoeExchange){ .size = be->comm->ep, .rank = be->comm->ep_rank, .ctx = (void *)be->comm,
                                     .alltoall_int = cpu_alltoall_int, .alltoallv = cpu_alltoallv };
        s->model.ep = &s->exchange;
    }
    int64_t n = s->model.lay.total;
    s->adam_m = calloc((size_t)n, sizeof(float));
    s->adam_v = calloc((size_t)n, sizeof(float));
    if (!s->adam_m || !s->adam_v || cpu_build_slices(s, be->comm) != 0) {
        fprintf(stderr, "error: out of memory allocating the optimizer state (%lld parameters)\n", (long long)n);
        return -1;
    }
    be->ctx = s;
    be->n_params = n;
    return 0;
}

static void cpu_destroy(Backend *be) {
    CpuState *s = cpu(be);
    if (!s) return;
    model_free(&s->model);
    free(s->adam_m);
    free(s->adam_v);
    free(s->slices);
    free(s);
    be->ctx = NULL;
}

// dst = src with every expert row this rank does not own gathered from the
// rank that does: zero them, then sum over the EP group (x + 0 is exact).
static void cpu_gather(Backend *be, const float *src, float *dst) {
    memcpy(dst, src, sizeof(float) * (size_t)be->n_params);
    const Comm *comm = be->comm;
    if (comm->ep == 1) return;
    CpuState *s = cpu(be);
    for (int i = 0; i < s->model.lay.n; i++) {
        const ParamTensor *t = &s->model.lay.t[i];
        if (!s->slices[i].expert) continue;
        float *p = dst + t->offset;
        int64_t own0 = s->slices[i].offset - t->offset, own1 = own0 + s->slices[i].len;
        memset(p, 0, sizeof(float) * own0);
        memset(p + own1, 0, sizeof(float) * (t->numel - own1));
        comm_allreduce_f32(comm, COMM_EP, p, (size_t)t->numel);
    }
}

static void cpu_set_params(Backend *be, const float *p) { model_set_params(&cpu(be)->model, p); }
static void cpu_get_params(Backend *be, float *p) { cpu_gather(be, cpu(be)->model.params, p); }

static void cpu_set_opt_state(Backend *be, const float *m, const float *v) {
    size_t n = (size_t)be->n_params * sizeof(float);
    memcpy(cpu(be)->adam_m, m, n);
    memcpy(cpu(be)->adam_v, v, n);
}

static void cpu_get_opt_state(Backend *be, float *m, float *v) {
    cpu_gather(be, cpu(be)->adam_m, m);
    cpu_gather(be, cpu(be)->adam_v, v);
}

static void cpu_set_bias(Backend *be, const float *bias) {
    Model *m = &cpu(be)->model;
    memcpy(m->bias, bias, sizeof(float) * (size_t)config_n_moe(&m->cfg) * m->cfg.n_routed);
}

static void cpu_zero_grad(Backend *be) { model_zero_grad(&cpu(be)->model); }

static void cpu_micro_batch(Backend *be, const int *tokens, const int *targets, int B, int T, int train,
                            float grad_scale, int64_t *counts, double *loss, double *aux) {
    Model *m = &cpu(be)->model;
    model_forward(m, tokens, targets, B, T);
    if (train) model_backward(m, grad_scale);
    memcpy(counts, m->counts, sizeof(int64_t) * (size_t)config_n_moe(&m->cfg) * m->cfg.n_routed);
    *loss = m->loss;
    *aux = m->aux_loss;
}

// Each rank's loss is the mean over its own tokens, so the run's gradient is
// the mean over ranks: sum replicated tensors over all ranks and expert slices
// over their EDP group (the EP group already summed the tokens of its ranks
// into each expert), then divide by the number of ranks.
static void cpu_sync_grads(Backend *be) {
    const Comm *comm = be->comm;
    if (comm->world == 1) return;
    CpuState *s = cpu(be);
    float inv = 1.0f / (float)comm->world;
    for (int i = 0; i < s->n_slices; i++) {
        float *g = s->model.grads + s->slices[i].offset;
        size_t n = (size_t)s->slices[i].len;
        comm_allreduce_f32(comm, s->slices[i].expert ? COMM_EDP : COMM_WORLD, g, n);
        for (size_t j = 0; j < n; j++) g[j] *= inv;
    }
}

static float cpu_grad_norm(Backend *be) {
    CpuState *s = cpu(be);
    // sum[0]: replicated tensors (equal on every rank); sum[1]: this rank's
    // experts, summed over the EP group so that each expert counts once.
    double sum[2] = { 0, 0 };
    for (int i = 0; i < s->n_slices; i++)
        sum[s->slices[i].expert] += grad_sumsq(s->model.grads + s->slices[i].offset, s->slices[i].len);
    comm_allreduce_f64(be->comm, COMM_EP, &sum[1], 1);
    // Every rank must clip by the same factor or the replicas drift apart; an
    // all-reduce may round differently in different EP groups, so rank 0's
    // norm is the one everybody uses.
    double norm = sqrt(sum[0] + sum[1]);
    comm_bcast(be->comm, &norm, sizeof norm, 0);
    return (float)norm;
}

static void cpu_update(Backend *be, const AdamWConfig *opt, double lr, int64_t t, float grad_mult) {
    CpuState *s = cpu(be);
    AdamWConfig no_decay = *opt;
    no_decay.weight_decay = 0;
    for (int i = 0; i < s->n_slices; i++) {
        const Slice *sl = &s->slices[i];
        grad_scale(s->model.grads + sl->offset, sl->len, grad_mult);
        adamw_step(s->model.params + sl->offset, s->model.grads + sl->offset, s->adam_m + sl->offset,
                   s->adam_v + sl->offset, sl->len, NULL, sl->decay ? opt : &no_decay, lr, t);
    }
}

static void cpu_last_logits(Backend *be, const int *tokens, int n, float *logits) {
    Model *m = &cpu(be)->model;
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
        .sync_grads = cpu_sync_grads,
        .grad_norm = cpu_grad_norm,
        .update = cpu_update,
        .last_logits = cpu_last_logits,
    };
    return trainer_main(argc, argv, "train_moe", &be);
}
