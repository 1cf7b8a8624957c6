// Tests of the load-balancing policy (model/balance.c): every update rule and
// schedule against hand-computed values, MaxVio and the metrics on hand examples,
// option parsing, and a synthetic convergence test in which a fixed generator of
// skewed router affinities is routed by TopK of s + b (or s * b) for 1500 steps
// with no training, to see each rule drive MaxVio_batch down to the noise floor
// of a perfectly balanced random assignment (docs/balance.md has the numbers).
// Prints one line per check with the measured numbers; exits 1 on any failure.
#include "../model/balance.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

// One line per check: "ok" or "FAIL", its name, then fmt applied to the two
// measured numbers a and b.
static void check(int ok, const char *name, const char *fmt, double a, double b) {
    printf("%s %s: ", ok ? "ok  " : "FAIL", name);
    printf(fmt, a, b);
    printf("\n");
    if (!ok) failures++;
}

// |got - want| <= tol, printed as "got X want Y".
static void check_near(const char *name, double got, double want, double tol) {
    check(fabs(got - want) <= tol, name, "got %.9g want %.9g", got, want);
}

static void check_int(const char *name, long long got, long long want) {
    check(got == want, name, "got %.0f want %.0f", (double)got, (double)want);
}

// Every bias against its hand value.
static void check_vec(const char *name, const float *got, const double *want, int n, double tol) {
    double worst = 0.0; // largest |got - want|
    for (int i = 0; i < n; i++)
        if (fabs(got[i] - want[i]) > worst) worst = fabs(got[i] - want[i]);
    check(worst <= tol, name, "max |error| %.3g (tol %.3g)", worst, tol);
}

// A config from option pairs, NULL-terminated; fails the test on a rejected option.
static BalanceConfig make_cfg(const char *const *kv) {
    BalanceConfig c;
    char err[256]; // message of a rejected option
    balance_config_default(&c);
    for (int i = 0; kv && kv[i]; i += 2)
        if (balance_set_option(&c, kv[i], kv[i + 1], err, sizeof(err)) != 0) {
            printf("FAIL option %s %s: %s\n", kv[i], kv[i + 1], err);
            failures++;
        }
    if (balance_validate(&c, err, sizeof(err)) != 0) {
        printf("FAIL validate: %s\n", err);
        failures++;
    }
    return c;
}

// ----------------------------------------------------------------------------
// Rules

static void test_sign_rule(void) {
    const char *kv[] = {"--gamma", "0.001", NULL};
    BalanceConfig c = make_cfg(kv);
    float b[4] = {0, 0, 0, 0};
    float g = balance_gamma_at(&c, 0, 100);
    // E=4, K=1, N=8: mean 2. Step 1: overloaded, exactly balanced (sign 0), under, idle.
    const int64_t c1[4] = {5, 2, 1, 0};
    balance_update_layer(&c, g, c1, 4, 1, 8, b);
    const double w1[4] = {-0.001, 0, 0.001, 0.001};
    check_vec("sign step 1 (sign(0)=0 for expert 1)", b, w1, 4, 1e-9);
    // Step 2: perfectly balanced, nothing moves.
    const int64_t c2[4] = {2, 2, 2, 2};
    balance_update_layer(&c, g, c2, 4, 1, 8, b);
    check_vec("sign step 2 balanced: no change", b, w1, 4, 1e-9);
    // Step 3.
    const int64_t c3[4] = {0, 3, 3, 2};
    balance_update_layer(&c, g, c3, 4, 1, 8, b);
    const double w3[4] = {0, -0.001, 0, 0.001};
    check_vec("sign step 3", b, w3, 4, 1e-9);
    // Non-integer mean 4/3 (E=3, K=1, N=4): no expert is exactly at the mean.
    float b2[3] = {0, 0, 0};
    const int64_t c4[3] = {2, 1, 1};
    balance_update_layer(&c, g, c4, 3, 1, 4, b2);
    const double w4[3] = {-0.001, 0.001, 0.001};
    check_vec("sign with mean 4/3", b2, w4, 3, 1e-9);
}

