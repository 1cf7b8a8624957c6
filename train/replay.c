// The replay engine: sources in memory, the hindsight solves, and the open-loop
// runs of the settings (train/replay.h).
#include "replay.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/dual.h"
#include "../util/util.h"
#include "hindsight.h"
#include "trace.h"

// ---------------------------------------------------------------- sources

int replay_source_trace(ReplaySource *src, const char *path, int allow_unfinished, int64_t max_steps,
                        char *err, size_t errlen) {
    memset(src, 0, sizeof(*src));
    TraceReader *r = trace_reader_open(path, allow_unfinished, err, errlen);
    if (!r) return -1;
    const TraceHeader *h = trace_reader_header(r);
    int L = h->n_layers, E = h->E;
    int64_t M = h->sample;
    snprintf(src->name, sizeof(src->name), "trace %s", path);
    src->n_layers = L;
    src->E = E;
    src->K = h->K;
    src->trace_mult = (h->flags & TRACE_MULT) != 0;
    src->tokens = M;
    src->run_steps = h->run_steps;
    src->updates_per_step = h->updates_per_step;
    // Records are read step by step into per-step buffers, then laid out by layer.
    int64_t cap = 64, steps = 0;
    float *by_step = xmalloc(sizeof(float) * (size_t)(cap * L * M * E)); // (cap, L, M, E)
    src->step_ids = xmalloc(sizeof(int64_t) * (size_t)cap);
    src->bias = xmalloc(sizeof(float) * (size_t)(cap * L * E));
    TraceRecord rec;
    int rc;
    while ((max_steps <= 0 || steps < max_steps) && (rc = trace_next(r, &rec, err, errlen)) == 1) {
        if (rec.layer == 0 && steps == cap) {
            cap *= 2;
            by_step = xrealloc(by_step, sizeof(float) * (size_t)(cap * L * M * E));
            src->step_ids = xrealloc(src->step_ids, sizeof(int64_t) * (size_t)cap);
            src->bias = xrealloc(src->bias, sizeof(float) * (size_t)(cap * L * E));
        }
        memcpy(by_step + ((steps * L + rec.layer) * M) * E, rec.scores, sizeof(float) * (size_t)(M * E));
        memcpy(src->bias + (steps * L + rec.layer) * E, rec.bias, sizeof(float) * (size_t)E);
        src->step_ids[steps] = rec.step;
        if (rec.layer == L - 1) steps++; // a step counts once all its layers are in
    }
    if (max_steps <= 0 || steps < max_steps) {
        if (rc < 0) {
            trace_reader_close(r);
            free(by_step);
            replay_source_free(src);
            return -1;
        }
    }
    trace_reader_close(r);
    if (steps == 0) {
        util_set_err(err, errlen, "%s: the trace holds no complete step", path);
        free(by_step);
        replay_source_free(src);
        return -1;
    }
    src->steps = steps;
    src->scores = xmalloc(sizeof(float) * (size_t)(L * steps * M * E));
    for (int l = 0; l < L; l++)
        for (int64_t t = 0; t < steps; t++)
            memcpy(src->scores + ((l * steps + t) * M) * E, by_step + ((t * L + l) * M) * E,
                   sizeof(float) * (size_t)(M * E));
    free(by_step);
    return 0;
}

void replay_source_stream(ReplaySource *src, const StreamConfig *c) {
    memset(src, 0, sizeof(*src));
    stream_describe(c, src->name, (int)sizeof(src->name));
    src->n_layers = c->n_layers;
    src->E = c->E;
    src->K = c->K;
    src->steps = c->steps;
    src->tokens = c->tokens;
    src->repeated = c->repeat;
    src->updates_per_step = 1;
    int64_t L = c->n_layers, T = c->steps, N = c->tokens, E = c->E;
    src->scores = xmalloc(sizeof(float) * (size_t)(L * T * N * E));
    src->step_ids = xmalloc(sizeof(int64_t) * (size_t)T);
    for (int64_t t = 0; t < T; t++) src->step_ids[t] = t;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t l = 0; l < L; l++)
        for (int64_t t = 0; t < T; t++) stream_generate(c, t, (int)l, src->scores + ((l * T + t) * N) * E);
}

