// The mapping between this project's model and transformers' Glm4Moe and
// Ernie4_5_Moe (see hf.h and docs/hf.md): which architecture, the tensor
// names and the config.json fields.
#include "hf.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../util/util.h"

const char *hf_arch_name(HfArch a) { return a == HF_GLM4_MOE ? "Glm4MoeForCausalLM" : "Ernie4_5_MoeForCausalLM"; }
static const char *hf_model_type(HfArch a) { return a == HF_GLM4_MOE ? "glm4_moe" : "ernie4_5_moe"; }

// ---------------------------------------------------------------- which architecture

int hf_arch_for(const MoeConfig *c, int bias_mult, int bias_logits, HfArch *arch, char *err, size_t errlen) {
    *arch = HF_GLM4_MOE;
    if (c->parallel_residual) {
        util_set_err(err, errlen, "parallel_residual = 1: Glm4Moe and Ernie4_5_Moe apply the FFN to the stream after "
                     "attention (x + attn, then + ffn), not to the layer input");
        return -1;
    }
    if (config_n_moe(c) == 0) return 0; // no router: every MoE setting is moot
    if (bias_mult) {
        util_set_err(err, errlen, "gamma-rule mult: the model selects experts on s * b (a multiplicative bias); "
                     "every transformers architecture adds its selection bias (s + b), so it cannot be exported");
        return -1;
    }
    if (bias_logits) {
        util_set_err(err, errlen, "bias-on logits: the model adds its selection bias to the router logits; every "
                     "transformers architecture adds it to the affinities (s + b), so it cannot be exported");
        return -1;
    }
    if (c->gate == GATE_SIGMOID) {
        // Glm4Moe's group routing sums the top 2 scores of each group, even with one group.
        if (c->n_routed < 2) {
            util_set_err(err, errlen, "n_routed = %d: Glm4Moe's router needs at least 2 routed experts",
                         c->n_routed);
            return -1;
        }
        return 0;
    }
    // Softmax: Ernie4_5_Moe selects on softmax + bias and always normalises the gates, with no scale.
    if (!c->norm_topk) {
        util_set_err(err, errlen, "norm_topk = 0 with gate = softmax: the only transformers architecture with a "
                     "softmax gate and a selection bias (Ernie4_5_Moe) always normalises the selected gates");
        return -1;
    }
    if (c->route_scale != 1.0f) {
        util_set_err(err, errlen, "route_scale = %g with gate = softmax: Ernie4_5_Moe has no routed scaling "
                     "factor", c->route_scale);
        return -1;
    }
    *arch = HF_ERNIE4_5_MOE;
    return 0;
}

// ---------------------------------------------------------------- tensors

typedef struct {
    HfTensor *t;
    int n, cap;
} HfList;

// Appends tensor (rows, cols), or (rows) when cols is -1, named by fmt.
static HfTensor *hf_add(HfList *l, float *data, int64_t rows, int64_t cols, const char *fmt, ...)
    UTIL_PRINTF(5, 6);
static HfTensor *hf_add(HfList *l, float *data, int64_t rows, int64_t cols, const char *fmt, ...) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->t = xrealloc(l->t, sizeof *l->t * (size_t)l->cap);
    }
    HfTensor *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->ndim = cols >= 0 ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols >= 0 ? cols : 0;
    t->data = rows * (cols >= 0 ? cols : 1) > 0 ? data : NULL;
    return t;
}

// A SwiGLU as transformers names it: gate_proj = w13 rows [0, m), up_proj =
// rows [m, 2m), down_proj = w2 (d, m).
static void hf_add_swiglu(HfList *l, const char *prefix, float *w13, float *w2, int64_t m, int64_t d) {
    hf_add(l, w13, m, d, "%s.gate_proj.weight", prefix);
    hf_add(l, w13 + m * d, m, d, "%s.up_proj.weight", prefix);
    hf_add(l, w2, d, m, "%s.down_proj.weight", prefix);
}