static void test_prop_rule(void) {
    const char *kv[] = {"--gamma-rule", "prop", "--gamma", "0.01", NULL};
    BalanceConfig c = make_cfg(kv);
    float b[4] = {0, 0, 0, 0};
    float g = balance_gamma_at(&c, 0, 100);
    // E=4, K=2, N=4: mean 2; (mean - c) / mean = -1, 0, 0.5, 0.5.
    const int64_t c1[4] = {4, 2, 1, 1};
    balance_update_layer(&c, g, c1, 4, 2, 4, b);
    const double w1[4] = {-0.01, 0, 0.005, 0.005};
    check_vec("prop step 1", b, w1, 4, 3e-9);
    // (mean - c) / mean = -0.5, -0.5, 0.5, 0.5.
    const int64_t c2[4] = {3, 3, 1, 1};
    balance_update_layer(&c, g, c2, 4, 2, 4, b);
    const double w2[4] = {-0.015, -0.005, 0.01, 0.01};
    check_vec("prop step 2", b, w2, 4, 3e-9);
    // Batch-size invariance: 10x the tokens and counts give the same step.
    float b3[4] = {0, 0, 0, 0};
    const int64_t c3[4] = {40, 20, 10, 10};
    balance_update_layer(&c, g, c3, 4, 2, 40, b3);
    check_vec("prop step independent of batch size", b3, w1, 4, 3e-9);
}

static void test_center(void) {
    const char *kv[] = {"--gamma", "0.001", "--gamma-center", "1", NULL};
    BalanceConfig c = make_cfg(kv);
    float b[4] = {0, 0, 0, 0};
    float g = balance_gamma_at(&c, 0, 100);
    // Signs -1, 0, 1, 1 have mean 0.25: steps -1.25, -0.25, 0.75, 0.75 (x gamma).
    const int64_t c1[4] = {5, 2, 1, 0};
    balance_update_layer(&c, g, c1, 4, 1, 8, b);
    const double w1[4] = {-0.00125, -0.00025, 0.00075, 0.00075};
    check_vec("centred sign step", b, w1, 4, 1e-9);
    check_near("centred step sums to 0", (double)b[0] + b[1] + b[2] + b[3], 0.0, 1e-9);
    const char *kv2[] = {"--gamma-rule", "prop", "--gamma", "0.01", "--gamma-center", "1", NULL};
    BalanceConfig c2 = make_cfg(kv2);
    float p[4] = {0, 0, 0, 0};
    const int64_t cp[4] = {7, 1, 0, 0}; // mean 2: errors -2.5, 0.5, 1, 1 (sum 0 already)
    balance_update_layer(&c2, balance_gamma_at(&c2, 0, 1), cp, 4, 1, 8, p);
    const double wp[4] = {-0.025, 0.005, 0.01, 0.01};
    check_vec("centred prop step (already zero-sum)", p, wp, 4, 3e-9);
}

static void test_mult_rule(void) {
    const char *kv[] = {"--gamma-rule", "mult", "--gamma", "0.5", NULL};
    BalanceConfig c = make_cfg(kv);
    check_int("mult is multiplicative", balance_bias_is_multiplicative(&c), 1);
    check_near("mult bias starts at 1", balance_bias_init_value(&c), 1.0, 0);
    float b[4];
    balance_bias_init(&c, b, 1, 4);
    float g = balance_gamma_at(&c, 0, 100);
    const int64_t c1[4] = {5, 2, 1, 0};
    balance_update_layer(&c, g, c1, 4, 1, 8, b);
    const double w1[4] = {exp(-0.5), 1.0, exp(0.5), exp(0.5)};
    check_vec("mult step 1: b *= exp(gamma sign)", b, w1, 4, 1e-6);
    // Up then down returns to the start: exp(g) exp(-g) = 1 (up to fp32 rounding).
    const int64_t c2[4] = {0, 2, 3, 3};
    balance_update_layer(&c, g, c2, 4, 1, 8, b);
    const double w2[4] = {1.0, 1.0, 1.0, 1.0};
    check_vec("mult step 2: back to 1", b, w2, 4, 1e-6);
    // 20 steps of overload: exp(-10), still positive.
    for (int t = 0; t < 20; t++) balance_update_layer(&c, g, c1, 4, 1, 8, b);
    check(b[0] > 0 && fabs(b[0] / exp(-10.0) - 1) < 1e-5, "mult 20 overloaded steps",
          "b0 %.6g want %.6g", b[0], exp(-10.0));
    // 400 more steps: exp(-210) is below fp32 range, yet b stays positive.
    for (int t = 0; t < 400; t++) balance_update_layer(&c, g, c1, 4, 1, 8, b);
    check(b[0] > 0 && isfinite(b[2]), "mult stays positive and finite", "b0 %.3g b2 %.3g", b[0], b[2]);
}

