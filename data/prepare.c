// moe_prepare: turns text into train and validation token shards.
//
//   moe_prepare --tokenizer TOK --out DIR [options] INPUT...
//
// Reads documents from text or JSON-lines files (or stdin), encodes each with
// the byte-level BPE tokenizer (tokenizer/bpe.h), appends the end-of-text id
// after every document, sends each document whole to the training or the
// validation set by a deterministic rule, and writes both sets as fixed-size
// shards in the project's format (data/shard.h). The rules (what a document
// is, the validation split, shard names) are documented in docs/prepare.md.
//
// Documents are read serially and encoded in batches, one TokEncoder per
// OpenMP thread; the output order is the input order whatever the thread count.
// Exit status: 0 success, 1 a file or data error, 2 a usage error.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE // getline, strdup, mkdir, readdir
#endif
#ifndef _FILE_OFFSET_BITS
#define _FILE_OFFSET_BITS 64
#endif

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../tokenizer/bpe.h"
#include "shard.h"

#define EXIT_DATA 1
#define EXIT_USAGE 2
#define PROG "moe_prepare"

// A batch is encoded in parallel once it holds this much text.
#define BATCH_BYTES ((size_t)8 << 20)
#define BATCH_DOCS 65536
// Documents at least this long are encoded alone with the tokenizer's own
// parallel encoder instead of inside a batch.
#define BIG_DOC_BYTES ((size_t)1 << 20)
// Bad JSON lines printed before the rest are only counted.
#define MAX_BAD_SHOWN 10
// JSON values nested deeper than this make a line bad (bounded recursion).
#define MAX_JSON_DEPTH 256

static const char *help_text =
    "usage: moe_prepare --tokenizer TOK --out DIR [options] INPUT...\n"
    "Encodes text into train and validation token shards (docs/prepare.md).\n"
    "INPUT is a file, or - for stdin. Each document is followed by the\n"
    "tokenizer's end-of-text id; a document goes whole to train or to val.\n"
    "\n"
    "  --tokenizer TOK       tokenizer file (moe_tok train / import-hf); must have an end-of-text token\n"
    "  --out DIR             output directory (created if missing)\n"
    "  --prefix NAME         shard names NAME_train_000000.bin, NAME_val_000000.bin\n"
    "                        (default: none, so train_000000.bin, val_000000.bin)\n"
    "  --format text|jsonl   input format (default text)\n"
    "  --doc-sep file|blank|lines\n"
    "                        text: one document per input file (default), per\n"
    "                        paragraph (blank-line separated), or per line\n"
    "  --field NAME          jsonl: the string field holding the document (default text)\n"
    "  --strict              jsonl: a bad line is fatal (default: reported, counted, skipped)\n"
    "  --val-fraction F      document i (0-based, input order) is a validation candidate\n"
    "                        when floor((i+1)*F) > floor(i*F): every 1/F-th document\n"
    "                        (default 0.05; 0: no validation set; 1: every document)\n"
    "  --val-tokens N        candidates go to val only while val holds fewer than N\n"
    "                        tokens; later documents all go to train (default: no cap)\n"
    "  --shard-tokens N      tokens per shard; the last shard of each set may be\n"
    "                        shorter (default 10000000; suffixes k, M, G = 10^3, 10^6, 10^9)\n"
    "  --threads N           encoding threads (default: the OpenMP default)\n"
    "  --force               replace existing shards with this prefix in DIR\n"
    "  --quiet               no progress lines (the summary is still printed)\n"
    "  --help                this text\n";

// ---------------------------------------------------------------- helpers

static volatile sig_atomic_t g_stop = 0; // set by SIGINT / SIGTERM
static void on_signal(int sig) { g_stop = sig; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die_usage(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, PROG ": ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nRun '" PROG " --help' for the options.\n");
    exit(EXIT_USAGE);
}

static void errorf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, PROG ": ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

// A growable byte buffer.
typedef struct {
    char *p;
    size_t len, cap;
} Buf;

static int buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const void *data, size_t n) {
    if (buf_reserve(b, n) != 0) return -1;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static int buf_putc(Buf *b, char c) { return buf_put(b, &c, 1); }

// Parses a non-negative integer with an optional k/M/G suffix (powers of 1000).
static int parse_count(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    if (*s < '0' || *s > '9') return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno) return -1;
    uint64_t mul = 1;
    if (*end == 'k' || *end == 'K') mul = 1000, end++;
    else if (*end == 'M') mul = 1000000, end++;
    else if (*end == 'G') mul = 1000000000, end++;
    if (*end) return -1;
    if (v > UINT64_MAX / mul) return -1;
    *out = (uint64_t)v * mul;
    return 0;
}

static int is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

static int all_space(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!is_space((unsigned char)s[i])) return 0;
    return 1;
}