HfTensor *hf_tensors(const MoeConfig *c, HfArch arch, const ParamLayout *lay, float *params, float *bias, int *n) {
    HfList l = { 0 };
    int64_t d = c->d_model, E = c->n_routed, de = c->d_expert, sh = (int64_t)c->n_shared * de;
    char p[32], q[64]; // "model.layers.L", and its prefixes of the MLP
    for (int i = 0; i < lay->n; i++) {
        const ParamTensor *pt = &lay->t[i];
        float *w = params + pt->offset;
        snprintf(p, sizeof p, "model.layers.%d", pt->layer);
        switch (pt->kind) {
        case P_TOK_EMB: hf_add(&l, w, pt->shape[0], d, "model.embed_tokens.weight"); break;
        case P_ATTN_NORM: hf_add(&l, w, d, -1, "%s.input_layernorm.weight", p); break;
        case P_WQKV:
            // Rows [0, d) query, [d, 2d) key, [2d, 3d) value.
            hf_add(&l, w, d, d, "%s.self_attn.q_proj.weight", p)->rope_pairs = arch == HF_ERNIE4_5_MOE;
            hf_add(&l, w + d * d, d, d, "%s.self_attn.k_proj.weight", p)->rope_pairs = arch == HF_ERNIE4_5_MOE;
            hf_add(&l, w + 2 * d * d, d, d, "%s.self_attn.v_proj.weight", p);
            break;
        case P_WO: hf_add(&l, w, d, d, "%s.self_attn.o_proj.weight", p); break;
        case P_FFN_NORM: hf_add(&l, w, d, -1, "%s.post_attention_layernorm.weight", p); break;
        case P_FFN_W13:
            snprintf(q, sizeof q, "%s.mlp", p);
            hf_add_swiglu(&l, q, w, params + layout_offset(lay, pt->layer, P_FFN_W2), c->d_ff, d);
            break;
        case P_ROUTER: {
            float *b = bias + (size_t)(pt->layer - c->n_dense) * E; // (E) this layer's selection bias
            hf_add(&l, w, E, d, "%s.mlp.gate.weight", p)->keep_fp32 = 1;
            if (arch == HF_GLM4_MOE) hf_add(&l, b, E, -1, "%s.mlp.gate.e_score_correction_bias", p)->keep_fp32 = 1;
            else hf_add(&l, b, 1, E, "%s.mlp.moe_statics.e_score_correction_bias", p)->keep_fp32 = 1;
            // Glm4Moe always builds its shared experts: without any they are zero-size.
            snprintf(q, sizeof q, "%s.mlp.shared_experts", p);
            if (sh == 0 && arch == HF_GLM4_MOE) hf_add_swiglu(&l, q, NULL, NULL, 0, d);
            break;
        }
        case P_SHARED_W13:
            snprintf(q, sizeof q, "%s.mlp.shared_experts", p);
            hf_add_swiglu(&l, q, w, params + layout_offset(lay, pt->layer, P_SHARED_W2), sh, d);
            break;
        case P_EXPERTS_W13: {
            // Expert e: w13 (2 de, d) at e 2 de d, w2 (d, de) at e d de; named one expert at a time.
            float *w2 = params + layout_offset(lay, pt->layer, P_EXPERTS_W2);
            for (int64_t e = 0; e < E; e++) {
                snprintf(q, sizeof q, "%s.mlp.experts.%lld", p, (long long)e);
                hf_add_swiglu(&l, q, w + e * 2 * de * d, w2 + e * d * de, de, d);
            }
            break;
        }
        case P_FINAL_NORM: hf_add(&l, w, d, -1, "model.norm.weight"); break;
        case P_LM_HEAD: hf_add(&l, w, pt->shape[0], d, "lm_head.weight"); break;
        case P_FFN_W2: case P_SHARED_W2: case P_EXPERTS_W2: break; // named with their w13
        case P_NKINDS: break;
        }
    }
    *n = l.n;
    return l.t;
}

int64_t hf_rope_row(int64_t r, int hd) {
    // Interleaved row 2i of a head is rotate-half row i; row 2i + 1 is row i + hd/2.
    int64_t head = r / hd, j = r % hd;
    return head * hd + (j % 2 == 0 ? j / 2 : hd / 2 + j / 2);
}