// ----------------------------------------------------------------------------
// Schedules

static double gamma_of(const char *sched, int64_t t, int64_t total) {
    const char *kv[] = {"--gamma", "0.01", "--gamma-schedule", sched, "--gamma-tau", "100",
                        "--gamma-min", "0.001", "--gamma-stop-frac", "0.9", NULL};
    BalanceConfig c = make_cfg(kv);
    return balance_gamma_at(&c, t, total);
}

static void test_schedules(void) {
    const double tol = 1e-9; // gamma is returned as fp32: ~1e-10 at 0.01
    check_near("const t=0", gamma_of("const", 0, 1000), 0.01, tol);
    check_near("const t=999", gamma_of("const", 999, 1000), 0.01, tol);
    check_near("inv t=0", gamma_of("inv", 0, 1000), 0.01, tol);
    check_near("inv t=100 (tau)", gamma_of("inv", 100, 1000), 0.005, tol);
    check_near("inv t=300", gamma_of("inv", 300, 1000), 0.0025, tol);
    check_near("invsqrt t=0", gamma_of("invsqrt", 0, 1000), 0.01, tol);
    check_near("invsqrt t=300", gamma_of("invsqrt", 300, 1000), 0.005, tol);
    check_near("invsqrt t=800", gamma_of("invsqrt", 800, 1000), 0.01 / 3, tol);
    check_near("cosine t=0 is gamma", gamma_of("cosine", 0, 1001), 0.01, tol);
    check_near("cosine t=250", gamma_of("cosine", 250, 1001), 0.001 + 0.009 * (1 + sqrt(0.5)) / 2, tol);
    check_near("cosine t=500 is the midpoint", gamma_of("cosine", 500, 1001), 0.0055, tol);
    check_near("cosine last step is gamma-min", gamma_of("cosine", 1000, 1001), 0.001, tol);
    check_near("cosine past the end stays gamma-min", gamma_of("cosine", 5000, 1001), 0.001, tol);
    check_near("stop t=899 of 1000", gamma_of("stop", 899, 1000), 0.01, tol);
    check_near("stop t=900 of 1000", gamma_of("stop", 900, 1000), 0.0, 0);
    check_near("stop t=900 of 1001 (0.9*1001=900.9 -> 901)", gamma_of("stop", 900, 1001), 0.01, tol);
    check_near("stop t=901 of 1001", gamma_of("stop", 901, 1001), 0.0, 0);

    // Through balance_update: the bias freezes at the stop step.
    const char *kv[] = {"--gamma-schedule", "stop", "--gamma-stop-frac", "0.5", NULL};
    BalanceConfig c = make_cfg(kv);
    float b[2] = {0, 0};
    const int64_t cnt[2] = {3, 1}; // E=2, K=1, N=4
    for (int64_t t = 0; t < 10; t++) balance_update(&c, t, 10, cnt, 1, 2, 1, 4, b);
    check_near("stop via balance_update: 5 of 10 steps applied", b[0], -0.005, 1e-9);
}

// ----------------------------------------------------------------------------
// Counts, MaxVio, metrics

static void test_maxvio_and_counts(void) {
    const int64_t flat[4] = {2, 2, 2, 2};
    check_near("maxvio balanced", balance_maxvio(flat, 4, 1, 8), 0.0, 0);
    const int64_t hand[4] = {9, 5, 4, 2}; // K=2, N=10, mean 5: (9-5)/5
    check_near("maxvio hand example", balance_maxvio(hand, 4, 2, 10), 0.8, 1e-15);
    const int64_t third[3] = {2, 1, 1}; // mean 4/3: (2 - 4/3) / (4/3)
    check_near("maxvio mean 4/3", balance_maxvio(third, 3, 1, 4), 0.5, 1e-15);

    check_int("counts summing to K*N accepted", balance_check_counts(hand, 4, 2, 10), 0);
    const int64_t extra[4] = {9, 5, 4, 3};
    check_int("counts summing to K*N+1 rejected", balance_check_counts(extra, 4, 2, 10), -1);
    const int64_t neg[4] = {11, 5, 5, -1};
    check_int("negative count rejected", balance_check_counts(neg, 4, 2, 10), -1);

    BalanceConfig c = make_cfg(NULL);
    float b[8] = {0}; // (2 layers, 4)
    const int64_t two[8] = {9, 5, 4, 2, 9, 5, 4, 3}; // layer 1 is miscounted
    int rc = balance_update(&c, 0, 10, two, 2, 4, 2, 10, b);
    int untouched = 1;
    for (int i = 0; i < 8; i++) untouched &= b[i] == 0.0f;
    check(rc == -1 && untouched, "balance_update refuses bad counts, bias untouched",
          "rc %.0f untouched %.0f", rc, untouched);
    const int64_t good[8] = {9, 5, 4, 2, 5, 5, 5, 5};
    rc = balance_update(&c, 0, 10, good, 2, 4, 2, 10, b);
    const double wb[8] = {-0.001, 0, 0.001, 0.001, 0, 0, 0, 0};
    check_int("balance_update all layers rc", rc, 0);
    check_vec("balance_update all layers", b, wb, 8, 1e-9);

    // Methods without a bias leave it alone.
    const char *kv[] = {"--balance", "aux", NULL};
    BalanceConfig ca = make_cfg(kv);
    float z[8] = {0};
    balance_update(&ca, 0, 10, good, 2, 4, 2, 10, z);
    check_near("aux method: bias not updated", fabs(z[0]) + fabs(z[2]), 0.0, 0);
}

