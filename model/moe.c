// The DeepSeekMoE layer on the CPU (see moe.h and docs/model.md).
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "matmul.h"
#include "ops.h"
#include "phase.h"
#include "route.h"
#include "../util/util.h"

void moe_acts_alloc(MoeActs *a, const MoeConfig *c, int N) {
    size_t E = c->n_routed, K = c->top_k, d = c->d_model;
    size_t sh = (size_t)c->n_shared * c->d_expert, NK = (size_t)N * K;
    memset(a, 0, sizeof *a);
    a->s = xmalloc(sizeof(real) * N * E);
    a->z = xmalloc(sizeof(real) * N * E);
    a->sel = xmalloc(sizeof(int) * NK);
    a->sel0 = xmalloc(sizeof(int) * NK);
    a->primal_tok = xmalloc(sizeof(double) * N);
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
    free(a->s); free(a->z); free(a->sel); free(a->sel0); free(a->primal_tok); free(a->gates); free(a->offsets); free(a->slot_of); free(a->row_of);
    free(a->eout); free(a->s13); free(a->sact);
    free(a->send_rows); free(a->recv_rows); free(a->recv_cnt); free(a->exp_offsets); free(a->exp_src);
    free(a->xe); free(a->e13); free(a->eact);
    memset(a, 0, sizeof *a);
}

