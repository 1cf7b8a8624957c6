// Checkpoint container: XXH64 checksums, the atomic streaming writer, the
// checking reader and the checkpoint-directory helpers (API in ckpt.h, byte
// layout in docs/checkpoint.md).
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L  // fseeko, fileno, fsync, opendir
#endif

#include "ckpt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "../util/file.h"

// ---------------------------------------------------------------- byte layout

static const char CKPT_MAGIC[8] = { 'M', 'O', 'E', '-', 'C', 'K', 'P', 'T' };

enum {
    HEADER_BYTES = 64,  // magic 8, version 4, count 4, table offset 8, file size 8,
                        // reserved 24 (zero), header checksum 8
    ENTRY_BYTES = 104,  // name 64, dtype 4, reserved 4, offset 8, nbytes 8,
                        // payload checksum 8, entry checksum 8
};

// Pieces a payload is hashed and written or read in: large enough to be fast,
// small enough that the piece is still in cache when it is hashed.
enum { IO_CHUNK = 4 << 20 };

static uint64_t dtype_size(CkptDtype d) {
    switch (d) {
    case CKPT_F32: case CKPT_I32: return 4;
    case CKPT_I64: case CKPT_U64: return 8;
    default: return 1;
    }
}

static const char *dtype_name(CkptDtype d) {
    static const char *const names[CKPT_NDTYPES] = { "bytes", "text", "f32", "i32", "i64", "u64" };
    return (unsigned)d < CKPT_NDTYPES ? names[d] : "unknown";
}

// Little-endian integers, whatever the host's byte order.
static void put_u32(uint8_t *p, uint32_t x) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(x >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t x) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(x >> (8 * i));
}
// Spelled out so the compiler turns each into a single load (the hash's inner loop).
static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_u64(const uint8_t *p) {
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

// ---------------------------------------------------------------- XXH64
//
// XXH64 (seed 0) as specified by its author (Yann Collet): four 64-bit lanes
// consume 32-byte stripes; the tail and the length are mixed in at the end.
// Written streaming, so a payload can be hashed piece by piece.

static const uint64_t P1 = 0x9E3779B185EBCA87ULL, P2 = 0xC2B2AE3D27D4EB4FULL,
                      P3 = 0x165667B19E3779F9ULL, P4 = 0x85EBCA77C2B2AE63ULL,
                      P5 = 0x27D4EB2F165667C5ULL;

typedef struct {
    uint64_t v[4];     // lane accumulators
    uint8_t buf[32];   // bytes not yet forming a full stripe
    unsigned nbuf;
    uint64_t total;    // bytes fed so far
} Hash64;

static uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static uint64_t xxh_round(uint64_t acc, uint64_t in) { return rotl64(acc + in * P2, 31) * P1; }
static uint64_t xxh_merge(uint64_t h, uint64_t lane) { return (h ^ xxh_round(0, lane)) * P1 + P4; }

static void hash_init(Hash64 *h) {
    memset(h, 0, sizeof *h);
    h->v[0] = P1 + P2;
    h->v[1] = P2;
    h->v[2] = 0;
    h->v[3] = 0 - P1;
}

// Consumes n / 32 whole stripes of p. The lanes live in locals during the
// loop: through h they would be reloaded after every byte-pointer read.
static void hash_stripes(Hash64 *h, const uint8_t *p, uint64_t n) {
    uint64_t v0 = h->v[0], v1 = h->v[1], v2 = h->v[2], v3 = h->v[3];
    for (; n >= 32; p += 32, n -= 32) {
        v0 = xxh_round(v0, get_u64(p));
        v1 = xxh_round(v1, get_u64(p + 8));
        v2 = xxh_round(v2, get_u64(p + 16));
        v3 = xxh_round(v3, get_u64(p + 24));
    }
    h->v[0] = v0;
    h->v[1] = v1;
    h->v[2] = v2;
    h->v[3] = v3;
}

static void hash_update(Hash64 *h, const void *data, uint64_t n) {
    const uint8_t *p = data;
    h->total += n;
    if (h->nbuf + n < 32) {
        memcpy(h->buf + h->nbuf, p, (size_t)n);
        h->nbuf += (unsigned)n;
        return;
    }
    if (h->nbuf > 0) {  // complete the pending stripe first
        unsigned fill = 32 - h->nbuf;
        memcpy(h->buf + h->nbuf, p, fill);
        hash_stripes(h, h->buf, 32);
        p += fill;
        n -= fill;
        h->nbuf = 0;
    }
    hash_stripes(h, p, n);
    p += n & ~(uint64_t)31;
    n &= 31;
    memcpy(h->buf, p, (size_t)n);
    h->nbuf = (unsigned)n;
}

static uint64_t hash_final(const Hash64 *h) {
    uint64_t r;
    if (h->total >= 32) {
        r = rotl64(h->v[0], 1) + rotl64(h->v[1], 7) + rotl64(h->v[2], 12) + rotl64(h->v[3], 18);
        for (int i = 0; i < 4; i++) r = xxh_merge(r, h->v[i]);
    } else {
        r = P5;  // seed 0 + P5
    }
    r += h->total;
    const uint8_t *p = h->buf;
    unsigned n = h->nbuf;
    for (; n >= 8; p += 8, n -= 8) r = rotl64(r ^ xxh_round(0, get_u64(p)), 27) * P1 + P4;
    if (n >= 4) {
        r = rotl64(r ^ (uint64_t)get_u32(p) * P1, 23) * P2 + P3;
        p += 4;
        n -= 4;
    }
    for (; n > 0; p++, n--) r = rotl64(r ^ (uint64_t)*p * P5, 11) * P1;
    // Final avalanche: every input bit affects every output bit.
    r ^= r >> 33;
    r *= P2;
    r ^= r >> 29;
    r *= P3;
    r ^= r >> 32;
    return r;
}

uint64_t ckpt_hash(const void *data, uint64_t n) {
    Hash64 h;
    hash_init(&h);
    hash_update(&h, data, n);
    return hash_final(&h);
}

// ---------------------------------------------------------------- small helpers

static char *copy_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *c = malloc(n);
    if (c) memcpy(c, s, n);
    return c;
}

