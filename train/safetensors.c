// safetensors reader and writer (format and guarantees in safetensors.h and
// docs/hf.md). The header is parsed with the tokenizer's JSON parser.
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L  // fseeko, ftello, fileno, fsync, open_memstream
#endif

#include "safetensors.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "../tokenizer/tok_json.h"
#include "../util/util.h"

// ---------------------------------------------------------------- dtypes

static const struct { const char *name; size_t size; } st_dtypes[ST_NDTYPES] = {
    [ST_F64] = { "F64", 8 }, [ST_F32] = { "F32", 4 }, [ST_F16] = { "F16", 2 }, [ST_BF16] = { "BF16", 2 },
    [ST_I64] = { "I64", 8 }, [ST_I32] = { "I32", 4 }, [ST_I16] = { "I16", 2 }, [ST_I8] = { "I8", 1 },
    [ST_U64] = { "U64", 8 }, [ST_U32] = { "U32", 4 }, [ST_U16] = { "U16", 2 }, [ST_U8] = { "U8", 1 },
    [ST_BOOL] = { "BOOL", 1 },
};

const char *st_dtype_name(StDtype d) { return (unsigned)d < ST_NDTYPES ? st_dtypes[d].name : "?"; }
size_t st_dtype_size(StDtype d) { return (unsigned)d < ST_NDTYPES ? st_dtypes[d].size : 0; }

static int st_dtype_parse(const char *s, StDtype *d) {
    for (int i = 0; i < ST_NDTYPES; i++)
        if (strcmp(s, st_dtypes[i].name) == 0) {
            *d = (StDtype)i;
            return 0;
        }
    return -1;
}

uint16_t st_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) return (uint16_t)(u >> 16 | 0x0040); // quiet NaN
    // Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit.
    u += 0x7FFFu + (u >> 16 & 1);
    return (uint16_t)(u >> 16);
}

float st_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

// IEEE half to float, exactly (every half is a float).
static float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = h >> 10 & 0x1F, man = h & 0x3FF, u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | man << 13; // inf, NaN
    } else if (exp != 0) {
        u = sign | (exp + 112) << 23 | man << 13; // normal: rebias 15 -> 127
    } else if (man == 0) {
        u = sign; // zero
    } else {
        // Subnormal half: shift the mantissa up until its leading bit is the implicit one.
        int e = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            e--;
        }
        u = sign | (uint32_t)e << 23 | (man & 0x3FF) << 13;
    }
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static uint64_t get_le64(const unsigned char *p) {
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--) x = x << 8 | p[i];
    return x;
}

// ---------------------------------------------------------------- reading

struct StFile {
    char *path;
    FILE *f;
    uint64_t data_start;  // 8 + header length
    int n;
    StTensor *t;          // (n) in header order
    int n_meta;
    char **meta;          // (2 n_meta) key, value, ...
};

const char *st_path(const StFile *f) { return f->path; }
int st_count(const StFile *f) { return f->n; }
const StTensor *st_tensor(const StFile *f, int i) { return i >= 0 && i < f->n ? &f->t[i] : NULL; }

const StTensor *st_find(const StFile *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->t[i].name, name) == 0) return &f->t[i];
    return NULL;
}

const char *st_metadata(const StFile *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[2 * i], key) == 0) return f->meta[2 * i + 1];
    return NULL;
}

void st_close(StFile *f) {
    if (!f) return;
    if (f->f) fclose(f->f);
    for (int i = 0; i < f->n; i++) free(f->t[i].name);
    for (int i = 0; i < 2 * f->n_meta; i++) free(f->meta[i]);
    free(f->t);
    free(f->meta);
    free(f->path);
    free(f);
}

// A JSON number that is an integer in [0, 2^53] (exact in a double).
static int st_json_uint(const TokJson *v, uint64_t *out) {
    if (!v || v->type != TOK_JSON_NUMBER || v->num < 0 || v->num > 9007199254740992.0 ||
        v->num != (double)(uint64_t)v->num)
        return -1;
    *out = (uint64_t)v->num;
    return 0;
}

