// The trainers' command line (see options.h). Training options live in one
// table: name, type, where the value goes, default, help. Everything else is
// offered in turn to the model config, the balancing policy, the LR schedule
// and AdamW, each of which owns its options, their parsing and their help.
#include "options.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

enum { O_INT, O_I64, O_U64, O_FLOAT, O_STR, O_FLAG };

typedef struct {
    const char *name;  // without the leading dashes
    const char *alias; // short form (e.g. "b"), or NULL
    int type;
    size_t offset;
    const char *def;   // default, as text
    const char *help;
} TrainOption;

#define OPT(n, a, t, f, d, h) { n, a, t, offsetof(TrainOptions, f), d, h }
static const TrainOption train_options[] = {
    OPT("config", NULL, O_STR, config, "tiny", "model preset (tiny, small, 1b, 1b-hz, 3b) or key=value model file"),
    OPT("print-config", NULL, O_FLAG, print_config, "0", "print the model, its parameter counts and FLOPs, and exit"),
    OPT("print-memory", NULL, O_FLAG, print_memory, "0", "print the device memory per rank for this model, micro-batch and --ep, the largest micro-batch that fits --gpu-mem, and exit (train_moecu; needs no GPU)"),
    OPT("gpu-mem", NULL, O_FLOAT, gpu_mem, "0", "GiB of device memory --print-memory fits micro-batches into (0: the detected GPU's, or 80 without one)"),
    OPT("train-data", NULL, O_STR, train_data, "", "training shards: a glob, or several separated by commas"),
    OPT("val-data", NULL, O_STR, val_data, "", "validation shards (empty: no evaluation)"),
    OPT("tokenizer", NULL, O_STR, tokenizer, "", "tokenizer file, to decode samples (empty: print token ids)"),
    OPT("micro-batch", "b", O_INT, micro_batch, "4", "sequences per micro-batch"),
    OPT("batch-tokens", NULL, O_I64, batch_tokens, "0", "tokens per optimizer step, all micro-batches and ranks (0: one micro-batch)"),
    OPT("steps", NULL, O_I64, steps, "1000", "optimizer steps"),
    OPT("run-steps", NULL, O_I64, run_steps, "0", "stop this invocation after this many steps, with a checkpoint (0: run to --steps)"),
    OPT("seed", NULL, O_U64, seed, "1337", "seed of the initialisation and the data order"),
    OPT("threads", NULL, O_INT, threads, "0", "OpenMP threads (0: the runtime default)"),
    OPT("ep", NULL, O_INT, ep, "1", "expert parallelism: ranks that share out the routed experts (divides ranks and n-routed)"),
    OPT("eval-every", NULL, O_INT, eval_every, "0", "steps between evaluations (0: only at the end)"),
    OPT("eval-batches", NULL, O_INT, eval_batches, "0", "micro-batches per evaluation (0: the whole validation set)"),
    OPT("ckpt-dir", NULL, O_STR, ckpt_dir, "", "checkpoint directory (empty: no checkpoints)"),
    OPT("ckpt-every", NULL, O_INT, ckpt_every, "0", "steps between checkpoints (0: only at the end)"),
    OPT("keep-last", NULL, O_INT, keep_last, "3", "checkpoints to keep (0: all)"),
    OPT("resume", NULL, O_FLAG, resume, "0", "continue from the newest checkpoint in --ckpt-dir"),
    OPT("init-from", NULL, O_STR, init_from, "", "start from the parameters and biases of this checkpoint (same model; seq_len may differ)"),
    OPT("log", NULL, O_STR, log, "", "JSON-lines log file (appended to)"),
    OPT("log-loads-every", NULL, O_INT, log_loads_every, "10", "steps between per-layer expert counts in the log (0: never)"),
    OPT("print-every", NULL, O_INT, print_every, "1", "steps between human log lines"),
    OPT("sample-tokens", NULL, O_INT, sample_tokens, "0", "tokens to generate at the end of training"),
    OPT("temperature", NULL, O_FLOAT, temperature, "1.0", "sampling temperature (0: greedy)"),
    OPT("sample-top-k", NULL, O_INT, sample_top_k, "40", "sample among the k most likely tokens (0: all)"),
    OPT("prompt", NULL, O_STR, prompt, "", "text the sample continues (empty: starts after end-of-text)"),
    OPT("trace-router", NULL, O_STR, trace_router, "", "write a router-score trace (docs/trace.md) to this file; a resumed run continues it from its checkpoint's step"),
    OPT("trace-every", NULL, O_INT, trace_every, "1", "trace every N-th step (steps t with t % N == 0)"),
    OPT("trace-tokens", NULL, O_I64, trace_tokens, "0", "score rows traced per step and MoE layer: a deterministic sample of M (0: every token of every rank)"),
    OPT("trace-bf16", NULL, O_FLAG, trace_bf16, "0", "store the traced scores as bf16 (half the size; the replay then sees rounded scores)"),
    OPT("profile", NULL, O_INT, profile, "0", "time N steps per phase after 2 warm-up steps, print the table and stop (0: off; per-phase times need train_moecu)"),
};
#undef OPT
#define N_OPTIONS ((int)(sizeof(train_options) / sizeof(train_options[0])))

