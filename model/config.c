// Model configuration: the field table (one source of truth for names, parsing
// and printing), the named presets, validation, parameter counts and FLOPs.
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

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

// Strips leading and trailing blanks in place.
static char *config_trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = '\0';
    return s;
}

int config_load_file(MoeConfig *c, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot open config file %s: %s", path, strerror(errno));
        return -1;
    }
    char line[1024];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash) *hash = '\0';
        char *s = config_trim(line);
        if (*s == '\0') continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            snprintf(err, errlen, "%s:%d: expected key=value, got '%s'", path, lineno, s);
            rc = -1;
            break;
        }
        *eq = '\0';
        char *key = config_trim(s), *val = config_trim(eq + 1);
        int r = config_set(c, key, val);
        if (r == -1) {
            snprintf(err, errlen, "%s:%d: unknown model field '%s'", path, lineno, key);
            rc = -1;
            break;
        }
        if (r == -2) {
            snprintf(err, errlen, "%s:%d: bad value '%s' for field '%s'", path, lineno, val, key);
            rc = -1;
            break;
        }
    }
    if (rc == 0 && ferror(f)) {
        snprintf(err, errlen, "error reading config file %s", path);
        rc = -1;
    }
    fclose(f);
    return rc;
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
// Validation

int config_validate(const MoeConfig *c, char *err, size_t errlen) {
#define CHECK(cond, ...) do { if (!(cond)) { snprintf(err, errlen, __VA_ARGS__); return -1; } } while (0)
    CHECK(c->vocab_size >= 2, "vocab_size must be >= 2 (got %d)", c->vocab_size);
    CHECK(c->d_model >= 2, "d_model must be >= 2 (got %d)", c->d_model);
    CHECK(c->n_layers >= 1, "n_layers must be >= 1 (got %d)", c->n_layers);
    CHECK(c->n_heads >= 1 && c->d_model % c->n_heads == 0,
          "n_heads (%d) must divide d_model (%d)", c->n_heads, c->d_model);
    CHECK(config_head_dim(c) % 2 == 0, "head_dim = d_model / n_heads = %d must be even for RoPE",
          config_head_dim(c));
    CHECK(c->seq_len >= 1, "seq_len must be >= 1 (got %d)", c->seq_len);
    CHECK(c->n_dense >= 0 && c->n_dense <= c->n_layers,
          "n_dense (%d) must be between 0 and n_layers (%d)", c->n_dense, c->n_layers);
    CHECK(c->n_dense == 0 || c->d_ff >= 1, "d_ff must be >= 1 when n_dense > 0 (got %d)", c->d_ff);
    if (config_n_moe(c) > 0) {
        CHECK(c->n_routed >= 1, "n_routed must be >= 1 when there are MoE layers (got %d)", c->n_routed);
        CHECK(c->top_k >= 1 && c->top_k <= c->n_routed,
              "top_k (%d) must be between 1 and n_routed (%d)", c->top_k, c->n_routed);
        CHECK(c->n_shared >= 0, "n_shared must be >= 0 (got %d)", c->n_shared);
        CHECK(c->d_expert >= 1, "d_expert must be >= 1 (got %d)", c->d_expert);
        CHECK(c->gate != GATE_SOFTMAX || c->n_routed >= 2, "softmax gate needs n_routed >= 2");
    }
    CHECK(c->norm_topk == 0 || c->norm_topk == 1, "norm_topk must be 0 or 1 (got %d)", c->norm_topk);
    CHECK(c->tie_embeddings == 0 || c->tie_embeddings == 1, "tie_embeddings must be 0 or 1 (got %d)",
          c->tie_embeddings);
    CHECK(c->parallel_residual == 0 || c->parallel_residual == 1, "parallel_residual must be 0 or 1 (got %d)",
          c->parallel_residual);
    CHECK(c->route_scale > 0, "route_scale must be > 0 (got %g)", c->route_scale);
    CHECK(c->rms_eps > 0, "rms_eps must be > 0 (got %g)", c->rms_eps);
    CHECK(c->rope_theta > 1, "rope_theta must be > 1 (got %g)", c->rope_theta);
    CHECK(c->init_std > 0, "init_std must be > 0 (got %g)", c->init_std);
#undef CHECK
    return 0;
}

// ----------------------------------------------------------------------------
// Counts

static int64_t config_attn_params(const MoeConfig *c) {
    int64_t d = c->d_model;
    return 4 * d * d + d; // wqkv (3d x d), wo (d x d), attn_norm
}

static int64_t config_ffn_params(const MoeConfig *c, int layer, int active) {
    int64_t d = c->d_model;
    if (!config_is_moe(c, layer)) return 3 * d * c->d_ff + d;
    int64_t per_expert = 3 * d * c->d_expert;
    int64_t routed = active ? c->top_k : c->n_routed;
    return (int64_t)c->n_routed * d + (c->n_shared + routed) * per_expert + d;
}

int64_t config_total_params(const MoeConfig *c) {
    int64_t d = c->d_model, V = c->vocab_size;
    int64_t n = V * d + d + (c->tie_embeddings ? 0 : V * d);
    for (int l = 0; l < c->n_layers; l++) n += config_attn_params(c) + config_ffn_params(c, l, 0);
    return n;
}

int64_t config_active_params(const MoeConfig *c) {
    int64_t d = c->d_model, V = c->vocab_size;
    int64_t n = d + V * d; // final norm + LM head (tied or not, its matmul runs)
    for (int l = 0; l < c->n_layers; l++) n += config_attn_params(c) + config_ffn_params(c, l, 1);
    return n;
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