// 1..CKPT_NAME_MAX-1 printable ASCII characters.
static int valid_name(const char *name) {
    size_t n = strlen(name);
    if (n == 0 || n >= CKPT_NAME_MAX) return 0;
    for (size_t i = 0; i < n; i++)
        if (name[i] < 0x21 || name[i] > 0x7e) return 0;
    return 1;
}

static void encode_entry(uint8_t e[ENTRY_BYTES], const CkptSection *s) {
    memset(e, 0, ENTRY_BYTES);
    memcpy(e, s->name, strlen(s->name));  // NUL padding from the memset
    put_u32(e + 64, (uint32_t)s->dtype);
    put_u64(e + 72, s->offset);
    put_u64(e + 80, s->nbytes);
    put_u64(e + 88, s->hash);
    put_u64(e + 96, ckpt_hash(e, 96));
}

// Writes n bytes at the current position of f; 0 or -1 (errno set).
static int write_all(FILE *f, const void *p, size_t n) {
    if (n == 0) return 0;
    if (fwrite(p, 1, n, f) != n) {
        if (errno == 0) errno = EIO;
        return -1;
    }
    return 0;
}

// Reads n bytes at offset; 0, or -1 with errno (0 meaning the file ended early).
static int read_at(FILE *f, uint64_t offset, void *p, size_t n) {
    errno = 0;
    if (fseeko(f, (off_t)offset, SEEK_SET) != 0) return -1;
    if (n == 0) return 0;
    if (fread(p, 1, n, f) != n) return -1;
    return 0;
}

static const char *read_error(void) { return errno ? strerror(errno) : "file ended early"; }

// ---------------------------------------------------------------- writer

struct CkptWriter {
    char *final_path;
    char *tmp_path;       // final_path + ".tmp"
    FILE *f;
    uint64_t pos;         // bytes written so far: the next section's offset
    CkptSection *secs;    // (cap) sections finished so far, n of them
    int n, cap;
    int in_section;       // between begin and end
    uint64_t declared;    // size given to begin
    Hash64 h;             // running checksum of the open section
    int failed;
    char err[512];        // the first error
};

// Records the first error (later ones are consequences of it).
static int wfail(CkptWriter *w, const char *what, const char *detail) {
    if (!w->failed) {
        snprintf(w->err, sizeof w->err, "%s: %s%s%s", w->tmp_path, what, detail ? ": " : "",
                 detail ? detail : "");
        w->failed = 1;
    }
    return -1;
}

