// A training checkpoint's content: the sections of train/ckpt_sections.h
// written from, and read into, one CkptState, with every value checked on
// load. The container (train/ckpt.h) proves that a file is the one that was
// written; this proves that what it holds can be trained or sampled from: a
// complete valid model config, a step >= 0, finite parameters, biases and
// AdamW moments, second moments >= 0, sections of exactly the sizes the
// config implies. Every message names the file and the section.
#ifndef MOE_CKPT_STATE_H
#define MOE_CKPT_STATE_H

#include <stdint.h>

#include "../model/config.h"
#include "ckpt.h"

typedef struct {
    MoeConfig cfg;       // the model (validated)
    char *options;       // every training option as "key = value" lines, NUL-terminated
    int64_t step;        // optimizer steps completed (>= 0)
    uint64_t loader[3];  // the training loader's epoch, batch and fingerprint (data/loader.h)
    uint64_t rng;        // the sampling RNG state
    int64_t n_params;    // config_total_params(&cfg): elements of params, adam_m, adam_v
    float *bias;         // (n_moe, E) the balancing biases
    float *params;       // (n_params) in layout order
    float *adam_m;       // (n_params) AdamW first moments
    float *adam_v;       // (n_params) AdamW second moments
    Ckpt *ck;            // the open file between ckpt_state_open and ckpt_state_close
    char *path;
} CkptState;

// Opens a checkpoint and reads its small sections: model_config (complete and
// valid) and options. Returns 0, or -1 with a message in err (st is then
// closed already).
int ckpt_state_open(CkptState *st, const char *path, char *err, size_t errlen);
// Reads the large sections into new buffers and checks their values: bias
// and params; with full != 0 also adam_m, adam_v, step, loader and rng.
// Sizes are checked against the file's section table before anything is
// allocated. Returns 0, or -1 with a message in err.
int ckpt_state_load(CkptState *st, int full, char *err, size_t errlen);
// Frees the buffers and closes the file. Safe on a zeroed CkptState.
void ckpt_state_close(CkptState *st);

// Writes every section of st (all of them must be set; nothing is owned or
// freed) to path through the atomic writer. Returns 0, or -1 with a message
// in err, path then left as it was.
int ckpt_state_write(const CkptState *st, const char *path, char *err, size_t errlen);

#endif
