// train_moe: the CPU trainer (fp32, OpenMP). This file is the CPU backend of
// the shared training loop (train/trainer.c): it owns the model's parameters,
// gradients and AdamW moments, and runs the reference model of model/.
//
//   ./train_moe --config small --train-data 'data/kjv/train_*.bin' ...
//   ./train_moe --help
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "train/backend.h"
#include "train/optim.h"
#include "train/trainer.h"

typedef struct {
    Model model;
    float *adam_m, *adam_v; // (n_params) AdamW moments
    DecayRanges decay;      // which parameters get weight decay
    int64_t *scratch_counts;
} CpuState;

static CpuState *cpu(Backend *be) { return (CpuState *)be->ctx; }

static int cpu_create(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T) {
    CpuState *s = calloc(1, sizeof *s);
    if (!s || model_create(&s->model, c, B, T) != 0) {
        free(s);
        return -1;
    }
    s->model.route = *ro;
    int64_t n = s->model.lay.total;
    s->adam_m = calloc((size_t)n, sizeof(float));
    s->adam_v = calloc((size_t)n, sizeof(float));
    if (!s->adam_m || !s->adam_v || decay_ranges_from_layout(&s->decay, &s->model.lay) != 0) {
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
    decay_ranges_free(&s->decay);
    free(s);
    be->ctx = NULL;
}

static void cpu_set_params(Backend *be, const float *p) { model_set_params(&cpu(be)->model, p); }
static void cpu_get_params(Backend *be, float *p) { model_get_params(&cpu(be)->model, p); }

static void cpu_set_opt_state(Backend *be, const float *m, const float *v) {
    size_t n = (size_t)be->n_params * sizeof(float);
    memcpy(cpu(be)->adam_m, m, n);
    memcpy(cpu(be)->adam_v, v, n);
}

static void cpu_get_opt_state(Backend *be, float *m, float *v) {
    size_t n = (size_t)be->n_params * sizeof(float);
    memcpy(m, cpu(be)->adam_m, n);
    memcpy(v, cpu(be)->adam_v, n);
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

static float cpu_grad_norm(Backend *be) { return grad_norm(cpu(be)->model.grads, be->n_params); }

static void cpu_update(Backend *be, const AdamWConfig *opt, double lr, int64_t t, float grad_mult) {
    CpuState *s = cpu(be);
    grad_scale(s->model.grads, be->n_params, grad_mult);
    adamw_step(s->model.params, s->model.grads, s->adam_m, s->adam_v, be->n_params, &s->decay, opt, lr, t);
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
        .grad_norm = cpu_grad_norm,
        .update = cpu_update,
        .last_logits = cpu_last_logits,
    };
    return trainer_main(argc, argv, "train_moe", &be);
}
