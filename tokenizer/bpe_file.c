// The .tok file: writing and validating reading. Byte layout (all integers
// little-endian u32; also in docs/tokenizer.md):
//
//   header, 32 bytes:
//     0  magic      0x4B4F544D (the bytes "MTOK")
//     4  version    1
//     8  vocab_size V
//    12  n_merges   M
//    16  n_special  S
//    20  eot_id     id of <|endoftext|> (or the chosen end-of-text), 0xFFFFFFFF: none
//    24  pretok     1 = the pre-tokenisation rule of pretok.c (the only one so far)
//    28  flags      0 (reserved)
//   tokens:   V records {u32 len; len bytes}, in id order (len 0: an unused id)
//   merges:   M records {u32 left; u32 right}, in rank order
//   specials: S records {u32 id}, strictly increasing
//   trailer:  u32 CRC-32 of every byte before it
//
// A merge's result is not stored: it is the normal token whose bytes are
// left's followed by right's, and the loader checks that it exists.
//
// The loader reads only a regular file (a FIFO would block it, /dev/zero
// never end) of at most TOK_MAX_FILE_BYTES.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../util/file.h"
#include "bpe_internal.h"

// Far above any real vocabulary (GPT-2's 50257 tokens take ~0.9 MB here).
#define TOK_MAX_FILE_BYTES ((uint64_t)1 << 30)

#define TOK_MAGIC 0x4B4F544Du
#define TOK_VERSION 1u
#define TOK_PRETOK_GPT2_BYTES 1u
#define HEADER_BYTES 32

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int tok_save(const Tokenizer *t, const char *path, char *err, size_t errlen) {
    uint64_t size = HEADER_BYTES + 4;
    for (uint32_t id = 0; id < t->n_vocab; id++) size += 4 + (uint64_t)t->tok_len[id];
    size += 8 * (uint64_t)t->n_merges + 4 * (uint64_t)t->n_special;
    unsigned char *buf = malloc(size);
    if (!buf) return tok_fail(err, errlen, "%s: out of memory for %llu bytes", path, (unsigned long long)size);
    uint32_t header[8] = {TOK_MAGIC, TOK_VERSION, t->n_vocab, t->n_merges,
                          t->n_special, t->eot_id, TOK_PRETOK_GPT2_BYTES, 0};
    unsigned char *p = buf;
    for (int i = 0; i < 8; i++, p += 4) put_u32(p, header[i]);
    for (uint32_t id = 0; id < t->n_vocab; id++) {
        put_u32(p, t->tok_len[id]);
        memcpy(p + 4, t->tok_bytes + t->tok_off[id], t->tok_len[id]);
        p += 4 + t->tok_len[id];
    }
    for (uint32_t r = 0; r < t->n_merges; r++, p += 8) {
        put_u32(p, t->merges[r].left);
        put_u32(p + 4, t->merges[r].right);
    }
    for (uint32_t i = 0; i < t->n_special; i++, p += 4) put_u32(p, t->specials[i]);
    put_u32(p, tok_crc32(buf, (size_t)(p - buf)));
    int rc = tok_write_file_atomic(path, buf, (size_t)size, err, errlen);
    free(buf);
    return rc;
}

// Bounds-checked cursor over the file's bytes.
typedef struct {
    const unsigned char *p;
    size_t len, pos;
    const char *path;
    char *err;
    size_t errlen;
} Reader;

static int need(Reader *r, size_t n, const char *what) {
    if (n > r->len - r->pos)
        return tok_fail(r->err, r->errlen, "%s: truncated: file ends at byte %zu inside %s",
                        r->path, r->len, what);
    return 0;
}

static int read_u32(Reader *r, uint32_t *v, const char *what) {
    if (need(r, 4, what) != 0) return -1;
    *v = get_u32(r->p + r->pos);
    r->pos += 4;
    return 0;
}

static int check_header(Reader *r, uint32_t h[8]) {
    if (r->len < HEADER_BYTES + 4)
        return tok_fail(r->err, r->errlen, "%s: %zu bytes is too short for a tokenizer file", r->path, r->len);
    for (int i = 0; i < 8; i++) read_u32(r, &h[i], "the header");
    if (h[0] != TOK_MAGIC)
        return tok_fail(r->err, r->errlen, "%s: not a tokenizer file (magic 0x%08x, expected 0x%08x \"MTOK\")",
                        r->path, h[0], TOK_MAGIC);
    if (h[1] != TOK_VERSION)
        return tok_fail(r->err, r->errlen, "%s: unsupported version %u (this build reads version %u)",
                        r->path, h[1], TOK_VERSION);
    uint32_t V = h[2], M = h[3], S = h[4];
    if (V < 256 || V > (1u << 30))
        return tok_fail(r->err, r->errlen, "%s: vocab size %u is outside [256, 2^30]", r->path, V);
    // The smallest file these counts allow; checked before any allocation so a
    // corrupt count cannot ask for gigabytes.
    uint64_t min_size = HEADER_BYTES + 4 + 4 * (uint64_t)V + 8 * (uint64_t)M + 4 * (uint64_t)S;
    if (min_size > r->len)
        return tok_fail(r->err, r->errlen,
                        "%s: truncated: %u tokens, %u merges and %u specials need at least %llu bytes, the file has %zu",
                        r->path, V, M, S, (unsigned long long)min_size, r->len);
    if (S > V) return tok_fail(r->err, r->errlen, "%s: %u specials in a vocab of %u", r->path, S, V);
    if (h[6] != TOK_PRETOK_GPT2_BYTES)
        return tok_fail(r->err, r->errlen, "%s: unknown pre-tokenizer %u", r->path, h[6]);
    if (h[7] != 0) return tok_fail(r->err, r->errlen, "%s: unknown flags 0x%x", r->path, h[7]);
    return 0;
}

