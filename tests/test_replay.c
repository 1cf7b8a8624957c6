// Tests of the replay engine (train/replay.c) and the synthetic streams
// (train/stream.c):
//  1. every stream kind is reproducible from its seed (twice, on 1 and on 2
//     threads, and step by step with stream_generate), another seed gives other
//     scores, and each kind has the property it is named for;
//  2. the bias trajectory of every setting (sign, prop, mult, centred, cosine,
//     stop) equals what calling balance_update step by step on route_topk's counts
//     gives, bit for bit, whether the settings run in parallel or alone; its D(b_t)
//     equals dual_accum_batch's;
//  3. the hindsight side: bounds agree, and sum_t D_t(b*) equals the last
//     horizon's F(b*);
//  4. a stream saved as a trace and replayed from it gives the same scores, the
//     same bias trajectory (0 difference to the recorded bias) and the same D;
//  5. the growth fit tells log T, sqrt T and T apart.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../model/balance.h"
#include "../model/dual.h"
#include "../model/route.h"
#include "../train/replay.h"
#include "../train/replay_report.h"
#include "../train/stream.h"
#include "check.h"

static StreamConfig small_stream(StreamKind kind) {
    StreamConfig c;
    stream_config_default(&c);
    c.kind = kind;
    c.E = 16;
    c.K = 2;
    c.tokens = 300;
    c.steps = 40;
    c.n_layers = 2;
    c.seed = 9;
    c.period = 20;
    return c;
}

// The mean affinity of each expert (E) at one step and layer.
static void mean_scores(const StreamConfig *c, int64_t step, double *mean) {
    float *s = malloc(sizeof(float) * c->tokens * c->E);
    stream_generate(c, step, 0, s);
    for (int e = 0; e < c->E; e++) mean[e] = 0;
    for (int64_t t = 0; t < c->tokens; t++)
        for (int e = 0; e < c->E; e++) mean[e] += s[t * c->E + e] / c->tokens;
    free(s);
}

static double correlation(const double *a, const double *b, int n) {
    double ma = 0, mb = 0, sab = 0, saa = 0, sbb = 0;
    for (int i = 0; i < n; i++) ma += a[i] / n, mb += b[i] / n;
    for (int i = 0; i < n; i++)
        sab += (a[i] - ma) * (b[i] - mb), saa += (a[i] - ma) * (a[i] - ma), sbb += (b[i] - mb) * (b[i] - mb);
    return sab / sqrt(saa * sbb);
}

static void test_streams(void) {
    for (int kind = 0; kind < STREAM_NKINDS; kind++) {
        StreamConfig c = small_stream((StreamKind)kind);
        ReplaySource a, b, d;
        omp_set_num_threads(1);
        replay_source_stream(&a, &c);
        omp_set_num_threads(2);
        replay_source_stream(&b, &c);
        size_t bytes = sizeof(float) * (size_t)(c.n_layers * c.steps * c.tokens * c.E);
        int same = memcmp(a.scores, b.scores, bytes) == 0;
        float *one = malloc(sizeof(float) * c.tokens * c.E);
        for (int64_t t = 0; t < c.steps; t += 13)
            for (int l = 0; l < c.n_layers; l++) {
                stream_generate(&c, t, l, one);
                same &= memcmp(one, a.scores + ((l * c.steps + t) * c.tokens) * c.E,
                               sizeof(float) * c.tokens * c.E) == 0;
            }
        c.seed = 10;
        replay_source_stream(&d, &c);
        int differ = memcmp(a.scores, d.scores, bytes) != 0;
        check(same && differ, "stream %s: the same seed gives the same scores (1 or 2 threads, or a step alone), "
                              "another seed others", stream_kind_name((StreamKind)kind));
        free(one);
        replay_source_free(&a), replay_source_free(&b), replay_source_free(&d);
    }
    // What each kind is named for.
    double m0[16], m1[16], mh[16], m30[16];
    StreamConfig c = small_stream(STREAM_STATIONARY);
    mean_scores(&c, 0, m0);
    mean_scores(&c, 30, m30);
    check(correlation(m0, m30, 16) > 0.95, "stationary: the expert means of steps 0 and 30 correlate (%.3f)",
          correlation(m0, m30, 16));
    c = small_stream(STREAM_ADVERSARIAL);
    mean_scores(&c, 0, m0);
    mean_scores(&c, 1, m1);
    mean_scores(&c, 2, mh);
    check(correlation(m0, m1, 16) < -0.95 && correlation(m0, mh, 16) > 0.95,
          "adversarial: preferences flip every step (correlation %.3f with the next, %.3f two steps on)",
          correlation(m0, m1, 16), correlation(m0, mh, 16));
    c = small_stream(STREAM_DRIFT);
    mean_scores(&c, 0, m0);
    mean_scores(&c, 10, mh); // half the period of 20
    mean_scores(&c, 20, m1); // a whole period
    check(correlation(m0, mh, 16) < -0.8 && correlation(m0, m1, 16) > 0.95,
          "drift: half a period reverses the preferences (%.3f), a period restores them (%.3f)",
          correlation(m0, mh, 16), correlation(m0, m1, 16));
    // zipf: a larger exponent, a less balanced plain TopK.
    double maxvio[3];
    double expo[3] = {0.25, 1.0, 2.0};
    for (int k = 0; k < 3; k++) {
        c = small_stream(STREAM_ZIPF);
        c.zipf_a = expo[k];
        float *s = malloc(sizeof(float) * c.tokens * c.E), b0[16] = {0};
        stream_generate(&c, 0, 0, s);
        DualAccum acc;
        dual_accum_init(&acc, c.E, c.K, 0);
        dual_accum_batch(&acc, s, c.tokens, b0);
        DualStats st;
        dual_finish(&acc, b0, &st);
        maxvio[k] = st.maxvio;
        dual_accum_free(&acc);
        free(s);
    }
    check(maxvio[0] < maxvio[1] && maxvio[1] < maxvio[2],
          "zipf: MaxVio without a bias grows with the exponent (a 0.25, 1, 2: %.2f, %.2f, %.2f)", maxvio[0], maxvio[1],
          maxvio[2]);
}

