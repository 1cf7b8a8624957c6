// The memory-bound kernels' two paths (make test-emu and make test-emu-race on
// the CPU emulator, make test-gpu on a GPU): RMSNorm, SwiGLU, the classifier,
// the MoE gather / combine / scatter, the conversions, AdamW, the embedding
// and the gradient norm. Each gives its threads groups of consecutive
// elements and takes a 16-byte path when its arrays are aligned and its rows
// are whole groups, a scalar path otherwise (kernels/vec.cuh). Every kernel
// runs on aligned arrays, on each of its arrays moved one element off
// alignment in turn, and on odd row lengths, and is checked for:
//   - the path it took: the 16-byte one exactly when every array it accesses
//     by groups is aligned and the rows are whole groups (kernels/vec.cuh's
//     counters);
//   - the same bits from both paths (the scalar one forced with
//     vec_set_enabled(0));
//   - its result against an oracle in double: the CPU model's op
//     (model/ops.c built in fp64) where there is one, else a loop here.
// One line per check with the measured error; exit status 1 on any failure.
//
//   test_kernels
#define MOE_FP64 // model/ops.h in double: the oracles

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

extern "C" {
#include "model/layout.h" // defines: Rng, rng_normal, rng_uniform, rng_u64
#include "model/ops.h"    // defines: the CPU model's ops (fp64 here): the oracles
#include "train/optim.h"  // defines: adamw_update_one, adamw_scalars
}

#include "kernels/adamw.cuh"
#include "kernels/classifier.cuh"
#include "kernels/common.cuh"
#include "kernels/convert.cuh"
#include "kernels/embedding.cuh"
#include "kernels/gradnorm.cuh"
#include "kernels/permute.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/swiglu.cuh"
#include "kernels/vec.cuh"
#define GPU_CHECK_WIDTH 56
#include "tests/gpu_check.h"

static_assert(sizeof(real) == sizeof(double), "the oracles are the fp64 build of model/ops.c");

// Errors are max |kernel - oracle| / max |oracle| over an output. fp32
// outputs: a few roundings of fp32 arithmetic. floatX outputs add one
// rounding to floatX (2^-9 relative in bf16).
#ifdef ENABLE_FP32
#define TOL_X 2e-6
#else
#define TOL_X 8e-3
#endif
#define TOL_F 2e-6

static double host_to_d(float v) { return v; }
static double host_to_d(double v) { return v; }
#ifndef ENABLE_FP32
static double host_to_d(floatX v) { return __bfloat162float(v); }
#endif

// ----------------------------------------------------------------------------
// Device arrays, placed `shift` elements into their allocation (which
// cudaMalloc aligns to 256 bytes): shift 1 makes an array unaligned.

static std::vector<void *> g_allocs;

template <class T> static T *dev_array(const T *host, int64_t n, int shift) {
    char *base;
    CUDA_CHECK(cudaMalloc((void **)&base, sizeof(T) * (size_t)(n + shift)));
    g_allocs.push_back(base);
    T *p = (T *)base + shift;
    if (host) CUDA_CHECK(cudaMemcpy(p, host, sizeof(T) * (size_t)n, cudaMemcpyHostToDevice));
    else CUDA_CHECK(cudaMemset(p, 0, sizeof(T) * (size_t)n));
    return p;
}

static void dev_free_all(void) {
    for (void *p : g_allocs) CUDA_CHECK(cudaFree(p));
    g_allocs.clear();
}

