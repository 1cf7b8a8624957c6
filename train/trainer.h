// The training loop shared by the CPU and GPU trainers: data, gradient
// accumulation, AdamW and the LR schedule, the balancing update, logs,
// evaluation, checkpoints and resume, signals, and sampling. The compute comes
// from a Backend (train/backend.h).
#ifndef MOE_TRAINER_H
#define MOE_TRAINER_H

#include "backend.h"
#include "options.h"

// Runs a whole training run as the options say. Returns the process exit code
// (0 on success, also after SIGINT/SIGTERM with a checkpoint written).
int trainer_run(const TrainOptions *o, Backend *be);

// Loads a checkpoint's parameters and biases into a backend and generates
// text (the `sample` command). Returns the exit code.
int trainer_sample_from_checkpoint(const TrainOptions *o, Backend *be, const char *ckpt_path);

// The main() of both trainers: parses the options, then trains, prints the
// config, or samples (`PROG sample --ckpt FILE [options]`).
int trainer_main(int argc, char **argv, const char *prog, Backend *be);

#endif
