// Hugging Face interoperability: a checkpoint as a transformers model
// directory (config.json, generation_config.json, model.safetensors or shards
// with model.safetensors.index.json, tokenizer.json, tokenizer_config.json)
// and such a directory back as a checkpoint. The name and config mappings,
// what is refused and why, are in docs/hf.md.
//
// Two transformers architectures compute this model exactly:
//   Glm4MoeForCausalLM      sigmoid gate (any norm_topk, route_scale)
//   Ernie4_5_MoeForCausalLM softmax gate with norm_topk = 1, route_scale = 1
// Anything else (the multiplicative bias of --gamma-rule mult, a softmax gate
// without normalised gates or with a scale) is refused with a message naming
// the field, never exported approximately.
#ifndef MOE_HF_H
#define MOE_HF_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "../model/config.h"
#include "../model/layout.h"
#include "../tokenizer/tok_json.h"

typedef enum { HF_GLM4_MOE, HF_ERNIE4_5_MOE } HfArch;

typedef struct {
    int bf16;                  // 1: tensors in bf16, except the router weight and bias (fp32 in both)
    uint64_t max_shard_bytes;  // model.safetensors is split into shards above this size
    const char *tokenizer;     // a .tok file exported as tokenizer.json, or NULL
} HfExportOptions;

// What an export wrote, for the tool's summary.
typedef struct {
    HfArch arch;
    int n_tensors, n_shards;
    uint64_t bytes;            // tensor data over all shards
} HfExportInfo;

// Writes the directory outdir (created if missing) from checkpoint ckpt.
// Files are written atomically; weight files of an earlier export into the
// same directory with another sharding are removed. Refusals happen before
// anything is written. Returns 0, or -1 with a message naming the file or field.
int hf_export(const char *ckpt, const char *outdir, const HfExportOptions *o, HfExportInfo *info, char *err,
              size_t errlen);
// Reads such a directory (config.json and the weights) into a checkpoint of
// the model (train/ckpt_model.h). Returns 0, or -1 with a message.
int hf_import(const char *dir, const char *out_ckpt, HfArch *arch, char *err, size_t errlen);

const char *hf_arch_name(HfArch a);  // "Glm4MoeForCausalLM", ...

// ---------------------------------------------------------------- shared by export and import

// One tensor of the transformers model: a block of the flat parameter buffer
// (or of the biases), row-major.
typedef struct {
    char name[96];
    int ndim;
    int64_t shape[2];
    float *data;        // (shape) in the project's layout; NULL for a zero-size tensor
    int keep_fp32;      // router weight and selection bias: fp32 in every export
    int rope_pairs;     // q/k rows reordered per head from the rotate-half pairs (i, i + hd/2)
                        // to the interleaved pairs (2i, 2i + 1) of Ernie's RoPE
} HfTensor;

// The architecture that represents this model exactly, or -1 with a message
// naming the field that no architecture can represent.
int hf_arch_for(const MoeConfig *c, int bias_mult, int bias_logits, HfArch *arch, char *err, size_t errlen);
// Every tensor of the transformers model, in model order, pointing into params
// (lay of c) and bias (n_moe, E). *n gets the count; free the array.
HfTensor *hf_tensors(const MoeConfig *c, HfArch arch, const ParamLayout *lay, float *params, float *bias, int *n);
// The source row of row r of a rope_pairs tensor with heads of hd rows.
int64_t hf_rope_row(int64_t r, int hd);
// config.json: every field of the architecture that defines the model.
// eos_id < 0 writes null.
void hf_config_write(FILE *f, const MoeConfig *c, HfArch arch, int bf16, int eos_id);
// The model config from a parsed config.json (path for messages). Fields that
// change the computation must have values this model has; missing ones are
// refused, irrelevant ones (dropout at inference, initialisation) ignored.
int hf_config_read(const TokJson *j, const char *path, MoeConfig *c, HfArch *arch, char *err, size_t errlen);

#endif