static void test_metrics(void) {
    // 2 layers, E=4, K=2, N=10 (mean 5).
    const int64_t cnt[8] = {9, 5, 4, 2, 10, 10, 0, 0};
    const float bias[8] = {0.1f, -0.2f, 0.3f, 0.0f, 0.0f, 0.0f, 0.0f, 0.2f};
    BalanceMetrics m;
    check_int("metrics rc", balance_metrics(cnt, 2, 4, 2, 10, bias, &m), 0);
    check_near("metrics maxvio layer 0", m.maxvio[0], 0.8, 1e-12);
    check_near("metrics maxvio layer 1", m.maxvio[1], 1.0, 1e-12);
    check_near("metrics maxvio_batch (average)", m.maxvio_batch, 0.9, 1e-12);
    check_int("metrics worst layer", m.maxvio_worst_layer, 1);
    check_near("metrics load_min layer 0 (2/5)", m.load_min[0], 0.4, 1e-12);
    check_near("metrics load_min layer 1 (idle)", m.load_min[1], 0.0, 0);
    check_int("metrics idle layer 0", m.idle[0], 0);
    check_int("metrics idle layer 1", m.idle[1], 2);
    check_int("metrics idle total", m.idle_total, 2);
    // The biases are fp32: 0.3f differs from 0.3 by 1.2e-8.
    check_near("metrics bias mean", m.bias_mean, 0.05, 3e-8);
    check_near("metrics bias min", m.bias_min, -0.2, 3e-8);
    check_near("metrics bias max", m.bias_max, 0.3, 3e-8);

    char buf[1024]; // JSON fragment
    int n = balance_metrics_json(&m, buf, sizeof(buf));
    printf("     json: %s\n", buf);
    int has = strstr(buf, "\"maxvio_batch\":0.9,\"maxvio_layers\":[0.8,1],") != NULL &&
              strstr(buf, "\"load_min_layers\":[0.4,0]") != NULL &&
              strstr(buf, "\"idle\":2,\"idle_layers\":[0,2]") != NULL &&
              strstr(buf, "\"bias_min\":-0.200000003") != NULL;
    check(has && n == (int)strlen(buf), "metrics json content", "length %.0f strlen %.0f", n,
          (double)strlen(buf));
    char small[16]; // too short: truncated but terminated, full length returned
    int n2 = balance_metrics_json(&m, small, sizeof(small));
    check(n2 == n && strlen(small) == sizeof(small) - 1, "metrics json truncation",
          "returned %.0f, kept %.0f chars", n2, (double)strlen(small));

    FILE *f = tmpfile();
    int nf = f ? balance_metrics_json_file(&m, f) : -1;
    check(nf == n, "metrics json to FILE same length", "%.0f vs %.0f", nf, n);
    if (f) fclose(f);

    // MaxVio_global: two imbalanced batches whose sum is balanced.
    BalanceAccum a;
    check_int("accum init", balance_accum_init(&a, 1, 4, 1), 0);
    const int64_t b1[4] = {5, 5, 0, 0}, b2[4] = {0, 0, 5, 5}; // K=1, N=10 each
    balance_accum_add(&a, b1, 10);
    check_near("accum one batch = batch maxvio", balance_accum_maxvio(&a, NULL), 1.0, 1e-12);
    balance_accum_add(&a, b2, 10);
    double per[1]; // (n_layers)
    check_near("accum two batches: global balanced", balance_accum_maxvio(&a, per), 0.0, 1e-12);
    n = balance_accum_json(&a, buf, sizeof(buf));
    check(strcmp(buf, "\"maxvio_global\":0,\"maxvio_global_layers\":[0]") == 0, "accum json",
          "length %.0f", n, 0);
    printf("     json: %s\n", buf);
    balance_accum_reset(&a);
    check_int("accum reset", a.n_tokens, 0);
    balance_accum_free(&a);
}