// Grows the expert-side buffers to hold R rows (their size is only known after
// the counts exchange; under expert parallelism it varies from step to step).
static void moe_reserve_rows(MoeActs *a, const MoeConfig *c, int R) {
    if (R <= a->rows_cap) return;
    size_t n = (size_t)R, d = c->d_model, de = c->d_expert;
    a->exp_src = xrealloc(a->exp_src, sizeof(int) * n);
    a->xe = xrealloc(a->xe, sizeof(real) * n * d);
    a->e13 = xrealloc(a->e13, sizeof(real) * n * 2 * de);
    a->eact = xrealloc(a->eact, sizeof(real) * n * de);
    a->rows_cap = R;
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

// a->sel (N, K) = TopK of the biased scores (affinities, or logits with
// bias_logits), a->gates (N, K) from the unbiased affinities. With dual, also
// each token's selection without the bias and its primal part, then the
// primal-dual sums in token order (the order fixes the double sums, so they do
// not depend on the number of threads).
static void moe_select(const RouteParams *rp, const float *bias, MoeActs *a, int N, DualAccum *dual) {
    int E = rp->n_experts, K = rp->top_k;
    const real *src = rp->bias_logits ? a->z : a->s; // (N, E) what the bias is added to
#pragma omp parallel
    {
        double *score = xmalloc(sizeof(double) * E); // (E) selection scores of one token
        float *row = xmalloc(sizeof(float) * E);     // (E) the token's unbiased scores in fp32
#pragma omp for schedule(static)
        for (int t = 0; t < N; t++) {
            const real *s = a->s + (size_t)t * E, *u = src + (size_t)t * E;
            int *sel = a->sel + (size_t)t * K;
            real *gate = a->gates + (size_t)t * K;
            // The score is formed in the model's precision, then widened exactly.
            for (int e = 0; e < E; e++) score[e] = (double)(real)ROUTE_SCORE(u[e], (real)bias[e], rp->bias_mult);
            route_topk(score, E, K, sel);
            // Gate values use the unbiased affinities: the bias steers selection only.
            real z = 0;
            for (int j = 0; j < K; j++) z += s[sel[j]];
            for (int j = 0; j < K; j++) gate[j] = (rp->norm_topk ? s[sel[j]] / z : s[sel[j]]) * rp->route_scale;
            if (dual) {
                // The reference selection: the scores alone (bias 0, or 1 for mult).
                for (int e = 0; e < E; e++) score[e] = (double)u[e];
                route_topk(score, E, K, a->sel0 + (size_t)t * K);
                for (int e = 0; e < E; e++) row[e] = (float)u[e];
                a->primal_tok[t] = dual_token_primal(row, sel, K, rp->bias_mult);
            }
        }
        free(score);
        free(row);
    }
    if (dual)
        for (int t = 0; t < N; t++)
            dual_accum_token(dual, a->primal_tok[t], a->sel + (size_t)t * K, a->sel0 + (size_t)t * K);
}

void moe_bias_scores(const MoeActs *a, const RouteOptions *ro, int N, int E, float *out) {
    const real *src = ro->bias_logits ? a->z : a->s;
    for (size_t i = 0; i < (size_t)N * E; i++) out[i] = (float)src[i];
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

static double moe_aux_forward(const RouteParams *rp, const MoeActs *a, int B, int T) {
    int E = rp->n_experts, K = rp->top_k, N = B * T;
    if (rp->aux_kind == AUX_NONE) return 0;
    int ngroups = route_aux_groups(rp->aux_kind, B);
    int len = N / ngroups; // tokens per group
    double *f = xmalloc(sizeof(double) * E);         // (E) tokens choosing each expert
    double *prob_sum = xmalloc(sizeof(double) * E);  // (E) sum over the group of the affinities
    double total = 0;
    for (int q = 0; q < ngroups; q++) {
        memset(f, 0, sizeof(double) * E);
        memset(prob_sum, 0, sizeof(double) * E);
        for (int t = q * len; t < (q + 1) * len; t++) {
            const real *s = a->s + (size_t)t * E;
            double z = 1;
            if (rp->aux_kind == AUX_SEQ) {
                z = 0;
                for (int e = 0; e < E; e++) z += s[e];
            }
            for (int e = 0; e < E; e++) prob_sum[e] += s[e] / z;
            for (int j = 0; j < K; j++) f[a->sel[(size_t)t * K + j]] += 1;
        }
        double lq = 0;
        for (int e = 0; e < E; e++) lq += ((double)E / ((double)K * len) * f[e]) * (prob_sum[e] / len);
        total += lq;
    }
    free(f);
    free(prob_sum);
    return rp->aux_alpha * total / ngroups;
}

static void moe_aux_backward(const RouteParams *rp, const MoeActs *a, int B, int T, real *ds, real grad_scale) {
    int E = rp->n_experts, K = rp->top_k, N = B * T;
    if (rp->aux_kind == AUX_NONE) return;
    int ngroups = route_aux_groups(rp->aux_kind, B), len = N / ngroups;
    double *f = xmalloc(sizeof(double) * E); // (E) tokens choosing each expert, then dL/dP
    for (int q = 0; q < ngroups; q++) {
        memset(f, 0, sizeof(double) * E);
        for (int t = q * len; t < (q + 1) * len; t++)
            for (int j = 0; j < K; j++) f[a->sel[(size_t)t * K + j]] += 1;
        // dL/dP_e = alpha/ngroups * f_e, and P_e = (1/len) sum_t s'_te.
        double coef = grad_scale * rp->aux_alpha / ngroups / len;
        for (int e = 0; e < E; e++) f[e] = coef * (double)E / ((double)K * len) * f[e];
        for (int t = q * len; t < (q + 1) * len; t++) {
            const real *s = a->s + (size_t)t * E;
            real *dst = ds + (size_t)t * E;
            if (rp->aux_kind == AUX_EXPERT) {
                for (int e = 0; e < E; e++) dst[e] += (real)f[e];
            } else {
                // s' = s / z: ds_e = (g_e - sum_i g_i s'_i) / z.
                double z = 0, gs = 0;
                for (int e = 0; e < E; e++) z += s[e];
                for (int e = 0; e < E; e++) gs += f[e] * s[e] / z;
                for (int e = 0; e < E; e++) dst[e] += (real)((f[e] - gs) / z);
            }
        }
    }
    free(f);
}

// ----------------------------------------------------------------------------
// Expert parallelism: moving rows between the token side (this rank's slots in
// expert order) and the expert side (rows for the local experts, expert-major;
// parallel/ep_layout.h). Without an exchange the reorder is the identity.

// After routing: exchanges the counts, then sends the rows xs (N K, d) to the
// ranks of their experts and fills a->xe (R, d) expert-major.
static void moe_dispatch(const MoeConfig *c, const MoeExchange *ex, const EpShard *ep, MoeActs *a, const real *xs) {
    int d = c->d_model;
    // send counts = this rank's rows per expert, already grouped by destination.
    int *send_cnt = xmalloc(sizeof(int) * c->n_routed); // (P, El)
    for (int e = 0; e < c->n_routed; e++) send_cnt[e] = a->offsets[e + 1] - a->offsets[e];
    if (ex) ex->alltoall_int(ex->ctx, send_cnt, a->recv_cnt, ep->n_local);
    else memcpy(a->recv_cnt, send_cnt, sizeof(int) * c->n_routed);
    a->R = ep_exchange_rows(ep, a->offsets, a->recv_cnt, a->send_rows, a->recv_rows);
    moe_reserve_rows(a, c, a->R);
    real *xr = ex ? xmalloc(sizeof(real) * (size_t)a->R * d) : (real *)xs; // (R, d) as received
    if (ex) ex->alltoallv(ex->ctx, xs, a->send_rows, xr, a->recv_rows, d);
    ep_expert_major_order(ep, a->recv_cnt, a->recv_rows, a->exp_offsets, a->exp_src);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < a->R; r++)
        memcpy(a->xe + (size_t)r * d, xr + (size_t)a->exp_src[r] * d, sizeof(real) * d);
    if (ex) free(xr);
    free(send_cnt);
}

// The reverse trip: ye (R, d) expert-major -> ys (N K, d) on the token side.
static void moe_return(const MoeExchange *ex, const MoeActs *a, const real *ye, real *ys, int d) {
    real *yr = ex ? xmalloc(sizeof(real) * (size_t)a->R * d) : ys; // (R, d) in received order
#pragma omp parallel for schedule(static)
    for (int r = 0; r < a->R; r++) memcpy(yr + (size_t)a->exp_src[r] * d, ye + (size_t)r * d, sizeof(real) * d);
    if (ex) {
        ex->alltoallv(ex->ctx, yr, a->recv_rows, ys, a->send_rows, d);
        free(yr);
    }
}

// Token side -> expert side for a gradient: ys (N K, d) -> ye (R, d).
static void moe_send(const MoeExchange *ex, const MoeActs *a, const real *ys, real *ye, int d) {
    real *yr = ex ? xmalloc(sizeof(real) * (size_t)a->R * d) : (real *)ys; // (R, d) in received order
    if (ex) ex->alltoallv(ex->ctx, ys, a->send_rows, yr, a->recv_rows, d);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < a->R; r++) memcpy(ye + (size_t)r * d, yr + (size_t)a->exp_src[r] * d, sizeof(real) * d);
    if (ex) free(yr);
}

