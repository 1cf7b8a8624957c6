// Support code for tokenizer/: the two hash maps (byte string -> value and
// id pair -> value), error messages, quoting bytes for display, whole-file
// reads, atomic file writes and CRC-32.
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bpe_internal.h"

// ---- byte-string map -----------------------------------------------------

static uint64_t mix64(uint64_t x) {
    // The murmur3 finaliser: every input bit affects every output bit.
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

uint64_t tok_hash_bytes(const void *data, size_t len) {
    const unsigned char *p = data;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ ((uint64_t)len * 0xC2B2AE3D27D4EB4Full);
    // Eight bytes per step; the tail is zero-padded (the length is in h already).
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ mix64(w)) * 0x9E3779B97F4A7C15ull;
        p += 8;
        len -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, len);
    h = (h ^ mix64(w)) * 0x9E3779B97F4A7C15ull;
    h = mix64(h);
    return h ? h : 1;  // 0 is never a real hash, so a free slot never matches
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c *= 2;
    return c;
}

int tok_bytemap_init(TokByteMap *m, size_t expected) {
    memset(m, 0, sizeof *m);
    m->cap = pow2_at_least(expected * 2);
    m->slots = calloc(m->cap, sizeof *m->slots);
    m->keys_cap = 4096;
    m->keys = malloc(m->keys_cap);
    if (!m->slots || !m->keys) {
        tok_bytemap_free(m);
        return -1;
    }
    return 0;
}

void tok_bytemap_free(TokByteMap *m) {
    free(m->slots);
    free(m->keys);
    memset(m, 0, sizeof *m);
}

uint64_t *tok_bytemap_find(const TokByteMap *m, const void *key, size_t len, uint64_t hash) {
    for (size_t i = hash & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        const TokByteSlot *s = &m->slots[i];
        if (s->key_len == 0) return NULL;
        if (s->hash == hash && s->key_len == len && memcmp(m->keys + s->key_off, key, len) == 0)
            return (uint64_t *)&s->val;
    }
}

