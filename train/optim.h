// AdamW on flat fp32 buffers, gradient norm and clipping: the optimizer both
// trainers share. The CPU trainer calls adamw_step directly; the GPU trainer
// computes the same per-step scalars with adamw_scalars and applies the same
// per-element rule, adamw_update_one, in its kernel, so the two agree.
//
// Semantics are those of torch.optim.AdamW (decoupled weight decay) and
// torch.nn.utils.clip_grad_norm_; see docs in the functions below.
#ifndef MOE_OPTIM_H
#define MOE_OPTIM_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "../model/layout.h"

// Lets the CUDA build call the per-element rule from device code.
#ifdef __CUDACC__
#define OPTIM_HD __host__ __device__
#else
#define OPTIM_HD
#endif

// Hyperparameters other than the learning rate (that comes from train/lr.h).
// Defaults are DeepSeekMoE's (arXiv 2401.06066): betas 0.9/0.95, eps 1e-8,
// weight decay 0.1, gradient clipping at global norm 1.0.
typedef struct {
    double beta1;         // first-moment decay
    double beta2;         // second-moment decay
    double eps;           // added to sqrt(vhat)
    double weight_decay;  // decoupled; applied only to ranges marked decay
    double grad_clip;     // max global L2 norm of the gradient; <= 0 disables clipping
} AdamWConfig;

void adamw_config_default(AdamWConfig *c);
// Sets one option from text. Keys: beta1, beta2, adam-eps, weight-decay, grad-clip.
// Returns 0, -1 for an unknown key, -2 for a bad value (message in err).
int adamw_set_option(AdamWConfig *c, const char *key, const char *value, char *err, size_t errlen);
// Checks ranges (0 <= beta < 1, eps > 0, weight decay >= 0). Returns 0 or -1 (message in err).
int adamw_validate(const AdamWConfig *c, char *err, size_t errlen);
void adamw_print_help(FILE *f);
// Writes every field as key=value lines (for logs and the checkpoint's options text).
void adamw_config_write(const AdamWConfig *c, FILE *f);

// Which parts of the flat parameter buffer get weight decay. Built from the
// layout table: matrices decay, norm weights do not. Adjacent tensors with the
// same flag are merged, so the ranges are few; they tile [0, total) in order.
typedef struct {
    int64_t offset;  // first element
    int64_t len;     // elements
    int decay;       // 1: weight decay applies
} DecayRange;

typedef struct {
    DecayRange *r;   // (n) in buffer order, contiguous
    int n;
    int64_t total;   // elements covered, = layout total
} DecayRanges;

// Returns 0, or -1 when out of memory or when the table's tensors do not tile
// the buffer (a bug in the layout; a message goes to stderr).
int decay_ranges_from_layout(DecayRanges *dr, const ParamLayout *lay);
void decay_ranges_free(DecayRanges *dr);
// Elements that receive weight decay.
int64_t decay_ranges_count_decayed(const DecayRanges *dr);

// The per-step scalars of one AdamW update, computed once in double (as torch
// does with its Python floats) and rounded to float once.
typedef struct {
    float decay_factor;   // 1 - lr * weight_decay, for decayed elements
    float beta1;          // m <- m + (1 - beta1) (g - m)
    float one_minus_beta1;
    float beta2;          // v <- beta2 v + (1 - beta2) g^2
    float one_minus_beta2;
    float step_size;      // lr / (1 - beta1^t)
    float bc2_sqrt;       // sqrt(1 - beta2^t)
    float eps;
} AdamWScalars;

// t is the 1-based count of updates including this one. Aborts with a message
// for t < 1 (a programming error: bias correction would divide by zero).
AdamWScalars adamw_scalars(const AdamWConfig *c, double lr, int64_t t);

// One element, in torch's order of operations (the single-tensor and foreach
// paths of torch.optim.AdamW, PyTorch 2.x):
//   p *= 1 - lr*wd                      (decoupled decay, before the moments)
//   m  = m + (1-b1)(g - m)              (torch's lerp_; = b1 m + (1-b1) g)
//   v  = b2 v + ((1-b2) g) g            (mul_ then addcmul_)
//   p  = p + (-step_size m) / (sqrt(v)/sqrt(1-b2^t) + eps)    (addcdiv_)
// which is p -= lr * mhat / (sqrt(vhat) + eps) with mhat = m/(1-b1^t),
// vhat = v/(1-b2^t). A build that lets the compiler fuse a*b+c into one FMA
// (-ffp-contract=fast) may differ from torch in the last bit; it still gives
// the same result for every thread count.
static inline OPTIM_HD void adamw_update_one(float *p, float g, float *m, float *v, int decay,
                                             const AdamWScalars *s) {
    float pv = *p;
    if (decay) pv *= s->decay_factor;
    float mv = *m + s->one_minus_beta1 * (g - *m);
    float vv = s->beta2 * *v + (s->one_minus_beta2 * g) * g;
    float denom = sqrtf(vv) / s->bc2_sqrt + s->eps;
    *p = pv + (-s->step_size * mv) / denom;
    *m = mv;
    *v = vv;
}

// One AdamW update of n elements. m and v start at zero before the first step.
// ranges says which elements decay; NULL decays every element (torch's
// behaviour for a single parameter group). ranges->total must equal n.
// Elementwise, so the result does not depend on the OpenMP thread count.
void adamw_step(float *params, const float *grads, float *m, float *v, int64_t n,
                const DecayRanges *ranges, const AdamWConfig *c, double lr, int64_t t);

// Sum of squares of g, in double, in a fixed order whatever the thread count:
// fixed blocks of GRAD_NORM_BLOCK elements, each summed in order, the block
// sums then added in block order. Bit-identical for 1 or many threads.
enum { GRAD_NORM_BLOCK = 16384 };
double grad_sumsq(const float *g, int64_t n);
// sqrt(grad_sumsq), rounded to float: the global L2 norm of the gradient.
float grad_norm(const float *g, int64_t n);
// torch clip_grad_norm_: coefficient max_norm / (norm + 1e-6) in float,
// clamped to at most 1 (so only gradients larger than max_norm shrink).
// Returns 1 when max_norm <= 0 (clipping disabled). A non-finite norm gives a
// coefficient of 0 or NaN, as in torch: check isfinite(norm) before stepping.
float grad_clip_scale(float norm, float max_norm);
// g *= s elementwise; does nothing when s == 1.
void grad_scale(float *g, int64_t n, float s);

#endif