static const TrainOption *options_find(const char *name) {
    for (int i = 0; i < N_OPTIONS; i++)
        if (strcmp(train_options[i].name, name) == 0 ||
            (train_options[i].alias && strcmp(train_options[i].alias, name) == 0))
            return &train_options[i];
    return NULL;
}

// Stores text into the option's field. Returns 0 or -2 for a bad value.
static int options_store(TrainOptions *o, const TrainOption *opt, const char *v) {
    void *p = (char *)o + opt->offset;
    char *end = NULL;
    errno = 0;
    switch (opt->type) {
    case O_INT: {
        long x = strtol(v, &end, 10);
        if (end == v || *end || errno || x < INT_MIN || x > INT_MAX) return -2;
        *(int *)p = (int)x;
        return 0;
    }
    case O_I64: {
        long long x = strtoll(v, &end, 10);
        if (end == v || *end || errno) return -2;
        *(int64_t *)p = x;
        return 0;
    }
    case O_U64: {
        if (*v == '-') return -2;
        unsigned long long x = strtoull(v, &end, 10);
        if (end == v || *end || errno) return -2;
        *(uint64_t *)p = x;
        return 0;
    }
    case O_FLOAT: {
        float x = strtof(v, &end);
        if (end == v || *end || errno || !isfinite(x)) return -2;
        *(float *)p = x;
        return 0;
    }
    case O_STR:
        if (strlen(v) >= OPT_PATH) return -2;
        snprintf((char *)p, OPT_PATH, "%s", v);
        return 0;
    case O_FLAG:
        if (strcmp(v, "1") == 0 || strcmp(v, "true") == 0) *(int *)p = 1;
        else if (strcmp(v, "0") == 0 || strcmp(v, "false") == 0) *(int *)p = 0;
        else return -2;
        return 0;
    }
    return -2;
}

void options_default(TrainOptions *o) {
    memset(o, 0, sizeof *o);
    for (int i = 0; i < N_OPTIONS; i++) options_store(o, &train_options[i], train_options[i].def);
    config_preset(&o->model, "tiny");
    balance_config_default(&o->balance);
    lr_schedule_default(&o->lr);
    adamw_config_default(&o->adamw);
}

// Loads --config: a preset name, else a key=value model file.
static int options_load_model(TrainOptions *o, const char *v) {
    char err[512];
    if (config_preset(&o->model, v) == 0) return 0;
    config_preset(&o->model, "tiny"); // a file sets fields on top of the tiny preset
    if (config_load_file(&o->model, v, err, sizeof err) == 0) return 0;
    fprintf(stderr, "error: --config %s: not a preset (tiny, small, 1b, 1b-hz, 3b), and as a file: %s\n", v, err);
    return -1;
}