// mkdir -p. Returns 0, or -1 with errno set.
static int make_dirs(const char *path) {
    char *p = strdup(path);
    if (!p) return -1;
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/') p[--n] = 0;
    for (char *q = p + 1; ; q++) {
        if (*q == '/' || *q == 0) {
            char c = *q;
            *q = 0;
            if (mkdir(p, 0777) != 0 && errno != EEXIST) {
                free(p);
                return -1;
            }
            *q = c;
            if (c == 0) break;
        }
    }
    struct stat st;
    int rc = stat(p, &st);
    free(p);
    if (rc != 0) return -1;
    if (!S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

// ---------------------------------------------------------------- JSON lines

// A minimal JSON reader for one line: validates the whole line as one JSON
// object and extracts the string value of one top-level key. Strings are
// decoded (escapes, \uXXXX, surrogate pairs; a lone surrogate becomes U+FFFD);
// other bytes are copied as they are, so UTF-8 text passes through unchanged.
typedef struct {
    const char *s, *end, *start;
    const char *why; // the error, when a function returns -1
    Buf key;         // scratch: the decoded current key
} Json;

static void json_ws(Json *j) {
    while (j->s < j->end && (*j->s == ' ' || *j->s == '\t' || *j->s == '\r' || *j->s == '\n')) j->s++;
}

static int json_fail(Json *j, const char *why) {
    j->why = why;
    return -1;
}

static int hex4(const char *p, const char *end, unsigned *out) {
    if (end - p < 4) return -1;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static int put_utf8(Buf *b, unsigned cp) {
    char u[4];
    size_t n;
    if (cp < 0x80) u[0] = (char)cp, n = 1;
    else if (cp < 0x800) u[0] = (char)(0xC0 | cp >> 6), u[1] = (char)(0x80 | (cp & 0x3F)), n = 2;
    else if (cp < 0x10000)
        u[0] = (char)(0xE0 | cp >> 12), u[1] = (char)(0x80 | ((cp >> 6) & 0x3F)),
        u[2] = (char)(0x80 | (cp & 0x3F)), n = 3;
    else
        u[0] = (char)(0xF0 | cp >> 18), u[1] = (char)(0x80 | ((cp >> 12) & 0x3F)),
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), u[3] = (char)(0x80 | (cp & 0x3F)), n = 4;
    return buf_put(b, u, n);
}

// A string starting at the opening quote. Decodes into out unless out is NULL.
static int json_string(Json *j, Buf *out) {
    j->s++; // the opening quote
    for (;;) {
        const char *run = j->s;
        while (j->s < j->end && *j->s != '"' && *j->s != '\\' && (unsigned char)*j->s >= 0x20) j->s++;
        if (out && buf_put(out, run, (size_t)(j->s - run)) != 0) return json_fail(j, "out of memory");
        if (j->s >= j->end) return json_fail(j, "unterminated string");
        char c = *j->s;
        if (c == '"') {
            j->s++;
            return 0;
        }
        if (c != '\\') return json_fail(j, "control character inside a string (must be escaped)");
        if (j->end - j->s < 2) return json_fail(j, "unterminated string");
        char e = j->s[1];
        j->s += 2;
        char lit = 0;
        switch (e) {
        case '"': lit = '"'; break;
        case '\\': lit = '\\'; break;
        case '/': lit = '/'; break;
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': {
            unsigned cp;
            if (hex4(j->s, j->end, &cp) != 0) return json_fail(j, "bad \\u escape (needs 4 hex digits)");
            j->s += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                // A high surrogate pairs with an immediately following low one.
                if (j->end - j->s >= 6 && j->s[0] == '\\' && j->s[1] == 'u' &&
                    hex4(j->s + 2, j->end, &lo) == 0 && lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    j->s += 6;
                } else {
                    cp = 0xFFFD; // a lone high surrogate
                }
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                cp = 0xFFFD; // a lone low surrogate
            }
            if (out && put_utf8(out, cp) != 0) return json_fail(j, "out of memory");
            continue;
        }
        default: return json_fail(j, "unknown escape in a string");
        }
        if (out && buf_putc(out, lit) != 0) return json_fail(j, "out of memory");
    }
}

static int json_number(Json *j) {
    const char *p = j->s, *e = j->end;
    if (p < e && *p == '-') p++;
    if (p >= e) return json_fail(j, "bad number");
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9') while (p < e && *p >= '0' && *p <= '9') p++;
    else return json_fail(j, "bad number");
    if (p < e && *p == '.') {
        p++;
        if (p >= e || *p < '0' || *p > '9') return json_fail(j, "bad number");
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-')) p++;
        if (p >= e || *p < '0' || *p > '9') return json_fail(j, "bad number");
        while (p < e && *p >= '0' && *p <= '9') p++;
    }
    j->s = p;
    return 0;
}

static int json_skip_value(Json *j, int depth);

static int json_literal(Json *j, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(j->end - j->s) < n || memcmp(j->s, word, n) != 0) return json_fail(j, "unexpected character");
    j->s += n;
    return 0;
}

