// Tests of the grouped expert GEMMs (kernels/grouped_gemm.cu): the device
// path (offsets in device memory, tensor cores through kernels/mma.cuh) and
// the cuBLAS path, against a plain loop over experts on the host in double.
// Built for a GPU by gpu.mk (make test-gpu) and for the CPU emulator by
// tests/emu/emu.mk (make test); one line per check, exit status 1 if any fails.
//
// For every case (E experts, a weight W (E, OC, IC), row counts per expert):
//   forward         out (R, OC) = X_e W_e^T               (m-grouped)
//   input gradient  dX (R, IC)  = dY_e W_e                 (m-grouped, W k-major)
//   weight gradient dW_e (OC, IC) += dY_e^T X_e            (k-grouped, adds to dW)
// checked: the errors against the host loop; the device and cuBLAS paths
// against each other; rows past the last expert's (the buffers hold a few
// more) left untouched; the weight gradient of an expert without rows left
// bit for bit as it was; the same bits from a second run (and, on the
// emulator, with the blocks and threads in reverse and shuffled order).
// Cases: random ragged counts with empty experts, every count zero, one
// expert with every row, counts around the 64-row tile and sizes that are
// not multiples of the 64 x 64 tile or of the 32-deep reduction step, a
// single row, and the `1b` expert shapes (64 experts, d_model 1024, d_expert
// 512: W13 1024 x 1024, W2 1024 x 512) at a reduced number of rows.
//
// Errors are max |got - ref| / max |ref| over a tensor. Tolerances: TOL_*
// below, with the measurements behind them.
//
//   test_grouped_gemm [--quick]      --quick: without the 1b shapes (the emulated
//                                    FP32 build takes minutes on them)
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/grouped_gemm.cuh"
#include "tests/check.h"

#ifdef ENABLE_FP32
// fp32 inputs, fp32 sums in another order than the host's double loop (both
// paths: cuBLAS's differ from it as much). Measured on the emulator over all
// cases below, the worst: out and dX 1.15e-6 (the 1024-long reductions of
// the 1b shapes; 3.0e-7 at most for the others), dW 4.2e-7, device vs cuBLAS
// 1.15e-6. The tolerance is 4.3x the worst.
#define TOL_OUT 5e-6
#define TOL_DW 5e-6
#define TOL_PATHS 5e-6
#else
// bf16 inputs (exact in the host's double loop too: it multiplies the same
// rounded values), fp32 accumulation. out and dX are stored in bf16: half a
// unit in the last place, at most 2^-8 = 3.9e-3 of the element (8
// significant bits), hence of max |ref|; measured worst 3.3e-3. The
// tolerance is that bound plus room for a GPU's fp32 sums (~1e-6). dW stays
// fp32: measured 1.4e-7 (the emulator's tensor-core sums are exact, a
// GPU's fp32). The two paths round nearly equal fp32 sums to bf16 and can
// differ by one unit in the last place where a sum falls near a rounding
// boundary: at most 2^-7 = 7.8e-3 of the element; measured worst 1.3e-3.
#define TOL_OUT 4e-3
#define TOL_DW 1e-6
#define TOL_PATHS 8e-3
#endif

