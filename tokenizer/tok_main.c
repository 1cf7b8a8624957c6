// moe_tok: the command-line front end of the tokenizer library (bpe.h).
//   moe_tok train --input FILE... --vocab-size N --output TOK
//   moe_tok encode --tokenizer TOK [--input FILE] [--output FILE] [--binary]
//   moe_tok decode --tokenizer TOK [--input FILE] [--output FILE] [--binary]
//   moe_tok import-hf --input tokenizer.json --output TOK [--eot STRING]
//   moe_tok info TOK [--merges N]
// Exit status: 0 success, 1 a file or data error, 2 a usage error.
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bpe_internal.h"

#define EXIT_USAGE 2

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int usage_error(const char *cmd, const char *fmt, const char *arg) {
    fprintf(stderr, "moe_tok %s: ", cmd);
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nRun 'moe_tok %s --help' for the options.\n", cmd);
    return EXIT_USAGE;
}

// The value after option argv[*i], or NULL (with a message) when it is missing.
static const char *option_value(int argc, char **argv, int *i, const char *cmd) {
    if (*i + 1 >= argc) {
        usage_error(cmd, "option %s needs a value", argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

static int parse_int(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static void set_threads(long n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads((int)n);
#else
    (void)n;
#endif
}

// Reads the input (a file, or stdin when path is NULL or "-").
static char *read_input(const char *path, size_t *len) {
    char err[512];
    char *buf = tok_read_file(path && strcmp(path, "-") ? path : "/dev/stdin", len, err, sizeof err);
    if (!buf) fprintf(stderr, "moe_tok: %s\n", err);
    return buf;
}

// Writes the output: atomically to a file, or to stdout when path is NULL or "-".
static int write_output(const char *path, const void *data, size_t len) {
    char err[512];
    if (path && strcmp(path, "-")) {
        if (tok_write_file_atomic(path, data, len, err, sizeof err) == 0) return 0;
        fprintf(stderr, "moe_tok: %s\n", err);
        return -1;
    }
    if (fwrite(data, 1, len, stdout) != len || fflush(stdout) != 0) {
        fprintf(stderr, "moe_tok: writing to stdout failed: %s\n", strerror(errno));
        return -1;
    }
    return 0;
}

static Tokenizer *load_or_complain(const char *path) {
    char err[512];
    Tokenizer *t = tok_load(path, err, sizeof err);
    if (!t) fprintf(stderr, "moe_tok: %s\n", err);
    return t;
}

// ---- train ---------------------------------------------------------------

static const char *train_help =
    "usage: moe_tok train --input FILE... --vocab-size N --output TOK [--quiet]\n"
    "Learns a byte-level BPE tokenizer from text files.\n"
    "  --input FILE...   one or more text files (pre-tokenised file by file)\n"
    "  --vocab-size N    total ids: 256 bytes + merges + <|endoftext|> (the last id)\n"
    "  --output TOK      the tokenizer file to write\n"
    "  --quiet           no progress lines\n";

static int cmd_train(int argc, char **argv) {
    const char *out = NULL;
    long vocab = 0;
    int quiet = 0, n_inputs = 0;
    char **inputs = calloc((size_t)argc, sizeof *inputs);
    if (!inputs) return 1;
    int rc = 0;
    for (int i = 0; i < argc && rc == 0; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(train_help, stdout);
            free(inputs);
            return 0;
        } else if (!strcmp(a, "--input")) {
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) inputs[n_inputs++] = argv[++i];
            if (n_inputs == 0) rc = usage_error("train", "%s needs at least one file", a);
        } else if (!strcmp(a, "--vocab-size")) {
            if (!(v = option_value(argc, argv, &i, "train"))) rc = EXIT_USAGE;
            else if (parse_int(v, 257, 1 << 30, &vocab) != 0)
                rc = usage_error("train", "--vocab-size must be an integer in [257, 2^30], not '%s'", v);
        } else if (!strcmp(a, "--output")) {
            if (!(out = option_value(argc, argv, &i, "train"))) rc = EXIT_USAGE;
        } else if (!strcmp(a, "--quiet")) {
            quiet = 1;
        } else {
            rc = usage_error("train", "unknown option '%s'", a);
        }
    }
    if (rc == 0 && (n_inputs == 0 || vocab == 0 || !out))
        rc = usage_error("train", "%s", "--input, --vocab-size and --output are required");
    TokTrainer *tr = rc == 0 ? tok_trainer_new() : NULL;
    if (rc == 0 && !tr) rc = 1;
    double t0 = now_s();
    for (int k = 0; k < n_inputs && rc == 0; k++) {
        size_t len;
        char *text = read_input(inputs[k], &len);
        if (!text) rc = 1;
        else if (tok_trainer_add(tr, text, len) != 0) {
            fprintf(stderr, "moe_tok: out of memory counting %s\n", inputs[k]);
            rc = 1;
        }
        free(text);
    }
    if (rc == 0) {
        double t1 = now_s();
        char err[512];
        Tokenizer *t = tok_trainer_finish(tr, (int)vocab, !quiet, err, sizeof err);
        double t2 = now_s();
        if (!t || tok_save(t, out, err, sizeof err) != 0) {
            fprintf(stderr, "moe_tok: %s\n", err);
            rc = 1;
        } else if (!quiet) {
            double mb = (double)tok_trainer_bytes(tr) / 1e6;
            fprintf(stderr, "trained on %.2f MB from %d file(s): read+count %.3f s, merges %.3f s, total %.3f s (%.2f MB/s)\n",
                    mb, n_inputs, t1 - t0, t2 - t1, t2 - t0, mb / (t2 - t0));
            fprintf(stderr, "wrote %s: vocab %d (%zu merges, <|endoftext|> = %d)\n", out, tok_vocab_size(t),
                    tok_n_merges(t), tok_eot_id(t));
        }
        tok_free(t);
    }
    tok_trainer_free(tr);
    free(inputs);
    return rc;
}

// ---- encode --------------------------------------------------------------

static const char *encode_help =
    "usage: moe_tok encode --tokenizer TOK [--input FILE] [--output FILE] [options]\n"
    "Encodes text into token ids: one decimal id per line, or with --binary\n"
    "raw little-endian uint32 values.\n"
    "  --tokenizer TOK    tokenizer file\n"
    "  --input FILE       text to encode (default: stdin)\n"
    "  --output FILE      where the ids go (default: stdout)\n"
    "  --binary           write uint32 little-endian ids instead of text\n"
    "  --allow-special    turn special-token strings such as <|endoftext|> into their ids\n"
    "  --threads N        OpenMP threads (default: all cores)\n"
    "  --stats            print size, token count and speed on stderr\n";

// Formats ids one per line (text) or as little-endian uint32 (binary).
static char *format_ids(const uint32_t *ids, size_t n, int binary, size_t *len) {
    char *buf = malloc(binary ? 4 * n + 1 : 11 * n + 1);  // "4294967295\n" is 11 bytes
    if (!buf) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t v = ids[i];
        if (binary) {
            for (int k = 0; k < 4; k++) buf[o++] = (char)(v >> (8 * k));
            continue;
        }
        char tmp[10];
        int d = 0;
        do tmp[d++] = (char)('0' + v % 10); while ((v /= 10) != 0);
        while (d) buf[o++] = tmp[--d];
        buf[o++] = '\n';
    }
    *len = o;
    return buf;
}

static int cmd_encode(int argc, char **argv) {
    const char *tok_path = NULL, *in = NULL, *out = NULL, *v;
    int binary = 0, stats = 0;
    long threads = 0;
    TokEncodeOptions opt = {0, 0, 0};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(encode_help, stdout);
            return 0;
        } else if (!strcmp(a, "--tokenizer")) {
            if (!(tok_path = option_value(argc, argv, &i, "encode"))) return EXIT_USAGE;
        } else if (!strcmp(a, "--input")) {
            if (!(in = option_value(argc, argv, &i, "encode"))) return EXIT_USAGE;
        } else if (!strcmp(a, "--output")) {
            if (!(out = option_value(argc, argv, &i, "encode"))) return EXIT_USAGE;
        } else if (!strcmp(a, "--threads")) {
            if (!(v = option_value(argc, argv, &i, "encode"))) return EXIT_USAGE;
            if (parse_int(v, 1, 4096, &threads) != 0) return usage_error("encode", "bad --threads '%s'", v);
        } else if (!strcmp(a, "--binary")) {
            binary = 1;
        } else if (!strcmp(a, "--allow-special")) {
            opt.allow_special = 1;
        } else if (!strcmp(a, "--stats")) {
            stats = 1;
        } else {
            return usage_error("encode", "unknown option '%s'", a);
        }
    }
    if (!tok_path) return usage_error("encode", "%s", "--tokenizer is required");
    set_threads(threads);
    Tokenizer *t = load_or_complain(tok_path);
    if (!t) return 1;
    size_t len, n_out = 0;
    char *text = read_input(in, &len);
    uint32_t *ids = NULL;
    char *formatted = NULL;
    int rc = 1;
    if (text) {
        double t0 = now_s();
        size_t n = tok_encode_ex(t, text, len, &opt, &ids);
        double t1 = now_s();
        if (n == TOK_ERROR) {
            fprintf(stderr, "moe_tok: out of memory encoding %zu bytes\n", len);
        } else if (!(formatted = format_ids(ids, n, binary, &n_out))) {
            fprintf(stderr, "moe_tok: out of memory formatting %zu ids\n", n);
        } else if (write_output(out, formatted, n_out) == 0) {
            rc = 0;
            if (stats)
                fprintf(stderr, "encoded %zu bytes into %zu tokens (%.3f bytes/token) in %.3f s: %.1f MB/s\n",
                        len, n, n ? (double)len / (double)n : 0.0, t1 - t0, (double)len / 1e6 / (t1 - t0));
        }
    }
    free(formatted);
    free(ids);
    free(text);
    tok_free(t);
    return rc;
}

