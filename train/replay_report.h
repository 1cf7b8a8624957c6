// moe_replay's outputs: the markdown table (stdout and summary.md), the CSV
// files for scripts/replay_plots.py, and the growth fit of the regret.
// Columns: docs/balance.md "The replay".
#ifndef MOE_REPLAY_REPORT_H
#define MOE_REPLAY_REPORT_H

#include <stdint.h>
#include <stdio.h>

#include "replay.h"

// How regret R grows with the horizon T: least-squares fits R = a + c f(T) for
// f = ln T, sqrt T, T (their R^2, and the best), and the slope of ln R against
// ln T over the horizons T >= sqrt(T_max) (0 for log, 1/2 for sqrt, 1 for
// linear growth). NaN where there are too few points (or R <= 0 for the slope).
enum { FIT_LOG, FIT_SQRT, FIT_LINEAR, FIT_NMODELS };
typedef struct {
    double r2[FIT_NMODELS];
    int best;      // the model with the largest R^2, -1 if none
    double slope;
} ReplayFit;

void replay_fit(const int64_t *T, const double *R, int n, ReplayFit *f);
const char *replay_fit_name(int model);

typedef struct {
    FILE *md, *steps, *regret, *hind; // NULL without an output folder
    int sources;
} ReplayReport;

// dir: the output folder (created if missing), or NULL for the table on out only.
int replay_report_open(ReplayReport *r, const char *dir, char *err, size_t errlen);
// One source: its table to out (and summary.md), its rows to the CSV files.
// h_log may be NULL when no setting is multiplicative; h_add may be NULL when
// the hindsight was skipped (then no regret).
void replay_report_source(ReplayReport *r, FILE *out, const ReplaySource *src, const ReplaySetting *set,
                          int n_settings, const ReplayRun *runs, const ReplayHindsight *h_add,
                          const ReplayHindsight *h_log, double replay_seconds, double replay_cpu);
// Closes the files. Returns 0, or -1 (a write failed, message in err).
int replay_report_close(ReplayReport *r, char *err, size_t errlen);

#endif
