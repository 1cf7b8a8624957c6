// Model configuration: the field table (one source of truth for names, parsing
// and printing), the named presets, validation, parameter counts and FLOPs.
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "../util/file.h"

// ----------------------------------------------------------------------------
// The field table

enum { F_INT, F_FLOAT, F_GATE };

typedef struct {
    const char *name;
    int type;
    size_t offset;
    const char *help;
} ConfigField;

#define FIELD(n, t, h) { #n, t, offsetof(MoeConfig, n), h }
static const ConfigField config_fields[] = {
    FIELD(vocab_size, F_INT, "vocabulary size V"),
    FIELD(d_model, F_INT, "residual stream width d"),
    FIELD(n_layers, F_INT, "transformer layers (dense + MoE)"),
    FIELD(n_heads, F_INT, "attention heads (head_dim = d_model / n_heads)"),
    FIELD(seq_len, F_INT, "longest sequence T"),
    FIELD(n_dense, F_INT, "leading layers with a dense SwiGLU FFN"),
    FIELD(d_ff, F_INT, "hidden size of the dense FFN"),
    FIELD(n_shared, F_INT, "shared experts per MoE layer"),
    FIELD(n_routed, F_INT, "routed experts per MoE layer"),
    FIELD(d_expert, F_INT, "hidden size of each expert"),
    FIELD(top_k, F_INT, "routed experts per token"),
    FIELD(gate, F_GATE, "affinity function: sigmoid or softmax"),
    FIELD(norm_topk, F_INT, "1: normalise the selected gate values to sum 1"),
    FIELD(route_scale, F_FLOAT, "constant factor on the gate values"),
    FIELD(rms_eps, F_FLOAT, "RMSNorm epsilon"),
    FIELD(rope_theta, F_FLOAT, "RoPE base"),
    FIELD(init_std, F_FLOAT, "std of the normal init of the matrices"),
    FIELD(tie_embeddings, F_INT, "1: LM head shares the token embedding"),
    FIELD(parallel_residual, F_INT, "1: attention and FFN both read the layer input (x + attn + ffn)"),
};
#undef FIELD
#define N_FIELDS ((int)(sizeof(config_fields) / sizeof(config_fields[0])))

static const ConfigField *config_find(const char *key) {
    for (int i = 0; i < N_FIELDS; i++)
        if (strcmp(config_fields[i].name, key) == 0) return &config_fields[i];
    return NULL;
}

int config_has_key(const char *key) { return config_find(key) != NULL; }

int config_set(MoeConfig *c, const char *key, const char *value) {
    const ConfigField *f = config_find(key);
    if (!f) return -1;
    char *end = NULL;
    void *p = (char *)c + f->offset;
    errno = 0;
    if (f->type == F_INT) {
        long v = strtol(value, &end, 10);
        if (end == value || *end != '\0' || errno || v < INT_MIN || v > INT_MAX) return -2;
        *(int *)p = (int)v;
    } else if (f->type == F_FLOAT) {
        float v = strtof(value, &end);
        if (end == value || *end != '\0' || errno || !isfinite(v)) return -2;
        *(float *)p = v;
    } else {
        if (strcmp(value, "sigmoid") == 0) *(int *)p = GATE_SIGMOID;
        else if (strcmp(value, "softmax") == 0) *(int *)p = GATE_SOFTMAX;
        else return -2;
    }
    return 0;
}

int config_diff(const MoeConfig *a, const MoeConfig *b, const char *ignore, char *out, size_t outlen) {
    int n = 0;
    size_t used = 0;
    if (outlen) out[0] = '\0';
    for (int i = 0; i < N_FIELDS; i++) {
        const ConfigField *fd = &config_fields[i];
        if (ignore && strcmp(ignore, fd->name) == 0) continue;
        // Every field is an int or a float of 4 bytes: compare the bytes.
        if (memcmp((const char *)a + fd->offset, (const char *)b + fd->offset, 4) == 0) continue;
        n++;
        if (used < outlen) {
            int w = snprintf(out + used, outlen - used, "%s%s", used ? ", " : "", fd->name);
            used += w > 0 ? (size_t)w : 0;
        }
    }
    return n;
}

void config_write(const MoeConfig *c, FILE *f) {
    for (int i = 0; i < N_FIELDS; i++) {
        const ConfigField *fd = &config_fields[i];
        const void *p = (const char *)c + fd->offset;
        if (fd->type == F_INT) fprintf(f, "%s=%d\n", fd->name, *(const int *)p);
        else if (fd->type == F_FLOAT) fprintf(f, "%s=%.9g\n", fd->name, *(const float *)p);
        else fprintf(f, "%s=%s\n", fd->name, *(const int *)p == GATE_SOFTMAX ? "softmax" : "sigmoid");
    }
}

