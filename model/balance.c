// Load-balancing policy: the tables of methods, bias-update rules and step-size
// schedules, the option table behind the shared command line, the bias update
// from exact integer token counts, and the balance metrics with their JSON form.
// Formulas and sources: docs/balance.md.
#include "balance.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static const double BALANCE_PI = 3.14159265358979323846;

#define COUNT_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

// ----------------------------------------------------------------------------
// Methods: which mechanisms run (bias, auxiliary loss) and the default alpha.

typedef struct {
    const char *name;
    int uses_bias;        // routing selects by TopK of the biased score
    int aux_kind;         // an AuxKind (model/route.h)
    double default_alpha; // used when --aux-alpha is not given
    const char *help;
} BalanceMethod;

static const BalanceMethod balance_methods[] = {
    {"none", 0, AUX_NONE, 0.0, "no balancing: plain TopK of the affinities"},
    // alpha 0.001: the aux-loss baseline of arXiv 2408.15664.
    {"aux", 0, AUX_EXPERT, 1e-3, "expert-level auxiliary loss (DeepSeekMoE, arXiv 2401.06066)"},
    // alpha 0.0001: DeepSeek-V3's value, the only published one for this loss.
    {"seqaux", 0, AUX_SEQ, 1e-4, "sequence-wise auxiliary loss alone (arXiv 2412.19437)"},
    {"alf", 1, AUX_NONE, 0.0, "auxiliary-loss-free bias (Wang et al. arXiv 2408.15664)"},
    {"alf+seqaux", 1, AUX_SEQ, 1e-4, "bias plus sequence-wise loss, as DeepSeek-V3 (arXiv 2412.19437)"},
};

// ----------------------------------------------------------------------------
// Update rules. A rule maps one expert's load error to its bias step.
// err = K*N - E*c_i = E * (mean - c_i) is exact in integers, so sign(err) is
// exactly sign(mean - c_i) even when the mean K*N/E is not an integer;
// kn = K*N = E * mean, so err / kn = (mean - c_i) / mean.
// To add a rule: write one function and add one line to balance_rules.

typedef double (*BalanceRuleFn)(double gamma, int64_t err, int64_t kn);

typedef struct {
    const char *name;
    BalanceRuleFn step;  // the update of one expert (of log b when multiplicative)
    int multiplicative;  // 1: selection on s * b, b starts at 1, b *= exp(step)
    const char *help;
} BalanceRule;

static double sign_of(int64_t x) { return x > 0 ? 1.0 : (x < 0 ? -1.0 : 0.0); }

// Wang et al. arXiv 2408.15664, Algorithm 1: b_i += gamma * sign(mean - c_i).
static double rule_sign(double gamma, int64_t err, int64_t kn) {
    (void)kn;
    return gamma * sign_of(err);
}

// Dual step of Han & Zhong arXiv 2512.03915 with a constant step size:
// b_i += gamma * (mean - c_i) / mean. Dividing by the mean makes gamma a step per
// unit of relative load error, so one gamma means the same at any batch size.
static double rule_prop(double gamma, int64_t err, int64_t kn) {
    return gamma * (double)err / (double)kn;
}

static const BalanceRule balance_rules[] = {
    {"sign", rule_sign, 0, "b += gamma * sign(mean - c)  (arXiv 2408.15664, Alg. 1)"},
    {"prop", rule_prop, 0, "b += gamma * (mean - c) / mean  (arXiv 2512.03915 dual step)"},
    // TopK of s * b with s > 0 and b > 0 is TopK of log s + log b, so the sign
    // rule applied to log b is the exact analogue of the additive sign rule:
    // b stays positive, and an up step followed by a down step cancels (up to
    // fp32 rounding), where b *= 1 + gamma would drift down by gamma^2 per pair.
    {"mult", rule_sign, 1, "select on s * b, b starts at 1, b *= exp(gamma * sign(mean - c))"},
};

// ----------------------------------------------------------------------------
// Step-size schedules: gamma_t for 0-based step t of a run of `total` steps.
// To add a schedule: write one function and add one line to balance_schedules.

typedef double (*BalanceScheduleFn)(const BalanceConfig *c, int64_t t, int64_t total);

typedef struct {
    const char *name;
    BalanceScheduleFn gamma_at;
    const char *help;
} BalanceSchedule;

