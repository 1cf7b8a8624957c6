// The C model against the independent PyTorch reference (float64), on the
// fixtures of scripts/reference/moe_reference.py (docs/fixtures.md):
// logits, loss, auxiliary loss, routing (selection and gate values) and every
// parameter gradient, per case; and 10 training steps (AdamW, clipping and the
// ALF-LB sign rule) from ref_train.bin.
//
// Built twice: in fp32 (the trainer's precision) with float32 tolerances, and
// in fp64 (-DMOE_FP64) where the same code must agree to ~1e-10. Errors are
// max |c - ref| / max |ref| per tensor. fp32 tolerances: loss 1e-6 relative;
// logits 1e-5 and gradients 1e-4 of the tensor's largest entry (the reference's
// own float32 re-run drifts by 1e-6 and 1.5e-6, docs/fixtures.md).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/balance.h"
#include "../model/model.h"
#include "../train/optim.h"
#include "fixture.h"

#ifdef MOE_FP64
#define TOL_LOSS 1e-12
#define TOL_FWD 1e-10
#define TOL_GRAD 1e-9
#define TOL_TRAIN 1e-9
#else
#define TOL_LOSS 1e-6
#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4
#define TOL_TRAIN 1e-4
#endif

static int failures;

static void report(const char *what, double err, double tol) {
    int ok = err <= tol;
    printf("  %-30s err %.2e (tol %.0e) %s\n", what, err, tol, ok ? "ok" : "FAIL");
    failures += !ok;
}

// max |a - ref| / max |ref| over n values.
static double rel_err(const real *a, const double *ref, int64_t n) {
    double emax = 0, rmax = 0;
    for (int64_t i = 0; i < n; i++) {
        emax = fmax(emax, fabs((double)a[i] - ref[i]));
        rmax = fmax(rmax, fabs(ref[i]));
    }
    return rmax > 0 ? emax / rmax : emax;
}

// Builds the model of a fixture: config, route options, parameters, bias.
static void load_model(Model *m, const Fixture *f, int B, int T) {
    MoeConfig c;
    char err[512], *text = strdup((const char *)fixture_need(f, "config")->data);
    config_preset(&c, "tiny");
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        char *eq = strchr(line, '=');
        *eq = '\0';
        if (config_set(&c, line, eq + 1) != 0) {
            fprintf(stderr, "%s: bad config line %s\n", f->path, line);
            exit(1);
        }
    }
    free(text);
    if (config_validate(&c, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s\n", f->path, err);
        exit(1);
    }
    model_create(m, &c, B, T);
    m->route = fixture_route_options(f);
    float *p = malloc(sizeof(float) * m->lay.total);
    for (int i = 0; i < m->lay.n; i++) {
        const ParamTensor *t = &m->lay.t[i];
        const FixtureEntry *e = fixture_need(f, t->name);
        if ((int64_t)e->numel != t->numel) {
            fprintf(stderr, "%s: %s has %llu elements, the layout %lld\n", f->path, t->name,
                    (unsigned long long)e->numel, (long long)t->numel);
            exit(1);
        }
        fixture_to_float(e, p + t->offset);
    }
    model_set_params(m, p);
    free(p);
    fixture_to_float(fixture_need(f, "bias"), m->bias);
}