// out += the n device values of src, as doubles (exact for every type here).
template <class T> static void append(std::vector<double> &out, const T *src, int64_t n) {
    std::vector<T> h((size_t)n);
    CUDA_CHECK(cudaDeviceSynchronize());
    if (n) CUDA_CHECK(cudaMemcpy(h.data(), src, sizeof(T) * (size_t)n, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < n; i++) out.push_back(host_to_d(h[i]));
}

// Random inputs: normal values times scale, as fp32 or rounded to floatX.
static std::vector<float> randn_f(Rng *rng, int64_t n, double scale) {
    std::vector<float> v((size_t)n);
    for (int64_t i = 0; i < n; i++) v[i] = (float)(scale * rng_normal(rng));
    return v;
}
static std::vector<floatX> randn_x(Rng *rng, int64_t n, double scale) {
    std::vector<floatX> v((size_t)n);
    for (int64_t i = 0; i < n; i++) v[i] = to_x((float)(scale * rng_normal(rng)));
    return v;
}
template <class T> static std::vector<double> to_d(const std::vector<T> &v) {
    std::vector<double> d(v.size());
    for (size_t i = 0; i < v.size(); i++) d[i] = host_to_d(v[i]);
    return d;
}

// max |a[off + i] - ref[i]| / max |ref[i]| over n values.
static double rel_err(const std::vector<double> &a, size_t off, const double *ref, size_t n) {
    double emax = 0, rmax = 0;
    for (size_t i = 0; i < n; i++) {
        emax = fmax(emax, fabs(a[off + i] - ref[i]));
        rmax = fmax(rmax, fabs(ref[i]));
    }
    return rmax > 0 ? emax / rmax : emax;
}

// Runs run(out) with the 16-byte paths allowed and then with every call sent
// down the scalar path. Checks the path the first run's calls took (all the
// 16-byte one when want_vector, else all scalar) and that both runs give the
// same bits; returns the first run's outputs.
template <class F> static std::vector<double> both_paths(int want_vector, F run) {
    VecStats s0 = vec_stats();
    std::vector<double> a, b;
    vec_set_enabled(1);
    run(a);
    VecStats s1 = vec_stats();
    vec_set_enabled(0);
    run(b);
    vec_set_enabled(1);
    long nv = s1.vector - s0.vector, ns = s1.scalar - s0.scalar;
    char detail[96];
    snprintf(detail, sizeof detail, "(%ld 16-byte, %ld scalar calls)", nv, ns);
    report_bool(want_vector ? "took the 16-byte path" : "took the scalar path",
                want_vector ? nv > 0 && ns == 0 : nv == 0 && ns > 0, detail);
    int same = a.size() == b.size() && !a.empty() && memcmp(a.data(), b.data(), sizeof(double) * a.size()) == 0;
    snprintf(detail, sizeof detail, "(%zu values)", a.size());
    report_bool("16-byte path == scalar path, bitwise", same, detail);
    return a;
}

// The cases of one kernel: every array aligned (shifted = -1), then each of
// its n_arrays arrays one element off in turn; the 16-byte path is expected
// when nothing is shifted and the rows are whole groups.
#define FOR_SHIFTS(n_arrays, shifted) for (int shifted = -1; shifted < (n_arrays); shifted++)
#define SHIFT(k, shifted) ((shifted) == (k) ? 1 : 0)

static const char *shift_name(const char *const *names, int shifted) {
    return shifted < 0 ? "aligned" : names[shifted];
}

// ----------------------------------------------------------------------------
// RMSNorm

static void test_rmsnorm(int N, int d, uint64_t seed) {
    Rng rng = { seed };
    const float eps = 1e-6f;
    std::vector<float> x = randn_f(&rng, (int64_t)N * d, 1.0), w = randn_f(&rng, d, 1.0);
    std::vector<float> dh = randn_f(&rng, (int64_t)N * d, 1.0), dx0 = randn_f(&rng, (int64_t)N * d, 1.0);
    std::vector<float> dw0 = randn_f(&rng, d, 1.0), rstd((size_t)N);
    std::vector<double> xd = to_d(x), wd = to_d(w), out_ref((size_t)N * d), rstd_ref((size_t)N);
    rmsnorm_forward(out_ref.data(), rstd_ref.data(), xd.data(), wd.data(), N, d, eps);
    for (int t = 0; t < N; t++) rstd[t] = (float)rstd_ref[t];
    int whole = d % VEC_X == 0;

    static const char *const fwd_names[] = { "out unaligned", "x unaligned", "w unaligned" };
    FOR_SHIFTS(3, s) {
        printf("rmsnorm forward: N=%d d=%d, %s\n", N, d, shift_name(fwd_names, s));
        std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
            floatX *o = dev_array<floatX>(NULL, (int64_t)N * d, SHIFT(0, s));
            float *rs = dev_array<float>(NULL, N, 0);
            rmsnorm_forward(o, rs, dev_array(x.data(), (int64_t)N * d, SHIFT(1, s)), dev_array(w.data(), d, SHIFT(2, s)),
                            N, d, eps, 0);
            append(out, o, (int64_t)N * d);
            append(out, rs, N);
            dev_free_all();
        });
        report("out against model/ops.c", rel_err(r, 0, out_ref.data(), (size_t)N * d), TOL_X, 0);
        report("rstd against model/ops.c", rel_err(r, (size_t)N * d, rstd_ref.data(), N), TOL_F, 0);
        if (d % VEC_X != 0) break; // odd rows: the scalar path whatever the alignment; once is enough
    }

    static const char *const bwd_names[] = { "dx unaligned", "dxX unaligned", "dh unaligned", "x unaligned",
                                             "w unaligned" };
    for (int accumulate = 0; accumulate <= 1; accumulate++) {
        std::vector<double> dx_ref((size_t)N * d, 0.0), dw_ref = to_d(dw0), dhd = to_d(dh), rd = to_d(rstd);
        if (accumulate) dx_ref = to_d(dx0);
        rmsnorm_backward(dx_ref.data(), dw_ref.data(), dhd.data(), xd.data(), wd.data(), rd.data(), N, d);
        FOR_SHIFTS(5, s) {
            printf("rmsnorm backward: N=%d d=%d, accumulate=%d, %s\n", N, d, accumulate, shift_name(bwd_names, s));
            std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
                float *dx = dev_array(dx0.data(), (int64_t)N * d, SHIFT(0, s));
                floatX *dxX = dev_array<floatX>(NULL, (int64_t)N * d, SHIFT(1, s));
                float *dw = dev_array(dw0.data(), d, 0);
                float *scratch = dev_array<float>(NULL, (int64_t)rmsnorm_scratch_floats(N, d), 0);
                rmsnorm_backward(dx, dxX, dw, scratch, dev_array(dh.data(), (int64_t)N * d, SHIFT(2, s)),
                                 dev_array(x.data(), (int64_t)N * d, SHIFT(3, s)), dev_array(w.data(), d, SHIFT(4, s)),
                                 dev_array(rstd.data(), N, 0), N, d, accumulate, 0);
                append(out, dx, (int64_t)N * d);
                append(out, dxX, (int64_t)N * d);
                append(out, dw, d);
                dev_free_all();
            });
            report("dx against model/ops.c", rel_err(r, 0, dx_ref.data(), (size_t)N * d), TOL_F * 5, 0);
            report("dx (floatX copy) against model/ops.c", rel_err(r, (size_t)N * d, dx_ref.data(), (size_t)N * d),
                   TOL_X, 0);
            report("dw against model/ops.c", rel_err(r, 2 * (size_t)N * d, dw_ref.data(), d), TOL_F * 5, 0);
            if (d % VEC_X != 0) break;
        }
    }
}