// ---------------------------------------------------------------- config.json

// The shortest decimal that reads back as the same float (an integral value
// keeps a ".0" so that Python reads a float).
static void hf_put_float(FILE *f, float x) {
    if (x == floorf(x) && fabsf(x) < 1e15f) {
        fprintf(f, "%.1f", (double)x);
        return;
    }
    char buf[32];
    for (int p = 1; p <= 9; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, (double)x);
        if (strtof(buf, NULL) == x) break;
    }
    fputs(buf, f);
}

static void hf_key(FILE *f, int *first, const char *key) {
    fprintf(f, "%s\n  \"%s\": ", *first ? "{" : ",", key);
    *first = 0;
}

void hf_config_write(FILE *f, const MoeConfig *c, HfArch arch, int bf16, int eos_id) {
    int first = 1, glm = arch == HF_GLM4_MOE;
#define KEY(k) hf_key(f, &first, k)
#define INT(k, v) (KEY(k), fprintf(f, "%d", (int)(v)))
#define FLT(k, v) (KEY(k), hf_put_float(f, (v)))
#define STR(k, v) (KEY(k), fprintf(f, "\"%s\"", (v)))
#define BOOL(k, v) (KEY(k), fputs((v) ? "true" : "false", f))
    KEY("architectures");
    fprintf(f, "[\"%s\"]", hf_arch_name(arch));
    STR("model_type", hf_model_type(arch));
    STR("dtype", bf16 ? "bfloat16" : "float32");
    INT("vocab_size", c->vocab_size);
    INT("hidden_size", c->d_model);
    INT("num_hidden_layers", c->n_layers);
    INT("num_attention_heads", c->n_heads);
    INT("num_key_value_heads", c->n_heads);
    INT("head_dim", config_head_dim(c));
    INT("max_position_embeddings", c->seq_len);
    STR("hidden_act", "silu");
    INT("intermediate_size", c->d_ff);
    INT("moe_intermediate_size", c->d_expert);
    FLT("rms_norm_eps", c->rms_eps);
    KEY("rope_parameters");
    fprintf(f, "{\"rope_type\": \"default\", \"rope_theta\": ");
    hf_put_float(f, c->rope_theta);
    fprintf(f, "%s}", glm ? ", \"partial_rotary_factor\": 1.0" : "");
    BOOL("tie_word_embeddings", c->tie_embeddings);
    if (glm) {
        BOOL("attention_bias", 0);
        BOOL("use_qk_norm", 0);
        INT("first_k_dense_replace", c->n_dense);
        INT("n_routed_experts", c->n_routed);
        INT("num_experts_per_tok", c->top_k);
        INT("n_shared_experts", c->n_shared);
        INT("n_group", 1);
        INT("topk_group", 1);
        BOOL("norm_topk_prob", c->norm_topk);
        FLT("routed_scaling_factor", c->route_scale);
        INT("num_nextn_predict_layers", 0);
    } else {
        BOOL("use_bias", 0);
        INT("moe_layer_start_index", c->n_dense);
        INT("moe_layer_end_index", c->n_layers - 1);
        INT("moe_layer_interval", 1);
        INT("moe_num_experts", c->n_routed);
        INT("moe_k", c->top_k);
        INT("moe_num_shared_experts", c->n_shared);
        FLT("moe_norm_min", 1e-12f);
    }
    FLT("attention_dropout", 0.0f);
    FLT("initializer_range", c->init_std);
    KEY("bos_token_id");
    fputs("null", f);
    KEY("eos_token_id");
    if (eos_id >= 0) fprintf(f, "%d", eos_id);
    else fputs("null", f);
    KEY("pad_token_id");
    fputs("null", f);
    BOOL("use_cache", 1);
    fputs("\n}\n", f);
#undef KEY
#undef INT
#undef FLT
#undef STR
#undef BOOL
}

// ---------------------------------------------------------------- reading config.json

