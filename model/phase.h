// The phases of a training step that `--profile` attributes time to
// (docs/gpu.md, "Profiling"), shared by both trainers, and the CPU model's
// phase timer: phase_mark(p) charges the host time since the previous mark
// to the phase then current and makes p current. The GPU trainer marks the
// same boundaries with CUDA events (kernels/profiler.cuh).
#ifndef MOE_PHASE_H
#define MOE_PHASE_H

typedef enum {
    PH_EMBEDDING,     // input copies, the embedding and its backward
    PH_ATTENTION,     // causal attention (scores, softmax, values; on the GPU with RoPE, fused) and its backward
    PH_DENSE_MATMUL,  // QKV, output projection, dense FFN, LM head
    PH_ROUTER,        // router matmul, affinities, TopK, gates, counts, auxiliary losses
    PH_PERMUTE,       // expert order, gather/scatter, gated combine, the expert-parallel exchange
    PH_EXPERT_GEMM,   // the routed experts' grouped GEMMs
    PH_SHARED,        // the shared experts' matmuls
    PH_ELEMENTWISE,   // RMSNorm, SwiGLU, conversions, residual copies (and RoPE on the CPU)
    PH_CLASSIFIER,    // cross-entropy and its gradient
    PH_OPTIMIZER,     // zeroing gradients, gradient norm, AdamW, bias upload
    PH_COMM,          // gradient all-reduces over the ranks
    PH_HOST,          // the device idle: waiting for the host (data, counts, the step's bookkeeping)
    PH_COUNT
} ProfilePhase;

// Marks are made by the thread that drives the model, outside parallel
// regions; they cost one branch while the timer is off (an ordinary run).
void phase_timer_start(void);            // the clock starts in PH_HOST
void phase_mark(ProfilePhase p);
void phase_timer_stop(double *ms);       // ms (PH_COUNT): milliseconds per phase since the start

#endif