// ----------------------------------------------------------------------------
// SwiGLU

static void test_swiglu(int n, int m, uint64_t seed) {
    Rng rng = { seed };
    std::vector<floatX> h13 = randn_x(&rng, (int64_t)n * 2 * m, 2.0), dact = randn_x(&rng, (int64_t)n * m, 1.0);
    std::vector<double> hd = to_d(h13), dd = to_d(dact), act_ref((size_t)n * m), d13_ref((size_t)n * 2 * m);
    swiglu_forward(act_ref.data(), hd.data(), n, m);
    swiglu_backward(d13_ref.data(), dd.data(), hd.data(), n, m);
    int whole = m % VEC_X == 0;
    static const char *const fwd_names[] = { "act unaligned", "h13 unaligned" };
    FOR_SHIFTS(2, s) {
        printf("swiglu forward: n=%d m=%d, %s\n", n, m, shift_name(fwd_names, s));
        std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
            floatX *act = dev_array<floatX>(NULL, (int64_t)n * m, SHIFT(0, s));
            swiglu_forward(act, dev_array(h13.data(), (int64_t)n * 2 * m, SHIFT(1, s)), n, m, 0);
            append(out, act, (int64_t)n * m);
            dev_free_all();
        });
        report("act against model/ops.c", rel_err(r, 0, act_ref.data(), (size_t)n * m), TOL_X, 0);
        if (!whole) break;
    }
    static const char *const bwd_names[] = { "d13 unaligned", "dact unaligned", "h13 unaligned" };
    FOR_SHIFTS(3, s) {
        printf("swiglu backward: n=%d m=%d, %s\n", n, m, shift_name(bwd_names, s));
        std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
            floatX *d13 = dev_array<floatX>(NULL, (int64_t)n * 2 * m, SHIFT(0, s));
            swiglu_backward(d13, dev_array(dact.data(), (int64_t)n * m, SHIFT(1, s)),
                            dev_array(h13.data(), (int64_t)n * 2 * m, SHIFT(2, s)), n, m, 0);
            append(out, d13, (int64_t)n * 2 * m);
            dev_free_all();
        });
        report("d13 against model/ops.c", rel_err(r, 0, d13_ref.data(), (size_t)n * 2 * m), TOL_X, 0);
        if (!whole) break;
    }
}

