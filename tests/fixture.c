// Fixture reader: parses and validates the named-tensor file format of
// docs/fixtures.md ("MOEFIXT1", version 1). Integers in the file are
// little-endian; they are decoded byte by byte, so the reader works on any host.
#include "fixture.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/route.h"

#define FIXTURE_MAGIC "MOEFIXT1"
#define FIXTURE_VERSION 1
#define FIXTURE_MAX_NAME 4096

size_t fixture_dtype_size(FixtureDtype dt) {
    switch (dt) {
    case FIX_F32: return 4;
    case FIX_F64: return 8;
    case FIX_I32: return 4;
    case FIX_U8: return 1;
    }
    return 0;
}

static uint64_t fixture_le(const unsigned char *p, int nbytes) {
    uint64_t v = 0;
    for (int i = nbytes - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static int fixture_host_is_little(void) {
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

// Reads the whole file into a malloc'd buffer. Returns NULL with err set.
static unsigned char *fixture_slurp(const char *path, size_t *len, char *err, size_t errlen) {
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        snprintf(err, errlen, "cannot open fixture %s: %s", path, strerror(errno));
        return NULL;
    }
    unsigned char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n == cap) {
            cap = cap ? 2 * cap : 1 << 16;
            unsigned char *nb = realloc(buf, cap);
            if (!nb) {
                snprintf(err, errlen, "out of memory reading fixture %s", path);
                free(buf);
                fclose(fp);
                return NULL;
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n, fp);
        n += got;
        if (got == 0) break;
    }
    if (ferror(fp)) {
        snprintf(err, errlen, "error reading fixture %s", path);
        free(buf);
        fclose(fp);
        return NULL;
    }
    fclose(fp);
    *len = n;
    return buf;
}

void fixture_free(Fixture *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) {
        free(f->entries[i].name);
        free(f->entries[i].data);
    }
    free(f->entries);
    free(f->path);
    free(f);
}

Fixture *fixture_load(const char *path, char *err, size_t errlen) {
    size_t len = 0;
    unsigned char *buf = fixture_slurp(path, &len, err, errlen);
    if (!buf) return NULL;
    Fixture *f = calloc(1, sizeof *f);
    if (f) f->path = malloc(strlen(path) + 1);
    if (!f || !f->path) {
        snprintf(err, errlen, "out of memory loading fixture %s", path);
        goto fail;
    }
    strcpy(f->path, path);

    // Header: magic (8), version (u32), entry count (u32).
    size_t pos = 0;
#define NEED(nbytes, what)                                                                         \
    do {                                                                                           \
        if ((uint64_t)(nbytes) > (uint64_t)(len - pos)) {                                          \
            snprintf(err, errlen, "fixture %s: truncated at byte %zu (reading %s)", path, pos, what); \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)
    NEED(16, "the header");
    if (memcmp(buf, FIXTURE_MAGIC, 8) != 0) {
        snprintf(err, errlen, "fixture %s: bad magic (not a MOEFIXT1 file)", path);
        goto fail;
    }
    uint32_t version = (uint32_t)fixture_le(buf + 8, 4);
    if (version != FIXTURE_VERSION) {
        snprintf(err, errlen, "fixture %s: unsupported version %u (expected %d)", path, version,
                 FIXTURE_VERSION);
        goto fail;
    }
    uint32_t count = (uint32_t)fixture_le(buf + 12, 4);
    pos = 16;
    // Each entry takes at least 12 bytes, which bounds a sane count.
    if ((uint64_t)count * 12 > len - pos) {
        snprintf(err, errlen, "fixture %s: entry count %u does not fit in %zu bytes", path, count, len);
        goto fail;
    }
    f->entries = calloc(count ? count : 1, sizeof *f->entries);
    if (!f->entries) {
        snprintf(err, errlen, "out of memory loading fixture %s", path);
        goto fail;
    }

    const int little = fixture_host_is_little();
    for (uint32_t k = 0; k < count; k++) {
        // name
        NEED(4, "an entry's name length");
        uint32_t nlen = (uint32_t)fixture_le(buf + pos, 4);
        pos += 4;
        if (nlen == 0 || nlen > FIXTURE_MAX_NAME) {
            snprintf(err, errlen, "fixture %s: entry %u has a bad name length %u", path, k, nlen);
            goto fail;
        }
        NEED(nlen, "an entry's name");
        FixtureEntry *e = &f->entries[f->n];
        e->name = malloc(nlen + 1);
        if (!e->name) {
            snprintf(err, errlen, "out of memory loading fixture %s", path);
            goto fail;
        }
        f->n++;  // from here on fixture_free releases this entry
        memcpy(e->name, buf + pos, nlen);
        e->name[nlen] = '\0';
        pos += nlen;
        if (strlen(e->name) != nlen) {
            snprintf(err, errlen, "fixture %s: entry %u has a NUL byte in its name", path, k);
            goto fail;
        }
        for (int j = 0; j < f->n - 1; j++)
            if (strcmp(f->entries[j].name, e->name) == 0) {
                snprintf(err, errlen, "fixture %s: duplicate entry '%s'", path, e->name);
                goto fail;
            }

        // dtype, ndim, dims
        NEED(8, "an entry's dtype and ndim");
        uint32_t dtype = (uint32_t)fixture_le(buf + pos, 4);
        uint32_t ndim = (uint32_t)fixture_le(buf + pos + 4, 4);
        pos += 8;
        if (dtype > FIX_U8) {
            snprintf(err, errlen, "fixture %s: entry '%s' has an unknown dtype %u", path, e->name, dtype);
            goto fail;
        }
        if (ndim > 4) {
            snprintf(err, errlen, "fixture %s: entry '%s' has ndim %u > 4", path, e->name, ndim);
            goto fail;
        }
        e->dtype = (FixtureDtype)dtype;
        e->ndim = (int)ndim;
        NEED(8 * (size_t)ndim, "an entry's dims");
        size_t esize = fixture_dtype_size(e->dtype);
        uint64_t numel = 1;
        for (int i = 0; i < 4; i++) e->dims[i] = 1;
        for (uint32_t i = 0; i < ndim; i++) {
            uint64_t dim = fixture_le(buf + pos + 8 * i, 8);
            // Every element occupies at least one byte of the file, so a
            // valid size is below len; checking per dim avoids overflow.
            if (dim > len || (dim > 0 && numel > len / dim)) {
                snprintf(err, errlen, "fixture %s: entry '%s' is larger than the file", path, e->name);
                goto fail;
            }
            numel *= dim;
            e->dims[i] = (int64_t)dim;
        }
        pos += 8 * (size_t)ndim;
        e->numel = (int64_t)numel;

        // data: an aligned copy in host byte order, plus a NUL terminator
        NEED(numel * esize, "an entry's data");
        e->data = malloc((size_t)numel * esize + 1);
        if (!e->data) {
            snprintf(err, errlen, "out of memory loading fixture %s", path);
            goto fail;
        }
        unsigned char *dst = e->data;
        memcpy(dst, buf + pos, (size_t)numel * esize);
        if (!little && esize > 1)  // the file is little-endian: reverse each element
            for (uint64_t i = 0; i < numel; i++)
                for (size_t a = 0, b = esize - 1; a < b; a++, b--) {
                    unsigned char t = dst[i * esize + a];
                    dst[i * esize + a] = dst[i * esize + b];
                    dst[i * esize + b] = t;
                }
        dst[numel * esize] = '\0';
        pos += (size_t)numel * esize;
    }
#undef NEED
    if (pos != len) {
        snprintf(err, errlen, "fixture %s: %zu unexpected bytes after the last entry", path, len - pos);
        goto fail;
    }
    free(buf);
    return f;

fail:
    free(buf);
    fixture_free(f);
    return NULL;
}

const FixtureEntry *fixture_get(const Fixture *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->entries[i].name, name) == 0) return &f->entries[i];
    return NULL;
}

