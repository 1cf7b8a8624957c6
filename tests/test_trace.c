// Tests of the router-score trace format (train/trace.c, docs/trace.md):
//  1. write then read, fp32 and bf16, all tokens and a sample: every field comes
//     back, scores bit for bit (bf16: equal to the round-to-nearest-even of the
//     fp32 value, checked against values worked out by hand), rows fed in pieces
//     (micro-batches) give the same file as one piece;
//  2. the sample: exactly M distinct rows per step, the M smallest keys (checked
//     by sorting every key), different between steps, equal for equal seeds;
//  3. a corrupt file (a flipped bit anywhere: header, record, end record) and a
//     truncated file (cut at many points) are rejected with the file's name;
//     trailing bytes and a missing end record too; --trace-unfinished reading
//     keeps the whole steps of a cut file;
//  4. the writer refuses an existing file (and leaves it unchanged), counts that
//     do not sum to K N, a missing or extra row, decreasing steps;
//  5. continuing a trace (trace_writer_resume, a resumed run): the file is cut
//     at the first record of the resumed step, whether it was finished, stopped
//     after a whole step or cut inside a record; the continued file equals one
//     written in one go, byte for byte; a trace of other settings or damaged
//     before the step is refused and left unchanged; no file: a new one;
//  6. version 2's fields (the logits flag, updates per step) come back, and a
//     version 1 file (those bytes zero) still reads as one update per step.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../train/ckpt.h" // ckpt_hash: to forge a version 1 header
#include "../train/trace.h"
#include "check.h"

static char dir[] = "/tmp/test_trace_XXXXXX";
static char path[256];

static uint64_t rng = 12345;
static double uniform(void) {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (double)((rng * 2685821657736338717ull) >> 11) * (1.0 / 9007199254740992.0);
}

enum { L = 2, E = 8, K = 2, N = 40, STEPS = 5 };
static float scores[STEPS][L][N * E]; // what a trainer would hand over
static float biases[STEPS][L * E];      // additive: any sign
static float mult_biases[STEPS][L * E]; // multiplicative: > 0
static int64_t counts[STEPS][L * E];

static void make_data(void) {
    for (int t = 0; t < STEPS; t++) {
        for (int l = 0; l < L; l++)
            for (int i = 0; i < N * E; i++) scores[t][l][i] = (float)(uniform() * 4 - 2);
        for (int i = 0; i < L * E; i++) biases[t][i] = (float)(uniform() - 0.5);
        for (int i = 0; i < L * E; i++) mult_biases[t][i] = (float)(0.5 + uniform());
        for (int l = 0; l < L; l++) { // any counts summing to K N
            int64_t left = (int64_t)K * N;
            for (int e = 0; e < E - 1; e++) {
                counts[t][l * E + e] = left / (E - e) + (e % 2);
                left -= counts[t][l * E + e];
            }
            counts[t][l * E + E - 1] = left;
        }
    }
}

// Writes the test data; pieces: rows per trace_add_scores call.
static int write_trace(const char *p, int flags, int64_t sample, int pieces, char *err, size_t len) {
    TraceHeader h = {L, E, K, flags, N, sample, 777, 1000, 1};
    TraceWriter *w = trace_writer_open(p, &h, err, len);
    if (!w) return -1;
    for (int t = 0; t < STEPS; t++) {
        trace_begin_step(w, 10 + 3 * t);
        for (int l = 0; l < L; l++)
            for (int r = 0; r < N; r += pieces) trace_add_scores(w, l, scores[t][l] + r * E, r + pieces <= N ? pieces : N - r);
        trace_end_step(w, (flags & TRACE_MULT) ? mult_biases[t] : biases[t], counts[t], N);
    }
    return trace_writer_close(w, err, len);
}

static int read_all(const char *p, int unfinished, char *err, size_t len, int *records) {
    TraceReader *r = trace_reader_open(p, unfinished, err, len);
    if (!r) return -1;
    TraceRecord rec;
    int rc;
    *records = 0;
    while ((rc = trace_next(r, &rec, err, len)) == 1) (*records)++;
    trace_reader_close(r);
    return rc;
}

static long file_size(const char *p) {
    FILE *f = fopen(p, "rb");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fclose(f);
    return n;
}

static unsigned char *slurp(const char *p, long *n) {
    *n = file_size(p);
    unsigned char *b = malloc((size_t)*n);
    FILE *f = fopen(p, "rb");
    if (fread(b, 1, (size_t)*n, f) != (size_t)*n) *n = -1;
    fclose(f);
    return b;
}

