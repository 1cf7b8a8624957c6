// Per-phase timing of a training step (`--profile N`): the phases a backend
// attributes its time to, the model FLOPs of each phase per token (the same
// convention as config_train_flops_per_token: 6 x active parameters plus
// attention, docs/gpu.md "Profiling"), and the report: a table of ms per
// step, share, achieved TFLOP/s per phase, tokens/s, model TFLOP/s and MFU
// against the GPU's bf16 dense peak when the GPU is known.
#ifndef MOE_PROFILE_H
#define MOE_PROFILE_H

#include <stdio.h>

#include "../model/config.h"

typedef enum {
    PH_EMBEDDING,     // input copies, the embedding and its backward
    PH_ATTENTION,     // causal attention with RoPE (fused: scores, softmax, values) and its backward
    PH_DENSE_MATMUL,  // QKV, output projection, dense FFN, LM head
    PH_ROUTER,        // router matmul, affinities, TopK, gates, counts, auxiliary losses
    PH_PERMUTE,       // expert order, gather/scatter, gated combine, the expert-parallel exchange
    PH_EXPERT_GEMM,   // the routed experts' grouped GEMMs
    PH_SHARED,        // the shared experts' matmuls
    PH_ELEMENTWISE,   // RMSNorm, SwiGLU, conversions, residual copies
    PH_CLASSIFIER,    // cross-entropy and its gradient
    PH_OPTIMIZER,     // zeroing gradients, gradient norm, AdamW, bias upload
    PH_COMM,          // gradient all-reduces over the ranks
    PH_HOST,          // the device idle: waiting for the host (data, counts, the step's bookkeeping)
    PH_COUNT
} ProfilePhase;

extern const char *const profile_phase_names[PH_COUNT];

// flops (PH_COUNT) = training FLOPs per token of each phase at sequence
// length T (forward + backward = 3x forward); they sum to
// config_train_flops_per_token(c, T). Phases without model FLOPs get 0.
void profile_phase_flops(const MoeConfig *c, int T, double *flops);

// The bf16 dense peak of a GPU by its name (cudaDeviceProp.name), in TFLOP/s,
// or 0 for a GPU not in the table (then no MFU is reported).
double profile_gpu_peak_tflops(const char *gpu_name);

typedef struct {
    const char *backend;   // e.g. "gpu-bf16"
    const char *device;    // the GPU's name ("" when unknown)
    int steps;             // steps timed
    int warmup;            // steps run before timing
    double tokens_per_step;
    double step_ms;        // host clock per step
    double ms[PH_COUNT];   // device time per step of each phase
    double flops[PH_COUNT];// FLOPs per step of each phase
} ProfileReport;

// The table on f, and the same as one JSON object ({"type":"profile",...}) on
// log when log is not NULL.
void profile_print(const ProfileReport *r, FILE *f);
void profile_json(const ProfileReport *r, FILE *log);

#endif
