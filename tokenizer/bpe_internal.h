// Internals shared by the files of tokenizer/: the Tokenizer struct, the
// validating builder every loader ends in, the hash maps, and small helpers.
// Not part of the public interface (that is bpe.h).
#ifndef MOE_BPE_INTERNAL_H
#define MOE_BPE_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "bpe.h"

// ---- hash maps -----------------------------------------------------------

// Byte string -> uint64 value, open addressing with linear probing. Keys are
// copied into an arena owned by the map. Empty keys cannot be stored (a slot
// with key_len 0 is free).
typedef struct {
    uint64_t hash;     // full hash of the key (0 in a free slot)
    uint64_t val;      // the caller's value
    uint64_t key_off;  // offset of the key bytes in keys
    uint32_t key_len;  // 0: free slot
} TokByteSlot;

typedef struct {
    TokByteSlot *slots;   // [cap], cap a power of two
    size_t cap;
    size_t n;             // occupied slots
    unsigned char *keys;  // [keys_cap] arena of key bytes
    size_t keys_len, keys_cap;
} TokByteMap;

int tok_bytemap_init(TokByteMap *m, size_t expected);  // 0 or -1
void tok_bytemap_free(TokByteMap *m);
uint64_t tok_hash_bytes(const void *data, size_t len);
// Pointer to the value of key, or NULL when absent.
uint64_t *tok_bytemap_find(const TokByteMap *m, const void *key, size_t len, uint64_t hash);
// Pointer to the value of key, inserting it with value 0 (and *created = 1)
// when absent. NULL when out of memory or len is 0 or > UINT32_MAX.
uint64_t *tok_bytemap_insert(TokByteMap *m, const void *key, size_t len, uint64_t hash, int *created);
static inline const unsigned char *tok_bytemap_key(const TokByteMap *m, const TokByteSlot *s) {
    return m->keys + s->key_off;
}

// Pair of ids (left, right) -> uint32 value, open addressing. The key is
// left << 32 | right; UINT64_MAX marks a free slot (ids are < UINT32_MAX).
typedef struct {
    uint64_t *keys;  // [cap]
    uint32_t *vals;  // [cap]
    size_t cap;      // power of two
    unsigned shift;  // 64 - log2(cap): the slot is the top bits of the hash
    size_t n;
} TokPairMap;

int tok_pairmap_init(TokPairMap *m, size_t expected);
void tok_pairmap_free(TokPairMap *m);
static inline uint64_t tok_pair_key(uint32_t left, uint32_t right) {
    return (uint64_t)left << 32 | right;
}
static inline size_t tok_pair_slot(uint64_t key, unsigned shift) {
    // Fibonacci hashing: the top bits of the product depend on every key bit.
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> shift);
}
// Value of (left, right) or UINT32_MAX when absent. Inline: the encoder's hot loop.
static inline uint32_t tok_pairmap_get(const TokPairMap *m, uint32_t left, uint32_t right) {
    uint64_t key = tok_pair_key(left, right);
    for (size_t i = tok_pair_slot(key, m->shift);; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == key) return m->vals[i];
        if (m->keys[i] == UINT64_MAX) return UINT32_MAX;
    }
}
// Pointer to the value of (left, right), inserting it with value init when
// absent (*created = 1). NULL when out of memory.
uint32_t *tok_pairmap_insert(TokPairMap *m, uint32_t left, uint32_t right, uint32_t init, int *created);

// ---- the tokenizer -------------------------------------------------------

typedef struct {
    uint32_t left, right, result;  // merge: left followed by right becomes result
} TokMerge;

struct Tokenizer {
    uint32_t n_vocab;            // V: ids 0..V-1
    uint32_t n_merges;           // M
    uint32_t n_special;          // S
    uint32_t eot_id;             // TOK_NO_ID when there is none
    uint64_t *tok_off;           // [V] where each token's bytes start in tok_bytes
    uint32_t *tok_len;           // [V] byte length; 0 for an id no token uses
    unsigned char *tok_bytes;    // [sum of tok_len] every token's bytes back to back
    uint8_t *is_special;         // [V] 1 for special tokens
    uint32_t byte_id[256];       // id of the one-byte (non-special) token of each byte
    TokMerge *merges;            // [M] in rank order (rank 0 is applied first)
    TokPairMap rank_of;          // (left, right) -> rank
    uint32_t *specials;          // [S] special ids in increasing id order
    uint32_t *special_match;     // [S] the same ids, longest string first (matching order)
    uint8_t special_first[256];  // 1 where some special string starts with that byte
};

// Everything a tokenizer is made of, as a loader or the trainer collects it.
// tok_build copies it, derives each merge's result (the normal token whose
// bytes are left's followed by right's) and validates the whole.
typedef struct {
    uint32_t n_vocab;                 // V
    const uint64_t *tok_off;          // [V] offsets into tok_bytes
    const uint32_t *tok_len;          // [V] 0: unused id (allowed for imports)
    const unsigned char *tok_bytes;
    const uint8_t *is_special;        // [V]
    const uint32_t *merges;           // [2M] (left, right) pairs in rank order
    uint32_t n_merges;                // M
    uint32_t eot_id;                  // a special id, or TOK_NO_ID
} TokSpec;

// source names the file (or "trainer") in error messages.
Tokenizer *tok_build(const TokSpec *spec, const char *source, char *err, size_t errlen);

// ---- helpers -------------------------------------------------------------

// snprintf into err when err is not NULL; always returns -1 for "return tok_fail(...)".
int tok_fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
// Writes bytes as a printable quoted string (C escapes for the rest) into
// out[outlen], truncating long strings with "...". For messages and `info`.
void tok_quote(const unsigned char *s, size_t len, char *out, size_t outlen);
// Reads a whole file into a malloc'ed buffer (with a NUL after the end).
char *tok_read_file(const char *path, size_t *len, char *err, size_t errlen);
// Writes data to path via path.tmp.<pid>, fflush + fsync, then rename.
int tok_write_file_atomic(const char *path, const void *data, size_t len, char *err, size_t errlen);
// CRC-32 (IEEE 802.3 polynomial, as zlib computes it) of len bytes.
uint32_t tok_crc32(const void *data, size_t len);

#endif