int config_load_file(MoeConfig *c, const char *path, char *err, size_t errlen) {
    FILE *f = util_fopen_regular(path, "r", CONFIG_MAX_FILE_BYTES, err, errlen);
    if (!f) return -1;
    char line[1024], *key, *val;
    int lineno = 0, r;
    while ((r = util_kv_next(f, path, 1, line, sizeof line, &lineno, &key, &val, err, errlen)) == 1) {
        int set = config_set(c, key, val);
        if (set == -1) util_set_err(err, errlen, "%s:%d: unknown model field '%s'", path, lineno, key);
        if (set == -2) util_set_err(err, errlen, "%s:%d: bad value '%s' for field '%s'", path, lineno, val, key);
        if (set != 0) {
            r = -1;
            break;
        }
    }
    fclose(f);
    return r == 0 ? 0 : -1;
}

int config_parse_text(MoeConfig *c, const char *text, size_t len, const char *where, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    int seen[N_FIELDS] = { 0 };
    // fmemopen cannot open 0 bytes; an empty text simply misses every field.
    FILE *f = len > 0 ? fmemopen((void *)text, len, "r") : NULL;
    if (len > 0 && !f) {
        util_set_err(err, errlen, "%s: fmemopen: %s", where, strerror(errno));
        return -1;
    }
    char line[1024], *key, *val;
    int lineno = 0, r = 0;
    while (f && (r = util_kv_next(f, where, 0, line, sizeof line, &lineno, &key, &val, err, errlen)) == 1) {
        const ConfigField *fd = config_find(key);
        int i = fd ? (int)(fd - config_fields) : -1;
        if (!fd) util_set_err(err, errlen, "%s:%d: unknown model field '%s'", where, lineno, key);
        else if (seen[i]) util_set_err(err, errlen, "%s:%d: field '%s' appears twice", where, lineno, key);
        else if (config_set(c, key, val) != 0)
            util_set_err(err, errlen, "%s:%d: bad value '%s' for field '%s'", where, lineno, val, key);
        else {
            seen[i] = 1;
            continue;
        }
        r = -1;
        break;
    }
    if (f) fclose(f);
    if (r != 0) return -1;
    // No defaults: a config with a field missing is not the model that was
    // saved. Except for fields added after checkpoints were first written:
    // without them the config is a model from before they existed, and
    // their value 0 means exactly that (the function it computed then).
    for (int i = 0; i < N_FIELDS; i++)
        if (!seen[i] && strcmp(config_fields[i].name, "parallel_residual") != 0) {
            util_set_err(err, errlen, "%s: field '%s' is missing", where, config_fields[i].name);
            return -1;
        }
    char why[512];
    if (config_validate(c, why, sizeof why) != 0) {
        util_set_err(err, errlen, "%s: %s", where, why);
        return -1;
    }
    return 0;
}

// ----------------------------------------------------------------------------
// Presets

const char *const config_preset_names[] = { "tiny", "small", "1b", "1b-hz", "3b", NULL };