// The settings under test, from option strings.
static int make_settings(ReplaySetting *set) {
    const char *names[] = {"sign", "prop/inv", "mult/invsqrt", "sign/center", "sign/cosine", "sign/stop"};
    const char *grid[][6] = {
        {"gamma-rule", "sign", "gamma", "0.01", NULL, NULL},
        {"gamma-rule", "prop", "gamma-schedule", "inv", "gamma-tau", "10"},
        {"gamma-rule", "mult", "gamma-schedule", "invsqrt", "gamma", "0.02"},
        {"gamma-center", "1", "gamma", "0.005", NULL, NULL},
        {"gamma-schedule", "cosine", "gamma-min", "0.001", "gamma", "0.02"},
        {"gamma-schedule", "stop", "gamma-stop-frac", "0.5", "gamma", "0.02"},
    };
    int n = (int)(sizeof(grid) / sizeof(grid[0]));
    char err[256];
    for (int k = 0; k < n; k++) {
        balance_config_default(&set[k].cfg);
        for (int j = 0; j < 6 && grid[k][j]; j += 2) balance_set_option(&set[k].cfg, grid[k][j], grid[k][j + 1], err, sizeof(err));
        snprintf(set[k].label, sizeof(set[k].label), "%s", names[k]);
    }
    return n;
}