CkptWriter *ckpt_writer_open(const char *final_path, char *err, size_t errlen) {
    CkptWriter *w = calloc(1, sizeof *w);
    if (!w) goto oom;
    w->final_path = copy_string(final_path);
    w->tmp_path = malloc(strlen(final_path) + 5);
    if (!w->final_path || !w->tmp_path) goto oom;
    sprintf(w->tmp_path, "%s.tmp", final_path);
    // "wb" truncates a .tmp left behind by a crashed write of the same step.
    w->f = fopen(w->tmp_path, "wb");
    if (!w->f) {
        snprintf(err, errlen, "%s: cannot create: %s", w->tmp_path, strerror(errno));
        free(w->final_path);
        free(w->tmp_path);
        free(w);
        return NULL;
    }
    // Placeholder header, zeros: a file cut short anywhere has no valid magic.
    uint8_t zeros[HEADER_BYTES] = { 0 };
    if (write_all(w->f, zeros, sizeof zeros) != 0) {
        snprintf(err, errlen, "%s: write failed: %s", w->tmp_path, strerror(errno));
        ckpt_writer_abort(w);
        return NULL;
    }
    w->pos = HEADER_BYTES;
    return w;
oom:
    snprintf(err, errlen, "%s: out of memory opening checkpoint writer", final_path);
    if (w) {
        free(w->final_path);
        free(w->tmp_path);
        free(w);
    }
    return NULL;
}

int ckpt_section_begin(CkptWriter *w, const char *name, CkptDtype dtype, uint64_t nbytes) {
    if (w->failed) return -1;
    if (w->in_section) return wfail(w, "section begun before the previous one ended", name);
    if (!valid_name(name)) return wfail(w, "bad section name (1-63 printable characters)", name);
    if ((unsigned)dtype >= CKPT_NDTYPES) return wfail(w, "bad dtype for section", name);
    if (nbytes % dtype_size(dtype) != 0)
        return wfail(w, "section size is not a whole number of elements", name);
    for (int i = 0; i < w->n; i++)
        if (strcmp(w->secs[i].name, name) == 0) return wfail(w, "duplicate section name", name);
    if (w->n == w->cap) {
        int cap = w->cap ? 2 * w->cap : 16;
        CkptSection *s = realloc(w->secs, sizeof *s * (size_t)cap);
        if (!s) return wfail(w, "out of memory", name);
        w->secs = s;
        w->cap = cap;
    }
    CkptSection *s = &w->secs[w->n];
    memset(s, 0, sizeof *s);
    memcpy(s->name, name, strlen(name) + 1);
    s->dtype = dtype;
    s->offset = w->pos;
    w->declared = nbytes;
    w->in_section = 1;
    hash_init(&w->h);
    return 0;
}

int ckpt_section_append(CkptWriter *w, const void *data, uint64_t nbytes) {
    if (w->failed) return -1;
    if (!w->in_section) return wfail(w, "append outside a section", NULL);
    CkptSection *s = &w->secs[w->n];
    if (nbytes > w->declared - s->nbytes) return wfail(w, "more bytes appended than declared for section", s->name);
    const uint8_t *p = data;
    for (uint64_t done = 0; done < nbytes;) {
        size_t piece = nbytes - done < IO_CHUNK ? (size_t)(nbytes - done) : IO_CHUNK;
        hash_update(&w->h, p + done, piece);
        if (write_all(w->f, p + done, piece) != 0) return wfail(w, "write failed", strerror(errno));
        done += piece;
    }
    s->nbytes += nbytes;
    w->pos += nbytes;
    return 0;
}

int ckpt_section_end(CkptWriter *w) {
    if (w->failed) return -1;
    if (!w->in_section) return wfail(w, "section ended that was never begun", NULL);
    CkptSection *s = &w->secs[w->n];
    if (s->nbytes != w->declared) return wfail(w, "fewer bytes appended than declared for section", s->name);
    s->hash = hash_final(&w->h);
    w->in_section = 0;
    w->n++;
    return 0;
}

int ckpt_write_section(CkptWriter *w, const char *name, CkptDtype dtype, const void *data,
                       uint64_t nbytes) {
    if (ckpt_section_begin(w, name, dtype, nbytes) != 0) return -1;
    if (ckpt_section_append(w, data, nbytes) != 0) return -1;
    return ckpt_section_end(w);
}

const char *ckpt_writer_error(const CkptWriter *w) { return w->failed ? w->err : ""; }

static void writer_free(CkptWriter *w) {
    free(w->final_path);
    free(w->tmp_path);
    free(w->secs);
    free(w);
}

