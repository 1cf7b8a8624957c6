// fuzz_inputs: seeded mutants of every file format the programs read, fed to
// their loaders in-process:
//   shards        raw byte mutants            shard_open, shard_read, loader_open/next
//   checkpoints   raw byte mutants; header    ckpt_open, ckpt_verify, ckpt_state_open/load
//                 mutants with the header
//                 checksum recomputed; section
//                 contents mutated with every
//                 checksum valid (tests/ckpt_rewrite.h)
//   tokenizers    raw mutants; mutants with   tok_load, then encode/decode
//                 the CRC recomputed
//   model files   text mutants                config_load_file, config_validate
//   options files text mutants                options_parse (--options), options_validate
// A mutant passes when its loader returns (an alarm catches a hang), refuses
// it with a message naming the file, or accepts it and what it accepted keeps
// the loader's promises, checked against independent oracles: a checkpoint's
// values are finite (moments >= 0) and its config valid; a model's parameter
// count equals the layout's (model/layout.c); a tokenizer still round-trips
// bytes. Under `make test-asan` it runs with AddressSanitizer and UBSan, so a
// memory error or undefined behaviour fails it too.
//
//   fuzz_inputs [MUTANTS_PER_FORMAT [SEED]]     (defaults 150, 1)
// FUZZ_VERBOSE=1 names every mutant and lets the options parser's messages
// through (they are discarded otherwise).
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../data/loader.h"
#include "../data/shard.h"
#include "../model/config.h"
#include "../model/layout.h"
#include "../tokenizer/bpe.h"
#include "../tokenizer/bpe_internal.h"  // tok_crc32: to make mutants with a valid checksum
#include "../train/ckpt_sections.h"
#include "../train/ckpt_state.h"
#include "../train/options.h"
#include "../util/util.h"
#include "check.h"
#include "ckpt_rewrite.h"

static char dir[256];               // the scratch directory
static const char *current = "";    // what is being fuzzed, for the alarm's message
static int current_i, verbose;

// ---------------------------------------------------------------- mutation

static uint64_t rng_state;
static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static size_t below(size_t n) { return n ? (size_t)(rnd() % n) : 0; }

typedef struct {
    uint8_t *p;
    size_t n, cap;
} Buf;

static void buf_set(Buf *b, const void *data, size_t n) {
    if (n + 1 > b->cap) {
        b->cap = 2 * n + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort();
    }
    memcpy(b->p, data, n);
    b->n = n;
}

static void buf_insert(Buf *b, size_t at, const void *data, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = 2 * (b->n + n) + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort();
    }
    memmove(b->p + at + n, b->p + at, b->n - at);
    memcpy(b->p + at, data, n);
    b->n += n;
}

// Values that sit on the edges of what fields hold.
static const uint64_t edge_values[] = { 0, 1, 2, 0x7f, 0x80, 0xff, 0xffff, 0x10000, 0x7fffffff, 0x80000000,
                                        0xffffffff, 0x100000000ULL, 0x7fffffffffffffffULL, 0xffffffffffffffffULL };

// One to four byte-level changes, half of them within the first `head` bytes
// (where the headers are).
static void mutate_bytes(Buf *b, size_t head) {
    int k = 1 + (int)below(4);
    for (int j = 0; j < k && b->n > 0; j++) {
        size_t at = below(2) && head ? below(head < b->n ? head : b->n) : below(b->n);
        switch (below(7)) {
        case 0: b->p[at] ^= (uint8_t)(1u << below(8)); break;
        case 1: b->p[at] = (uint8_t)rnd(); break;
        case 2: { // an edge value over a 4- or 8-byte field
            uint64_t v = edge_values[below(sizeof edge_values / sizeof edge_values[0])];
            size_t w = below(2) ? 4 : 8;
            at &= ~(size_t)3;
            for (size_t i = 0; i < w && at + i < b->n; i++) b->p[at + i] = (uint8_t)(v >> (8 * i));
            break;
        }
        case 3: b->n = at; break; // truncate
        case 4: { // append junk
            uint8_t junk[64];
            for (size_t i = 0; i < sizeof junk; i++) junk[i] = (uint8_t)rnd();
            buf_insert(b, b->n, junk, 1 + below(sizeof junk));
            break;
        }
        case 5: { // delete a run
            size_t len = 1 + below(16);
            if (at + len > b->n) len = b->n - at;
            memmove(b->p + at, b->p + at + len, b->n - at - len);
            b->n -= len;
            break;
        }
        default: { // duplicate a run
            size_t len = 1 + below(16);
            if (at + len > b->n) len = b->n - at;
            uint8_t tmp[16];
            memcpy(tmp, b->p + at, len);
            buf_insert(b, at, tmp, len);
        }
        }
    }
}

