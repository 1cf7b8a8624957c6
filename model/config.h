// Model configuration: every architectural size of the DeepSeekMoE model is a
// field here. Named presets, a key=value file format and --print-config all
// derive from the one field table in config.c.
#ifndef MOE_CONFIG_H
#define MOE_CONFIG_H

#include <stdint.h>
#include <stdio.h>

enum { GATE_SIGMOID = 0, GATE_SOFTMAX = 1 };

typedef struct {
    int vocab_size;     // V
    int d_model;        // d
    int n_layers;       // L (dense + MoE)
    int n_heads;        // H, head_dim = d / H
    int seq_len;        // T, the longest sequence (RoPE table size)
    int n_dense;        // the first n_dense layers have a dense SwiGLU FFN
    int d_ff;           // hidden size of the dense FFN
    int n_shared;       // shared experts per MoE layer (always applied)
    int n_routed;       // routed experts per MoE layer (E)
    int d_expert;       // hidden size of every shared and routed expert
    int top_k;          // routed experts per token (K)
    int gate;           // GATE_SIGMOID or GATE_SOFTMAX: affinity s = gate(router logits)
    int norm_topk;      // 1: selected gate values are normalised to sum 1
    float route_scale;  // constant factor on the gate values
    float rms_eps;      // RMSNorm epsilon
    float rope_theta;   // RoPE base
    float init_std;     // std of the normal init of every matrix
    int tie_embeddings; // 1: the LM head reuses the token embedding
    int parallel_residual; // 1: x + attn(norm1 x) + ffn(norm2 x) (GPT-NeoX / litgpt);
                           // 0: x' = x + attn(norm1 x), then x' + ffn(norm2 x')
} MoeConfig;

// The largest sizes config_validate accepts: generous for any model this
// trainer can hold, small enough that every size the code derives from them
// (3 d, 2 d_ff, n_shared x d_expert, offsets into the parameter buffer) fits
// its integer type, and that counting parameters never overflows.
#define CONFIG_MAX_VOCAB 2147483647   // token ids are int32
#define CONFIG_MAX_D_MODEL 65536
#define CONFIG_MAX_LAYERS 1024
#define CONFIG_MAX_SEQ_LEN 1048576
#define CONFIG_MAX_HIDDEN 1048576     // d_ff, d_expert and n_shared x d_expert
#define CONFIG_MAX_EXPERTS 65536      // n_routed, n_shared
#define CONFIG_MAX_PARAMS ((int64_t)1 << 40) // parameters in all (4 TiB in fp32)
// A model file is a few hundred bytes; anything beyond this is not one.
#define CONFIG_MAX_FILE_BYTES (1 << 20)

// Fills *c with the named preset ("tiny", "small", "1b", "1b-hz", "3b"). Returns 0, or -1
// for an unknown name.
int config_preset(MoeConfig *c, const char *name);
// Sets one field from its text value ("d_model", "256"). Returns 0, -1 for an
// unknown key, -2 for a value that does not parse.
int config_set(MoeConfig *c, const char *key, const char *value);
// True when key names a model field.
int config_has_key(const char *key);
// Reads a key=value file ('#' comments, blank lines allowed) on top of *c:
// a regular file of at most CONFIG_MAX_FILE_BYTES, lines of at most 1023
// characters. On error writes a message naming the file and line into err
// and returns -1.
int config_load_file(MoeConfig *c, const char *path, char *err, size_t errlen);
// Reads a complete config from the text of len bytes that config_write
// produced (a checkpoint's model_config section): every field exactly once,
// nothing else, and a config that config_validate accepts. `where` names the
// text in messages. Returns 0, or -1 with a message in err (*c unspecified).
int config_parse_text(MoeConfig *c, const char *text, size_t len, const char *where, char *err, size_t errlen);
// Checks that the sizes can work together and lie within the CONFIG_MAX_
// bounds, and that the parameter count fits CONFIG_MAX_PARAMS. On error
// writes a message naming the offending fields into err and returns -1. Every
// path that builds a model from a config (options, model files, checkpoints,
// the tools) goes through it first.
int config_validate(const MoeConfig *c, char *err, size_t errlen);
// The fields in which a and b differ (except the field named `ignore`, when
// not NULL), as a comma-separated list of names in out. Returns their number.
int config_diff(const MoeConfig *a, const MoeConfig *b, const char *ignore, char *out, size_t outlen);
// Writes every field as key=value lines (the file format config_load_file reads).
void config_write(const MoeConfig *c, FILE *f);
// The names of the presets, NULL-terminated.
extern const char *const config_preset_names[];

static inline int config_head_dim(const MoeConfig *c) { return c->d_model / c->n_heads; }
static inline int config_n_moe(const MoeConfig *c) { return c->n_layers - c->n_dense; }
static inline int config_is_moe(const MoeConfig *c, int layer) { return layer >= c->n_dense; }

// Parameter counts. "active" counts what one token touches: every parameter
// except the routed experts it does not use (top_k of n_routed) and the
// embedding rows of other tokens (the embedding lookup costs no FLOPs, so it is
// left out of active, as in the DeepSeekMoE papers' activated-parameter figures).
// Computed with overflow checks: -1 when the count does not fit an int64_t
// (config_validate rejects such a config).
int64_t config_total_params(const MoeConfig *c);
int64_t config_active_params(const MoeConfig *c);
// Training FLOPs per token (forward + backward = 3x forward), matmuls plus the
// causal attention score/value products at full sequence length T.
double config_train_flops_per_token(const MoeConfig *c, int T);

#endif