// ----------------------------------------------------------------------------
// Options

static int set(BalanceConfig *c, const char *k, const char *v, char *err, size_t len) {
    err[0] = '\0';
    return balance_set_option(c, k, v, err, len);
}

// Writes c with balance_print_config, parses every line back with
// balance_set_option, and compares (aux-alpha is printed resolved, so it is
// compared as balance_aux_alpha).
static void check_roundtrip(const char *name, const BalanceConfig *c) {
    BalanceConfig d;
    char err[256] = ""; // message of a rejected line
    int lines = 0, ok = 1;
    balance_config_default(&d);
    FILE *f = tmpfile();
    if (!f) ok = 0;
    if (f) {
        balance_print_config(c, f);
        rewind(f);
        char line[256]; // one "key=value" line
        while (fgets(line, sizeof(line), f)) {
            line[strcspn(line, "\n")] = '\0';
            char *eq = strchr(line, '=');
            if (!eq) { ok = 0; break; }
            *eq = '\0';
            ok &= balance_set_option(&d, line, eq + 1, err, sizeof(err)) == 0;
            lines++;
        }
        fclose(f);
    }
    ok &= balance_validate(&d, err, sizeof(err)) == 0;
    ok &= c->method == d.method && c->rule == d.rule && c->schedule == d.schedule &&
          c->center == d.center && c->gamma == d.gamma && c->gamma_tau == d.gamma_tau &&
          c->gamma_min == d.gamma_min && c->gamma_stop_frac == d.gamma_stop_frac &&
          balance_aux_alpha(c) == balance_aux_alpha(&d);
    check(ok, name, "%.0f lines", lines, 0);
    if (!ok) printf("     message: %s\n", err);
}