// ----------------------------------------------------------------------------
// Classifier: softmax, cross-entropy and the logits' gradient in place

static void test_classifier(int N, int V, uint64_t seed) {
    Rng rng = { seed };
    const float dscale = 0.37f;
    std::vector<floatX> logits = randn_x(&rng, (int64_t)N * V, 3.0);
    std::vector<int> targets((size_t)N);
    for (int t = 0; t < N; t++) targets[t] = (int)(rng_u64(&rng) % (uint64_t)V);
    targets[0] = V - 1; // in the last group of its row, partial when V is odd
    // The oracle, row by row: the loss and (p - onehot) * dscale.
    std::vector<double> probs = to_d(logits), loss_ref((size_t)N);
    for (int t = 0; t < N; t++) {
        loss_ref[t] = crossentropy_forward(probs.data() + (size_t)t * V, &targets[t], 1, V);
        crossentropy_backward(probs.data() + (size_t)t * V, &targets[t], 1, V, dscale);
    }
    for (int write_grad = 1; write_grad >= 0; write_grad--) {
        static const char *const names[] = { "logits unaligned" };
        FOR_SHIFTS(1, s) {
            printf("classifier: N=%d V=%d, write_grad=%d, %s\n", N, V, write_grad, shift_name(names, s));
            std::vector<double> r = both_paths(V % VEC_X == 0 && s < 0, [&](std::vector<double> &out) {
                floatX *l = dev_array(logits.data(), (int64_t)N * V, SHIFT(0, s));
                double *losses = dev_array<double>(NULL, N, 0);
                classifier_forward(l, losses, dev_array(targets.data(), N, 0), N, V, dscale, write_grad, 0);
                append(out, losses, N);
                append(out, l, (int64_t)N * V);
                dev_free_all();
            });
            report("losses against model/ops.c", rel_err(r, 0, loss_ref.data(), N), 1e-6, 0);
            if (write_grad) {
                report("gradient against model/ops.c", rel_err(r, N, probs.data(), (size_t)N * V), TOL_X, 0);
            } else {
                std::vector<double> ld = to_d(logits);
                report_bool("logits left as they were", memcmp(r.data() + N, ld.data(), sizeof(double) * ld.size()) == 0,
                            "");
            }
            if (V % VEC_X != 0) break;
        }
    }
}

// ----------------------------------------------------------------------------
// MoE gather, combine (forward, backward) and scatter