// Text mutants of a key=value file: byte changes, lines with known keys and
// edge values, lines longer than any buffer, NUL bytes, lost newlines.
static void mutate_text(Buf *b, const char *const *keys, int n_keys) {
    static const char *const values[] = { "0", "-1", "1", "2147483647", "-2147483648", "2147483648", "1e39",
                                          "nan", "inf", "-0", "", "  ", "0x10", "65537", "1048577", "softmax",
                                          "99999999999999999999", "1e-45", "3.4e38" };
    int k = 1 + (int)below(3);
    for (int j = 0; j < k; j++) {
        size_t at = below(b->n + 1);
        while (at > 0 && at < b->n && b->p[at - 1] != '\n') at--; // at a line start
        char line[4200];
        switch (below(6)) {
        case 0: case 1: {
            const char *key = keys[below((size_t)n_keys)];
            int n = snprintf(line, sizeof line, "%s%s%s\n", key, below(2) ? "=" : " = ",
                             values[below(sizeof values / sizeof values[0])]);
            buf_insert(b, at, line, (size_t)n);
            break;
        }
        case 2: { // a long line, sometimes a comment with a setting at its end
            size_t len = 1000 + below(3000);
            memset(line, below(2) ? '#' : 'x', len);
            int n = snprintf(line + len, sizeof line - len, "%s=1\n", keys[below((size_t)n_keys)]);
            buf_insert(b, at, line, len + (size_t)n);
            break;
        }
        case 3: buf_insert(b, below(b->n + 1), "\0", 1); break;
        case 4:
            for (size_t i = at; i < b->n; i++)
                if (b->p[i] == '\n') {
                    b->p[i] = below(2) ? ' ' : '#';
                    break;
                }
            break;
        default: mutate_bytes(b, 0);
        }
    }
}

static void write_file(const char *path, const Buf *b) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(b->p, 1, b->n, f) != b->n || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
}

// Writes a text mutant of the len bytes of text to path.
static void write_text_mutant(const char *path, const char *text, size_t len, const char *const *keys, int n_keys) {
    Buf b = { 0 };
    buf_set(&b, text, len);
    mutate_text(&b, keys, n_keys);
    write_file(path, &b);
    free(b.p);
}

static Buf read_whole(const char *path) {
    Buf b = { 0 };
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    uint8_t tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) buf_insert(&b, b.n, tmp, n);
    fclose(f);
    return b;
}

// ---------------------------------------------------------------- harness

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "fuzz_inputs: FAIL a mutant hung (no answer within the alarm): ";
    if (write(2, msg, sizeof msg - 1) < 0 || write(2, current, strlen(current)) < 0 || write(2, "\n", 1) < 0) {}
    _exit(1);
}

static void begin(const char *what, int i) {
    current = what;
    current_i = i;
    if (verbose) printf("  %s mutant %d\n", what, i);
    alarm(20); // generous: one mutant takes milliseconds, under ASan tens of them
}

// Counts the rejections whose message does not name the file.
static int unnamed;
static void rejected(const char *err, const char *path) {
    if (!strstr(err, path)) {
        unnamed++;
        printf("FAIL %s mutant %d: message does not name %s: %s\n", current, current_i, path, err);
    }
}

// ---------------------------------------------------------------- shards

