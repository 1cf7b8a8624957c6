// Token shard file format: a fixed 64-byte header followed by the tokens,
// little-endian, 2 or 4 bytes each. This module owns the byte layout (see
// docs/data.md), the writer (temporary name, fsync, rename) and the reader
// (header validation, random-access reads through mmap). All offsets are
// 64-bit: a shard may hold more than 2^32 tokens.
#ifndef MOE_SHARD_H
#define MOE_SHARD_H

#include <stddef.h>
#include <stdint.h>

#define SHARD_MAGIC "MOESHARD"  // 8 bytes at offset 0, no terminating NUL in the file
#define SHARD_VERSION 1u
#define SHARD_HEADER_SIZE 64u
// The largest vocabulary whose ids are stored in 2 bytes; larger ones use 4.
#define SHARD_MAX_VOCAB_U16 65535u
// Token ids reach the trainer as int32, so a vocabulary may not exceed this.
#define SHARD_MAX_VOCAB 2147483647u

// The decoded header fields.
typedef struct {
    uint32_t version;     // SHARD_VERSION
    uint32_t token_bytes; // 2 or 4, always shard_token_bytes(vocab_size)
    uint64_t n_tokens;    // tokens in the body
    uint32_t vocab_size;  // every token id is < vocab_size
} ShardHeader;

// The token width a shard with this vocabulary uses: 2 up to
// SHARD_MAX_VOCAB_U16, else 4.
uint32_t shard_token_bytes(uint32_t vocab_size);

// Byte offset of token `index` in a shard of the given width (64-bit, so a
// shard past 2 GiB or 4 GiB is addressed correctly).
uint64_t shard_token_offset(uint64_t index, uint32_t token_bytes);

// Encodes h into the 64 header bytes (magic, fields, zero reserved bytes).
void shard_header_encode(const ShardHeader *h, uint8_t out[SHARD_HEADER_SIZE]);

// Decodes and checks the 64 header bytes read from `path` (used only in
// messages). Checks magic, version, width, vocabulary and that the reserved
// bytes are zero. On error writes a message naming the file into err, returns -1.
int shard_header_decode(const uint8_t in[SHARD_HEADER_SIZE], const char *path,
                        ShardHeader *h, char *err, size_t errlen);

// ---------------------------------------------------------------- writer

typedef struct ShardWriter ShardWriter;

// Starts a shard at `path`. The data goes to "<path>.tmp" until
// shard_writer_close renames it, so `path` never holds a half-written shard.
// Returns NULL with a message in err on failure (bad vocabulary, cannot create).
ShardWriter *shard_writer_open(const char *path, uint32_t vocab_size, char *err, size_t errlen);

// Appends n tokens. If any token is >= the vocabulary size nothing of this call
// is written, err names the file, the token and its index in `tokens`, and -1
// is returned; the writer stays usable. Returns -1 on a write error too.
int shard_writer_append(ShardWriter *w, const uint32_t *tokens, size_t n, char *err, size_t errlen);

// Tokens appended so far.
uint64_t shard_writer_count(const ShardWriter *w);

// Writes the header with the final count, flushes, fsyncs, renames the
// temporary file to its final name and fsyncs the directory. Frees w whatever
// happens; on failure removes the temporary file and returns -1 with err set.
int shard_writer_close(ShardWriter *w, char *err, size_t errlen);

// Gives up: removes the temporary file and frees w. NULL is allowed.
void shard_writer_abort(ShardWriter *w);

// One call: writes n tokens to a complete shard at `path`.
int shard_write_file(const char *path, const uint32_t *tokens, size_t n, uint32_t vocab_size,
                     char *err, size_t errlen);

// ---------------------------------------------------------------- reader

typedef struct {
    char *path;          // owned copy, for messages
    ShardHeader header;
    const uint8_t *map;  // the whole file, read-only (NULL when unmapped)
    size_t map_bytes;    // == SHARD_HEADER_SIZE + n_tokens * token_bytes
} Shard;

// Opens and validates a shard: header checks plus the file size, which must be
// exactly header + n_tokens * token_bytes. Token values are checked later, by
// shard_read. On error writes a message naming the file, returns -1, and
// leaves s closed (shard_close on it is harmless).
int shard_open(Shard *s, const char *path, char *err, size_t errlen);

// Reads tokens [start, start + n) into out (n entries), checking each id
// against the vocabulary size. Returns -1 with a message naming the file for a
// range past the end or an out-of-range token id.
int shard_read(const Shard *s, uint64_t start, uint64_t n, uint32_t *out, char *err, size_t errlen);

// Unmaps and frees; s is zeroed. Safe on a zeroed or already closed Shard.
void shard_close(Shard *s);

#endif