static void test_permute_rows(int N, int K, int d, uint64_t seed) {
    Rng rng = { seed };
    int NK = N * K;
    // Any bijection between slots and rows will do: a random permutation.
    std::vector<int> row_of((size_t)NK), slot_of((size_t)NK);
    for (int i = 0; i < NK; i++) row_of[i] = i;
    for (int i = NK - 1; i > 0; i--) {
        int j = (int)(rng_u64(&rng) % (uint64_t)(i + 1)), tmp = row_of[i];
        row_of[i] = row_of[j];
        row_of[j] = tmp;
    }
    for (int i = 0; i < NK; i++) slot_of[row_of[i]] = i;
    std::vector<floatX> h = randn_x(&rng, (int64_t)N * d, 1.0), eout = randn_x(&rng, (int64_t)NK * d, 1.0);
    std::vector<float> gates((size_t)NK), out0 = randn_f(&rng, (int64_t)N * d, 1.0);
    std::vector<float> dout = randn_f(&rng, (int64_t)N * d, 1.0);
    for (int i = 0; i < NK; i++) gates[i] = (float)rng_uniform(&rng);

    // The oracles, in double.
    std::vector<double> out_ref = to_d(out0), dh_ref((size_t)N * d, 0.0);
    std::vector<double> deout_ref((size_t)NK * d), dg_ref((size_t)NK, 0.0);
    for (int t = 0; t < N; t++)
        for (int j = 0; j < K; j++) {
            size_t slot = (size_t)t * K + j, r = row_of[slot];
            for (int c = 0; c < d; c++) {
                double e = host_to_d(eout[r * d + c]), go = dout[(size_t)t * d + c];
                out_ref[(size_t)t * d + c] += gates[slot] * e;
                dh_ref[(size_t)t * d + c] += e;
                deout_ref[r * d + c] = gates[slot] * go;
                dg_ref[slot] += go * e;
            }
        }
    int whole = d % VEC_X == 0;
    int64_t Nd = (int64_t)N * d, NKd = (int64_t)NK * d;

    // The gather is done by moe_permute as it places the slots, so it runs on
    // a routing: random experts for the slots, their counts, and the stable
    // counting sort (model/moe.c's order) for the oracle's rows.
    const int E = 7;
    std::vector<int> sel((size_t)NK), counts(E, 0), first(E + 1, 0), sorted_slot((size_t)NK);
    for (int i = 0; i < NK; i++) {
        sel[i] = (int)(rng_u64(&rng) % (uint64_t)(E - 1)); // expert E - 1 keeps no row
        counts[sel[i]]++;
    }
    for (int e = 0; e < E; e++) first[e + 1] = first[e] + counts[e];
    for (int i = 0; i < NK; i++) sorted_slot[first[sel[i]]++] = i;
    std::vector<double> xe_ref((size_t)NK * d);
    for (int r = 0; r < NK; r++)
        for (int c = 0; c < d; c++) xe_ref[(size_t)r * d + c] = host_to_d(h[(size_t)(sorted_slot[r] / K) * d + c]);
    static const char *const gather_names[] = { "xe unaligned", "h unaligned" };
    FOR_SHIFTS(2, s) {
        printf("moe_permute's gather: N=%d K=%d d=%d E=%d, %s\n", N, K, d, E, shift_name(gather_names, s));
        std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
            floatX *xe = dev_array<floatX>(NULL, NKd, SHIFT(0, s));
            int *offsets = dev_array<int>(NULL, E + 1, 0), *rows = dev_array<int>(NULL, NK, 0);
            int *slots = dev_array<int>(NULL, NK, 0);
            int *scratch = dev_array<int>(NULL, (int64_t)moe_permute_scratch_ints(NK, E), 0);
            moe_permute(offsets, rows, slots, scratch, dev_array(sel.data(), NK, 0), dev_array(counts.data(), E, 0),
                        NK, E, xe, dev_array(h.data(), Nd, SHIFT(1, s)), K, d, 0);
            append(out, xe, NKd);
            dev_free_all();
        });
        report_bool("rows equal the oracle's, bitwise", memcmp(r.data(), xe_ref.data(), sizeof(double) * NKd) == 0,
                    "");
        if (!whole) break;
    }
    static const char *const fwd_names[] = { "out unaligned", "eout unaligned" };
    FOR_SHIFTS(2, s) {
        printf("moe_combine_forward: N=%d K=%d d=%d, %s\n", N, K, d, shift_name(fwd_names, s));
        std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
            float *o = dev_array(out0.data(), Nd, SHIFT(0, s));
            moe_combine_forward(o, dev_array(eout.data(), NKd, SHIFT(1, s)), dev_array(gates.data(), NK, 0),
                                dev_array(row_of.data(), NK, 0), N, K, d, 0);
            append(out, o, Nd);
            dev_free_all();
        });
        report("out against a loop in double", rel_err(r, 0, out_ref.data(), Nd), TOL_F, 0);
        if (!whole) break;
    }
    static const char *const bwd_names[] = { "deout unaligned", "dout unaligned", "eout unaligned" };
    FOR_SHIFTS(3, s) {
        printf("moe_combine_backward: N=%d K=%d d=%d, %s\n", N, K, d, shift_name(bwd_names, s));
        std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
            floatX *deout = dev_array<floatX>(NULL, NKd, SHIFT(0, s));
            float *dg = dev_array<float>(NULL, NK, 0);
            moe_combine_backward(deout, dg, dev_array(dout.data(), Nd, SHIFT(1, s)),
                                 dev_array(eout.data(), NKd, SHIFT(2, s)), dev_array(gates.data(), NK, 0),
                                 dev_array(row_of.data(), NK, 0), N, K, d, 0);
            append(out, deout, NKd);
            append(out, dg, NK);
            dev_free_all();
        });
        report("expert-output grads against a loop in double", rel_err(r, 0, deout_ref.data(), NKd), TOL_X, 0);
        report("gate grads against a loop in double", rel_err(r, NKd, dg_ref.data(), NK), TOL_F * 5, 0);
        if (!whole) break;
    }
    static const char *const scatter_names[] = { "dh unaligned", "dxe unaligned" };
    FOR_SHIFTS(2, s) {
        printf("moe_scatter: N=%d K=%d d=%d, %s\n", N, K, d, shift_name(scatter_names, s));
        std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
            float *dh = dev_array<float>(NULL, Nd, SHIFT(0, s));
            moe_scatter(dh, dev_array(eout.data(), NKd, SHIFT(1, s)), dev_array(row_of.data(), NK, 0), N, K, d, 0);
            append(out, dh, Nd);
            dev_free_all();
        });
        report("dh against a loop in double", rel_err(r, 0, dh_ref.data(), Nd), TOL_F, 0);
        if (!whole) break;
    }
}