typedef struct {
    const TokJson *j;
    const char *path;
    char *err;
    size_t errlen;
    int failed;
} HfCfg;

// The member key (looked up in j, then, for rope fields, in rope_parameters).
static const TokJson *hf_get(HfCfg *h, const char *key) {
    const TokJson *v = tok_json_get(h->j, key);
    if (!v) v = tok_json_get(tok_json_get(h->j, "rope_parameters"), key);
    if (!v && !h->failed) {
        util_set_err(h->err, h->errlen, "%s: '%s' is missing (it defines the model; transformers' default would "
                     "have to be guessed)", h->path, key);
        h->failed = 1;
    }
    return v;
}

static void hf_bad(HfCfg *h, const char *key, const char *why) {
    if (h->failed) return;
    util_set_err(h->err, h->errlen, "%s: '%s' %s", h->path, key, why);
    h->failed = 1;
}

static double hf_num(HfCfg *h, const char *key) {
    const TokJson *v = hf_get(h, key);
    if (v && v->type != TOK_JSON_NUMBER) hf_bad(h, key, "is not a number");
    return v && v->type == TOK_JSON_NUMBER ? v->num : 0;
}

static int hf_int(HfCfg *h, const char *key) {
    double x = hf_num(h, key);
    if (x != floor(x) || fabs(x) > 1e9) hf_bad(h, key, "is not an integer");
    return (int)x;
}

static int hf_bool(HfCfg *h, const char *key) {
    const TokJson *v = hf_get(h, key);
    if (v && v->type != TOK_JSON_TRUE && v->type != TOK_JSON_FALSE) hf_bad(h, key, "is not true or false");
    return v && v->type == TOK_JSON_TRUE;
}

static void hf_want_str(HfCfg *h, const char *key, const char *want) {
    const TokJson *v = hf_get(h, key);
    if (v && (v->type != TOK_JSON_STRING || strcmp(v->str, want) != 0)) {
        char why[160];
        snprintf(why, sizeof why, "must be \"%s\" (this model has no other)", want);
        hf_bad(h, key, why);
    }
}

static void hf_want_int(HfCfg *h, const char *key, int want, const char *why) {
    if (hf_int(h, key) != want && !h->failed) {
        char msg[256];
        snprintf(msg, sizeof msg, "must be %d: %s", want, why);
        hf_bad(h, key, msg);
    }
}

static void hf_want_false(HfCfg *h, const char *key, const char *why) {
    if (hf_bool(h, key)) hf_bad(h, key, why);
}