int config_preset(MoeConfig *c, const char *name) {
    // Shared by every preset: the choices of Wang et al. (arXiv 2408.15664).
    MoeConfig base = {
        .gate = GATE_SIGMOID, .norm_topk = 1, .route_scale = 1.0f,
        .rms_eps = 1e-6f, .rope_theta = 10000.0f, .init_std = 0.006f, .tie_embeddings = 0,
    };
    *c = base;
    if (strcmp(name, "tiny") == 0) {
        // For tests: a few tens of thousands of parameters, every code path present.
        c->vocab_size = 64; c->d_model = 32; c->n_layers = 3; c->n_heads = 2; c->seq_len = 16;
        c->n_dense = 1; c->d_ff = 64;
        c->n_shared = 2; c->n_routed = 8; c->d_expert = 16; c->top_k = 2;
        c->init_std = 0.02f;
    } else if (strcmp(name, "small") == 0) {
        // The paper's shape scaled down to train on 2 CPU cores in minutes:
        // 64 routed experts, top-6, 2 shared, first FFN dense, d_ff/d_expert = 16/3 * ... (see README).
        c->vocab_size = 4096; c->d_model = 256; c->n_layers = 4; c->n_heads = 4; c->seq_len = 256;
        c->n_dense = 1; c->d_ff = 704;
        c->n_shared = 2; c->n_routed = 64; c->d_expert = 64; c->top_k = 6;
        c->init_std = 0.02f;
    } else if (strcmp(name, "1b") == 0) {
        // Wang et al. Table 5, 1B: 1 dense + 9 MoE layers, 2 shared + 64 routed of
        // hidden 512 (granularity 16/3 of d_ff = 8/3 d), top-6. d_ff = 2736 is 8/3*1024
        // rounded up to a multiple of 16 so bf16 rows stay 32-byte aligned on the GPU.
        c->vocab_size = 32064; c->d_model = 1024; c->n_layers = 10; c->n_heads = 8; c->seq_len = 2048;
        c->n_dense = 1; c->d_ff = 2736;
        c->n_shared = 2; c->n_routed = 64; c->d_expert = 512; c->top_k = 6;
    } else if (strcmp(name, "1b-hz") == 0) {
        // Han & Zhong's 1B setup (arXiv 2512.03915), as their litgpt config
        // Deepseek-MoE-1B-lfb sets it: 9 layers, the first dense (d_ff 2816), 64
        // routed experts of hidden 528, top-6, 2 shared (one SwiGLU of 1056),
        // softmax gate with normalised top-k, parallel residual, block 4096,
        // RMSNorm eps 1e-6. Init std: their config does not set one; Wang et
        // al.'s 0.006 is kept. The bias on the logits and the update every
        // micro-batch are balancing options (docs/balance.md, the 1b-hz table).
        c->vocab_size = 32064; c->d_model = 1024; c->n_layers = 9; c->n_heads = 8; c->seq_len = 4096;
        c->n_dense = 1; c->d_ff = 2816;
        c->n_shared = 2; c->n_routed = 64; c->d_expert = 528; c->top_k = 6;
        c->gate = GATE_SOFTMAX; c->norm_topk = 1; c->parallel_residual = 1;
    } else if (strcmp(name, "3b") == 0) {
        // Wang et al. Table 5, 3B: 1 dense + 11 MoE layers, granularity 4.
        // d_ff = 3456 (8/3*1280 rounded up to a multiple of 128), d_expert = d_ff/4.
        c->vocab_size = 32064; c->d_model = 1280; c->n_layers = 12; c->n_heads = 10; c->seq_len = 2048;
        c->n_dense = 1; c->d_ff = 3456;
        c->n_shared = 2; c->n_routed = 64; c->d_expert = 864; c->top_k = 6;
    } else {
        return -1;
    }
    return 0;
}

// ----------------------------------------------------------------------------
// Counts, with overflow checks: a config is validated by counting it, so the
// count must survive any sizes a file or a command line can hold.

// a * b + c, or *ovf set (and 0) when it does not fit an int64_t.
static int64_t count_mad(int64_t a, int64_t b, int64_t c, int *ovf) {
    int64_t ab, r;
    if (__builtin_mul_overflow(a, b, &ab) || __builtin_add_overflow(ab, c, &r)) {
        *ovf = 1;
        return 0;
    }
    return r;
}

// Parameters of the whole model, or with active != 0 those one token uses.
// In closed form per kind of layer (a loop over layers would take seconds for
// a corrupt n_layers of 2e9).
static int64_t config_count(const MoeConfig *c, int active, int *ovf) {
    int64_t d = c->d_model, V = c->vocab_size, n_moe = config_n_moe(c);
    int64_t attn = count_mad(4 * d, d, d, ovf);                       // wqkv (3d x d), wo (d x d), attn_norm
    int64_t dense = count_mad(3 * d, c->d_ff, d, ovf);                // w13 (2 d_ff x d), w2 (d x d_ff), ffn_norm
    int64_t experts = (int64_t)c->n_shared + (active ? c->top_k : c->n_routed);
    int64_t moe = count_mad(count_mad(3 * d, c->d_expert, 0, ovf), experts,
                            count_mad(c->n_routed, d, d, ovf), ovf);  // experts, router, ffn_norm
    int64_t layers = count_mad(attn, c->n_layers, 0, ovf);
    layers = count_mad(dense, c->n_dense, layers, ovf);
    layers = count_mad(moe, n_moe, layers, ovf);
    // The final norm and the LM head: in active always (tied or not, its
    // matmul runs); in the total the embedding, and the head when untied.
    int64_t head = active ? count_mad(V, d, d, ovf)
                          : count_mad(V, c->tie_embeddings ? d : 2 * d, d, ovf);
    int64_t n = 0;
    if (__builtin_add_overflow(layers, head, &n)) *ovf = 1;
    return *ovf ? -1 : n;
}