// One header entry into *t. Returns 0, or -1 with a message.
static int st_parse_entry(const char *path, const char *name, const TokJson *v, StTensor *t, char *err,
                          size_t errlen) {
    const TokJson *dt = tok_json_get(v, "dtype"), *sh = tok_json_get(v, "shape");
    const TokJson *off = tok_json_get(v, "data_offsets");
    if (!v || v->type != TOK_JSON_OBJECT) {
        util_set_err(err, errlen, "%s: header entry '%s' is not an object", path, name);
        return -1;
    }
    if (!dt || dt->type != TOK_JSON_STRING || st_dtype_parse(dt->str, &t->dtype) != 0) {
        util_set_err(err, errlen, "%s: tensor '%s': unknown dtype %s%s%s", path, name, dt && dt->str ? "'" : "",
                     dt && dt->str ? dt->str : "(missing or not a string)", dt && dt->str ? "'" : "");
        return -1;
    }
    if (!sh || sh->type != TOK_JSON_ARRAY || sh->len > ST_MAX_DIMS) {
        util_set_err(err, errlen, "%s: tensor '%s': shape is not an array of at most %d sizes", path, name,
                     ST_MAX_DIMS);
        return -1;
    }
    t->ndim = (int)sh->len;
    // numel and the byte count stay below 2^62: no size of a real file comes near.
    uint64_t numel = 1, limit = (uint64_t)1 << 62;
    for (int i = 0; i < t->ndim; i++) {
        uint64_t s;
        if (st_json_uint(&sh->items[i], &s) != 0) {
            util_set_err(err, errlen, "%s: tensor '%s': shape[%d] is not a non-negative integer", path, name, i);
            return -1;
        }
        if (s != 0 && numel > limit / s) {
            util_set_err(err, errlen, "%s: tensor '%s': shape is too large", path, name);
            return -1;
        }
        numel *= s;
        t->shape[i] = (int64_t)s;
    }
    if (numel > limit / st_dtype_size(t->dtype)) {
        util_set_err(err, errlen, "%s: tensor '%s': shape is too large", path, name);
        return -1;
    }
    t->numel = (int64_t)numel;
    if (!off || off->type != TOK_JSON_ARRAY || off->len != 2 || st_json_uint(&off->items[0], &t->begin) != 0 ||
        st_json_uint(&off->items[1], &t->end) != 0) {
        util_set_err(err, errlen, "%s: tensor '%s': data_offsets is not [begin, end] of non-negative integers",
                     path, name);
        return -1;
    }
    uint64_t want = numel * st_dtype_size(t->dtype);
    if (t->end < t->begin || t->end - t->begin != want) {
        util_set_err(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] do not hold %s x %llu elements "
                     "(%llu bytes)", path, name, (unsigned long long)t->begin, (unsigned long long)t->end,
                     st_dtype_name(t->dtype), (unsigned long long)numel, (unsigned long long)want);
        return -1;
    }
    return 0;
}

static int st_cmp_name(const void *a, const void *b) {
    return strcmp((*(const StTensor *const *)a)->name, (*(const StTensor *const *)b)->name);
}