// Element i of an entry as a double.
static double fixture_elem(const FixtureEntry *e, int64_t i) {
    switch (e->dtype) {
    case FIX_F32: return ((const float *)e->data)[i];
    case FIX_F64: return ((const double *)e->data)[i];
    case FIX_I32: return ((const int32_t *)e->data)[i];
    case FIX_U8: return ((const uint8_t *)e->data)[i];
    }
    return 0.0;
}

const FixtureEntry *fixture_need(const Fixture *f, const char *name) {
    const FixtureEntry *e = fixture_get(f, name);
    if (!e) {
        fprintf(stderr, "%s: missing entry %s\n", f->path, name);
        exit(1);
    }
    return e;
}

RouteOptions fixture_route_options(const Fixture *f) {
    RouteOptions ro = { 0, AUX_NONE, 0.0f, 0 };
    ro.bias_mult = (int)fixture_scalar(fixture_need(f, "route.bias_mult"));
    ro.aux_kind = (int)fixture_scalar(fixture_need(f, "route.aux_kind"));
    ro.aux_alpha = (float)fixture_scalar(fixture_need(f, "route.aux_alpha"));
    const FixtureEntry *bl = fixture_get(f, "route.bias_logits");
    ro.bias_logits = bl ? (int)fixture_scalar(bl) : 0;
    return ro;
}

void fixture_route_base_name(const RouteOptions *ro, int l, char *name, size_t len) {
    snprintf(name, len, ro->bias_logits ? "route_score.%d" : "affinity.%d", l);
}

double fixture_scalar(const FixtureEntry *e) {
    if (e->numel != 1) {
        fprintf(stderr, "fixture_scalar: entry '%s' has %lld elements, not 1\n", e->name,
                (long long)e->numel);
        abort();
    }
    return fixture_elem(e, 0);
}

void fixture_to_double(const FixtureEntry *e, double *out) {
    for (int64_t i = 0; i < e->numel; i++) out[i] = fixture_elem(e, i);
}

void fixture_to_float(const FixtureEntry *e, float *out) {
    for (int64_t i = 0; i < e->numel; i++) out[i] = (float)fixture_elem(e, i);
}

double fixture_route_margin(const double *aff, const float *bias, int E, int K, int mult, const int32_t *tie,
                            int *tie_kind) {
    double *score = malloc(sizeof(double) * E), mx = 0, gap = INFINITY;
    int *rank = malloc(sizeof(int) * E), K1 = K + 1 <= E ? K + 1 : E, kind = FIX_TIE_NONE;
    if (!score || !rank) {
        fprintf(stderr, "fixture_route_margin: out of memory\n");
        abort();
    }
    for (int e = 0; e < E; e++) {
        score[e] = ROUTE_SCORE(aff[e], (double)bias[e], mult);
        mx = fmax(mx, fabs(score[e]));
    }
    route_topk(score, E, K1, rank);
    for (int j = 0; j + 1 < K1; j++) {
        int lo = rank[j], hi = rank[j + 1];
        int designed = tie && score[lo] == score[hi] &&
                       ((lo == tie[0] && hi == tie[1]) || (lo == tie[1] && hi == tie[0]));
        if (designed) kind = j + 1 == K ? FIX_TIE_SET : FIX_TIE_ORDER;
        else gap = fmin(gap, score[lo] - score[hi]);
    }
    free(score);
    free(rank);
    if (tie_kind) *tie_kind = kind;
    return mx > 0 ? gap / mx : gap;
}
