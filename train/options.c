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

#include "../util/file.h"

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
    OPT("grouped-gemm", NULL, O_STR, grouped_gemm, "device", "GPU trainer: the routed experts' GEMMs by the project's kernels with the expert offsets on the GPU (device) or by cuBLAS with them on the host (cublas)"),
    OPT("cuda-graph", NULL, O_INT, cuda_graph, "1", "GPU trainer: capture a training micro-batch into a CUDA graph once and replay it (1), or launch its work one call at a time (0); off by itself with --ep > 1, --grouped-gemm cublas and --profile"),
    OPT("eval-every", NULL, O_INT, eval_every, "0", "steps between evaluations (0: only at the end)"),
    OPT("eval-batches", NULL, O_INT, eval_batches, "0", "micro-batches per evaluation (0: the whole validation set)"),
    OPT("ckpt-dir", NULL, O_STR, ckpt_dir, "", "checkpoint directory (empty: no checkpoints)"),
    OPT("ckpt-every", NULL, O_INT, ckpt_every, "0", "steps between checkpoints (0: only at the end)"),
    OPT("keep-last", NULL, O_INT, keep_last, "3", "checkpoints to keep (0: all)"),
    OPT("resume", NULL, O_FLAG, resume, "0", "continue from the newest checkpoint in --ckpt-dir (none yet: start fresh)"),
    OPT("init-from", NULL, O_STR, init_from, "", "start from the parameters and biases of this checkpoint (same model; seq_len may differ; with --resume only while --ckpt-dir holds none)"),
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

// Reads an options file: `key = value` lines, '#' comments; a regular file of
// at most OPTIONS_MAX_FILE_BYTES with lines of at most 2 OPT_PATH - 1 characters.
static int options_load_file(TrainOptions *o, const char *path) {
    char err[OPT_PATH + 128];
    FILE *f = util_fopen_regular(path, "r", OPTIONS_MAX_FILE_BYTES, err, sizeof err);
    if (!f) {
        fprintf(stderr, "error: --options: %s\n", err);
        return -1;
    }
    char line[2 * OPT_PATH], where[OPT_PATH + 32], *key, *value;
    int lineno = 0, rc;
    while ((rc = util_kv_next(f, path, 1, line, sizeof line, &lineno, &key, &value, err, sizeof err)) == 1) {
        snprintf(where, sizeof where, "%s:%d: ", path, lineno);
        while (*key == '-') key++;
        if (options_apply(o, key, value, where) != 0) break;
    }
    if (rc < 0) fprintf(stderr, "error: --options: %s\n", err);
    fclose(f);
    return rc == 0 ? 0 : -1;
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
    if (strcmp(o->grouped_gemm, "device") != 0 && strcmp(o->grouped_gemm, "cublas") != 0) {
        fprintf(stderr, "error: --grouped-gemm must be device or cublas (got '%s')\n", o->grouped_gemm);
        return -1;
    }
    if (o->cuda_graph != 0 && o->cuda_graph != 1) {
        fprintf(stderr, "error: --cuda-graph must be 1 or 0 (got %d)\n", o->cuda_graph);
        return -1;
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
    // The model indexes tokens and routing slots of a micro-batch with int.
    CHECK((int64_t)o->micro_batch * o->model.seq_len * (o->model.top_k > 1 ? o->model.top_k : 1) <= INT_MAX,
          "--micro-batch %d x seq_len %d x top_k %d is more token slots than a micro-batch can index",
          o->micro_batch, o->model.seq_len, o->model.top_k);
    CHECK(!o->resume || o->ckpt_dir[0], "--resume needs --ckpt-dir");
    CHECK(o->train_data[0] || o->print_config || o->print_memory, "--train-data is required (a glob of token shards)");
    CHECK(o->adamw.grad_clip >= 0, "--grad-clip must be >= 0 (0: no clipping; got %g)", o->adamw.grad_clip);
    CHECK(o->lr.kind != LR_MULTISTEP || o->lr.n_steps > 0,
          "--lr-schedule multistep needs --lr-steps and --lr-rates (the steps where the rate changes)");
    CHECK(!o->prompt[0] || o->tokenizer[0], "--prompt needs --tokenizer (to encode the prompt)");
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

// The value of `key` in text of "key = value" lines (options_write's
// format), copied into out; NULL when absent.
static const char *options_text_value(const char *text, const char *key, char *out, size_t outlen) {
    size_t klen = strlen(key);
    for (const char *line = text; *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        if (len >= klen + 3 && memcmp(line, key, klen) == 0 && memcmp(line + klen, " = ", 3) == 0) {
            size_t vlen = len - klen - 3;
            snprintf(out, outlen, "%.*s", (int)(vlen < outlen ? vlen : outlen - 1), line + klen + 3);
            return out;
        }
        line += len + (end ? 1 : 0);
    }
    return NULL;
}

// Appends "key old -> new" to out (used bytes in *used), "; "-separated.
static void options_note_change(char *out, size_t outlen, size_t *used, const char *key, const char *was,
                                const char *now) {
    if (*used >= outlen) return;
    int w = snprintf(out + *used, outlen - *used, "%s%s %s -> %s", *used ? "; " : "", key,
                     was ? was : "(absent)", now ? now : "(absent)");
    *used += w > 0 ? (size_t)w : 0;
    if (*used >= outlen) *used = outlen;
}

int options_changes(const char *saved, const TrainOptions *o, char *out, size_t outlen) {
    char *now = NULL;
    size_t len = 0, used = 0;
    if (outlen) out[0] = '\0';
    FILE *m = open_memstream(&now, &len);
    if (!m) return 0;
    options_write(o, m);
    fclose(m);
    char was[2 * OPT_PATH], cur[2 * OPT_PATH], key[256];
    int n = 0;
    // Every current option against the saved value, then the saved ones that no longer exist.
    for (int pass = 0; pass < 2; pass++) {
        const char *text = pass == 0 ? now : saved, *other = pass == 0 ? saved : now;
        for (const char *line = text; *line;) {
            const char *end = strchr(line, '\n'), *eq = strstr(line, " = ");
            size_t llen = end ? (size_t)(end - line) : strlen(line);
            if (eq && (size_t)(eq - line) < llen && (size_t)(eq - line) < sizeof key) {
                snprintf(key, sizeof key, "%.*s", (int)(eq - line), line);
                const char *a = options_text_value(text, key, pass == 0 ? cur : was, sizeof cur);
                const char *b = options_text_value(other, key, pass == 0 ? was : cur, sizeof cur);
                int skip = strcmp(key, "resume") == 0 || strcmp(key, "init-from") == 0;
                if (!skip && (pass == 0 ? (!b || strcmp(a, b) != 0) : !b)) {
                    n++;
                    options_note_change(out, outlen, &used, key, pass == 0 ? b : a, pass == 0 ? a : NULL);
                }
            }
            line += llen + (end ? 1 : 0);
        }
    }
    free(now);
    return n;
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
