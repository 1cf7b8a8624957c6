// The DeepSeekMoE layer on the CPU (see moe.h and docs/model.md).
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "matmul.h"
#include "ops.h"
#include "route.h"
#include "../util/util.h"

void moe_acts_alloc(MoeActs *a, const MoeConfig *c, int N) {
    size_t E = c->n_routed, K = c->top_k, d = c->d_model;
    size_t sh = (size_t)c->n_shared * c->d_expert, NK = (size_t)N * K;
    memset(a, 0, sizeof *a);
    a->s = xmalloc(sizeof(real) * N * E);
    a->sel = xmalloc(sizeof(int) * NK);
    a->gates = xmalloc(sizeof(real) * NK);
    a->offsets = xmalloc(sizeof(int) * (E + 1));
    a->slot_of = xmalloc(sizeof(int) * NK);
    a->row_of = xmalloc(sizeof(int) * NK);
    a->eout = xmalloc(sizeof(real) * NK * d);
    a->s13 = xmalloc(sizeof(real) * (N * 2 * sh + 1));
    a->sact = xmalloc(sizeof(real) * (N * sh + 1));
    // Sized for any expert-parallel group (P <= E ranks).
    a->send_rows = xmalloc(sizeof(int) * E);
    a->recv_rows = xmalloc(sizeof(int) * E);
    a->recv_cnt = xmalloc(sizeof(int) * E);
    a->exp_offsets = xmalloc(sizeof(int) * (E + 1));
}

void moe_acts_free(MoeActs *a) {
    free(a->s); free(a->sel); free(a->gates); free(a->offsets); free(a->slot_of); free(a->row_of);
    free(a->eout); free(a->s13); free(a->sact);
    free(a->send_rows); free(a->recv_rows); free(a->recv_cnt); free(a->exp_offsets); free(a->exp_src);
    free(a->xe); free(a->e13); free(a->eact);
    memset(a, 0, sizeof *a);
}

// Grows the expert-side buffers to hold R rows (their size is only known after
// the counts exchange; under expert parallelism it varies from step to step).
static void moe_reserve_rows(MoeActs *a, const MoeConfig *c, int R) {
    if (R <= a->R_cap) return;
    size_t n = (size_t)R, d = c->d_model, de = c->d_expert;
    a->exp_src = xrealloc(a->exp_src, sizeof(int) * n);
    a->xe = xrealloc(a->xe, sizeof(real) * n * d);
    a->e13 = xrealloc(a->e13, sizeof(real) * n * 2 * de);
    a->eact = xrealloc(a->eact, sizeof(real) * n * de);
    a->R_cap = R;
}

// ----------------------------------------------------------------------------
// Router: affinities, selection, gate values

// s (N, E): logits in, affinities out.
static void moe_gate_forward(real *s, int N, int E, int gate) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        real *row = s + (size_t)t * E;
        if (gate == GATE_SIGMOID) {
            for (int e = 0; e < E; e++) row[e] = 1 / (1 + r_exp(-row[e]));
        } else {
            real mx = row[0], sum = 0;
            for (int e = 1; e < E; e++) mx = row[e] > mx ? row[e] : mx;
            for (int e = 0; e < E; e++) sum += (row[e] = r_exp(row[e] - mx));
            for (int e = 0; e < E; e++) row[e] /= sum;
        }
    }
}

static void moe_select(const MoeConfig *c, const RouteOptions *ro, const float *bias, MoeActs *a, int N) {
    int E = c->n_routed, K = c->top_k;
#pragma omp parallel
    {
        double *score = xmalloc(sizeof(double) * E); // (E) selection scores of one token
#pragma omp for schedule(static)
        for (int t = 0; t < N; t++) {
            const real *s = a->s + (size_t)t * E;
            int *sel = a->sel + (size_t)t * K;
            real *g = a->gates + (size_t)t * K;
            // The score is formed in the model's precision, then widened exactly.
            for (int e = 0; e < E; e++) score[e] = (double)(real)ROUTE_SCORE(s[e], (real)bias[e], ro->bias_mult);
            route_topk(score, E, K, sel);
            // Gate values use the unbiased affinities: the bias steers selection only.
            real z = 0;
            for (int j = 0; j < K; j++) z += s[sel[j]];
            for (int j = 0; j < K; j++) g[j] = (c->norm_topk ? s[sel[j]] / z : s[sel[j]]) * c->route_scale;
        }
        free(score);
    }
}