static void fuzz_shards(int n) {
    char path[300], err[2048];
    snprintf(path, sizeof path, "%s/shard.bin", dir);
    int accepted = 0;
    for (int i = 0; i < n; i++) {
        // Two widths: 2-byte tokens (vocab 300) and 4-byte tokens (vocab 70000).
        uint32_t vocab = i % 2 ? 70000 : 300, tok[1000];
        for (size_t t = 0; t < 1000; t++) tok[t] = (uint32_t)below(vocab);
        if (shard_write_file(path, tok, 1000, vocab, err, sizeof err) != 0) FATAL("%s", err);
        Buf b = read_whole(path);
        mutate_bytes(&b, SHARD_HEADER_SIZE);
        write_file(path, &b);
        free(b.p);
        begin("shard", i);
        Shard s;
        if (shard_open(&s, path, err, sizeof err) != 0) {
            rejected(err, path);
        } else {
            uint32_t *all = malloc(sizeof(uint32_t) * (s.header.n_tokens + 1));
            if (shard_read(&s, 0, s.header.n_tokens, all, err, sizeof err) != 0) rejected(err, path);
            free(all);
            shard_close(&s);
            Loader *L = loader_open(path, 2, 8, 0, 1, (uint64_t)i, 1, err, sizeof err);
            if (!L) {
                rejected(err, path);
            } else {
                accepted++;
                int32_t in[16], tg[16];
                for (int k = 0; k < 40; k++)
                    if (loader_next(L, in, tg) != 0) {
                        rejected(loader_error(L), path);
                        break;
                    }
                LoaderState st = { rnd() % 4, rnd() % 64, loader_get_state(L).fingerprint };
                loader_set_state(L, &st); // in or out of range: either answer, never a crash
                loader_close(L);
            }
        }
        alarm(0);
    }
    printf("shards: %d mutants, %d accepted by the loader\n", n, accepted);
}

// ---------------------------------------------------------------- checkpoints

// The promises of ckpt_state_load, checked independently on what it accepted.
static int state_sane(const CkptState *st) {
    char why[512];
    if (config_validate(&st->cfg, why, sizeof why) != 0 || st->step < 0) return 0;
    size_t nb = (size_t)config_n_moe(&st->cfg) * (size_t)st->cfg.n_routed;
    for (size_t i = 0; i < nb; i++)
        if (!isfinite(st->bias[i])) return 0;
    for (int64_t i = 0; i < st->n_params; i++)
        if (!isfinite(st->params[i]) || !isfinite(st->adam_m[i]) || !isfinite(st->adam_v[i]) || st->adam_v[i] < 0)
            return 0;
    return 1;
}