// Applies one option by name (no dashes). Returns 0, or -1 with a message printed.
static int options_apply(TrainOptions *o, const char *key, const char *value, const char *where) {
    char err[512] = "";
    const TrainOption *opt = options_find(key);
    if (opt) {
        if (options_store(o, opt, value) != 0) {
            fprintf(stderr, "error: %sbad value '%s' for --%s\n", where, value, opt->name);
            return -1;
        }
        if (strcmp(opt->name, "config") == 0) return options_load_model(o, value);
        return 0;
    }
    // Model fields are spelled with dashes on the command line: --n-routed.
    char field[128];
    snprintf(field, sizeof field, "%s", key);
    for (char *p = field; *p; p++)
        if (*p == '-') *p = '_';
    int r = config_set(&o->model, field, value);
    if (r == 0) return 0;
    if (r == -2) {
        fprintf(stderr, "error: %sbad value '%s' for model field --%s\n", where, value, key);
        return -1;
    }
    r = balance_set_option(&o->balance, key, value, err, sizeof err);
    if (r == -1) r = lr_set_option(&o->lr, key, value, err, sizeof err);
    if (r == -1) r = adamw_set_option(&o->adamw, key, value, err, sizeof err);
    if (r == 0) return 0;
    if (r == -2) fprintf(stderr, "error: %s%s\n", where, err);
    else fprintf(stderr, "error: %sunknown option --%s (see --help)\n", where, key);
    return -1;
}

static char *options_trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = '\0';
    return s;
}

// Reads an options file: `key = value` lines, '#' comments.
static int options_load_file(TrainOptions *o, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "error: cannot open options file %s: %s\n", path, strerror(errno));
        return -1;
    }
    char line[2 * OPT_PATH], where[OPT_PATH + 32];
    int lineno = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash) *hash = '\0';
        char *s = options_trim(line);
        if (!*s) continue;
        char *eq = strchr(s, '=');
        snprintf(where, sizeof where, "%s:%d: ", path, lineno);
        if (!eq) {
            fprintf(stderr, "error: %sexpected key = value\n", where);
            rc = -1;
            break;
        }
        *eq = '\0';
        char *key = options_trim(s);
        while (*key == '-') key++;
        rc = options_apply(o, key, options_trim(eq + 1), where);
    }
    fclose(f);
    return rc;
}

int options_parse(TrainOptions *o, int argc, char **argv, const char *prog) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            options_print_help(stdout, prog);
            return 1;
        }
        if (a[0] != '-' || a[1] == '\0') {
            fprintf(stderr, "error: unexpected argument '%s' (options start with --; see --help)\n", a);
            return -1;
        }
        const char *key = a + (a[1] == '-' ? 2 : 1);
        // --key=value or --key value; flags may stand alone.
        char name[256];
        const char *value = NULL, *eq = strchr(key, '=');
        if (eq) {
            snprintf(name, sizeof name, "%.*s", (int)(eq - key), key);
            value = eq + 1;
        } else {
            snprintf(name, sizeof name, "%s", key);
            const TrainOption *opt = options_find(name);
            if (opt && opt->type == O_FLAG) value = "1";
            else if (i + 1 < argc) value = argv[++i];
            else {
                fprintf(stderr, "error: option %s needs a value\n", a);
                return -1;
            }
        }
        int rc = strcmp(name, "options") == 0 ? options_load_file(o, value) : options_apply(o, name, value, "");
        if (rc != 0) return -1;
    }
    return 0;
}