void ckpt_writer_abort(CkptWriter *w) {
    if (!w) return;
    if (w->f) fclose(w->f);
    unlink(w->tmp_path);
    writer_free(w);
}

// Writes the table after the payload and the real header over the placeholder.
static int write_table_and_header(CkptWriter *w) {
    uint64_t table_offset = w->pos;
    for (int i = 0; i < w->n; i++) {
        uint8_t e[ENTRY_BYTES];
        encode_entry(e, &w->secs[i]);
        if (write_all(w->f, e, sizeof e) != 0) return wfail(w, "write failed", strerror(errno));
    }
    uint8_t hd[HEADER_BYTES];
    memset(hd, 0, sizeof hd);
    memcpy(hd, CKPT_MAGIC, 8);
    put_u32(hd + 8, CKPT_VERSION);
    put_u32(hd + 12, (uint32_t)w->n);
    put_u64(hd + 16, table_offset);
    put_u64(hd + 24, table_offset + (uint64_t)w->n * ENTRY_BYTES);
    put_u64(hd + 56, ckpt_hash(hd, 56));
    if (fseeko(w->f, 0, SEEK_SET) != 0) return wfail(w, "seek failed", strerror(errno));
    if (write_all(w->f, hd, sizeof hd) != 0) return wfail(w, "write failed", strerror(errno));
    return 0;
}

// Makes the rename durable. Some file systems cannot fsync a directory
// (EINVAL); the file itself is complete by then, so that is not an error.
static void sync_parent_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? malloc((size_t)(slash - path) + 2) : copy_string(".");
    if (!dir) return;
    if (slash) {
        size_t n = slash == path ? 1 : (size_t)(slash - path);  // "/x" lives in "/"
        memcpy(dir, path, n);
        dir[n] = '\0';
    }
    int fd = open(dir, O_RDONLY);
    if (fd < 0 || (fsync(fd) != 0 && errno != EINVAL))
        fprintf(stderr, "warning: %s: written, but its directory %s could not be synced: %s\n", path,
                dir, strerror(errno));
    if (fd >= 0) close(fd);
    free(dir);
}

int ckpt_writer_commit(CkptWriter *w, char *err, size_t errlen) {
    if (!w->failed && w->in_section) wfail(w, "commit with a section still open", w->secs[w->n].name);
    if (!w->failed) write_table_and_header(w);
    // fflush + fsync before the rename: the name must never point at data
    // that is still only in the page cache.
    if (!w->failed && fflush(w->f) != 0) wfail(w, "write failed", strerror(errno));
    if (!w->failed && fsync(fileno(w->f)) != 0) wfail(w, "fsync failed", strerror(errno));
    int close_rc = fclose(w->f);
    w->f = NULL;
    if (!w->failed && close_rc != 0) wfail(w, "close failed", strerror(errno));
    if (!w->failed && rename(w->tmp_path, w->final_path) != 0) wfail(w, "rename to final name failed", strerror(errno));
    if (w->failed) {
        snprintf(err, errlen, "%s (checkpoint not written; %s left as it was)", w->err, w->final_path);
        ckpt_writer_abort(w);
        return -1;
    }
    sync_parent_dir(w->final_path);
    writer_free(w);
    return 0;
}

// ---------------------------------------------------------------- reader

struct Ckpt {
    char *path;
    FILE *f;
    int n;
    CkptSection *secs;  // (n) in file order
};

void ckpt_close(Ckpt *ck) {
    if (!ck) return;
    if (ck->f) fclose(ck->f);
    free(ck->path);
    free(ck->secs);
    free(ck);
}