void replay_source_repeat_first(ReplaySource *src, int64_t steps) {
    int L = src->n_layers, E = src->E;
    int64_t T = src->steps, N = src->tokens;
    float *scores = xmalloc(sizeof(float) * (size_t)(L * steps * N * E)); // (L, steps, N, E)
    for (int l = 0; l < L; l++)
        for (int64_t t = 0; t < steps; t++) // step 0 of layer l is at (l T) N E
            memcpy(scores + ((l * steps + t) * N) * E, src->scores + (l * T * N) * E, sizeof(float) * (size_t)(N * E));
    free(src->scores);
    src->scores = scores;
    free(src->bias); // the trace's biases belong to its own steps
    src->bias = NULL;
    src->step_ids = xrealloc(src->step_ids, sizeof(int64_t) * (size_t)steps);
    for (int64_t t = 0; t < steps; t++) src->step_ids[t] = t;
    src->steps = steps;
    src->repeated = 1;
    src->updates_per_step = 1;
    src->run_steps = 0;
    size_t len = strlen(src->name);
    snprintf(src->name + len, sizeof(src->name) - len, ", its first step repeated");
}

void replay_source_free(ReplaySource *src) {
    free(src->scores);
    free(src->step_ids);
    free(src->bias);
    memset(src, 0, sizeof(*src));
}

// ---------------------------------------------------------------- hindsight

int replay_hindsight(const ReplaySource *src, int log_space, int n_h, ReplayHindsight *h) {
    memset(h, 0, sizeof(*h));
    int L = src->n_layers, E = src->E, K = src->K;
    int64_t T = src->steps, N = src->tokens;
    double t0 = omp_get_wtime();
    h->log_space = log_space;
    // Horizons T^(j / (n_h - 1)), rounded, without repeats; always ending at T.
    h->T = xmalloc(sizeof(int64_t) * (size_t)(n_h + 1));
    for (int j = 0; j < n_h; j++) {
        int64_t tj = n_h > 1 ? (int64_t)llround(pow((double)T, (double)j / (n_h - 1))) : T;
        if (tj < 1) tj = 1;
        if (h->n_h == 0 || tj > h->T[h->n_h - 1]) h->T[h->n_h++] = tj;
    }
    if (h->T[h->n_h - 1] != T) h->T[h->n_h++] = T;
    h->upper = xcalloc((size_t)h->n_h, sizeof(double));
    h->lower = xcalloc((size_t)h->n_h, sizeof(double));
    h->dual_star = xcalloc((size_t)T, sizeof(double));
    h->b_star = xcalloc((size_t)(L * E), sizeof(double));
    float *logs = log_space ? xmalloc(sizeof(float) * (size_t)(T * N * E)) : NULL; // (T, N, E)
    int rc = 0;
    for (int l = 0; l < L && rc == 0; l++) {
        const float *s = src->scores + (int64_t)l * T * N * E; // (T, N, E) this layer
        if (log_space) {
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < T * N * E; i++) logs[i] = dual_log_score(s[i]);
            s = logs;
        }
        double *b = h->b_star + (int64_t)l * E; // warm start: each horizon from the previous
        if (src->repeated) {
            // The same batch every step: sum_{t < T} D_t = T D_0, minimised by
            // D_0's own minimiser; one solve gives every horizon exactly.
            HindsightResult r;
            if (hindsight_solve(s, N, E, K, b, NULL, &r) != 0) rc = -1;
            for (int j = 0; j < h->n_h; j++) {
                h->upper[j] += (double)h->T[j] * r.upper;
                h->lower[j] += (double)h->T[j] * r.lower;
            }
        }
        for (int j = 0; j < h->n_h && !src->repeated; j++) {
            HindsightResult r;
            if (hindsight_solve(s, h->T[j] * N, E, K, b, NULL, &r) != 0) {
                rc = -1;
                break;
            }
            h->upper[j] += r.upper;
            h->lower[j] += r.lower;
        }
        // D_t(b*) of every step at the last horizon's b*, one step at a time.
        for (int64_t t = 0; t < T; t++) h->dual_star[t] += hindsight_dual(s + t * N * E, N, E, K, b, NULL);
    }
    free(logs);
    h->seconds = omp_get_wtime() - t0;
    return rc;
}