// Orders the N*K slots by expert (stable in token order) and counts tokens.
static void moe_permute(MoeActs *a, int N, int E, int K, int64_t *counts) {
    int *fill = xmalloc(sizeof(int) * E); // (E) next free row of each expert
    memset(a->offsets, 0, sizeof(int) * (E + 1));
    for (int i = 0; i < N * K; i++) a->offsets[a->sel[i] + 1]++;
    for (int e = 0; e < E; e++) {
        counts[e] = a->offsets[e + 1];
        a->offsets[e + 1] += a->offsets[e];
        fill[e] = a->offsets[e];
    }
    for (int i = 0; i < N * K; i++) {
        int r = fill[a->sel[i]]++;
        a->slot_of[r] = i;
        a->row_of[i] = r;
    }
    free(fill);
}

// ----------------------------------------------------------------------------
// Auxiliary losses (docs/model.md). Forward returns the loss; backward adds
// its gradient with respect to the affinities into ds (N, E).

static double moe_aux_forward(const MoeConfig *c, const RouteOptions *ro, const MoeActs *a, int B, int T) {
    int E = c->n_routed, K = c->top_k, N = B * T;
    if (ro->aux_kind == AUX_NONE) return 0;
    int nseq = ro->aux_kind == AUX_EXPERT ? 1 : B; // expert-level: the batch is one group
    int len = N / nseq;                            // tokens per group
    double *f = xmalloc(sizeof(double) * E), *P = xmalloc(sizeof(double) * E);
    double total = 0;
    for (int q = 0; q < nseq; q++) {
        memset(f, 0, sizeof(double) * E);
        memset(P, 0, sizeof(double) * E);
        for (int t = q * len; t < (q + 1) * len; t++) {
            const real *s = a->s + (size_t)t * E;
            double z = 1;
            if (ro->aux_kind == AUX_SEQ) {
                z = 0;
                for (int e = 0; e < E; e++) z += s[e];
            }
            for (int e = 0; e < E; e++) P[e] += s[e] / z;
            for (int j = 0; j < K; j++) f[a->sel[(size_t)t * K + j]] += 1;
        }
        double lq = 0;
        for (int e = 0; e < E; e++) lq += ((double)E / ((double)K * len) * f[e]) * (P[e] / len);
        total += lq;
    }
    free(f);
    free(P);
    return ro->aux_alpha * total / nseq;
}

static void moe_aux_backward(const MoeConfig *c, const RouteOptions *ro, const MoeActs *a, int B, int T,
                             real *ds, real grad_scale) {
    int E = c->n_routed, K = c->top_k, N = B * T;
    if (ro->aux_kind == AUX_NONE) return;
    int nseq = ro->aux_kind == AUX_EXPERT ? 1 : B, len = N / nseq;
    double *f = xmalloc(sizeof(double) * E);
    for (int q = 0; q < nseq; q++) {
        memset(f, 0, sizeof(double) * E);
        for (int t = q * len; t < (q + 1) * len; t++)
            for (int j = 0; j < K; j++) f[a->sel[(size_t)t * K + j]] += 1;
        // dL/dP_e = alpha/nseq * f_e, and P_e = (1/len) sum_t s'_te.
        double coef = grad_scale * ro->aux_alpha / nseq / len;
        for (int e = 0; e < E; e++) f[e] = coef * (double)E / ((double)K * len) * f[e];
        for (int t = q * len; t < (q + 1) * len; t++) {
            const real *s = a->s + (size_t)t * E;
            real *d = ds + (size_t)t * E;
            if (ro->aux_kind == AUX_EXPERT) {
                for (int e = 0; e < E; e++) d[e] += (real)f[e];
            } else {
                // s' = s / z: ds_e = (g_e - sum_i g_i s'_i) / z.
                double z = 0, gs = 0;
                for (int e = 0; e < E; e++) z += s[e];
                for (int e = 0; e < E; e++) gs += f[e] * s[e] / z;
                for (int e = 0; e < E; e++) d[e] += (real)((f[e] - gs) / z);
            }
        }
    }
    free(f);
}

// ----------------------------------------------------------------------------
// Expert parallelism: moving rows between the token side (this rank's slots in
// expert order) and the expert side (rows for the local experts, expert-major).
// With one rank the exchange is skipped and the reorder is the identity.

