// Router-score traces: the streamed writer, the checking reader, the
// deterministic token sample and bf16 conversion. Byte layout: docs/trace.md.
#include "trace.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../util/util.h"
#include "ckpt.h" // ckpt_hash: XXH64, the checksum of every part of the file

static const char TRACE_MAGIC[8] = {'M', 'O', 'E', 'T', 'R', 'A', 'C', 'E'};
enum { HEADER_BYTES = 80, RECORD_FIXED = 32, END_BYTES = 32 };
static const uint32_t REC_MAGIC = 0x43455254u; // "TREC" read as a little-endian u32
static const uint32_t END_MAGIC = 0x444e4554u; // "TEND"

// ---------------------------------------------------------------- bytes

static void put_u32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get_u32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static uint64_t get_u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

uint16_t trace_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u); // round to nearest, ties to even
    return (uint16_t)(u >> 16);
}

float trace_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static int64_t score_bytes(const TraceHeader *h) { return (h->flags & TRACE_BF16) ? 2 : 4; }
static int updates_per_step(const TraceHeader *h) { return h->updates_per_step > 0 ? h->updates_per_step : 1; }
static int sampled(const TraceHeader *h) { return h->sample < h->tokens_per_step; }

// Bytes of one record before its checksum.
static int64_t record_body_bytes(const TraceHeader *h) {
    int64_t b = RECORD_FIXED + 4 * (int64_t)h->E + 8 * (int64_t)h->E;
    if (sampled(h)) b += 8 * h->sample;
    return b + h->sample * h->E * score_bytes(h);
}

static void header_encode(const TraceHeader *h, unsigned char *p) {
    memset(p, 0, HEADER_BYTES);
    memcpy(p, TRACE_MAGIC, 8);
    put_u32(p + 8, TRACE_VERSION);
    put_u32(p + 12, (uint32_t)h->flags);
    put_u32(p + 16, (uint32_t)h->n_layers);
    put_u32(p + 20, (uint32_t)h->E);
    put_u32(p + 24, (uint32_t)h->K);
    put_u32(p + 28, (uint32_t)updates_per_step(h));
    put_u64(p + 32, (uint64_t)h->tokens_per_step);
    put_u64(p + 40, (uint64_t)h->sample);
    put_u64(p + 48, h->seed);
    put_u64(p + 56, (uint64_t)h->run_steps);
    put_u64(p + 72, ckpt_hash(p, 72));
}

// The fields a header must satisfy, whoever wrote it. "" when fine.
static const char *header_problem(const TraceHeader *h) {
    if (h->n_layers < 1) return "n_layers must be >= 1";
    if (h->E < 1 || h->K < 1 || h->K > h->E) return "needs 1 <= K <= E";
    if (h->flags & ~(TRACE_BF16 | TRACE_MULT | TRACE_LOGITS)) return "unknown flags";
    if ((h->flags & TRACE_MULT) && (h->flags & TRACE_LOGITS)) return "a multiplicative bias on logits";
    if (h->updates_per_step < 0) return "updates_per_step must be >= 1";
    if (h->tokens_per_step < 1) return "tokens_per_step must be >= 1";
    if (h->sample < 1 || h->sample > h->tokens_per_step) return "sample must be in 1..tokens_per_step";
    if (h->run_steps < 0) return "run_steps must be >= 0";
    // A record must fit in memory comfortably; 2^40 bytes is far beyond any run.
    if ((double)h->sample * h->E * 4.0 > 1099511627776.0) return "records too large";
    return "";
}

// ---------------------------------------------------------------- sample

// splitmix64's finaliser: a bijection on 64 bits that mixes every input bit.
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t trace_sample_key(uint64_t seed, int64_t step, int64_t row) {
    return mix64(mix64(mix64(seed) ^ (uint64_t)step) ^ (uint64_t)row);
}

typedef struct {
    uint64_t key;
    int64_t row;
} KeyRow;

static int keyrow_less(KeyRow a, KeyRow b) { return a.key < b.key || (a.key == b.key && a.row < b.row); }

