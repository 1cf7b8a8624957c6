// moe_replay's outputs (train/replay_report.h).
#include "replay_report.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>
#include <sys/stat.h>

#include "../util/util.h"

static const char *const fit_names[FIT_NMODELS] = {"log T", "sqrt T", "T"};
const char *replay_fit_name(int model) { return model >= 0 && model < FIT_NMODELS ? fit_names[model] : "-"; }

// R^2 of the least-squares line y = a + c x.
static double r_squared(const double *x, const double *y, int n) {
    double mx = 0, my = 0;
    for (int i = 0; i < n; i++) mx += x[i] / n, my += y[i] / n;
    double sxx = 0, sxy = 0, syy = 0;
    for (int i = 0; i < n; i++) {
        sxx += (x[i] - mx) * (x[i] - mx);
        sxy += (x[i] - mx) * (y[i] - my);
        syy += (y[i] - my) * (y[i] - my);
    }
    if (!(sxx > 0) || !(syy > 0)) return NAN;
    return sxy * sxy / (sxx * syy);
}

void replay_fit(const int64_t *T, const double *R, int n, ReplayFit *f) {
    double *x = xmalloc(sizeof(double) * (size_t)(n + 1)), *y = xmalloc(sizeof(double) * (size_t)(n + 1));
    f->best = -1;
    for (int m = 0; m < FIT_NMODELS; m++) {
        for (int i = 0; i < n; i++) {
            double t = (double)T[i];
            x[i] = m == FIT_LOG ? log(t) : m == FIT_SQRT ? sqrt(t) : t;
            y[i] = R[i];
        }
        f->r2[m] = n >= 3 ? r_squared(x, y, n) : NAN;
        if (!isnan(f->r2[m]) && (f->best < 0 || f->r2[m] > f->r2[f->best])) f->best = m;
    }
    // The log-log slope over the upper half of the horizons (on a log scale).
    int k = 0;
    double tmax = (double)T[n - 1];
    for (int i = 0; i < n; i++)
        if ((double)T[i] >= sqrt(tmax) && R[i] > 0) {
            x[k] = log((double)T[i]);
            y[k] = log(R[i]);
            k++;
        }
    f->slope = NAN;
    if (k >= 2) {
        double mx = 0, my = 0, sxx = 0, sxy = 0;
        for (int i = 0; i < k; i++) mx += x[i] / k, my += y[i] / k;
        for (int i = 0; i < k; i++) sxx += (x[i] - mx) * (x[i] - mx), sxy += (x[i] - mx) * (y[i] - my);
        if (sxx > 0) f->slope = sxy / sxx;
    }
    free(x), free(y);
}

int replay_report_open(ReplayReport *r, const char *dir, char *err, size_t errlen) {
    memset(r, 0, sizeof(*r));
    if (!dir) return 0;
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) {
        util_set_err(err, errlen, "--out %s: cannot create the folder: %s", dir, strerror(errno));
        return -1;
    }
    const char *names[4] = {"summary.md", "steps.csv", "regret.csv", "hindsight.csv"};
    FILE **files[4] = {&r->md, &r->steps, &r->regret, &r->hind};
    for (int i = 0; i < 4; i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        if (!(*files[i] = fopen(path, "w"))) {
            util_set_err(err, errlen, "%s: cannot create: %s", path, strerror(errno));
            for (int j = 0; j < i; j++) fclose(*files[j]);
            memset(r, 0, sizeof(*r));
            return -1;
        }
    }
    fprintf(r->steps, "source,setting,step,gamma,maxvio,dual,primal,subgrad_l1,moved_frac,from_over,to_under,"
                      "regret_vs_final\n");
    fprintf(r->regret, "source,setting,T,regret,regret_max,hindsight_upper,hindsight_lower\n");
    fprintf(r->hind, "source,space,T,upper,lower,rel_gap\n");
    return 0;
}

// The mean of v over [from, to), NaNs skipped.
static double mean_of(const double *v, int64_t from, int64_t to) {
    double s = 0;
    int64_t k = 0;
    for (int64_t i = from; i < to; i++)
        if (!isnan(v[i])) s += v[i], k++;
    return k ? s / (double)k : NAN;
}

// Writes one table line to out and, when open, to summary.md.
static void both(ReplayReport *r, FILE *out, const char *fmt, ...) UTIL_PRINTF(3, 4);
static void both(ReplayReport *r, FILE *out, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(out, fmt, ap);
    va_end(ap);
    if (r->md) {
        va_start(ap, fmt);
        vfprintf(r->md, fmt, ap);
        va_end(ap);
    }
}

static void hindsight_rows(ReplayReport *r, const ReplaySource *src, const ReplayHindsight *h) {
    if (!r->hind || !h) return;
    for (int j = 0; j < h->n_h; j++)
        fprintf(r->hind, "\"%s\",%s,%lld,%.17g,%.17g,%.3e\n", src->name, h->log_space ? "log" : "linear",
                (long long)h->T[j], h->upper[j], h->lower[j], (h->upper[j] - h->lower[j]) / fabs(h->upper[j]));
}

