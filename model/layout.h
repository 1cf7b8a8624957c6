// Parameter layout: the table of every parameter tensor (name, shape, layer,
// whether it is a matrix). Sizes, offsets into the one flat parameter buffer,
// checkpoint order, weight-decay masks, initialisation and export names all
// derive from this table; nothing else lists the parameters.
#ifndef MOE_LAYOUT_H
#define MOE_LAYOUT_H

#include <stdint.h>

#include "config.h"

// Which tensor of a layer (or of the model) an entry is.
typedef enum {
    P_TOK_EMB,     // (V, d)
    P_ATTN_NORM,   // (d)
    P_WQKV,        // (3d, d): rows [0,d) query, [d,2d) key, [2d,3d) value; heads contiguous
    P_WO,          // (d, d)
    P_FFN_NORM,    // (d)
    P_FFN_W13,     // (2 d_ff, d): rows [0,d_ff) gate W1 (through SiLU), [d_ff,2 d_ff) up W3
    P_FFN_W2,      // (d, d_ff)
    P_ROUTER,      // (E, d)
    P_SHARED_W13,  // (2 S de, d): the S shared experts side by side, one SwiGLU of hidden S*de
    P_SHARED_W2,   // (d, S de)
    P_EXPERTS_W13, // (E, 2 de, d): per expert, like P_FFN_W13
    P_EXPERTS_W2,  // (E, d, de)
    P_FINAL_NORM,  // (d)
    P_LM_HEAD,     // (V, d), absent when tie_embeddings
    P_NKINDS
} ParamKind;

typedef struct {
    char name[64];     // export/checkpoint name, e.g. "layers.3.moe.experts_w13"
    ParamKind kind;
    int layer;         // -1 for model-level tensors
    int ndim;
    int64_t shape[3];
    int64_t numel;
    int64_t offset;    // into the flat parameter buffer, in elements
    int is_matrix;     // 1: normal init and weight decay; 0 (norm weights): ones, no decay
} ParamTensor;

typedef struct {
    ParamTensor *t;    // (n) in buffer order
    int n;
    int64_t total;     // elements in the flat buffer
    int *index;        // (n_layers + 1, P_NKINDS): tensor index or -1; row n_layers is model-level
    int n_layers;
} ParamLayout;

// Routed-expert weights (E, ...): under expert parallelism each rank holds
// only its experts' rows of these (parallel/ep_layout.h); all other tensors
// are replicated.
static inline int layout_is_expert(ParamKind kind) { return kind == P_EXPERTS_W13 || kind == P_EXPERTS_W2; }

// Builds the table for a validated config (out of memory exits with a message).
void layout_build(ParamLayout *lay, const MoeConfig *c);
void layout_free(ParamLayout *lay);
// Index of the tensor of `kind` in `layer` (-1 for model-level), or -1 if absent.
int layout_find(const ParamLayout *lay, int layer, ParamKind kind);
// Offset of that tensor; aborts with a message if it is absent (a programming error).
int64_t layout_offset(const ParamLayout *lay, int layer, ParamKind kind);
// Index of the tensor with this name, or -1.
int layout_find_name(const ParamLayout *lay, const char *name);

// Seeded, reproducible initialisation into a float buffer of lay->total
// elements: normal(0, init_std) for matrices, ones for norm weights. The
// stream of random numbers is consumed tensor by tensor in table order.
void layout_init_params(const ParamLayout *lay, const MoeConfig *c, uint64_t seed, float *params);

// A small portable random generator (splitmix64 state advanced per draw), used
// for initialisation and sampling so runs reproduce across machines.
typedef struct { uint64_t s; } Rng;
uint64_t rng_u64(Rng *r);
double rng_uniform(Rng *r);  // [0, 1)
double rng_normal(Rng *r);   // standard normal (Box-Muller, one value per call)

#endif