// ----------------------------------------------------------------------------
// The expert FFN: one SwiGLU FFN of hidden size de on n rows, the unit every
// routed expert runs on its rows and the shared experts (one FFN of hidden
// S de) run on every token.

// y (n, d) = W2 (silu(g) * u) with [g | u] = h13 (n, 2 de) = x W13^T, x (n, d),
// w13 (2 de, d), w2 (d, de); act (n, de) = silu(g) * u. h13 and act are kept
// for the backward.
static void expert_ffn_forward(real *y, real *h13, real *act, const real *x, const real *w13, const real *w2, int n,
                               int d, int de) {
    matmul_forward(h13, x, w13, n, d, 2 * de, 0);
    swiglu_forward(act, h13, n, de);
    matmul_forward(y, act, w2, n, de, d, 0);
}

// Given dy (n, d): dw13 += (2 de, d), dw2 += (d, de), and dx (n, d) = (or +=,
// with accumulate) the input gradient.
static void expert_ffn_backward(real *dx, real *dw13, real *dw2, const real *dy, const real *x, const real *h13,
                                const real *act, const real *w13, const real *w2, int n, int d, int de,
                                int accumulate) {
    real *dact = xmalloc(sizeof(real) * (size_t)n * de);    // (n, de)
    real *d13 = xmalloc(sizeof(real) * (size_t)n * 2 * de); // (n, 2 de)
    matmul_backward_weight(dw2, dy, act, n, de, d);
    matmul_backward_input(dact, dy, w2, n, de, d, 0);
    swiglu_backward(d13, dact, h13, n, de);
    matmul_backward_weight(dw13, d13, x, n, d, 2 * de);
    matmul_backward_input(dx, d13, w13, n, d, 2 * de, accumulate);
    free(dact);
    free(d13);
}