static double sched_const(const BalanceConfig *c, int64_t t, int64_t total) {
    (void)t;
    (void)total;
    return c->gamma;
}

static double sched_inv(const BalanceConfig *c, int64_t t, int64_t total) {
    (void)total;
    return c->gamma / (1.0 + (double)t / c->gamma_tau);
}

static double sched_invsqrt(const BalanceConfig *c, int64_t t, int64_t total) {
    (void)total;
    return c->gamma / sqrt(1.0 + (double)t / c->gamma_tau);
}

// Half a cosine from gamma at t = 0 to gamma_min at the last step t = total - 1.
static double sched_cosine(const BalanceConfig *c, int64_t t, int64_t total) {
    if (total <= 0) return c->gamma;
    double p = total > 1 ? (double)t / (double)(total - 1) : 1.0;
    if (p < 0.0) p = 0.0;
    if (p > 1.0) p = 1.0;
    return c->gamma_min + 0.5 * (c->gamma - c->gamma_min) * (1.0 + cos(BALANCE_PI * p));
}

// DeepSeek-V3 (arXiv 2412.19437) froze the bias for its last tokens: gamma until
// step round(frac * total), 0 from that step on.
static double sched_stop(const BalanceConfig *c, int64_t t, int64_t total) {
    if (total <= 0) return c->gamma;
    int64_t stop_step = (int64_t)llround(c->gamma_stop_frac * (double)total);
    return t < stop_step ? c->gamma : 0.0;
}

static const BalanceSchedule balance_schedules[] = {
    {"const", sched_const, "gamma"},
    {"inv", sched_inv, "gamma / (1 + t / tau)"},
    {"invsqrt", sched_invsqrt, "gamma / sqrt(1 + t / tau)"},
    {"cosine", sched_cosine, "gamma-min + (gamma - gamma-min) (1 + cos(pi t / (T - 1))) / 2"},
    {"stop", sched_stop, "gamma for t < round(stop-frac * T), then 0 (DeepSeek-V3)"},
};

// ----------------------------------------------------------------------------
// Configuration

static int method_index(const char *name) {
    for (int i = 0; i < COUNT_OF(balance_methods); i++)
        if (strcmp(balance_methods[i].name, name) == 0) return i;
    return -1;
}
static int rule_index(const char *name) {
    for (int i = 0; i < COUNT_OF(balance_rules); i++)
        if (strcmp(balance_rules[i].name, name) == 0) return i;
    return -1;
}
static int schedule_index(const char *name) {
    for (int i = 0; i < COUNT_OF(balance_schedules); i++)
        if (strcmp(balance_schedules[i].name, name) == 0) return i;
    return -1;
}

void balance_config_default(BalanceConfig *c) {
    c->method = method_index("alf");
    c->rule = rule_index("sign");
    c->schedule = schedule_index("const");
    c->center = 0;
    c->aux_alpha = -1.0; // the method's default
    c->gamma = 1e-3;     // u of arXiv 2408.15664 and DeepSeek-V3
    c->gamma_min = 0.0;
    // inv moves a sign-rule bias by at most gamma * tau * ln(1 + T / tau) in
    // total: 3.7 with tau = 1000 over the 40k steps of the 1B run, only 0.6 with
    // tau = 100, too little to follow a router that keeps learning.
    c->gamma_tau = 1000.0;
    // DeepSeek-V3 froze the bias for its last 0.5T of 14.8T tokens (0.966); 0.9
    // is a round default that leaves a visible frozen tail in short runs.
    c->gamma_stop_frac = 0.9;
    c->bias_logits = 0;  // Wang et al. and DeepSeek-V3 add the bias to the affinities
    c->update_micro = 0; // once per global batch, as Megatron-Core and torchtitan
}

const char *balance_method_name(const BalanceConfig *c) { return balance_methods[c->method].name; }
const char *balance_rule_name(const BalanceConfig *c) { return balance_rules[c->rule].name; }
const char *balance_schedule_name(const BalanceConfig *c) { return balance_schedules[c->schedule].name; }