// Reorders v so that its m smallest come first (quickselect, middle pivot).
static void keyrow_select(KeyRow *v, int64_t n, int64_t m) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        KeyRow p = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (keyrow_less(v[i], p)) i++;
            while (keyrow_less(p, v[j])) j--;
            if (i <= j) {
                KeyRow t = v[i];
                v[i++] = v[j];
                v[j--] = t;
            }
        }
        if (m - 1 <= j) hi = j;
        else if (m - 1 >= i) lo = i;
        else break;
    }
}

void trace_sample_mask(uint64_t seed, int64_t step, int64_t tokens_per_step, int64_t sample,
                       unsigned char *mask) {
    if (sample >= tokens_per_step) {
        memset(mask, 1, (size_t)tokens_per_step);
        return;
    }
    KeyRow *v = xmalloc(sizeof(KeyRow) * (size_t)tokens_per_step); // (tokens_per_step)
    for (int64_t r = 0; r < tokens_per_step; r++) v[r] = (KeyRow){trace_sample_key(seed, step, r), r};
    keyrow_select(v, tokens_per_step, sample);
    memset(mask, 0, (size_t)tokens_per_step);
    for (int64_t i = 0; i < sample; i++) mask[v[i].row] = 1;
    free(v);
}

// ---------------------------------------------------------------- writing

struct TraceWriter {
    FILE *f;
    char path[1024];
    TraceHeader h;
    char err[1024];         // first error, "" if none
    int64_t step;           // the step being recorded, -1 between steps
    int64_t last_step;      // the previous recorded step (steps must increase)
    int64_t records, steps; // written so far
    unsigned char *mask;    // (tokens_per_step) 1 for the rows of this step's sample
    int64_t *cursor;        // (n_layers) rows added to each layer this step
    int64_t *kept;          // (n_layers) sample rows kept so far
    int64_t *rows;          // (n_layers, sample) their positions
    float *scores;          // (n_layers, sample, E) their scores
    unsigned char *rec;     // one record's bytes
};