// Checks the 64-byte header; fills the section count and table offset.
static int check_header(const char *path, const uint8_t *hd, uint64_t file_size, uint32_t *n,
                        uint64_t *table_offset, char *err, size_t errlen) {
    if (memcmp(hd, CKPT_MAGIC, 8) != 0) {
        snprintf(err, errlen, "%s: not a checkpoint (bad magic)", path);
        return -1;
    }
    uint32_t version = get_u32(hd + 8);
    if (version != CKPT_VERSION) {
        snprintf(err, errlen, "%s: checkpoint version %u, this build reads version %d", path, version,
                 CKPT_VERSION);
        return -1;
    }
    if (get_u64(hd + 56) != ckpt_hash(hd, 56)) {
        snprintf(err, errlen, "%s: header is corrupt (checksum mismatch)", path);
        return -1;
    }
    for (int i = 32; i < 56; i++)
        if (hd[i] != 0) {
            snprintf(err, errlen, "%s: reserved header byte %d is not zero (a newer or a damaged file)", path, i);
            return -1;
        }
    uint64_t size_in_header = get_u64(hd + 24);
    if (size_in_header != file_size) {
        snprintf(err, errlen, "%s: %s: header says %llu bytes, file has %llu", path,
                 file_size < size_in_header ? "truncated" : "unexpected extra bytes",
                 (unsigned long long)size_in_header, (unsigned long long)file_size);
        return -1;
    }
    *n = get_u32(hd + 12);
    *table_offset = get_u64(hd + 16);
    if (*table_offset < HEADER_BYTES || *table_offset > file_size ||
        file_size - *table_offset != (uint64_t)*n * ENTRY_BYTES) {
        snprintf(err, errlen, "%s: section table (%u entries at byte %llu) does not fit the %llu-byte file",
                 path, *n, (unsigned long long)*table_offset, (unsigned long long)file_size);
        return -1;
    }
    return 0;
}

// Copies a name field for a message, replacing anything unprintable.
static void printable_name(char out[CKPT_NAME_MAX], const uint8_t *field) {
    int i = 0;
    for (; i < CKPT_NAME_MAX - 1 && field[i]; i++)
        out[i] = field[i] >= 0x20 && field[i] < 0x7f ? (char)field[i] : '?';
    out[i] = '\0';
}

// Decodes and checks entry i. expect_offset is where its payload must start
// (sections are contiguous, so every byte of the file is covered by a checksum).
static int decode_entry(const Ckpt *ck, int i, const uint8_t *e, uint64_t expect_offset,
                        uint64_t table_offset, CkptSection *s, char *err, size_t errlen) {
    char shown[CKPT_NAME_MAX];
    printable_name(shown, e);
    if (get_u64(e + 96) != ckpt_hash(e, 96)) {
        snprintf(err, errlen, "%s: section table entry %d of %d (name field reads '%s') is corrupt (checksum mismatch)",
                 ck->path, i + 1, ck->n, shown);
        return -1;
    }
    memset(s, 0, sizeof *s);
    if (memchr(e, 0, CKPT_NAME_MAX) == NULL || !valid_name((const char *)e)) {
        snprintf(err, errlen, "%s: section table entry %d has an invalid name '%s'", ck->path, i + 1, shown);
        return -1;
    }
    memcpy(s->name, e, CKPT_NAME_MAX);
    uint32_t dtype = get_u32(e + 64);
    s->offset = get_u64(e + 72);
    s->nbytes = get_u64(e + 80);
    s->hash = get_u64(e + 88);
    if (dtype >= CKPT_NDTYPES || get_u32(e + 68) != 0) {
        snprintf(err, errlen, "%s: section '%s' has unknown dtype %u or a nonzero reserved field",
                 ck->path, s->name, dtype);
        return -1;
    }
    s->dtype = (CkptDtype)dtype;
    if (s->offset != expect_offset || s->nbytes > table_offset - s->offset) {
        snprintf(err, errlen, "%s: section '%s' (bytes %llu..+%llu) is not where the table says sections lie",
                 ck->path, s->name, (unsigned long long)s->offset, (unsigned long long)s->nbytes);
        return -1;
    }
    if (s->nbytes % dtype_size(s->dtype) != 0) {
        snprintf(err, errlen, "%s: section '%s' size %llu is not a multiple of its %s element size",
                 ck->path, s->name, (unsigned long long)s->nbytes, dtype_name(s->dtype));
        return -1;
    }
    for (int j = 0; j < i; j++)
        if (strcmp(ck->secs[j].name, s->name) == 0) {
            snprintf(err, errlen, "%s: section name '%s' appears twice", ck->path, s->name);
            return -1;
        }
    return 0;
}

static int read_table(Ckpt *ck, uint64_t table_offset, char *err, size_t errlen) {
    ck->secs = calloc(ck->n ? (size_t)ck->n : 1, sizeof *ck->secs);
    if (!ck->secs) {
        snprintf(err, errlen, "%s: out of memory for %d sections", ck->path, ck->n);
        return -1;
    }
    uint64_t expect = HEADER_BYTES;
    for (int i = 0; i < ck->n; i++) {
        uint8_t e[ENTRY_BYTES];
        if (read_at(ck->f, table_offset + (uint64_t)i * ENTRY_BYTES, e, sizeof e) != 0) {
            snprintf(err, errlen, "%s: reading section table: %s", ck->path, read_error());
            return -1;
        }
        if (decode_entry(ck, i, e, expect, table_offset, &ck->secs[i], err, errlen) != 0) return -1;
        expect += ck->secs[i].nbytes;
    }
    if (expect != table_offset) {
        snprintf(err, errlen, "%s: sections end at byte %llu but the table starts at %llu", ck->path,
                 (unsigned long long)expect, (unsigned long long)table_offset);
        return -1;
    }
    return 0;
}

