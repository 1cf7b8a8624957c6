// Learning-rate schedules: the rate of every update as a function of its
// 0-based step index, and the command-line options that describe a schedule.
//
// Every schedule starts with the same linear warmup over W = warmup_steps
// updates: step s < W uses lr * (s + 1) / W, so step 0 uses lr/W and step W-1
// uses lr exactly. (W = 0: no warmup.) After warmup:
//   const      lr.
//   cosine     lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2 with
//              p = (s - W) / (total - W), clamped to [0, 1]: lr at s = W, lr_min
//              at s = total (the last update, s = total-1, is a hair above it).
//              Wang et al. 1B (arXiv 2408.15664): W 1000, lr 1e-3, lr-min 1e-4.
//   multistep  lr, then rates[i] from step steps[i] on (the change happens AT
//              the boundary: the update with 0-based index steps[i] is the first
//              to use rates[i]). Wang et al. 3B: W 2000, lr 7.8e-4,
//              lr-steps 45211,50862, lr-rates 2.47e-4,7.8e-5.
//   wsd        warmup-stable-decay: lr until the last D = round(frac * total)
//              updates, then from s0 = total - D a decay to lr_min at s = total:
//              p = (s - s0) / D clamped to [0, 1],
//              linear: lr + (lr_min - lr) * p; cosine: as the cosine schedule.
// Every schedule holds its final rate for steps past total.
#ifndef MOE_LR_H
#define MOE_LR_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum { LR_CONST, LR_COSINE, LR_MULTISTEP, LR_WSD } LrKind;
typedef enum { WSD_LINEAR, WSD_COSINE } WsdShape;

enum { LR_MAX_STAGES = 32 };  // most multistep boundaries

typedef struct {
    LrKind kind;
    double lr;                       // peak rate, reached at the end of warmup
    double lr_min;                   // final rate of cosine and wsd
    int64_t warmup_steps;            // W
    int n_steps;                     // multistep boundaries given
    int64_t steps[LR_MAX_STAGES];    // (n_steps) strictly increasing, >= W
    int n_rates;                     // multistep rates given (must equal n_steps)
    double rates[LR_MAX_STAGES];     // (n_rates) rate from steps[i] on
    double wsd_decay_frac;           // fraction of total steps spent decaying
    WsdShape wsd_shape;
} LrSchedule;

// Defaults: cosine, lr 1e-3 -> lr-min 1e-4 (Wang et al. 1B), warmup 100 (the 1B
// run used 1000; a default that long would reject every short run);
// wsd-decay-frac 0.2, wsd-decay linear.
void lr_schedule_default(LrSchedule *s);
// Keys: lr, lr-min, lr-schedule (const|cosine|multistep|wsd), warmup-steps,
// lr-steps (comma list of integers, "" for none), lr-rates (comma list),
// wsd-decay-frac, wsd-decay (linear|cosine).
// Returns 0, -1 for an unknown key, -2 for a bad value (message in err).
int lr_set_option(LrSchedule *s, const char *key, const char *value, char *err, size_t errlen);
// Checks the schedule as a whole; total_steps <= 0 skips the checks that need
// it. Returns 0 or -1 (message in err).
int lr_validate(const LrSchedule *s, int64_t total_steps, char *err, size_t errlen);
void lr_print_help(FILE *f);
// Writes the options as key=value lines that lr_set_option reads back exactly.
void lr_schedule_write(const LrSchedule *s, FILE *f);

// The rate of the update with 0-based index step, in a run of total_steps updates.
double lr_at(const LrSchedule *s, int64_t step, int64_t total_steps);

#endif