static void check_case(const char *path) {
    char err[512];
    Fixture *f = fixture_load(path, err, sizeof err);
    if (!f) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    const FixtureEntry *tok = fixture_need(f, "tokens");
    int B = (int)tok->dims[0], T = (int)tok->dims[1], N = B * T;
    Model m;
    load_model(&m, f, B, T);
    const MoeConfig *c = &m.cfg;
    printf("%s (B=%d T=%d, %s, norm_topk %d, E=%d K=%d S=%d, dense %d, bias_mult %d, aux %d)\n", path, B, T,
           c->gate == GATE_SIGMOID ? "sigmoid" : "softmax", c->norm_topk, c->n_routed, c->top_k, c->n_shared,
           c->n_dense, m.route.bias_mult, m.route.aux_kind);
    int *tk = malloc(sizeof(int) * N), *tg = malloc(sizeof(int) * N);
    memcpy(tk, tok->data, sizeof(int) * N);
    memcpy(tg, fixture_need(f, "targets")->data, sizeof(int) * N);
    model_forward(&m, tk, NULL, B, T); // logits before they become probabilities
    double *ref = malloc(sizeof(double) * (size_t)N * c->vocab_size + sizeof(double) * m.lay.total);
    fixture_to_double(fixture_need(f, "logits"), ref);
    report("logits", rel_err(m.logits, ref, (int64_t)N * c->vocab_size), TOL_FWD);
    model_forward(&m, tk, tg, B, T);
    double rl = fixture_scalar(fixture_need(f, "loss")), ra = fixture_scalar(fixture_need(f, "aux_loss"));
    report("loss", fabs(m.loss - rl) / fabs(rl), TOL_LOSS);
    report("aux_loss", ra != 0 ? fabs(m.aux_loss - ra) / fabs(ra) : fabs(m.aux_loss), TOL_LOSS * 10);
    // The fixture's designed exact tie (docs/fixtures.md): the tokens whose
    // selection or order only the tie rule (lower index first) decides.
    const int32_t *tie = (const int32_t *)fixture_need(f, "route.tie")->data;
    double *aff = malloc(sizeof(double) * N * c->n_routed);
    for (int l = c->n_dense; l < c->n_layers; l++) {
        char name[64];
        const MoeActs *a = &m.layer[l].moe;
        snprintf(name, sizeof name, "sel.%d", l);
        int same = memcmp(a->sel, fixture_need(f, name)->data, sizeof(int) * N * c->top_k) == 0;
        snprintf(name, sizeof name, "sel_nobias.%d", l);
        int moved = memcmp(a->sel, fixture_need(f, name)->data, sizeof(int) * N * c->top_k) != 0;
        // What the bias is added to: the affinities, or the router logits.
        fixture_route_base_name(&m.route, l, name, sizeof name);
        fixture_to_double(fixture_need(f, name), aff);
        int tie_set = 0, tie_order = 0;
        for (int t = 0; t < N; t++) {
            int kind;
            fixture_route_margin(aff + (size_t)t * c->n_routed, m.bias + (size_t)(l - c->n_dense) * c->n_routed,
                                 c->n_routed, c->top_k, m.route.bias_mult, tie, &kind);
            tie_set += kind == FIX_TIE_SET;
            tie_order += kind == FIX_TIE_ORDER;
        }
        printf("  layer %d selection               %s (bias changed the selection: %s; the tie of experts %d and %d "
               "decides %d selections, %d orders)\n", l, same ? "identical ok" : "DIFFERS FAIL", moved ? "yes" : "no",
               tie[0], tie[1], tie_set, tie_order);
        failures += !same;
        snprintf(name, sizeof name, "gates.%d", l);
        fixture_to_double(fixture_need(f, name), ref);
        snprintf(name, sizeof name, "layer %d gates", l);
        report(name, rel_err(a->gates, ref, (int64_t)N * c->top_k), TOL_FWD);
    }
    free(aff);
    model_zero_grad(&m);
    model_backward(&m, 1);
    for (int i = 0; i < m.lay.n; i++) {
        const ParamTensor *t = &m.lay.t[i];
        char name[96];
        snprintf(name, sizeof name, "grad.%s", t->name);
        fixture_to_double(fixture_need(f, name), ref);
        report(name + 5, rel_err(m.grads + t->offset, ref, t->numel), TOL_GRAD);
    }
    free(ref);
    free(tk);
    free(tg);
    model_free(&m);
    fixture_free(f);
}