static void spill(const char *p, const unsigned char *b, long n) {
    FILE *f = fopen(p, "wb");
    fwrite(b, 1, (size_t)n, f);
    fclose(f);
}

static void test_roundtrip(void) {
    char err[512];
    // bf16 rounding by hand: 1 + 2^-8 is a tie (to even: 1), 1 + 3 * 2^-8 rounds up.
    check(trace_f32_to_bf16(1.0f) == 0x3F80 && trace_f32_to_bf16(1.0f + 1.0f / 256) == 0x3F80 &&
              trace_f32_to_bf16(1.0f + 3.0f / 256) == 0x3F82 && trace_f32_to_bf16(-2.0f) == 0xC000 &&
              isnan(trace_bf16_to_f32(trace_f32_to_bf16(NAN))) && trace_bf16_to_f32(0x3F82) == 1.0f + 2.0f / 128,
          "bf16 conversion: ties to even, round up, sign, NaN kept");
    for (int flags = 0; flags <= (TRACE_BF16 | TRACE_MULT); flags += TRACE_BF16 | TRACE_MULT)
        for (int64_t sample = N; sample >= 7; sample -= N - 7) {
            snprintf(path, sizeof(path), "%s/rt_%d_%lld.trace", dir, flags, (long long)sample);
            int wrc = write_trace(path, flags, sample, 7, err, sizeof(err));
            TraceReader *r = trace_reader_open(path, 0, err, sizeof(err));
            int bad = wrc != 0 || !r;
            if (r) {
                const TraceHeader *h = trace_reader_header(r);
                bad |= h->n_layers != L || h->E != E || h->K != K || h->flags != flags || h->tokens_per_step != N ||
                       h->sample != sample || h->seed != 777 || h->run_steps != 1000;
                unsigned char mask[N];
                TraceRecord rec;
                for (int t = 0; t < STEPS; t++) {
                    trace_sample_mask(777, 10 + 3 * t, N, sample, mask);
                    for (int l = 0; l < L; l++) {
                        if (trace_next(r, &rec, err, sizeof(err)) != 1) {
                            bad = 1;
                            continue;
                        }
                        bad |= rec.step != 10 + 3 * t || rec.layer != l || rec.n_tokens != N || rec.m != sample;
                        bad |= memcmp(rec.bias, ((flags & TRACE_MULT) ? mult_biases[t] : biases[t]) + l * E,
                                      sizeof(float) * E) != 0;
                        bad |= memcmp(rec.counts, counts[t] + l * E, sizeof(int64_t) * E) != 0;
                        int64_t k = 0;
                        for (int64_t row = 0; row < N; row++) {
                            if (!mask[row]) continue;
                            bad |= rec.rows[k] != row;
                            for (int e = 0; e < E; e++) {
                                float want = scores[t][l][row * E + e];
                                if (flags & TRACE_BF16) want = trace_bf16_to_f32(trace_f32_to_bf16(want));
                                bad |= memcmp(&rec.scores[k * E + e], &want, 4) != 0;
                            }
                            k++;
                        }
                    }
                }
                bad |= trace_next(r, &rec, err, sizeof(err)) != 0 || !trace_reader_finished(r);
                trace_reader_close(r);
            }
            check(!bad, "%s, %s tokens: every field and score read back%s", flags ? "bf16 + mult" : "fp32",
                  sample == N ? "all" : "a sample of 7 of 40", wrc ? err : "");
        }
    // Rows handed over in pieces of 1, 7 and 40 give the same bytes.
    long n1, n2, n3;
    char p1[300], p2[300], p3[300];
    snprintf(p1, sizeof(p1), "%s/piece1.trace", dir);
    snprintf(p2, sizeof(p2), "%s/piece7.trace", dir);
    snprintf(p3, sizeof(p3), "%s/piece40.trace", dir);
    write_trace(p1, 0, 9, 1, err, sizeof(err));
    write_trace(p2, 0, 9, 7, err, sizeof(err));
    write_trace(p3, 0, 9, N, err, sizeof(err));
    unsigned char *a = slurp(p1, &n1), *b = slurp(p2, &n2), *c = slurp(p3, &n3);
    check(n1 == n2 && n2 == n3 && !memcmp(a, b, (size_t)n1) && !memcmp(b, c, (size_t)n1),
          "rows added 1, 7 or 40 at a time (micro-batches) give the same file (%ld bytes)", n1);
    free(a), free(b), free(c);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void test_sample(void) {
    enum { R = 5000, M = 321 };
    unsigned char m1[R], m2[R], m3[R];
    trace_sample_mask(5, 100, R, M, m1);
    trace_sample_mask(5, 100, R, M, m2);
    trace_sample_mask(5, 101, R, M, m3);
    int count = 0, same_next = 0, ok_min = 1;
    uint64_t keys[R];
    for (int r = 0; r < R; r++) keys[r] = trace_sample_key(5, 100, r);
    qsort(keys, R, sizeof(uint64_t), cmp_u64);
    for (int r = 0; r < R; r++) {
        count += m1[r];
        same_next += m1[r] && m3[r];
        // In the sample exactly when its key is among the M smallest.
        if (m1[r] != (trace_sample_key(5, 100, r) <= keys[M - 1])) ok_min = 0;
    }
    check(count == M && ok_min && !memcmp(m1, m2, R),
          "the sample is exactly the %d rows with the smallest keys, the same for the same seed and step", M);
    check(same_next < 3 * M * M / R + 20, "the next step's sample is another one (%d rows shared, ~%d by chance)",
          same_next, M * M / R);
}

static void test_corrupt(void) {
    char err[512];
    int records;
    snprintf(path, sizeof(path), "%s/good.trace", dir);
    write_trace(path, TRACE_BF16, 11, 5, err, sizeof(err));
    long n;
    unsigned char *good = slurp(path, &n);
    char bad[300];
    snprintf(bad, sizeof(bad), "%s/bad.trace", dir);
    int rc = read_all(path, 0, err, sizeof(err), &records);
    check(rc == 0 && records == STEPS * L, "the intact file reads (%d records)", records);
    // A flipped bit at many offsets, header to end record.
    int rejected = 0, named = 0, tried = 0;
    for (long off = 0; off < n; off += off < 200 ? 7 : 97) {
        unsigned char *b = malloc((size_t)n);
        memcpy(b, good, (size_t)n);
        b[off] ^= 0x10;
        spill(bad, b, n);
        free(b);
        tried++;
        if (read_all(bad, 0, err, sizeof(err), &records) != 0) {
            rejected++;
            named += strstr(err, bad) != NULL;
        }
    }
    check(rejected == tried && named == tried, "a flipped bit is rejected at all %d offsets tried (%d), naming the file",
          tried, rejected);
    // Truncations at many lengths.
    rejected = named = tried = 0;
    for (long len = 0; len < n; len += len < 120 ? 5 : 211) {
        spill(bad, good, len);
        tried++;
        if (read_all(bad, 0, err, sizeof(err), &records) != 0) {
            rejected++;
            named += strstr(err, bad) != NULL && (strstr(err, "truncated") || strstr(err, "shorter"));
        }
    }
    check(rejected == tried && named == tried, "a file cut at %d lengths is rejected as truncated, naming the file (%d)",
          tried, rejected);
    spill(bad, good, n - 32); // whole records, no end record
    rc = read_all(bad, 0, err, sizeof(err), &records);
    check(rc != 0 && strstr(err, "no end record"), "a file without its end record is rejected: %s", err);
    rc = read_all(bad, 1, err, sizeof(err), &records);
    check(rc == 0 && records == STEPS * L, "... and read with allow_unfinished (%d records)", records);
    spill(bad, good, n - 32 - 100); // a cut record
    rc = read_all(bad, 1, err, sizeof(err), &records);
    check(rc == 0 && records == STEPS * L - 1, "allow_unfinished stops before a cut record (%d whole records)", records);
    unsigned char *longer = malloc((size_t)n + 3);
    memcpy(longer, good, (size_t)n);
    memset(longer + n, 0, 3);
    spill(bad, longer, n + 3);
    free(longer);
    rc = read_all(bad, 0, err, sizeof(err), &records);
    check(rc != 0 && strstr(err, "after the end record"), "trailing bytes are rejected: %s", err);
    snprintf(bad, sizeof(bad), "%s/missing.trace", dir);
    check(read_all(bad, 0, err, sizeof(err), &records) != 0 && strstr(err, bad), "a missing file: %s", err);
    free(good);
}

static void test_writer_refusals(void) {
    char err[512];
    snprintf(path, sizeof(path), "%s/exists.trace", dir);
    spill(path, (const unsigned char *)"keep", 4);
    TraceHeader h = {L, E, K, 0, N, N, 1, 0, 1};
    TraceWriter *w = trace_writer_open(path, &h, err, sizeof(err));
    check(!w && strstr(err, path) && file_size(path) == 4, "an existing file is refused and left as it was: %s", err);
    snprintf(path, sizeof(path), "%s/refuse.trace", dir);
    w = trace_writer_open(path, &h, err, sizeof(err));
    trace_begin_step(w, 0);
    for (int l = 0; l < L; l++) trace_add_scores(w, l, scores[0][l], N);
    int64_t wrong[L * E];
    memcpy(wrong, counts[0], sizeof(wrong));
    wrong[3]++;
    int rc = trace_end_step(w, biases[0], wrong, N);
    check(rc != 0 && strstr(trace_writer_error(w), "sum"), "counts that do not sum to K N are refused: %s",
          trace_writer_error(w));
    check(trace_writer_close(w, err, sizeof(err)) != 0, "and the close reports the error");
    remove(path);
    TraceHeader hm = {L, E, K, TRACE_MULT, N, N, 1, 0, 1};
    w = trace_writer_open(path, &hm, err, sizeof(err));
    trace_begin_step(w, 0);
    for (int l = 0; l < L; l++) trace_add_scores(w, l, scores[0][l], N);
    rc = trace_end_step(w, biases[0], counts[0], N);
    check(rc != 0 && strstr(trace_writer_error(w), "bias"), "a multiplicative bias <= 0 is refused: %s",
          trace_writer_error(w));
    trace_writer_close(w, err, sizeof(err));
    remove(path);
    w = trace_writer_open(path, &h, err, sizeof(err));
    trace_begin_step(w, 0);
    trace_add_scores(w, 0, scores[0][0], N);
    trace_add_scores(w, 1, scores[0][1], N - 1);
    rc = trace_end_step(w, biases[0], counts[0], N);
    check(rc != 0 && strstr(trace_writer_error(w), "rows"), "a missing row is refused: %s", trace_writer_error(w));
    trace_writer_close(w, err, sizeof(err));
    remove(path);
    w = trace_writer_open(path, &h, err, sizeof(err));
    trace_begin_step(w, 0);
    rc = trace_add_scores(w, 0, scores[0][0], N + 1);
    check(rc != 0, "an extra row is refused: %s", trace_writer_error(w));
    trace_writer_close(w, err, sizeof(err));
    remove(path);
    w = trace_writer_open(path, &h, err, sizeof(err));
    trace_begin_step(w, 5);
    for (int l = 0; l < L; l++) trace_add_scores(w, l, scores[0][l], N);
    trace_end_step(w, biases[0], counts[0], N);
    rc = trace_begin_step(w, 5);
    check(rc != 0 && strstr(trace_writer_error(w), "increase"), "a step that does not increase is refused: %s",
          trace_writer_error(w));
    trace_writer_close(w, err, sizeof(err));
    TraceHeader bad_h = {L, E, E + 1, 0, N, N, 1, 0, 1};
    remove(path);
    check(!trace_writer_open(path, &bad_h, err, sizeof(err)) && strstr(err, "K"), "a header with K > E is refused: %s",
          err);
}

// The steps [from, to) of the test data into w (steps 10 + 3 t, as write_trace).
static void write_steps(TraceWriter *w, int from, int to) {
    for (int t = from; t < to; t++) {
        trace_begin_step(w, 10 + 3 * t);
        for (int l = 0; l < L; l++) trace_add_scores(w, l, scores[t][l], N);
        trace_end_step(w, biases[t], counts[t], N);
    }
}

static int same_file(const char *a, const char *b) {
    long na, nb;
    unsigned char *x = slurp(a, &na), *y = slurp(b, &nb);
    int same = na == nb && na >= 0 && memcmp(x, y, (size_t)na) == 0;
    free(x), free(y);
    return same;
}

static void test_resume(void) {
    char err[512], whole[256], cont[256];
    TraceHeader h = {L, E, K, TRACE_LOGITS, N, N, 3, 1000, 1};
    snprintf(whole, sizeof(whole), "%s/whole.trace", dir);
    TraceWriter *w = trace_writer_open(whole, &h, err, sizeof(err));
    write_steps(w, 0, STEPS);
    trace_writer_close(w, err, sizeof(err));
    long n_whole;
    unsigned char *bytes = slurp(whole, &n_whole);
    long rec = (n_whole - 80 - 32) / (STEPS * L); // bytes of one record
    snprintf(cont, sizeof(cont), "%s/cont.trace", dir);
    // Stopped how: finished (end record), after step 2 (no end record), inside step 3's second record.
    const long cut_at[3] = { n_whole, 80 + 3 * L * rec, 80 + 3 * L * rec + rec + rec / 2 };
    const char *how[3] = { "a finished trace", "a trace stopped after a whole step", "a trace cut inside a record" };
    for (int k = 0; k < 3; k++) {
        spill(cont, bytes, cut_at[k]);
        // Resume at recorded step 16 (t = 2): steps 10 and 13 stay, 16 and later are written again.
        w = trace_writer_resume(cont, &h, 16, err, sizeof(err));
        int ok = w && trace_writer_steps(w) == 2;
        if (w) {
            write_steps(w, 2, STEPS);
            ok &= trace_writer_close(w, err, sizeof(err)) == 0;
        }
        check(ok && same_file(cont, whole), "resume at step 16 of %s: cut to 2 steps, continued, equal to the trace "
              "written in one go", how[k]);
    }
    // Other settings: refused, the file unchanged.
    spill(cont, bytes, n_whole);
    TraceHeader other = h;
    other.sample = N - 1;
    w = trace_writer_resume(cont, &other, 16, err, sizeof(err));
    check(!w && strstr(err, cont) && strstr(err, "sample size") && same_file(cont, whole),
          "a trace of other settings is refused and left as it was: %s", err);
    // Damaged before the resumed step: refused, unchanged.
    bytes[80 + rec + 40] ^= 1;
    spill(cont, bytes, n_whole);
    w = trace_writer_resume(cont, &h, 16, err, sizeof(err));
    long n_after;
    unsigned char *after = slurp(cont, &n_after);
    check(!w && strstr(err, "checksum") && n_after == n_whole && memcmp(after, bytes, (size_t)n_whole) == 0,
          "a trace damaged before the resumed step is refused and left as it was: %s", err);
    free(after);
    // No file yet: a new trace.
    remove(cont);
    w = trace_writer_resume(cont, &h, 16, err, sizeof(err));
    if (w) {
        write_steps(w, 0, STEPS);
        trace_writer_close(w, err, sizeof(err));
    }
    check(w && same_file(cont, whole), "resuming without a trace file starts one");
    free(bytes);
}

static void test_version(void) {
    char err[512];
    TraceHeader h = {L, E, K, TRACE_LOGITS, N, N, 3, 100, 4};
    snprintf(path, sizeof(path), "%s/v2.trace", dir);
    TraceWriter *w = trace_writer_open(path, &h, err, sizeof(err));
    write_steps(w, 0, 2);
    trace_writer_close(w, err, sizeof(err));
    TraceReader *r = trace_reader_open(path, 0, err, sizeof(err));
    check(r && trace_reader_header(r)->flags == TRACE_LOGITS && trace_reader_header(r)->updates_per_step == 4,
          "version 2: the logits flag and 4 updates per step come back");
    trace_reader_close(r);
    // The same file as version 1 (bytes 28..31 reserved, zero; no logits flag).
    long n;
    unsigned char *b = slurp(path, &n);
    uint32_t one = 1, zero = 0;
    memcpy(b + 8, &one, 4);
    memcpy(b + 12, &zero, 4);
    memcpy(b + 28, &zero, 4);
    uint64_t hash = ckpt_hash(b, 72);
    memcpy(b + 72, &hash, 8);
    spill(path, b, n);
    int records;
    r = trace_reader_open(path, 0, err, sizeof(err));
    check(r && trace_reader_header(r)->updates_per_step == 1 && trace_reader_header(r)->flags == 0 &&
              read_all(path, 0, err, sizeof(err), &records) == 0 && records == 2 * L,
          "a version 1 trace reads as one update per step");
    trace_reader_close(r);
    // Version 1 with the logits flag set: refused (version 1 had no such flag).
    uint32_t logits = TRACE_LOGITS;
    memcpy(b + 12, &logits, 4);
    hash = ckpt_hash(b, 72);
    memcpy(b + 72, &hash, 8);
    spill(path, b, n);
    r = trace_reader_open(path, 0, err, sizeof(err));
    check(!r && strstr(err, "unknown flags"), "a version 1 header with the logits flag is refused: %s", err);
    free(b);
}

int main(void) {
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    make_data();
    test_roundtrip();
    test_sample();
    test_corrupt();
    test_writer_refusals();
    test_resume();
    test_version();
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return check_summary("test_trace");
}
