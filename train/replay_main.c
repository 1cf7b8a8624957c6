// moe_replay: runs balancing policies offline over router-score traces or
// synthetic streams, with the primal-dual quantities and the regret against the
// best fixed bias in hindsight. Every balance option of the trainers takes a
// comma-separated list; the grid of settings is their product. docs/balance.md
// "The replay".
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../model/balance.h"
#include "../util/util.h"
#include "replay.h"
#include "replay_report.h"
#include "stream.h"

enum { MAX_LIST = 64 }; // values of one listed option, sources, balance keys

static void usage(FILE *f) {
    fprintf(f,
            "usage: moe_replay (--trace FILE[,FILE...] | --stream KIND[,KIND...]) [options]\n"
            "\n"
            "Routes router scores open-loop with the bias of every setting, updating it\n"
            "with the trainers' own policy code (model/balance.c), and reports per step\n"
            "MaxVio, the dual value D(b_t), the moved token slots, and the regret against\n"
            "the best fixed bias in hindsight (solved with a certified duality gap).\n"
            "\n"
            "Sources:\n"
            "  --trace FILE[,FILE...]  router-score traces (docs/trace.md)\n"
            "  --trace-unfinished      accept a trace without its end record (a stopped run)\n"
            "  --max-steps N           read at most N steps of each trace (default: all)\n"
            "  --stream KIND[,KIND...] synthetic streams: stationary, drift, zipf, adversarial\n"
            "  --steps N               stream steps (400)\n"
            "  --tokens N              stream tokens per step (2048)\n"
            "  --experts E             (64)\n"
            "  --top-k K               (6)\n"
            "  --layers L              independent MoE layers (1)\n"
            "  --seed S                (1)\n"
            "  --noise X               std of the token logit noise (1)\n"
            "  --pref X                scale of the preferences of stationary, drift, adversarial (1)\n"
            "  --zipf-a A[,A...]       zipf exponent(s); each gives its own zipf stream (1)\n"
            "  --drift-period P        drift: steps per cycle (200)\n"
            "  --alt-period P          adversarial: steps between flips (1)\n"
            "  --repeat 0|1            1: every step is step 0's batch (the deterministic setting);\n"
            "                          with --trace: the trace's first step, --steps times\n"
            "\n"
            "Settings (each option a comma-separated list; the grid is their product):\n"
            "  --balance none|alf|alf+seqaux   (alf+seqaux replays its bias; aux and seqaux act\n"
            "                                   through gradients and cannot be replayed)\n"
            "  --gamma-rule, --gamma, --gamma-schedule, --gamma-tau, --gamma-min,\n"
            "  --gamma-stop-frac, --gamma-center  as in the trainers (below)\n"
            "\n"
            "Replay:\n"
            "  --first-step N          the schedule's step t of the first replayed step\n"
            "                          (default: the trace's first recorded step; 0 for a stream)\n"
            "  --total-steps N         T of the cosine and stop schedules (default: the trace's\n"
            "                          run length if recorded, else the replayed steps)\n"
            "  --bias-start init|trace start from the init value (default) or the trace's first bias\n"
            "  --horizons N            hindsight horizons, log-spaced up to T (12); 0: no regret\n"
            "  --threads N             OpenMP threads (default: all cores)\n"
            "  --out DIR               summary.md, steps.csv, regret.csv, hindsight.csv\n"
            "  --save-trace FILE       write the (single) source as a trace, with the bias and the\n"
            "                          counts of the first setting as if a run had used it\n"
            "  --save-trace-dtype fp32|bf16  (fp32)\n"
            "                          (plots: python3 scripts/replay_plots.py DIR)\n"
            "  --help\n\n");
    balance_print_help(f);
}

// Splits a comma-separated list (in place) into out, which has room for `room`.
// Returns the pieces, or -1 (with a message) when there are too many.
static int split_list(const char *opt, char *s, char **out, int room) {
    int n = 0;
    for (char *p = strtok(s, ","); p; p = strtok(NULL, ",")) {
        if (n == room) {
            fprintf(stderr, "error: %s: more than %d values\n", opt, MAX_LIST);
            return -1;
        }
        out[n++] = p;
    }
    return n;
}