static void test_options(void) {
    BalanceConfig c;
    char err[256]; // message of a rejected option
    balance_config_default(&c);
    check(strcmp(balance_method_name(&c), "alf") == 0 && strcmp(balance_rule_name(&c), "sign") == 0 &&
          strcmp(balance_schedule_name(&c), "const") == 0 && c.gamma == 1e-3 && c.center == 0,
          "defaults alf / sign / const / gamma 0.001", "gamma %.3g center %.0f", c.gamma, c.center);
    check_int("alf uses bias", balance_uses_bias(&c), 1);
    check_int("alf has no aux loss", balance_aux_kind(&c), AUX_NONE);
    check_near("alf bias starts at 0", balance_bias_init_value(&c), 0.0, 0);

    check_int("--balance aux", set(&c, "--balance", "aux", err, sizeof(err)), 0);
    check(balance_aux_kind(&c) == AUX_EXPERT && balance_aux_alpha(&c) == 1e-3 &&
          !balance_uses_bias(&c), "aux: expert-level, alpha 0.001, no bias", "alpha %.3g kind %.0f",
          balance_aux_alpha(&c), balance_aux_kind(&c));
    set(&c, "balance", "seqaux", err, sizeof(err)); // key without dashes
    check(balance_aux_kind(&c) == AUX_SEQ && balance_aux_alpha(&c) == 1e-4,
          "seqaux: sequence-wise, alpha 0.0001", "alpha %.3g kind %.0f", balance_aux_alpha(&c),
          balance_aux_kind(&c));
    set(&c, "--balance", "alf+seqaux", err, sizeof(err));
    check(balance_uses_bias(&c) && balance_aux_kind(&c) == AUX_SEQ &&
          balance_aux_alpha(&c) == 1e-4, "alf+seqaux: bias and sequence-wise", "alpha %.3g kind %.0f",
          balance_aux_alpha(&c), balance_aux_kind(&c));
    set(&c, "--aux-alpha", "0.003", err, sizeof(err));
    check_near("--aux-alpha overrides", balance_aux_alpha(&c), 0.003, 0);
    check_int("alf+seqaux with alpha validates", balance_validate(&c, err, sizeof(err)), 0);
    set(&c, "--balance", "alf", err, sizeof(err));
    check_int("alpha given to alf rejected by validate", balance_validate(&c, err, sizeof(err)), -1);
    printf("     message: %s\n", err);

    balance_config_default(&c);
    check_int("unknown key -> -1", set(&c, "--gamma-foo", "1", err, sizeof(err)), -1);
    check_int("unknown key leaves err empty", (long long)strlen(err), 0);
    check_int("bad rule -> -2", set(&c, "--gamma-rule", "signn", err, sizeof(err)), -2);
    check(strstr(err, "sign|prop|mult") != NULL, "bad rule message lists the rules", "found %.0f", strstr(err, "sign|prop|mult") != NULL, 0);
    printf("     message: %s\n", err);
    check_int("bad method -> -2", set(&c, "--balance", "loss", err, sizeof(err)), -2);
    check_int("bad schedule -> -2", set(&c, "--gamma-schedule", "linear", err, sizeof(err)), -2);
    check_int("gamma -1 -> -2", set(&c, "--gamma", "-1", err, sizeof(err)), -2);
    check_int("gamma abc -> -2", set(&c, "--gamma", "abc", err, sizeof(err)), -2);
    check_int("gamma 1e-3x -> -2", set(&c, "--gamma", "1e-3x", err, sizeof(err)), -2);
    check_int("gamma nan -> -2", set(&c, "--gamma", "nan", err, sizeof(err)), -2);
    check_int("gamma-center 2 -> -2", set(&c, "--gamma-center", "2", err, sizeof(err)), -2);
    check_int("gamma-stop-frac 1.5 -> -2", set(&c, "--gamma-stop-frac", "1.5", err, sizeof(err)), -2);
    check_int("gamma-tau 0 -> -2", set(&c, "--gamma-tau", "0", err, sizeof(err)), -2);
    printf("     message: %s\n", err);
    check_int("aux-alpha -0.1 -> -2", set(&c, "--aux-alpha", "-0.1", err, sizeof(err)), -2);
    check_near("rejected values leave gamma at default", c.gamma, 1e-3, 0);
    check_int("gamma 0.01 accepted", set(&c, "gamma", "0.01", err, sizeof(err)), 0);
    check_int("has_option --gamma-tau", balance_has_option("--gamma-tau"), 1);
    check_int("has_option --lr", balance_has_option("--lr"), 0);

    set(&c, "--gamma-schedule", "cosine", err, sizeof(err));
    set(&c, "--gamma-min", "0.1", err, sizeof(err));
    check_int("cosine with gamma-min > gamma rejected", balance_validate(&c, err, sizeof(err)), -1);
    printf("     message: %s\n", err);

    // Help names every rule, schedule and method; print_config round-trips.
    FILE *f = tmpfile();
    char text[8192] = {0}; // help text read back
    if (f) {
        balance_print_help(f);
        rewind(f);
        size_t n = fread(text, 1, sizeof(text) - 1, f);
        text[n] = '\0';
        fclose(f);
    }
    const char *names[] = {"sign", "prop", "mult", "const", "inv", "invsqrt", "cosine", "stop",
                           "none", "seqaux", "alf+seqaux", "--gamma-stop-frac", "--gamma-center",
                           "--aux-alpha", "--gamma-tau", "--gamma-min", "(default 0.001)"};
    int missing = 0;
    for (int i = 0; i < (int)(sizeof(names) / sizeof(names[0])); i++)
        if (!strstr(text, names[i])) {
            printf("     help lacks %s\n", names[i]);
            missing++;
        }
    check(missing == 0, "help names every option, method, rule, schedule", "%.0f missing of %.0f",
          missing, (double)(sizeof(names) / sizeof(names[0])));

    const char *kv[] = {"--balance", "alf+seqaux", "--gamma-rule", "prop", "--gamma-schedule",
                        "invsqrt", "--gamma", "0.0025", "--gamma-tau", "250", "--gamma-center", "1", NULL};
    BalanceConfig src = make_cfg(kv);
    BalanceConfig def = make_cfg(NULL);
    check_roundtrip("print_config of alf+seqaux/prop/invsqrt parses back", &src);
    check_roundtrip("print_config of the defaults parses back", &def);
    printf("     config json: {");
    balance_config_json(&src, stdout);
    printf("}\n");
}