// ---- decode --------------------------------------------------------------

static const char *decode_help =
    "usage: moe_tok decode --tokenizer TOK [--input FILE] [--output FILE] [--binary]\n"
    "Decodes token ids (whitespace-separated decimal, or with --binary\n"
    "little-endian uint32) back into bytes.\n"
    "  --tokenizer TOK   tokenizer file\n"
    "  --input FILE      ids (default: stdin)\n"
    "  --output FILE     where the bytes go (default: stdout)\n"
    "  --binary          read uint32 little-endian ids instead of text\n"
    "  --stats           print token count, size and speed on stderr\n";

// Parses ids from text or binary input, rejecting malformed input and ids
// outside the vocabulary with the line (or index) where they occur.
static uint32_t *parse_ids(const char *name, const char *s, size_t len, int binary, uint32_t vocab, size_t *n) {
    if (binary && len % 4) {
        fprintf(stderr, "moe_tok: %s: %zu bytes is not a whole number of uint32 ids\n", name, len);
        return NULL;
    }
    uint32_t *ids = malloc((binary ? len / 4 : len / 2 + 1) * sizeof *ids);  // a text id takes >= 2 bytes with its separator
    if (!ids) {
        fprintf(stderr, "moe_tok: out of memory\n");
        return NULL;
    }
    size_t k = 0, line = 1;
    for (size_t i = 0; i < len;) {
        uint64_t v = 0;
        if (binary) {
            const unsigned char *p = (const unsigned char *)s + i;
            v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
            i += 4;
        } else {
            char c = s[i];
            if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
                line += c == '\n';
                i++;
                continue;
            }
            if (c < '0' || c > '9') {
                fprintf(stderr, "moe_tok: %s: line %zu: '%c' is not part of a decimal id\n", name, line, c);
                free(ids);
                return NULL;
            }
            while (i < len && s[i] >= '0' && s[i] <= '9' && v <= UINT32_MAX) v = v * 10 + (uint64_t)(s[i++] - '0');
        }
        if (v >= vocab) {
            if (binary) fprintf(stderr, "moe_tok: %s: id #%zu is %llu, outside the vocab of %u\n", name, k, (unsigned long long)v, vocab);
            else fprintf(stderr, "moe_tok: %s: line %zu: id %llu%s is outside the vocab of %u\n", name, line,
                         (unsigned long long)v, v > UINT32_MAX ? "..." : "", vocab);
            free(ids);
            return NULL;
        }
        ids[k++] = (uint32_t)v;
    }
    *n = k;
    return ids;
}