static int parse_i64(const char *opt, const char *v, int64_t lo, int64_t *out) {
    char *end = NULL;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (end == v || *end || errno || x < lo) {
        fprintf(stderr, "error: %s: expected an integer >= %lld, got '%s'\n", opt, (long long)lo, v);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_int(const char *opt, const char *v, int lo, int hi, int *out) {
    int64_t x;
    if (parse_i64(opt, v, lo, &x)) return -1;
    if (x > hi) {
        fprintf(stderr, "error: %s: expected an integer <= %d, got '%s'\n", opt, hi, v);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int parse_real(const char *opt, const char *v, double lo, int lo_open, double *out) {
    char *end = NULL;
    errno = 0;
    double x = strtod(v, &end);
    if (end == v || *end || errno || !isfinite(x) || x < lo || (lo_open && x == lo)) {
        fprintf(stderr, "error: %s: expected a number %s %g, got '%s'\n", opt, lo_open ? ">" : ">=", lo, v);
        return -1;
    }
    *out = x;
    return 0;
}

// A short name for a setting, from the options that differ from the defaults
// of its method and schedule.
static void setting_label(const BalanceConfig *c, char *buf, size_t len) {
    if (!balance_uses_bias(c)) {
        snprintf(buf, len, "none");
        return;
    }
    int n = snprintf(buf, len, "%s/%s/g=%g", balance_rule_name(c), balance_schedule_name(c), c->gamma);
    const char *sched = balance_schedule_name(c);
    if (n > 0 && (size_t)n < len) {
        if (!strcmp(sched, "inv") || !strcmp(sched, "invsqrt"))
            n += snprintf(buf + n, len - (size_t)n, "/tau=%g", c->gamma_tau);
        else if (!strcmp(sched, "cosine"))
            n += snprintf(buf + n, len - (size_t)n, "/min=%g", c->gamma_min);
        else if (!strcmp(sched, "stop"))
            n += snprintf(buf + n, len - (size_t)n, "/frac=%g", c->gamma_stop_frac);
    }
    if (c->center && n > 0 && (size_t)n < len) snprintf(buf + n, len - (size_t)n, "/center");
}

int main(int argc, char **argv) {
    char *traces[MAX_LIST], *kinds[MAX_LIST], *zipf[MAX_LIST];
    int n_traces = 0, n_kinds = 0, n_zipf = 0;
    char *bal_key[MAX_LIST], *bal_val[MAX_LIST][MAX_LIST];
    int n_bal = 0, bal_n[MAX_LIST];
    StreamConfig sc;
    stream_config_default(&sc);
    int64_t max_steps = 0, first_step = -1, total_steps = 0, horizons = 12, threads = 0, seed;
    int unfinished = 0, bias_from_trace = 0;
    const char *out_dir = NULL, *save_trace = NULL;
    int save_bf16 = 0;
    char err[1024];

    for (int i = 1; i < argc; i++) {
        char *key = argv[i], *val = NULL;
        if (!strcmp(key, "--help") || !strcmp(key, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(key, "--trace-unfinished")) {
            unfinished = 1;
            continue;
        }
        if (strncmp(key, "--", 2) != 0) {
            fprintf(stderr, "error: unexpected argument '%s' (see --help)\n", key);
            return 2;
        }
        char *eq = strchr(key, '=');
        if (eq) {
            *eq = '\0';
            val = eq + 1;
        } else if (i + 1 < argc) {
            val = argv[++i];
        } else {
            fprintf(stderr, "error: %s needs a value\n", key);
            return 2;
        }
        int bad = 0;
        int got = 0; // values of a listed option, -1 for too many
        if (!strcmp(key, "--trace")) {
            bad = (got = split_list(key, val, traces + n_traces, MAX_LIST - n_traces)) < 0;
            n_traces += got;
        } else if (!strcmp(key, "--stream")) bad = (n_kinds = split_list(key, val, kinds, MAX_LIST)) < 0;
        else if (!strcmp(key, "--zipf-a")) bad = (n_zipf = split_list(key, val, zipf, MAX_LIST)) < 0;
        else if (!strcmp(key, "--max-steps")) bad = parse_i64(key, val, 1, &max_steps);
        else if (!strcmp(key, "--steps")) bad = parse_i64(key, val, 1, &sc.steps);
        else if (!strcmp(key, "--tokens")) bad = parse_i64(key, val, 1, &sc.tokens);
        else if (!strcmp(key, "--experts")) bad = parse_int(key, val, 1, 4096, &sc.E);
        else if (!strcmp(key, "--top-k")) bad = parse_int(key, val, 1, 4096, &sc.K);
        else if (!strcmp(key, "--layers")) bad = parse_int(key, val, 1, 4096, &sc.n_layers);
        else if (!strcmp(key, "--seed")) {
            bad = parse_i64(key, val, 0, &seed);
            sc.seed = (uint64_t)seed;
        }
        else if (!strcmp(key, "--noise")) bad = parse_real(key, val, 0.0, 0, &sc.noise);
        else if (!strcmp(key, "--pref")) bad = parse_real(key, val, 0.0, 0, &sc.pref);
        else if (!strcmp(key, "--drift-period")) bad = parse_real(key, val, 0.0, 1, &sc.period);
        else if (!strcmp(key, "--alt-period")) bad = parse_i64(key, val, 1, &sc.alt_period);
        else if (!strcmp(key, "--repeat")) bad = parse_int(key, val, 0, 1, &sc.repeat);
        else if (!strcmp(key, "--first-step")) bad = parse_i64(key, val, 0, &first_step);
        else if (!strcmp(key, "--total-steps")) bad = parse_i64(key, val, 1, &total_steps);
        else if (!strcmp(key, "--horizons")) bad = parse_i64(key, val, 0, &horizons);
        else if (!strcmp(key, "--threads")) bad = parse_i64(key, val, 0, &threads);
        else if (!strcmp(key, "--out")) out_dir = val;
        else if (!strcmp(key, "--save-trace")) save_trace = val;
        else if (!strcmp(key, "--save-trace-dtype")) {
            save_bf16 = !strcmp(val, "bf16");
            if (!save_bf16 && strcmp(val, "fp32") != 0) {
                fprintf(stderr, "error: --save-trace-dtype: expected fp32 or bf16, got '%s'\n", val);
                bad = 1;
            }
        }
        else if (!strcmp(key, "--bias-start")) {
            if (!strcmp(val, "init")) bias_from_trace = 0;
            else if (!strcmp(val, "trace")) bias_from_trace = 1;
            else {
                fprintf(stderr, "error: --bias-start: expected init or trace, got '%s'\n", val);
                bad = 1;
            }
        } else if (balance_has_option(key)) {
            if (n_bal == MAX_LIST) FATAL("too many balance options");
            bal_key[n_bal] = key;
            if ((bal_n[n_bal] = split_list(key, val, bal_val[n_bal], MAX_LIST)) < 0) return 2;
            // Check every value now, so that a typo is reported before any work.
            BalanceConfig scratch;
            balance_config_default(&scratch);
            for (int k = 0; k < bal_n[n_bal] && !bad; k++)
                if (balance_set_option(&scratch, key, bal_val[n_bal][k], err, sizeof(err)) != 0) {
                    fprintf(stderr, "error: %s\n", err);
                    bad = 1;
                }
            if (bal_n[n_bal] == 0) {
                fprintf(stderr, "error: %s: empty list\n", key);
                bad = 1;
            }
            n_bal++;
        } else {
            fprintf(stderr, "error: unknown option %s (see --help)\n", key);
            return 2;
        }
        if (bad) return 2;
    }
    if (n_traces == 0 && n_kinds == 0) {
        fprintf(stderr, "error: give --trace FILE or --stream KIND (see --help)\n");
        return 2;
    }
    if (sc.K > sc.E) {
        fprintf(stderr, "error: --top-k %d exceeds --experts %d\n", sc.K, sc.E);
        return 2;
    }
    if (threads > 0) omp_set_num_threads((int)threads);

    // The grid: the product of every listed balance option.
    int n_set = 1;
    for (int k = 0; k < n_bal; k++) {
        if (n_set > 100000 / bal_n[k]) {
            fprintf(stderr, "error: the grid has more than 100000 settings\n");
            return 2;
        }
        n_set *= bal_n[k];
    }
    ReplaySetting *set = xcalloc((size_t)n_set, sizeof(ReplaySetting));
    int any_mult = 0;
    for (int s = 0; s < n_set; s++) {
        balance_config_default(&set[s].cfg);
        for (int k = 0, rest = s; k < n_bal; rest /= bal_n[k], k++)
            balance_set_option(&set[s].cfg, bal_key[k], bal_val[k][rest % bal_n[k]], err, sizeof(err));
        int aux = balance_aux_kind(&set[s].cfg) != 0; // 0: no auxiliary loss
        if (aux && !balance_uses_bias(&set[s].cfg)) {
            fprintf(stderr, "error: --balance %s acts through gradients and cannot be replayed offline\n",
                    balance_method_name(&set[s].cfg));
            return 2;
        }
        if (balance_validate(&set[s].cfg, err, sizeof(err)) != 0) {
            fprintf(stderr, "error: %s\n", err);
            return 2;
        }
        setting_label(&set[s].cfg, set[s].label, sizeof(set[s].label));
        any_mult |= balance_bias_is_multiplicative(&set[s].cfg);
    }

    // The sources: every trace, every stream kind (zipf once per exponent).
    StreamConfig streams[MAX_LIST * MAX_LIST];
    int n_streams = 0;
    for (int k = 0; k < n_kinds; k++) {
        int kind = stream_kind_from_name(kinds[k]);
        if (kind < 0) {
            fprintf(stderr, "error: --stream: unknown kind '%s' (stationary, drift, zipf, adversarial)\n", kinds[k]);
            return 2;
        }
        int reps = kind == STREAM_ZIPF && n_zipf > 0 ? n_zipf : 1;
        for (int z = 0; z < reps; z++) {
            StreamConfig c = sc;
            c.kind = (StreamKind)kind;
            if (kind == STREAM_ZIPF && n_zipf > 0 && parse_real("--zipf-a", zipf[z], 0.0, 0, &c.zipf_a)) return 2;
            streams[n_streams++] = c;
        }
    }

    if (save_trace && n_traces + n_streams != 1) {
        fprintf(stderr, "error: --save-trace needs exactly one source (got %d)\n", n_traces + n_streams);
        return 2;
    }
    // Refused again, atomically, when written; this spares the work before.
    FILE *exists = save_trace ? fopen(save_trace, "rb") : NULL;
    if (exists) {
        fclose(exists);
        fprintf(stderr, "error: --save-trace %s: the file exists (remove it or choose another name)\n", save_trace);
        return 2;
    }

    ReplayReport rep;
    if (replay_report_open(&rep, out_dir, err, sizeof(err)) != 0) {
        fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    int rc = 0;
    for (int k = 0; k < n_traces + n_streams && rc == 0; k++) {
        ReplaySource src;
        double t0 = omp_get_wtime();
        if (k < n_traces) {
            if (replay_source_trace(&src, traces[k], unfinished, max_steps, err, sizeof(err)) != 0) {
                fprintf(stderr, "error: %s\n", err);
                rc = 1;
                break;
            }
            if (sc.repeat) replay_source_repeat_first(&src, sc.steps);
        } else {
            replay_source_stream(&src, &streams[k - n_traces]);
        }
        fflush(stdout);
        fprintf(stderr, "%s: %lld steps x %lld tokens x %d layers (%.0f MB) in %.2f s\n", src.name,
                (long long)src.steps, (long long)src.tokens, src.n_layers,
                (double)src.steps * src.tokens * src.n_layers * src.E * 4 / 1e6, omp_get_wtime() - t0);
        ReplayHindsight h_add, h_log;
        int have_add = 0, have_log = 0;
        if (horizons > 0) {
            for (int space = 0; space < 2 && rc == 0; space++) {
                int needed = space == 0 ? 1 : any_mult;
                if (!needed) continue;
                ReplayHindsight *h = space == 0 ? &h_add : &h_log;
                if (replay_hindsight(&src, space, (int)horizons, h) != 0) {
                    fprintf(stderr, "error: %s: the hindsight solver failed\n", src.name);
                    rc = 1;
                    break;
                }
                if (space == 0) have_add = 1;
                else have_log = 1;
            }
        }
        ReplayRun *runs = xcalloc((size_t)n_set, sizeof(ReplayRun));
        ReplayOptions ro = {first_step >= 0 ? first_step : src.step_ids[0],
                            total_steps > 0 ? total_steps : src.run_steps, bias_from_trace};
        double t1 = omp_get_wtime();
        clock_t c1 = clock();
        if (rc == 0 && replay_run(&src, set, n_set, &ro, runs, err, sizeof(err)) != 0) {
            fprintf(stderr, "error: %s\n", err);
            rc = 1;
        }
        if (rc == 0 && save_trace &&
            replay_save_trace(&src, &set[0], &runs[0], save_trace, save_bf16, err, sizeof(err)) != 0) {
            fprintf(stderr, "error: %s\n", err);
            for (int s = 0; s < n_set; s++) replay_run_free(&runs[s]);
            rc = 1;
        } else if (rc == 0) {
            replay_report_source(&rep, stdout, &src, set, n_set, runs, have_add ? &h_add : NULL,
                                 have_log ? &h_log : NULL, omp_get_wtime() - t1,
                                 (double)(clock() - c1) / CLOCKS_PER_SEC);
            for (int s = 0; s < n_set; s++) replay_run_free(&runs[s]);
        }
        free(runs);
        if (have_add) replay_hindsight_free(&h_add);
        if (have_log) replay_hindsight_free(&h_log);
        replay_source_free(&src);
    }
    if (replay_report_close(&rep, err, sizeof(err)) != 0) {
        fprintf(stderr, "error: %s\n", err);
        rc = 1;
    }
    free(set);
    return rc;
}
