// Finite-difference check of every parameter tensor's gradient, with the model
// built in fp64. Routing is held fixed: a perturbation that changes any TopK
// selection is detected (the selections are compared with the unperturbed
// ones) and that entry is excluded and counted, not averaged in.
//
// Error measure, per tensor: max_i |fd_i - g_i| / max_i |g_i|. Central
// differences with step h = 1e-5 in fp64 err by O(h^2 f''') ~ 1e-10 plus
// rounding ~ 1e-16 |L| / h ~ 1e-11, i.e. ~1e-8 relative to gradients of order
// 1e-2; a wrong formula errs by the size of the gradient itself. The threshold
// 1e-6 sits between the two with two orders of margin on each side.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/layout.h"
#include "../model/model.h"

#define THRESHOLD 1e-6
#define FD_STEP 1e-5
#define MAX_ENTRIES 96 // entries checked per tensor (all of them if fewer)

typedef struct {
    const char *name;
    const char *overrides; // "key=value key=value" on top of the tiny preset
    RouteOptions route;
    float bias_scale;      // random bias magnitude (around 1 for bias_mult)
} Case;

static double objective(Model *m, const int *tok, const int *tgt, int B, int T) {
    model_forward(m, tok, tgt, B, T);
    return m->loss + m->aux_loss;
}

// Copies every MoE layer's selection (N, K) into buf.
static void save_selection(const Model *m, int *buf) {
    const MoeConfig *c = &m->cfg;
    size_t NK = (size_t)m->B * m->T * c->top_k;
    for (int l = c->n_dense; l < c->n_layers; l++)
        memcpy(buf + (l - c->n_dense) * NK, m->layer[l].moe.sel, sizeof(int) * NK);
}

static int selection_changed(const Model *m, const int *buf) {
    const MoeConfig *c = &m->cfg;
    size_t NK = (size_t)m->B * m->T * c->top_k;
    for (int l = c->n_dense; l < c->n_layers; l++)
        if (memcmp(buf + (l - c->n_dense) * NK, m->layer[l].moe.sel, sizeof(int) * NK)) return 1;
    return 0;
}

static int run_case(const Case *cs) {
    MoeConfig c;
    config_preset(&c, "tiny");
    c.init_std = 0.2f; // larger than the training init, so every path carries signal
    char buf[256], err[256];
    snprintf(buf, sizeof buf, "%s", cs->overrides);
    for (char *kv = strtok(buf, " "); kv; kv = strtok(NULL, " ")) {
        char *eq = strchr(kv, '=');
        *eq = '\0';
        if (config_set(&c, kv, eq + 1) != 0) {
            fprintf(stderr, "bad override %s\n", kv);
            return 1;
        }
    }
    if (config_validate(&c, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    int B = 2, T = 8, N = B * T;
    Model m;
    model_create(&m, &c, B, T);
    m.route = cs->route;
    model_init_params(&m, 1234, 0.0f);
    Rng rng = { 99 };
    int nb = config_n_moe(&c) * c.n_routed;
    for (int i = 0; i < nb; i++)
        m.bias[i] = (cs->route.bias_mult ? 1.0f : 0.0f) + cs->bias_scale * (float)rng_normal(&rng);
    int *tok = malloc(sizeof(int) * N), *tgt = malloc(sizeof(int) * N);
    for (int i = 0; i < N; i++) {
        tok[i] = (int)(rng_u64(&rng) % c.vocab_size);
        tgt[i] = (int)(rng_u64(&rng) % c.vocab_size);
    }
    objective(&m, tok, tgt, B, T);
    int *sel0 = malloc(sizeof(int) * (size_t)N * c.top_k * (config_n_moe(&c) + 1));
    save_selection(&m, sel0);
    model_zero_grad(&m);
    model_backward(&m, 1.0);

    printf("case %s (%s; aux_kind=%d bias_mult=%d)\n", cs->name, cs->overrides, cs->route.aux_kind,
           cs->route.bias_mult);
    int fails = 0;
    for (int ti = 0; ti < m.lay.n; ti++) {
        const ParamTensor *t = &m.lay.t[ti];
        double gmax = 0, emax = 0;
        int checked = 0, flipped = 0;
        for (int64_t i = 0; i < t->numel; i++) gmax = fmax(gmax, fabs(m.grads[t->offset + i]));
        int64_t stride = t->numel <= MAX_ENTRIES ? 1 : t->numel / MAX_ENTRIES;
        for (int64_t i = (int64_t)(rng_u64(&rng) % stride); i < t->numel; i += stride) {
            real *p = &m.params[t->offset + i], p0 = *p;
            *p = p0 + FD_STEP;
            double lp = objective(&m, tok, tgt, B, T);
            int fl = selection_changed(&m, sel0);
            *p = p0 - FD_STEP;
            double lm = objective(&m, tok, tgt, B, T);
            fl |= selection_changed(&m, sel0);
            *p = p0;
            if (fl) {
                flipped++;
                continue;
            }
            double fd = (lp - lm) / (2 * FD_STEP);
            emax = fmax(emax, fabs(fd - m.grads[t->offset + i]));
            checked++;
        }
        double rel = gmax > 0 ? emax / gmax : emax;
        int ok = rel < THRESHOLD && checked > 0 && gmax > 0;
        printf("  %-28s checked %3d excluded(routing flip) %d  max|grad| %.3e  rel.err %.2e %s\n", t->name,
               checked, flipped, gmax, rel, ok ? "ok" : "FAIL");
        fails += !ok;
    }
    free(tok);
    free(tgt);
    free(sel0);
    model_free(&m);
    return fails;
}

int main(void) {
    Case cases[] = {
        { "sigmoid-norm", "gate=sigmoid norm_topk=1", { 0, AUX_NONE, 0, 0 }, 0.05f },
        { "softmax-raw", "gate=softmax norm_topk=0 n_shared=0 n_dense=0", { 0, AUX_NONE, 0, 0 }, 0.02f },
        { "tied-scaled", "tie_embeddings=1 route_scale=2.5 n_shared=1", { 0, AUX_NONE, 0, 0 }, 0.05f },
        { "aux-expert", "gate=softmax norm_topk=1", { 0, AUX_EXPERT, 0.1f, 0 }, 0.02f },
        { "aux-seq", "gate=sigmoid norm_topk=1", { 0, AUX_SEQ, 0.1f, 0 }, 0.05f },
        { "mult-bias", "gate=sigmoid norm_topk=1", { 1, AUX_SEQ, 0.05f, 0 }, 0.3f },
        { "parallel-residual", "gate=sigmoid norm_topk=1 parallel_residual=1", { 0, AUX_SEQ, 0.1f, 0 }, 0.05f },
        { "parallel-logit-bias", "gate=softmax norm_topk=1 parallel_residual=1", { 0, AUX_NONE, 0, 1 }, 0.3f },
    };
    int fails = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) fails += run_case(&cases[i]);
    printf("gradcheck (fp64, threshold %.0e): %s (%d tensor failures)\n", THRESHOLD, fails ? "FAIL" : "PASS",
           fails);
    return fails ? 1 : 0;
}
