// Token shard file format: header encoding/validation, the writer and the
// mmap-based reader. The byte layout is documented in docs/data.md; every
// multi-byte field is little-endian and encoded byte by byte, so the files are
// the same on any host.
#if !defined(_GNU_SOURCE) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700 // fseeko, fsync, mmap, pread
#endif
#ifndef _FILE_OFFSET_BITS
#define _FILE_OFFSET_BITS 64 // 64-bit off_t on 32-bit hosts too
#endif

#include "shard.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../util/file.h"
#include "../util/util.h"

// Header field offsets (bytes from the start of the file).
enum {
    OFF_MAGIC = 0,       // u8[8]
    OFF_VERSION = 8,     // u32
    OFF_TOKEN_BYTES = 12,// u32
    OFF_N_TOKENS = 16,   // u64
    OFF_VOCAB = 24,      // u32
    OFF_RESERVED = 28,   // u8[36], zero
};

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

uint32_t shard_token_bytes(uint32_t vocab_size) {
    return vocab_size <= SHARD_MAX_VOCAB_U16 ? 2u : 4u;
}

uint64_t shard_token_offset(uint64_t index, uint32_t token_bytes) {
    return (uint64_t)SHARD_HEADER_SIZE + index * (uint64_t)token_bytes;
}

void shard_header_encode(const ShardHeader *h, uint8_t out[SHARD_HEADER_SIZE]) {
    memset(out, 0, SHARD_HEADER_SIZE); // reserved bytes are zero
    memcpy(out + OFF_MAGIC, SHARD_MAGIC, 8);
    put_u32(out + OFF_VERSION, h->version);
    put_u32(out + OFF_TOKEN_BYTES, h->token_bytes);
    put_u64(out + OFF_N_TOKENS, h->n_tokens);
    put_u32(out + OFF_VOCAB, h->vocab_size);
}

int shard_header_decode(const uint8_t in[SHARD_HEADER_SIZE], const char *path,
                        ShardHeader *h, char *err, size_t errlen) {
    if (memcmp(in + OFF_MAGIC, SHARD_MAGIC, 8) != 0) {
        util_set_err(err, errlen, "%s: not a token shard (the first 8 bytes are not \"%s\")",
                path, SHARD_MAGIC);
        return -1;
    }
    h->version = get_u32(in + OFF_VERSION);
    h->token_bytes = get_u32(in + OFF_TOKEN_BYTES);
    h->n_tokens = get_u64(in + OFF_N_TOKENS);
    h->vocab_size = get_u32(in + OFF_VOCAB);
    if (h->version != SHARD_VERSION) {
        util_set_err(err, errlen, "%s: unsupported shard format version %" PRIu32
                " (this build reads version %u)", path, h->version, SHARD_VERSION);
        return -1;
    }
    if (h->vocab_size == 0 || h->vocab_size > SHARD_MAX_VOCAB) {
        util_set_err(err, errlen, "%s: vocabulary size %" PRIu32 " in the header is out of range"
                " (1..%u)", path, h->vocab_size, SHARD_MAX_VOCAB);
        return -1;
    }
    // One width per vocabulary keeps a single rule for writer and reader.
    if (h->token_bytes != shard_token_bytes(h->vocab_size)) {
        util_set_err(err, errlen, "%s: token width %" PRIu32 " bytes in the header, but a vocabulary"
                " of %" PRIu32 " is stored with %" PRIu32 "-byte tokens", path, h->token_bytes,
                h->vocab_size, shard_token_bytes(h->vocab_size));
        return -1;
    }
    for (unsigned i = OFF_RESERVED; i < SHARD_HEADER_SIZE; i++) {
        if (in[i] != 0) {
            util_set_err(err, errlen, "%s: reserved header byte %u is not zero", path, i);
            return -1;
        }
    }
    return 0;
}

// ---------------------------------------------------------------- writer

struct ShardWriter {
    FILE *f;           // the temporary file
    char *path;        // final name
    char *tmp_path;    // path + ".tmp"
    uint32_t vocab_size;
    uint32_t token_bytes;
    uint64_t count;    // tokens written so far
};

static void writer_free(ShardWriter *w) {
    free(w->path);
    free(w->tmp_path);
    free(w);
}