int options_validate(const TrainOptions *o, int world, char *err, size_t errlen) {
    char sub[512];
    if (config_validate(&o->model, sub, sizeof sub)) {
        snprintf(err, errlen, "invalid model: %s", sub);
        return -1;
    }
    if (balance_validate(&o->balance, sub, sizeof sub)) {
        snprintf(err, errlen, "%s", sub);
        return -1;
    }
    if (lr_validate(&o->lr, o->steps, sub, sizeof sub)) {
        snprintf(err, errlen, "%s", sub);
        return -1;
    }
    if (adamw_validate(&o->adamw, sub, sizeof sub)) {
        snprintf(err, errlen, "%s", sub);
        return -1;
    }
#define CHECK(cond, ...) do { if (!(cond)) { snprintf(err, errlen, __VA_ARGS__); return -1; } } while (0)
    CHECK(o->micro_batch >= 1, "--micro-batch must be >= 1 (got %d)", o->micro_batch);
    CHECK(o->steps >= 1, "--steps must be >= 1 (got %lld)", (long long)o->steps);
    int64_t per_micro = (int64_t)o->micro_batch * o->model.seq_len * world;
    CHECK(o->batch_tokens == 0 || (o->batch_tokens >= per_micro && o->batch_tokens % per_micro == 0),
          "--batch-tokens %lld must be a multiple of micro-batch x seq-len x ranks = %d x %d x %d = %lld",
          (long long)o->batch_tokens, o->micro_batch, o->model.seq_len, world, (long long)per_micro);
    CHECK(o->run_steps >= 0, "--run-steps must be >= 0");
    CHECK(o->eval_every >= 0 && o->eval_batches >= 0, "--eval-every and --eval-batches must be >= 0");
    CHECK(o->ckpt_every >= 0 && o->keep_last >= 0, "--ckpt-every and --keep-last must be >= 0");
    CHECK(!o->resume || o->ckpt_dir[0], "--resume needs --ckpt-dir");
    CHECK(!(o->resume && o->init_from[0]), "--resume and --init-from exclude each other");
    CHECK(o->train_data[0] || o->print_config || o->print_memory, "--train-data is required (a glob of token shards)");
    CHECK(o->print_every >= 1, "--print-every must be >= 1");
    CHECK(o->log_loads_every >= 0, "--log-loads-every must be >= 0");
    CHECK(o->sample_tokens >= 0, "--sample-tokens must be >= 0");
    CHECK(o->temperature >= 0, "--temperature must be >= 0 (0: greedy) (got %g)", o->temperature);
    CHECK(o->sample_top_k >= 0, "--sample-top-k must be >= 0");
    CHECK(o->threads >= 0, "--threads must be >= 0");
    CHECK(o->profile >= 0, "--profile must be >= 0");
    CHECK(o->trace_every >= 1, "--trace-every must be >= 1 (got %d)", o->trace_every);
    CHECK(o->trace_tokens >= 0, "--trace-tokens must be >= 0 (0: every token)");
    CHECK(!o->trace_router[0] || config_n_moe(&o->model) > 0, "--trace-router: the model has no MoE layer to trace");
    CHECK(o->profile == 0 || o->steps >= o->profile + TRAINER_PROFILE_WARMUP,
          "--profile %d runs %d warm-up steps first: --steps (%lld) must be at least %d", o->profile,
          TRAINER_PROFILE_WARMUP, (long long)o->steps, o->profile + TRAINER_PROFILE_WARMUP);
    CHECK(o->profile == 0 || !o->resume, "--profile and --resume exclude each other (a profile starts fresh)");
    CHECK(o->ep >= 1 && world % o->ep == 0, "--ep %d must divide the number of ranks (%d)", o->ep, world);
#undef CHECK
    return 0;
}

static void options_write_value(const TrainOptions *o, const TrainOption *opt, FILE *f) {
    const void *p = (const char *)o + opt->offset;
    switch (opt->type) {
    case O_INT: case O_FLAG: fprintf(f, "%d", *(const int *)p); break;
    case O_I64: fprintf(f, "%lld", (long long)*(const int64_t *)p); break;
    case O_U64: fprintf(f, "%llu", (unsigned long long)*(const uint64_t *)p); break;
    case O_FLOAT: fprintf(f, "%.9g", *(const float *)p); break;
    case O_STR: fputs((const char *)p, f); break;
    }
}