static uint64_t rng_state;
static float urand(void) { // uniform in [-1, 1)
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

// n random values in [-1, 1) rounded to floatX: as floatX (to upload) and as float (for the host loop).
static void random_x(floatX *x, float *f, size_t n) {
    for (size_t i = 0; i < n; i++) {
        x[i] = to_x(urand());
        f[i] = to_f(x[i]);
    }
}

static void *dev_copy(const void *h, size_t bytes) {
    void *d;
    CUDA_CHECK(cudaMalloc(&d, bytes ? bytes : 16));
    if (bytes) CUDA_CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    return d;
}

static void *host_copy(const void *d, size_t bytes) {
    void *h = xmalloc(bytes ? bytes : 1);
    CUDA_CHECK(cudaDeviceSynchronize());
    if (bytes) CUDA_CHECK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
    return h;
}

// max |got - ref| / max |ref| over n values (absolute when ref is all zero);
// got is floatX (x = 1) or float.
static double max_rel(const void *got, int x, const double *ref, size_t n) {
    double emax = 0, rmax = 0;
    for (size_t i = 0; i < n; i++) {
        double g = x ? (double)to_f(((const floatX *)got)[i]) : (double)((const float *)got)[i];
        emax = fmax(emax, fabs(g - ref[i]));
        rmax = fmax(rmax, fabs(ref[i]));
    }
    return rmax > 0 ? emax / rmax : emax;
}

// The outputs of one path: out (Rcap, OC), dX (Rcap, IC) floatX, dW (E, OC, IC) fp32.
typedef struct {
    floatX *out, *dx;
    float *dw;
} Outputs;

static void outputs_alloc(Outputs *o, int Rcap, int E, int IC, int OC, const float *dw0) {
    size_t nw = (size_t)E * OC * IC;
    CUDA_CHECK(cudaMalloc(&o->out, sizeof(floatX) * ((size_t)Rcap * OC + 8)));
    CUDA_CHECK(cudaMalloc(&o->dx, sizeof(floatX) * ((size_t)Rcap * IC + 8)));
    // all-ones bytes (NaN in either type): rows no expert owns must keep them
    CUDA_CHECK(cudaMemset(o->out, 0xff, sizeof(floatX) * (size_t)Rcap * OC));
    CUDA_CHECK(cudaMemset(o->dx, 0xff, sizeof(floatX) * (size_t)Rcap * IC));
    o->dw = (float *)dev_copy(dw0, sizeof(float) * nw);
}

static void outputs_free(Outputs *o) {
    CUDA_CHECK(cudaFree(o->out));
    CUDA_CHECK(cudaFree(o->dx));
    CUDA_CHECK(cudaFree(o->dw));
}

// Outputs of two runs bitwise equal.
static int outputs_same(const Outputs *a, const Outputs *b, int Rcap, int E, int IC, int OC) {
    const void *pa[3] = {a->out, a->dx, a->dw}, *pb[3] = {b->out, b->dx, b->dw};
    size_t bytes[3] = {sizeof(floatX) * Rcap * OC, sizeof(floatX) * Rcap * IC, sizeof(float) * E * OC * IC};
    int same = 1;
    for (int i = 0; i < 3; i++) {
        void *ha = host_copy(pa[i], bytes[i]), *hb = host_copy(pb[i], bytes[i]);
        same &= memcmp(ha, hb, bytes[i]) == 0;
        free(ha);
        free(hb);
    }
    return same;
}

// The device inputs of a case.
typedef struct {
    int E, IC, OC, R, Rcap;
    int *h_off, *d_off;    // (E + 1)
    floatX *x, *dy, *w;    // (Rcap, IC), (Rcap, OC), (E, OC, IC)
    float *dw0;            // (E, OC, IC) host: the gradient before the call
} Inputs;

static void run_device(const Inputs *in, Outputs *o) {
    grouped_dev_forward(o->out, in->x, in->w, in->d_off, in->E, in->Rcap, in->IC, in->OC, 0);
    grouped_dev_backward_input(o->dx, in->dy, in->w, in->d_off, in->E, in->Rcap, in->IC, in->OC, 0);
    grouped_dev_backward_weight(o->dw, in->dy, in->x, in->d_off, in->E, in->IC, in->OC, 0);
    CUDA_CHECK(cudaDeviceSynchronize());
}

static double worst_out, worst_dw, worst_paths;

static void test_case(const char *name, int E, int IC, int OC, const int *counts, uint64_t seed, int orders) {
    Inputs in;
    in.E = E, in.IC = IC, in.OC = OC;
    in.h_off = (int *)xmalloc(sizeof(int) * (E + 1));
    in.h_off[0] = 0;
    for (int e = 0; e < E; e++) in.h_off[e + 1] = in.h_off[e] + counts[e];
    in.R = in.h_off[E];
    in.Rcap = in.R + 3; // rows past the last expert's: the bound the host passes is not exact
    size_t nx = (size_t)in.Rcap * IC, ny = (size_t)in.Rcap * OC, nw = (size_t)E * OC * IC;
    rng_state = seed;
    floatX *hx = (floatX *)xmalloc(sizeof(floatX) * nx), *hy = (floatX *)xmalloc(sizeof(floatX) * ny);
    floatX *hw = (floatX *)xmalloc(sizeof(floatX) * nw);
    float *fx = (float *)xmalloc(sizeof(float) * nx), *fy = (float *)xmalloc(sizeof(float) * ny);
    float *fw = (float *)xmalloc(sizeof(float) * nw);
    in.dw0 = (float *)xmalloc(sizeof(float) * nw);
    random_x(hx, fx, nx);
    random_x(hy, fy, ny);
    random_x(hw, fw, nw);
    for (size_t i = 0; i < nw; i++) in.dw0[i] = 0.5f * urand(); // a gradient already holding earlier micro-batches
    in.x = (floatX *)dev_copy(hx, sizeof(floatX) * nx);
    in.dy = (floatX *)dev_copy(hy, sizeof(floatX) * ny);
    in.w = (floatX *)dev_copy(hw, sizeof(floatX) * nw);
    in.d_off = (int *)dev_copy(in.h_off, sizeof(int) * (E + 1));

    // The host loop over experts, in double.
    double *out_ref = (double *)xcalloc((size_t)in.R * OC + 1, sizeof(double));
    double *dx_ref = (double *)xcalloc((size_t)in.R * IC + 1, sizeof(double));
    double *dw_ref = (double *)xmalloc(sizeof(double) * nw);
    for (size_t i = 0; i < nw; i++) dw_ref[i] = in.dw0[i];
    for (int e = 0; e < E; e++) {
        const float *We = fw + (size_t)e * OC * IC;
        double *dWe = dw_ref + (size_t)e * OC * IC;
        for (int r = in.h_off[e]; r < in.h_off[e + 1]; r++) {
            const float *xr = fx + (size_t)r * IC, *yr = fy + (size_t)r * OC;
            for (int o = 0; o < OC; o++) {
                double s = 0;
                for (int i = 0; i < IC; i++) s += (double)xr[i] * We[(size_t)o * IC + i];
                out_ref[(size_t)r * OC + o] = s;
                for (int i = 0; i < IC; i++) {
                    dx_ref[(size_t)r * IC + i] += (double)yr[o] * We[(size_t)o * IC + i];
                    dWe[(size_t)o * IC + i] += (double)yr[o] * xr[i];
                }
            }
        }
    }

    // The device path, twice; the cuBLAS path.
    Outputs dv, dv2, cb;
    outputs_alloc(&dv, in.Rcap, E, IC, OC, in.dw0);
    outputs_alloc(&dv2, in.Rcap, E, IC, OC, in.dw0);
    outputs_alloc(&cb, in.Rcap, E, IC, OC, in.dw0);
    run_device(&in, &dv);
    run_device(&in, &dv2);
    cublasHandle_t handle;
    CUBLAS_CHECK(cublasCreate(&handle));
    GroupedGemm gg;
    grouped_gemm_init(&gg, handle, 0, E, 3); // a pointer staging region per call (a pending copy reads it)
    grouped_matmul_forward(&gg, 0, cb.out, in.x, in.w, in.h_off, IC, OC);
    grouped_matmul_backward_input(&gg, 1, cb.dx, in.dy, in.w, in.h_off, IC, OC);
    grouped_matmul_backward_weight(&gg, 2, cb.dw, in.dy, in.x, in.h_off, IC, OC);
    CUDA_CHECK(cudaDeviceSynchronize());

    floatX *out = (floatX *)host_copy(dv.out, sizeof(floatX) * ny), *dx = (floatX *)host_copy(dv.dx, sizeof(floatX) * nx);
    float *dw = (float *)host_copy(dv.dw, sizeof(float) * nw);
    floatX *cout = (floatX *)host_copy(cb.out, sizeof(floatX) * ny), *cdx = (floatX *)host_copy(cb.dx, sizeof(floatX) * nx);
    float *cdw = (float *)host_copy(cb.dw, sizeof(float) * nw);
    double e_out = max_rel(out, 1, out_ref, (size_t)in.R * OC), e_dx = max_rel(dx, 1, dx_ref, (size_t)in.R * IC);
    double e_dw = max_rel(dw, 0, dw_ref, nw);
    // cuBLAS vs device: the cuBLAS result as the reference
    size_t nmax = nw > nx ? nw : nx;
    double *tmp = (double *)xmalloc(sizeof(double) * ((nmax > ny ? nmax : ny) + 1));
    double p_out, p_dx, p_dw;
    for (size_t i = 0; i < (size_t)in.R * OC; i++) tmp[i] = to_f(cout[i]);
    p_out = max_rel(out, 1, tmp, (size_t)in.R * OC);
    for (size_t i = 0; i < (size_t)in.R * IC; i++) tmp[i] = to_f(cdx[i]);
    p_dx = max_rel(dx, 1, tmp, (size_t)in.R * IC);
    for (size_t i = 0; i < nw; i++) tmp[i] = cdw[i];
    p_dw = max_rel(dw, 0, tmp, nw);
    double p_max = fmax(p_out, fmax(p_dx, p_dw));
    // Untouched: the rows past offsets[E] (still all-ones bytes), the empty experts' gradients.
    int tail_ok = 1, empty_ok = 1;
    const unsigned char *tb[2] = {(const unsigned char *)(out + (size_t)in.R * OC),
                                  (const unsigned char *)(dx + (size_t)in.R * IC)};
    size_t tn[2] = {sizeof(floatX) * (in.Rcap - in.R) * OC, sizeof(floatX) * (in.Rcap - in.R) * IC};
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < tn[k]; i++) tail_ok &= tb[k][i] == 0xff;
    int n_empty = 0;
    for (int e = 0; e < E; e++)
        if (counts[e] == 0) {
            n_empty++;
            empty_ok &= memcmp(dw + (size_t)e * OC * IC, in.dw0 + (size_t)e * OC * IC, sizeof(float) * OC * IC) == 0;
        }
    int same = outputs_same(&dv, &dv2, in.Rcap, E, IC, OC);

    check(e_out <= TOL_OUT && e_dx <= TOL_OUT && e_dw <= TOL_DW,
          "%-22s E %2d, W %4d x %4d, %5d rows: vs host loop: out %.2e, dX %.2e (tol %g), dW %.2e (tol %g)", name, E,
          OC, IC, in.R, e_out, e_dx, TOL_OUT, e_dw, TOL_DW);
    check(p_max <= TOL_PATHS, "%-22s device vs cuBLAS path: out %.2e, dX %.2e, dW %.2e (tol %g)", name, p_out, p_dx,
          p_dw, TOL_PATHS);
    check(tail_ok && empty_ok && same,
          "%-22s rows past offsets[E] untouched (%s), gradients of the %d empty experts unchanged (%s), a second "
          "run bitwise equal (%s)", name, tail_ok ? "yes" : "NO", n_empty, empty_ok ? "yes" : "NO", same ? "yes" : "NO");
    worst_out = fmax(worst_out, fmax(e_out, e_dx));
    worst_dw = fmax(worst_dw, e_dw);
    worst_paths = fmax(worst_paths, p_max);

#ifndef __CUDACC__
    // The emulator runs the blocks, and the threads between barriers, in the order it is told.
    if (orders) {
        const char *names[2] = {"reverse", "shuffle"};
        for (int i = 0; i < 2; i++) {
            Outputs o;
            outputs_alloc(&o, in.Rcap, E, IC, OC, in.dw0);
            emu::set_order(names[i]);
            run_device(&in, &o);
            emu::set_order("forward");
            check(outputs_same(&dv, &o, in.Rcap, E, IC, OC), "%-22s blocks and threads in %s order: bitwise equal",
                  name, names[i]);
            outputs_free(&o);
        }
    }
#else
    (void)orders;
#endif

    grouped_gemm_free(&gg);
    CUBLAS_CHECK(cublasDestroy(handle));
    outputs_free(&dv);
    outputs_free(&dv2);
    outputs_free(&cb);
    CUDA_CHECK(cudaFree(in.x));
    CUDA_CHECK(cudaFree(in.dy));
    CUDA_CHECK(cudaFree(in.w));
    CUDA_CHECK(cudaFree(in.d_off));
    free(in.h_off);
    free(in.dw0);
    free(hx), free(hy), free(hw), free(fx), free(fy), free(fw);
    free(out_ref), free(dx_ref), free(dw_ref), free(tmp);
    free(out), free(dx), free(dw), free(cout), free(cdx), free(cdw);
}

