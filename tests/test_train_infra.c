// Tests of the host-side training infrastructure: AdamW and gradient norm
// (train/optim.c), learning-rate schedules and their options (train/lr.c),
// the checkpoint container and directory helpers with the directory lock
// (train/ckpt.c), a training checkpoint's checked content (train/ckpt_state.c),
// the model config's validation, counts and text form (model/config.c), and
// the key=value line reader (util/file.h).
// Prints one line per check with the measured numbers; exits 1 on any failure.
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L  // mkdtemp, fork, setrlimit
#endif

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <dirent.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "check.h"
#include "../model/config.h"
#include "../model/layout.h"
#include "../train/ckpt.h"
#include "../train/ckpt_state.h"
#include "../train/lr.h"
#include "../train/optim.h"
#include "../util/file.h"
#include "ckpt_rewrite.h"


// |a - b| <= tol * max(1, |b|)
static int close_to(double a, double b, double tol) { return fabs(a - b) <= tol * fmax(1.0, fabs(b)); }

// A small deterministic generator for test data (xorshift64*).
static uint64_t test_rng = 0x9E3779B97F4A7C15ULL;
static double test_uniform(void) {
    test_rng ^= test_rng >> 12;
    test_rng ^= test_rng << 25;
    test_rng ^= test_rng >> 27;
    return (double)((test_rng * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0;  // [0, 1)
}

// ================================================================ AdamW

// A hand-built layout: matrix a (3), norm n (2), matrix b (3), matrix c (1).
// Expected decay ranges: [0,3) decay, [3,5) none, [5,9) decay (b and c merged).
static ParamTensor test_tensors[4] = {
    { .name = "a", .ndim = 1, .numel = 3, .offset = 0, .is_matrix = 1 },
    { .name = "n", .ndim = 1, .numel = 2, .offset = 3, .is_matrix = 0 },
    { .name = "b", .ndim = 1, .numel = 3, .offset = 5, .is_matrix = 1 },
    { .name = "c", .ndim = 1, .numel = 1, .offset = 8, .is_matrix = 1 },
};

static void test_decay_ranges(DecayRanges *dr) {
    ParamLayout lay = { .t = test_tensors, .n = 4, .total = 9 };
    int rc = decay_ranges_from_layout(dr, &lay);
    check(rc == 0 && dr->n == 3 && dr->total == 9, "decay ranges from layout: rc %d, %d ranges (want 3), total %lld (want 9)",
          rc, dr->n, (long long)dr->total);
    if (rc != 0 || dr->n != 3) return;
    check(dr->r[0].offset == 0 && dr->r[0].len == 3 && dr->r[0].decay == 1 &&
          dr->r[1].offset == 3 && dr->r[1].len == 2 && dr->r[1].decay == 0 &&
          dr->r[2].offset == 5 && dr->r[2].len == 4 && dr->r[2].decay == 1,
          "decay ranges: [%lld,+%lld) d%d  [%lld,+%lld) d%d  [%lld,+%lld) d%d (want [0,+3) d1 [3,+2) d0 [5,+4) d1)",
          (long long)dr->r[0].offset, (long long)dr->r[0].len, dr->r[0].decay, (long long)dr->r[1].offset,
          (long long)dr->r[1].len, dr->r[1].decay, (long long)dr->r[2].offset, (long long)dr->r[2].len,
          dr->r[2].decay);
    check(decay_ranges_count_decayed(dr) == 7, "decayed elements: %lld (want 7)",
          (long long)decay_ranges_count_decayed(dr));

    ParamTensor gap[2] = { { .name = "x", .numel = 3, .offset = 0, .is_matrix = 1 },
                           { .name = "y", .numel = 3, .offset = 4, .is_matrix = 0 } };
    ParamLayout bad = { .t = gap, .n = 2, .total = 7 };
    DecayRanges dr2;
    fprintf(stderr, "(expected message follows)\n");
    check(decay_ranges_from_layout(&dr2, &bad) == -1, "decay ranges reject a layout with a gap");
}

// Textbook AdamW in double: the formula of the brief / Loshchilov & Hutter as
// implemented by torch.optim.AdamW.
static void adamw_reference(double *p, double g, double *m, double *v, double lr, double wd, double b1,
                            double b2, double eps, int t) {
    *p -= lr * wd * *p;
    *m = b1 * *m + (1 - b1) * g;
    *v = b2 * *v + (1 - b2) * g * g;
    double mhat = *m / (1 - pow(b1, t)), vhat = *v / (1 - pow(b2, t));
    *p -= lr * mhat / (sqrt(vhat) + eps);
}

static void test_adamw_values(const DecayRanges *dr) {
    AdamWConfig c;
    adamw_config_default(&c);
    check(c.beta1 == 0.9 && c.beta2 == 0.95 && c.eps == 1e-8 && c.weight_decay == 0.1 && c.grad_clip == 1.0,
          "AdamW defaults: betas %g/%g eps %g wd %g clip %g (want 0.9/0.95 1e-8 0.1 1)", c.beta1, c.beta2,
          c.eps, c.weight_decay, c.grad_clip);

    // Hand-computed first step, lr 0.01, wd 0.1: mhat = g and vhat = g^2, so the
    // update is lr * g / (|g| + eps) = 0.01 * sign(g) (to 1e-10), after decay
    // p *= 1 - 0.001 on matrices only. Element 0 (matrix, p 1, g 0.5):
    // 0.999 - 0.01 = 0.989. Element 3 (norm, p 1, g 0.5): 1 - 0.01 = 0.99.
    // Element 2 (matrix, p 2, g 0): decay only, 2 * 0.999 = 1.998. Element 4
    // (norm, p 2, g 0): unchanged, 2.
    float p[9] = { 1, -1, 2, 1, 2, 0.5f, -0.25f, 3, -2 };        // (9) parameters
    float g1[9] = { 0.5f, -0.5f, 0, 0.5f, 0, 1e-3f, 2, -3, 0.1f }; // (9) gradients of step 1
    float m[9] = { 0 }, v[9] = { 0 };                             // (9) moments
    double pd[9], md[9] = { 0 }, vd[9] = { 0 };                   // (9) double reference
    for (int i = 0; i < 9; i++) pd[i] = p[i];
    adamw_step(p, g1, m, v, 9, dr, &c, 0.01, 1);
    check(close_to(p[0], 0.989, 1e-6) && close_to(p[1], -0.989, 1e-6),
          "AdamW step 1, matrix, g=+-0.5: p %.9f %.9f (want 0.989 -0.989)", p[0], p[1]);
    check(close_to(p[3], 0.99, 1e-6), "AdamW step 1, norm weight (no decay), g=0.5: p %.9f (want 0.99)", p[3]);
    check(p[2] == (float)(2.0f * (float)(1 - 0.01 * 0.1)) && close_to(p[2], 1.998, 1e-7),
          "AdamW step 1, matrix, g=0: decay only, p %.9f (want 1.998)", p[2]);
    check(p[4] == 2.0f, "AdamW step 1, norm weight, g=0: p %.9f (want exactly 2)", p[4]);

    // Steps 1-3 against the double reference, with a changing lr and gradient.
    double lrs[3] = { 0.01, 0.02, 0.005 };
    for (int i = 0; i < 9; i++) {
        int decay = i < 3 || i >= 5;
        adamw_reference(&pd[i], g1[i], &md[i], &vd[i], lrs[0], decay ? 0.1 : 0.0, 0.9, 0.95, 1e-8, 1);
    }
    for (int t = 2; t <= 3; t++) {
        float g[9];  // (9) gradients of step t
        for (int i = 0; i < 9; i++) g[i] = (float)(g1[i] * (t == 2 ? -0.7 : 1.3) + 0.01 * i);
        adamw_step(p, g, m, v, 9, dr, &c, lrs[t - 1], t);
        for (int i = 0; i < 9; i++) {
            int decay = i < 3 || i >= 5;
            adamw_reference(&pd[i], g[i], &md[i], &vd[i], lrs[t - 1], decay ? 0.1 : 0.0, 0.9, 0.95, 1e-8, t);
        }
    }
    double worst = 0, worst_m = 0, worst_v = 0;
    for (int i = 0; i < 9; i++) {
        worst = fmax(worst, fabs(p[i] - pd[i]) / fmax(1.0, fabs(pd[i])));
        worst_m = fmax(worst_m, fabs(m[i] - md[i]) / fmax(1e-3, fabs(md[i])));
        worst_v = fmax(worst_v, fabs(v[i] - vd[i]) / fmax(1e-6, fabs(vd[i])));
    }
    check(worst < 2e-6 && worst_m < 2e-6 && worst_v < 2e-6,
          "AdamW 3 steps vs double reference (9 elements, decay masked): max rel err p %.2e m %.2e v %.2e (< 2e-6)",
          worst, worst_m, worst_v);
    printf("     p after 3 steps: %.8f %.8f (norm) %.8f, reference %.8f %.8f %.8f\n", p[0], p[3], p[8],
           pd[0], pd[3], pd[8]);

    // NULL ranges: every element decays (torch's single parameter group).
    float q[2] = { 2, 2 }, gq[2] = { 0, 0 }, mq[2] = { 0 }, vq[2] = { 0 };
    adamw_step(q, gq, mq, vq, 2, NULL, &c, 0.01, 1);
    check(close_to(q[0], 1.998, 1e-7) && q[0] == q[1], "AdamW without ranges decays everything: %.9f %.9f (want 1.998)",
          q[0], q[1]);
}

static void test_adamw_threads(void) {
#ifdef _OPENMP
    enum { N = 1000003 };  // odd size: the last chunk is partial
    // Two copies of the state, each (3N): p, then m, then v.
    float *s1 = calloc(3 * (size_t)N, sizeof(float)), *s2 = calloc(3 * (size_t)N, sizeof(float));
    float *g = malloc(sizeof(float) * N);  // (N)
    if (!s1 || !s2 || !g) {
        check(0, "AdamW thread test: out of memory");
        free(s1);
        free(s2);
        free(g);
        return;
    }
    for (int64_t i = 0; i < N; i++) s1[i] = s2[i] = (float)(test_uniform() - 0.5);
    AdamWConfig c;
    adamw_config_default(&c);
    for (int t = 1; t <= 3; t++) {
        for (int64_t i = 0; i < N; i++) g[i] = (float)(test_uniform() - 0.5);
        omp_set_num_threads(1);
        adamw_step(s1, g, s1 + N, s1 + 2 * (int64_t)N, N, NULL, &c, 1e-3, t);
        omp_set_num_threads(2);
        adamw_step(s2, g, s2 + N, s2 + 2 * (int64_t)N, N, NULL, &c, 1e-3, t);
    }
    int same = memcmp(s1, s2, sizeof(float) * 3 * (size_t)N) == 0;
    check(same, "AdamW 3 steps on %d elements: 1 thread and 2 threads bit-identical (p, m, v): %s", N,
          same ? "yes" : "no");
    free(s1);
    free(s2);
    free(g);
#else
    printf("skip AdamW thread-count test: built without OpenMP\n");
#endif
}

// ================================================================ gradient norm

static void test_grad_norm(void) {
    float a[2] = { 3, 4 }, b[3] = { 1, -2, 2 };
    check(grad_norm(a, 2) == 5.0f, "grad_norm(3,4) = %.9g (want 5)", grad_norm(a, 2));
    check(grad_norm(b, 3) == 3.0f, "grad_norm(1,-2,2) = %.9g (want 3)", grad_norm(b, 3));
    check(grad_norm(a, 0) == 0.0f, "grad_norm of nothing = %g (want 0)", grad_norm(a, 0));

    enum { N = 5000011 };  // many blocks and a partial last one
    float *g = malloc(sizeof(float) * N);
    if (!g) {
        check(0, "grad_norm test: out of memory");
        return;
    }
    long double exact = 0;
    for (int64_t i = 0; i < N; i++) {
        g[i] = (float)(2 * test_uniform() - 1);
        exact += (long double)g[i] * g[i];
    }
#ifdef _OPENMP
    omp_set_num_threads(1);
    double s1 = grad_sumsq(g, N);
    omp_set_num_threads(2);
    double s2 = grad_sumsq(g, N);
    check(memcmp(&s1, &s2, sizeof s1) == 0, "grad_sumsq on %d elements, 1 vs 2 threads: %.17g vs %.17g (bit-identical)",
          N, s1, s2);
#else
    double s1 = grad_sumsq(g, N);
    printf("skip grad_sumsq thread-count test: built without OpenMP\n");
#endif
    check(fabsl((long double)s1 - exact) <= 1e-12L * exact, "grad_sumsq vs long double sum: %.17g vs %.17Lg", s1,
          exact);
    check(grad_norm(g, N) == (float)sqrt(s1), "grad_norm = sqrt(grad_sumsq) = %.9g", grad_norm(g, N));
    free(g);

    // Clip coefficient: max_norm / (norm + 1e-6) in float, only when below 1.
    float c1 = grad_clip_scale(5.0f, 1.0f);
    check(c1 == 1.0f / (5.0f + 1e-6f) && close_to(c1, 0.2, 1e-6), "clip scale(norm 5, max 1) = %.9g (want 0.2)", c1);
    check(grad_clip_scale(0.5f, 1.0f) == 1.0f, "clip scale(norm 0.5, max 1) = %g (want 1: no clip)",
          grad_clip_scale(0.5f, 1.0f));
    float c2 = grad_clip_scale(1.0f, 1.0f);
    check(c2 < 1.0f && close_to(c2, 1.0 / (1.0 + 1e-6), 1e-7), "clip scale(norm 1, max 1) = %.9g (torch: 1/(1+1e-6))", c2);
    check(grad_clip_scale(100.0f, 0.0f) == 1.0f, "clip scale with max 0 (disabled) = %g (want 1)",
          grad_clip_scale(100.0f, 0.0f));
    check(grad_clip_scale(INFINITY, 1.0f) == 0.0f && isnan(grad_clip_scale(NAN, 1.0f)),
          "clip scale of inf norm = %g (want 0), of NaN norm = %g (want nan)", grad_clip_scale(INFINITY, 1.0f),
          grad_clip_scale(NAN, 1.0f));
    float gs[3] = { 1, -2, 4 };
    grad_scale(gs, 3, 0.5f);
    check(gs[0] == 0.5f && gs[1] == -1.0f && gs[2] == 2.0f, "grad_scale by 0.5: %g %g %g", gs[0], gs[1], gs[2]);
}

static void test_adamw_options(void) {
    AdamWConfig c;
    adamw_config_default(&c);
    char err[256];
    int rc = adamw_set_option(&c, "weight-decay", "0.05", err, sizeof err);
    check(rc == 0 && c.weight_decay == 0.05, "adamw option weight-decay=0.05: rc %d, value %g", rc, c.weight_decay);
    rc = adamw_set_option(&c, "momentum", "0.9", err, sizeof err);
    check(rc == -1, "adamw option unknown key rejected: rc %d, '%s'", rc, err);
    rc = adamw_set_option(&c, "beta2", "0.95x", err, sizeof err);
    check(rc == -2 && c.beta2 == 0.95, "adamw option bad value rejected, value kept: rc %d, '%s'", rc, err);
    c.beta1 = 1.0;
    rc = adamw_validate(&c, err, sizeof err);
    check(rc == -1, "adamw validate rejects beta1 = 1: '%s'", err);
}

// ================================================================ LR schedules

static void test_lr_cosine(void) {
    LrSchedule s;
    lr_schedule_default(&s);  // cosine, 1e-3 -> 1e-4 ...
    s.warmup_steps = 1000;    // ... with warmup 1000: Wang et al. 1B
    int64_t T = 40000;
    char err[256];
    check(lr_validate(&s, T, err, sizeof err) == 0, "default schedule valid for 40000 steps");
    double at0 = lr_at(&s, 0, T), at999 = lr_at(&s, 999, T), at499 = lr_at(&s, 499, T);
    check(close_to(at0, 1e-6, 1e-12) && close_to(at499, 5e-4, 1e-12) && at999 == 1e-3,
          "cosine warmup: step 0 %.6g (want 1e-6), 499 %.6g (want 5e-4), 999 %.6g (want 1e-3)", at0, at499, at999);
    double at1000 = lr_at(&s, 1000, T), mid = lr_at(&s, 20500, T), end = lr_at(&s, T, T), past = lr_at(&s, T + 5, T);
    check(at1000 == 1e-3, "cosine at end of warmup (step 1000) %.9g (want 1e-3)", at1000);
    check(close_to(mid, 5.5e-4, 1e-12), "cosine midpoint (step 20500) %.9g (want 5.5e-4)", mid);
    check(close_to(end, 1e-4, 1e-12) && close_to(past, 1e-4, 1e-12), "cosine at 40000 %.9g, past it %.9g (want 1e-4)",
          end, past);
    // Quarter point: p = 0.25, lr_min + (lr - lr_min)(1 + cos(pi/4))/2.
    double q = lr_at(&s, 1000 + 9750, T), want = 1e-4 + 0.9e-3 * (1 + sqrt(0.5)) / 2;
    check(close_to(q, want, 1e-12), "cosine quarter point (step 10750) %.9g (want %.9g)", q, want);
}

static void test_lr_multistep(void) {
    // Wang et al. 3B: warmup 2000, 7.8e-4, then 2.47e-4 from 45211, 7.8e-5 from 50862.
    LrSchedule s;
    lr_schedule_default(&s);
    char err[256];
    int rc = lr_set_option(&s, "lr-schedule", "multistep", err, sizeof err);
    rc |= lr_set_option(&s, "lr", "7.8e-4", err, sizeof err);
    rc |= lr_set_option(&s, "warmup-steps", "2000", err, sizeof err);
    rc |= lr_set_option(&s, "lr-steps", "45211,50862", err, sizeof err);
    rc |= lr_set_option(&s, "lr-rates", "2.47e-4,7.8e-5", err, sizeof err);
    check(rc == 0 && lr_validate(&s, 56514, err, sizeof err) == 0, "multistep options parse and validate (rc %d)", rc);
    int64_t T = 56514;
    check(close_to(lr_at(&s, 0, T), 3.9e-7, 1e-12) && lr_at(&s, 1999, T) == 7.8e-4 && lr_at(&s, 2000, T) == 7.8e-4,
          "multistep warmup: step 0 %.6g (want 3.9e-7), 1999 %.6g, 2000 %.6g (want 7.8e-4)", lr_at(&s, 0, T),
          lr_at(&s, 1999, T), lr_at(&s, 2000, T));
    check(lr_at(&s, 45210, T) == 7.8e-4 && lr_at(&s, 45211, T) == 2.47e-4,
          "multistep boundary 45211: step 45210 %.6g (want 7.8e-4), 45211 %.6g (want 2.47e-4)", lr_at(&s, 45210, T),
          lr_at(&s, 45211, T));
    check(lr_at(&s, 50861, T) == 2.47e-4 && lr_at(&s, 50862, T) == 7.8e-5 && lr_at(&s, 56513, T) == 7.8e-5,
          "multistep boundary 50862: step 50861 %.6g, 50862 %.6g, 56513 %.6g", lr_at(&s, 50861, T),
          lr_at(&s, 50862, T), lr_at(&s, 56513, T));

    LrSchedule bad = s;
    lr_set_option(&bad, "lr-steps", "50862,45211", err, sizeof err);
    check(lr_validate(&bad, T, err, sizeof err) == -1, "multistep rejects decreasing steps: '%s'", err);
    bad = s;
    lr_set_option(&bad, "lr-rates", "2.47e-4", err, sizeof err);
    check(lr_validate(&bad, T, err, sizeof err) == -1, "multistep rejects 2 steps with 1 rate: '%s'", err);
    bad = s;
    lr_set_option(&bad, "lr-steps", "1000,50862", err, sizeof err);
    check(lr_validate(&bad, T, err, sizeof err) == -1, "multistep rejects a boundary inside warmup: '%s'", err);
    bad = s;
    lr_set_option(&bad, "lr-schedule", "cosine", err, sizeof err);
    check(lr_validate(&bad, T, err, sizeof err) == -1, "lr-steps with a cosine schedule rejected: '%s'", err);
}

static void test_lr_const_wsd(void) {
    LrSchedule s;
    lr_schedule_default(&s);
    char err[256];
    lr_set_option(&s, "lr-schedule", "const", err, sizeof err);
    lr_set_option(&s, "warmup-steps", "0", err, sizeof err);
    check(lr_at(&s, 0, 100) == 1e-3 && lr_at(&s, 99, 100) == 1e-3, "const without warmup: step 0 %g, 99 %g (want 1e-3)",
          lr_at(&s, 0, 100), lr_at(&s, 99, 100));
    lr_set_option(&s, "warmup-steps", "4", err, sizeof err);
    check(lr_at(&s, 0, 100) == 2.5e-4 && lr_at(&s, 3, 100) == 1e-3 && lr_at(&s, 50, 100) == 1e-3,
          "const with warmup 4: step 0 %g (want 2.5e-4), 3 %g, 50 %g (want 1e-3)", lr_at(&s, 0, 100),
          lr_at(&s, 3, 100), lr_at(&s, 50, 100));

    // wsd: 1000 steps, warmup 100, last 20% (200 steps, from 800) decay 1e-3 -> 1e-4.
    lr_set_option(&s, "lr-schedule", "wsd", err, sizeof err);
    lr_set_option(&s, "warmup-steps", "100", err, sizeof err);
    lr_set_option(&s, "wsd-decay-frac", "0.2", err, sizeof err);
    int64_t T = 1000;
    check(lr_validate(&s, T, err, sizeof err) == 0, "wsd valid for 1000 steps");
    check(close_to(lr_at(&s, 0, T), 1e-5, 1e-12) && lr_at(&s, 99, T) == 1e-3 && lr_at(&s, 500, T) == 1e-3 &&
          lr_at(&s, 799, T) == 1e-3 && lr_at(&s, 800, T) == 1e-3,
          "wsd warmup/stable: step 0 %g (want 1e-5), 99 %g, 500 %g, 799 %g, 800 %g (want 1e-3)", lr_at(&s, 0, T),
          lr_at(&s, 99, T), lr_at(&s, 500, T), lr_at(&s, 799, T), lr_at(&s, 800, T));
    check(close_to(lr_at(&s, 900, T), 5.5e-4, 1e-12) && close_to(lr_at(&s, 850, T), 7.75e-4, 1e-12) &&
          close_to(lr_at(&s, 1000, T), 1e-4, 1e-12),
          "wsd linear decay: step 850 %.9g (want 7.75e-4), 900 %.9g (want 5.5e-4), 1000 %.9g (want 1e-4)",
          lr_at(&s, 850, T), lr_at(&s, 900, T), lr_at(&s, 1000, T));
    lr_set_option(&s, "wsd-decay", "cosine", err, sizeof err);
    double want850 = 1e-4 + 0.9e-3 * (1 + sqrt(0.5)) / 2;
    check(close_to(lr_at(&s, 900, T), 5.5e-4, 1e-12) && close_to(lr_at(&s, 850, T), want850, 1e-12),
          "wsd cosine decay: step 850 %.9g (want %.9g), 900 %.9g (want 5.5e-4)", lr_at(&s, 850, T), want850,
          lr_at(&s, 900, T));
    lr_set_option(&s, "warmup-steps", "900", err, sizeof err);
    check(lr_validate(&s, T, err, sizeof err) == -1, "wsd rejects decay starting inside warmup: '%s'", err);
    lr_set_option(&s, "wsd-decay-frac", "0", err, sizeof err);
    check(lr_validate(&s, T, err, sizeof err) == -1, "wsd rejects decay fraction 0: '%s'", err);
}

static void test_lr_options(void) {
    LrSchedule s;
    lr_schedule_default(&s);
    char err[256];
    int rc = lr_set_option(&s, "learning-rate", "1e-3", err, sizeof err);
    check(rc == -1, "lr option unknown key rejected: rc %d, '%s'", rc, err);
    rc = lr_set_option(&s, "lr", "fast", err, sizeof err);
    check(rc == -2 && s.lr == 1e-3, "lr option 'fast' rejected, value kept: rc %d, '%s'", rc, err);
    rc = lr_set_option(&s, "lr", "1e-3x", err, sizeof err);
    check(rc == -2, "lr option trailing junk rejected: '%s'", err);
    rc = lr_set_option(&s, "warmup-steps", "-5", err, sizeof err);
    check(rc == -2 && s.warmup_steps == 100, "warmup-steps -5 rejected: '%s'", err);
    rc = lr_set_option(&s, "lr-schedule", "linear", err, sizeof err);
    check(rc == -2 && s.kind == LR_COSINE, "lr-schedule 'linear' rejected: '%s'", err);
    lr_set_option(&s, "lr-steps", "10,20", err, sizeof err);
    rc = lr_set_option(&s, "lr-steps", "10,,20", err, sizeof err);
    check(rc == -2 && s.n_steps == 2 && s.steps[1] == 20, "lr-steps '10,,20' rejected, previous list kept: '%s'", err);
    rc = lr_set_option(&s, "lr-rates", "1e-4,abc", err, sizeof err);
    check(rc == -2 && s.n_rates == 0, "lr-rates '1e-4,abc' rejected: '%s'", err);
    rc = lr_set_option(&s, "lr-steps", "", err, sizeof err);
    check(rc == 0 && s.n_steps == 0, "lr-steps '' clears the list");
    s.lr = -1e-3;
    check(lr_validate(&s, 100, err, sizeof err) == -1, "lr -1e-3 rejected: '%s'", err);
    // --lr 0 (probing a checkpoint without moving it): accepted whatever lr-min
    // says, and every step's rate is exactly 0 in every schedule.
    {
        LrSchedule z;
        lr_schedule_default(&z);
        z.lr = 0;
        z.warmup_steps = 10;
        int zero_ok = lr_validate(&z, 100, err, sizeof err) == 0;
        const char *kinds[] = { "cosine", "const", "wsd", "multistep" };
        for (int k = 0; k < 4; k++) {
            lr_set_option(&z, "lr-schedule", kinds[k], err, sizeof err);
            if (z.kind == LR_MULTISTEP) {
                lr_set_option(&z, "lr-steps", "50", err, sizeof err);
                lr_set_option(&z, "lr-rates", "1e-4", err, sizeof err);
            }
            zero_ok &= lr_validate(&z, 100, err, sizeof err) == 0;
            for (int64_t t = 0; t < 100; t++) zero_ok &= lr_at(&z, t, 100) == 0.0;
        }
        check(zero_ok, "lr 0 accepted, every rate 0 (cosine, const, wsd, multistep)");
    }

    // Writing the options and setting them back gives the same schedule.
    LrSchedule w;
    lr_schedule_default(&w);
    lr_set_option(&w, "lr-schedule", "multistep", err, sizeof err);
    lr_set_option(&w, "lr", "7.8e-4", err, sizeof err);
    lr_set_option(&w, "lr-steps", "45211,50862", err, sizeof err);
    lr_set_option(&w, "lr-rates", "2.47e-4,7.8e-5", err, sizeof err);
    FILE *f = tmpfile();
    if (!f) {
        check(0, "tmpfile: %s", strerror(errno));
        return;
    }
    lr_schedule_write(&w, f);
    rewind(f);
    LrSchedule r;
    lr_schedule_default(&r);
    r.kind = LR_CONST;  // differ from w before reading back
    r.lr = 5;
    char line[1024];  // one key=value line
    int bad = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        char *eq = strchr(line, '=');
        if (!eq) { bad = 1; continue; }
        *eq = '\0';
        if (lr_set_option(&r, line, eq + 1, err, sizeof err) != 0) bad = 1;
    }
    fclose(f);
    int same = !bad && r.kind == w.kind && r.lr == w.lr && r.lr_min == w.lr_min && r.warmup_steps == w.warmup_steps &&
               r.n_steps == 2 && r.steps[0] == 45211 && r.steps[1] == 50862 && r.n_rates == 2 &&
               r.rates[0] == w.rates[0] && r.rates[1] == w.rates[1] && r.wsd_decay_frac == w.wsd_decay_frac &&
               r.wsd_shape == w.wsd_shape;
    check(same, "lr_schedule_write output reads back to the same schedule");
}

// ================================================================ checkpoints

static char tmpdir[256];  // the test's scratch directory

static void path_in(char *out, size_t n, const char *name) { snprintf(out, n, "%s/%s", tmpdir, name); }

// Reads a whole file into a new buffer; NULL if it cannot.
static uint8_t *slurp(const char *path, long *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    rewind(f);
    uint8_t *b = malloc((size_t)*size + 1);
    if (b && fread(b, 1, (size_t)*size, f) != (size_t)*size) {
        free(b);
        b = NULL;
    }
    fclose(f);
    return b;
}

static int spit(const char *path, const void *data, long size) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int ok = fwrite(data, 1, (size_t)size, f) == (size_t)size;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

// Test payloads.
enum { NPARAM = 100000 };
static float params[NPARAM];   // (NPARAM)
static float moments[NPARAM];  // (NPARAM)
static const char config_text[] = "d_model=32\nn_layers=3\n";
static const int64_t step_value = 1234;

// Writes a checkpoint with the test sections at path; 0 or -1.
static int write_test_ckpt(const char *path, float first_param) {
    char err[512];
    params[0] = first_param;
    CkptWriter *w = ckpt_writer_open(path, err, sizeof err);
    if (!w) {
        printf("     %s\n", err);
        return -1;
    }
    ckpt_write_section(w, "config", CKPT_TEXT, config_text, strlen(config_text));
    ckpt_write_section(w, "params", CKPT_F32, params, sizeof params);
    // Moments streamed in uneven pieces, as a GPU trainer copying chunks would.
    ckpt_section_begin(w, "adam_m", CKPT_F32, sizeof moments);
    const uint8_t *mb = (const uint8_t *)moments;
    size_t pieces[4] = { 4, 28, 36, sizeof moments - 68 };  // bytes per append
    for (int i = 0, off = 0; i < 4; off += (int)pieces[i], i++) ckpt_section_append(w, mb + off, pieces[i]);
    ckpt_section_end(w);
    ckpt_write_section(w, "step", CKPT_I64, &step_value, sizeof step_value);
    ckpt_write_section(w, "empty", CKPT_BYTES, NULL, 0);
    if (ckpt_writer_commit(w, err, sizeof err) != 0) {
        printf("     %s\n", err);
        return -1;
    }
    return 0;
}

static void test_hash(void) {
    uint8_t d[100];  // the pattern (i*7+3) mod 256
    for (int i = 0; i < 100; i++) d[i] = (uint8_t)(i * 7 + 3);
    uint64_t h0 = ckpt_hash("", 0), h3 = ckpt_hash("abc", 3), h100 = ckpt_hash(d, 100);
    // Reference values from the xxhash reference implementation (XXH64, seed 0).
    check(h0 == 0xEF46DB3751D8E999ULL && h3 == 0x44BC2CF5AD770999ULL && h100 == 0xA61F8D4C170FE531ULL,
          "XXH64 test vectors: '' %016llx, 'abc' %016llx, 100-byte pattern %016llx", (unsigned long long)h0,
          (unsigned long long)h3, (unsigned long long)h100);
}

static void test_ckpt_roundtrip(const char *path) {
    for (int i = 0; i < NPARAM; i++) {
        params[i] = (float)(test_uniform() - 0.5);
        moments[i] = (float)test_uniform();
    }
    check(write_test_ckpt(path, 0.25f) == 0, "checkpoint written");
    char tmp[600];  // a path + ".tmp"
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    check(!file_exists(tmp), "no .tmp left after commit");

    char err[512];
    Ckpt *ck = ckpt_open(path, err, sizeof err);
    check(ck != NULL, "checkpoint opens: %s", ck ? "ok" : err);
    if (!ck) return;
    check(ckpt_num_sections(ck) == 5, "5 sections (got %d)", ckpt_num_sections(ck));
    const CkptSection *ps = ckpt_find(ck, "params");
    check(ps && ps->dtype == CKPT_F32 && ps->nbytes == sizeof params && ps->hash == ckpt_hash(params, sizeof params),
          "section 'params': f32, %llu bytes, hash matches the data", ps ? (unsigned long long)ps->nbytes : 0ULL);
    const CkptSection *ms = ckpt_find(ck, "adam_m");
    check(ms && ms->hash == ckpt_hash(moments, sizeof moments), "streamed section hash equals one-shot hash");

    float *pr = malloc(sizeof params), *mr = malloc(sizeof moments);
    int64_t st = 0;
    int rc = ckpt_read(ck, "params", CKPT_F32, pr, sizeof params, err, sizeof err);
    rc |= ckpt_read(ck, "adam_m", CKPT_F32, mr, sizeof moments, err, sizeof err);
    rc |= ckpt_read(ck, "step", CKPT_I64, &st, sizeof st, err, sizeof err);
    rc |= ckpt_read(ck, "empty", CKPT_BYTES, NULL, 0, err, sizeof err);
    check(rc == 0 && pr && mr && memcmp(pr, params, sizeof params) == 0 && memcmp(mr, moments, sizeof moments) == 0 &&
          st == 1234,
          "sections read back bit-exactly (params, adam_m, step %lld, empty)", (long long)st);
    uint64_t tn = 0;
    char *text = ckpt_read_alloc(ck, "config", CKPT_TEXT, &tn, err, sizeof err);
    check(text && tn == strlen(config_text) && strcmp(text, config_text) == 0, "text section read back as a C string (%llu bytes)",
          (unsigned long long)tn);
    free(text);
    rc = ckpt_read(ck, "params", CKPT_F32, pr, sizeof params - 4, err, sizeof err);
    check(rc == -1 && strstr(err, path) && strstr(err, "params"), "wrong size rejected: '%s'", err);
    rc = ckpt_read(ck, "params", CKPT_I32, pr, sizeof params, err, sizeof err);
    check(rc == -1 && strstr(err, "f32"), "wrong dtype rejected: '%s'", err);
    rc = ckpt_read(ck, "adam_v", CKPT_F32, pr, sizeof params, err, sizeof err);
    check(rc == -1 && strstr(err, "adam_v"), "missing section rejected: '%s'", err);
    check(ckpt_verify(ck, err, sizeof err) == 0, "ckpt_verify passes on the good file");
    free(pr);
    free(mr);
    ckpt_close(ck);

    // Writer misuse is refused by name.
    CkptWriter *w = ckpt_writer_open(path, err, sizeof err);
    ckpt_write_section(w, "a", CKPT_BYTES, "x", 1);
    rc = ckpt_write_section(w, "a", CKPT_BYTES, "y", 1);
    check(rc == -1 && strstr(ckpt_writer_error(w), "duplicate"), "duplicate section name refused: '%s'",
          ckpt_writer_error(w));
    ckpt_writer_abort(w);
    w = ckpt_writer_open(path, err, sizeof err);
    rc = ckpt_write_section(w, "odd", CKPT_F32, "abcdef", 6);
    check(rc == -1, "f32 section of 6 bytes refused: '%s'", ckpt_writer_error(w));
    ckpt_writer_abort(w);
}

// Writes a damaged copy of the good file and checks that opening it (and,
// if it opens, verifying it) fails with a message naming the file and `want`.
static void expect_rejected(const char *what, const uint8_t *data, long size, const char *want) {
    char bad[512];
    path_in(bad, sizeof bad, "damaged.bin");
    if (spit(bad, data, size) != 0) {
        check(0, "%s: cannot write test file", what);
        return;
    }
    char err[512] = "";
    Ckpt *ck = ckpt_open(bad, err, sizeof err);
    int rejected = ck == NULL;
    if (ck) {
        rejected = ckpt_verify(ck, err, sizeof err) != 0;
        ckpt_close(ck);
    }
    check(rejected && strstr(err, bad) && strstr(err, want), "%s rejected: '%s'", what, err);
    unlink(bad);
}

static void test_ckpt_corruption(const char *path) {
    long size;
    uint8_t *good = slurp(path, &size);
    if (!good) {
        check(0, "cannot read back %s", path);
        return;
    }
    uint8_t *b = malloc((size_t)size + 16);
    if (!b) {
        free(good);
        return;
    }
    expect_rejected("truncated by 1 byte", good, size - 1, "truncated");
    expect_rejected("truncated to half", good, size / 2, "truncated");
    expect_rejected("truncated to 10 bytes", good, 10, "truncated");
    expect_rejected("empty file", good, 0, "truncated");
    memcpy(b, good, (size_t)size);
    memset(b + size, 0, 16);
    expect_rejected("16 extra bytes", b, size + 16, "extra bytes");

    // The params payload starts after the header (64) and the config text.
    long params_at = 64 + (long)strlen(config_text) + 1000;
    memcpy(b, good, (size_t)size);
    b[params_at] ^= 0x01;
    expect_rejected("one flipped bit in the params payload", b, size, "'params' is corrupt");

    // The table is the last 5 * 104 bytes; flip a byte of entry 2's nbytes field.
    long table_at = size - 5 * 104;
    memcpy(b, good, (size_t)size);
    b[table_at + 104 + 80] ^= 0x40;
    expect_rejected("a flipped byte in the section table", b, size, "entry 2 of 5");
    memcpy(b, good, (size_t)size);
    b[table_at + 104 + 2] ^= 0x20;  // entry 2's name
    expect_rejected("a flipped byte in a section name", b, size, "entry 2 of 5");

    memcpy(b, good, (size_t)size);
    b[0] = 'X';
    expect_rejected("wrong magic", b, size, "bad magic");
    memcpy(b, good, (size_t)size);
    b[17] ^= 0x01;  // table offset
    expect_rejected("a flipped byte in the header", b, size, "header is corrupt");
    memcpy(b, good, (size_t)size);
    b[8] = 2;  // version
    expect_rejected("version 2", b, size, "version 2");
    free(b);
    free(good);
}

// In a child process whose file-size limit is 64 KiB, writing a bigger
// checkpoint must fail at some write or flush and be reported by the commit.
static void test_failed_write(const char *path) {
    long size0;
    uint8_t *before = slurp(path, &size0);
    fflush(stdout);  // or the child would print the parent's buffered lines again
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);  // get EFBIG from write() instead of being killed
        struct rlimit rl = { 64 * 1024, 64 * 1024 };
        setrlimit(RLIMIT_FSIZE, &rl);
        char err[512];
        CkptWriter *w = ckpt_writer_open(path, err, sizeof err);
        if (!w) _exit(2);
        ckpt_write_section(w, "params", CKPT_F32, params, sizeof params);  // 400 KB
        int rc = ckpt_writer_commit(w, err, sizeof err);
        printf("     commit under a 64 KiB file-size limit: rc %d, '%s'\n", rc, err);
        fflush(stdout);
        _exit(rc == -1 && strstr(err, ".tmp") ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "write failing with EFBIG makes commit fail (child status %d)",
          WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    long size1;
    uint8_t *after = slurp(path, &size1);
    char tmp[600];  // a path + ".tmp"
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    check(before && after && size0 == size1 && memcmp(before, after, (size_t)size0) == 0 && !file_exists(tmp),
          "after the failed write: existing checkpoint unchanged (%ld bytes), no .tmp left", size1);
    free(after);

    // Declared 100 bytes, appended 50: the commit fails the same way.
    char err[512];
    CkptWriter *w = ckpt_writer_open(path, err, sizeof err);
    ckpt_section_begin(w, "short", CKPT_BYTES, 100);
    ckpt_section_append(w, params, 50);
    ckpt_section_end(w);
    int rc = ckpt_writer_commit(w, err, sizeof err);
    after = slurp(path, &size1);
    check(rc == -1 && strstr(err, "fewer bytes") && after && size1 == size0 && memcmp(before, after, (size_t)size0) == 0 &&
          !file_exists(tmp),
          "short section: commit fails, checkpoint unchanged, no .tmp: '%s'", err);
    free(after);

    // Abort after writing sections: nothing changes.
    w = ckpt_writer_open(path, err, sizeof err);
    ckpt_write_section(w, "params", CKPT_F32, params, sizeof params);
    ckpt_writer_abort(w);
    after = slurp(path, &size1);
    check(after && size1 == size0 && memcmp(before, after, (size_t)size0) == 0 && !file_exists(tmp),
          "aborted write: checkpoint unchanged, no .tmp");
    free(after);

    // A new file at a path that did not exist: abort leaves no file at all.
    char fresh[512];
    path_in(fresh, sizeof fresh, "fresh.bin");
    w = ckpt_writer_open(fresh, err, sizeof err);
    ckpt_write_section(w, "x", CKPT_BYTES, "x", 1);
    ckpt_writer_abort(w);
    snprintf(tmp, sizeof tmp, "%s.tmp", fresh);
    check(!file_exists(fresh) && !file_exists(tmp), "aborted first write leaves no final file and no .tmp");

    // Writing into a directory that does not exist fails at open, naming the file.
    char nodir[512];
    path_in(nodir, sizeof nodir, "no/such/dir/ckpt.bin");
    w = ckpt_writer_open(nodir, err, sizeof err);
    check(w == NULL && strstr(err, nodir), "writer open in a missing directory fails: '%s'", err);

    // A successful rewrite replaces the file.
    check(write_test_ckpt(path, 0.75f) == 0, "rewrite of the same checkpoint commits");
    Ckpt *ck = ckpt_open(path, err, sizeof err);
    float p0 = 0;
    if (ck) {
        float *pr = malloc(sizeof params);
        if (pr && ckpt_read(ck, "params", CKPT_F32, pr, sizeof params, err, sizeof err) == 0) p0 = pr[0];
        free(pr);
        ckpt_close(ck);
    }
    check(p0 == 0.75f, "rewritten checkpoint holds the new data (params[0] = %g, want 0.75)", p0);
    free(before);
}

static void test_ckpt_dir(void) {
    char dir[512], p[600], err[1024];  // p: a file in dir
    path_in(dir, sizeof dir, "run");
    char out[512];
    int64_t step = -1;
    int rc = ckpt_latest(dir, 0, out, sizeof out, &step, err, sizeof err);
    check(rc == 1, "latest in a missing directory: rc %d (want 1: none)", rc);
    mkdir(dir, 0700);
    rc = ckpt_latest(dir, 0, out, sizeof out, &step, err, sizeof err);
    check(rc == 1, "latest in an empty directory: rc %d (want 1: none)", rc);

    ckpt_path(p, sizeof p, dir, 1234);
    check(strstr(p, "/ckpt_00001234.bin") != NULL, "ckpt_path: %s", p);
    const int64_t steps[3] = { 100, 300, 200 };
    for (int i = 0; i < 3; i++) {
        ckpt_path(p, sizeof p, dir, steps[i]);
        write_test_ckpt(p, (float)steps[i]);
    }
    // Distractors: an unfinished write of a newer step, a non-canonical name, another file.
    snprintf(p, sizeof p, "%s/ckpt_00000400.bin.tmp", dir);
    spit(p, "garbage", 7);
    snprintf(p, sizeof p, "%s/ckpt_5000.bin", dir);
    spit(p, "garbage", 7);
    snprintf(p, sizeof p, "%s/notes.txt", dir);
    spit(p, "hello", 5);

    int64_t *list;
    int n;
    rc = ckpt_list(dir, &list, &n, err, sizeof err);
    check(rc == 0 && n == 3 && list[0] == 100 && list[1] == 200 && list[2] == 300,
          "ckpt_list: %d checkpoints %lld %lld %lld (want 100 200 300; .tmp and others ignored)", n,
          n > 0 ? (long long)list[0] : -1LL, n > 1 ? (long long)list[1] : -1LL, n > 2 ? (long long)list[2] : -1LL);
    free(list);
    rc = ckpt_latest(dir, 0, out, sizeof out, &step, err, sizeof err);
    check(rc == 0 && step == 300 && strstr(out, "ckpt_00000300.bin"), "latest: rc %d, step %lld, %s", rc,
          (long long)step, out);

    // Damage the newest: refused loudly by default, skipped with fallback.
    char newest[512];
    ckpt_path(newest, sizeof newest, dir, 300);
    long size;
    uint8_t *data = slurp(newest, &size);
    if (data) {
        data[200] ^= 0x10;
        spit(newest, data, size);
        free(data);
    }
    rc = ckpt_latest(dir, 0, out, sizeof out, &step, err, sizeof err);
    check(rc == -1 && strstr(err, newest), "latest with a damaged newest, no fallback: rc %d, '%s'", rc, err);
    fprintf(stderr, "(expected warning follows)\n");
    rc = ckpt_latest(dir, 1, out, sizeof out, &step, err, sizeof err);
    check(rc == 0 && step == 200, "latest with fallback skips it: rc %d, step %lld", rc, (long long)step);

    // Prune to the last 2: 100 goes; the .tmp and other names stay.
    rc = ckpt_prune(dir, 2, 300, err, sizeof err);
    ckpt_list(dir, &list, &n, err, sizeof err);
    snprintf(p, sizeof p, "%s/ckpt_00000400.bin.tmp", dir);
    check(rc == 1 && n == 2 && list[0] == 200 && list[1] == 300 && file_exists(p),
          "prune keep 2: deleted %d, left %d (%lld, %lld), .tmp untouched", rc, n, n > 0 ? (long long)list[0] : -1LL,
          n > 1 ? (long long)list[1] : -1LL);
    free(list);
    // A resumed run that just wrote step 250 next to a stale newer 300: keep 1
    // keeps 300 (the newest) and 250 (protected), deletes 200.
    ckpt_path(p, sizeof p, dir, 250);
    write_test_ckpt(p, 250.0f);
    rc = ckpt_prune(dir, 1, 250, err, sizeof err);
    ckpt_list(dir, &list, &n, err, sizeof err);
    check(rc == 1 && n == 2 && list[0] == 250 && list[1] == 300,
          "prune keep 1 protecting the step just written (250): deleted %d, left %lld %lld", rc,
          n > 0 ? (long long)list[0] : -1LL, n > 1 ? (long long)list[1] : -1LL);
    free(list);
    rc = ckpt_prune(dir, 0, -1, err, sizeof err);
    check(rc == 0, "prune keep 0 deletes nothing (%d)", rc);
}

// A header whose reserved bytes are not zero, its checksum recomputed: the
// checksum cannot catch it, the reader must.
static void test_ckpt_reserved(const char *path) {
    long size;
    uint8_t *b = slurp(path, &size);
    if (!b) {
        check(0, "cannot read back %s", path);
        return;
    }
    b[40] = 1;
    uint64_t h = ckpt_hash(b, 56);
    for (int i = 0; i < 8; i++) b[56 + i] = (uint8_t)(h >> (8 * i));
    expect_rejected("a non-zero reserved header byte (valid header checksum)", b, size, "reserved header byte 40");
    free(b);
}

static void on_hang(int sig) {
    (void)sig;
    static const char msg[] = "FAIL a reader blocked on a FIFO (alarm)\n";
    if (write(1, msg, sizeof msg - 1) < 0) {}
    _exit(1);
}

// A FIFO named like a checkpoint: refused at once (opening it for reading
// would otherwise wait for a writer forever; the alarm catches that).
static void test_ckpt_fifo(void) {
    char fifo[512], err[1024] = "";
    path_in(fifo, sizeof fifo, "ckpt_fifo.bin");
    if (mkfifo(fifo, 0600) != 0) {
        check(0, "mkfifo %s: %s", fifo, strerror(errno));
        return;
    }
    signal(SIGALRM, on_hang);
    alarm(20);
    Ckpt *ck = ckpt_open(fifo, err, sizeof err);
    alarm(0);
    check(!ck && strstr(err, fifo) && strstr(err, "a FIFO, not a regular file"), "a FIFO as a checkpoint: '%s'", err);
    ckpt_close(ck);
    check(ckpt_open("/dev/zero", err, sizeof err) == NULL && strstr(err, "a character device"),
          "/dev/zero as a checkpoint: '%s'", err);
    unlink(fifo);
}

// flock(2) locks belong to an open file description: a second open of the
// lock file in this same process contends exactly as a second trainer would.
static void test_ckpt_lock(void) {
    char dir[512], file[512], err[1024] = "";
    path_in(dir, sizeof dir, "locked/run");
    int a = ckpt_dir_lock(dir, err, sizeof err);
    struct stat st;
    check(a >= 0 && stat(dir, &st) == 0 && S_ISDIR(st.st_mode), "lock creates the directory and its parent: %s", dir);
    int b = ckpt_dir_lock(dir, err, sizeof err);
    check(b < 0 && strstr(err, "in use by another trainer") && strstr(err, CKPT_LOCK_NAME),
          "a second lock on the same directory is refused: '%s'", err);
    ckpt_dir_unlock(a);
    int c = ckpt_dir_lock(dir, err, sizeof err);
    check(c >= 0, "after unlock the directory can be locked again");
    ckpt_dir_unlock(c);
    path_in(file, sizeof file, "plain_file");
    spit(file, "x", 1);
    check(ckpt_dir_lock(file, err, sizeof err) < 0 && strstr(err, "not a directory"),
          "a file as the checkpoint directory: '%s'", err);
    char sub[600];
    snprintf(sub, sizeof sub, "%s/below", file);
    check(ckpt_dir_lock(sub, err, sizeof err) < 0 && strstr(err, "cannot create checkpoint directory"),
          "a directory below a file: '%s'", err);
}

// The config's closed-form counts against the layout's tensor-by-tensor sum,
// the bounds, and overflow.
static void test_config_counts(void) {
    const char *names[] = { "tiny", "small", "1b", "3b" };
    for (int v = 0; v < 4 * 4; v++) {
        MoeConfig c;
        config_preset(&c, names[v / 4]);
        if (v % 4 == 1) c.tie_embeddings = 1;
        if (v % 4 == 2) c.n_shared = 0, c.n_dense = 0;
        if (v % 4 == 3) c.n_dense = c.n_layers; // no MoE layer at all
        char err[256];
        int valid = config_validate(&c, err, sizeof err) == 0;
        ParamLayout lay;
        layout_build(&lay, &c);
        check(valid && lay.total == config_total_params(&c), "%s variant %d: config counts %lld, layout holds %lld",
              names[v / 4], v % 4, (long long)config_total_params(&c), (long long)lay.total);
        layout_free(&lay);
    }
    MoeConfig c;
    config_preset(&c, "tiny");
    c.n_layers = 1024; c.d_model = 65536; c.n_routed = 65536; c.d_expert = 1 << 20; c.n_shared = 0;
    check(config_total_params(&c) == -1, "a count past 2^63 is reported as -1 (%lld)",
          (long long)config_total_params(&c));
    char err[256];
    check(config_validate(&c, err, sizeof err) != 0 && strstr(err, "over 9223372036854775807"),
          "and rejected: '%s'", err);
    struct { const char *field; int value; const char *want; } bad[] = {
        { "n_layers", 2000000000, "n_layers must be in [1, 1024]" },
        { "d_model", 65538, "d_model must be in [2, 65536]" },
        { "seq_len", 0, "seq_len must be in [1, 1048576]" },
        { "n_heads", 0, "n_heads must be in [1, 32]" },
        { "top_k", 9, "top_k must be in [1, 8]" },
        { "n_routed", -1, "n_routed must be in [1, 65536]" },
        { "vocab_size", 1, "vocab_size must be in [2, 2147483647]" },
        { "n_shared", 1 << 20, "n_shared must be in [0, 65536]" },
        { "d_expert", 1 << 20, "n_shared x d_expert" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        config_preset(&c, "tiny");
        char v[32];
        snprintf(v, sizeof v, "%d", bad[i].value);
        config_set(&c, bad[i].field, v);
        int rc = config_validate(&c, err, sizeof err);
        check(rc != 0 && strstr(err, bad[i].want), "%s = %d rejected: '%s'", bad[i].field, bad[i].value, err);
    }
}

// The text form of a checkpoint's model: complete, each field once.
static void test_config_text(void) {
    MoeConfig c = ckpt_test_model(), back;
    char *text = NULL, err[512];
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    config_write(&c, m);
    fclose(m);
    int rc = config_parse_text(&back, text, len, "T", err, sizeof err);
    check(rc == 0 && memcmp(&back, &c, sizeof c) == 0, "config_write text parses back to the same config");
    struct { const char *what, *text, *want; } bad[] = {
        { "empty", "", "T: field 'vocab_size' is missing" },
        { "one field", "d_model=32\n", "field 'vocab_size' is missing" },
        { "unknown field", "colour=red\n", "T:1: unknown model field 'colour'" },
        { "no '='", "d_model 32\n", "T:1: expected key = value" },
        { "a NUL byte", "d_model=3\0002\n", "NUL byte" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t n = strlen(bad[i].text) + (strstr(bad[i].what, "NUL") ? 3 : 0); // the bytes after the NUL
        rc = config_parse_text(&back, bad[i].text, n, "T", err, sizeof err);
        check(rc != 0 && strstr(err, bad[i].want), "model text, %s: '%s'", bad[i].what, err);
    }
    char *twice = malloc(len + 32);
    snprintf(twice, len + 32, "%sd_model=8\n", text);
    rc = config_parse_text(&back, twice, strlen(twice), "T", err, sizeof err);
    check(rc != 0 && strstr(err, "field 'd_model' appears twice"), "a field given twice: '%s'", err);
    char *zero = malloc(len + 1);
    memcpy(zero, text, len + 1);
    char *h = strstr(zero, "n_heads=");
    h[8] = '0'; // n_heads=2 -> n_heads=0
    rc = config_parse_text(&back, zero, len, "T", err, sizeof err);
    check(rc != 0 && strstr(err, "T: n_heads must be in"), "a complete but invalid config: '%s'", err);
    free(twice);
    free(zero);
    free(text);
}

// util_kv_next on texts from memory: lines up to the buffer and one beyond it.
static void test_kv_lines(void) {
    char line[16], err[256], *k = NULL, *v = NULL;
    struct { const char *what, *text; int want_rc, want_line; const char *want; } cases[] = {
        { "15 characters fit a 16-byte buffer", "abcdefg=1234567\n", 1, 1, NULL },
        { "16 characters do not", "abcdefg=12345678\n", -1, 1, "X:1: line longer than 15 characters" },
        { "a long comment is no setting", "# x\n#23456789012345 a=b\n", -1, 2, "X:2: line longer" },
        { "comments and blank lines skipped", "  # c\n\n a = b # c\r\n", 1, 3, NULL },
        { "no '='", "abc\n", -1, 1, "X:1: expected key = value" },
        { "last line without newline", "\na=b", 1, 2, NULL },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        FILE *f = fmemopen((void *)cases[i].text, strlen(cases[i].text), "r");
        int lineno = 0;
        err[0] = '\0';
        int rc = util_kv_next(f, "X", 1, line, sizeof line, &lineno, &k, &v, err, sizeof err);
        fclose(f);
        int good = rc == cases[i].want_rc && lineno == cases[i].want_line &&
                   (cases[i].want ? strstr(err, cases[i].want) != NULL
                                  : (i != 3 || (strcmp(k, "a") == 0 && strcmp(v, "b") == 0)));
        check(good, "kv line reader, %s: rc %d, line %d, '%s'", cases[i].what, rc, lineno, err);
    }
}

// A training checkpoint's content: written and read back bit for bit, and a
// NaN in a moment or a negative step refused naming the file and section.
static void test_ckpt_state(void) {
    char path[512], err[1024];
    path_in(path, sizeof path, "state.bin");
    CkptState st = { .cfg = ckpt_test_model(), .options = "lr = 0.001\n", .step = 42, .loader = { 1, 2, 3 }, .rng = 7 };
    st.n_params = config_total_params(&st.cfg);
    size_t np = (size_t)st.n_params, nb = (size_t)config_n_moe(&st.cfg) * st.cfg.n_routed;
    float *mem = malloc(sizeof(float) * (3 * np + nb));
    for (size_t i = 0; i < 3 * np + nb; i++) mem[i] = (float)(i % 97) * 0.01f;
    st.params = mem, st.adam_m = mem + np, st.adam_v = mem + 2 * np, st.bias = mem + 3 * np;
    int rc = ckpt_state_write(&st, path, err, sizeof err);
    CkptState got = { 0 };
    rc = rc || ckpt_state_open(&got, path, err, sizeof err) || ckpt_state_load(&got, 1, err, sizeof err);
    check(rc == 0 && got.step == 42 && got.loader[2] == 3 && got.rng == 7 && strcmp(got.options, st.options) == 0 &&
          memcmp(&got.cfg, &st.cfg, sizeof st.cfg) == 0 && memcmp(got.params, st.params, np * 4) == 0 &&
          memcmp(got.adam_v, st.adam_v, np * 4) == 0 && memcmp(got.bias, st.bias, nb * 4) == 0,
          "checkpoint state written and read back bit for bit (%lld parameters)", (long long)np);
    if (rc == 0) ckpt_state_close(&got);
    st.adam_m[7] = NAN;
    memset(&got, 0, sizeof got);
    rc = ckpt_state_write(&st, path, err, sizeof err) || ckpt_state_open(&got, path, err, sizeof err);
    rc = rc || ckpt_state_load(&got, 1, err, sizeof err);
    check(rc != 0 && strstr(err, path) && strstr(err, "section 'adam_m': element 7"), "NaN moment: '%s'", err);
    ckpt_state_close(&got);
    st.adam_m[7] = 0;
    st.step = -3;
    memset(&got, 0, sizeof got);
    rc = ckpt_state_write(&st, path, err, sizeof err) || ckpt_state_open(&got, path, err, sizeof err);
    rc = rc || ckpt_state_load(&got, 1, err, sizeof err);
    check(rc != 0 && strstr(err, "section 'step': value -3 is negative"), "negative step: '%s'", err);
    ckpt_state_close(&got);
    // The config decides the sizes, checked against the file's table before
    // anything is allocated: a model_config claiming 8 experts per layer over
    // sections written for 4 is refused.
    st.step = 1;
    rc = ckpt_state_write(&st, path, err, sizeof err);
    CkptImage im;
    rc = rc || ckpt_image_read(&im, path, err, sizeof err);
    int i = rc ? -1 : ckpt_image_find(&im, "model_config");
    if (i >= 0) {
        char *t = (char *)im.data[i], *e = strstr(t, "n_routed=4");
        if (e) e[9] = '8';
        ckpt_image_set(&im, i, t, strlen(t));
        rc = ckpt_image_write(&im, path, err, sizeof err);
        ckpt_image_free(&im);
    }
    memset(&got, 0, sizeof got);
    rc = rc || ckpt_state_open(&got, path, err, sizeof err);
    rc = rc || ckpt_state_load(&got, 1, err, sizeof err);
    check(rc != 0 && strstr(err, "section 'bias' has 16 bytes; its model_config implies 32"),
          "a model_config bigger than the sections: '%s'", err);
    ckpt_state_close(&got);
    free(mem);
    unlink(path);
}

// Removes the files of a directory (one level) and the directory.
static void remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *de;
    char p[1024];
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        if (unlink(p) != 0) remove_dir(p);
    }
    closedir(d);
    rmdir(dir);
}

int main(void) {
    DecayRanges dr;
    test_decay_ranges(&dr);
    test_adamw_values(&dr);
    decay_ranges_free(&dr);
    test_adamw_threads();
    test_adamw_options();
    test_grad_norm();
    test_lr_cosine();
    test_lr_multistep();
    test_lr_const_wsd();
    test_lr_options();

    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/test_train_infra_XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    char path[512];
    path_in(path, sizeof path, "ckpt_00000007.bin");
    test_hash();
    test_ckpt_roundtrip(path);
    test_ckpt_corruption(path);
    test_failed_write(path);
    test_ckpt_reserved(path);
    test_ckpt_fifo();
    test_ckpt_dir();
    test_ckpt_lock();
    test_config_counts();
    test_config_text();
    test_kv_lines();
    test_ckpt_state();
    remove_dir(tmpdir);

    return check_summary("test_train_infra");
}