Ckpt *ckpt_open(const char *path, char *err, size_t errlen) {
    Ckpt *ck = calloc(1, sizeof *ck);
    if (!ck || !(ck->path = copy_string(path))) {
        snprintf(err, errlen, "%s: out of memory", path);
        free(ck);
        return NULL;
    }
    // A regular file only: a FIFO would block the reader, a device never end.
    uint64_t file_size;
    int fd = util_open_regular(path, 0, &file_size, err, errlen);
    if (fd < 0) goto fail;
    ck->f = fdopen(fd, "rb");
    if (!ck->f) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        close(fd);
        goto fail;
    }
    if (file_size < HEADER_BYTES) {
        snprintf(err, errlen, "%s: truncated: %llu bytes, smaller than the %d-byte header", path,
                 (unsigned long long)file_size, HEADER_BYTES);
        goto fail;
    }
    uint8_t hd[HEADER_BYTES];
    if (read_at(ck->f, 0, hd, sizeof hd) != 0) {
        snprintf(err, errlen, "%s: reading header: %s", path, read_error());
        goto fail;
    }
    uint32_t n;
    uint64_t table_offset;
    if (check_header(path, hd, file_size, &n, &table_offset, err, errlen) != 0) goto fail;
    if (n > (uint32_t)INT32_MAX) {
        snprintf(err, errlen, "%s: %u sections is more than this build supports", path, n);
        goto fail;
    }
    ck->n = (int)n;
    if (read_table(ck, table_offset, err, errlen) != 0) goto fail;
    return ck;
fail:
    ckpt_close(ck);
    return NULL;
}

int ckpt_num_sections(const Ckpt *ck) { return ck->n; }

const CkptSection *ckpt_section_at(const Ckpt *ck, int i) {
    return i >= 0 && i < ck->n ? &ck->secs[i] : NULL;
}

const CkptSection *ckpt_find(const Ckpt *ck, const char *name) {
    for (int i = 0; i < ck->n; i++)
        if (strcmp(ck->secs[i].name, name) == 0) return &ck->secs[i];
    return NULL;
}

// Reads a section's payload in pieces into buf (or, with buf NULL, into a
// scratch buffer) and checks its checksum.
static int read_payload(Ckpt *ck, const CkptSection *s, uint8_t *buf, char *err, size_t errlen) {
    uint8_t *scratch = NULL;
    if (!buf && s->nbytes > 0) {
        scratch = malloc(s->nbytes < IO_CHUNK ? (size_t)s->nbytes : IO_CHUNK);
        if (!scratch) {
            snprintf(err, errlen, "%s: out of memory verifying section '%s'", ck->path, s->name);
            return -1;
        }
    }
    Hash64 h;
    hash_init(&h);
    int rc = 0;
    for (uint64_t done = 0; done < s->nbytes;) {
        size_t piece = s->nbytes - done < IO_CHUNK ? (size_t)(s->nbytes - done) : IO_CHUNK;
        uint8_t *dst = buf ? buf + done : scratch;
        if (read_at(ck->f, s->offset + done, dst, piece) != 0) {
            snprintf(err, errlen, "%s: section '%s': read failed at byte %llu: %s", ck->path, s->name,
                     (unsigned long long)(s->offset + done), read_error());
            rc = -1;
            break;
        }
        hash_update(&h, dst, piece);
        done += piece;
    }
    free(scratch);
    if (rc != 0) return -1;
    uint64_t got = hash_final(&h);
    if (got != s->hash) {
        snprintf(err, errlen, "%s: section '%s' is corrupt (checksum %016llx, table says %016llx)",
                 ck->path, s->name, (unsigned long long)got, (unsigned long long)s->hash);
        return -1;
    }
    return 0;
}

