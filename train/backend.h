// What a trainer's compute backend provides to the shared training loop
// (train/trainer.c): the CPU model (train_moe.c) and the GPU model
// (train_moe.cu) each fill one of these. The loop owns everything that is not
// compute: data, schedules, the balancing policy, logs, evaluation,
// checkpoints, sampling; so both trainers behave identically by construction.
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "../parallel/comm.h"
#include "../model/config.h"
#include "../model/dual.h"
#include "../model/moe.h"
#include "memplan.h"
#include "optim.h"
#include "options.h"

typedef struct Backend Backend;

struct Backend {
    const char *name;   // "cpu-fp32", "gpu-bf16", ...
    void *ctx;          // the backend's own state
    int64_t n_params;   // elements of the flat fp32 parameter buffer (the layout total)
    const Comm *comm;   // the ranks of this run (set by the loop before create)
    const TrainOptions *opts; // the run's options (set by the loop before create; NULL: the defaults)

    // Allocates the model for micro-batches of up to B x T tokens, with the
    // given routing behaviour. Returns 0, or -1 with a message printed.
    int (*create)(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T);
    void (*destroy)(Backend *be);

    // Parameters and AdamW moments as flat fp32 buffers in layout order
    // (n_params), whole on every rank. Under expert parallelism a rank holds
    // only its experts: get_* are collective and gather the others.
    void (*set_params)(Backend *be, const float *params);
    void (*get_params)(Backend *be, float *params);
    void (*set_opt_state)(Backend *be, const float *m, const float *v);
    void (*get_opt_state)(Backend *be, float *m, float *v);
    // The balancing biases (n_moe, E), fp32, used by every later forward.
    void (*set_bias)(Backend *be, const float *bias);

    void (*zero_grad)(Backend *be);
    // One micro-batch of tokens/targets (B, T). train = 1 also accumulates the
    // gradient of grad_scale * (loss + aux_loss). Adds to the step's
    // statistics (step_stats): the tokens routed to each expert, and the mean
    // cross-entropy and the auxiliary loss, each divided by loss_div (the
    // loop's mean over its micro-batches). The GPU backend only enqueues the
    // work: nothing waits for the device inside a micro-batch.
    void (*micro_batch)(Backend *be, const int *tokens, const int *targets, int B, int T, int train,
                        float grad_scale, double loss_div);
    // The statistics the micro-batches added since the last call, which then
    // start again from zero: counts (n_moe, E) tokens per expert, *loss and
    // *aux the sums of the micro-batches' mean cross-entropies and auxiliary
    // losses, each divided by its loss_div. Called once per step (and once
    // per evaluation); the GPU backend waits for the device here, once.
    void (*step_stats)(Backend *be, int64_t *counts, double *loss, double *aux);
    // Averages the accumulated gradient over the ranks that share each
    // parameter (all ranks, or the EDP group for experts), once per step.
    void (*sync_grads)(Backend *be);
    // The global L2 norm of the (synchronised) gradient, the same on every rank.
    float (*grad_norm)(Backend *be);
    // Scales the gradient by grad_mult (clipping), then one AdamW update with
    // learning rate lr; t is the 1-based update count.
    void (*update)(Backend *be, const AdamWConfig *opt, double lr, int64_t t, float grad_mult);
    // Logits (V) of the last position of tokens (n), n <= T (for sampling).
    void (*last_logits)(Backend *be, const int *tokens, int n, float *logits);

    // What the routing computed besides the counts (docs/balance.md, "In the
    // trainers"). route_dual adds this rank's primal-dual sums of every MoE
    // layer (model/dual.h) over the micro-batches the last step_stats read
    // into dual (n_moe accumulators of E experts and top_k, for the run's
    // bias rule); it waits for nothing (the GPU sums them on the device).
    void (*route_dual)(Backend *be, DualAccum *dual);
    // keep = 1: from the next micro-batch on, every forward keeps the scores
    // the bias is added to (the affinities, or the router logits with the bias
    // on the logits) where route_scores can read them; 0: it stops (on the GPU
    // the copy to the host then costs nothing).
    void (*keep_scores)(Backend *be, int keep);
    // MoE layer moe_idx's kept scores of the last micro-batch: scores (B T, E) fp32.
    void (*route_scores)(Backend *be, int moe_idx, float *scores);

    // Optional (NULL: no phase timers; --profile then reports the host clock
    // only). profile_start begins accumulating device time per phase
    // (train/profile.h); profile_stop ends it, writes the milliseconds of
    // each phase since the start into ms (PH_COUNT) and the device's name
    // into device (len bytes).
    void (*profile_start)(Backend *be);
    void (*profile_stop)(Backend *be, double *ms, char *device, size_t len);

    // Optional (NULL: not available): the device memory per rank that create
    // would allocate for this config and micro-batch B x T in an
    // expert-parallel group of ep ranks, by category, computed without
    // allocating and without needing a device; also the detected device, if
    // any. Returns 0, or -1 with a message.
    int (*plan_memory)(Backend *be, const MoeConfig *c, const RouteOptions *ro, int B, int T, int ep,
                       MemoryPlan *plan);
};

#endif
