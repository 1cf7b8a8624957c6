// The GPU tests' reporting (tests/test_gpu.cu, tests/test_gpu_dist.cu): one
// line per check with the measured error and the tolerance, a failure count
// for the exit status, and the small helpers both use.
//
// A check can be soft: in the BF16 build, a token whose routing is a near
// tie may select differently from the reference, and the checks downstream
// of it then compare a different function; their failure is a WARN, counted
// apart, not a FAIL (see the routing note in tests/test_gpu.cu).
#ifndef TESTS_GPU_CHECK_H
#define TESTS_GPU_CHECK_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

extern "C" {
#include "model/config.h"
}
#include "util/util.h"

#ifndef GPU_CHECK_WIDTH
#define GPU_CHECK_WIDTH 40 // the column of the verdicts
#endif

static int failures, warnings;

static void report(const char *what, double err, double tol, int soft) {
    int ok = err <= tol;
    const char *verdict = ok ? "ok" : soft ? "WARN (bf16 routing differs on near ties)" : "FAIL";
    printf("  %-*s err %.3e (tol %.2g) %s\n", GPU_CHECK_WIDTH, what, err, tol, verdict);
    if (!ok && soft) warnings++;
    if (!ok && !soft) failures++;
}

static void report_bool(const char *what, int ok, const char *detail) {
    printf("  %-*s %s%s%s\n", GPU_CHECK_WIDTH, what, ok ? "ok" : "FAIL", detail[0] ? " " : "", detail);
    failures += !ok;
}

// The summary line and the exit status.
static int report_summary(const char *name) {
    printf("%s (%s): %s (%d failures, %d warnings)\n", name, FLOATX_NAME, failures ? "FAIL" : "PASS", failures,
           warnings);
    return failures ? 1 : 0;
}

// max |a - ref| / max |ref| (absolute when ref is all zero).
static inline double rel_err_ff(const float *a, const float *ref, int64_t n) {
    double emax = 0, rmax = 0;
    for (int64_t i = 0; i < n; i++) {
        emax = fmax(emax, fabs((double)a[i] - (double)ref[i]));
        rmax = fmax(rmax, fabs((double)ref[i]));
    }
    return rmax > 0 ? emax / rmax : emax;
}


// The tests' small MoE model: 3 layers (1 dense), d_model 64, E routed
// experts of top-K with the given gate and shared experts, large random
// initial weights (init_std 0.1) so that routing is far from uniform.
static inline MoeConfig gpu_test_config(int E, int K, int gate, int n_shared) {
    MoeConfig c;
    config_preset(&c, "tiny");
    c.vocab_size = 96;
    c.d_model = 64;
    c.n_heads = 4;
    c.n_layers = 3;
    c.n_dense = 1;
    c.d_ff = 96;
    c.seq_len = 32;
    c.n_routed = E;
    c.top_k = K;
    c.gate = gate;
    c.norm_topk = gate == GATE_SIGMOID;
    c.n_shared = n_shared;
    c.d_expert = 16;
    c.init_std = 0.1f;
    char err[256];
    if (config_validate(&c, err, sizeof err) != 0) {
        fprintf(stderr, "bad test config: %s\n", err);
        exit(1);
    }
    return c;
}

#endif