int main(int argc, char **argv) {
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = 1;
        else {
            fprintf(stderr, "usage: test_grouped_gemm [--quick]\n");
            return 2;
        }
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        fprintf(stderr, "test_grouped_gemm: no CUDA device\n");
        return 1;
    }
    printf("grouped GEMM tests (%s)\n", FLOATX_NAME);
    uint64_t seed = 1;
    int c[64];
    // random ragged counts in 0..150, two of them forced empty
    rng_state = 99;
    for (int e = 0; e < 8; e++) c[e] = (int)((urand() + 1.0f) * 75.0f);
    c[2] = c[5] = 0;
    test_case("ragged", 8, 64, 96, c, seed++, 1);
    const int zeros[4] = {0, 0, 0, 0};
    test_case("no rows at all", 4, 64, 64, zeros, seed++, 0);
    const int all_one[8] = {0, 0, 0, 200, 0, 0, 0, 0};
    test_case("one expert, every row", 8, 96, 64, all_one, seed++, 0);
    const int around[5] = {1, 63, 64, 65, 129};
    test_case("counts around the tile", 5, 40, 24, around, seed++, 1);
    const int one_row[4] = {0, 1, 0, 0};
    test_case("a single row", 4, 128, 72, one_row, seed++, 0);
    if (!quick) {
        // 64 experts, 81 rows in four of them (the emulator's time grows
        // with the blocks that have rows: 256 per expert at these shapes).
        for (int e = 0; e < 64; e++) c[e] = 0;
        c[0] = 1, c[17] = 33, c[40] = 2, c[63] = 45;
        test_case("1b W13 (d -> 2 de)", 64, 1024, 1024, c, seed++, 0);
        test_case("1b W2 (de -> d)", 64, 512, 1024, c, seed++, 0);
    }
    printf("worst errors: out and dX %.2e, dW %.2e, device vs cuBLAS %.2e\n", worst_out, worst_dw, worst_paths);
    return check_summary("test_grouped_gemm");
}
