// AdamW, gradient norm and clipping on flat fp32 buffers (see optim.h), plus
// the optimizer's options and the weight-decay ranges derived from the layout.
// OpenMP pragmas are wrapped in #ifdef _OPENMP so the file also builds, serial
// and warning-free, without -fopenmp.
#include "optim.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------- options

void adamw_config_default(AdamWConfig *c) {
    c->beta1 = 0.9;
    c->beta2 = 0.95;
    c->eps = 1e-8;
    c->weight_decay = 0.1;
    c->grad_clip = 1.0;
}

// Parses a whole string as a finite double. Returns 0 or -1.
static int parse_double(const char *s, double *out) {
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE || !isfinite(x)) return -1;
    *out = x;
    return 0;
}

int adamw_set_option(AdamWConfig *c, const char *key, const char *value, char *err, size_t errlen) {
    double *field = NULL;
    if (strcmp(key, "beta1") == 0) field = &c->beta1;
    else if (strcmp(key, "beta2") == 0) field = &c->beta2;
    else if (strcmp(key, "adam-eps") == 0) field = &c->eps;
    else if (strcmp(key, "weight-decay") == 0) field = &c->weight_decay;
    else if (strcmp(key, "grad-clip") == 0) field = &c->grad_clip;
    if (!field) {
        snprintf(err, errlen, "unknown optimizer option '%s'", key);
        return -1;
    }
    if (parse_double(value, field) != 0) {
        snprintf(err, errlen, "option %s: '%s' is not a finite number", key, value);
        return -2;
    }
    return 0;
}

int adamw_validate(const AdamWConfig *c, char *err, size_t errlen) {
    if (!(c->beta1 >= 0 && c->beta1 < 1)) {
        snprintf(err, errlen, "beta1 = %g must be in [0, 1)", c->beta1);
        return -1;
    }
    if (!(c->beta2 >= 0 && c->beta2 < 1)) {
        snprintf(err, errlen, "beta2 = %g must be in [0, 1)", c->beta2);
        return -1;
    }
    if (!(c->eps > 0)) {
        snprintf(err, errlen, "adam-eps = %g must be > 0", c->eps);
        return -1;
    }
    if (!(c->weight_decay >= 0)) {
        snprintf(err, errlen, "weight-decay = %g must be >= 0", c->weight_decay);
        return -1;
    }
    return 0;
}

void adamw_print_help(FILE *f) {
    AdamWConfig d;
    adamw_config_default(&d);
    fprintf(f, "Optimizer (AdamW, decoupled weight decay on matrices only):\n");
    fprintf(f, "  --beta1 X          first-moment decay (default %g)\n", d.beta1);
    fprintf(f, "  --beta2 X          second-moment decay (default %g)\n", d.beta2);
    fprintf(f, "  --adam-eps X       added to sqrt(vhat) (default %g)\n", d.eps);
    fprintf(f, "  --weight-decay X   decoupled weight decay; norm weights get none (default %g)\n",
            d.weight_decay);
    fprintf(f, "  --grad-clip X      clip the global gradient norm to X; 0 disables (default %g)\n",
            d.grad_clip);
}

void adamw_config_write(const AdamWConfig *c, FILE *f) {
    // %.17g round-trips a double exactly, so a resumed run reads back the same values.
    fprintf(f, "beta1=%.17g\nbeta2=%.17g\nadam-eps=%.17g\nweight-decay=%.17g\ngrad-clip=%.17g\n",
            c->beta1, c->beta2, c->eps, c->weight_decay, c->grad_clip);
}

// ---------------------------------------------------------------- decay ranges

int decay_ranges_from_layout(DecayRanges *dr, const ParamLayout *lay) {
    memset(dr, 0, sizeof *dr);
    if (lay->n <= 0) return 0;
    dr->r = malloc(sizeof *dr->r * (size_t)lay->n);  // (lay->n) at most, one per tensor
    if (!dr->r) return -1;
    int64_t end = 0;
    for (int i = 0; i < lay->n; i++) {
        const ParamTensor *t = &lay->t[i];
        if (t->offset != end) {
            fprintf(stderr, "decay_ranges_from_layout: tensor %s starts at %lld, expected %lld\n",
                    t->name, (long long)t->offset, (long long)end);
            decay_ranges_free(dr);
            return -1;
        }
        int decay = t->is_matrix ? 1 : 0;
        // Merge with the previous range when the flag is the same: fewer, larger loops.
        if (dr->n > 0 && dr->r[dr->n - 1].decay == decay) {
            dr->r[dr->n - 1].len += t->numel;
        } else {
            dr->r[dr->n++] = (DecayRange){ .offset = t->offset, .len = t->numel, .decay = decay };
        }
        end += t->numel;
    }
    dr->total = end;
    return 0;
}