// ----------------------------------------------------------------------------
// Forward

void moe_forward(const MoeConfig *c, const RouteOptions *ro, const MoeExchange *ex, const MoeWeights *w,
                 const float *bias, const real *h, int B, int T, MoeActs *a, real *out, int64_t *counts,
                 DualAccum *dual) {
    RouteParams rp = route_params(c, ro);
    int N = B * T, E = c->n_routed, K = c->top_k, d = c->d_model, de = c->d_expert;
    int sh = c->n_shared * de;
    EpShard ep = ex ? ex->shard : ep_shard(E, 1, 0);
    int e0 = ep_first_expert(&ep); // the local experts are e0 .. e0 + El - 1

    // Router: affinities, TopK with the bias, gate values; then expert order.
    phase_mark(PH_ROUTER);
    // With the bias on the logits the selection reads the logits: keep them.
    matmul_forward(a->s, h, w->router, N, d, E, 0);
    if (rp.bias_logits) memcpy(a->z, a->s, sizeof(real) * (size_t)N * E);
    moe_gate_forward(a->s, N, E, c->gate);
    moe_select(&rp, bias, a, N, dual);
    phase_mark(PH_PERMUTE);
    moe_permute(a, N, E, K, counts);

    // Gather each slot's token into expert order, and send it to its expert.
    real *xs = xmalloc(sizeof(real) * (size_t)N * K * d); // (N K, d)
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N * K; r++) memcpy(xs + (size_t)r * d, h + (size_t)(a->slot_of[r] / K) * d, sizeof(real) * d);
    moe_dispatch(c, ex, &ep, a, xs);

    // Routed experts: each one runs on its rows (expert-level parallelism;
    // the matmuls inside run on the calling thread).
    real *ye = xmalloc(sizeof(real) * ((size_t)a->R * d + 1)); // (R, d) expert outputs
    phase_mark(PH_EXPERT_GEMM);
#pragma omp parallel for schedule(dynamic, 1)
    for (int j = 0; j < ep.n_local; j++) {
        int r0 = a->exp_offsets[j], n = a->exp_offsets[j + 1] - r0, e = e0 + j;
        if (n == 0) continue; // an expert with no tokens does nothing
        expert_ffn_forward(ye + (size_t)r0 * d, a->e13 + (size_t)r0 * 2 * de, a->eact + (size_t)r0 * de,
                           a->xe + (size_t)r0 * d, w->ex13 + (size_t)e * 2 * de * d, w->ex2 + (size_t)e * d * de, n,
                           d, de);
    }
    phase_mark(PH_PERMUTE);
    moe_return(ex, a, ye, a->eout, d);
    free(ye);
    free(xs);

    // Shared experts: always on, one SwiGLU of hidden S*de.
    phase_mark(PH_SHARED);
    if (sh > 0) expert_ffn_forward(out, a->s13, a->sact, h, w->sh13, w->sh2, N, d, sh);
    else memset(out, 0, sizeof(real) * (size_t)N * d);

    // Gated combine, slots in selection order so the sum order is fixed.
    phase_mark(PH_PERMUTE);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        real *o = out + (size_t)t * d;
        for (int j = 0; j < K; j++) {
            real gate = a->gates[(size_t)t * K + j];
            const real *y = a->eout + (size_t)a->row_of[(size_t)t * K + j] * d;
            for (int i = 0; i < d; i++) o[i] += gate * y[i];
        }
    }
    phase_mark(PH_ROUTER);
    a->aux = moe_aux_forward(&rp, a, B, T);
}