static const MoeExchange moe_local = { .size = 1, .rank = 0 };

// After routing: exchanges the counts, then sends the rows xs (N K, d) to the
// ranks of their experts and fills a->xe (R, d) expert-major.
static void moe_dispatch(const MoeConfig *c, const MoeExchange *ex, MoeActs *a, const real *xs, int NK) {
    int P = ex->size, El = c->n_routed / P, d = c->d_model;
    // send counts = this rank's rows per expert, already grouped by destination.
    int *send_cnt = xmalloc(sizeof(int) * c->n_routed); // (P, El)
    for (int e = 0; e < c->n_routed; e++) send_cnt[e] = a->offsets[e + 1] - a->offsets[e];
    if (P > 1) ex->alltoall_int(ex->ctx, send_cnt, a->recv_cnt, El);
    else memcpy(a->recv_cnt, send_cnt, sizeof(int) * c->n_routed);
    a->R = 0;
    for (int p = 0; p < P; p++) {
        a->send_rows[p] = a->offsets[(p + 1) * El] - a->offsets[p * El];
        a->recv_rows[p] = 0;
        for (int j = 0; j < El; j++) a->recv_rows[p] += a->recv_cnt[p * El + j];
        a->R += a->recv_rows[p];
    }
    moe_reserve_rows(a, c, a->R);
    real *xr = P > 1 ? xmalloc(sizeof(real) * (size_t)a->R * d) : (real *)xs; // (R, d) as received
    if (P > 1) ex->alltoallv(ex->ctx, xs, a->send_rows, xr, a->recv_rows, d);
    (void)NK;
    // Received order is [source rank][local expert][token]; the experts want
    // [local expert][source rank][token]. exp_src maps one to the other.
    int row = 0;
    for (int j = 0; j < El; j++) {
        a->exp_offsets[j] = row;
        for (int q = 0, base = 0; q < P; base += a->recv_rows[q], q++) {
            int start = base;
            for (int jj = 0; jj < j; jj++) start += a->recv_cnt[q * El + jj];
            for (int r = 0; r < a->recv_cnt[q * El + j]; r++) a->exp_src[row++] = start + r;
        }
    }
    a->exp_offsets[El] = row;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < a->R; r++)
        memcpy(a->xe + (size_t)r * d, xr + (size_t)a->exp_src[r] * d, sizeof(real) * d);
    if (P > 1) free(xr);
    free(send_cnt);
}

// The reverse trip: ye (R, d) expert-major -> ys (N K, d) on the token side.
static void moe_return(const MoeExchange *ex, const MoeActs *a, const real *ye, real *ys, int d) {
    int P = ex->size;
    real *yr = P > 1 ? xmalloc(sizeof(real) * (size_t)a->R * d) : ys; // (R, d) in received order
#pragma omp parallel for schedule(static)
    for (int r = 0; r < a->R; r++) memcpy(yr + (size_t)a->exp_src[r] * d, ye + (size_t)r * d, sizeof(real) * d);
    if (P > 1) {
        ex->alltoallv(ex->ctx, yr, a->recv_rows, ys, a->send_rows, d);
        free(yr);
    }
}

// Token side -> expert side for a gradient: ys (N K, d) -> ye (R, d).
static void moe_send(const MoeExchange *ex, const MoeActs *a, const real *ys, real *ye, int d) {
    int P = ex->size;
    real *yr = P > 1 ? xmalloc(sizeof(real) * (size_t)a->R * d) : (real *)ys;
    if (P > 1) ex->alltoallv(ex->ctx, ys, a->send_rows, yr, a->recv_rows, d);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < a->R; r++) memcpy(ye + (size_t)r * d, yr + (size_t)a->exp_src[r] * d, sizeof(real) * d);
    if (P > 1) free(yr);
}

// ----------------------------------------------------------------------------
// Forward