// Finds name and checks its dtype; NULL on error.
static const CkptSection *find_typed(const Ckpt *ck, const char *name, CkptDtype dtype, char *err,
                                     size_t errlen) {
    const CkptSection *s = ckpt_find(ck, name);
    if (!s) {
        snprintf(err, errlen, "%s: no section '%s'", ck->path, name);
        return NULL;
    }
    if (s->dtype != dtype) {
        snprintf(err, errlen, "%s: section '%s' holds %s data, expected %s", ck->path, name,
                 dtype_name(s->dtype), dtype_name(dtype));
        return NULL;
    }
    return s;
}

int ckpt_read(Ckpt *ck, const char *name, CkptDtype dtype, void *buf, uint64_t nbytes, char *err,
              size_t errlen) {
    const CkptSection *s = find_typed(ck, name, dtype, err, errlen);
    if (!s) return -1;
    if (s->nbytes != nbytes) {
        snprintf(err, errlen, "%s: section '%s' has %llu bytes, expected %llu", ck->path, name,
                 (unsigned long long)s->nbytes, (unsigned long long)nbytes);
        return -1;
    }
    if (nbytes > 0 && !buf) {
        snprintf(err, errlen, "%s: section '%s': no buffer to read into", ck->path, name);
        return -1;
    }
    return read_payload(ck, s, buf, err, errlen);
}

void *ckpt_read_alloc(Ckpt *ck, const char *name, CkptDtype dtype, uint64_t *nbytes, char *err,
                      size_t errlen) {
    const CkptSection *s = find_typed(ck, name, dtype, err, errlen);
    if (!s) return NULL;
    if (s->nbytes >= SIZE_MAX) {
        snprintf(err, errlen, "%s: section '%s' is too large for memory", ck->path, name);
        return NULL;
    }
    uint8_t *buf = malloc((size_t)s->nbytes + 1);  // + 1: a NUL after text
    if (!buf) {
        snprintf(err, errlen, "%s: out of memory for section '%s' (%llu bytes)", ck->path, name,
                 (unsigned long long)s->nbytes);
        return NULL;
    }
    if (read_payload(ck, s, buf, err, errlen) != 0) {
        free(buf);
        return NULL;
    }
    buf[s->nbytes] = 0;
    if (nbytes) *nbytes = s->nbytes;
    return buf;
}

int ckpt_verify(Ckpt *ck, char *err, size_t errlen) {
    for (int i = 0; i < ck->n; i++)
        if (read_payload(ck, &ck->secs[i], NULL, err, errlen) != 0) return -1;
    return 0;
}

// ---------------------------------------------------------------- directories

int ckpt_path(char *out, size_t outlen, const char *dir, int64_t step) {
    int k = snprintf(out, outlen, "%s/ckpt_%08lld.bin", dir, (long long)step);
    return k >= 0 && (size_t)k < outlen ? 0 : -1;
}

// The step of a canonical checkpoint file name, or -1 for any other name
// (.tmp files, other files, and non-canonical spellings such as ckpt_5.bin,
// which would otherwise name the same step twice).
static int64_t parse_ckpt_name(const char *name) {
    if (strncmp(name, "ckpt_", 5) != 0) return -1;
    const char *p = name + 5;
    int64_t step = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9'; p++, digits++) {
        if (digits == 18) return -1;  // keeps step within int64_t
        step = step * 10 + (*p - '0');
    }
    if (digits == 0 || strcmp(p, ".bin") != 0) return -1;
    char canon[64];  // "ckpt_" + at most 18 digits + ".bin"
    snprintf(canon, sizeof canon, "ckpt_%08lld.bin", (long long)step);
    return strcmp(canon, name) == 0 ? step : -1;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int ckpt_list(const char *dir, int64_t **steps, int *n, char *err, size_t errlen) {
    *steps = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) {
        if (errno == ENOENT) return 0;
        snprintf(err, errlen, "%s: cannot list checkpoint directory: %s", dir, strerror(errno));
        return -1;
    }
    int cap = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        int64_t step = parse_ckpt_name(de->d_name);
        if (step < 0) continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 16;
            int64_t *s = realloc(*steps, sizeof *s * (size_t)cap);
            if (!s) {
                snprintf(err, errlen, "%s: out of memory listing checkpoints", dir);
                free(*steps);
                *steps = NULL;
                *n = 0;
                closedir(d);
                return -1;
            }
            *steps = s;
        }
        (*steps)[(*n)++] = step;
    }
    closedir(d);
    if (*n > 0) qsort(*steps, (size_t)*n, sizeof **steps, cmp_i64);
    return 0;
}