void decay_ranges_free(DecayRanges *dr) {
    free(dr->r);
    memset(dr, 0, sizeof *dr);
}

int64_t decay_ranges_count_decayed(const DecayRanges *dr) {
    int64_t k = 0;
    for (int i = 0; i < dr->n; i++)
        if (dr->r[i].decay) k += dr->r[i].len;
    return k;
}

// ---------------------------------------------------------------- AdamW

AdamWScalars adamw_scalars(const AdamWConfig *c, double lr, int64_t t) {
    if (t < 1) {
        fprintf(stderr, "adamw_scalars: step count t = %lld must be >= 1\n", (long long)t);
        abort();
    }
    double bc1 = 1.0 - pow(c->beta1, (double)t);
    double bc2 = 1.0 - pow(c->beta2, (double)t);
    AdamWScalars s = {
        .decay_factor = (float)(1.0 - lr * c->weight_decay),
        .beta1 = (float)c->beta1,
        .one_minus_beta1 = (float)(1.0 - c->beta1),
        .beta2 = (float)c->beta2,
        .one_minus_beta2 = (float)(1.0 - c->beta2),
        .step_size = (float)(lr / bc1),
        .bc2_sqrt = (float)sqrt(bc2),
        .eps = (float)c->eps,
    };
    return s;
}

// Updates elements [off, off+len) with one decay flag; the caller is inside a
// parallel region, so this loop is shared among its threads.
static void adamw_range(float *p, const float *g, float *m, float *v, int64_t off, int64_t len,
                        int decay, const AdamWScalars *s) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = off; i < off + len; i++) adamw_update_one(&p[i], g[i], &m[i], &v[i], decay, s);
}

void adamw_step(float *params, const float *grads, float *m, float *v, int64_t n,
                const DecayRanges *ranges, const AdamWConfig *c, double lr, int64_t t) {
    if (ranges && ranges->total != n) {
        fprintf(stderr, "adamw_step: decay ranges cover %lld elements, buffer has %lld\n",
                (long long)ranges->total, (long long)n);
        abort();
    }
    AdamWScalars s = adamw_scalars(c, lr, t);
    // One parallel region for all ranges: the small norm-weight ranges would
    // otherwise each pay for starting a team of threads.
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
        if (!ranges) {
            adamw_range(params, grads, m, v, 0, n, 1, &s);
        } else {
            for (int i = 0; i < ranges->n; i++)
                adamw_range(params, grads, m, v, ranges->r[i].offset, ranges->r[i].len,
                            ranges->r[i].decay, &s);
        }
    }
}

// ---------------------------------------------------------------- gradient norm

// Block sums are gathered in batches of this many so no allocation is needed.
enum { GRAD_NORM_BATCH = 256 };

double grad_sumsq(const float *g, int64_t n) {
    int64_t nblocks = (n + GRAD_NORM_BLOCK - 1) / GRAD_NORM_BLOCK;
    double total = 0.0;
    for (int64_t b0 = 0; b0 < nblocks; b0 += GRAD_NORM_BATCH) {
        int64_t nb = nblocks - b0 < GRAD_NORM_BATCH ? nblocks - b0 : GRAD_NORM_BATCH;
        double part[GRAD_NORM_BATCH];  // (nb) sum of squares of each block of this batch
        // Each block is summed by one thread, in element order: the thread
        // count changes who computes a block, never what it computes.
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
        for (int64_t j = 0; j < nb; j++) {
            int64_t lo = (b0 + j) * GRAD_NORM_BLOCK;
            int64_t hi = lo + GRAD_NORM_BLOCK < n ? lo + GRAD_NORM_BLOCK : n;
            double acc = 0.0;
            for (int64_t i = lo; i < hi; i++) acc += (double)g[i] * (double)g[i];
            part[j] = acc;
        }
        for (int64_t j = 0; j < nb; j++) total += part[j];  // block order, always
    }
    return total;
}

float grad_norm(const float *g, int64_t n) { return (float)sqrt(grad_sumsq(g, n)); }

float grad_clip_scale(float norm, float max_norm) {
    if (!(max_norm > 0)) return 1.0f;
    // Float arithmetic, as torch does on its float32 norm tensor.
    float coef = max_norm / (norm + 1e-6f);
    return coef > 1.0f ? 1.0f : coef;  // NaN passes through, as torch's clamp
}

void grad_scale(float *g, int64_t n, float s) {
    if (s == 1.0f) return;
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int64_t i = 0; i < n; i++) g[i] *= s;
}