// Arrays the file's sections are read into, then handed to tok_build.
typedef struct {
    uint64_t *off;   // [V]
    uint32_t *len;   // [V]
    uint8_t *special;  // [V]
    uint32_t *merges;  // [2M]
} Sections;

static int read_sections(Reader *r, uint32_t V, uint32_t M, uint32_t S, Sections *s) {
    char what[64];
    for (uint32_t id = 0; id < V; id++) {
        snprintf(what, sizeof what, "token %u", id);
        if (read_u32(r, &s->len[id], what) != 0 || need(r, s->len[id], what) != 0) return -1;
        s->off[id] = r->pos;  // the bytes are used in place in the file buffer
        r->pos += s->len[id];
    }
    for (uint32_t m = 0; m < 2 * M; m++) {
        snprintf(what, sizeof what, "merge %u", m / 2);
        if (read_u32(r, &s->merges[m], what) != 0) return -1;
    }
    uint32_t prev = 0;
    for (uint32_t i = 0; i < S; i++) {
        uint32_t id;
        snprintf(what, sizeof what, "special token %u", i);
        if (read_u32(r, &id, what) != 0) return -1;
        if (id >= V || (i > 0 && id <= prev))
            return tok_fail(r->err, r->errlen, "%s: special token %u has id %u (out of range or not increasing)",
                            r->path, i, id);
        s->special[id] = 1;
        prev = id;
    }
    return 0;
}

// The whole file in a new buffer: a regular file of at most
// TOK_MAX_FILE_BYTES, read to the size fstat gave. NULL with a message on error.
static unsigned char *read_tok_file(const char *path, size_t *len, char *err, size_t errlen) {
    uint64_t size;
    int fd = util_open_regular(path, TOK_MAX_FILE_BYTES, &size, err, errlen);
    if (fd < 0) return NULL;
    unsigned char *buf = malloc((size_t)size + 1);
    if (!buf) tok_fail(err, errlen, "%s: out of memory for %llu bytes", path, (unsigned long long)size);
    for (size_t got = 0; buf && got < size;) {
        ssize_t r = read(fd, buf + got, (size_t)size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            tok_fail(err, errlen, "%s: read error after %zu of %llu bytes: %s", path, got,
                     (unsigned long long)size, r < 0 ? strerror(errno) : "the file shrank");
            free(buf);
            buf = NULL;
        } else {
            got += (size_t)r;
        }
    }
    close(fd);
    *len = (size_t)size;
    return buf;
}

Tokenizer *tok_load(const char *path, char *err, size_t errlen) {
    size_t len;
    unsigned char *buf = read_tok_file(path, &len, err, errlen);
    if (!buf) return NULL;
    Reader r = {buf, len, 0, path, err, errlen};
    uint32_t h[8];
    Tokenizer *t = NULL;
    Sections s = {NULL, NULL, NULL, NULL};
    if (check_header(&r, h) != 0) goto done;
    uint32_t V = h[2], M = h[3], S = h[4];
    s.off = malloc(V * sizeof *s.off);
    s.len = malloc(V * sizeof *s.len);
    s.special = calloc(V, 1);
    s.merges = malloc((M ? 2 * (size_t)M : 1) * sizeof *s.merges);
    if (!s.off || !s.len || !s.special || !s.merges) {
        tok_fail(err, errlen, "%s: out of memory for a vocab of %u", path, V);
        goto done;
    }
    if (read_sections(&r, V, M, S, &s) != 0) goto done;
    uint32_t stored_crc;
    if (read_u32(&r, &stored_crc, "the checksum") != 0) goto done;
    if (r.pos != len) {
        tok_fail(err, errlen, "%s: %zu unexpected bytes after the checksum", path, len - r.pos);
        goto done;
    }
    uint32_t crc = tok_crc32(buf, len - 4);
    if (crc != stored_crc) {
        tok_fail(err, errlen, "%s: checksum mismatch (stored 0x%08x, computed 0x%08x): the file is corrupt",
                 path, stored_crc, crc);
        goto done;
    }
    TokSpec spec = {V, s.off, s.len, buf, s.special, s.merges, M, h[5]};
    t = tok_build(&spec, path, err, errlen);
done:
    free(s.off);
    free(s.len);
    free(s.special);
    free(s.merges);
    free(buf);
    return t;
}