static int cmd_decode(int argc, char **argv) {
    const char *tok_path = NULL, *in = NULL, *out = NULL;
    int binary = 0, stats = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(decode_help, stdout);
            return 0;
        } else if (!strcmp(a, "--tokenizer")) {
            if (!(tok_path = option_value(argc, argv, &i, "decode"))) return EXIT_USAGE;
        } else if (!strcmp(a, "--input")) {
            if (!(in = option_value(argc, argv, &i, "decode"))) return EXIT_USAGE;
        } else if (!strcmp(a, "--output")) {
            if (!(out = option_value(argc, argv, &i, "decode"))) return EXIT_USAGE;
        } else if (!strcmp(a, "--binary")) {
            binary = 1;
        } else if (!strcmp(a, "--stats")) {
            stats = 1;
        } else {
            return usage_error("decode", "unknown option '%s'", a);
        }
    }
    if (!tok_path) return usage_error("decode", "%s", "--tokenizer is required");
    Tokenizer *t = load_or_complain(tok_path);
    if (!t) return 1;
    size_t len, n = 0;
    char *raw = read_input(in, &len), *text = NULL;
    uint32_t *ids = raw ? parse_ids(in ? in : "stdin", raw, len, binary, (uint32_t)tok_vocab_size(t), &n) : NULL;
    int rc = 1;
    if (ids) {
        double t0 = now_s();
        size_t tl = tok_decode(t, ids, n, &text);
        double t1 = now_s();
        if (tl == TOK_ERROR) fprintf(stderr, "moe_tok: out of memory decoding %zu ids\n", n);
        else rc = write_output(out, text, tl) == 0 ? 0 : 1;
        if (rc == 0 && stats)
            fprintf(stderr, "decoded %zu tokens into %zu bytes in %.3f s: %.1f MB/s\n", n, tl, t1 - t0,
                    (double)tl / 1e6 / (t1 - t0));
    }
    free(text);
    free(ids);
    free(raw);
    tok_free(t);
    return rc;
}