int balance_uses_bias(const BalanceConfig *c) { return balance_methods[c->method].uses_bias; }
int balance_bias_is_multiplicative(const BalanceConfig *c) { return balance_rules[c->rule].multiplicative; }
float balance_bias_init_value(const BalanceConfig *c) { return balance_bias_is_multiplicative(c) ? 1.0f : 0.0f; }
int balance_aux_kind(const BalanceConfig *c) { return balance_methods[c->method].aux_kind; }
int balance_bias_on_logits(const BalanceConfig *c) { return c->bias_logits; }
int balance_updates_per_micro_batch(const BalanceConfig *c) { return c->update_micro; }

double balance_aux_alpha(const BalanceConfig *c) {
    const BalanceMethod *m = &balance_methods[c->method];
    if (m->aux_kind == AUX_NONE) return 0.0;
    return c->aux_alpha >= 0.0 ? c->aux_alpha : m->default_alpha;
}

RouteOptions balance_route_options(const BalanceConfig *c) {
    RouteOptions ro = { balance_bias_is_multiplicative(c), balance_aux_kind(c), (float)balance_aux_alpha(c),
                        balance_bias_on_logits(c) };
    return ro;
}

void balance_bias_init(const BalanceConfig *c, float *bias, int n_layers, int E) {
    float v = balance_bias_init_value(c);
    for (int64_t i = 0; i < (int64_t)n_layers * E; i++) bias[i] = v;
}

// ----------------------------------------------------------------------------
// Text output: one writer for a caller's buffer or a FILE

// A text sink that is either a caller's buffer (snprintf rules) or a FILE.
typedef struct {
    FILE *f;      // when not NULL, text goes here
    char *buf;    // else here, up to len bytes with the NUL
    size_t len;
    size_t pos;   // characters produced so far
    int failed;   // an output error happened
} Sink;

static void sink_printf(Sink *s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n;
    if (s->f) {
        n = vfprintf(s->f, fmt, ap);
    } else {
        size_t room = s->pos < s->len ? s->len - s->pos : 0;
        n = vsnprintf(room ? s->buf + s->pos : NULL, room, fmt, ap);
    }
    va_end(ap);
    if (n < 0) s->failed = 1;
    else s->pos += (size_t)n;
}

// JSON has no inf or nan: write null for them.
static void sink_num(Sink *s, double v, int digits) {
    if (isfinite(v)) sink_printf(s, "%.*g", digits, v);
    else sink_printf(s, "null");
}

static int sink_result(Sink *s) { return s->failed ? -1 : (int)s->pos; }

// ----------------------------------------------------------------------------
// Options: one table gives parsing, help, printing and validation.

typedef enum { OPT_METHOD, OPT_RULE, OPT_SCHEDULE, OPT_FLAG, OPT_REAL, OPT_ALPHA, OPT_CHOICE } OptKind;

typedef struct {
    const char *key;   // without the leading "--"
    OptKind kind;
    size_t offset;     // of the int (names, flag, choice) or double field
    double lo, hi;     // accepted range of a real
    int lo_open;       // 1: lo itself is rejected
    const char *help;
    const char *const *choices; // OPT_CHOICE: the names, NULL-terminated; the field holds the index
} BalanceOption;

// The values of the two-way options; the field holds the index.
static const char *const bias_on_names[] = {"scores", "logits", NULL};
static const char *const update_every_names[] = {"step", "micro", NULL};

#define OPT(key, kind, field, lo, hi, lo_open, help) \
    { key, kind, offsetof(BalanceConfig, field), lo, hi, lo_open, help, NULL }
#define OPT_NAMED(key, field, names, help) { key, OPT_CHOICE, offsetof(BalanceConfig, field), 0, 0, 0, help, names }
static const BalanceOption balance_options[] = {
    OPT("balance", OPT_METHOD, method, 0, 0, 0, "balancing method"),
    OPT("aux-alpha", OPT_ALPHA, aux_alpha, 0.0, HUGE_VAL, 0,
        "auxiliary-loss weight (only for aux, seqaux, alf+seqaux)"),
    OPT("gamma-rule", OPT_RULE, rule, 0, 0, 0, "bias update rule"),
    OPT("gamma-center", OPT_FLAG, center, 0, 0, 0,
        "1: subtract the mean update across experts (of log b for mult)"),
    OPT("gamma", OPT_REAL, gamma, 0.0, HUGE_VAL, 0, "bias update rate"),
    OPT("gamma-schedule", OPT_SCHEDULE, schedule, 0, 0, 0, "update-rate schedule over steps t"),
    OPT("gamma-tau", OPT_REAL, gamma_tau, 0.0, HUGE_VAL, 1, "time constant of inv / invsqrt, steps"),
    OPT("gamma-min", OPT_REAL, gamma_min, 0.0, HUGE_VAL, 0, "final rate of cosine"),
    OPT("gamma-stop-frac", OPT_REAL, gamma_stop_frac, 0.0, 1.0, 0,
        "stop: fraction of the steps with gamma > 0"),
    OPT_NAMED("bias-on", bias_logits, bias_on_names,
              "what the bias is added to: the affinities s (scores) or the router logits (logits)"),
    OPT_NAMED("bias-update-every", update_micro, update_every_names,
              "update the bias once per optimizer step (step) or after every micro-batch (micro)"),
};
#undef OPT
#undef OPT_NAMED

