// Learning-rate schedules and their options (definitions in lr.h).
#include "lr.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const lr_kind_names[] = {
    [LR_CONST] = "const", [LR_COSINE] = "cosine", [LR_MULTISTEP] = "multistep", [LR_WSD] = "wsd",
};
static const char *const wsd_shape_names[] = { [WSD_LINEAR] = "linear", [WSD_COSINE] = "cosine" };

void lr_schedule_default(LrSchedule *s) {
    memset(s, 0, sizeof *s);
    s->kind = LR_COSINE;
    s->lr = 1e-3;
    s->lr_min = 1e-4;
    s->warmup_steps = 100;
    s->wsd_decay_frac = 0.2;
    s->wsd_shape = WSD_LINEAR;
}

// ---------------------------------------------------------------- parsing

// A whole string as a finite double. Returns 0 or -1.
static int parse_double(const char *s, double *out) {
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE || !isfinite(x)) return -1;
    *out = x;
    return 0;
}

// A whole string as a non-negative decimal integer. Returns 0 or -1.
static int parse_count(const char *s, int64_t *out) {
    if (*s < '0' || *s > '9') return -1;  // strtoll would accept a sign or spaces
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (*end != '\0' || errno == ERANGE) return -1;
    *out = x;
    return 0;
}

// Splits a comma list into at most LR_MAX_STAGES items, parsed as integers
// into ints or as numbers into dbls (is_int chooses). "" is an empty list.
// Returns the item count, -1 for a bad item, -2 for too many.
static int parse_list(const char *value, int is_int, int64_t *ints, double *dbls) {
    if (value[0] == '\0') return 0;
    int n = 0;
    const char *p = value;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char item[64];  // one number's text
        if (len == 0 || len >= sizeof item) return -1;
        if (n == LR_MAX_STAGES) return -2;
        memcpy(item, p, len);
        item[len] = '\0';
        int rc = is_int ? parse_count(item, &ints[n]) : parse_double(item, &dbls[n]);
        if (rc != 0) return -1;
        n++;
        if (!comma) return n;
        p = comma + 1;
    }
}

// Index of name in a table of n names, or -1.
static int find_name(const char *const *names, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0) return i;
    return -1;
}

int lr_set_option(LrSchedule *s, const char *key, const char *value, char *err, size_t errlen) {
    if (strcmp(key, "lr") == 0 || strcmp(key, "lr-min") == 0 || strcmp(key, "wsd-decay-frac") == 0) {
        double *field = strcmp(key, "lr") == 0       ? &s->lr
                        : strcmp(key, "lr-min") == 0 ? &s->lr_min
                                                     : &s->wsd_decay_frac;
        if (parse_double(value, field) != 0) {
            snprintf(err, errlen, "option %s: '%s' is not a finite number", key, value);
            return -2;
        }
        return 0;
    }
    if (strcmp(key, "warmup-steps") == 0) {
        if (parse_count(value, &s->warmup_steps) != 0) {
            snprintf(err, errlen, "option %s: '%s' is not a non-negative integer", key, value);
            return -2;
        }
        return 0;
    }
    if (strcmp(key, "lr-schedule") == 0) {
        int k = find_name(lr_kind_names, 4, value);
        if (k < 0) {
            snprintf(err, errlen, "option %s: '%s' is not one of const, cosine, multistep, wsd", key, value);
            return -2;
        }
        s->kind = (LrKind)k;
        return 0;
    }
    if (strcmp(key, "wsd-decay") == 0) {
        int k = find_name(wsd_shape_names, 2, value);
        if (k < 0) {
            snprintf(err, errlen, "option %s: '%s' is not one of linear, cosine", key, value);
            return -2;
        }
        s->wsd_shape = (WsdShape)k;
        return 0;
    }
    if (strcmp(key, "lr-steps") == 0 || strcmp(key, "lr-rates") == 0) {
        int is_int = strcmp(key, "lr-steps") == 0;
        int64_t ints[LR_MAX_STAGES];  // parsed into temporaries: a bad list leaves *s unchanged
        double dbls[LR_MAX_STAGES];
        int n = parse_list(value, is_int, ints, dbls);
        if (n == -2) {
            snprintf(err, errlen, "option %s: more than %d items", key, LR_MAX_STAGES);
            return -2;
        }
        if (n < 0) {
            snprintf(err, errlen, "option %s: '%s' is not a comma list of %s", key, value,
                     is_int ? "non-negative integers" : "numbers");
            return -2;
        }
        if (is_int) {
            memcpy(s->steps, ints, sizeof ints[0] * (size_t)n);
            s->n_steps = n;
        } else {
            memcpy(s->rates, dbls, sizeof dbls[0] * (size_t)n);
            s->n_rates = n;
        }
        return 0;
    }
    snprintf(err, errlen, "unknown learning-rate option '%s'", key);
    return -1;
}