// ----------------------------------------------------------------------------
// Conversions, AdamW, gradient norm: flat arrays of any length (the last
// group may be partial), so only alignment decides the path.

static void test_convert(int64_t n, uint64_t seed) {
    Rng rng = { seed };
    std::vector<float> f = randn_f(&rng, n, 1.0);
    std::vector<floatX> x = randn_x(&rng, n, 1.0);
    std::vector<double> x_ref((size_t)n), f_ref = to_d(x);
    for (int64_t i = 0; i < n; i++) x_ref[i] = host_to_d(to_x(f[i]));
    static const char *const names[] = { "dst unaligned", "src unaligned" };
    FOR_SHIFTS(2, s) {
        printf("convert: n=%lld, %s\n", (long long)n, shift_name(names, s));
        std::vector<double> r = both_paths(s < 0, [&](std::vector<double> &out) {
            floatX *dx = dev_array<floatX>(NULL, n, SHIFT(0, s));
            float *df = dev_array<float>(NULL, n, SHIFT(0, s));
            convert_f32_to_x(dx, dev_array(f.data(), n, SHIFT(1, s)), n, 0);
            convert_x_to_f32(df, dev_array(x.data(), n, SHIFT(1, s)), n, 0);
            append(out, dx, n);
            append(out, df, n);
            dev_free_all();
        });
        report_bool("fp32 -> floatX rounds to nearest even (bitwise)",
                    memcmp(r.data(), x_ref.data(), sizeof(double) * n) == 0, "");
        report_bool("floatX -> fp32 exact (bitwise)", memcmp(r.data() + n, f_ref.data(), sizeof(double) * n) == 0, "");
    }
}