static int st_cmp_range(const void *a, const void *b) {
    const StTensor *x = *(const StTensor *const *)a, *y = *(const StTensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

// Names unique; byte ranges tiling [0, data_bytes) without gap or overlap.
static int st_check_layout(StFile *sf, uint64_t data_bytes, char *err, size_t errlen) {
    StTensor **by = xcalloc((size_t)sf->n + 1, sizeof *by);
    int rc = 0;
    for (int i = 0; i < sf->n; i++) by[i] = &sf->t[i];
    qsort(by, (size_t)sf->n, sizeof *by, st_cmp_name);
    for (int i = 1; i < sf->n && rc == 0; i++)
        if (strcmp(by[i - 1]->name, by[i]->name) == 0) {
            util_set_err(err, errlen, "%s: tensor name '%s' appears twice in the header", sf->path, by[i]->name);
            rc = -1;
        }
    qsort(by, (size_t)sf->n, sizeof *by, st_cmp_range);
    uint64_t pos = 0; // end of the tensors so far, in offset order
    for (int i = 0; i < sf->n && rc == 0; i++) {
        if (by[i]->begin != pos) {
            util_set_err(err, errlen, "%s: tensor '%s' starts at data byte %llu, but %s", sf->path, by[i]->name,
                         (unsigned long long)by[i]->begin,
                         by[i]->begin < pos ? "it overlaps the tensor before it" : "bytes before it belong to no tensor");
            rc = -1;
        }
        pos = by[i]->end;
    }
    if (rc == 0 && pos > data_bytes) {
        util_set_err(err, errlen, "%s: truncated: the tensors need %llu data bytes, the file holds %llu", sf->path,
                     (unsigned long long)pos, (unsigned long long)data_bytes);
        rc = -1;
    } else if (rc == 0 && pos < data_bytes) {
        util_set_err(err, errlen, "%s: %llu bytes after the last tensor belong to no tensor", sf->path,
                     (unsigned long long)(data_bytes - pos));
        rc = -1;
    }
    free(by);
    return rc;
}

// Parses the header JSON into sf (tensors and metadata).
static int st_parse_header(StFile *sf, const char *text, size_t len, char *err, size_t errlen) {
    size_t first = 0;
    while (first < len && text[first] == ' ') first++;
    if (first == len || text[first] != '{') {
        util_set_err(err, errlen, "%s: the header is not a JSON object", sf->path);
        return -1;
    }
    char jerr[200];
    TokJson *root = tok_json_parse(text, len, jerr, sizeof jerr);
    if (!root) {
        util_set_err(err, errlen, "%s: the header is not valid JSON: %s", sf->path, jerr);
        return -1;
    }
    int rc = 0;
    sf->t = xcalloc(root->len + 1, sizeof *sf->t);
    for (size_t i = 0; i < root->len && rc == 0; i++) {
        const char *key = root->keys[i];
        const TokJson *v = &root->items[i];
        if (strcmp(key, "__metadata__") == 0) {
            if (v->type != TOK_JSON_OBJECT || sf->meta) {
                util_set_err(err, errlen, "%s: __metadata__ is not one object of strings", sf->path);
                rc = -1;
                break;
            }
            sf->meta = xcalloc(2 * v->len + 1, sizeof *sf->meta);
            for (size_t j = 0; j < v->len && rc == 0; j++) {
                if (v->items[j].type != TOK_JSON_STRING) {
                    util_set_err(err, errlen, "%s: __metadata__ value '%s' is not a string", sf->path, v->keys[j]);
                    rc = -1;
                    break;
                }
                sf->meta[2 * j] = xmalloc(v->key_lens[j] + 1);
                memcpy(sf->meta[2 * j], v->keys[j], v->key_lens[j] + 1);
                sf->meta[2 * j + 1] = xmalloc(v->items[j].len + 1);
                memcpy(sf->meta[2 * j + 1], v->items[j].str, v->items[j].len + 1);
                sf->n_meta++;
            }
            continue;
        }
        if (root->key_lens[i] == 0 || strlen(key) != root->key_lens[i]) {
            util_set_err(err, errlen, "%s: a tensor name is empty or holds a NUL character", sf->path);
            rc = -1;
            break;
        }
        StTensor *t = &sf->t[sf->n];
        if (st_parse_entry(sf->path, key, v, t, err, errlen) != 0) {
            rc = -1;
            break;
        }
        t->name = xmalloc(root->key_lens[i] + 1);
        memcpy(t->name, key, root->key_lens[i] + 1);
        sf->n++;
    }
    tok_json_free(root);
    return rc;
}

StFile *st_open(const char *path, char *err, size_t errlen) {
    StFile *sf = xcalloc(1, sizeof *sf);
    sf->path = xmalloc(strlen(path) + 1);
    strcpy(sf->path, path);
    char *text = NULL;
    sf->f = fopen(path, "rb");
    if (!sf->f) {
        util_set_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    off_t size;
    if (fseeko(sf->f, 0, SEEK_END) != 0 || (size = ftello(sf->f)) < 0 || fseeko(sf->f, 0, SEEK_SET) != 0) {
        util_set_err(err, errlen, "%s: cannot seek: %s", path, strerror(errno));
        goto fail;
    }
    unsigned char lenbuf[8];
    if (size < 8 || fread(lenbuf, 1, 8, sf->f) != 8) {
        util_set_err(err, errlen, "%s: truncated: %lld bytes, shorter than the 8-byte header length", path,
                     (long long)size);
        goto fail;
    }
    uint64_t n = get_le64(lenbuf);
    if (n > ST_MAX_HEADER) {
        util_set_err(err, errlen, "%s: header length %llu exceeds the format's limit of %llu bytes (not a "
                     "safetensors file?)", path, (unsigned long long)n, (unsigned long long)ST_MAX_HEADER);
        goto fail;
    }
    if (n > (uint64_t)size - 8) {
        util_set_err(err, errlen, "%s: truncated: the header needs %llu bytes, the file has %llu after the length",
                     path, (unsigned long long)n, (unsigned long long)size - 8);
        goto fail;
    }
    text = xmalloc((size_t)n + 1);
    if (fread(text, 1, (size_t)n, sf->f) != n) {
        util_set_err(err, errlen, "%s: read error in the header: %s", path, strerror(errno));
        goto fail;
    }
    if (st_parse_header(sf, text, (size_t)n, err, errlen) != 0) goto fail;
    sf->data_start = 8 + n;
    if (st_check_layout(sf, (uint64_t)size - sf->data_start, err, errlen) != 0) goto fail;
    free(text);
    return sf;
fail:
    free(text);
    st_close(sf);
    return NULL;
}

int st_read_f32(StFile *f, const StTensor *t, float *out, char *err, size_t errlen) {
    if (t->dtype != ST_F32 && t->dtype != ST_BF16 && t->dtype != ST_F16) {
        util_set_err(err, errlen, "%s: tensor '%s' has dtype %s; F32, BF16 or F16 expected", f->path, t->name,
                     st_dtype_name(t->dtype));
        return -1;
    }
    size_t bytes = (size_t)(t->end - t->begin);
    // F32 lands in place; the 2-byte types are read into the upper half of out, then widened front to back.
    unsigned char *raw = t->dtype == ST_F32 ? (unsigned char *)out : (unsigned char *)(out + t->numel) - bytes;
    errno = 0;
    if (fseeko(f->f, (off_t)(f->data_start + t->begin), SEEK_SET) != 0 ||
        (bytes > 0 && fread(raw, 1, bytes, f->f) != bytes)) {
        util_set_err(err, errlen, "%s: reading tensor '%s': %s", f->path, t->name,
                     errno ? strerror(errno) : "file ended early");
        return -1;
    }
    if (t->dtype == ST_F32) return 0;
    for (int64_t i = 0; i < t->numel; i++) {
        uint16_t h = (uint16_t)(raw[2 * i] | raw[2 * i + 1] << 8);
        out[i] = t->dtype == ST_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
    }
    return 0;
}

// ---------------------------------------------------------------- writing

struct StWriter {
    char *path, *tmp;
    FILE *f;
    uint64_t declared, written; // tensor data bytes
    int failed;
    char err[512];
};

uint64_t st_spec_bytes(const StSpec *s) {
    uint64_t n = st_dtype_size(s->dtype);
    for (int i = 0; i < s->ndim; i++) n *= (uint64_t)s->shape[i];
    return n;
}

static int st_wfail(StWriter *w, const char *what) {
    if (!w->failed) snprintf(w->err, sizeof w->err, "%s: %s: %s", w->tmp, what, strerror(errno));
    w->failed = 1;
    return -1;
}

static int st_cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

// Checks the specs (names non-empty, unique, not "__metadata__"; known dtypes;
// sizes >= 0) and writes the header JSON into a new buffer, padded to 8 bytes.
static char *st_header(const StSpec *specs, int n, const char *const *meta, int n_meta, size_t *len,
                       const char *path, char *err, size_t errlen) {
    for (int i = 0; i < n; i++) {
        const StSpec *s = &specs[i];
        int bad_shape = s->ndim < 0 || s->ndim > ST_MAX_DIMS;
        for (int k = 0; !bad_shape && k < s->ndim; k++) bad_shape = s->shape[k] < 0;
        const char *why = !s->name[0] || strcmp(s->name, "__metadata__") == 0 ? "a reserved or empty name"
                          : (unsigned)s->dtype >= ST_NDTYPES                ? "an unknown dtype"
                          : bad_shape                                       ? "a bad shape"
                                                                            : NULL;
        if (why) {
            util_set_err(err, errlen, "%s: tensor '%s' has %s", path, s->name, why);
            return NULL;
        }
    }
    const char **names = xcalloc((size_t)n + 1, sizeof *names);
    for (int i = 0; i < n; i++) names[i] = specs[i].name;
    qsort(names, (size_t)n, sizeof *names, st_cmp_str);
    for (int i = 1; i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0) {
            util_set_err(err, errlen, "%s: tensor name '%s' is used twice", path, names[i]);
            free(names);
            return NULL;
        }
    free(names);
    char *buf = NULL;
    size_t blen = 0;
    FILE *m = open_memstream(&buf, &blen);
    if (!m) FATAL("out of memory building a safetensors header");
    int bad = 0;
    fputc('{', m);
    if (n_meta > 0) {
        fputs("\"__metadata__\":{", m);
        for (int i = 0; i < n_meta; i++) {
            if (i) fputc(',', m);
            bad |= tok_json_put_string(m, meta[2 * i], strlen(meta[2 * i]));
            fputc(':', m);
            bad |= tok_json_put_string(m, meta[2 * i + 1], strlen(meta[2 * i + 1]));
        }
        fputc('}', m);
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const StSpec *s = &specs[i];
        if (i || n_meta > 0) fputc(',', m);
        bad |= tok_json_put_string(m, s->name, strlen(s->name));
        fprintf(m, ":{\"dtype\":\"%s\",\"shape\":[", st_dtype_name(s->dtype));
        for (int k = 0; k < s->ndim; k++) fprintf(m, "%s%lld", k ? "," : "", (long long)s->shape[k]);
        uint64_t bytes = st_spec_bytes(s);
        fprintf(m, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off, (unsigned long long)(off + bytes));
        off += bytes;
    }
    fputc('}', m);
    // Spaces after the JSON are part of the header: the data start 8-byte aligned.
    for (long pad = (8 - ftell(m) % 8) % 8; pad > 0; pad--) fputc(' ', m);
    if (fclose(m) != 0) FATAL("out of memory building a safetensors header");
    if (bad) {
        util_set_err(err, errlen, "%s: a tensor name or metadata string is not valid UTF-8", path);
        free(buf);
        return NULL;
    }
    *len = blen;
    return buf;
}

StWriter *st_writer_open(const char *path, const StSpec *specs, int n, const char *const *meta, int n_meta,
                         char *err, size_t errlen) {
    size_t hlen;
    char *header = st_header(specs, n, meta, n_meta, &hlen, path, err, errlen);
    if (!header) return NULL;
    StWriter *w = xcalloc(1, sizeof *w);
    w->path = xmalloc(strlen(path) + 1);
    strcpy(w->path, path);
    w->tmp = xmalloc(strlen(path) + 5);
    sprintf(w->tmp, "%s.tmp", path);
    for (int i = 0; i < n; i++) w->declared += st_spec_bytes(&specs[i]);
    w->f = fopen(w->tmp, "wb");
    unsigned char lenbuf[8];
    for (int i = 0; i < 8; i++) lenbuf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    if (!w->f || fwrite(lenbuf, 1, 8, w->f) != 8 || fwrite(header, 1, hlen, w->f) != hlen) {
        util_set_err(err, errlen, "%s: cannot write: %s", w->tmp, strerror(errno));
        free(header);
        st_writer_abort(w);
        return NULL;
    }
    free(header);
    return w;
}

int st_writer_append(StWriter *w, const void *data, size_t nbytes) {
    if (w->failed) return -1;
    if (nbytes > w->declared - w->written) {
        errno = EINVAL;
        return st_wfail(w, "more tensor bytes than the header declares");
    }
    if (nbytes > 0 && fwrite(data, 1, nbytes, w->f) != nbytes) return st_wfail(w, "write failed");
    w->written += nbytes;
    return 0;
}

static void st_writer_free(StWriter *w) {
    free(w->path);
    free(w->tmp);
    free(w);
}

void st_writer_abort(StWriter *w) {
    if (!w) return;
    if (w->f) fclose(w->f);
    unlink(w->tmp);
    st_writer_free(w);
}

int st_writer_commit(StWriter *w, char *err, size_t errlen) {
    if (!w->failed && w->written != w->declared) {
        errno = EINVAL;
        st_wfail(w, "fewer tensor bytes than the header declares");
    }
    // The bytes are on disk before the name points at them.
    if (!w->failed && (fflush(w->f) != 0 || fsync(fileno(w->f)) != 0)) st_wfail(w, "write failed");
    int close_rc = fclose(w->f);
    w->f = NULL;
    if (!w->failed && close_rc != 0) st_wfail(w, "close failed");
    if (!w->failed && rename(w->tmp, w->path) != 0) st_wfail(w, "rename failed");
    if (w->failed) {
        util_set_err(err, errlen, "%s (%s left as it was)", w->err, w->path);
        st_writer_abort(w);
        return -1;
    }
    st_writer_free(w);
    return 0;
}