static const char *strip_dashes(const char *key) {
    if (strncmp(key, "--", 2) == 0) return key + 2;
    return key;
}

static const BalanceOption *option_find(const char *key) {
    key = strip_dashes(key);
    for (int i = 0; i < COUNT_OF(balance_options); i++)
        if (strcmp(balance_options[i].key, key) == 0) return &balance_options[i];
    return NULL;
}

int balance_has_option(const char *key) { return option_find(key) != NULL; }

static int *opt_int(BalanceConfig *c, const BalanceOption *o) { return (int *)((char *)c + o->offset); }
static double *opt_real(BalanceConfig *c, const BalanceOption *o) { return (double *)((char *)c + o->offset); }
static int opt_int_get(const BalanceConfig *c, const BalanceOption *o) {
    return *(const int *)((const char *)c + o->offset);
}
static double opt_real_get(const BalanceConfig *c, const BalanceOption *o) {
    return *(const double *)((const char *)c + o->offset);
}

static int is_named(OptKind kind) {
    return kind == OPT_METHOD || kind == OPT_RULE || kind == OPT_SCHEDULE || kind == OPT_CHOICE;
}

// The i-th accepted name of a name-valued option, or NULL past the last.
static const char *option_name_at(const BalanceOption *o, int i) {
    switch (o->kind) {
    case OPT_METHOD: return i < COUNT_OF(balance_methods) ? balance_methods[i].name : NULL;
    case OPT_RULE: return i < COUNT_OF(balance_rules) ? balance_rules[i].name : NULL;
    case OPT_SCHEDULE: return i < COUNT_OF(balance_schedules) ? balance_schedules[i].name : NULL;
    case OPT_CHOICE: return o->choices[i];
    default: return NULL;
    }
}

static int option_name_index(const BalanceOption *o, const char *value) {
    for (int i = 0; option_name_at(o, i); i++)
        if (strcmp(option_name_at(o, i), value) == 0) return i;
    return -1;
}

// The accepted names of a name-valued option, "a|b|c", into buf.
static void names_list(const BalanceOption *o, char *buf, size_t len) {
    size_t pos = 0;
    buf[0] = '\0';
    for (int i = 0; option_name_at(o, i) && pos < len; i++) {
        int w = snprintf(buf + pos, len - pos, "%s%s", i ? "|" : "", option_name_at(o, i));
        if (w < 0) return;
        pos += (size_t)w;
    }
}

static int real_in_range(const BalanceOption *o, double v) {
    if (!isfinite(v) || v > o->hi) return 0;
    return o->lo_open ? v > o->lo : v >= o->lo;
}

static void range_text(const BalanceOption *o, char *buf, size_t len) {
    if (isinf(o->hi)) snprintf(buf, len, "%s %g", o->lo_open ? ">" : ">=", o->lo);
    else snprintf(buf, len, "in [%g, %g]", o->lo, o->hi);
}