void replay_hindsight_free(ReplayHindsight *h) {
    free(h->T), free(h->upper), free(h->lower), free(h->dual_star), free(h->b_star);
    memset(h, 0, sizeof(*h));
}

// ---------------------------------------------------------------- runs

enum { TOKEN_CHUNK = 512 }; // rows per task of a step

static void run_alloc(ReplayRun *r, int64_t T, int L, int E) {
    memset(r, 0, sizeof(*r));
    r->steps = T;
    r->n_layers = L;
    r->E = E;
    r->gamma = xcalloc((size_t)T, sizeof(float));
    double **fields[] = {&r->maxvio, &r->dual, &r->primal, &r->subgrad_l1, &r->moved_frac, &r->from_over,
                         &r->to_under};
    for (size_t k = 0; k < sizeof(fields) / sizeof(fields[0]); k++) *fields[k] = xcalloc((size_t)T, sizeof(double));
    r->bias = xcalloc((size_t)((T + 1) * L * E), sizeof(float));
    r->bias_vs_trace = NAN;
}

void replay_run_free(ReplayRun *r) {
    free(r->gamma), free(r->maxvio), free(r->dual), free(r->primal), free(r->subgrad_l1), free(r->moved_frac),
        free(r->from_over), free(r->to_under), free(r->bias);
    memset(r, 0, sizeof(*r));
}

// The state of one setting during a run: its chunk accumulators and counts.
typedef struct {
    DualAccum *acc;   // (n_layers, n_chunks)
    DualAccum layer;  // one layer's sum
    int64_t *counts;  // (n_layers, E)
    int *sel;         // (TOKEN_CHUNK, K) a chunk's selection (serial mode)
} RunState;

// Routes one chunk of one layer of step t with the setting's bias.
static void route_chunk(const ReplaySource *src, const ReplayRun *run, int64_t t, int l, int c, const int *sel0,
                        DualAccum *acc, int *sel) {
    int L = src->n_layers, E = src->E, K = src->K;
    int64_t T = src->steps, N = src->tokens;
    int64_t r0 = (int64_t)c * TOKEN_CHUNK, rn = N - r0 < TOKEN_CHUNK ? N - r0 : TOKEN_CHUNK;
    const float *s = src->scores + ((l * T + t) * N + r0) * E; // (rn, E)
    dual_select(s, rn, E, K, run->bias + (t * L + l) * E, acc->mult, sel);
    dual_accum_reset(acc);
    dual_accum_tokens(acc, s, rn, sel, sel0 + ((int64_t)l * N + r0) * K);
}

// The statistics of step t from the setting's chunk sums, then the policy's
// own update of the bias from the step's counts.
static void finish_step(const ReplaySource *src, const ReplaySetting *setting, const ReplayOptions *opt,
                        int64_t total, int64_t t, int n_chunks, RunState *st, ReplayRun *r) {
    int L = src->n_layers, E = src->E, K = src->K;
    // The schedule runs over optimizer steps; a run that updated after every
    // micro-batch recorded updates_per_step of them per optimizer step.
    int64_t step = (opt->first_step + t) / (src->updates_per_step > 0 ? src->updates_per_step : 1);
    const float *b = r->bias + t * L * E; // (L, E) the bias that routed step t
    double maxvio = 0.0, moved = 0.0;
    int64_t moved_slots = 0, from_over = 0, to_under = 0;
    for (int l = 0; l < L; l++) {
        dual_accum_reset(&st->layer);
        for (int c = 0; c < n_chunks; c++) dual_accum_add(&st->layer, &st->acc[l * n_chunks + c]);
        DualStats ds;
        if (dual_finish(&st->layer, b + l * E, &ds) != 0)
            FATAL("%s, %s, step %lld: no dual statistics (a multiplicative bias <= 0?)", src->name, setting->label,
                  (long long)step);
        memcpy(st->counts + l * E, st->layer.counts, sizeof(int64_t) * (size_t)E);
        maxvio += ds.maxvio / L;
        moved += ds.moved_frac / L;
        r->dual[t] += ds.dual;
        r->primal[t] += ds.primal;
        r->subgrad_l1[t] += ds.subgrad_l1;
        moved_slots += ds.moved;
        from_over += ds.moved_from_over;
        to_under += ds.moved_to_under;
    }
    r->maxvio[t] = maxvio;
    r->moved_frac[t] = moved;
    r->from_over[t] = moved_slots ? (double)from_over / (double)moved_slots : NAN;
    r->to_under[t] = moved_slots ? (double)to_under / (double)moved_slots : NAN;
    r->gamma[t] = balance_gamma_at(&setting->cfg, step, total);
    float *next = r->bias + (t + 1) * L * E;
    memcpy(next, b, sizeof(float) * (size_t)(L * E));
    if (balance_update(&setting->cfg, step, total, st->counts, L, E, K, src->tokens, next) != 0)
        FATAL("%s, %s, step %lld: counts do not sum to K N (a bug)", src->name, setting->label, (long long)step);
    if (src->bias) {
        double worst = isnan(r->bias_vs_trace) ? 0.0 : r->bias_vs_trace;
        for (int64_t i = 0; i < (int64_t)L * E; i++)
            worst = fmax(worst, fabs((double)b[i] - (double)src->bias[t * L * E + i]));
        r->bias_vs_trace = worst;
    }
}