void moe_forward(const MoeConfig *c, const RouteOptions *ro, const MoeExchange *ex, const MoeWeights *w,
                 const float *bias, const real *h, int B, int T, MoeActs *a, real *out, int64_t *counts) {
    int N = B * T, E = c->n_routed, K = c->top_k, d = c->d_model, de = c->d_expert;
    int sh = c->n_shared * de;
    if (!ex) ex = &moe_local;
    int El = E / ex->size, e0 = ex->rank * El; // the local experts are e0 .. e0 + El - 1

    matmul_forward(a->s, h, w->router, N, d, E, 0);
    moe_gate_forward(a->s, N, E, c->gate);
    moe_select(c, ro, bias, a, N);
    moe_permute(a, N, E, K, counts);

    // Gather each slot's token into expert order, and send it to its expert.
    real *xs = xmalloc(sizeof(real) * (size_t)N * K * d); // (N K, d)
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N * K; r++) memcpy(xs + (size_t)r * d, h + (size_t)(a->slot_of[r] / K) * d, sizeof(real) * d);
    moe_dispatch(c, ex, a, xs, N * K);

    // Routed experts: each one runs on its rows (expert-level parallelism;
    // the matmuls inside run on the calling thread).
    real *ye = xmalloc(sizeof(real) * ((size_t)a->R * d + 1)); // (R, d) expert outputs
#pragma omp parallel for schedule(dynamic, 1)
    for (int j = 0; j < El; j++) {
        int r0 = a->exp_offsets[j], n = a->exp_offsets[j + 1] - r0, e = e0 + j;
        if (n == 0) continue; // an expert with no tokens does nothing
        real *e13 = a->e13 + (size_t)r0 * 2 * de, *eact = a->eact + (size_t)r0 * de;
        matmul_forward(e13, a->xe + (size_t)r0 * d, w->ex13 + (size_t)e * 2 * de * d, n, d, 2 * de, 0);
        swiglu_forward(eact, e13, n, de);
        matmul_forward(ye + (size_t)r0 * d, eact, w->ex2 + (size_t)e * d * de, n, de, d, 0);
    }
    moe_return(ex, a, ye, a->eout, d);
    free(ye);
    free(xs);

    // Shared experts: always on, one SwiGLU of hidden S*de.
    if (sh > 0) {
        matmul_forward(a->s13, h, w->sh13, N, d, 2 * sh, 0);
        swiglu_forward(a->sact, a->s13, N, sh);
        matmul_forward(out, a->sact, w->sh2, N, sh, d, 0);
    } else {
        memset(out, 0, sizeof(real) * (size_t)N * d);
    }

    // Gated combine, slots in selection order so the sum order is fixed.
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        real *o = out + (size_t)t * d;
        for (int j = 0; j < K; j++) {
            real g = a->gates[(size_t)t * K + j];
            const real *y = a->eout + (size_t)a->row_of[(size_t)t * K + j] * d;
            for (int i = 0; i < d; i++) o[i] += g * y[i];
        }
    }
    a->aux = moe_aux_forward(c, ro, a, B, T);
}

// ----------------------------------------------------------------------------
// Backward

void moe_backward(const MoeConfig *c, const RouteOptions *ro, const MoeExchange *ex, const MoeWeights *w,
                  const real *h, const real *dout, int B, int T, MoeActs *a, real *dh, MoeGrads *g,
                  real grad_scale) {
    int N = B * T, E = c->n_routed, K = c->top_k, d = c->d_model, de = c->d_expert;
    int sh = c->n_shared * de;
    if (!ex) ex = &moe_local;
    int El = E / ex->size, e0 = ex->rank * El;
    size_t NK = (size_t)N * K;
    real *dgates = xmalloc(sizeof(real) * NK);        // (N, K)
    real *dys = xmalloc(sizeof(real) * NK * d);       // (N K, d) expert output gradient, token side
    real *ds = xmalloc(sizeof(real) * (size_t)N * E); // (N, E) affinity gradient

    // Combine backward: the gate gets dout . y, the expert output gets g * dout.
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const real *go = dout + (size_t)t * d;
        for (int j = 0; j < K; j++) {
            size_t slot = (size_t)t * K + j, row = a->row_of[slot];
            const real *y = a->eout + row * d;
            real gv = a->gates[slot], dot = 0;
            real *dy = dys + row * d;
            for (int i = 0; i < d; i++) {
                dot += go[i] * y[i];
                dy[i] = gv * go[i];
            }
            dgates[slot] = dot;
        }
    }

    // Routed experts, on the expert side, one per task as in the forward.
    real *dye = xmalloc(sizeof(real) * ((size_t)a->R * d + 1)); // (R, d)
    real *dxe = xmalloc(sizeof(real) * ((size_t)a->R * d + 1)); // (R, d) input gradient
    moe_send(ex, a, dys, dye, d);
