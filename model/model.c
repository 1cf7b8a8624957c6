// The CPU reference model (see model.h and docs/model.md): allocation, and the
// forward and backward passes that string the building blocks of ops.c and
// moe.c together.
#include "model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "matmul.h"
#include "ops.h"
#include "phase.h"
#include "../util/util.h"

// ----------------------------------------------------------------------------
// Allocation

void model_create(Model *m, const MoeConfig *c, int maxB, int maxT) {
    memset(m, 0, sizeof *m);
    m->cfg = *c;
    m->route = (RouteOptions){ .bias_mult = 0, .aux_kind = AUX_NONE, .aux_alpha = 0 };
    m->maxB = maxB;
    m->maxT = maxT;
    layout_build(&m->lay, c);
    size_t N = (size_t)maxB * maxT, d = c->d_model, L = c->n_layers, H = c->n_heads;
    size_t nmoe = config_n_moe(c), E = c->n_routed;
    m->params = xcalloc(m->lay.total, sizeof(real));
    m->grads = xcalloc(m->lay.total, sizeof(real));
    m->bias = xcalloc(nmoe * E, sizeof(float));
    m->counts = xcalloc(nmoe * E, sizeof(int64_t));
    m->dual = xcalloc(nmoe + 1, sizeof(DualAccum));
    for (size_t l = 0; l < nmoe; l++) dual_accum_init(&m->dual[l], (int)E, c->top_k, 0);
    m->x = xcalloc((L + 1) * N * d, sizeof(real));
    m->layer = xcalloc(L, sizeof(LayerActs));
    m->rstdf = xcalloc(N, sizeof(real));
    m->hf = xcalloc(N * d, sizeof(real));
    m->logits = xcalloc(N * c->vocab_size, sizeof(real));
    m->rope_cos = xcalloc((size_t)maxT * (d / H / 2), sizeof(real));
    m->rope_sin = xcalloc((size_t)maxT * (d / H / 2), sizeof(real));
    m->tokens = xcalloc(N, sizeof(int));
    m->targets = xcalloc(N, sizeof(int));
    for (size_t l = 0; l < L; l++) {
        LayerActs *la = &m->layer[l];
        la->rstd1 = xcalloc(N, sizeof(real));
        la->h1 = xcalloc(N * d, sizeof(real));
        la->qkv = xcalloc(N * 3 * d, sizeof(real));
        la->att = xcalloc((size_t)maxB * H * maxT * maxT, sizeof(real));
        la->a = xcalloc(N * d, sizeof(real));
        la->xmid = xcalloc(N * d, sizeof(real));
        la->rstd2 = xcalloc(N, sizeof(real));
        la->h2 = xcalloc(N * d, sizeof(real));
        if (!config_is_moe(c, (int)l)) {
            la->f13 = xcalloc(N * 2 * c->d_ff, sizeof(real));
            la->fact = xcalloc(N * c->d_ff, sizeof(real));
        } else {
            moe_acts_alloc(&la->moe, c, (int)N);
        }
    }
    rope_tables(m->rope_cos, m->rope_sin, maxT, (int)(d / H), c->rope_theta);
}

void model_free(Model *m) {
    if (m->layer) {
        for (int l = 0; l < m->cfg.n_layers; l++) {
            LayerActs *la = &m->layer[l];
            free(la->rstd1); free(la->h1); free(la->qkv); free(la->att); free(la->a);
            free(la->xmid); free(la->rstd2); free(la->h2); free(la->f13); free(la->fact);
            moe_acts_free(&la->moe);
        }
    }
    for (int l = 0; m->dual && l < config_n_moe(&m->cfg); l++) dual_accum_free(&m->dual[l]);
    free(m->dual);
    free(m->layer); free(m->params); free(m->grads); free(m->bias); free(m->counts); free(m->x);
    free(m->rstdf); free(m->hf); free(m->logits); free(m->rope_cos); free(m->rope_sin);
    free(m->tokens); free(m->targets);
    layout_free(&m->lay);
    memset(m, 0, sizeof *m);
}

