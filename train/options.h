// The trainers' command line: one table of the training options (data, batch,
// steps, evaluation, checkpoints, logs, sampling), plus the options owned by
// other modules (every model field, the balancing policy, the LR schedule,
// AdamW), so `train_moe` and `train_moecu` accept exactly the same options,
// from the command line or from a file whose keys are the option names.
#ifndef MOE_OPTIONS_H
#define MOE_OPTIONS_H

#include <stdint.h>
#include <stdio.h>

#include "../model/balance.h"
#include "../model/config.h"
#include "lr.h"
#include "optim.h"

#define OPT_PATH 1024
// Steps --profile runs before it starts timing (first-call costs: cuBLASLt plans, allocations).
#define TRAINER_PROFILE_WARMUP 2
// An options file is a few kilobytes; anything beyond this is not one.
#define OPTIONS_MAX_FILE_BYTES (1 << 20)

typedef struct {
    // model
    char config[OPT_PATH];      // preset name or key=value model file
    MoeConfig model;            // the resolved model (preset/file, then field options)
    int print_config;           // print the model and exit
    int print_memory;           // print the device memory the run would use and exit
    float gpu_mem;              // GiB --print-memory fits micro-batches into (0: the device's, or 80)
    // data
    char train_data[OPT_PATH];  // glob(s) of training shards
    char val_data[OPT_PATH];    // glob(s) of validation shards ("" = none)
    char tokenizer[OPT_PATH];   // tokenizer file, for decoding samples
    // batch and steps
    int micro_batch;            // -b: sequences per micro-batch
    int64_t batch_tokens;       // tokens per optimizer step over all micro-batches and ranks
    int64_t steps;              // optimizer steps of the run
    int64_t run_steps;          // steps of this invocation before stopping (0: until steps)
    uint64_t seed;              // initialisation and data order
    int threads;                // OpenMP threads (0: the runtime's default)
    int ep;                     // expert-parallel group size (ranks sharing out the experts)
    char grouped_gemm[OPT_PATH]; // GPU expert GEMMs: "device" (offsets on the GPU) or "cublas" (on the host)
    int cuda_graph;             // GPU trainer: 1: training micro-batches captured once into a CUDA graph and replayed
    // evaluation
    int eval_every;             // steps between evaluations (0: only at the end)
    int eval_batches;           // micro-batches per evaluation (0: the whole set)
    // checkpoints
    char ckpt_dir[OPT_PATH];    // "" = no checkpoints
    int ckpt_every;             // steps between checkpoints (0: only at the end)
    int keep_last;              // checkpoints kept (0: all)
    int resume;                 // continue from the newest checkpoint in ckpt_dir
    char init_from[OPT_PATH];   // initialise parameters and biases from this checkpoint
    // logs
    char log[OPT_PATH];         // JSON-lines log file ("" = none)
    int log_loads_every;        // steps between per-layer expert counts in the log (0: never)
    int print_every;            // steps between human log lines
    // sampling
    int sample_tokens;          // tokens generated at the end of training (0: none)
    float temperature;
    int sample_top_k;           // 0: sample from the whole distribution
    char prompt[OPT_PATH];      // text to continue ("" = start from end-of-text)
    // router-score traces (train/trace.h, docs/trace.md)
    char trace_router[OPT_PATH]; // "" = none
    int trace_every;            // trace every N-th step
    int64_t trace_tokens;       // rows per traced step and layer (0: every token)
    int trace_bf16;             // store the scores as bf16
    // profiling
    int profile;                // > 0: time this many steps per phase after 2 warm-up steps, then stop
    // owned by other modules
    BalanceConfig balance;
    LrSchedule lr;
    AdamWConfig adamw;
} TrainOptions;

void options_default(TrainOptions *o);
// Parses argv (argv[0] skipped) on top of *o. `--options FILE` reads a file of
// `key = value` lines whose keys are option names without dashes prefix; later
// options override earlier ones. Prints a message naming the option and
// returns -1 on any unknown option or bad value; returns 1 after --help.
int options_parse(TrainOptions *o, int argc, char **argv, const char *prog);
// Checks the options together with the model (e.g. top_k <= n_routed, heads
// dividing d, batch_tokens a multiple of B*T*world). Returns 0, or -1 with a message.
int options_validate(const TrainOptions *o, int world, char *err, size_t errlen);
// Writes every option as key=value lines (the --options file format).
void options_write(const TrainOptions *o, FILE *f);
// The options whose values differ between `saved` (the text options_write
// wrote for an earlier run, e.g. a checkpoint's options section) and *o, as
// "name old -> new" items separated by "; " in out (truncated to outlen).
// `resume` and `init-from` are left out: they say how a run starts, not what
// it trains. Options in only one of the two count too. Returns their number.
int options_changes(const char *saved, const TrainOptions *o, char *out, size_t outlen);
// The table of effective settings printed at start.
void options_print_table(const TrainOptions *o, FILE *f);
void options_print_help(FILE *f, const char *prog);

// Micro-batches per optimizer step on each rank.
static inline int64_t options_accum_steps(const TrainOptions *o, int world) {
    return o->batch_tokens / ((int64_t)o->micro_batch * o->model.seq_len * world);
}

#endif