int balance_set_option(BalanceConfig *c, const char *key, const char *value,
                       char *err, size_t errlen) {
    const BalanceOption *o = option_find(key);
    if (!o) return -1;
    char names[128];  // "a|b|c" of a name-valued option
    char range[64];   // accepted range of a real, as text
    switch (o->kind) {
    case OPT_METHOD:
    case OPT_RULE:
    case OPT_SCHEDULE:
    case OPT_CHOICE: {
        int idx = option_name_index(o, value);
        if (idx < 0) {
            names_list(o, names, sizeof(names));
            snprintf(err, errlen, "--%s: unknown value '%s' (one of %s)", o->key, value, names);
            return -2;
        }
        *opt_int(c, o) = idx;
        return 0;
    }
    case OPT_FLAG:
        if (strcmp(value, "0") != 0 && strcmp(value, "1") != 0) {
            snprintf(err, errlen, "--%s: expected 0 or 1, got '%s'", o->key, value);
            return -2;
        }
        *opt_int(c, o) = value[0] == '1';
        return 0;
    case OPT_REAL:
    case OPT_ALPHA: {
        char *end = NULL;
        errno = 0;
        double v = strtod(value, &end);
        range_text(o, range, sizeof(range));
        if (end == value || *end != '\0' || errno || !real_in_range(o, v)) {
            snprintf(err, errlen, "--%s: expected a number %s, got '%s'", o->key, range, value);
            return -2;
        }
        *opt_real(c, o) = v;
        return 0;
    }
    }
    return -1;
}

int balance_validate(const BalanceConfig *c, char *err, size_t errlen) {
    if (c->method < 0 || c->method >= COUNT_OF(balance_methods) ||
        c->rule < 0 || c->rule >= COUNT_OF(balance_rules) ||
        c->schedule < 0 || c->schedule >= COUNT_OF(balance_schedules)) {
        snprintf(err, errlen, "balance config: method, rule or schedule index out of range");
        return -1;
    }
    if (c->center != 0 && c->center != 1) {
        snprintf(err, errlen, "--gamma-center must be 0 or 1");
        return -1;
    }
    for (int i = 0; i < COUNT_OF(balance_options); i++) {
        const BalanceOption *o = &balance_options[i];
        if (o->kind != OPT_REAL) continue;
        if (!real_in_range(o, opt_real_get(c, o))) {
            char range[64];  // accepted range as text
            range_text(o, range, sizeof(range));
            snprintf(err, errlen, "--%s must be %s (is %g)", o->key, range, opt_real_get(c, o));
            return -1;
        }
    }
    if (c->aux_alpha > 0.0 && balance_aux_kind(c) == AUX_NONE) {
        // An alpha the method ignores is most likely a mistake (e.g. alf meant
        // as alf+seqaux): refuse rather than run something else than asked.
        // 0 is allowed: it is what balance_print_config writes for such methods.
        snprintf(err, errlen, "--aux-alpha is given but --balance %s has no auxiliary loss",
                 balance_method_name(c));
        return -1;
    }
    if (!isfinite(c->aux_alpha)) {
        snprintf(err, errlen, "--aux-alpha must be a finite number");
        return -1;
    }
    if ((c->bias_logits != 0 && c->bias_logits != 1) || (c->update_micro != 0 && c->update_micro != 1)) {
        snprintf(err, errlen, "balance config: --bias-on or --bias-update-every index out of range");
        return -1;
    }
    if (c->bias_logits && balance_bias_is_multiplicative(c)) {
        // s * b needs s > 0 (TopK of s b = TopK of log s + log b); a logit can be any sign.
        snprintf(err, errlen, "--bias-on logits cannot go with --gamma-rule mult (a multiplicative bias needs "
                 "positive scores; logits can be negative)");
        return -1;
    }
    if (c->schedule == schedule_index("cosine") && c->gamma_min > c->gamma) {
        snprintf(err, errlen, "--gamma-min (%g) must not exceed --gamma (%g) for the cosine schedule",
                 c->gamma_min, c->gamma);
        return -1;
    }
    return 0;
}

// Writes one option's value; names are quoted when json is set.
static void option_print_value(const BalanceConfig *c, const BalanceOption *o, Sink *s, int json) {
    const char *q = json ? "\"" : "";
    switch (o->kind) {
    case OPT_METHOD: sink_printf(s, "%s%s%s", q, balance_methods[opt_int_get(c, o)].name, q); break;
    case OPT_RULE: sink_printf(s, "%s%s%s", q, balance_rules[opt_int_get(c, o)].name, q); break;
    case OPT_SCHEDULE: sink_printf(s, "%s%s%s", q, balance_schedules[opt_int_get(c, o)].name, q); break;
    case OPT_CHOICE: sink_printf(s, "%s%s%s", q, o->choices[opt_int_get(c, o)], q); break;
    case OPT_FLAG: sink_printf(s, "%d", opt_int_get(c, o)); break;
    case OPT_REAL: sink_num(s, opt_real_get(c, o), 15); break;
    case OPT_ALPHA: sink_num(s, balance_aux_alpha(c), 15); break;
    }
}