void model_init_params(Model *m, uint64_t seed, float bias0) {
    float *tmp = xmalloc(sizeof(float) * (size_t)m->lay.total);
    layout_init_params(&m->lay, &m->cfg, seed, tmp);
    model_set_params(m, tmp);
    free(tmp);
    size_t nb = (size_t)config_n_moe(&m->cfg) * m->cfg.n_routed;
    for (size_t i = 0; i < nb; i++) m->bias[i] = bias0;
}

void model_set_params(Model *m, const float *src) {
    for (int64_t i = 0; i < m->lay.total; i++) m->params[i] = src[i];
}

void model_get_params(const Model *m, float *dst) {
    for (int64_t i = 0; i < m->lay.total; i++) dst[i] = (float)m->params[i];
}

real *model_param(const Model *m, int layer, ParamKind kind) {
    return m->params + layout_offset(&m->lay, layer, kind);
}

real *model_grad(const Model *m, int layer, ParamKind kind) {
    return m->grads + layout_offset(&m->lay, layer, kind);
}

void model_zero_grad(Model *m) { memset(m->grads, 0, sizeof(real) * (size_t)m->lay.total); }

// The weights of MoE layer l, and the matching gradient pointers.
static MoeWeights model_moe_weights(const Model *m, int l) {
    int has_shared = m->cfg.n_shared > 0;
    return (MoeWeights){
        .router = model_param(m, l, P_ROUTER),
        .sh13 = has_shared ? model_param(m, l, P_SHARED_W13) : NULL,
        .sh2 = has_shared ? model_param(m, l, P_SHARED_W2) : NULL,
        .ex13 = model_param(m, l, P_EXPERTS_W13),
        .ex2 = model_param(m, l, P_EXPERTS_W2),
    };
}

static MoeGrads model_moe_grads(const Model *m, int l) {
    int has_shared = m->cfg.n_shared > 0;
    return (MoeGrads){
        .router = model_grad(m, l, P_ROUTER),
        .sh13 = has_shared ? model_grad(m, l, P_SHARED_W13) : NULL,
        .sh2 = has_shared ? model_grad(m, l, P_SHARED_W2) : NULL,
        .ex13 = model_grad(m, l, P_EXPERTS_W13),
        .ex2 = model_grad(m, l, P_EXPERTS_W2),
    };
}

static const real *model_head(const Model *m) {
    return model_param(m, -1, m->cfg.tie_embeddings ? P_TOK_EMB : P_LM_HEAD);
}

// ----------------------------------------------------------------------------
// Forward