// ---------------------------------------------------------------- validation

static int check_multistep(const LrSchedule *s, char *err, size_t errlen) {
    if (s->n_steps != s->n_rates) {
        snprintf(err, errlen, "multistep: %d lr-steps but %d lr-rates (need one rate per step)",
                 s->n_steps, s->n_rates);
        return -1;
    }
    for (int i = 0; i < s->n_steps; i++) {
        if (i > 0 && s->steps[i] <= s->steps[i - 1]) {
            snprintf(err, errlen, "multistep: lr-steps must increase, but %lld follows %lld",
                     (long long)s->steps[i], (long long)s->steps[i - 1]);
            return -1;
        }
        if (!(s->rates[i] >= 0)) {
            snprintf(err, errlen, "multistep: lr-rates item %d is %g, must be >= 0", i + 1, s->rates[i]);
            return -1;
        }
    }
    if (s->n_steps > 0 && s->steps[0] < s->warmup_steps) {
        snprintf(err, errlen, "multistep: first lr-steps boundary %lld falls inside the %lld warmup steps",
                 (long long)s->steps[0], (long long)s->warmup_steps);
        return -1;
    }
    return 0;
}

int lr_validate(const LrSchedule *s, int64_t total_steps, char *err, size_t errlen) {
    // lr 0 is allowed: a run that evaluates or probes a checkpoint without moving it.
    if (!(s->lr >= 0) || !isfinite(s->lr)) {
        snprintf(err, errlen, "lr = %g must be >= 0", s->lr);
        return -1;
    }
    if (s->warmup_steps < 0) {
        snprintf(err, errlen, "warmup-steps = %lld must be >= 0", (long long)s->warmup_steps);
        return -1;
    }
    if (s->kind != LR_MULTISTEP && (s->n_steps > 0 || s->n_rates > 0)) {
        snprintf(err, errlen, "lr-steps/lr-rates are only used by lr-schedule multistep (this is %s)",
                 lr_kind_names[s->kind]);
        return -1;
    }
    if ((s->kind == LR_COSINE || s->kind == LR_WSD) && s->lr > 0) {
        if (!(s->lr_min >= 0 && s->lr_min <= s->lr)) {
            snprintf(err, errlen, "lr-min = %g must be in [0, lr = %g]", s->lr_min, s->lr);
            return -1;
        }
    }
    if (s->kind == LR_MULTISTEP && check_multistep(s, err, errlen) != 0) return -1;
    if (s->kind == LR_WSD && !(s->wsd_decay_frac > 0 && s->wsd_decay_frac <= 1)) {
        snprintf(err, errlen, "wsd-decay-frac = %g must be in (0, 1]", s->wsd_decay_frac);
        return -1;
    }
    if (total_steps <= 0) return 0;
    if ((s->kind == LR_COSINE || s->kind == LR_WSD) && s->warmup_steps >= total_steps) {
        snprintf(err, errlen, "warmup-steps = %lld leaves nothing of the %lld steps to decay over",
                 (long long)s->warmup_steps, (long long)total_steps);
        return -1;
    }
    if (s->kind == LR_WSD) {
        int64_t decay = llround(s->wsd_decay_frac * (double)total_steps);
        if (total_steps - decay < s->warmup_steps) {
            snprintf(err, errlen, "wsd: the decay (last %lld of %lld steps) starts inside the %lld warmup steps",
                     (long long)decay, (long long)total_steps, (long long)s->warmup_steps);
            return -1;
        }
    }
    return 0;
}