int replay_run(const ReplaySource *src, const ReplaySetting *settings, int n_settings, const ReplayOptions *opt,
               ReplayRun *runs, char *err, size_t errlen) {
    int L = src->n_layers, E = src->E, K = src->K;
    int64_t T = src->steps, N = src->tokens;
    int64_t total = opt->total_steps > 0 ? opt->total_steps : T;
    int n_chunks = (int)((N + TOKEN_CHUNK - 1) / TOKEN_CHUNK);
    if (opt->bias_from_trace && !src->bias) {
        util_set_err(err, errlen, "--bias-start trace needs a trace source (%s is a stream)", src->name);
        return -1;
    }
    for (int k = 0; k < n_settings; k++) {
        int mult = balance_bias_is_multiplicative(&settings[k].cfg);
        if (opt->bias_from_trace && mult != src->trace_mult) {
            util_set_err(err, errlen, "--bias-start trace: setting %s selects %s but %s recorded %s",
                         settings[k].label, mult ? "on s * b" : "on s + b", src->name,
                         src->trace_mult ? "s * b" : "s + b");
            return -1;
        }
    }
    RunState *st = xcalloc((size_t)n_settings, sizeof(RunState));
    for (int k = 0; k < n_settings; k++) {
        run_alloc(&runs[k], T, L, E);
        if (opt->bias_from_trace) memcpy(runs[k].bias, src->bias, sizeof(float) * (size_t)(L * E));
        else balance_bias_init(&settings[k].cfg, runs[k].bias, L, E);
        int mult = balance_bias_is_multiplicative(&settings[k].cfg);
        st[k].acc = xmalloc(sizeof(DualAccum) * (size_t)(L * n_chunks));
        for (int j = 0; j < L * n_chunks; j++) dual_accum_init(&st[k].acc[j], E, K, mult);
        dual_accum_init(&st[k].layer, E, K, mult);
        st[k].counts = xmalloc(sizeof(int64_t) * (size_t)(L * E));
        st[k].sel = xmalloc(sizeof(int) * (size_t)(TOKEN_CHUNK * K));
    }
    // Steps go in blocks: first the unbiased TopK of every token of the block
    // (shared by all settings: b = 0 and b = 1 for mult both select on s), then
    // the settings. With at least as many settings as threads each thread runs
    // whole settings through the block; with fewer, the layers and chunks of
    // each step are shared out (one barrier per step).
    enum { BLOCK = 32 };
    int threads = omp_get_max_threads();
    int *sel0 = xmalloc(sizeof(int) * (size_t)(BLOCK * L * N * K)); // (BLOCK, L, N, K)
    for (int64_t t0 = 0; t0 < T; t0 += BLOCK) {
        int64_t nb = T - t0 < BLOCK ? T - t0 : BLOCK;
#pragma omp parallel for collapse(3) schedule(dynamic, 1)
        for (int64_t i = 0; i < nb; i++)
            for (int l = 0; l < L; l++)
                for (int c = 0; c < n_chunks; c++) {
                    int64_t r0 = (int64_t)c * TOKEN_CHUNK, rn = N - r0 < TOKEN_CHUNK ? N - r0 : TOKEN_CHUNK;
                    const float *s = src->scores + ((l * T + t0 + i) * N + r0) * E;
                    dual_select(s, rn, E, K, NULL, 0, sel0 + ((i * L + l) * N + r0) * K);
                }
        if (n_settings >= threads) {
#pragma omp parallel for schedule(dynamic, 1)
            for (int k = 0; k < n_settings; k++)
                for (int64_t i = 0; i < nb; i++) {
                    for (int l = 0; l < L; l++)
                        for (int c = 0; c < n_chunks; c++)
                            route_chunk(src, &runs[k], t0 + i, l, c, sel0 + i * L * N * K,
                                        &st[k].acc[l * n_chunks + c], st[k].sel);
                    finish_step(src, &settings[k], opt, total, t0 + i, n_chunks, &st[k], &runs[k]);
                }
        } else {
            for (int64_t i = 0; i < nb; i++) {
                int64_t n_tasks = (int64_t)n_settings * L * n_chunks;
#pragma omp parallel
                {
                    int *sel = xmalloc(sizeof(int) * (size_t)(TOKEN_CHUNK * K)); // (TOKEN_CHUNK, K)
#pragma omp for schedule(dynamic, 1)
                    for (int64_t k = 0; k < n_tasks; k++) {
                        int set = (int)(k / (L * n_chunks)), l = (int)(k / n_chunks % L), c = (int)(k % n_chunks);
                        route_chunk(src, &runs[set], t0 + i, l, c, sel0 + i * L * N * K,
                                    &st[set].acc[l * n_chunks + c], sel);
                    }
                    free(sel);
                }
                for (int k = 0; k < n_settings; k++)
                    finish_step(src, &settings[k], opt, total, t0 + i, n_chunks, &st[k], &runs[k]);
            }
        }
    }
    for (int k = 0; k < n_settings; k++) {
        for (int j = 0; j < L * n_chunks; j++) dual_accum_free(&st[k].acc[j]);
        dual_accum_free(&st[k].layer);
        free(st[k].acc), free(st[k].counts), free(st[k].sel);
    }
    free(st), free(sel0);
    return 0;
}