ShardWriter *shard_writer_open(const char *path, uint32_t vocab_size, char *err, size_t errlen) {
    if (vocab_size == 0 || vocab_size > SHARD_MAX_VOCAB) {
        util_set_err(err, errlen, "%s: vocabulary size %" PRIu32 " is out of range (1..%u)",
                path, vocab_size, SHARD_MAX_VOCAB);
        return NULL;
    }
    ShardWriter *w = calloc(1, sizeof *w);
    if (!w) {
        util_set_err(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    size_t n = strlen(path);
    w->path = dup_str(path);
    w->tmp_path = malloc(n + 5); // ".tmp" + NUL
    if (!w->path || !w->tmp_path) {
        util_set_err(err, errlen, "%s: out of memory", path);
        writer_free(w);
        return NULL;
    }
    memcpy(w->tmp_path, path, n);
    memcpy(w->tmp_path + n, ".tmp", 5);
    w->vocab_size = vocab_size;
    w->token_bytes = shard_token_bytes(vocab_size);
    w->f = fopen(w->tmp_path, "wb");
    if (!w->f) {
        util_set_err(err, errlen, "%s: cannot create: %s", w->tmp_path, strerror(errno));
        writer_free(w);
        return NULL;
    }
    // A placeholder header reserves the space; close rewrites it with the count.
    ShardHeader h = {SHARD_VERSION, w->token_bytes, 0, vocab_size};
    uint8_t buf[SHARD_HEADER_SIZE];
    shard_header_encode(&h, buf);
    if (fwrite(buf, 1, sizeof buf, w->f) != sizeof buf) {
        util_set_err(err, errlen, "%s: write failed: %s", w->tmp_path, strerror(errno));
        shard_writer_abort(w);
        return NULL;
    }
    return w;
}

int shard_writer_append(ShardWriter *w, const uint32_t *tokens, size_t n, char *err, size_t errlen) {
    // Check everything first so a rejected call leaves the file unchanged.
    for (size_t i = 0; i < n; i++) {
        if (tokens[i] >= w->vocab_size) {
            util_set_err(err, errlen, "%s: token id %" PRIu32 " (at index %zu of this append) is >="
                    " the vocabulary size %" PRIu32, w->path, tokens[i], i, w->vocab_size);
            return -1;
        }
    }
    if ((uint64_t)n > UINT64_MAX / 4 - w->count) {
        util_set_err(err, errlen, "%s: token count overflows", w->path);
        return -1;
    }
    enum { CHUNK = 4096 };
    uint8_t buf[CHUNK * 4]; // CHUNK tokens of at most 4 bytes
    size_t tb = w->token_bytes;
    for (size_t done = 0; done < n;) {
        size_t m = n - done < CHUNK ? n - done : CHUNK;
        for (size_t i = 0; i < m; i++) {
            uint32_t t = tokens[done + i];
            for (size_t b = 0; b < tb; b++) buf[i * tb + b] = (uint8_t)(t >> (8 * b));
        }
        if (fwrite(buf, tb, m, w->f) != m) {
            util_set_err(err, errlen, "%s: write failed: %s", w->tmp_path, strerror(errno));
            return -1;
        }
        done += m;
    }
    w->count += n;
    return 0;
}

uint64_t shard_writer_count(const ShardWriter *w) { return w->count; }

// Makes the rename durable. Filesystems that cannot sync a directory report
// EINVAL; that is not an error of ours.
static int fsync_parent_dir(const char *path, char *err, size_t errlen) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? malloc((size_t)(slash - path) + 2) : dup_str(".");
    if (!dir) {
        util_set_err(err, errlen, "%s: out of memory", path);
        return -1;
    }
    if (slash) {
        size_t n = slash == path ? 1 : (size_t)(slash - path); // "/x" -> "/"
        memcpy(dir, path, n);
        dir[n] = 0;
    }
    int rc = 0;
    int fd = open(dir, O_RDONLY);
    if (fd < 0) {
        util_set_err(err, errlen, "%s: cannot open directory %s to sync it: %s", path, dir, strerror(errno));
        rc = -1;
    } else {
        if (fsync(fd) != 0 && errno != EINVAL) {
            util_set_err(err, errlen, "%s: cannot sync directory %s: %s", path, dir, strerror(errno));
            rc = -1;
        }
        close(fd);
    }
    free(dir);
    return rc;
}

int shard_writer_close(ShardWriter *w, char *err, size_t errlen) {
    ShardHeader h = {SHARD_VERSION, w->token_bytes, w->count, w->vocab_size};
    uint8_t buf[SHARD_HEADER_SIZE];
    shard_header_encode(&h, buf);
    const char *step = NULL;
    if (fflush(w->f) != 0) step = "flush";
    else if (fseeko(w->f, 0, SEEK_SET) != 0) step = "seek";
    else if (fwrite(buf, 1, sizeof buf, w->f) != sizeof buf) step = "header write";
    else if (fflush(w->f) != 0) step = "flush";
    else if (fsync(fileno(w->f)) != 0) step = "fsync";
    if (step) {
        util_set_err(err, errlen, "%s: %s failed: %s", w->tmp_path, step, strerror(errno));
        shard_writer_abort(w);
        return -1;
    }
    FILE *f = w->f;
    w->f = NULL;
    if (fclose(f) != 0) {
        util_set_err(err, errlen, "%s: close failed: %s", w->tmp_path, strerror(errno));
        shard_writer_abort(w);
        return -1;
    }
    if (rename(w->tmp_path, w->path) != 0) {
        util_set_err(err, errlen, "%s: cannot rename %s to it: %s", w->path, w->tmp_path, strerror(errno));
        shard_writer_abort(w);
        return -1;
    }
    int rc = fsync_parent_dir(w->path, err, errlen);
    writer_free(w);
    return rc;
}

void shard_writer_abort(ShardWriter *w) {
    if (!w) return;
    if (w->f) fclose(w->f); // the file is being thrown away; its close status is moot
    remove(w->tmp_path);
    writer_free(w);
}

int shard_write_file(const char *path, const uint32_t *tokens, size_t n, uint32_t vocab_size,
                     char *err, size_t errlen) {
    ShardWriter *w = shard_writer_open(path, vocab_size, err, errlen);
    if (!w) return -1;
    if (shard_writer_append(w, tokens, n, err, errlen) != 0) {
        shard_writer_abort(w);
        return -1;
    }
    return shard_writer_close(w, err, errlen);
}

// ---------------------------------------------------------------- reader

// Reads exactly n bytes at offset off; pread may return short counts.
static int read_exact(int fd, uint8_t *buf, size_t n, off_t off) {
    while (n > 0) {
        ssize_t r = pread(fd, buf, n, off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        buf += r;
        n -= (size_t)r;
        off += r;
    }
    return 0;
}

// Checks the file size against the header: it must be exactly the header plus
// n_tokens * token_bytes.
static int check_size(const char *path, const ShardHeader *h, uint64_t file_bytes,
                      char *err, size_t errlen) {
    if (h->n_tokens > (UINT64_MAX - SHARD_HEADER_SIZE) / h->token_bytes) {
        util_set_err(err, errlen, "%s: header token count %" PRIu64 " is impossibly large",
                path, h->n_tokens);
        return -1;
    }
    uint64_t want = shard_token_offset(h->n_tokens, h->token_bytes);
    if (file_bytes != want) {
        util_set_err(err, errlen, "%s: %s: header says %" PRIu64 " tokens (%" PRIu64 " bytes with"
                " the %u-byte header) but the file has %" PRIu64 " bytes", path,
                file_bytes < want ? "truncated" : "extra bytes", h->n_tokens, want,
                SHARD_HEADER_SIZE, file_bytes);
        return -1;
    }
    if (want > SIZE_MAX) {
        util_set_err(err, errlen, "%s: %" PRIu64 " bytes is too large to map on this host", path, want);
        return -1;
    }
    return 0;
}

int shard_open(Shard *s, const char *path, char *err, size_t errlen) {
    memset(s, 0, sizeof *s);
    // A regular file only: opening a FIFO would wait for a writer, and a
    // device has no size to check the header against.
    uint64_t file_bytes;
    int fd = util_open_regular(path, 0, &file_bytes, err, errlen);
    if (fd < 0) return -1;
    uint8_t buf[SHARD_HEADER_SIZE];
    if (file_bytes < SHARD_HEADER_SIZE) {
        util_set_err(err, errlen, "%s: file has %" PRIu64 " bytes, fewer than the %u-byte shard header",
                path, file_bytes, SHARD_HEADER_SIZE);
        goto fail;
    }
    if (read_exact(fd, buf, sizeof buf, 0) != 0) {
        util_set_err(err, errlen, "%s: cannot read the header: %s", path, strerror(errno));
        goto fail;
    }
    if (shard_header_decode(buf, path, &s->header, err, errlen) != 0) goto fail;
    if (check_size(path, &s->header, file_bytes, err, errlen) != 0) goto fail;
    s->path = dup_str(path);
    if (!s->path) {
        util_set_err(err, errlen, "%s: out of memory", path);
        goto fail;
    }
    s->map_bytes = (size_t)file_bytes;
    void *m = mmap(NULL, s->map_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
        util_set_err(err, errlen, "%s: mmap of %zu bytes failed: %s", path, s->map_bytes, strerror(errno));
        goto fail;
    }
    s->map = m;
    // The mapping outlives the descriptor; closing it now lets a loader hold
    // thousands of shards without running into the open-file limit.
    close(fd);
    return 0;
fail:
    close(fd);
    shard_close(s);
    return -1;
}

int shard_read(const Shard *s, uint64_t start, uint64_t n, uint32_t *out, char *err, size_t errlen) {
    const ShardHeader *h = &s->header;
    if (start > h->n_tokens || n > h->n_tokens - start) {
        util_set_err(err, errlen, "%s: read of %" PRIu64 " tokens at %" PRIu64 " goes past the end"
                " (%" PRIu64 " tokens)", s->path, n, start, h->n_tokens);
        return -1;
    }
    const uint8_t *p = s->map + shard_token_offset(start, h->token_bytes);
    for (uint64_t i = 0; i < n; i++) {
        uint32_t t;
        if (h->token_bytes == 2) {
            t = (uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 8;
        } else {
            t = get_u32(p + 4 * i);
        }
        if (t >= h->vocab_size) {
            util_set_err(err, errlen, "%s: token id %" PRIu32 " at index %" PRIu64 " is >= the"
                    " vocabulary size %" PRIu32, s->path, t, start + i, h->vocab_size);
            return -1;
        }
        out[i] = t;
    }
    return 0;
}

void shard_close(Shard *s) {
    if (s->map) munmap((void *)s->map, s->map_bytes);
    free(s->path);
    memset(s, 0, sizeof *s);
}
