// Parameter layout: builds the tensor table from a config, and initialises.
#include "layout.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../util/util.h"

static const char *const layout_kind_names[P_NKINDS] = {
    [P_TOK_EMB] = "tok_emb", [P_ATTN_NORM] = "attn_norm", [P_WQKV] = "attn.wqkv",
    [P_WO] = "attn.wo", [P_FFN_NORM] = "ffn_norm", [P_FFN_W13] = "ffn.w13", [P_FFN_W2] = "ffn.w2",
    [P_ROUTER] = "moe.router", [P_SHARED_W13] = "moe.shared_w13", [P_SHARED_W2] = "moe.shared_w2",
    [P_EXPERTS_W13] = "moe.experts_w13", [P_EXPERTS_W2] = "moe.experts_w2",
    [P_FINAL_NORM] = "final_norm", [P_LM_HEAD] = "lm_head",
};

static void layout_add(ParamLayout *lay, int layer, ParamKind kind, int ndim, int64_t a, int64_t b,
                       int64_t c, int is_matrix) {
    ParamTensor *t = &lay->t[lay->n];
    memset(t, 0, sizeof *t);
    if (layer >= 0) snprintf(t->name, sizeof t->name, "layers.%d.%s", layer, layout_kind_names[kind]);
    else snprintf(t->name, sizeof t->name, "%s", layout_kind_names[kind]);
    t->kind = kind;
    t->layer = layer;
    t->ndim = ndim;
    t->shape[0] = a; t->shape[1] = b; t->shape[2] = c;
    t->numel = a * (ndim > 1 ? b : 1) * (ndim > 2 ? c : 1);
    t->offset = lay->total;
    t->is_matrix = is_matrix;
    int row = layer >= 0 ? layer : lay->n_layers;
    lay->index[row * P_NKINDS + kind] = lay->n;
    lay->total += t->numel;
    lay->n++;
}

void layout_build(ParamLayout *lay, const MoeConfig *c) {
    memset(lay, 0, sizeof *lay);
    int max_tensors = 3 + 11 * c->n_layers;
    lay->t = xcalloc((size_t)max_tensors, sizeof *lay->t);
    lay->index = xmalloc(sizeof(int) * (size_t)(c->n_layers + 1) * P_NKINDS);
    lay->n_layers = c->n_layers;
    for (int i = 0; i < (c->n_layers + 1) * P_NKINDS; i++) lay->index[i] = -1;

    int64_t V = c->vocab_size, d = c->d_model, E = c->n_routed, de = c->d_expert;
    int64_t sh = (int64_t)c->n_shared * de;
    layout_add(lay, -1, P_TOK_EMB, 2, V, d, 0, 1);
    for (int l = 0; l < c->n_layers; l++) {
        layout_add(lay, l, P_ATTN_NORM, 1, d, 0, 0, 0);
        layout_add(lay, l, P_WQKV, 2, 3 * d, d, 0, 1);
        layout_add(lay, l, P_WO, 2, d, d, 0, 1);
        layout_add(lay, l, P_FFN_NORM, 1, d, 0, 0, 0);
        if (!config_is_moe(c, l)) {
            layout_add(lay, l, P_FFN_W13, 2, 2 * (int64_t)c->d_ff, d, 0, 1);
            layout_add(lay, l, P_FFN_W2, 2, d, c->d_ff, 0, 1);
        } else {
            layout_add(lay, l, P_ROUTER, 2, E, d, 0, 1);
            if (sh > 0) {
                layout_add(lay, l, P_SHARED_W13, 2, 2 * sh, d, 0, 1);
                layout_add(lay, l, P_SHARED_W2, 2, d, sh, 0, 1);
            }
            layout_add(lay, l, P_EXPERTS_W13, 3, E, 2 * de, d, 1);
            layout_add(lay, l, P_EXPERTS_W2, 3, E, d, de, 1);
        }
    }
    layout_add(lay, -1, P_FINAL_NORM, 1, d, 0, 0, 0);
    if (!c->tie_embeddings) layout_add(lay, -1, P_LM_HEAD, 2, V, d, 0, 1);
}

void layout_free(ParamLayout *lay) {
    free(lay->t);
    free(lay->index);
    memset(lay, 0, sizeof *lay);
}

int layout_find(const ParamLayout *lay, int layer, ParamKind kind) {
    int row = layer >= 0 ? layer : lay->n_layers;
    return lay->index[row * P_NKINDS + kind];
}

int64_t layout_offset(const ParamLayout *lay, int layer, ParamKind kind) {
    int i = layout_find(lay, layer, kind);
    ASSERT(i >= 0, "layer %d has no tensor %s", layer, layout_kind_names[kind]);
    return lay->t[i].offset;
}

int layout_find_name(const ParamLayout *lay, const char *name) {
    for (int i = 0; i < lay->n; i++)
        if (strcmp(lay->t[i].name, name) == 0) return i;
    return -1;
}

// ----------------------------------------------------------------------------
// Random numbers and initialisation

uint64_t rng_u64(Rng *r) {
    // splitmix64 (Steele, Lea, Flood 2014): a full-period 64-bit generator.
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

double rng_uniform(Rng *r) { return (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }

double rng_normal(Rng *r) {
    // Box-Muller with u1 in (0, 1] so the log is finite.
    double u1 = 1.0 - rng_uniform(r), u2 = rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void layout_init_params(const ParamLayout *lay, const MoeConfig *c, uint64_t seed, float *params) {
    Rng rng = { seed };
    for (int i = 0; i < lay->n; i++) {
        const ParamTensor *t = &lay->t[i];
        float *p = params + t->offset;
        for (int64_t j = 0; j < t->numel; j++)
            p[j] = t->is_matrix ? (float)(c->init_std * rng_normal(&rng)) : 1.0f;
    }
}
