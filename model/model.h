// The CPU reference model: parameters, activations, forward and backward of
// the whole DeepSeekMoE transformer (docs/model.md). Built in fp32 for the
// trainer and in fp64 (-DMOE_FP64) for the finite-difference test.
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stdint.h>

#include "config.h"
#include "layout.h"
#include "moe.h"
#include "real.h"

// Activations of one layer, for N = B*T tokens.
typedef struct {
    real *rstd1;  // (N) attention RMSNorm
    real *h1;     // (N, d) normed input of attention
    real *qkv;    // (N, 3d) with RoPE applied to q and k
    real *att;    // (B, H, T, T) attention probabilities
    real *a;      // (N, d) attention output, heads concatenated
    real *xmid;   // (N, d) residual after attention
    real *rstd2;  // (N) FFN RMSNorm
    real *h2;     // (N, d) normed input of the FFN
    real *f13;    // (N, 2 d_ff) dense FFN pre-activations (dense layers)
    real *fact;   // (N, d_ff) dense FFN activation
    MoeActs moe;  // MoE layers
} LayerActs;

typedef struct {
    MoeConfig cfg;
    ParamLayout lay;
    RouteOptions route;
    const MoeExchange *ep; // expert-parallel group, NULL: every expert local
    real *params;      // (lay.total) the flat parameter buffer
    real *grads;       // (lay.total) gradients, accumulated by model_backward
    float *bias;       // (n_moe, E) balancing biases: fp32, not parameters
    int64_t *counts;   // (n_moe, E) tokens per expert in the last forward
    DualAccum *dual;   // (n_moe) the primal-dual sums of the last forward's routing (model/dual.h)
    int maxB, maxT;    // activation capacity
    int B, T;          // shape of the last forward
    // activations
    real *x;           // (L + 1, N, d) residual stream entering each layer, and the final one
    LayerActs *layer;  // (L)
    real *rstdf;       // (N) final RMSNorm
    real *hf;          // (N, d) final normed stream
    real *logits;      // (N, V) logits, then probabilities, then their gradient
    real *rope_cos, *rope_sin; // (maxT, hd/2)
    int *tokens;       // (maxB * maxT) copy of the last forward's inputs
    int *targets;      // (maxB * maxT) and targets, for the backward
    int has_targets;   // 1 when the last forward computed a loss
    double loss;       // mean cross-entropy of the last forward
    double aux_loss;   // summed auxiliary loss of the last forward
} Model;

// Builds the layout and allocates parameters, gradients, biases and
// activations for micro-batches up to maxB x maxT (out of memory exits with
// a message). The config must be valid.
void model_create(Model *m, const MoeConfig *c, int maxB, int maxT);
void model_free(Model *m);
// Initialises parameters (layout_init_params) and sets every bias to bias0.
void model_init_params(Model *m, uint64_t seed, float bias0);
// Parameters from / to an fp32 buffer of lay.total elements.
void model_set_params(Model *m, const float *src);
void model_get_params(const Model *m, float *dst);

// Forward on tokens (B, T); with targets (B, T) also the loss. Writes
// m->counts, m->dual, m->loss, m->aux_loss and m->logits (probabilities if
// targets).
void model_forward(Model *m, const int *tokens, const int *targets, int B, int T);
void model_zero_grad(Model *m);
// Accumulates into m->grads the gradient of grad_scale * (loss + aux_loss) of
// the last forward (which must have had targets). Overwrites m->logits.
void model_backward(Model *m, real grad_scale);

// Pointer to one parameter tensor (or its gradient) of layer (-1: model-level).
real *model_param(const Model *m, int layer, ParamKind kind);
real *model_grad(const Model *m, int layer, ParamKind kind);

#endif
