// The CPU model's building blocks (see ops.h). Loops parallelise over tokens
// or (sequence, head) pairs, and every reduction runs in a fixed order inside
// one thread, so results do not depend on the number of threads.
#include "ops.h"

#include <stdlib.h>
#include <string.h>

#include "matmul.h"

// ----------------------------------------------------------------------------
// Embedding

void encoder_forward(real *out, const int *tokens, const real *emb, int N, int d) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) memcpy(out + (size_t)t * d, emb + (size_t)tokens[t] * d, sizeof(real) * d);
}

void encoder_backward(real *demb, const real *dout, const int *tokens, int N, int d) {
    // Two positions can hold the same token, so the scatter stays serial.
    for (int t = 0; t < N; t++) {
        real *row = demb + (size_t)tokens[t] * d;
        const real *g = dout + (size_t)t * d;
        for (int c = 0; c < d; c++) row[c] += g[c];
    }
}

// ----------------------------------------------------------------------------
// RMSNorm

void rmsnorm_forward(real *out, real *rstd, const real *x, const real *w, int N, int d, float eps) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const real *xt = x + (size_t)t * d;
        real ss = 0;
        for (int c = 0; c < d; c++) ss += xt[c] * xt[c];
        real r = 1 / r_sqrt(ss / d + eps);
        rstd[t] = r;
        real *o = out + (size_t)t * d;
        for (int c = 0; c < d; c++) o[c] = xt[c] * r * w[c];
    }
}

void rmsnorm_backward(real *dx, real *dw, const real *dout, const real *x, const real *w,
                      const real *rstd, int N, int d) {
    // With n = x * rstd and dn = dout * w: dx = rstd * (dn - n * mean(dn * n)).
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const real *xt = x + (size_t)t * d, *go = dout + (size_t)t * d;
        real r = rstd[t], dot = 0;
        for (int c = 0; c < d; c++) dot += go[c] * w[c] * xt[c] * r;
        dot /= d;
        real *gx = dx + (size_t)t * d;
        for (int c = 0; c < d; c++) gx[c] += r * (go[c] * w[c] - xt[c] * r * dot);
    }
    // The weight gradient sums over tokens: token-major and serial, so fixed order.
    for (int t = 0; t < N; t++) {
        const real *xt = x + (size_t)t * d, *go = dout + (size_t)t * d;
        real r = rstd[t];
        for (int c = 0; c < d; c++) dw[c] += go[c] * xt[c] * r;
    }
}

// ----------------------------------------------------------------------------
// Rotary position embedding

void rope_tables(real *cos_t, real *sin_t, int T, int hd, float theta) {
    int half = hd / 2;
    for (int p = 0; p < T; p++)
        for (int i = 0; i < half; i++) {
            // Computed in double so fp32 and fp64 builds see the same rounded angles.
            double f = pow((double)theta, -2.0 * i / hd);
            cos_t[p * half + i] = (real)cos(p * f);
            sin_t[p * half + i] = (real)sin(p * f);
        }
}

void rope_apply(real *qkv, const real *cos_t, const real *sin_t, int B, int T, int d, int H, int inverse) {
    int hd = d / H, half = hd / 2;
    real sign = inverse ? -1 : 1;
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < B * T; bt++) {
        int p = bt % T;
        const real *cs = cos_t + (size_t)p * half, *sn = sin_t + (size_t)p * half;
        // Query columns [0, d), key columns [d, 2d); value columns untouched.
        for (int part = 0; part < 2; part++)
            for (int h = 0; h < H; h++) {
                real *u = qkv + (size_t)bt * 3 * d + part * d + h * hd;
                for (int i = 0; i < half; i++) {
                    real a = u[i], b = u[i + half], s = sign * sn[i];
                    u[i] = a * cs[i] - b * s;
                    u[i + half] = b * cs[i] + a * s;
                }
            }
    }
}

// ----------------------------------------------------------------------------
// Causal attention

void attention_forward(real *out, real *att, const real *qkv, int B, int T, int d, int H) {
    int hd = d / H;
    real scale = 1 / r_sqrt((real)hd);
#pragma omp parallel
    {
        real *kt = malloc(sizeof(real) * (size_t)hd * T); // (hd, T) keys of one head, transposed
        if (!kt) abort();
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            int b = bh / H, h = bh % H;
            const real *base = qkv + (size_t)b * T * 3 * d;
            // Transposed keys make the score loop run over contiguous keys.
            for (int j = 0; j < T; j++)
                for (int c = 0; c < hd; c++) kt[(size_t)c * T + j] = base[(size_t)j * 3 * d + d + h * hd + c];
            for (int i = 0; i < T; i++) {
                const real *q = base + (size_t)i * 3 * d + h * hd;
                real *p = att + (((size_t)b * H + h) * T + i) * T; // (T) row of probabilities
                for (int j = 0; j <= i; j++) p[j] = 0;
                for (int c = 0; c < hd; c++) {
                    real qc = q[c];
                    const real *k = kt + (size_t)c * T;
                    for (int j = 0; j <= i; j++) p[j] += qc * k[j];
                }
                real mx = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    p[j] *= scale;
                    if (p[j] > mx) mx = p[j];
                }
                real sum = 0;
                for (int j = 0; j <= i; j++) {
                    p[j] = r_exp(p[j] - mx);
                    sum += p[j];
                }
                for (int j = 0; j <= i; j++) p[j] /= sum;
                for (int j = i + 1; j < T; j++) p[j] = 0;
                real *o = out + ((size_t)b * T + i) * d + h * hd;
                for (int c = 0; c < hd; c++) o[c] = 0;
                for (int j = 0; j <= i; j++) {
                    const real *v = base + (size_t)j * 3 * d + 2 * d + h * hd;
                    for (int c = 0; c < hd; c++) o[c] += p[j] * v[c];
                }
            }
        }
        free(kt);
    }
}