static int wfail(TraceWriter *w, const char *fmt, ...) UTIL_PRINTF(2, 3);
static int wfail(TraceWriter *w, const char *fmt, ...) {
    if (w->err[0]) return -1; // keep the first error
    int n = snprintf(w->err, sizeof(w->err), "%s: ", w->path);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof(w->err)) vsnprintf(w->err + n, sizeof(w->err) - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

// A writer around an open file positioned at its end, for header h.
static TraceWriter *writer_new(FILE *f, const char *path, const TraceHeader *h) {
    TraceWriter *w = xcalloc(1, sizeof(*w));
    w->f = f;
    snprintf(w->path, sizeof(w->path), "%s", path);
    w->h = *h;
    w->h.updates_per_step = updates_per_step(h);
    w->step = -1;
    w->last_step = INT64_MIN;
    w->mask = xmalloc((size_t)h->tokens_per_step);
    w->cursor = xcalloc((size_t)h->n_layers, sizeof(int64_t));
    w->kept = xcalloc((size_t)h->n_layers, sizeof(int64_t));
    w->rows = xmalloc(sizeof(int64_t) * (size_t)(h->n_layers * h->sample));
    w->scores = xmalloc(sizeof(float) * (size_t)(h->n_layers * h->sample * h->E));
    w->rec = xmalloc((size_t)record_body_bytes(h) + 8);
    return w;
}

static void writer_free(TraceWriter *w) {
    free(w->mask), free(w->cursor), free(w->kept), free(w->rows), free(w->scores), free(w->rec);
    free(w);
}

TraceWriter *trace_writer_open(const char *path, const TraceHeader *h, char *err, size_t errlen) {
    const char *why = header_problem(h);
    if (why[0]) {
        util_set_err(err, errlen, "%s: bad trace header: %s", path, why);
        return NULL;
    }
    // "x": never overwrite an existing trace.
    FILE *f = fopen(path, "wbx");
    if (!f) {
        util_set_err(err, errlen, "%s: cannot create trace: %s%s", path, strerror(errno),
                     errno == EEXIST ? " (remove it or choose another name)" : "");
        return NULL;
    }
    TraceWriter *w = writer_new(f, path, h);
    unsigned char hb[HEADER_BYTES];
    header_encode(&w->h, hb);
    if (fwrite(hb, 1, HEADER_BYTES, f) != HEADER_BYTES) wfail(w, "write failed: %s", strerror(errno));
    if (w->err[0]) {
        util_set_err(err, errlen, "%s", w->err);
        fclose(f);
        remove(path);
        writer_free(w);
        return NULL;
    }
    return w;
}

int64_t trace_writer_steps(const TraceWriter *w) { return w->steps; }

const char *trace_writer_error(const TraceWriter *w) { return w->err; }

int trace_begin_step(TraceWriter *w, int64_t step) {
    if (w->err[0]) return -1;
    if (w->step >= 0) return wfail(w, "trace_begin_step(%lld) before step %lld ended", (long long)step,
                                   (long long)w->step);
    if (step < 0 || step <= w->last_step)
        return wfail(w, "recorded steps must be >= 0 and increase (got %lld after %lld)", (long long)step,
                     (long long)w->last_step);
    w->step = step;
    trace_sample_mask(w->h.seed, step, w->h.tokens_per_step, w->h.sample, w->mask);
    memset(w->cursor, 0, sizeof(int64_t) * (size_t)w->h.n_layers);
    memset(w->kept, 0, sizeof(int64_t) * (size_t)w->h.n_layers);
    return 0;
}

int trace_add_scores(TraceWriter *w, int layer, const float *scores, int64_t n) {
    if (w->err[0]) return -1;
    if (w->step < 0) return wfail(w, "trace_add_scores outside a step");
    if (layer < 0 || layer >= w->h.n_layers) return wfail(w, "layer %d outside 0..%d", layer, w->h.n_layers - 1);
    if (n < 0 || w->cursor[layer] + n > w->h.tokens_per_step)
        return wfail(w, "layer %d of step %lld: more than tokens_per_step = %lld rows", layer,
                     (long long)w->step, (long long)w->h.tokens_per_step);
    int E = w->h.E;
    for (int64_t i = 0; i < n; i++) {
        int64_t row = w->cursor[layer] + i;
        if (!w->mask[row]) continue;
        for (int e = 0; e < E; e++)
            if (!isfinite(scores[i * E + e]))
                return wfail(w, "step %lld layer %d row %lld: non-finite score %g", (long long)w->step, layer,
                             (long long)row, scores[i * E + e]);
        int64_t k = layer * w->h.sample + w->kept[layer]++; // the next slot of this layer
        w->rows[k] = row;
        memcpy(w->scores + k * E, scores + i * E, sizeof(float) * (size_t)E);
    }
    w->cursor[layer] += n;
    return 0;
}

int trace_end_step(TraceWriter *w, const float *bias, const int64_t *counts, int64_t n_tokens) {
    if (w->err[0]) return -1;
    if (w->step < 0) return wfail(w, "trace_end_step outside a step");
    const TraceHeader *h = &w->h;
    int E = h->E;
    for (int l = 0; l < h->n_layers; l++) {
        if (w->cursor[l] != h->tokens_per_step)
            return wfail(w, "step %lld layer %d: got %lld score rows, expected tokens_per_step = %lld",
                         (long long)w->step, l, (long long)w->cursor[l], (long long)h->tokens_per_step);
        int64_t sum = 0;
        int negative = 0;
        for (int e = 0; e < E; e++) {
            negative |= counts[(int64_t)l * E + e] < 0;
            sum += counts[(int64_t)l * E + e];
        }
        if (n_tokens < 1 || negative || sum != (int64_t)h->K * n_tokens)
            return wfail(w, "step %lld layer %d: counts do not sum to K * n_tokens = %lld", (long long)w->step, l,
                         (long long)h->K * n_tokens);
        for (int e = 0; e < E; e++) {
            float b = bias[(int64_t)l * E + e];
            if (!isfinite(b) || ((h->flags & TRACE_MULT) && !(b > 0.0f)))
                return wfail(w, "step %lld layer %d: bias %g of expert %d is not %s", (long long)w->step, l, b, e,
                             (h->flags & TRACE_MULT) ? "finite and > 0 (multiplicative)" : "finite");
        }
    }
    int64_t body = record_body_bytes(h);
    for (int l = 0; l < h->n_layers; l++) {
        unsigned char *p = w->rec;
        put_u32(p, REC_MAGIC);
        put_u32(p + 4, (uint32_t)l);
        put_u64(p + 8, (uint64_t)w->step);
        put_u64(p + 16, (uint64_t)n_tokens);
        put_u64(p + 24, (uint64_t)h->sample);
        p += RECORD_FIXED;
        memcpy(p, bias + (int64_t)l * E, 4 * (size_t)E);
        p += 4 * E;
        memcpy(p, counts + (int64_t)l * E, 8 * (size_t)E);
        p += 8 * E;
        if (sampled(h)) {
            memcpy(p, w->rows + l * h->sample, 8 * (size_t)h->sample);
            p += 8 * h->sample;
        }
        const float *s = w->scores + (int64_t)l * h->sample * E; // (sample, E)
        if (h->flags & TRACE_BF16) {
            for (int64_t i = 0; i < h->sample * E; i++) {
                uint16_t v = trace_f32_to_bf16(s[i]);
                memcpy(p + 2 * i, &v, 2);
            }
        } else {
            memcpy(p, s, 4 * (size_t)(h->sample * E));
        }
        put_u64(w->rec + body, ckpt_hash(w->rec, (uint64_t)body));
        if (fwrite(w->rec, 1, (size_t)body + 8, w->f) != (size_t)body + 8)
            return wfail(w, "write failed: %s", strerror(errno));
        w->records++;
    }
    w->steps++;
    w->last_step = w->step;
    w->step = -1;
    return 0;
}

int trace_writer_close(TraceWriter *w, char *err, size_t errlen) {
    if (!w->err[0] && w->step >= 0) wfail(w, "closed inside step %lld", (long long)w->step);
    if (!w->err[0]) {
        unsigned char e[END_BYTES];
        memset(e, 0, sizeof(e));
        put_u32(e, END_MAGIC);
        put_u64(e + 8, (uint64_t)w->records);
        put_u64(e + 16, (uint64_t)w->steps);
        put_u64(e + 24, ckpt_hash(e, 24));
        if (fwrite(e, 1, END_BYTES, w->f) != END_BYTES || fflush(w->f) != 0 || fsync(fileno(w->f)) != 0)
            wfail(w, "write failed: %s", strerror(errno));
    }
    if (fclose(w->f) != 0) wfail(w, "close failed: %s", strerror(errno));
    int rc = w->err[0] ? -1 : 0;
    if (rc) util_set_err(err, errlen, "%s", w->err);
    writer_free(w);
    return rc;
}

// ---------------------------------------------------------------- reading

struct TraceReader {
    FILE *f;
    char path[1024];
    TraceHeader h;
    int allow_unfinished;
    int64_t file_bytes, pos;    // size, and the offset of the next record
    int64_t records, steps;     // read so far
    int64_t step;               // of the step being read
    int done;                   // end record seen, or (unfinished) the end of the whole records
    int64_t tail_bytes;         // unfinished: bytes of a cut last record, ignored
    int finished;               // the end record was read
    unsigned char *rec;         // one record's bytes
    float *bias;                // (E)
    int64_t *counts;            // (E)
    int64_t *rows;              // (sample)
    float *scores;              // (sample, E)
};

TraceReader *trace_reader_open(const char *path, int allow_unfinished, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        util_set_err(err, errlen, "%s: cannot open trace: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    unsigned char hb[HEADER_BYTES];
    const char *why = "";
    TraceHeader h;
    memset(&h, 0, sizeof(h));
    if (fstat(fileno(f), &st) != 0) why = "cannot stat";
    else if (fread(hb, 1, HEADER_BYTES, f) != HEADER_BYTES) why = "truncated: shorter than the 80-byte header";
    else if (memcmp(hb, TRACE_MAGIC, 8) != 0) why = "not a router-score trace (bad magic)";
    else if (get_u32(hb + 8) != 1 && get_u32(hb + 8) != TRACE_VERSION) why = "unsupported trace version";
    else if (get_u64(hb + 72) != ckpt_hash(hb, 72)) why = "corrupt header (checksum mismatch)";
    else {
        int v1 = get_u32(hb + 8) == 1; // version 1: no logits flag, bytes 28..31 reserved (zero)
        h.flags = (int)get_u32(hb + 12);
        h.n_layers = (int)get_u32(hb + 16);
        h.E = (int)get_u32(hb + 20);
        h.K = (int)get_u32(hb + 24);
        h.updates_per_step = v1 ? 1 : (int)get_u32(hb + 28);
        h.tokens_per_step = (int64_t)get_u64(hb + 32);
        h.sample = (int64_t)get_u64(hb + 40);
        h.seed = get_u64(hb + 48);
        h.run_steps = (int64_t)get_u64(hb + 56);
        why = header_problem(&h);
        if (!why[0] && v1 && (h.flags & TRACE_LOGITS)) why = "unknown flags";
        if (!why[0] && h.updates_per_step < 1) why = "updates_per_step must be >= 1";
    }
    if (why[0]) {
        util_set_err(err, errlen, "%s: %s", path, why);
        fclose(f);
        return NULL;
    }
    TraceReader *r = xcalloc(1, sizeof(*r));
    r->f = f;
    snprintf(r->path, sizeof(r->path), "%s", path);
    r->h = h;
    r->allow_unfinished = allow_unfinished;
    r->file_bytes = (int64_t)st.st_size;
    r->pos = HEADER_BYTES;
    r->rec = xmalloc((size_t)record_body_bytes(&h) + 8);
    r->bias = xmalloc(sizeof(float) * (size_t)h.E);
    r->counts = xmalloc(sizeof(int64_t) * (size_t)h.E);
    r->rows = xmalloc(sizeof(int64_t) * (size_t)h.sample);
    r->scores = xmalloc(sizeof(float) * (size_t)(h.sample * h.E));
    return r;
}

const TraceHeader *trace_reader_header(const TraceReader *r) { return &r->h; }
int trace_reader_finished(const TraceReader *r) { return r->finished; }
int64_t trace_reader_tail_bytes(const TraceReader *r) { return r->tail_bytes; }

void trace_reader_close(TraceReader *r) {
    if (!r) return;
    fclose(r->f);
    free(r->rec), free(r->bias), free(r->counts), free(r->rows), free(r->scores);
    free(r);
}

// Reads n bytes at the current position; a short read is a truncation.
static int read_exact(TraceReader *r, void *p, int64_t n) { return fread(p, 1, (size_t)n, r->f) == (size_t)n; }

int trace_next(TraceReader *r, TraceRecord *rec, char *err, size_t errlen) {
    const TraceHeader *h = &r->h;
    int E = h->E, L = h->n_layers;
    if (r->done) return 0;
    long long idx = (long long)r->records;
    if (r->pos == r->file_bytes) {
        if (r->allow_unfinished) {
            r->done = 1;
            return 0;
        }
        util_set_err(err, errlen, "%s: truncated: no end record after %lld records (the writer did not finish)%s",
                     r->path, idx, r->records % L ? ", and the last step is incomplete" : "");
        return -1;
    }
    unsigned char *p = r->rec;
    if (!read_exact(r, p, 4)) {
        if (r->allow_unfinished) {
            r->tail_bytes = r->file_bytes - r->pos;
            r->done = 1;
            return 0;
        }
        util_set_err(err, errlen, "%s: truncated inside record %lld at byte %lld", r->path, idx, (long long)r->pos);
        return -1;
    }
    uint32_t magic = get_u32(p);
    if (magic == END_MAGIC) {
        if (!read_exact(r, p + 4, END_BYTES - 4)) {
            util_set_err(err, errlen, "%s: truncated inside the end record", r->path);
            return -1;
        }
        if (get_u64(p + 24) != ckpt_hash(p, 24)) {
            util_set_err(err, errlen, "%s: corrupt end record (checksum mismatch)", r->path);
            return -1;
        }
        if ((int64_t)get_u64(p + 8) != r->records || (int64_t)get_u64(p + 16) != r->steps) {
            util_set_err(err, errlen, "%s: the end record counts %lld records, the file holds %lld", r->path,
                         (long long)get_u64(p + 8), idx);
            return -1;
        }
        if (r->pos + END_BYTES != r->file_bytes) {
            util_set_err(err, errlen, "%s: %lld bytes after the end record", r->path,
                         (long long)(r->file_bytes - r->pos - END_BYTES));
            return -1;
        }
        r->done = 1;
        r->finished = 1;
        return 0;
    }
    if (magic != REC_MAGIC) {
        util_set_err(err, errlen, "%s: corrupt: record %lld at byte %lld has no record magic", r->path, idx,
                     (long long)r->pos);
        return -1;
    }
    int64_t body = record_body_bytes(h);
    if (r->pos + body + 8 > r->file_bytes || !read_exact(r, p + 4, body + 4)) {
        if (r->allow_unfinished) { // a writer stopped mid-record: the whole records before it stand
            r->tail_bytes = r->file_bytes - r->pos;
            r->done = 1;
            return 0;
        }
        util_set_err(err, errlen, "%s: truncated: record %lld needs bytes %lld..%lld, the file has %lld", r->path,
                     idx, (long long)r->pos, (long long)(r->pos + body + 8), (long long)r->file_bytes);
        return -1;
    }
    if (get_u64(p + body) != ckpt_hash(p, (uint64_t)body)) {
        util_set_err(err, errlen, "%s: corrupt: record %lld (byte %lld) fails its checksum", r->path, idx,
                     (long long)r->pos);
        return -1;
    }
    // The checksum holds; now what the writer guarantees about the contents.
    int layer = (int)get_u32(p + 4);
    int64_t step = (int64_t)get_u64(p + 8), n_tokens = (int64_t)get_u64(p + 16), m = (int64_t)get_u64(p + 24);
    const char *why = "";
    if (layer != (int)(r->records % L)) why = "layers out of order";
    else if (layer == 0 && r->records > 0 && step <= r->step) why = "steps do not increase";
    else if (layer > 0 && step != r->step) why = "a step's layers carry different steps";
    else if (step < 0) why = "negative step";
    else if (m != h->sample) why = "row count differs from the header's sample";
    if (why[0]) {
        util_set_err(err, errlen, "%s: corrupt: record %lld: %s", r->path, idx, why);
        return -1;
    }
    const unsigned char *q = p + RECORD_FIXED;
    memcpy(r->bias, q, 4 * (size_t)E);
    q += 4 * E;
    memcpy(r->counts, q, 8 * (size_t)E);
    q += 8 * E;
    int64_t sum = 0;
    int negative = 0;
    for (int e = 0; e < E; e++) {
        negative |= r->counts[e] < 0;
        sum += r->counts[e];
        if (!isfinite(r->bias[e]) || ((h->flags & TRACE_MULT) && !(r->bias[e] > 0.0f))) why = "bad bias value";
    }
    if (n_tokens < 1 || negative || sum != (int64_t)h->K * n_tokens) why = "counts do not sum to K * n_tokens";
    if (sampled(h)) {
        memcpy(r->rows, q, 8 * (size_t)m);
        q += 8 * m;
        for (int64_t i = 0; i < m; i++)
            if (r->rows[i] < 0 || r->rows[i] >= h->tokens_per_step || (i > 0 && r->rows[i] <= r->rows[i - 1]))
                why = "sample rows not increasing within 0..tokens_per_step-1";
    } else {
        for (int64_t i = 0; i < m; i++) r->rows[i] = i;
    }
    if (h->flags & TRACE_BF16) {
        for (int64_t i = 0; i < m * E; i++) {
            uint16_t v;
            memcpy(&v, q + 2 * i, 2);
            r->scores[i] = trace_bf16_to_f32(v);
        }
    } else {
        memcpy(r->scores, q, 4 * (size_t)(m * E));
    }
    for (int64_t i = 0; i < m * E && !why[0]; i++)
        if (!isfinite(r->scores[i])) why = "non-finite score";
    if (why[0]) {
        util_set_err(err, errlen, "%s: corrupt: record %lld (step %lld, layer %d): %s", r->path, idx,
                     (long long)step, layer, why);
        return -1;
    }
    r->pos += body + 8;
    r->records++;
    if (layer == L - 1) r->steps++;
    r->step = step;
    rec->step = step;
    rec->layer = layer;
    rec->n_tokens = n_tokens;
    rec->m = m;
    rec->bias = r->bias;
    rec->counts = r->counts;
    rec->rows = r->rows;
    rec->scores = r->scores;
    return 1;
}

// ---------------------------------------------------------------- continuing

// The header fields in which a and b differ, as a comma-separated list. "" if none.
static void header_diff(const TraceHeader *a, const TraceHeader *b, char *out, size_t len) {
    out[0] = '\0';
    size_t pos = 0;
#define DIFF(field, name) \
    if (a->field != b->field && pos < len) pos += (size_t)snprintf(out + pos, len - pos, "%s%s", pos ? ", " : "", name)
    DIFF(n_layers, "MoE layers");
    DIFF(E, "experts");
    DIFF(K, "top-k");
    DIFF(flags, "flags (dtype, bias rule or bias space)");
    DIFF(tokens_per_step, "tokens per step");
    DIFF(sample, "sample size");
    DIFF(seed, "sample seed");
    DIFF(run_steps, "run length");
    DIFF(updates_per_step, "updates per step");
#undef DIFF
}

TraceWriter *trace_writer_resume(const char *path, const TraceHeader *h, int64_t from_step, char *err,
                                 size_t errlen) {
    struct stat st;
    if (stat(path, &st) != 0 && errno == ENOENT) return trace_writer_open(path, h, err, errlen);
    TraceHeader want = *h;
    want.updates_per_step = updates_per_step(h);
    const char *why = header_problem(&want);
    if (why[0]) {
        util_set_err(err, errlen, "%s: bad trace header: %s", path, why);
        return NULL;
    }
    TraceReader *r = trace_reader_open(path, 1, err, errlen);
    if (!r) return NULL;
    char diff[256];
    header_diff(&r->h, &want, diff, sizeof(diff));
    if (diff[0]) {
        util_set_err(err, errlen, "%s: cannot continue this trace: it differs from this run in %s (remove it or "
                     "choose another name)", path, diff);
        trace_reader_close(r);
        return NULL;
    }
    // Whole steps before from_step stay; the file is cut after the last of them.
    int64_t cut = HEADER_BYTES, last = INT64_MIN, records = 0, steps = 0;
    TraceRecord rec;
    int rc;
    while ((rc = trace_next(r, &rec, err, errlen)) == 1 && rec.step < from_step) {
        if (rec.layer == r->h.n_layers - 1) {
            cut = r->pos;
            last = rec.step;
            records = r->records;
            steps = r->steps;
        }
    }
    trace_reader_close(r);
    if (rc < 0) return NULL; // damaged: the message names the file; nothing was changed
    FILE *f = fopen(path, "r+b");
    if (!f || ftruncate(fileno(f), (off_t)cut) != 0 || fseeko(f, (off_t)cut, SEEK_SET) != 0) {
        util_set_err(err, errlen, "%s: cannot continue the trace: %s", path, strerror(errno));
        if (f) fclose(f);
        return NULL;
    }
    TraceWriter *w = writer_new(f, path, &want);
    w->last_step = last;
    w->records = records;
    w->steps = steps;
    return w;
}
