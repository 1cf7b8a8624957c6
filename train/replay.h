// Offline replay of balancing policies (moe_replay): router scores from a trace
// or a synthetic stream are routed open-loop with the bias of each setting, the
// bias is updated by the policy code of model/balance.c, and every step's
// primal-dual quantities (model/dual.h) are recorded; the best fixed bias in
// hindsight (train/hindsight.h) turns them into regret. docs/balance.md
// "The replay".
//
// Open-loop: the scores do not react to the bias (a trace's scores are those the
// model produced under its own bias during training).
#ifndef MOE_REPLAY_H
#define MOE_REPLAY_H

#include <stdint.h>

#include "../model/balance.h"
#include "stream.h"

// The scores of one source, in memory.
typedef struct {
    char name[512];     // "trace FILE" or the stream's description
    int n_layers, E, K;
    int trace_mult;     // a trace recorded with selection on s * b
    int64_t steps;      // steps held
    int64_t tokens;     // score rows per step and layer
    float *scores;      // (n_layers, steps, tokens, E): a layer's steps are contiguous
    int64_t *step_ids;  // (steps) the recorded steps (0..steps-1 for a stream)
    float *bias;        // (steps, n_layers, E) the bias that routed each step; NULL for a stream
    int64_t run_steps;  // the traced run's total optimizer steps (0 unknown)
    int updates_per_step; // bias updates per optimizer step of the traced run (1; its
                          // micro-batches with --bias-update-every micro): step_ids count updates
    int repeated;       // every step is the same batch (a --repeat stream)
} ReplaySource;

// Reads a whole trace (at most max_steps steps when > 0). Returns 0, or -1 with
// a message naming the file.
int replay_source_trace(ReplaySource *src, const char *path, int allow_unfinished, int64_t max_steps,
                        char *err, size_t errlen);
// Generates a stream (multithreaded; the same scores for any thread count).
// The deterministic setting from a real batch: the source's first step,
// repeated `steps` times (moe_replay --trace FILE --repeat 1 --steps N); the
// trace's own biases are dropped (--bias-start trace then has nothing to start from).
void replay_source_repeat_first(ReplaySource *src, int64_t steps);
void replay_source_stream(ReplaySource *src, const StreamConfig *c);
void replay_source_free(ReplaySource *src);

// The hindsight side of a source in one score space (s, or log s for the
// multiplicative rule), summed over layers: at horizons T_j (the first T_j
// steps) the certified bounds of min_b sum_{t < T_j} D_t(b), and for every step
// D_t(b*) at the bias b* of the longest horizon (the per-step comparator).
typedef struct {
    int log_space;
    int n_h;
    int64_t *T;           // (n_h) increasing, the last = steps
    double *upper;        // (n_h) sum over layers of F(b*_T)
    double *lower;        // (n_h) sum over layers of a feasible assignment's value
    double *dual_star;    // (steps) sum over layers of D_t(b*) at the last horizon
    double *b_star;       // (n_layers, E) b* of the last horizon (log b for log space)
    double seconds;
} ReplayHindsight;

// n_h log-spaced horizons 1 .. steps (fewer when steps is small). Returns 0 or -1
// (a solver failure, message on stderr).
int replay_hindsight(const ReplaySource *src, int log_space, int n_h, ReplayHindsight *h);
void replay_hindsight_free(ReplayHindsight *h);

typedef struct {
    BalanceConfig cfg;
    char label[128];  // e.g. "sign/const/g=0.001"
} ReplaySetting;

// One setting over one source: per step t (0-based within the source).
typedef struct {
    int64_t steps;
    int n_layers, E;
    float *gamma;       // (steps) the step size the schedule gave
    double *maxvio;     // (steps) MaxVio averaged over layers
    double *dual;       // (steps) D_t(b_t) summed over layers (log space for mult)
    double *primal;     // (steps) summed over layers
    double *subgrad_l1; // (steps) sum over layers of |c - C|_1
    double *moved_frac; // (steps) moved slots / (K N), averaged over layers
    double *from_over;  // (steps) moved slots taken from experts overloaded at b = 0 (pooled); NaN: none
    double *to_under;   // (steps) moved slots given to experts underloaded at b = 0 (pooled)
    float *bias;        // (steps + 1, n_layers, E) bias[t] routed step t; bias[steps] the final one
    double bias_vs_trace; // max |bias[t] - the trace's bias of step t| (NaN for a stream)
} ReplayRun;

typedef struct {
    int64_t first_step;  // the source's first step, in its own units (updates); the schedule's
                         // step of source step t is (first_step + t) / updates_per_step
    int64_t total_steps; // T for cosine / stop (<= 0: the source's steps)
    int bias_from_trace; // start from the trace's first recorded bias instead of the init value
} ReplayOptions;

// Runs every setting over the source, in parallel (settings x layers x token
// chunks per step). Returns 0, or -1 with a message (e.g. a bias start the
// source cannot give).
int replay_run(const ReplaySource *src, const ReplaySetting *settings, int n_settings,
               const ReplayOptions *opt, ReplayRun *runs, char *err, size_t errlen);
void replay_run_free(ReplayRun *r);

// Writes the source as a trace (docs/trace.md) as if a run had used `run`'s
// bias: per step and layer every score row, the bias that routed the step in
// `run`, and the counts that bias gives. bf16: store the scores as bf16.
// Returns 0, or -1 with a message naming the file.
int replay_save_trace(const ReplaySource *src, const ReplaySetting *setting, const ReplayRun *run,
                      const char *path, int bf16, char *err, size_t errlen);

#endif