// ---------------------------------------------------------------- help and echo

void lr_print_help(FILE *f) {
    LrSchedule d;
    lr_schedule_default(&d);
    fprintf(f, "Learning rate (0-based step s; warmup: s < W uses lr*(s+1)/W):\n");
    fprintf(f, "  --lr-schedule NAME   const | cosine | multistep | wsd (default %s)\n", lr_kind_names[d.kind]);
    fprintf(f, "  --lr X               peak rate after warmup; 0 trains nothing (every rate 0) (default %g)\n", d.lr);
    fprintf(f, "  --lr-min X           final rate of cosine and wsd (default %g)\n", d.lr_min);
    fprintf(f, "  --warmup-steps W     linear warmup length, 0 for none (default %lld)\n",
            (long long)d.warmup_steps);
    fprintf(f, "  --lr-steps A,B,...   multistep: steps at which the rate changes (default none)\n");
    fprintf(f, "  --lr-rates X,Y,...   multistep: the rate from each of those steps on (default none)\n");
    fprintf(f, "  --wsd-decay-frac F   wsd: fraction of all steps spent decaying (default %g)\n",
            d.wsd_decay_frac);
    fprintf(f, "  --wsd-decay SHAPE    wsd: linear | cosine decay to lr-min (default %s)\n",
            wsd_shape_names[d.wsd_shape]);
}

void lr_schedule_write(const LrSchedule *s, FILE *f) {
    // %.17g round-trips a double exactly.
    fprintf(f, "lr-schedule=%s\nlr=%.17g\nlr-min=%.17g\nwarmup-steps=%lld\n", lr_kind_names[s->kind],
            s->lr, s->lr_min, (long long)s->warmup_steps);
    fprintf(f, "lr-steps=");
    for (int i = 0; i < s->n_steps; i++) fprintf(f, "%s%lld", i ? "," : "", (long long)s->steps[i]);
    fprintf(f, "\nlr-rates=");
    for (int i = 0; i < s->n_rates; i++) fprintf(f, "%s%.17g", i ? "," : "", s->rates[i]);
    fprintf(f, "\nwsd-decay-frac=%.17g\nwsd-decay=%s\n", s->wsd_decay_frac, wsd_shape_names[s->wsd_shape]);
}

// ---------------------------------------------------------------- the rate

// Half-cosine from hi (p = 0) to lo (p = 1). (M_PI is not in strict C11.)
static double cosine_between(double hi, double lo, double p) {
    const double pi = 3.14159265358979323846;
    return lo + 0.5 * (hi - lo) * (1.0 + cos(pi * p));
}

// (num / den) clamped to [0, 1]; den <= 0 counts as already finished.
static double progress(int64_t num, int64_t den) {
    if (den <= 0) return 1.0;
    double p = (double)num / (double)den;
    return p < 0 ? 0 : p > 1 ? 1 : p;
}

double lr_at(const LrSchedule *s, int64_t step, int64_t total_steps) {
    if (s->lr == 0) return 0; // --lr 0: nothing moves, whatever lr-min or lr-rates say
    int64_t W = s->warmup_steps;
    if (step < W) return s->lr * (double)(step + 1) / (double)W;
    switch (s->kind) {
    case LR_CONST:
        return s->lr;
    case LR_COSINE:
        return cosine_between(s->lr, s->lr_min, progress(step - W, total_steps - W));
    case LR_MULTISTEP: {
        double rate = s->lr;
        for (int i = 0; i < s->n_steps && i < s->n_rates; i++)
            if (step >= s->steps[i]) rate = s->rates[i];
        return rate;
    }
    case LR_WSD: {
        int64_t decay = llround(s->wsd_decay_frac * (double)total_steps);
        int64_t start = total_steps - decay;
        if (start < W) start = W;  // lr_validate rejects this; stay sane anyway
        if (step < start) return s->lr;
        double p = progress(step - start, total_steps - start);
        if (s->wsd_shape == WSD_COSINE) return cosine_between(s->lr, s->lr_min, p);
        return s->lr + (s->lr_min - s->lr) * p;
    }
    }
    return s->lr;
}
