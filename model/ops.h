// The CPU model's building blocks, forward and backward: embedding, RMSNorm,
// rotary embedding, causal attention, SwiGLU and the cross-entropy loss. Each
// backward accumulates (+=) into parameter gradients and, where noted, into the
// input gradient, so that residual branches add up without extra copies.
#ifndef MOE_OPS_H
#define MOE_OPS_H

#include "real.h"

// out (N, d) = emb[tokens[t]] (V, d)
void encoder_forward(real *out, const int *tokens, const real *emb, int N, int d);
// demb (V, d) += scatter of dout (N, d) by token; serial so the sum order is fixed.
void encoder_backward(real *demb, const real *dout, const int *tokens, int N, int d);

// out (N, d) = x * rstd * w, rstd (N) = 1 / sqrt(mean(x^2) + eps)
void rmsnorm_forward(real *out, real *rstd, const real *x, const real *w, int N, int d, float eps);
// dx (N, d) += input gradient; dw (d) += weight gradient.
void rmsnorm_backward(real *dx, real *dw, const real *dout, const real *x, const real *w,
                      const real *rstd, int N, int d);

// cos/sin tables (T, hd/2) for RoPE with base theta.
void rope_tables(real *cos_t, real *sin_t, int T, int hd, float theta);
// Rotates the query and key columns of qkv (B*T, 3d) in place ("rotate half"
// form, see docs/model.md). inverse = 1 applies the transpose rotation, which is
// the backward of the forward rotation.
void rope_apply(real *qkv, const real *cos_t, const real *sin_t, int B, int T, int d, int H, int inverse);

// Causal multi-head attention. qkv (B*T, 3d) with RoPE applied, att (B, H, T, T)
// the softmax probabilities (kept for backward; zero above the diagonal),
// out (B*T, d) heads concatenated.
void attention_forward(real *out, real *att, const real *qkv, int B, int T, int d, int H);
// dqkv (B*T, 3d) = gradient of qkv (overwritten).
void attention_backward(real *dqkv, const real *dout, const real *qkv, const real *att, int B, int T,
                        int d, int H);

// SwiGLU activation: h13 (N, 2m) holds [g | u]; act (N, m) = silu(g) * u.
void swiglu_forward(real *act, const real *h13, int N, int m);
// dh13 (N, 2m) = gradient of [g | u] given dact (N, m) (overwritten).
void swiglu_backward(real *dh13, const real *dact, const real *h13, int N, int m);

// Mean cross-entropy of logits (N, V) against targets (N). Turns logits into
// probabilities in place (kept for backward) and returns the loss, summed in
// double.
double crossentropy_forward(real *logits, const int *targets, int N, int V);
// probs (N, V) -> dlogits = scale * (probs - onehot(target)) / N, in place.
void crossentropy_backward(real *probs, const int *targets, int N, int V, real scale);

#endif