static void test_adamw(int64_t n, int64_t off, int with_copy, float grad_mult, uint64_t seed) {
    Rng rng = { seed };
    int64_t len = n - off;
    std::vector<float> p = randn_f(&rng, n, 1.0), g = randn_f(&rng, n, 1.0), m = randn_f(&rng, n, 0.1);
    std::vector<float> v((size_t)n);
    for (int64_t i = 0; i < n; i++) v[i] = (float)rng_uniform(&rng) * 0.01f;
    AdamWConfig cfg = { 0.9, 0.95, 1e-8, 0.1, 1.0 };
    AdamWScalars sc = adamw_scalars(&cfg, 3e-3, 7);
    // The oracle: the CPU trainer's per-element rule on the range.
    std::vector<float> p_ref = p, m_ref = m, v_ref = v;
    for (int64_t i = off; i < n; i++)
        adamw_update_one(&p_ref[i], grad_mult != 1.0f ? g[i] * grad_mult : g[i], &m_ref[i], &v_ref[i], 1, &sc);
    std::vector<double> want = to_d(p_ref), mv = to_d(m_ref), vv = to_d(v_ref);
    want.insert(want.end(), mv.begin(), mv.end());
    want.insert(want.end(), vv.begin(), vv.end());
    static const char *const names[] = { "params unaligned", "paramsX unaligned", "grads unaligned", "m unaligned",
                                         "v unaligned" };
    FOR_SHIFTS(with_copy ? 5 : 4, s0) {
        int s = !with_copy && s0 >= 1 ? s0 + 1 : s0; // without a copy, no paramsX to shift
        printf("adamw: n=%lld from %lld%s, grad_mult %g, %s\n", (long long)n, (long long)off,
               with_copy ? " with the floatX copy" : "", grad_mult, shift_name(names, s));
        // The range starts at element off of every array.
        int aligned = off * sizeof(float) % VEC_BYTES == 0 && (!with_copy || off * sizeof(floatX) % VEC_BYTES == 0);
        std::vector<double> r = both_paths(s < 0 && aligned, [&](std::vector<double> &out) {
            float *dp = dev_array(p.data(), n, SHIFT(0, s)), *dm = dev_array(m.data(), n, SHIFT(3, s));
            float *dv = dev_array(v.data(), n, SHIFT(4, s));
            floatX *dpx = with_copy ? dev_array<floatX>(NULL, n, SHIFT(1, s)) : NULL;
            adamw_update(dp, dpx, dev_array(g.data(), n, SHIFT(2, s)), dm, dv, off, len, 1, sc, grad_mult, 0);
            append(out, dp, n);
            append(out, dm, n);
            append(out, dv, n);
            if (with_copy) append(out, dpx, n);
            dev_free_all();
        });
        report("params, m, v against train/optim.h's rule", rel_err(r, 0, want.data(), want.size()), TOL_F, 0);
        if (with_copy) {
            int bad = 0;
            for (int64_t i = 0; i < n; i++) {
                double px = r[3 * n + i], pr = i < off ? 0.0 : host_to_d(to_x((float)r[i]));
                bad += px != pr;
            }
            char detail[64];
            snprintf(detail, sizeof detail, "(%d of %lld differ)", bad, (long long)n);
            report_bool("floatX copy == the new params rounded, only in range", bad == 0, detail);
        }
    }
}

static void test_gradnorm(int64_t n, uint64_t seed) {
    Rng rng = { seed };
    std::vector<float> g = randn_f(&rng, n, 1.0);
    double ref = 0;
    for (int64_t i = 0; i < n; i++) ref += (double)g[i] * g[i];
    static const char *const names[] = { "g unaligned" };
    FOR_SHIFTS(1, s) {
        printf("gradnorm: n=%lld (%zu chunks), %s\n", (long long)n, gradnorm_partials(n), shift_name(names, s));
        std::vector<double> r = both_paths(s < 0, [&](std::vector<double> &out) {
            double *o = dev_array<double>(NULL, 1, 0);
            gradnorm_sumsq(o, dev_array<double>(NULL, (int64_t)gradnorm_partials(n), 0), dev_array(g.data(), n, SHIFT(0, s)),
                           n, 0);
            append(out, o, 1);
            dev_free_all();
        });
        report("sum of squares against a loop in double", fabs(r[0] - ref) / ref, 1e-12, 0);
    }
}

// ----------------------------------------------------------------------------
// Embedding