// ----------------------------------------------------------------------------
// Backward

void moe_backward(const MoeConfig *c, const RouteOptions *ro, const MoeExchange *ex, const MoeWeights *w,
                  const real *h, const real *dout, int B, int T, MoeActs *a, real *dh, MoeGrads *dw,
                  real grad_scale) {
    RouteParams rp = route_params(c, ro);
    int N = B * T, E = c->n_routed, K = c->top_k, d = c->d_model, de = c->d_expert;
    int sh = c->n_shared * de;
    EpShard ep = ex ? ex->shard : ep_shard(E, 1, 0);
    int e0 = ep_first_expert(&ep);
    size_t NK = (size_t)N * K;
    real *dgates = xmalloc(sizeof(real) * NK);        // (N, K)
    real *dys = xmalloc(sizeof(real) * NK * d);       // (N K, d) expert output gradient, token side
    real *ds = xmalloc(sizeof(real) * (size_t)N * E); // (N, E) affinity gradient

    // Combine backward: the gate gets dout . y, the expert output gets gate * dout.
    phase_mark(PH_PERMUTE);
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
    phase_mark(PH_EXPERT_GEMM);
#pragma omp parallel for schedule(dynamic, 1)
    for (int j = 0; j < ep.n_local; j++) {
        int r0 = a->exp_offsets[j], n = a->exp_offsets[j + 1] - r0, e = e0 + j;
        if (n == 0) continue;
        expert_ffn_backward(dxe + (size_t)r0 * d, dw->ex13 + (size_t)e * 2 * de * d, dw->ex2 + (size_t)e * d * de,
                            dye + (size_t)r0 * d, a->xe + (size_t)r0 * d, a->e13 + (size_t)r0 * 2 * de,
                            a->eact + (size_t)r0 * de, w->ex13 + (size_t)e * 2 * de * d, w->ex2 + (size_t)e * d * de,
                            n, d, de, 0);
    }
    phase_mark(PH_PERMUTE);
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
    phase_mark(PH_SHARED);
    if (sh > 0) expert_ffn_backward(dh, dw->sh13, dw->sh2, dout, h, a->s13, a->sact, w->sh13, w->sh2, N, d, sh, 1);

    // Gate values -> affinities. With norm_topk, g_j = r s_j / z, z = sum_i s_i:
    // ds_j = r (dg_j / z - sum_i dg_i s_i / z^2).
    phase_mark(PH_ROUTER);
    memset(ds, 0, sizeof(real) * (size_t)N * E);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const real *s = a->s + (size_t)t * E;
        const int *sel = a->sel + (size_t)t * K;
        const real *dg = dgates + (size_t)t * K;
        real *d_s = ds + (size_t)t * E, rs = rp.route_scale;
        if (rp.norm_topk) {
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
    moe_aux_backward(&rp, a, B, T, ds, grad_scale);

    // Affinities -> router logits.
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const real *s = a->s + (size_t)t * E;
        real *d_s = ds + (size_t)t * E;
        if (rp.gate == GATE_SIGMOID) {
            for (int e = 0; e < E; e++) d_s[e] *= s[e] * (1 - s[e]);
        } else {
            real dot = 0;
            for (int e = 0; e < E; e++) dot += d_s[e] * s[e];
            for (int e = 0; e < E; e++) d_s[e] = s[e] * (d_s[e] - dot);
        }
    }
    matmul_backward_weight(dw->router, ds, h, N, d, E);
    matmul_backward_input(dh, ds, w->router, N, d, E, 1);

    free(dgates);
    free(dys);
    free(ds);
}