void attention_backward(real *dqkv, const real *dout, const real *qkv, const real *att, int B, int T,
                        int d, int H) {
    int hd = d / H;
    real scale = 1 / r_sqrt((real)hd);
    memset(dqkv, 0, sizeof(real) * (size_t)B * T * 3 * d);
#pragma omp parallel
    {
        real *vt = malloc(sizeof(real) * (size_t)hd * T); // (hd, T) values, transposed
        real *dp = malloc(sizeof(real) * (size_t)T);      // (T) gradient of one probability row
        if (!vt || !dp) abort();
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            int b = bh / H, h = bh % H;
            const real *base = qkv + (size_t)b * T * 3 * d;
            real *dbase = dqkv + (size_t)b * T * 3 * d;
            for (int j = 0; j < T; j++)
                for (int c = 0; c < hd; c++) vt[(size_t)c * T + j] = base[(size_t)j * 3 * d + 2 * d + h * hd + c];
            for (int i = 0; i < T; i++) {
                const real *p = att + (((size_t)b * H + h) * T + i) * T;
                const real *go = dout + ((size_t)b * T + i) * d + h * hd;
                // dp_j = dout_i . v_j ; dv_j += p_j dout_i
                for (int j = 0; j <= i; j++) dp[j] = 0;
                for (int c = 0; c < hd; c++) {
                    real g = go[c];
                    const real *v = vt + (size_t)c * T;
                    for (int j = 0; j <= i; j++) dp[j] += g * v[j];
                }
                for (int j = 0; j <= i; j++) {
                    real *dv = dbase + (size_t)j * 3 * d + 2 * d + h * hd;
                    for (int c = 0; c < hd; c++) dv[c] += p[j] * go[c];
                }
                // Softmax backward: ds_j = p_j (dp_j - sum_k p_k dp_k), then the 1/sqrt(hd) scale.
                real dot = 0;
                for (int j = 0; j <= i; j++) dot += p[j] * dp[j];
                const real *q = base + (size_t)i * 3 * d + h * hd;
                real *dq = dbase + (size_t)i * 3 * d + h * hd;
                for (int j = 0; j <= i; j++) {
                    real ds = p[j] * (dp[j] - dot) * scale;
                    const real *k = base + (size_t)j * 3 * d + d + h * hd;
                    real *dk = dbase + (size_t)j * 3 * d + d + h * hd;
                    for (int c = 0; c < hd; c++) {
                        dq[c] += ds * k[c];
                        dk[c] += ds * q[c];
                    }
                }
            }
        }
        free(vt);
        free(dp);
    }
}

// ----------------------------------------------------------------------------
// SwiGLU

void swiglu_forward(real *act, const real *h13, int N, int m) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const real *g = h13 + (size_t)t * 2 * m, *u = g + m;
        real *a = act + (size_t)t * m;
        for (int i = 0; i < m; i++) a[i] = g[i] / (1 + r_exp(-g[i])) * u[i];
    }
}

void swiglu_backward(real *dh13, const real *dact, const real *h13, int N, int m) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const real *g = h13 + (size_t)t * 2 * m, *u = g + m, *da = dact + (size_t)t * m;
        real *dg = dh13 + (size_t)t * 2 * m, *du = dg + m;
        for (int i = 0; i < m; i++) {
            real sig = 1 / (1 + r_exp(-g[i]));
            real silu = g[i] * sig;
            du[i] = da[i] * silu;
            dg[i] = da[i] * u[i] * sig * (1 + g[i] * (1 - sig));
        }
    }
}

// ----------------------------------------------------------------------------
// Cross-entropy

double crossentropy_forward(real *logits, const int *targets, int N, int V) {
    double *losses = malloc(sizeof(double) * (size_t)N); // (N) per-position loss
    if (!losses) abort();
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        real *l = logits + (size_t)t * V;
        real mx = l[0];
        for (int v = 1; v < V; v++) mx = l[v] > mx ? l[v] : mx;
        // loss = logsumexp(l) - l[target], taken before l becomes probabilities
        // so that a tiny target probability loses no precision.
        double target_logit = l[targets[t]];
        real sum = 0;
        for (int v = 0; v < V; v++) {
            l[v] = r_exp(l[v] - mx);
            sum += l[v];
        }
        for (int v = 0; v < V; v++) l[v] /= sum;
        losses[t] = (double)mx + log((double)sum) - target_logit;
    }
    double loss = 0;
    for (int t = 0; t < N; t++) loss += losses[t];
    free(losses);
    return loss / N;
}

void crossentropy_backward(real *probs, const int *targets, int N, int V, real scale) {
    real s = scale / N;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        real *p = probs + (size_t)t * V;
        p[targets[t]] -= 1;
        for (int v = 0; v < V; v++) p[v] *= s;
    }
}