int64_t config_total_params(const MoeConfig *c) {
    int ovf = 0;
    return config_count(c, 0, &ovf);
}

int64_t config_active_params(const MoeConfig *c) {
    int ovf = 0;
    return config_count(c, 1, &ovf);
}

// ----------------------------------------------------------------------------
// Validation

int config_validate(const MoeConfig *c, char *err, size_t errlen) {
#define CHECK(cond, ...) do { if (!(cond)) { util_set_err(err, errlen, __VA_ARGS__); return -1; } } while (0)
#define RANGE(field, lo, hi) CHECK(c->field >= (lo) && c->field <= (hi), #field " must be in [%d, %d] (got %d)", \
                                   (int)(lo), (int)(hi), c->field)
    // Every field within its bounds first: the checks below multiply them.
    RANGE(vocab_size, 2, CONFIG_MAX_VOCAB);
    RANGE(d_model, 2, CONFIG_MAX_D_MODEL);
    RANGE(n_layers, 1, CONFIG_MAX_LAYERS);
    RANGE(n_heads, 1, c->d_model);
    RANGE(seq_len, 1, CONFIG_MAX_SEQ_LEN);
    RANGE(n_dense, 0, c->n_layers);
    RANGE(d_ff, c->n_dense > 0 ? 1 : 0, CONFIG_MAX_HIDDEN);
    RANGE(n_shared, 0, CONFIG_MAX_EXPERTS);
    RANGE(n_routed, config_n_moe(c) > 0 ? 1 : 0, CONFIG_MAX_EXPERTS);
    RANGE(d_expert, config_n_moe(c) > 0 ? 1 : 0, CONFIG_MAX_HIDDEN);
    RANGE(top_k, config_n_moe(c) > 0 ? 1 : 0, c->n_routed);
    RANGE(gate, GATE_SIGMOID, GATE_SOFTMAX);
    RANGE(norm_topk, 0, 1);
    RANGE(tie_embeddings, 0, 1);
    RANGE(parallel_residual, 0, 1);
#undef RANGE
    CHECK(c->d_model % c->n_heads == 0, "n_heads (%d) must divide d_model (%d)", c->n_heads, c->d_model);
    CHECK(config_head_dim(c) % 2 == 0, "head_dim = d_model / n_heads = %d must be even for RoPE",
          config_head_dim(c));
    CHECK((int64_t)c->n_shared * c->d_expert <= CONFIG_MAX_HIDDEN,
          "n_shared x d_expert = %d x %d must be <= %d", c->n_shared, c->d_expert, CONFIG_MAX_HIDDEN);
    CHECK(config_n_moe(c) == 0 || c->gate != GATE_SOFTMAX || c->n_routed >= 2, "softmax gate needs n_routed >= 2");
    CHECK(isfinite(c->route_scale) && c->route_scale > 0, "route_scale must be > 0 (got %g)", c->route_scale);
    CHECK(isfinite(c->rms_eps) && c->rms_eps > 0, "rms_eps must be > 0 (got %g)", c->rms_eps);
    CHECK(isfinite(c->rope_theta) && c->rope_theta > 1, "rope_theta must be > 1 (got %g)", c->rope_theta);
    CHECK(isfinite(c->init_std) && c->init_std > 0, "init_std must be > 0 (got %g)", c->init_std);
    int64_t total = config_total_params(c);
    CHECK(total >= 0 && total <= CONFIG_MAX_PARAMS, "the model has %s%lld parameters, more than %lld",
          total < 0 ? "over " : "", total < 0 ? (long long)INT64_MAX : (long long)total,
          (long long)CONFIG_MAX_PARAMS);
#undef CHECK
    return 0;
}

double config_train_flops_per_token(const MoeConfig *c, int T) {
    // Forward: 2 FLOPs per multiply-add of every active matrix parameter, plus
    // QK^T and AV over T keys (causal: on average T/2, counted here at T as
    // the usual convention of the PaLM/llm.c MFU formulas). Backward is 2x forward.
    double d = c->d_model;
    double matmul = (double)config_active_params(c) - d * (2.0 * c->n_layers + 1); // drop norm weights
    double attn = 2.0 * 2.0 * c->n_layers * T * d;
    return 3.0 * (2.0 * matmul + attn);
}
