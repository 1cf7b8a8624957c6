// The model inside a checkpoint file: its config, fp32 parameters, balancing
// biases and routing rule, read and written outside the trainer (the moe_ckpt
// tool's export and import, test programs). The sections are the trainer's
// (docs/checkpoint.md): model_config, params, bias and options; a file written
// here holds no optimizer state, so it serves --init-from and `train_moe
// sample`, not --resume.
#ifndef MOE_CKPT_MODEL_H
#define MOE_CKPT_MODEL_H

#include <stddef.h>

#include "../model/config.h"
#include "../model/layout.h"

typedef struct {
    MoeConfig cfg;
    ParamLayout lay;  // the parameter table of cfg
    float *params;    // (lay.total) in layout order
    float *bias;      // (n_moe, E) fp32 balancing biases, one row per MoE layer
    int bias_mult;    // 1: experts are selected on s * b (--gamma-rule mult), 0: on s + b
    int bias_logits;  // 1: the bias is added to the router logits (--bias-on logits)
} CkptModel;

// Reads and checks model_config, params, bias and (when present) options, from
// which bias_mult and bias_logits come; a checkpoint without options selects on s + b, as
// `train_moe sample` does by default. Returns 0, or -1 with a message naming
// the file.
int ckpt_model_load(const char *path, CkptModel *m, char *err, size_t errlen);
// Allocates zeroed params and bias for a config (which must be valid).
void ckpt_model_alloc(CkptModel *m, const MoeConfig *cfg);
// Writes model_config, options (the text given, "key = value" lines), params
// and bias atomically (train/ckpt.h). Returns 0, or -1 with a message.
int ckpt_model_save(const char *path, const CkptModel *m, const char *options_text, char *err, size_t errlen);
void ckpt_model_free(CkptModel *m);

#endif