static void test_embedding(int N, int V, int d, uint64_t seed) {
    Rng rng = { seed };
    std::vector<int> tokens((size_t)N);
    for (int t = 0; t < N; t++) tokens[t] = (int)(rng_u64(&rng) % (uint64_t)V);
    tokens[N - 1] = tokens[0]; // a repeated token
    std::vector<float> emb = randn_f(&rng, (int64_t)V * d, 1.0), dx = randn_f(&rng, (int64_t)N * d, 1.0);
    std::vector<float> demb0 = randn_f(&rng, (int64_t)V * d, 1.0);
    std::vector<double> embd = to_d(emb), x_ref((size_t)N * d), demb_ref = to_d(demb0), dxd = to_d(dx);
    encoder_forward(x_ref.data(), tokens.data(), embd.data(), N, d);
    encoder_backward(demb_ref.data(), dxd.data(), tokens.data(), N, d);
    std::vector<int> count((size_t)V), uniq((size_t)N), offsets((size_t)N + 1), positions((size_t)N);
    int n_uniq = embedding_backward_index(tokens.data(), N, V, count.data(), uniq.data(), offsets.data(),
                                          positions.data());
    int whole = d % VEC_F == 0;
    static const char *const fwd_names[] = { "x unaligned", "emb unaligned" };
    FOR_SHIFTS(2, s) {
        printf("embedding forward: N=%d V=%d d=%d, %s\n", N, V, d, shift_name(fwd_names, s));
        std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
            float *x = dev_array<float>(NULL, (int64_t)N * d, SHIFT(0, s));
            embedding_forward(x, dev_array(tokens.data(), N, 0), dev_array(emb.data(), (int64_t)V * d, SHIFT(1, s)), N,
                              d, 0);
            append(out, x, (int64_t)N * d);
            dev_free_all();
        });
        report_bool("rows equal model/ops.c's, bitwise", memcmp(r.data(), x_ref.data(), sizeof(double) * N * d) == 0,
                    "");
        if (!whole) break;
    }
    static const char *const bwd_names[] = { "demb unaligned", "dx unaligned" };
    FOR_SHIFTS(2, s) {
        printf("embedding backward: N=%d V=%d d=%d (%d distinct tokens), %s\n", N, V, d, n_uniq,
               shift_name(bwd_names, s));
        std::vector<double> r = both_paths(whole && s < 0, [&](std::vector<double> &out) {
            float *demb = dev_array(demb0.data(), (int64_t)V * d, SHIFT(0, s));
            embedding_backward(demb, dev_array(dx.data(), (int64_t)N * d, SHIFT(1, s)), dev_array(uniq.data(), n_uniq, 0),
                               dev_array(offsets.data(), n_uniq + 1, 0), dev_array(positions.data(), N, 0),
                               dev_array(&n_uniq, 1, 0), N, d, 0); // a launch over N tokens, n_uniq of them real
            append(out, demb, (int64_t)V * d);
            dev_free_all();
        });
        report("demb against model/ops.c", rel_err(r, 0, demb_ref.data(), (size_t)V * d), TOL_F, 0);
        if (!whole) break;
    }
}

int main(void) {
    printf("test_kernels (%s): floatX groups of %d, fp32 groups of %d\n", FLOATX_NAME, VEC_X, VEC_F);
    // Row lengths: whole groups, odd, shorter than a group; RMSNorm's
    // backward with 8, 4 and 1 warps per block and several chunks of rows.
    test_rmsnorm(130, 96, 1);
    test_rmsnorm(70, 37, 2);
    test_rmsnorm(3, 5, 3);
    test_rmsnorm(67, 3000, 4);
    test_rmsnorm(2, RMSNORM_SMEM_FLOATS, 5);
    test_swiglu(33, 48, 6);
    test_swiglu(9, 45, 7);
    test_classifier(5, 64, 8);
    test_classifier(4, 1001, 9);
    test_classifier(2, 32064, 10);
    test_permute_rows(37, 3, 72, 11);
    test_permute_rows(20, 2, 13, 12);
    test_permute_rows(300, 2, 24, 13); // 600 slots: three chunks of the permutation
    test_convert(1003, 13);
    test_convert(1024, 14);
    test_adamw(1003, 0, 1, 1.0f, 15);
    test_adamw(517, 4, 0, 0.5f, 16);
    test_adamw(300, 3, 1, 1.0f, 17);
    test_gradnorm(3 * GRADNORM_CHUNK + 5, 18);
    test_embedding(50, 17, 64, 19);
    test_embedding(30, 11, 7, 20);
    return report_summary("test_kernels");
}