// Writes "key=value" lines from a module's writer as "key = value", with
// model field names spelled as options (dashes).
static void options_write_lines(FILE *f, const char *text, int dashes) {
    char *copy = strdup(text);
    if (!copy) return;
    for (char *line = strtok(copy, "\n"); line; line = strtok(NULL, "\n")) {
        char *eq = strchr(line, '=');
        if (!eq) continue;
        char *k = line, *v = eq + 1, *e = eq;
        while (e > k && e[-1] == ' ') e--;
        *e = '\0';
        while (*v == ' ') v++;
        for (char *q = k; dashes && *q; q++)
            if (*q == '_') *q = '-';
        fprintf(f, "%s = %s\n", k, v);
    }
    free(copy);
}

void options_write(const TrainOptions *o, FILE *f) {
    for (int i = 0; i < N_OPTIONS; i++) {
        // What a command does, not a setting of the run: not saved with it.
        if (train_options[i].offset == offsetof(TrainOptions, print_config) ||
            train_options[i].offset == offsetof(TrainOptions, print_memory))
            continue;
        fprintf(f, "%s = ", train_options[i].name);
        options_write_value(o, &train_options[i], f);
        fputc('\n', f);
    }
    // The model as field options, then the other modules' options.
    char *buf = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&buf, &len);
    if (!mem) return;
    config_write(&o->model, mem);
    fflush(mem);
    options_write_lines(f, buf, 1);
    rewind(mem);
    balance_print_config(&o->balance, mem);
    lr_schedule_write(&o->lr, mem);
    adamw_config_write(&o->adamw, mem);
    fputc('\0', mem);
    fflush(mem);
    options_write_lines(f, buf, 0);
    fclose(mem);
    free(buf);
}

void options_print_table(const TrainOptions *o, FILE *f) {
    fprintf(f, "+--------------------------------------------------------------\n");
    char *buf = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&buf, &len);
    if (!mem) return;
    options_write(o, mem);
    fclose(mem);
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        char *eq = strchr(line, '=');
        if (!eq) continue;
        char *k = line, *v = eq + 1;
        *eq = '\0';
        while (*v == ' ') v++;
        char *e = eq;
        while (e > k && e[-1] == ' ') *--e = '\0';
        fprintf(f, "| %-22s %s\n", k, v);
    }
    free(buf);
    fprintf(f, "+--------------------------------------------------------------\n");
}

void options_print_help(FILE *f, const char *prog) {
    fprintf(f,
            "usage: %s [options]\n"
            "Trains a DeepSeekMoE model with auxiliary-loss-free load balancing.\n"
            "Options are --name value or --name=value; --options FILE reads `name = value` lines.\n\n"
            "Training options:\n",
            prog);
    for (int i = 0; i < N_OPTIONS; i++) {
        const TrainOption *t = &train_options[i];
        char name[64];
        if (t->alias) snprintf(name, sizeof name, "-%s, --%s", t->alias, t->name);
        else snprintf(name, sizeof name, "--%s", t->name);
        fprintf(f, "  %-22s %s (default: %s)\n", name, t->help, t->def[0] ? t->def : "\"\"");
    }
    fprintf(f, "\nModel fields (override the --config preset; e.g. --n-routed 32):\n ");
    MoeConfig c;
    config_preset(&c, "tiny");
    char *buf = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&buf, &len);
    if (mem) {
        config_write(&c, mem);
        fclose(mem);
        for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
            char *eq = strchr(line, '=');
            if (eq) *eq = '\0';
            for (char *q = line; *q; q++)
                if (*q == '_') *q = '-';
            fprintf(f, " --%s", line);
        }
        free(buf);
    }
    fprintf(f, "\n\n");
    balance_print_help(f);
    fprintf(f, "\n");
    lr_print_help(f);
    fprintf(f, "\n");
    adamw_print_help(f);
    fprintf(f, "\nGenerate from a checkpoint: %s sample CHECKPOINT --tokenizer FILE [--prompt TEXT] "
               "[--sample-tokens N]\n", prog);
}