// ---- import-hf -----------------------------------------------------------

static const char *import_help =
    "usage: moe_tok import-hf --input tokenizer.json --output TOK [--eot STRING]\n"
    "Converts a Hugging Face byte-level BPE tokenizer.json (GPT-2, DeepSeek, ...)\n"
    "keeping its token ids.\n"
    "  --input FILE    the tokenizer.json\n"
    "  --output TOK    the tokenizer file to write\n"
    "  --eot STRING    the special token that ends a document (default: the first of\n"
    "                  <|endoftext|>, <\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>, </s> that exists)\n";

static int cmd_import(int argc, char **argv) {
    const char *in = NULL, *out = NULL, *eot = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(import_help, stdout);
            return 0;
        } else if (!strcmp(a, "--input")) {
            if (!(in = option_value(argc, argv, &i, "import-hf"))) return EXIT_USAGE;
        } else if (!strcmp(a, "--output")) {
            if (!(out = option_value(argc, argv, &i, "import-hf"))) return EXIT_USAGE;
        } else if (!strcmp(a, "--eot")) {
            if (!(eot = option_value(argc, argv, &i, "import-hf"))) return EXIT_USAGE;
        } else {
            return usage_error("import-hf", "unknown option '%s'", a);
        }
    }
    if (!in || !out) return usage_error("import-hf", "%s", "--input and --output are required");
    char err[512];
    int differs = 0;
    Tokenizer *t = tok_import_hf(in, eot, &differs, err, sizeof err);
    if (!t || tok_save(t, out, err, sizeof err) != 0) {
        fprintf(stderr, "moe_tok: %s\n", err);
        tok_free(t);
        return 1;
    }
    fprintf(stderr, "wrote %s: vocab %d, %zu merges, %zu special tokens, end-of-text id %d\n", out,
            tok_vocab_size(t), tok_n_merges(t), tok_n_special(t), tok_eot_id(t));
    if (differs)
        fprintf(stderr, "note: %s splits text with a pre-tokenizer other than GPT-2's; token ids are the\n"
                        "original's, but encoding the same text may give a different (equally valid) split\n", in);
    tok_free(t);
    return 0;
}