static int bytemap_grow(TokByteMap *m) {
    size_t cap = m->cap * 2;
    TokByteSlot *slots = calloc(cap, sizeof *slots);
    if (!slots) return -1;
    for (size_t i = 0; i < m->cap; i++) {
        if (m->slots[i].key_len == 0) continue;
        size_t j = m->slots[i].hash & (cap - 1);
        while (slots[j].key_len != 0) j = (j + 1) & (cap - 1);
        slots[j] = m->slots[i];
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return 0;
}

uint64_t *tok_bytemap_insert(TokByteMap *m, const void *key, size_t len, uint64_t hash, int *created) {
    *created = 0;
    if (len == 0 || len > UINT32_MAX) return NULL;
    uint64_t *v = tok_bytemap_find(m, key, len, hash);
    if (v) return v;
    // Keep the load factor at most 1/2 so probe runs stay short.
    if (2 * (m->n + 1) > m->cap && bytemap_grow(m) != 0) return NULL;
    if (m->keys_len + len > m->keys_cap) {
        size_t cap = m->keys_cap;
        while (cap < m->keys_len + len) cap *= 2;
        unsigned char *keys = realloc(m->keys, cap);
        if (!keys) return NULL;
        m->keys = keys;
        m->keys_cap = cap;
    }
    size_t i = hash & (m->cap - 1);
    while (m->slots[i].key_len != 0) i = (i + 1) & (m->cap - 1);
    TokByteSlot *s = &m->slots[i];
    memcpy(m->keys + m->keys_len, key, len);
    s->hash = hash;
    s->val = 0;
    s->key_off = m->keys_len;
    s->key_len = (uint32_t)len;
    m->keys_len += len;
    m->n++;
    *created = 1;
    return &s->val;
}

// ---- pair map ------------------------------------------------------------

static int pairmap_alloc(TokPairMap *m, size_t cap) {
    m->keys = malloc(cap * sizeof *m->keys);
    m->vals = malloc(cap * sizeof *m->vals);
    if (!m->keys || !m->vals) {
        free(m->keys);
        free(m->vals);
        return -1;
    }
    memset(m->keys, 0xff, cap * sizeof *m->keys);  // every key UINT64_MAX: free
    m->cap = cap;
    m->shift = 64;
    for (size_t c = cap; c > 1; c /= 2) m->shift--;
    return 0;
}

int tok_pairmap_init(TokPairMap *m, size_t expected) {
    memset(m, 0, sizeof *m);
    return pairmap_alloc(m, pow2_at_least(expected * 2));
}

void tok_pairmap_free(TokPairMap *m) {
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

static int pairmap_grow(TokPairMap *m) {
    TokPairMap old = *m;
    if (pairmap_alloc(m, old.cap * 2) != 0) {
        *m = old;
        return -1;
    }
    for (size_t i = 0; i < old.cap; i++) {
        if (old.keys[i] == UINT64_MAX) continue;
        size_t j = tok_pair_slot(old.keys[i], m->shift);
        while (m->keys[j] != UINT64_MAX) j = (j + 1) & (m->cap - 1);
        m->keys[j] = old.keys[i];
        m->vals[j] = old.vals[i];
    }
    m->n = old.n;
    free(old.keys);
    free(old.vals);
    return 0;
}

uint32_t *tok_pairmap_insert(TokPairMap *m, uint32_t left, uint32_t right, uint32_t init, int *created) {
    *created = 0;
    uint64_t key = tok_pair_key(left, right);
    size_t i = tok_pair_slot(key, m->shift);
    for (; m->keys[i] != UINT64_MAX; i = (i + 1) & (m->cap - 1))
        if (m->keys[i] == key) return &m->vals[i];
    if (2 * (m->n + 1) > m->cap) {
        if (pairmap_grow(m) != 0) return NULL;
        i = tok_pair_slot(key, m->shift);
        while (m->keys[i] != UINT64_MAX) i = (i + 1) & (m->cap - 1);
    }
    m->keys[i] = key;
    m->vals[i] = init;
    m->n++;
    *created = 1;
    return &m->vals[i];
}

// ---- messages ------------------------------------------------------------

int tok_fail(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

void tok_quote(const unsigned char *s, size_t len, char *out, size_t outlen) {
    if (outlen < 8) {
        if (outlen) out[0] = 0;
        return;
    }
    size_t o = 0;
    out[o++] = '"';
    for (size_t i = 0; i < len; i++) {
        char buf[8];
        unsigned char c = s[i];
        if (c == '"' || c == '\\') snprintf(buf, sizeof buf, "\\%c", c);
        else if (c == '\n') snprintf(buf, sizeof buf, "\\n");
        else if (c == '\t') snprintf(buf, sizeof buf, "\\t");
        else if (c >= 0x20 && c < 0x7f) snprintf(buf, sizeof buf, "%c", c);
        else snprintf(buf, sizeof buf, "\\x%02x", c);
        size_t b = strlen(buf);
        if (o + b + 5 > outlen) {  // room for "..." + closing quote + NUL
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        memcpy(out + o, buf, b);
        o += b;
    }
    out[o++] = '"';
    out[o] = 0;
}

// ---- files ---------------------------------------------------------------

char *tok_read_file(const char *path, size_t *len, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        tok_fail(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    // Read in growing blocks rather than trusting a size from fseek: this also
    // works for pipes and /dev/stdin.
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : (size_t)1 << 16;
            char *b = realloc(buf, ncap + 1);  // + 1: room for the NUL after the end
            if (!b) {
                tok_fail(err, errlen, "%s: out of memory after reading %zu bytes", path, n);
                goto fail;
            }
            buf = b;
            cap = ncap;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) {
                tok_fail(err, errlen, "%s: read error: %s", path, strerror(errno));
                goto fail;
            }
            break;
        }
    }
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
fail:
    free(buf);
    fclose(f);
    return NULL;
}

int tok_write_file_atomic(const char *path, const void *data, size_t len, char *err, size_t errlen) {
    size_t tlen = strlen(path) + 32;
    char *tmp = malloc(tlen);
    if (!tmp) return tok_fail(err, errlen, "%s: out of memory", path);
    snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        tok_fail(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    int ok = fwrite(data, 1, len, f) == len;
    ok = ok && fflush(f) == 0;
    ok = ok && fsync(fileno(f)) == 0;  // the bytes are on disk before the rename makes them visible
    int saved = errno;
    if (fclose(f) != 0) ok = 0;
    if (ok && rename(tmp, path) != 0) {
        saved = errno;
        ok = 0;
    }
    if (!ok) {
        tok_fail(err, errlen, "%s: write failed: %s", path, strerror(saved));
        remove(tmp);
    }
    free(tmp);
    return ok ? 0 : -1;
}

uint32_t tok_crc32(const void *data, size_t len) {
    uint32_t table[256];  // 1 KiB, rebuilt per call: no global state to initialise
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[i] = c;
    }
    const unsigned char *p = data;
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}