int replay_save_trace(const ReplaySource *src, const ReplaySetting *setting, const ReplayRun *run,
                      const char *path, int bf16, char *err, size_t errlen) {
    int L = src->n_layers, E = src->E, K = src->K;
    int64_t T = src->steps, N = src->tokens;
    int mult = balance_bias_is_multiplicative(&setting->cfg);
    TraceHeader h = {L, E, K, (bf16 ? TRACE_BF16 : 0) | (mult ? TRACE_MULT : 0), N, N, 0, T, src->updates_per_step};
    TraceWriter *w = trace_writer_open(path, &h, err, errlen);
    if (!w) return -1;
    int *sel = xmalloc(sizeof(int) * (size_t)(N * K));              // (N, K)
    int64_t *counts = xcalloc((size_t)(L * E), sizeof(int64_t));     // (L, E)
    int rc = 0;
    for (int64_t t = 0; t < T && rc == 0; t++) {
        rc = trace_begin_step(w, src->step_ids[t]);
        memset(counts, 0, sizeof(int64_t) * (size_t)(L * E));
        for (int l = 0; l < L && rc == 0; l++) {
            const float *s = src->scores + (l * T + t) * N * E; // (N, E)
            dual_select(s, N, E, K, run->bias + (t * L + l) * E, mult, sel);
            for (int64_t i = 0; i < N * K; i++) counts[l * E + sel[i]]++;
            rc = trace_add_scores(w, l, s, N);
        }
        if (rc == 0) rc = trace_end_step(w, run->bias + t * L * E, counts, N);
    }
    if (rc != 0) util_set_err(err, errlen, "%s", trace_writer_error(w));
    free(sel), free(counts);
    if (trace_writer_close(w, rc ? NULL : err, errlen) != 0) rc = -1;
    return rc;
}