// Opens path and checks every byte; 0 or -1 (message in err).
static int check_whole_file(const char *path, char *err, size_t errlen) {
    Ckpt *ck = ckpt_open(path, err, errlen);
    if (!ck) return -1;
    int rc = ckpt_verify(ck, err, errlen);
    ckpt_close(ck);
    return rc;
}

int ckpt_latest(const char *dir, int fallback, char *out, size_t outlen, int64_t *step, char *err,
                size_t errlen) {
    int64_t *steps;
    int n;
    if (ckpt_list(dir, &steps, &n, err, errlen) != 0) return -1;
    int rc = n == 0 ? 1 : -1;
    for (int i = n - 1; i >= 0; i--) {
        if (ckpt_path(out, outlen, dir, steps[i]) != 0) {
            snprintf(err, errlen, "%s: checkpoint path too long", dir);
            break;
        }
        char why[1024];
        if (check_whole_file(out, why, sizeof why) == 0) {
            if (step) *step = steps[i];
            rc = 0;
            break;
        }
        if (!fallback) {
            snprintf(err, errlen, "newest checkpoint is damaged: %s. Not falling back to an older one "
                     "silently: move the damaged file away, or name a checkpoint explicitly", why);
            break;
        }
        fprintf(stderr, "warning: skipping damaged checkpoint: %s\n", why);
        if (i == 0) snprintf(err, errlen, "%s: no undamaged checkpoint (last problem: %s)", dir, why);
    }
    free(steps);
    if (rc != 0 && outlen > 0) out[0] = '\0';
    return rc;
}

int ckpt_prune(const char *dir, int keep_last, int64_t protect_step, char *err, size_t errlen) {
    if (keep_last <= 0) return 0;
    int64_t *steps;
    int n;
    if (ckpt_list(dir, &steps, &n, err, errlen) != 0) return -1;
    int deleted = 0;
    // steps is ascending: the first n - keep_last are the older ones.
    for (int i = 0; i < n - keep_last; i++) {
        if (steps[i] == protect_step) continue;
        char path[4096];  // a path as long as the system allows
        if (ckpt_path(path, sizeof path, dir, steps[i]) != 0) {
            snprintf(err, errlen, "%s: checkpoint path too long", dir);
            deleted = -1;
            break;
        }
        if (unlink(path) != 0 && errno != ENOENT) {
            snprintf(err, errlen, "%s: cannot delete: %s", path, strerror(errno));
            deleted = -1;
            break;
        }
        deleted++;
    }
    free(steps);
    return deleted;
}

// mkdir -p: creates dir and any missing parents. 0, or -1 with errno set.
static int make_dirs(const char *dir) {
    char *p = copy_string(dir);
    if (!p) {
        errno = ENOMEM;
        return -1;
    }
    int rc = 0;
    for (char *q = p + 1; rc == 0; q++) {
        if (*q != '/' && *q != '\0') continue;
        char c = *q;
        *q = '\0';
        if (mkdir(p, 0777) != 0 && errno != EEXIST) rc = -1;
        *q = c;
        if (c == '\0') break;
    }
    free(p);
    return rc;
}

int ckpt_dir_lock(const char *dir, char *err, size_t errlen) {
    if (make_dirs(dir) != 0) {
        snprintf(err, errlen, "%s: cannot create checkpoint directory: %s", dir, strerror(errno));
        return -1;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "%s: not a directory", dir);
        return -1;
    }
    size_t n = strlen(dir) + sizeof "/" CKPT_LOCK_NAME;
    char *path = malloc(n);
    if (!path) {
        snprintf(err, errlen, "%s: out of memory", dir);
        return -1;
    }
    snprintf(path, n, "%s/%s", dir, CKPT_LOCK_NAME);
    // Creating the lock file also proves the directory writable before any training.
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) {
        snprintf(err, errlen, "%s: cannot create the lock file: %s", path, strerror(errno));
    } else if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK) {
            snprintf(err, errlen, "%s is in use by another trainer (it holds %s); two runs writing the same "
                     "checkpoints would overwrite each other", dir, path);
            close(fd);
            fd = -1;
        } else { // some network file systems have no flock: train unprotected rather than not at all
            fprintf(stderr, "warning: %s: cannot lock (%s): nothing stops a second trainer on this directory\n",
                    path, strerror(errno));
        }
    }
    free(path);
    return fd;
}

void ckpt_dir_unlock(int fd) {
    if (fd >= 0) close(fd);  // closing the last descriptor releases the flock
}