static double max_rel_gap(const ReplayHindsight *h) {
    double g = 0;
    for (int j = 0; j < h->n_h; j++) g = fmax(g, (h->upper[j] - h->lower[j]) / fabs(h->upper[j]));
    return g;
}

void replay_report_source(ReplayReport *r, FILE *out, const ReplaySource *src, const ReplaySetting *set,
                          int n_settings, const ReplayRun *runs, const ReplayHindsight *h_add,
                          const ReplayHindsight *h_log, double replay_seconds, double replay_cpu) {
    int64_t T = src->steps;
    both(r, out,
         "\n### %s\n\n%lld steps x %lld tokens x %d MoE layers, E = %d, K = %d; replay of %d setting(s): %.2f s "
         "(%.2f s CPU)\n",
         src->name, (long long)T, (long long)src->tokens, src->n_layers, src->E, src->K, n_settings, replay_seconds,
         replay_cpu);
    const ReplayHindsight *hs[2] = {h_add, h_log};
    for (int k = 0; k < 2; k++)
        if (hs[k])
            both(r, out, "hindsight (%s scores): %d horizons up to T = %lld, largest relative duality gap %.1e, %.2f s\n",
                 hs[k]->log_space ? "log" : "linear", hs[k]->n_h, (long long)T, max_rel_gap(hs[k]), hs[k]->seconds);
    both(r, out, "\n| setting | MaxVio (last 10%%) | R(T) | R(T)/T | slope ln R / ln T | best fit (R^2 log / sqrt / lin) "
                 "| moved slots | from overloaded | to underloaded |%s\n",
         src->bias ? " bias vs trace |" : "");
    both(r, out, "|---|---|---|---|---|---|---|---|---|%s\n", src->bias ? "---|" : "");
    hindsight_rows(r, src, h_add);
    hindsight_rows(r, src, h_log);
    for (int k = 0; k < n_settings; k++) {
        const ReplayRun *run = &runs[k];
        const ReplayHindsight *h = balance_bias_is_multiplicative(&set[k].cfg) ? h_log : h_add;
        char reg[64] = "-", per[64] = "-", slope[32] = "-", fit[96] = "-";
        if (h) {
            double *R = xmalloc(sizeof(double) * (size_t)h->n_h);
            double cum = 0;
            int64_t t = 0;
            for (int j = 0; j < h->n_h; j++) {
                for (; t < h->T[j]; t++) cum += run->dual[t];
                R[j] = cum - h->upper[j];
                if (r->regret)
                    fprintf(r->regret, "\"%s\",%s,%lld,%.10g,%.10g,%.17g,%.17g\n", src->name, set[k].label,
                            (long long)h->T[j], R[j], cum - h->lower[j], h->upper[j], h->lower[j]);
            }
            ReplayFit f;
            replay_fit(h->T, R, h->n_h, &f);
            snprintf(reg, sizeof(reg), "%.4g", R[h->n_h - 1]);
            snprintf(per, sizeof(per), "%.4g", R[h->n_h - 1] / (double)T);
            if (!isnan(f.slope)) snprintf(slope, sizeof(slope), "%.2f", f.slope);
            if (f.best >= 0)
                snprintf(fit, sizeof(fit), "%s (%.3f / %.3f / %.3f)", replay_fit_name(f.best), f.r2[FIT_LOG],
                         f.r2[FIT_SQRT], f.r2[FIT_LINEAR]);
            free(R);
        }
        char vs[48] = "";
        if (src->bias) snprintf(vs, sizeof(vs), " %.3g |", run->bias_vs_trace);
        both(r, out, "| %s | %.4f | %s | %s | %s | %s | %.2f%% | %.3f | %.3f |%s\n", set[k].label,
             mean_of(run->maxvio, T - (T + 9) / 10, T), reg, per, slope, fit, 100.0 * mean_of(run->moved_frac, 0, T),
             mean_of(run->from_over, 0, T), mean_of(run->to_under, 0, T), vs);
        if (r->steps) {
            double cum = 0;
            for (int64_t t = 0; t < T; t++) {
                if (h) cum += run->dual[t] - h->dual_star[t];
                fprintf(r->steps, "\"%s\",%s,%lld,%.9g,%.6g,%.12g,%.12g,%.6g,%.6g,%.4f,%.4f,", src->name, set[k].label,
                        (long long)src->step_ids[t], run->gamma[t], run->maxvio[t], run->dual[t], run->primal[t],
                        run->subgrad_l1[t], run->moved_frac[t], run->from_over[t], run->to_under[t]);
                if (h) fprintf(r->steps, "%.10g\n", cum);
                else fprintf(r->steps, "\n");
            }
        }
    }
    r->sources++;
}

int replay_report_close(ReplayReport *r, char *err, size_t errlen) {
    int rc = 0;
    FILE **files[4] = {&r->md, &r->steps, &r->regret, &r->hind};
    for (int i = 0; i < 4; i++)
        if (*files[i] && (ferror(*files[i]) | fclose(*files[i])) != 0) rc = -1;
    if (rc) util_set_err(err, errlen, "writing the replay's output files failed");
    memset(r, 0, sizeof(*r));
    return rc;
}
