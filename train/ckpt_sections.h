// The sections of a training checkpoint: the one list that the trainer's save
// and load (train/ckpt_state.c) and the moe_ckpt tool follow, and that
// docs/checkpoint.md ("Sections") documents with shapes and meanings. The
// container itself (train/ckpt.h) knows nothing of them.
#ifndef MOE_CKPT_SECTIONS_H
#define MOE_CKPT_SECTIONS_H

#include "ckpt.h"

typedef enum {
    SEC_MODEL_CONFIG, // text: the model config as key=value lines (model/config.h's format)
    SEC_OPTIONS,      // text: every training option as "key = value" lines
    SEC_STEP,         // i64 (1): optimizer steps completed
    SEC_LOADER,       // u64 (3): the training loader's epoch, batch and data fingerprint
    SEC_RNG,          // u64 (1): the sampling RNG state
    SEC_BIAS,         // f32 (n_moe, E): the balancing biases after the last update
    SEC_PARAMS,       // f32 (n_params): every parameter, in layout order (model/layout.h)
    SEC_ADAM_M,       // f32 (n_params): AdamW first moments, same order
    SEC_ADAM_V,       // f32 (n_params): AdamW second moments, same order
    SEC_COUNT
} CkptSectionId;

// The values a section may hold, checked on load (train/ckpt_state.c): the
// checksums prove a file is the one written, not that what was written can
// be trained from.
typedef enum {
    VAL_ANY,           // any bytes (the text sections are parsed instead)
    VAL_NONNEG,        // integers >= 0
    VAL_FINITE,        // floats, neither NaN nor infinite
    VAL_FINITE_NONNEG, // finite floats >= 0
} CkptValues;

typedef struct {
    const char *name; // the section's name in the file
    CkptDtype dtype;
    CkptValues values;
} CkptSectionDef;

// In the order the trainer writes them.
static const CkptSectionDef ckpt_sections[SEC_COUNT] = {
    [SEC_MODEL_CONFIG] = { "model_config", CKPT_TEXT, VAL_ANY },
    [SEC_OPTIONS] = { "options", CKPT_TEXT, VAL_ANY },
    [SEC_STEP] = { "step", CKPT_I64, VAL_NONNEG },
    [SEC_LOADER] = { "loader", CKPT_U64, VAL_ANY },
    [SEC_RNG] = { "rng", CKPT_U64, VAL_ANY },
    [SEC_BIAS] = { "bias", CKPT_F32, VAL_FINITE },
    [SEC_PARAMS] = { "params", CKPT_F32, VAL_FINITE },
    [SEC_ADAM_M] = { "adam_m", CKPT_F32, VAL_FINITE },
    [SEC_ADAM_V] = { "adam_v", CKPT_F32, VAL_FINITE_NONNEG }, // a mean of squares
};

#endif