#pragma omp parallel for schedule(dynamic, 1)
    for (int j = 0; j < El; j++) {
        int r0 = a->exp_offsets[j], n = a->exp_offsets[j + 1] - r0, e = e0 + j;
        if (n == 0) continue;
        real *dact = xmalloc(sizeof(real) * (size_t)n * de);    // (n, de)
        real *d13 = xmalloc(sizeof(real) * (size_t)n * 2 * de); // (n, 2 de)
        const real *w13 = w->ex13 + (size_t)e * 2 * de * d, *w2 = w->ex2 + (size_t)e * d * de;
        const real *e13 = a->e13 + (size_t)r0 * 2 * de, *eact = a->eact + (size_t)r0 * de;
        const real *dy = dye + (size_t)r0 * d, *x = a->xe + (size_t)r0 * d;
        matmul_backward_weight(g->ex2 + (size_t)e * d * de, dy, eact, n, de, d);
        matmul_backward_input(dact, dy, w2, n, de, d, 0);
        swiglu_backward(d13, dact, e13, n, de);
        matmul_backward_weight(g->ex13 + (size_t)e * 2 * de * d, d13, x, n, d, 2 * de);
        matmul_backward_input(dxe + (size_t)r0 * d, d13, w13, n, d, 2 * de, 0);
        free(dact);
        free(d13);
    }
    moe_return(ex, a, dxe, dys, d); // dys now holds the input gradient of each slot
    free(dye);
    free(dxe);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        real *o = dh + (size_t)t * d;
        for (int j = 0; j < K; j++) {
            const real *src = dys + (size_t)a->row_of[(size_t)t * K + j] * d;
            for (int i = 0; i < d; i++) o[i] += src[i];
        }
    }

    // Shared experts.
    if (sh > 0) {
        real *dact = xmalloc(sizeof(real) * (size_t)N * sh);      // (N, S de)
        real *d13 = xmalloc(sizeof(real) * (size_t)N * 2 * sh);   // (N, 2 S de)
        matmul_backward_weight(g->sh2, dout, a->sact, N, sh, d);
        matmul_backward_input(dact, dout, w->sh2, N, sh, d, 0);
        swiglu_backward(d13, dact, a->s13, N, sh);
        matmul_backward_weight(g->sh13, d13, h, N, d, 2 * sh);
        matmul_backward_input(dh, d13, w->sh13, N, d, 2 * sh, 1);
        free(dact);
        free(d13);
    }

    // Gate values -> affinities. With norm_topk, g_j = r s_j / z, z = sum_i s_i:
    // ds_j = r (dg_j / z - sum_i dg_i s_i / z^2).
    memset(ds, 0, sizeof(real) * (size_t)N * E);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const real *s = a->s + (size_t)t * E;
        const int *sel = a->sel + (size_t)t * K;
        const real *dg = dgates + (size_t)t * K;
        real *d_s = ds + (size_t)t * E, rs = c->route_scale;
        if (c->norm_topk) {
            real z = 0, dot = 0;
            for (int j = 0; j < K; j++) {
                z += s[sel[j]];
                dot += dg[j] * s[sel[j]];
            }
            for (int j = 0; j < K; j++) d_s[sel[j]] += rs * (dg[j] / z - dot / (z * z));
        } else {
            for (int j = 0; j < K; j++) d_s[sel[j]] += rs * dg[j];
        }
    }
    moe_aux_backward(c, ro, a, B, T, ds, grad_scale);

    // Affinities -> router logits.
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const real *s = a->s + (size_t)t * E;
        real *d_s = ds + (size_t)t * E;
        if (c->gate == GATE_SIGMOID) {
            for (int e = 0; e < E; e++) d_s[e] *= s[e] * (1 - s[e]);
        } else {
            real dot = 0;
            for (int e = 0; e < E; e++) dot += d_s[e] * s[e];
            for (int e = 0; e < E; e++) d_s[e] = s[e] * (d_s[e] - dot);
        }
    }
    matmul_backward_weight(g->router, ds, h, N, d, E);
    matmul_backward_input(dh, ds, w->router, N, d, E, 1);

    free(dgates);
    free(dys);
    free(ds);
}