// ---- info ----------------------------------------------------------------

static const char *info_help =
    "usage: moe_tok info TOK [--merges N]\n"
    "Describes a tokenizer file: sizes, special tokens and the first merges.\n"
    "  --merges N   how many merges to list (default 10)\n";

static int cmd_info(int argc, char **argv) {
    const char *path = NULL, *v;
    long show = 10;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(info_help, stdout);
            return 0;
        } else if (!strcmp(a, "--merges")) {
            if (!(v = option_value(argc, argv, &i, "info"))) return EXIT_USAGE;
            if (parse_int(v, 0, 1L << 30, &show) != 0) return usage_error("info", "bad --merges '%s'", v);
        } else if (a[0] == '-' && a[1]) {
            return usage_error("info", "unknown option '%s'", a);
        } else if (path) {
            return usage_error("info", "only one tokenizer file, not also '%s'", a);
        } else {
            path = a;
        }
    }
    if (!path) return usage_error("info", "%s", "a tokenizer file is required");
    Tokenizer *t = load_or_complain(path);
    if (!t) return 1;
    printf("%s: vocab size %d, %zu merges, %zu special tokens, end-of-text id %d\n", path, tok_vocab_size(t),
           tok_n_merges(t), tok_n_special(t), tok_eot_id(t));
    char q[3][96];
    size_t len;
    for (size_t i = 0; i < tok_n_special(t); i++) {
        uint32_t id = tok_special_id(t, i);
        const char *s = tok_token_bytes(t, id, &len);
        tok_quote((const unsigned char *)s, len, q[0], sizeof q[0]);
        printf("special %u: %s\n", id, q[0]);
    }
    for (size_t r = 0; r < tok_n_merges(t) && r < (size_t)show; r++) {
        uint32_t ids[3];
        tok_merge(t, r, &ids[0], &ids[1], &ids[2]);
        for (int k = 0; k < 3; k++) {
            const char *s = tok_token_bytes(t, ids[k], &len);
            tok_quote((const unsigned char *)s, len, q[k], sizeof q[k]);
        }
        printf("merge %zu: %u %s + %u %s -> %u %s\n", r, ids[0], q[0], ids[1], q[1], ids[2], q[2]);
    }
    tok_free(t);
    return 0;
}

// ---- main ----------------------------------------------------------------

static const char *main_help =
    "usage: moe_tok <command> [options]\n"
    "Byte-level BPE tokenizer tool.\n"
    "commands:\n"
    "  train       learn a tokenizer from text files\n"
    "  encode      text -> token ids\n"
    "  decode      token ids -> text\n"
    "  import-hf   convert a Hugging Face tokenizer.json\n"
    "  info        describe a tokenizer file\n"
    "Run 'moe_tok <command> --help' for the options of a command.\n";

int main(int argc, char **argv) {
    if (argc < 2) {
        fputs(main_help, stderr);
        return EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        fputs(main_help, stdout);
        return 0;
    }
    static const struct {
        const char *name;
        int (*run)(int, char **);
    } cmds[] = {{"train", cmd_train}, {"encode", cmd_encode}, {"decode", cmd_decode},
                {"import-hf", cmd_import}, {"info", cmd_info}};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (!strcmp(cmd, cmds[i].name)) return cmds[i].run(argc - 2, argv + 2);
    fprintf(stderr, "moe_tok: unknown command '%s'\n%s", cmd, main_help);
    return EXIT_USAGE;
}