// ----------------------------------------------------------------------------
// Synthetic convergence: a stationary generator of router affinities, no training.

static uint64_t rng_state;

// splitmix64 (Steele, Lea, Flood 2014): a fixed, portable stream.
static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }

// Standard normal by Box-Muller.
static double rng_normal(void) {
    double u = rng_uniform(), v = rng_uniform();
    return sqrt(-2.0 * log(1.0 - u)) * cos(2.0 * 3.14159265358979323846 * v);
}

enum { SIM_E = 64, SIM_K = 6, SIM_N = 1024 }; // Wang et al.'s 64 experts, top-6
enum { SIM_POOL = 16384 };                      // distinct tokens the batches draw from

// The K largest of score (E), ties to the lower index; adds them to counts.
static void topk_count(const float *score, int64_t *counts) {
    float val[SIM_K]; // selected scores, decreasing
    int idx[SIM_K];   // their experts
    int n = 0;
    for (int i = 0; i < SIM_E; i++) {
        float v = score[i];
        if (n == SIM_K && !(v > val[SIM_K - 1])) continue; // equal loses to the lower index
        int j = n < SIM_K ? n++ : SIM_K - 1;
        while (j > 0 && v > val[j - 1]) {
            val[j] = val[j - 1];
            idx[j] = idx[j - 1];
            j--;
        }
        val[j] = v;
        idx[j] = i;
    }
    for (int j = 0; j < SIM_K; j++) counts[idx[j]]++;
}

static float sim_mu[SIM_E];              // per-expert logit preference
static float sim_pool[SIM_POOL * SIM_E]; // (POOL, E) sigmoid affinities of each token

// The generator. Expert preferences have a lognormal right tail,
// mu_i = 0.5 (exp(z_i) - 1) with z_i ~ N(0, 1): a few experts sit several logit
// units above the rest and, with no bias, win every token. A token's logits are
// mu + N(0, 1) noise and its affinities their sigmoid. Tokens are precomputed
// once and every batch draws SIM_N of them uniformly with replacement, which
// keeps the batches iid from one fixed distribution (like a router that does not
// learn) while costing no exp() per step.
static void sim_init(void) {
    rng_state = 12345;
    for (int i = 0; i < SIM_E; i++) sim_mu[i] = (float)(0.5 * (exp(rng_normal()) - 1.0));
    for (int p = 0; p < SIM_POOL; p++)
        for (int i = 0; i < SIM_E; i++)
            sim_pool[p * SIM_E + i] = (float)(1.0 / (1.0 + exp(-(sim_mu[i] + rng_normal()))));
}

// Runs `steps` steps of routing SIM_N tokens by TopK of s + b (s * b for a
// multiplicative rule), updating the bias from each step's counts; returns the
// mean MaxVio_batch of the last `last` steps, and the first step's in *first.
static double simulate(const BalanceConfig *c, int steps, int last, double *first) {
    float bias[SIM_E];  // (E) one MoE layer
    float score[SIM_E]; // (E) biased scores of one token
    int64_t counts[SIM_E];
    int mult = balance_bias_is_multiplicative(c);
    double tail = 0.0;
    balance_bias_init(c, bias, 1, SIM_E);
    rng_state = 777; // the same token stream for every method
    for (int t = 0; t < steps; t++) {
        memset(counts, 0, sizeof(counts));
        for (int n = 0; n < SIM_N; n++) {
            const float *s = sim_pool + (rng_next() % SIM_POOL) * SIM_E; // (E)
            for (int i = 0; i < SIM_E; i++) score[i] = mult ? s[i] * bias[i] : s[i] + bias[i];
            topk_count(score, counts);
        }
        double mv = balance_maxvio(counts, SIM_E, SIM_K, SIM_N);
        if (t == 0 && first) *first = mv;
        if (t >= steps - last) tail += mv;
        if (balance_update(c, t, steps, counts, 1, SIM_E, SIM_K, SIM_N, bias) != 0) {
            printf("FAIL simulate: counts do not sum to K*N\n");
            failures++;
            return NAN;
        }
    }
    return tail / last;
}