static void fuzz_checkpoints(int n) {
    char base[300], path[300], err[2048];
    snprintf(base, sizeof base, "%s/base_ckpt.bin", dir);
    snprintf(path, sizeof path, "%s/ckpt.bin", dir);
    // The base checkpoint, as the trainer writes one.
    TrainOptions o;
    options_default(&o);
    CkptState st = { .cfg = ckpt_test_model(), .step = 5, .loader = { 0, 1, 12345 }, .rng = 99 };
    st.n_params = config_total_params(&st.cfg);
    size_t nb = (size_t)config_n_moe(&st.cfg) * (size_t)st.cfg.n_routed, np = (size_t)st.n_params;
    float *mem = calloc(nb + 3 * np, sizeof(float));
    st.bias = mem;
    st.params = mem + nb;
    st.adam_m = st.params + np;
    st.adam_v = st.adam_m + np;
    for (size_t i = 0; i < nb + 3 * np; i++) mem[i] = (float)(rnd() % 1000) * 1e-3f;
    size_t len;
    FILE *m = open_memstream(&st.options, &len);
    options_write(&o, m);
    fclose(m);
    if (ckpt_state_write(&st, base, err, sizeof err) != 0) FATAL("%s", err);
    free(st.options);
    free(mem);
    Buf orig = read_whole(base);
    int accepted = 0, insane = 0;
    for (int i = 0; i < n; i++) {
        int kind = i % 3;
        if (kind == 0) { // raw bytes: the container must refuse almost all
            Buf b = { 0 };
            buf_set(&b, orig.p, orig.n);
            mutate_bytes(&b, 64);
            write_file(path, &b);
            free(b.p);
        } else if (kind == 1) { // the header, its checksum recomputed
            Buf b = { 0 };
            buf_set(&b, orig.p, orig.n);
            mutate_bytes(&b, 56);
            if (b.n >= 64) {
                uint64_t h = ckpt_hash(b.p, 56);
                for (int k = 0; k < 8; k++) b.p[56 + k] = (uint8_t)(h >> (8 * k));
            }
            write_file(path, &b);
            free(b.p);
        } else { // one section's contents, every checksum valid
            CkptImage im;
            if (ckpt_image_read(&im, base, err, sizeof err) != 0) FATAL("%s", err);
            int s = (int)below((size_t)im.n);
            Buf b = { 0 };
            buf_set(&b, im.data[s], (size_t)im.sec[s].nbytes);
            if (im.sec[s].dtype == CKPT_TEXT) {
                const char *keys[] = { "vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "n_dense", "d_ff",
                                       "n_shared", "n_routed", "d_expert", "top_k", "gate", "norm_topk",
                                       "rms_eps", "init_std", "gamma-rule", "balance", "steps" };
                mutate_text(&b, keys, (int)(sizeof keys / sizeof keys[0]));
            } else if (im.sec[s].dtype == CKPT_F32 && b.n >= 4 && below(2)) { // a special float
                static const float specials[] = { NAN, INFINITY, -INFINITY, -1e-30f, -1.0f, 3.4e38f, 0.0f };
                float v = specials[below(sizeof specials / sizeof specials[0])];
                memcpy(b.p + 4 * below(b.n / 4), &v, 4);
            } else {
                mutate_bytes(&b, b.n);
            }
            size_t w = im.sec[s].dtype == CKPT_TEXT || im.sec[s].dtype == CKPT_BYTES ? 1
                       : im.sec[s].dtype == CKPT_F32 || im.sec[s].dtype == CKPT_I32 ? 4 : 8;
            b.n -= b.n % w; // the writer keeps whole elements
            ckpt_image_set(&im, s, b.p, b.n);
            if (ckpt_image_write(&im, path, err, sizeof err) != 0) FATAL("%s", err);
            ckpt_image_free(&im);
            free(b.p);
        }
        begin("checkpoint", i);
        Ckpt *ck = ckpt_open(path, err, sizeof err);
        if (!ck || ckpt_verify(ck, err, sizeof err) != 0) rejected(err, path);
        ckpt_close(ck);
        CkptState got;
        if (ckpt_state_open(&got, path, err, sizeof err) != 0) {
            rejected(err, path);
        } else {
            if (ckpt_state_load(&got, 1, err, sizeof err) != 0) {
                rejected(err, path);
            } else {
                accepted++;
                if (!state_sane(&got)) {
                    insane++;
                    printf("FAIL checkpoint mutant %d: accepted with a non-finite value or an invalid config\n", i);
                }
            }
            ckpt_state_close(&got);
        }
        alarm(0);
    }
    free(orig.p);
    check(insane == 0, "checkpoints: %d mutants (raw, header, section contents), %d accepted, all of those "
          "with a valid config and finite values", n, accepted);
}

// ---------------------------------------------------------------- tokenizers

static void fuzz_tokenizers(int n) {
    char base[300], path[300], err[2048];
    snprintf(base, sizeof base, "%s/base.tok", dir);
    snprintf(path, sizeof path, "%s/t.tok", dir);
    const char *text = "In the beginning God created the heaven and the earth. And the earth was without form, "
                       "and void; and darkness was upon the face of the deep. <|endoftext|> \xff\x00 bytes";
    size_t text_len = strlen(text) + 8;
    Tokenizer *t = tok_train(text, text_len, 300, 0);
    if (!t || tok_save(t, base, err, sizeof err) != 0) FATAL("cannot make the base tokenizer");
    tok_free(t);
    Buf orig = read_whole(base);
    int accepted = 0, broken = 0;
    for (int i = 0; i < n; i++) {
        Buf b = { 0 };
        buf_set(&b, orig.p, orig.n);
        mutate_bytes(&b, 32);
        if (i % 2 && b.n >= 4) { // with the CRC made valid again: the structure checks must hold alone
            uint32_t crc = tok_crc32(b.p, b.n - 4);
            for (int k = 0; k < 4; k++) b.p[b.n - 4 + k] = (uint8_t)(crc >> (8 * k));
        }
        write_file(path, &b);
        free(b.p);
        begin("tokenizer", i);
        Tokenizer *u = tok_load(path, err, sizeof err);
        if (!u) {
            rejected(err, path);
        } else { // a loaded tokenizer still round-trips every byte string
            accepted++;
            uint32_t *ids = NULL;
            char *back = NULL;
            size_t k = tok_encode(u, text, text_len, &ids);
            size_t m = k == TOK_ERROR ? TOK_ERROR : tok_decode(u, ids, k, &back);
            if (m != text_len || memcmp(back, text, text_len) != 0) {
                broken++;
                printf("FAIL tokenizer mutant %d: accepted, but does not round-trip the text\n", i);
            }
            free(ids);
            free(back);
            tok_free(u);
        }
        alarm(0);
    }
    free(orig.p);
    check(broken == 0, "tokenizers: %d mutants (half with a valid CRC), %d accepted, every one of them round-trips",
          n, accepted);
}