int hf_config_read(const TokJson *j, const char *path, MoeConfig *c, HfArch *arch, char *err, size_t errlen) {
    HfCfg h = { j, path, err, errlen, 0 };
    const TokJson *mt = tok_json_get(j, "model_type");
    if (j->type != TOK_JSON_OBJECT || !mt || mt->type != TOK_JSON_STRING ||
        (strcmp(mt->str, "glm4_moe") != 0 && strcmp(mt->str, "ernie4_5_moe") != 0)) {
        util_set_err(err, errlen, "%s: model_type is %s%s%s; only glm4_moe and ernie4_5_moe hold this model", path,
                     mt && mt->str ? "\"" : "", mt && mt->str ? mt->str : "missing", mt && mt->str ? "\"" : "");
        return -1;
    }
    *arch = strcmp(mt->str, "glm4_moe") == 0 ? HF_GLM4_MOE : HF_ERNIE4_5_MOE;
    const TokJson *archs = tok_json_get(j, "architectures");
    int listed = !archs;
    for (size_t i = 0; archs && archs->type == TOK_JSON_ARRAY && i < archs->len; i++)
        listed |= archs->items[i].type == TOK_JSON_STRING && strcmp(archs->items[i].str, hf_arch_name(*arch)) == 0;
    if (!listed) {
        util_set_err(err, errlen, "%s: architectures does not list %s", path, hf_arch_name(*arch));
        return -1;
    }
    memset(c, 0, sizeof *c);
    c->vocab_size = hf_int(&h, "vocab_size");
    c->d_model = hf_int(&h, "hidden_size");
    c->n_layers = hf_int(&h, "num_hidden_layers");
    c->n_heads = hf_int(&h, "num_attention_heads");
    c->seq_len = hf_int(&h, "max_position_embeddings");
    c->d_ff = hf_int(&h, "intermediate_size");
    c->d_expert = hf_int(&h, "moe_intermediate_size");
    c->rms_eps = (float)hf_num(&h, "rms_norm_eps");
    c->rope_theta = (float)hf_num(&h, "rope_theta");
    c->tie_embeddings = hf_bool(&h, "tie_word_embeddings");
    const TokJson *init = tok_json_get(j, "initializer_range");
    c->init_std = init && init->type == TOK_JSON_NUMBER ? (float)init->num : 0.02f;
    hf_want_int(&h, "num_key_value_heads", c->n_heads, "this model's attention has one key/value head per head");
    if (tok_json_get(j, "head_dim") && c->n_heads > 0)
        hf_want_int(&h, "head_dim", c->d_model / c->n_heads, "head_dim is hidden_size / num_attention_heads here");
    hf_want_str(&h, "hidden_act", "silu");
    const TokJson *rt = tok_json_get(tok_json_get(j, "rope_parameters"), "rope_type");
    if (rt && (rt->type != TOK_JSON_STRING || strcmp(rt->str, "default") != 0))
        hf_bad(&h, "rope_type", "must be \"default\" (no RoPE scaling here)");
    if (*arch == HF_GLM4_MOE) {
        c->gate = GATE_SIGMOID;
        if (hf_num(&h, "partial_rotary_factor") != 1.0)
            hf_bad(&h, "partial_rotary_factor", "must be 1.0: RoPE rotates the whole head here");
        hf_want_false(&h, "attention_bias", "must be false: the projections have no biases here");
        hf_want_false(&h, "use_qk_norm", "must be false: there is no query/key norm here");
        c->n_dense = hf_int(&h, "first_k_dense_replace");
        if (c->n_dense > c->n_layers) c->n_dense = c->n_layers;
        c->n_routed = hf_int(&h, "n_routed_experts");
        c->top_k = hf_int(&h, "num_experts_per_tok");
        c->n_shared = hf_int(&h, "n_shared_experts");
        // With topk_group = n_group every group survives: plain top-k.
        if (hf_int(&h, "topk_group") != hf_int(&h, "n_group"))
            hf_bad(&h, "topk_group", "must equal n_group: group-limited routing is not this model's");
        c->norm_topk = hf_bool(&h, "norm_topk_prob");
        c->route_scale = (float)hf_num(&h, "routed_scaling_factor");
    } else {
        c->gate = GATE_SOFTMAX;
        c->norm_topk = 1;
        c->route_scale = 1.0f;
        hf_want_false(&h, "use_bias", "must be false: the projections have no biases here");
        c->n_dense = hf_int(&h, "moe_layer_start_index");
        hf_want_int(&h, "moe_layer_interval", 1, "every layer after the dense ones is MoE here");
        int end = hf_int(&h, "moe_layer_end_index");
        if (end != -1 && end != c->n_layers - 1)
            hf_bad(&h, "moe_layer_end_index", "must be num_hidden_layers - 1 (or -1): the last layers are MoE here");
        c->n_routed = hf_int(&h, "moe_num_experts");
        c->top_k = hf_int(&h, "moe_k");
        c->n_shared = hf_int(&h, "moe_num_shared_experts");
        // The gates divide by max(sum, moe_norm_min); a top-k softmax sum is >= k / E.
        if (c->n_routed > 0 && hf_num(&h, "moe_norm_min") >= (double)c->top_k / c->n_routed)
            hf_bad(&h, "moe_norm_min", "is so large that it would clamp the gate normalisation");
    }
    if (h.failed) return -1;
    char why[256];
    if (config_validate(c, why, sizeof why) != 0) {
        util_set_err(err, errlen, "%s: not a valid model: %s", path, why);
        return -1;
    }
    return 0;
}