#ifndef MOE_FP64
// 10 steps: forward/backward, clip, AdamW, sign-rule bias update. fp32 only:
// the optimizer works on the trainer's fp32 buffers.
static void check_training(const char *path) {
    char err[512];
    Fixture *f = fixture_load(path, err, sizeof err);
    if (!f) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    const FixtureEntry *toks = fixture_need(f, "train.tokens");
    int S = (int)toks->dims[0], B = (int)toks->dims[1], T = (int)toks->dims[2], N = B * T;
    Model m;
    load_model(&m, f, B, T);
    const MoeConfig *c = &m.cfg;
    int nmoe = config_n_moe(c), E = c->n_routed;
    AdamWConfig opt;
    adamw_config_default(&opt);
    opt.beta1 = fixture_scalar(fixture_need(f, "train.beta1"));
    opt.beta2 = fixture_scalar(fixture_need(f, "train.beta2"));
    opt.eps = fixture_scalar(fixture_need(f, "train.eps"));
    opt.weight_decay = fixture_scalar(fixture_need(f, "train.weight_decay"));
    double lr = fixture_scalar(fixture_need(f, "train.lr")), clip = fixture_scalar(fixture_need(f, "train.clip"));
    BalanceConfig bc;
    balance_config_default(&bc); // alf, sign rule, constant schedule
    char gam[64];
    snprintf(gam, sizeof gam, "%.17g", fixture_scalar(fixture_need(f, "train.gamma")));
    balance_set_option(&bc, "gamma", gam, err, sizeof err);
    DecayRanges dr;
    decay_ranges_from_layout(&dr, &m.lay);
    int64_t n = m.lay.total;
    float *mom = calloc(n, sizeof(float)), *vel = calloc(n, sizeof(float));
    double *losses = malloc(sizeof(double) * S), *norms = malloc(sizeof(double) * S);
    fixture_to_double(fixture_need(f, "train.losses"), losses);
    fixture_to_double(fixture_need(f, "train.grad_norms"), norms);
    const int32_t *ref_counts = (const int32_t *)fixture_need(f, "train.counts")->data;
    double loss_err = 0, norm_err = 0;
    int counts_same = 1;
    printf("%s (%d steps, B=%d T=%d, lr %g, clip %g, gamma %s)\n", path, S, B, T, lr, clip, gam);
    for (int s = 0; s < S; s++) {
        const int *tk = (const int *)toks->data + (size_t)s * N;
        const int *tg = (const int *)fixture_need(f, "train.targets")->data + (size_t)s * N;
        model_forward(&m, tk, tg, B, T);
        model_zero_grad(&m);
        model_backward(&m, 1);
        float gn = grad_norm(m.grads, n);
        loss_err = fmax(loss_err, fabs(m.loss - losses[s]) / losses[s]);
        norm_err = fmax(norm_err, fabs(gn - norms[s]) / norms[s]);
        for (int i = 0; i < nmoe * E; i++) counts_same &= m.counts[i] == ref_counts[(size_t)s * nmoe * E + i];
        grad_scale(m.grads, n, grad_clip_scale(gn, (float)clip));
        adamw_step(m.params, m.grads, mom, vel, n, &dr, &opt, lr, s + 1);
        balance_update(&bc, s, S, m.counts, nmoe, E, c->top_k, N, m.bias);
    }
    report("losses of 10 steps", loss_err, TOL_LOSS * 10);
    report("gradient norms", norm_err, TOL_FWD);
    printf("  %-30s %s\n", "expert counts of every step", counts_same ? "identical ok" : "DIFFER FAIL");
    failures += !counts_same;
    double *ref = malloc(sizeof(double) * n), pe = 0;
    for (int i = 0; i < m.lay.n; i++) {
        const ParamTensor *t = &m.lay.t[i];
        char name[96];
        snprintf(name, sizeof name, "train.final.%s", t->name);
        fixture_to_double(fixture_need(f, name), ref);
        for (int64_t j = 0; j < t->numel; j++) pe = fmax(pe, fabs(m.params[t->offset + j] - ref[j]));
    }
    report("final parameters (max abs)", pe, TOL_TRAIN);
    fixture_to_double(fixture_need(f, "train.final_bias"), ref);
    double be = 0;
    for (int i = 0; i < nmoe * E; i++) be = fmax(be, fabs(m.bias[i] - ref[i]));
    report("final bias (max abs)", be, 1e-6);
    free(ref);
    free(mom);
    free(vel);
    free(losses);
    free(norms);
    decay_ranges_free(&dr);
    model_free(&m);
    fixture_free(f);
}
#endif

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "tests/fixtures";
    const char *cases[] = { "ref_base", "ref_softmax_tied", "ref_softmax_aux_expert", "ref_sigmoid_aux_seq",
                            "ref_mult_bias", "ref_top1_noshared", "ref_softmax_mult_seq", "ref_parallel_logits",
                            "ref_parallel_sigmoid_seq" };
    char path[1024];
    printf("model (" REAL_NAME ") against the PyTorch float64 reference\n");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(path, sizeof path, "%s/%s.bin", dir, cases[i]);
        check_case(path);
    }
#ifndef MOE_FP64
    snprintf(path, sizeof path, "%s/ref_train.bin", dir);
    check_training(path);
#else
    printf("training steps: checked by the fp32 build (the optimizer works on fp32 buffers)\n");
#endif
    printf("test_reference (" REAL_NAME "): %s (%d failures)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