// ---------------------------------------------------------------- model and options files

static void fuzz_model_files(int n) {
    char path[300], err[2048];
    snprintf(path, sizeof path, "%s/model.cfg", dir);
    MoeConfig c;
    config_preset(&c, "tiny");
    char *text = NULL;
    size_t len;
    FILE *m = open_memstream(&text, &len);
    config_write(&c, m);
    fclose(m);
    const char *keys[] = { "vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "n_dense", "d_ff", "n_shared",
                           "n_routed", "d_expert", "top_k", "gate", "norm_topk", "route_scale", "rms_eps",
                           "rope_theta", "init_std", "tie_embeddings", "bogus" };
    int valid = 0, mismatched = 0;
    for (int i = 0; i < n; i++) {
        write_text_mutant(path, text, len, keys, (int)(sizeof keys / sizeof keys[0]));
        begin("model file", i);
        config_preset(&c, "tiny");
        if (config_load_file(&c, path, err, sizeof err) != 0) {
            rejected(err, path);
        } else if (config_validate(&c, err, sizeof err) == 0) {
            valid++; // the closed-form count against the layout's tensor by tensor sum
            ParamLayout lay;
            layout_build(&lay, &c);
            if (lay.total != config_total_params(&c)) {
                mismatched++;
                printf("FAIL model file mutant %d: layout holds %lld parameters, config counts %lld\n", i,
                       (long long)lay.total, (long long)config_total_params(&c));
            }
            layout_free(&lay);
        }
        alarm(0);
    }
    free(text);
    check(mismatched == 0, "model files: %d mutants, %d valid models, parameter counts equal to the layout's", n,
          valid);
}

static void fuzz_options_files(int n) {
    char path[300], err[2048];
    snprintf(path, sizeof path, "%s/run.opts", dir);
    TrainOptions o;
    options_default(&o);
    char *text = NULL;
    size_t len;
    FILE *m = open_memstream(&text, &len);
    options_write(&o, m);
    fprintf(m, "train-data = x.bin\n");
    fclose(m);
    const char *keys[] = { "steps", "micro-batch", "batch-tokens", "seq-len", "top-k", "lr", "lr-schedule",
                           "lr-steps", "lr-rates", "grad-clip", "gamma", "balance", "prompt", "options",
                           "ep", "resume", "--config", "n-routed", "warmup-steps", "sample-tokens" };
    int valid = 0;
    for (int i = 0; i < n; i++) {
        write_text_mutant(path, text, len, keys, (int)(sizeof keys / sizeof keys[0]));
        begin("options file", i);
        char *argv[] = { "fuzz", "--options", path, NULL };
        options_default(&o);
        // The parser prints its refusals; they are the expected answer here.
        int saved = dup(2), null = verbose ? -1 : open("/dev/null", O_WRONLY);
        if (null >= 0) dup2(null, 2);
        int rc = options_parse(&o, 3, argv, "fuzz");
        if (null >= 0) {
            fflush(stderr);
            dup2(saved, 2);
            close(null);
        }
        close(saved);
        if (rc == 0 && options_validate(&o, 1, err, sizeof err) == 0) valid++;
        alarm(0);
    }
    free(text);
    printf("options files: %d mutants, %d valid option sets\n", n, valid);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 150;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
    verbose = getenv("FUZZ_VERBOSE") != NULL;
    snprintf(dir, sizeof dir, "%s/fuzz_inputs_XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    signal(SIGALRM, on_alarm);
    printf("fuzz_inputs: %d mutants per format, seed %llu, in %s\n", n, (unsigned long long)(argc > 2 ? strtoull(argv[2], NULL, 10) : 1), dir);
    fuzz_shards(n);
    fuzz_checkpoints(n);
    fuzz_tokenizers(n);
    fuzz_model_files(n);
    fuzz_options_files(n);
    check(unnamed == 0, "every refusal names the file (%d did not)", unnamed);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", dir);
    return check_summary("fuzz_inputs");
}