void model_forward(Model *m, const int *tokens, const int *targets, int B, int T) {
    const MoeConfig *c = &m->cfg;
    ASSERT(B <= m->maxB && T <= m->maxT, "forward of %d x %d exceeds the allocated %d x %d", B, T, m->maxB,
           m->maxT);
    int N = B * T, d = c->d_model, H = c->n_heads, V = c->vocab_size, E = c->n_routed;
    size_t Nd = (size_t)N * d;
    m->B = B;
    m->T = T;
    memcpy(m->tokens, tokens, sizeof(int) * N);
    m->has_targets = targets != NULL;
    if (targets) memcpy(m->targets, targets, sizeof(int) * N);

    phase_mark(PH_EMBEDDING);
    encoder_forward(m->x, tokens, model_param(m, -1, P_TOK_EMB), N, d);
    m->aux_loss = 0;
    for (int l = 0; l < c->n_layers; l++) {
        LayerActs *la = &m->layer[l];
        const real *x = m->x + l * Nd;
        real *xout = m->x + (l + 1) * Nd;
        // Attention block: xmid = x + wo(attention(rope(wqkv(norm(x))))).
        phase_mark(PH_ELEMENTWISE);
        rmsnorm_forward(la->h1, la->rstd1, x, model_param(m, l, P_ATTN_NORM), N, d, c->rms_eps);
        phase_mark(PH_DENSE_MATMUL);
        matmul_forward(la->qkv, la->h1, model_param(m, l, P_WQKV), N, d, 3 * d, 0);
        phase_mark(PH_ELEMENTWISE);
        rope_apply(la->qkv, m->rope_cos, m->rope_sin, B, T, d, H, 0);
        phase_mark(PH_ATTENTION);
        attention_forward(la->a, la->att, la->qkv, B, T, d, H);
        phase_mark(PH_DENSE_MATMUL);
        memcpy(la->xmid, x, sizeof(real) * Nd);
        matmul_forward(la->xmid, la->a, model_param(m, l, P_WO), N, d, d, 1);
        // FFN block: xout = xmid + ffn(norm(xmid)); with a parallel residual
        // the FFN reads the layer's input instead, xout = x + attn + ffn(norm(x)).
        phase_mark(PH_ELEMENTWISE);
        const real *ffn_in = c->parallel_residual ? x : la->xmid;
        rmsnorm_forward(la->h2, la->rstd2, ffn_in, model_param(m, l, P_FFN_NORM), N, d, c->rms_eps);
        if (!config_is_moe(c, l)) {
            phase_mark(PH_DENSE_MATMUL);
            matmul_forward(la->f13, la->h2, model_param(m, l, P_FFN_W13), N, d, 2 * c->d_ff, 0);
            phase_mark(PH_ELEMENTWISE);
            swiglu_forward(la->fact, la->f13, N, c->d_ff);
            memcpy(xout, la->xmid, sizeof(real) * Nd);
            phase_mark(PH_DENSE_MATMUL);
            matmul_forward(xout, la->fact, model_param(m, l, P_FFN_W2), N, c->d_ff, d, 1);
        } else {
            int moe_idx = l - c->n_dense; // index among the MoE layers: row of bias and counts
            MoeWeights w = model_moe_weights(m, l);
            DualAccum *dual = &m->dual[moe_idx];
            dual_accum_reset(dual);
            dual->mult = m->route.bias_mult; // the routing may be set after model_create
            moe_forward(c, &m->route, m->ep, &w, m->bias + (size_t)moe_idx * E, la->h2, B, T, &la->moe, xout,
                        m->counts + (size_t)moe_idx * E, dual);
            phase_mark(PH_ELEMENTWISE);
            for (size_t i = 0; i < Nd; i++) xout[i] += la->xmid[i];
            m->aux_loss += la->moe.aux;
        }
    }
    phase_mark(PH_ELEMENTWISE);
    rmsnorm_forward(m->hf, m->rstdf, m->x + c->n_layers * Nd, model_param(m, -1, P_FINAL_NORM), N, d,
                    c->rms_eps);
    phase_mark(PH_DENSE_MATMUL);
    matmul_forward(m->logits, m->hf, model_head(m), N, d, V, 0);
    phase_mark(PH_CLASSIFIER);
    m->loss = targets ? crossentropy_forward(m->logits, targets, N, V) : 0;
}

// ----------------------------------------------------------------------------
// Backward