void balance_print_help(FILE *f) {
    BalanceConfig d;
    balance_config_default(&d);
    fprintf(f, "Load balancing options (docs/balance.md):\n");
    for (int i = 0; i < COUNT_OF(balance_options); i++) {
        const BalanceOption *o = &balance_options[i];
        char names[128];  // "a|b|c" of a name-valued option
        const char *hint = "X";
        if (is_named(o->kind)) {
            names_list(o, names, sizeof(names));
            hint = names;
        } else if (o->kind == OPT_FLAG) {
            hint = "0|1";
        }
        fprintf(f, "  --%s %s\n      %s (default ", o->key, hint, o->help);
        if (o->kind == OPT_ALPHA) {
            fprintf(f, "per method:");
            for (int m = 0; m < COUNT_OF(balance_methods); m++)
                if (balance_methods[m].aux_kind != AUX_NONE)
                    fprintf(f, " %s %g", balance_methods[m].name, balance_methods[m].default_alpha);
        } else {
            Sink out = {f, NULL, 0, 0, 0};
            option_print_value(&d, o, &out, 0);
        }
        fprintf(f, ")\n");
        if (o->kind == OPT_METHOD)
            for (int m = 0; m < COUNT_OF(balance_methods); m++)
                fprintf(f, "        %-11s %s\n", balance_methods[m].name, balance_methods[m].help);
        if (o->kind == OPT_RULE)
            for (int r = 0; r < COUNT_OF(balance_rules); r++)
                fprintf(f, "        %-11s %s\n", balance_rules[r].name, balance_rules[r].help);
        if (o->kind == OPT_SCHEDULE)
            for (int s = 0; s < COUNT_OF(balance_schedules); s++)
                fprintf(f, "        %-11s %s\n", balance_schedules[s].name, balance_schedules[s].help);
    }
    fprintf(f, "  t is the 0-based optimizer step whose counts are applied, T the total steps,\n"
               "  mean = top_k * tokens / experts; counts are summed over the whole global batch.\n");
}

void balance_print_config(const BalanceConfig *c, FILE *f) {
    Sink s = {f, NULL, 0, 0, 0};
    for (int i = 0; i < COUNT_OF(balance_options); i++) {
        sink_printf(&s, "%s=", balance_options[i].key);
        option_print_value(c, &balance_options[i], &s, 0);
        sink_printf(&s, "\n");
    }
}

int balance_config_json(const BalanceConfig *c, FILE *f) {
    Sink s = {f, NULL, 0, 0, 0};
    for (int i = 0; i < COUNT_OF(balance_options); i++) {
        char key[32]; // the option name with '_' for '-': gamma-rule -> gamma_rule
        snprintf(key, sizeof(key), "%s", balance_options[i].key);
        for (char *p = key; *p; p++)
            if (*p == '-') *p = '_';
        sink_printf(&s, "%s\"%s\":", i ? "," : "", key);
        option_print_value(c, &balance_options[i], &s, 1);
    }
    return sink_result(&s);
}

// ----------------------------------------------------------------------------
// The bias update

float balance_gamma_at(const BalanceConfig *c, int64_t step, int64_t total_steps) {
    return (float)balance_schedules[c->schedule].gamma_at(c, step, total_steps);
}

void balance_update_layer(const BalanceConfig *c, float gamma_t,
                          const int64_t *counts, int E, int top_k,
                          int64_t n_tokens, float *bias) {
    const BalanceRule *r = &balance_rules[c->rule];
    int64_t kn = (int64_t)top_k * n_tokens; // K*N = E * mean
    if (kn <= 0 || E <= 0) return;
    double shift = 0.0; // mean step across experts, removed when centring
    if (c->center) {
        double sum = 0.0;
        for (int i = 0; i < E; i++) sum += r->step(gamma_t, kn - (int64_t)E * counts[i], kn);
        shift = sum / E;
    }
    // The step is formed and applied in double, then rounded once to fp32.
    for (int i = 0; i < E; i++) {
        double d = r->step(gamma_t, kn - (int64_t)E * counts[i], kn) - shift;
        if (!r->multiplicative) {
            bias[i] = (float)((double)bias[i] + d);
        } else {
            // Clamped so that b stays a positive finite fp32: a b rounded to 0
            // could never grow again, and s * inf would tie every score.
            double b = (double)bias[i] * exp(d);
            bias[i] = (float)(b < FLT_MIN ? FLT_MIN : (b > FLT_MAX ? FLT_MAX : b));
        }
    }
}