// Skips an object or array starting at its bracket.
static int json_skip_container(Json *j, int depth) {
    char close = *j->s == '{' ? '}' : ']';
    int is_obj = close == '}';
    j->s++;
    json_ws(j);
    if (j->s < j->end && *j->s == close) {
        j->s++;
        return 0;
    }
    for (;;) {
        json_ws(j);
        if (is_obj) {
            if (j->s >= j->end || *j->s != '"') return json_fail(j, "expected a string key");
            if (json_string(j, NULL) != 0) return -1;
            json_ws(j);
            if (j->s >= j->end || *j->s != ':') return json_fail(j, "expected ':' after a key");
            j->s++;
        }
        if (json_skip_value(j, depth + 1) != 0) return -1;
        json_ws(j);
        if (j->s < j->end && *j->s == ',') {
            j->s++;
            continue;
        }
        if (j->s < j->end && *j->s == close) {
            j->s++;
            return 0;
        }
        return json_fail(j, is_obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int json_skip_value(Json *j, int depth) {
    if (depth > MAX_JSON_DEPTH) return json_fail(j, "nested too deeply");
    json_ws(j);
    if (j->s >= j->end) return json_fail(j, "expected a value");
    switch (*j->s) {
    case '"': return json_string(j, NULL);
    case '{':
    case '[': return json_skip_container(j, depth);
    case 't': return json_literal(j, "true");
    case 'f': return json_literal(j, "false");
    case 'n': return json_literal(j, "null");
    default:
        if (*j->s == '-' || (*j->s >= '0' && *j->s <= '9')) return json_number(j);
        return json_fail(j, "unexpected character");
    }
}

// Parses one line. Returns 1 and the decoded value of `field` in out when the
// line is an object whose (last) `field` key holds a string; 0 with *why set
// when the line is valid JSON but has no such string; -1 with *why and *col
// (1-based) for invalid JSON.
static int json_line_field(Json *j, const char *line, size_t len, const char *field, size_t flen,
                           Buf *out, const char **why, size_t *col) {
    j->s = j->start = line;
    j->end = line + len;
    j->why = NULL;
    out->len = 0;
    int found = 0; // 1: a string, 2: the key exists but is not a string
    int rc = 0;
    json_ws(j);
    if (j->s >= j->end || *j->s != '{') {
        rc = json_fail(j, "a line must hold one JSON object");
        goto done;
    }
    j->s++;
    json_ws(j);
    if (j->s < j->end && *j->s == '}') {
        j->s++;
    } else {
        for (;;) {
            json_ws(j);
            if (j->s >= j->end || *j->s != '"') {
                rc = json_fail(j, "expected a string key");
                goto done;
            }
            j->key.len = 0;
            if ((rc = json_string(j, &j->key)) != 0) goto done;
            json_ws(j);
            if (j->s >= j->end || *j->s != ':') {
                rc = json_fail(j, "expected ':' after a key");
                goto done;
            }
            j->s++;
            json_ws(j);
            int match = j->key.len == flen && memcmp(j->key.p, field, flen) == 0;
            if (match && j->s < j->end && *j->s == '"') {
                out->len = 0; // a repeated key: the last one wins, as in most JSON readers
                if ((rc = json_string(j, out)) != 0) goto done;
                found = 1;
            } else {
                if ((rc = json_skip_value(j, 1)) != 0) goto done;
                if (match) found = 2;
            }
            json_ws(j);
            if (j->s < j->end && *j->s == ',') {
                j->s++;
                continue;
            }
            if (j->s < j->end && *j->s == '}') {
                j->s++;
                break;
            }
            rc = json_fail(j, "expected ',' or '}'");
            goto done;
        }
    }
    json_ws(j);
    if (j->s != j->end) rc = json_fail(j, "text after the JSON object");
done:
    if (rc != 0) {
        *why = j->why;
        *col = (size_t)(j->s - j->start) + 1;
        return -1;
    }
    if (found == 1) return 1;
    *why = found == 2 ? "the field is not a string" : "no such field";
    return 0;
}

// ---------------------------------------------------------------- output sets

enum { SPLIT_TRAIN = 0, SPLIT_VAL = 1 };
static const char *split_names[2] = { "train", "val" };

typedef struct {
    const char *name;
    ShardWriter *w;      // the open shard, or NULL
    char *open_path;     // its final name
    uint32_t shards;     // shards started
    uint64_t tokens;     // tokens written, end-of-text ids included
    uint64_t docs;
    uint64_t doc_bytes;  // text bytes of its documents
} Split;

typedef struct {
    // options
    const char *tok_path, *out_dir, *prefix, *field;
    int jsonl, doc_sep; // doc_sep: 0 file, 1 blank, 2 lines
    int strict, force, quiet, threads;
    double val_fraction;
    uint64_t val_tokens; // UINT64_MAX: no cap
    uint64_t shard_tokens;
    // state
    const Tokenizer *tok;
    uint32_t vocab, eot;
    TokEncoder **enc; // one per thread
    int n_enc;
    Split split[2];
    char **written; // completed shards of this run, removed on failure
    size_t n_written, cap_written;
    uint64_t n_docs, n_empty, n_bad, bytes_read, doc_tokens;
    double t0, last_progress;
    // the batch being collected: documents are slices of text
    Buf text;
    size_t *doc_off, *doc_len;
    size_t n_batch, cap_batch;
    uint32_t **ids;
    size_t *n_ids;
} Ctx;

static char *shard_path(const Ctx *c, int split, uint32_t index) {
    const char *d = c->out_dir;
    size_t n = strlen(d) + strlen(c->prefix) + 64;
    char *p = malloc(n);
    if (!p) return NULL;
    snprintf(p, n, "%s%s%s%s%s_%06u.bin", d, d[strlen(d) - 1] == '/' ? "" : "/", c->prefix,
             *c->prefix ? "_" : "", split_names[split], index);
    return p;
}

static int remember_written(Ctx *c, char *path) {
    if (c->n_written == c->cap_written) {
        size_t cap = c->cap_written ? 2 * c->cap_written : 16;
        char **p = realloc(c->written, cap * sizeof *p);
        if (!p) return -1;
        c->written = p;
        c->cap_written = cap;
    }
    c->written[c->n_written++] = path;
    return 0;
}

static int close_shard(Ctx *c, Split *s) {
    char err[1024];
    int rc = shard_writer_close(s->w, err, sizeof err);
    s->w = NULL;
    if (rc != 0) {
        errorf("%s", err);
        free(s->open_path);
        s->open_path = NULL;
        return -1;
    }
    if (remember_written(c, s->open_path) != 0) {
        errorf("out of memory");
        free(s->open_path);
        s->open_path = NULL;
        return -1;
    }
    s->open_path = NULL;
    return 0;
}

// Appends tokens to a set, starting and finishing shards of --shard-tokens.
static int split_append(Ctx *c, int which, const uint32_t *ids, size_t n) {
    Split *s = &c->split[which];
    char err[1024];
    while (n > 0) {
        if (!s->w) {
            if (s->shards > 999999) {
                errorf("more than 1,000,000 %s shards: raise --shard-tokens", s->name);
                return -1;
            }
            s->open_path = shard_path(c, which, s->shards);
            if (!s->open_path) {
                errorf("out of memory");
                return -1;
            }
            s->w = shard_writer_open(s->open_path, c->vocab, err, sizeof err);
            if (!s->w) {
                errorf("%s", err);
                free(s->open_path);
                s->open_path = NULL;
                return -1;
            }
            s->shards++;
        }
        uint64_t room = c->shard_tokens - shard_writer_count(s->w);
        size_t m = (uint64_t)n < room ? n : (size_t)room;
        if (shard_writer_append(s->w, ids, m, err, sizeof err) != 0) {
            errorf("%s", err);
            return -1;
        }
        ids += m;
        n -= m;
        s->tokens += m;
        if (shard_writer_count(s->w) == c->shard_tokens && close_shard(c, s) != 0) return -1;
    }
    return 0;
}

// The validation rule (docs/prepare.md): document i is a candidate when
// floor((i+1) f) > floor(i f); a candidate goes to val while val holds fewer
// than --val-tokens tokens.
static int goes_to_val(const Ctx *c, uint64_t i) {
    if (c->val_fraction <= 0) return 0;
    if (c->split[SPLIT_VAL].tokens >= c->val_tokens) return 0;
    return floor((double)(i + 1) * c->val_fraction) > floor((double)i * c->val_fraction);
}

static int emit_doc(Ctx *c, const uint32_t *ids, size_t n, size_t text_bytes) {
    int which = goes_to_val(c, c->n_docs) ? SPLIT_VAL : SPLIT_TRAIN;
    Split *s = &c->split[which];
    if (split_append(c, which, ids, n) != 0 || split_append(c, which, &c->eot, 1) != 0) return -1;
    s->docs++;
    s->doc_bytes += text_bytes;
    c->doc_tokens += n;
    c->n_docs++;
    return 0;
}

static void progress(Ctx *c, int force) {
    double t = now_s();
    if (c->quiet || (!force && t - c->last_progress < 2.0)) return;
    c->last_progress = t;
    double dt = t - c->t0 > 1e-9 ? t - c->t0 : 1e-9;
    fprintf(stderr, PROG ": %.1f MB read, %llu documents, %.2f M tokens written (train %.2f M, val %.2f M), %.1f MB/s\n",
            (double)c->bytes_read / 1e6, (unsigned long long)c->n_docs,
            (double)(c->split[0].tokens + c->split[1].tokens) / 1e6, (double)c->split[0].tokens / 1e6,
            (double)c->split[1].tokens / 1e6, (double)c->bytes_read / 1e6 / dt);
}

// Encodes the collected batch (in parallel) and writes it in input order.
static int flush_batch(Ctx *c) {
    if (c->n_batch == 0) return 0;
    int failed = 0;
    long nb = (long)c->n_batch;
#pragma omp parallel for schedule(dynamic, 16) num_threads(c->n_enc)
    for (long k = 0; k < nb; k++) {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        size_t n = tok_encoder_encode(c->enc[tid], c->text.p + c->doc_off[k], c->doc_len[k], 0, &c->ids[k]);
        if (n == TOK_ERROR) {
            c->ids[k] = NULL;
            c->n_ids[k] = 0;
#pragma omp atomic write
            failed = 1;
        } else {
            c->n_ids[k] = n;
        }
    }
    int rc = 0;
    if (failed) {
        errorf("out of memory while encoding");
        rc = -1;
    }
    for (size_t k = 0; k < c->n_batch; k++) {
        if (rc == 0 && emit_doc(c, c->ids[k], c->n_ids[k], c->doc_len[k]) != 0) rc = -1;
        free(c->ids[k]);
        c->ids[k] = NULL;
    }
    c->n_batch = 0;
    c->text.len = 0;
    if (rc == 0) progress(c, 0);
    return rc;
}

// A big document: encoded on its own by the tokenizer's parallel encoder.
static int encode_big(Ctx *c, const char *text, size_t len) {
    if (flush_batch(c) != 0) return -1;
    uint32_t *ids = NULL;
    size_t n = tok_encode(c->tok, text, len, &ids);
    if (n == TOK_ERROR) {
        errorf("out of memory while encoding a document of %zu bytes", len);
        return -1;
    }
    int rc = emit_doc(c, ids, n, len);
    free(ids);
    if (rc == 0) progress(c, 0);
    return rc;
}

// Adds one document (empty ones are counted and skipped).
static int add_doc(Ctx *c, const char *text, size_t len) {
    if (len == 0) {
        c->n_empty++;
        return 0;
    }
    if (len >= BIG_DOC_BYTES) return encode_big(c, text, len);
    if (c->n_batch == c->cap_batch) {
        size_t cap = c->cap_batch ? 2 * c->cap_batch : 1024;
        size_t *off = realloc(c->doc_off, cap * sizeof *off);
        if (off) c->doc_off = off;
        size_t *ln = realloc(c->doc_len, cap * sizeof *ln);
        if (ln) c->doc_len = ln;
        uint32_t **ids = realloc(c->ids, cap * sizeof *ids);
        if (ids) c->ids = ids;
        size_t *ni = realloc(c->n_ids, cap * sizeof *ni);
        if (ni) c->n_ids = ni;
        if (!off || !ln || !ids || !ni) {
            errorf("out of memory");
            return -1;
        }
        c->cap_batch = cap;
    }
    c->doc_off[c->n_batch] = c->text.len;
    c->doc_len[c->n_batch] = len;
    if (buf_put(&c->text, text, len) != 0) {
        errorf("out of memory");
        return -1;
    }
    c->n_batch++;
    if (c->text.len >= BATCH_BYTES || c->n_batch >= BATCH_DOCS) return flush_batch(c);
    return 0;
}

// ---------------------------------------------------------------- inputs

// Reads the whole stream into b (text format, one document per file).
static int read_all(FILE *f, const char *name, Buf *b) {
    b->len = 0;
    for (;;) {
        if (buf_reserve(b, 1 << 20) != 0) {
            errorf("%s: out of memory reading the file", name);
            return -1;
        }
        size_t got = fread(b->p + b->len, 1, b->cap - b->len, f);
        b->len += got;
        if (got == 0) break;
    }
    if (ferror(f)) {
        errorf("%s: read error: %s", name, strerror(errno));
        return -1;
    }
    return 0;
}

// Strips a trailing "\n" and then a trailing "\r".
static size_t chomp(const char *s, size_t n) {
    if (n > 0 && s[n - 1] == '\n') n--;
    if (n > 0 && s[n - 1] == '\r') n--;
    return n;
}

static int process_input(Ctx *c, const char *path) {
    int is_stdin = strcmp(path, "-") == 0;
    const char *name = is_stdin ? "<stdin>" : path;
    FILE *f = is_stdin ? stdin : fopen(path, "rb");
    if (!f) {
        errorf("%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    int rc = 0;
    if (!c->jsonl && c->doc_sep == 0) {
        Buf b = {0};
        rc = read_all(f, name, &b);
        if (rc == 0) {
            c->bytes_read += b.len;
            rc = add_doc(c, b.p, b.len);
        }
        free(b.p);
    } else {
        char *line = NULL;
        size_t cap = 0, lineno = 0;
        ssize_t got;
        Buf para = {0}, val = {0};
        Json j = {0};
        size_t flen = c->field ? strlen(c->field) : 0;
        errno = 0;
        while (rc == 0 && !g_stop && (got = getline(&line, &cap, f)) >= 0) {
            lineno++;
            c->bytes_read += (uint64_t)got;
            size_t n = chomp(line, (size_t)got);
            if (c->jsonl) {
                if (all_space(line, n)) continue;
                const char *why = NULL;
                size_t col = 0;
                int r = json_line_field(&j, line, n, c->field, flen, &val, &why, &col);
                if (r == 1) {
                    rc = add_doc(c, val.p, val.len);
                } else {
                    c->n_bad++;
                    char msg[256];
                    if (r < 0) snprintf(msg, sizeof msg, "bad JSON at column %zu: %s", col, why);
                    else snprintf(msg, sizeof msg, "%s \"%.100s\"", why, c->field);
                    if (c->strict) {
                        errorf("%s:%zu: %s (fatal with --strict)", name, lineno, msg);
                        rc = -1;
                    } else if (c->n_bad <= MAX_BAD_SHOWN) {
                        errorf("%s:%zu: %s; line skipped", name, lineno, msg);
                        if (c->n_bad == MAX_BAD_SHOWN) errorf("further bad lines are counted, not shown");
                    }
                }
            } else if (c->doc_sep == 2) { // lines
                if (!all_space(line, n)) rc = add_doc(c, line, n);
            } else { // blank-line separated paragraphs
                if (all_space(line, n)) {
                    if (para.len > 0) rc = add_doc(c, para.p, para.len);
                    para.len = 0;
                } else {
                    if ((para.len > 0 && buf_putc(&para, '\n') != 0) || buf_put(&para, line, n) != 0) {
                        errorf("%s:%zu: out of memory", name, lineno);
                        rc = -1;
                    }
                }
            }
            errno = 0;
        }
        if (rc == 0 && !g_stop && ferror(f)) {
            errorf("%s: read error: %s", name, strerror(errno));
            rc = -1;
        }
        if (rc == 0 && para.len > 0) rc = add_doc(c, para.p, para.len);
        free(line);
        free(para.p);
        free(val.p);
        free(j.key.p);
    }
    if (!is_stdin) fclose(f);
    return rc;
}

// ---------------------------------------------------------------- existing shards

// 1 when name is PREFIX_train_<digits>.bin or PREFIX_val_<digits>.bin.
static int is_our_shard(const char *name, const char *prefix) {
    size_t pl = strlen(prefix);
    if (pl) {
        if (strncmp(name, prefix, pl) != 0 || name[pl] != '_') return 0;
        name += pl + 1;
    }
    for (int k = 0; k < 2; k++) {
        size_t sl = strlen(split_names[k]);
        if (strncmp(name, split_names[k], sl) != 0 || name[sl] != '_') continue;
        const char *p = name + sl + 1;
        if (*p < '0' || *p > '9') return 0;
        while (*p >= '0' && *p <= '9') p++;
        return strcmp(p, ".bin") == 0;
    }
    return 0;
}

// Lists existing shards of this prefix; removes them when remove is set.
// Returns how many there are (were), or -1 on error.
static long existing_shards(const Ctx *c, int remove, char *first, size_t firstlen) {
    DIR *d = opendir(c->out_dir);
    if (!d) {
        errorf("%s: cannot read the directory: %s", c->out_dir, strerror(errno));
        return -1;
    }
    long n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!is_our_shard(e->d_name, c->prefix)) continue;
        if (n == 0 && first) snprintf(first, firstlen, "%s", e->d_name);
        n++;
        if (remove) {
            size_t len = strlen(c->out_dir) + strlen(e->d_name) + 2;
            char *p = malloc(len);
            if (!p) {
                closedir(d);
                errorf("out of memory");
                return -1;
            }
            snprintf(p, len, "%s/%s", c->out_dir, e->d_name);
            if (unlink(p) != 0) {
                errorf("%s: cannot remove: %s", p, strerror(errno));
                free(p);
                closedir(d);
                return -1;
            }
            free(p);
        }
    }
    closedir(d);
    return n;
}

// On failure: give up the open shards and remove the ones this run finished.
static void cleanup_outputs(Ctx *c) {
    for (int k = 0; k < 2; k++) {
        shard_writer_abort(c->split[k].w);
        c->split[k].w = NULL;
        free(c->split[k].open_path);
        c->split[k].open_path = NULL;
    }
    for (size_t i = 0; i < c->n_written; i++) unlink(c->written[i]);
    if (c->n_written) errorf("removed the %zu shards this run had written", c->n_written);
}

// ---------------------------------------------------------------- main

int main(int argc, char **argv) {
    Ctx c;
    memset(&c, 0, sizeof c);
    c.prefix = "";
    c.val_fraction = 0.05;
    c.val_tokens = UINT64_MAX;
    c.shard_tokens = 10000000;
    const char *format = "text", *doc_sep = NULL;
    char **inputs = calloc((size_t)argc, sizeof *inputs);
    int n_inputs = 0, n_stdin = 0, options_done = 0;
    if (!inputs) {
        errorf("out of memory");
        return EXIT_DATA;
    }
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        if (options_done || a[0] != '-' || strcmp(a, "-") == 0) {
            inputs[n_inputs++] = a;
            n_stdin += strcmp(a, "-") == 0;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            options_done = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(help_text, stdout);
            free(inputs);
            return 0;
        }
        // --name value or --name=value
        char name[64];
        const char *value = NULL;
        const char *eq = strchr(a, '=');
        size_t nl = eq ? (size_t)(eq - a) : strlen(a);
        if (nl >= sizeof name) die_usage("unknown option '%s'", a);
        memcpy(name, a, nl);
        name[nl] = 0;
        int is_flag = !strcmp(name, "--strict") || !strcmp(name, "--force") || !strcmp(name, "--quiet");
        int known = is_flag || !strcmp(name, "--tokenizer") || !strcmp(name, "--out") ||
                    !strcmp(name, "--prefix") || !strcmp(name, "--format") || !strcmp(name, "--doc-sep") ||
                    !strcmp(name, "--field") || !strcmp(name, "--val-fraction") ||
                    !strcmp(name, "--val-tokens") || !strcmp(name, "--shard-tokens") ||
                    !strcmp(name, "--threads");
        if (!known) die_usage("unknown option '%s'", a);
        if (is_flag) {
            if (eq) die_usage("option %s takes no value", name);
        } else if (eq) {
            value = eq + 1;
        } else {
            if (i + 1 >= argc) die_usage("option %s needs a value", name);
            value = argv[++i];
        }
        if (!strcmp(name, "--strict")) c.strict = 1;
        else if (!strcmp(name, "--force")) c.force = 1;
        else if (!strcmp(name, "--quiet")) c.quiet = 1;
        else if (!strcmp(name, "--tokenizer")) c.tok_path = value;
        else if (!strcmp(name, "--out")) c.out_dir = value;
        else if (!strcmp(name, "--prefix")) c.prefix = value;
        else if (!strcmp(name, "--format")) format = value;
        else if (!strcmp(name, "--doc-sep")) doc_sep = value;
        else if (!strcmp(name, "--field")) c.field = value;
        else if (!strcmp(name, "--val-fraction")) {
            char *end;
            errno = 0;
            c.val_fraction = strtod(value, &end);
            if (errno || end == value || *end || !(c.val_fraction >= 0 && c.val_fraction <= 1))
                die_usage("--val-fraction must be a number in [0, 1], not '%s'", value);
        } else if (!strcmp(name, "--val-tokens")) {
            if (parse_count(value, &c.val_tokens) != 0)
                die_usage("--val-tokens must be a non-negative integer (k/M/G suffix allowed), not '%s'", value);
        } else if (!strcmp(name, "--shard-tokens")) {
            if (parse_count(value, &c.shard_tokens) != 0 || c.shard_tokens == 0)
                die_usage("--shard-tokens must be a positive integer (k/M/G suffix allowed), not '%s'", value);
        } else if (!strcmp(name, "--threads")) {
            uint64_t t;
            if (parse_count(value, &t) != 0 || t > 4096)
                die_usage("--threads must be an integer in [0, 4096], not '%s'", value);
            c.threads = (int)t;
        }
    }
    if (!c.tok_path || !c.out_dir) die_usage("--tokenizer and --out are required");
    if (n_inputs == 0) die_usage("no INPUT given (files, or - for stdin)");
    if (n_stdin > 1) die_usage("'-' (stdin) may be given only once");
    if (!*c.out_dir) die_usage("--out must not be empty");
    if (strchr(c.prefix, '/')) die_usage("--prefix must not contain '/', not '%s'", c.prefix);
    if (!strcmp(format, "jsonl")) c.jsonl = 1;
    else if (strcmp(format, "text") != 0) die_usage("--format must be text or jsonl, not '%s'", format);
    if (c.jsonl && doc_sep) die_usage("--doc-sep applies to --format text only (jsonl: one document per line)");
    if (!c.jsonl && c.field) die_usage("--field applies to --format jsonl only");
    if (!c.jsonl && c.strict) die_usage("--strict applies to --format jsonl only");
    if (c.jsonl && !c.field) c.field = "text";
    if (!doc_sep || !strcmp(doc_sep, "file")) c.doc_sep = 0;
    else if (!strcmp(doc_sep, "blank")) c.doc_sep = 1;
    else if (!strcmp(doc_sep, "lines")) c.doc_sep = 2;
    else die_usage("--doc-sep must be file, blank or lines, not '%s'", doc_sep);

    // Every input must be readable before anything is written.
    for (int k = 0; k < n_inputs; k++) {
        if (!strcmp(inputs[k], "-")) continue;
        struct stat st;
        if (stat(inputs[k], &st) != 0 || access(inputs[k], R_OK) != 0) {
            errorf("%s: cannot read the input: %s", inputs[k], strerror(errno));
            free(inputs);
            return EXIT_DATA;
        }
        if (S_ISDIR(st.st_mode)) {
            errorf("%s: is a directory, not an input file", inputs[k]);
            free(inputs);
            return EXIT_DATA;
        }
    }

    char err[1024];
    Tokenizer *tok = tok_load(c.tok_path, err, sizeof err);
    if (!tok) {
        errorf("%s", err);
        free(inputs);
        return EXIT_DATA;
    }
    c.tok = tok;
    c.vocab = (uint32_t)tok_vocab_size(tok);
    if (tok_eot_id(tok) < 0) {
        errorf("%s: the tokenizer has no end-of-text token, which separates documents", c.tok_path);
        tok_free(tok);
        free(inputs);
        return EXIT_DATA;
    }
    c.eot = (uint32_t)tok_eot_id(tok);

    if (make_dirs(c.out_dir) != 0) {
        errorf("%s: cannot create the output directory: %s", c.out_dir, strerror(errno));
        tok_free(tok);
        free(inputs);
        return EXIT_DATA;
    }
    char first[512] = "";
    long existing = existing_shards(&c, 0, first, sizeof first);
    if (existing < 0) {
        tok_free(tok);
        free(inputs);
        return EXIT_DATA;
    }
    if (existing > 0 && !c.force) {
        errorf("%s already holds %ld shard%s with this prefix (e.g. %s); use --force to replace them,"
               " or another --out or --prefix", c.out_dir, existing, existing == 1 ? "" : "s", first);
        tok_free(tok);
        free(inputs);
        return EXIT_DATA;
    }
    if (existing > 0) {
        if (existing_shards(&c, 1, NULL, 0) < 0) {
            tok_free(tok);
            free(inputs);
            return EXIT_DATA;
        }
        if (!c.quiet) fprintf(stderr, PROG ": --force: removed %ld existing shards from %s\n", existing, c.out_dir);
    }

#ifdef _OPENMP
    if (c.threads > 0) omp_set_num_threads(c.threads);
    c.n_enc = omp_get_max_threads();
#else
    c.n_enc = 1;
#endif
    if (c.n_enc < 1) c.n_enc = 1;
    c.enc = calloc((size_t)c.n_enc, sizeof *c.enc);
    for (int k = 0; c.enc && k < c.n_enc; k++) c.enc[k] = tok_encoder_new(tok);
    for (int k = 0; k < c.n_enc; k++)
        if (!c.enc || !c.enc[k]) {
            errorf("out of memory");
            return EXIT_DATA;
        }
    for (int k = 0; k < 2; k++) c.split[k].name = split_names[k];

    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    c.t0 = c.last_progress = now_s();
    int rc = 0;
    for (int k = 0; k < n_inputs && rc == 0 && !g_stop; k++) rc = process_input(&c, inputs[k]);
    if (rc == 0 && !g_stop) rc = flush_batch(&c);
    if (rc == 0 && g_stop) {
        errorf("interrupted (signal %d)", (int)g_stop);
        rc = -1;
    }
    if (rc == 0 && c.n_bad > 0 && c.n_docs == 0) {
        errorf("no valid documents: all %llu non-empty lines were bad", (unsigned long long)c.n_bad);
        rc = -1;
    } else if (rc == 0 && c.n_docs == 0) {
        errorf("no documents in the input (%llu empty ones skipped)", (unsigned long long)c.n_empty);
        rc = -1;
    }
    for (int k = 0; k < 2 && rc == 0; k++)
        if (c.split[k].w && close_shard(&c, &c.split[k]) != 0) rc = -1;
    if (rc != 0) cleanup_outputs(&c);

    if (rc == 0) {
        double dt = now_s() - c.t0;
        if (dt < 1e-9) dt = 1e-9;
        uint64_t total = c.split[0].tokens + c.split[1].tokens;
        printf("%s: %.2f MB from %d input%s in %.2f s (%.1f MB/s): %llu documents", PROG,
               (double)c.bytes_read / 1e6, n_inputs, n_inputs == 1 ? "" : "s", dt,
               (double)c.bytes_read / 1e6 / dt, (unsigned long long)c.n_docs);
        if (c.n_empty) printf(", %llu empty skipped", (unsigned long long)c.n_empty);
        if (c.jsonl) printf(", %llu bad lines skipped", (unsigned long long)c.n_bad);
        printf("\n");
        for (int k = 0; k < 2; k++) {
            const Split *s = &c.split[k];
            printf("  %-5s %llu documents, %llu tokens, %u shard%s", s->name, (unsigned long long)s->docs,
                   (unsigned long long)s->tokens, s->shards, s->shards == 1 ? "" : "s");
            if (s->shards > 0) {
                char *p0 = shard_path(&c, k, 0);
                printf(" (%s%s)", p0 ? p0 : "", s->shards > 1 ? " ..." : "");
                free(p0);
            }
            printf("\n");
        }
        uint64_t text_bytes = c.split[0].doc_bytes + c.split[1].doc_bytes;
        printf("  %llu tokens in all (%llu end-of-text), vocabulary %u, %u-byte tokens, %.2f bytes of text per token\n",
               (unsigned long long)total, (unsigned long long)c.n_docs, c.vocab, shard_token_bytes(c.vocab),
               c.doc_tokens ? (double)text_bytes / (double)c.doc_tokens : 0.0);
        if (c.split[SPLIT_VAL].docs == 0 && c.val_fraction > 0 && c.val_tokens > 0)
            fprintf(stderr, PROG ": warning: the validation set is empty (%llu documents, --val-fraction %g):"
                    " use more, smaller documents (--doc-sep) or a larger fraction\n",
                    (unsigned long long)c.n_docs, c.val_fraction);
    }

    for (int k = 0; k < c.n_enc; k++) tok_encoder_free(c.enc[k]);
    free(c.enc);
    for (size_t i = 0; i < c.n_written; i++) free(c.written[i]);
    free(c.written);
    free(c.text.p);
    free(c.doc_off);
    free(c.doc_len);
    free(c.ids);
    free(c.n_ids);
    tok_free(tok);
    free(inputs);
    return rc == 0 ? 0 : EXIT_DATA;
}