void model_backward(Model *m, real grad_scale) {
    const MoeConfig *c = &m->cfg;
    ASSERT(m->has_targets, "backward without a loss (the forward had no targets)");
    int B = m->B, T = m->T, N = B * T, d = c->d_model, H = c->n_heads, V = c->vocab_size;
    size_t Nd = (size_t)N * d;
    real *dx = xcalloc(Nd, sizeof(real));       // (N, d) gradient of the residual stream
    real *dh = xcalloc(Nd, sizeof(real));       // (N, d) gradient of a normed input
    real *dbig = xcalloc((size_t)N * 3 * d > (size_t)N * 2 * c->d_ff ? (size_t)N * 3 * d
                                                                     : (size_t)N * 2 * c->d_ff,
                        sizeof(real));          // (N, max(3d, 2 d_ff)) scratch
    real *dsmall = xcalloc((size_t)N * (d > c->d_ff ? d : c->d_ff), sizeof(real)); // (N, max(d, d_ff))
    // (N, d) parallel residual: the FFN norm's output gradient, held while the
    // attention block's backward runs on the same residual gradient
    real *dh_ffn = c->parallel_residual ? xcalloc(Nd, sizeof(real)) : NULL;

    // Loss and LM head.
    phase_mark(PH_CLASSIFIER);
    crossentropy_backward(m->logits, m->targets, N, V, grad_scale);
    phase_mark(PH_DENSE_MATMUL);
    real *dhead = model_grad(m, -1, c->tie_embeddings ? P_TOK_EMB : P_LM_HEAD);
    matmul_backward_weight(dhead, m->logits, m->hf, N, d, V);
    matmul_backward_input(dh, m->logits, model_head(m), N, d, V, 0);
    phase_mark(PH_ELEMENTWISE);
    rmsnorm_backward(dx, model_grad(m, -1, P_FINAL_NORM), dh, m->x + c->n_layers * Nd,
                     model_param(m, -1, P_FINAL_NORM), m->rstdf, N, d);

    for (int l = c->n_layers - 1; l >= 0; l--) {
        LayerActs *la = &m->layer[l];
        const real *x = m->x + l * Nd;
        // FFN block: dx flows through the residual unchanged and through the FFN.
        if (!config_is_moe(c, l)) {
            real *dact = dsmall, *d13 = dbig;
            phase_mark(PH_DENSE_MATMUL);
            matmul_backward_weight(model_grad(m, l, P_FFN_W2), dx, la->fact, N, c->d_ff, d);
            matmul_backward_input(dact, dx, model_param(m, l, P_FFN_W2), N, c->d_ff, d, 0);
            phase_mark(PH_ELEMENTWISE);
            swiglu_backward(d13, dact, la->f13, N, c->d_ff);
            phase_mark(PH_DENSE_MATMUL);
            matmul_backward_weight(model_grad(m, l, P_FFN_W13), d13, la->h2, N, d, 2 * c->d_ff);
            matmul_backward_input(dh, d13, model_param(m, l, P_FFN_W13), N, d, 2 * c->d_ff, 0);
        } else {
            MoeWeights w = model_moe_weights(m, l);
            MoeGrads dw = model_moe_grads(m, l);
            memset(dh, 0, sizeof(real) * Nd);
            moe_backward(c, &m->route, m->ep, &w, la->h2, dx, B, T, &la->moe, dh, &dw, grad_scale);
        }
        phase_mark(PH_ELEMENTWISE);
        // Sequential: dx becomes the gradient at xmid. Parallel: the gradient at
        // xmid is the one at xout, so the FFN norm's part joins dx only after the
        // attention block (below), through the layer input x.
        if (c->parallel_residual) memcpy(dh_ffn, dh, sizeof(real) * Nd);
        else rmsnorm_backward(dx, model_grad(m, l, P_FFN_NORM), dh, la->xmid, model_param(m, l, P_FFN_NORM),
                              la->rstd2, N, d);
        // Attention block.
        real *da = dsmall, *dqkv = dbig;
        phase_mark(PH_DENSE_MATMUL);
        matmul_backward_weight(model_grad(m, l, P_WO), dx, la->a, N, d, d);
        matmul_backward_input(da, dx, model_param(m, l, P_WO), N, d, d, 0);
        phase_mark(PH_ATTENTION);
        attention_backward(dqkv, da, la->qkv, la->att, B, T, d, H);
        phase_mark(PH_ELEMENTWISE);
        rope_apply(dqkv, m->rope_cos, m->rope_sin, B, T, d, H, 1);
        phase_mark(PH_DENSE_MATMUL);
        matmul_backward_weight(model_grad(m, l, P_WQKV), dqkv, la->h1, N, d, 3 * d);
        matmul_backward_input(dh, dqkv, model_param(m, l, P_WQKV), N, d, 3 * d, 0);
        phase_mark(PH_ELEMENTWISE);
        rmsnorm_backward(dx, model_grad(m, l, P_ATTN_NORM), dh, x, model_param(m, l, P_ATTN_NORM),
                         la->rstd1, N, d);
        if (c->parallel_residual)
            rmsnorm_backward(dx, model_grad(m, l, P_FFN_NORM), dh_ffn, x, model_param(m, l, P_FFN_NORM),
                             la->rstd2, N, d);
    }
    phase_mark(PH_EMBEDDING);
    encoder_backward(model_grad(m, -1, P_TOK_EMB), dx, m->tokens, N, d);
    free(dx);
    free(dh);
    free(dbig);
    free(dsmall);
    free(dh_ffn);
}