int balance_check_counts(const int64_t *counts, int E, int top_k, int64_t n_tokens) {
    int64_t sum = 0;
    for (int i = 0; i < E; i++) {
        if (counts[i] < 0) return -1;
        sum += counts[i];
    }
    return sum == (int64_t)top_k * n_tokens ? 0 : -1;
}

int balance_update(const BalanceConfig *c, int64_t step, int64_t total_steps,
                   const int64_t *counts, int n_layers, int E, int top_k,
                   int64_t n_tokens, float *bias) {
    for (int l = 0; l < n_layers; l++)
        if (balance_check_counts(counts + (int64_t)l * E, E, top_k, n_tokens) != 0) return -1;
    if (!balance_uses_bias(c)) return 0;
    float gamma_t = balance_gamma_at(c, step, total_steps);
    for (int l = 0; l < n_layers; l++)
        balance_update_layer(c, gamma_t, counts + (int64_t)l * E, E, top_k, n_tokens,
                             bias + (int64_t)l * E);
    return 0;
}

// ----------------------------------------------------------------------------
// Metrics

double balance_maxvio(const int64_t *counts, int E, int top_k, int64_t n_tokens) {
    int64_t kn = (int64_t)top_k * n_tokens;
    if (kn <= 0 || E <= 0) return 0.0;
    int64_t mx = counts[0];
    for (int i = 1; i < E; i++)
        if (counts[i] > mx) mx = counts[i];
    // (max - mean) / mean = (E*max - K*N) / (K*N): exact integer numerator.
    return (double)((int64_t)E * mx - kn) / (double)kn;
}

int balance_metrics(const int64_t *counts, int n_layers, int E, int top_k,
                    int64_t n_tokens, const float *bias, BalanceMetrics *m) {
    if (n_layers < 1 || n_layers > BALANCE_MAX_LAYERS || E < 1) return -1;
    memset(m, 0, sizeof(*m));
    m->n_layers = n_layers;
    int64_t kn = (int64_t)top_k * n_tokens;
    double sum = 0.0;
    for (int l = 0; l < n_layers; l++) {
        const int64_t *c = counts + (int64_t)l * E; // (E) this layer's counts
        int64_t mn = c[0];
        int idle = 0;
        for (int i = 0; i < E; i++) {
            if (c[i] < mn) mn = c[i];
            idle += c[i] == 0;
        }
        m->maxvio[l] = balance_maxvio(c, E, top_k, n_tokens);
        m->load_min[l] = kn > 0 ? (double)((int64_t)E * mn) / (double)kn : 0.0;
        m->idle[l] = idle;
        m->idle_total += idle;
        sum += m->maxvio[l];
        if (m->maxvio[l] > m->maxvio[m->maxvio_worst_layer]) m->maxvio_worst_layer = l;
    }
    m->maxvio_batch = sum / n_layers;
    if (bias) {
        int64_t n = (int64_t)n_layers * E;
        double bsum = 0.0;
        m->has_bias = 1;
        m->bias_min = m->bias_max = bias[0];
        for (int64_t i = 0; i < n; i++) {
            bsum += bias[i];
            if (bias[i] < m->bias_min) m->bias_min = bias[i];
            if (bias[i] > m->bias_max) m->bias_max = bias[i];
        }
        m->bias_mean = bsum / (double)n;
    }
    return 0;
}

void balance_metrics_print(const BalanceMetrics *m, FILE *f) {
    double minload = m->load_min[0];
    for (int l = 1; l < m->n_layers; l++)
        if (m->load_min[l] < minload) minload = m->load_min[l];
    fprintf(f, "maxvio %.4f (worst %.4f @moe%d) idle %d minload %.3f", m->maxvio_batch,
            m->maxvio[m->maxvio_worst_layer], m->maxvio_worst_layer, m->idle_total, minload);
    if (m->has_bias)
        fprintf(f, " bias [%.4g, %.4g] mean %.4g", m->bias_min, m->bias_max, m->bias_mean);
    fputc('\n', f);
}