// The floor: MaxVio_batch of a perfectly balanced stochastic assignment, each
// token taking K distinct experts uniformly at random (every expert's expected
// load is exactly the mean). Tokens routed with a converged bias are the same
// kind of iid draw, so their MaxVio_batch cannot be expected to go below this.
static double noise_floor(int batches, double *sd) {
    int64_t counts[SIM_E];
    int perm[SIM_E]; // partial Fisher-Yates shuffle of the experts
    double sum = 0.0, sum2 = 0.0;
    rng_state = 4242;
    for (int b = 0; b < batches; b++) {
        memset(counts, 0, sizeof(counts));
        for (int n = 0; n < SIM_N; n++) {
            for (int i = 0; i < SIM_E; i++) perm[i] = i;
            for (int j = 0; j < SIM_K; j++) {
                int r = j + (int)(rng_next() % (uint64_t)(SIM_E - j));
                int tmp = perm[j];
                perm[j] = perm[r];
                perm[r] = tmp;
                counts[perm[j]]++;
            }
        }
        double mv = balance_maxvio(counts, SIM_E, SIM_K, SIM_N);
        sum += mv;
        sum2 += mv * mv;
    }
    double mean = sum / batches;
    *sd = sqrt(sum2 / batches - mean * mean);
    return mean;
}

static void test_convergence(void) {
    sim_init();
    double sd;
    double floor = noise_floor(2000, &sd);
    printf("     noise floor (uniform random top-%d of %d, %d tokens, 2000 batches): "
           "mean MaxVio %.4f, sd %.4f\n", SIM_K, SIM_E, SIM_N, floor, sd);
    // Converged means within 20% of the floor: the floor's 100-step mean has a
    // standard error near sd / 10 = 0.0045, so 0.2 x floor (0.047) leaves room for
    // ten of them plus the sign rule's own +-gamma dither, yet is 200x below `none`.
    const double limit = floor * 1.2;
    const int steps = 1500, last = 100;
    double first;

    const char *none_kv[] = {"--balance", "none", NULL};
    BalanceConfig none = make_cfg(none_kv);
    double mv_none = simulate(&none, 200, 100, &first);
    // E/K - 1 = 9.667 is the largest MaxVio there is: one expert in every token.
    check(mv_none > 9.0, "none stays imbalanced: mean MaxVio of last 100 > 9 (max E/K-1 = 9.667)",
          "%.4f (first step %.4f)", mv_none, first);

    struct { const char *name; const char *kv[9]; } runs[] = {
        {"alf sign gamma 1e-3", {"--gamma", "0.001", NULL}},
        {"alf sign centred", {"--gamma", "0.001", "--gamma-center", "1", NULL}},
        {"alf prop gamma 1e-3", {"--gamma-rule", "prop", "--gamma", "0.001", NULL}},
        {"alf mult gamma 1e-3", {"--gamma-rule", "mult", "--gamma", "0.001", NULL}},
        {"alf sign inv tau 1000", {"--gamma-schedule", "inv", NULL}},
        {"alf sign invsqrt tau 1000", {"--gamma-schedule", "invsqrt", NULL}},
    };
    double mv_sign = 0.0;
    for (int r = 0; r < (int)(sizeof(runs) / sizeof(runs[0])); r++) {
        BalanceConfig c = make_cfg(runs[r].kv);
        double mv = simulate(&c, steps, last, &first);
        if (r == 0) mv_sign = mv;
        char name[128]; // check label
        snprintf(name, sizeof(name), "%s: mean MaxVio of last %d of %d steps < 1.2 x floor",
                 runs[r].name, last, steps);
        check(mv < limit, name, "%.4f (limit %.4f)", mv, limit);
    }
    // A too-large rate makes the bias oscillate late (arXiv 2408.15664, Fig. 4):
    // every step moves every bias by gamma, which here shifts loads by several %.
    const char *big_kv[] = {"--gamma", "0.01", NULL};
    BalanceConfig big = make_cfg(big_kv);
    double mv_big = simulate(&big, steps, last, &first);
    check(mv_big > mv_sign + 0.1, "alf sign gamma 1e-2 oscillates above gamma 1e-3 (+0.1)",
          "%.4f vs %.4f", mv_big, mv_sign);
}

int main(void) {
    test_sign_rule();
    test_prop_rule();
    test_center();
    test_mult_rule();
    test_schedules();
    test_maxvio_and_counts();
    test_metrics();
    test_options();
    test_convergence();
    if (failures) {
        printf("test_balance: %d FAILED\n", failures);
        return 1;
    }
    printf("test_balance: all passed\n");
    return 0;
}