static void test_trajectory(void) {
    StreamConfig c = small_stream(STREAM_STATIONARY);
    ReplaySource src;
    replay_source_stream(&src, &c);
    ReplaySetting set[8];
    int n = make_settings(set);
    ReplayRun runs[8], alone;
    ReplayOptions opt = {0, 0, 0};
    char err[256];
    omp_set_num_threads(2);
    replay_run(&src, set, n, &opt, runs, err, sizeof(err));   // settings in parallel
    replay_run(&src, set, 1, &opt, &alone, err, sizeof(err)); // one setting, steps shared out
    int L = c.n_layers, E = c.E, K = c.K;
    int64_t T = c.steps, N = c.tokens;
    float *s = malloc(sizeof(float) * N * E);
    float bias[2 * 16];
    int64_t counts[2 * 16];
    double score[16];
    int sel[16];
    for (int k = 0; k < n; k++) {
        int mult = balance_bias_is_multiplicative(&set[k].cfg), same = 1;
        double worst_D = 0;
        balance_bias_init(&set[k].cfg, bias, L, E);
        for (int64_t t = 0; t < T; t++) {
            same &= memcmp(bias, runs[k].bias + t * L * E, sizeof(float) * L * E) == 0;
            memset(counts, 0, sizeof(counts));
            double D = 0;
            for (int l = 0; l < L; l++) {
                stream_generate(&c, t, l, s);
                for (int64_t i = 0; i < N; i++) { // the model's own routing rule
                    for (int e = 0; e < E; e++)
                        score[e] = (double)(float)ROUTE_SCORE(s[i * E + e], bias[l * E + e], mult);
                    route_topk(score, E, K, sel);
                    for (int j = 0; j < K; j++) counts[l * E + sel[j]]++;
                }
                DualAccum acc;
                dual_accum_init(&acc, E, K, mult);
                dual_accum_batch(&acc, s, N, bias + l * E);
                DualStats st;
                dual_finish(&acc, bias + l * E, &st);
                D += st.dual;
                dual_accum_free(&acc);
            }
            worst_D = fmax(worst_D, fabs(D - runs[k].dual[t]) / fabs(D));
            balance_update(&set[k].cfg, t, T, counts, L, E, K, N, bias);
        }
        same &= memcmp(bias, runs[k].bias + T * L * E, sizeof(float) * L * E) == 0;
        check(same && worst_D < 1e-12, "%s: bias trajectory equals balance_update step by step, bit for bit "
                                       "(%lld steps, %d layers); D(b_t) rel. diff %.1e",
              set[k].label, (long long)T, L, worst_D);
    }
    check(memcmp(alone.bias, runs[0].bias, sizeof(float) * (T + 1) * L * E) == 0 &&
              memcmp(alone.dual, runs[0].dual, sizeof(double) * T) == 0,
          "a setting run alone (steps shared out) equals the same setting run among others (settings in parallel)");
    // 3. The hindsight side.
    ReplayHindsight h;
    replay_hindsight(&src, 0, 6, &h);
    double sum = 0, gap = 0;
    for (int64_t t = 0; t < T; t++) sum += h.dual_star[t];
    for (int j = 0; j < h.n_h; j++) gap = fmax(gap, (h.upper[j] - h.lower[j]) / fabs(h.upper[j]));
    check(h.T[h.n_h - 1] == T && gap < 1e-12 && fabs(sum - h.upper[h.n_h - 1]) < 1e-9 * fabs(sum),
          "hindsight: %d horizons up to %lld, relative gaps <= %.1e, sum_t D_t(b*) = F(b*) (%.6f vs %.6f)", h.n_h,
          (long long)h.T[h.n_h - 1], gap, sum, h.upper[h.n_h - 1]);
    // 4. Through a trace and back.
    char path[] = "/tmp/test_replay_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    remove(path); // the writer creates it (and refuses an existing file)
    int rc = replay_save_trace(&src, &set[2], &runs[2], path, 0, err, sizeof(err));
    ReplaySource tr;
    rc |= replay_source_trace(&tr, path, 0, 0, err, sizeof(err));
    int same = rc == 0 && tr.steps == T && tr.n_layers == L && tr.trace_mult == 1 &&
               memcmp(tr.scores, src.scores, sizeof(float) * L * T * N * E) == 0 &&
               memcmp(tr.bias, runs[2].bias, sizeof(float) * T * L * E) == 0;
    ReplayRun back;
    ReplayOptions from_trace = {0, T, 1};
    rc |= replay_run(&tr, &set[2], 1, &from_trace, &back, err, sizeof(err));
    same &= rc == 0 && back.bias_vs_trace == 0.0 && memcmp(back.dual, runs[2].dual, sizeof(double) * T) == 0;
    check(same, "a stream saved as a trace (mult setting) replays to the same scores, bias (0 difference) and D");
    remove(path);
    replay_run_free(&back);
    replay_source_free(&tr);
    replay_hindsight_free(&h);
    for (int k = 0; k < n; k++) replay_run_free(&runs[k]);
    replay_run_free(&alone);
    replay_source_free(&src);
    free(s);
}

// A repeated batch: the hindsight's shortcut (one solve, times T) against a
// plain solve over every repeated step.
static void test_repeated(void) {
    StreamConfig c = small_stream(STREAM_ZIPF);
    c.repeat = 1;
    c.steps = 12;
    ReplaySource src;
    replay_source_stream(&src, &c);
    ReplayHindsight fast, slow;
    replay_hindsight(&src, 0, 4, &fast);
    src.repeated = 0;
    replay_hindsight(&src, 0, 4, &slow);
    double worst = 0;
    for (int j = 0; j < fast.n_h; j++)
        worst = fmax(worst, fmax(fabs(fast.upper[j] - slow.upper[j]), fabs(fast.lower[j] - slow.lower[j])) /
                                fabs(slow.upper[j]));
    check(fast.n_h == slow.n_h && worst < 1e-12 && memcmp(src.scores, src.scores + c.tokens * c.E,
                                                            sizeof(float) * c.tokens * c.E) == 0,
          "one batch repeated: the hindsight shortcut (T x one solve) equals solving all T copies (rel. diff %.1e)",
          worst);
    replay_hindsight_free(&fast), replay_hindsight_free(&slow);
    replay_source_free(&src);
}

static void test_fit(void) {
    int64_t T[12];
    double R[3][12];
    for (int j = 0; j < 12; j++) {
        T[j] = (int64_t)llround(pow(2000.0, j / 11.0));
        R[0][j] = 5 * log((double)T[j]) + 2;
        R[1][j] = 3 * sqrt((double)T[j]) + 1;
        R[2][j] = 0.7 * (double)T[j] + 4;
    }
    ReplayFit f[3];
    for (int m = 0; m < 3; m++) replay_fit(T, R[m], 12, &f[m]);
    check(f[0].best == FIT_LOG && f[1].best == FIT_SQRT && f[2].best == FIT_LINEAR,
          "the fit picks log T, sqrt T and T for curves of those shapes");
    check(f[0].slope < 0.3 && fabs(f[1].slope - 0.5) < 0.1 && fabs(f[2].slope - 1.0) < 0.05,
          "log-log slopes %.2f, %.2f, %.2f (log, sqrt, linear)", f[0].slope, f[1].slope, f[2].slope);
}

int main(void) {
    test_streams();
    test_trajectory();
    test_repeated();
    test_fit();
    return check_summary("test_replay");
}