static void metrics_json(const BalanceMetrics *m, Sink *s) {
    sink_printf(s, "\"maxvio_batch\":");
    sink_num(s, m->maxvio_batch, 6);
    sink_printf(s, ",\"maxvio_layers\":[");
    for (int l = 0; l < m->n_layers; l++) {
        sink_printf(s, "%s", l ? "," : "");
        sink_num(s, m->maxvio[l], 6);
    }
    sink_printf(s, "],\"load_min_layers\":[");
    for (int l = 0; l < m->n_layers; l++) {
        sink_printf(s, "%s", l ? "," : "");
        sink_num(s, m->load_min[l], 6);
    }
    sink_printf(s, "],\"idle\":%d,\"idle_layers\":[", m->idle_total);
    for (int l = 0; l < m->n_layers; l++) sink_printf(s, "%s%d", l ? "," : "", m->idle[l]);
    sink_printf(s, "]");
    if (m->has_bias) {
        // 9 significant digits round-trip an fp32 bias exactly.
        sink_printf(s, ",\"bias_mean\":");
        sink_num(s, m->bias_mean, 9);
        sink_printf(s, ",\"bias_min\":");
        sink_num(s, m->bias_min, 9);
        sink_printf(s, ",\"bias_max\":");
        sink_num(s, m->bias_max, 9);
    }
}

int balance_metrics_json(const BalanceMetrics *m, char *buf, size_t len) {
    Sink s = {NULL, buf, len, 0, 0};
    if (buf && len) buf[0] = '\0';
    metrics_json(m, &s);
    return sink_result(&s);
}

int balance_metrics_json_file(const BalanceMetrics *m, FILE *f) {
    Sink s = {f, NULL, 0, 0, 0};
    metrics_json(m, &s);
    return sink_result(&s);
}

// ----------------------------------------------------------------------------
// MaxVio_global accumulator

int balance_accum_init(BalanceAccum *a, int n_layers, int E, int top_k) {
    memset(a, 0, sizeof(*a));
    if (n_layers < 1 || E < 1 || top_k < 1) return -1;
    a->counts = calloc((size_t)n_layers * (size_t)E, sizeof(int64_t));
    if (!a->counts) return -1;
    a->n_layers = n_layers;
    a->E = E;
    a->top_k = top_k;
    return 0;
}

void balance_accum_reset(BalanceAccum *a) {
    memset(a->counts, 0, (size_t)a->n_layers * (size_t)a->E * sizeof(int64_t));
    a->n_tokens = 0;
}

void balance_accum_add(BalanceAccum *a, const int64_t *counts, int64_t n_tokens) {
    for (int64_t i = 0; i < (int64_t)a->n_layers * a->E; i++) a->counts[i] += counts[i];
    a->n_tokens += n_tokens;
}

double balance_accum_maxvio(const BalanceAccum *a, double *per_layer) {
    double sum = 0.0;
    for (int l = 0; l < a->n_layers; l++) {
        double v = balance_maxvio(a->counts + (int64_t)l * a->E, a->E, a->top_k, a->n_tokens);
        if (per_layer) per_layer[l] = v;
        sum += v;
    }
    return sum / a->n_layers;
}

int balance_accum_json(const BalanceAccum *a, char *buf, size_t len) {
    Sink s = {NULL, buf, len, 0, 0};
    if (buf && len) buf[0] = '\0';
    sink_printf(&s, "\"maxvio_global\":");
    sink_num(&s, balance_accum_maxvio(a, NULL), 6);
    sink_printf(&s, ",\"maxvio_global_layers\":[");
    for (int l = 0; l < a->n_layers; l++) {
        sink_printf(&s, "%s", l ? "," : "");
        sink_num(&s, balance_maxvio(a->counts + (int64_t)l * a->E, a->E, a->top_k, a->n_tokens), 6);
    }
    sink_printf(&s, "]");
    return sink_result(&s);
}

void balance_accum_free(BalanceAccum *a) {
    free(a->counts);
    a->counts = NULL;
}
