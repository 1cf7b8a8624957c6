// The tokenizer object: the validating builder every loader and the trainer
// end in, construction from a merge list, decoding, and the small query
// functions. Encoding is in bpe_encode.c.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe_internal.h"

// ---- building ------------------------------------------------------------

void tok_free(Tokenizer *t) {
    if (!t) return;
    free(t->tok_off);
    free(t->tok_len);
    free(t->tok_bytes);
    free(t->is_special);
    free(t->merges);
    tok_pairmap_free(&t->rank_of);
    free(t->specials);
    free(t->special_match);
    free(t);
}

// Copies the token table of spec into t.
static int copy_tokens(Tokenizer *t, const TokSpec *spec, const char *source, char *err, size_t errlen) {
    uint32_t V = spec->n_vocab;
    uint64_t total = 0;
    for (uint32_t id = 0; id < V; id++) total += spec->tok_len[id];
    t->tok_off = malloc(V * sizeof *t->tok_off);
    t->tok_len = malloc(V * sizeof *t->tok_len);
    t->is_special = malloc(V);
    t->tok_bytes = malloc(total ? total : 1);
    if (!t->tok_off || !t->tok_len || !t->is_special || !t->tok_bytes)
        return tok_fail(err, errlen, "%s: out of memory for %u tokens", source, V);
    uint64_t off = 0;
    for (uint32_t id = 0; id < V; id++) {
        t->tok_off[id] = off;
        t->tok_len[id] = spec->tok_len[id];
        t->is_special[id] = spec->is_special[id] ? 1 : 0;
        memcpy(t->tok_bytes + off, spec->tok_bytes + spec->tok_off[id], spec->tok_len[id]);
        off += spec->tok_len[id];
    }
    return 0;
}

// Maps the bytes of every normal token to its id; rejects duplicates, empty
// specials, and a missing one-byte token.
static int index_tokens(Tokenizer *t, TokByteMap *by_bytes, const char *source, char *err, size_t errlen) {
    char q[96];
    for (uint32_t id = 0; id < t->n_vocab; id++) {
        const unsigned char *s = t->tok_bytes + t->tok_off[id];
        uint32_t len = t->tok_len[id];
        if (t->is_special[id]) {
            if (len == 0) return tok_fail(err, errlen, "%s: special token %u has no bytes", source, id);
            t->n_special++;
            continue;
        }
        if (len == 0) continue;  // an id no token uses (possible in imported vocabularies)
        int created;
        uint64_t *v = tok_bytemap_insert(by_bytes, s, len, tok_hash_bytes(s, len), &created);
        if (!v) return tok_fail(err, errlen, "%s: out of memory", source);
        if (!created) {
            tok_quote(s, len, q, sizeof q);
            return tok_fail(err, errlen, "%s: tokens %u and %u have the same bytes %s",
                            source, (uint32_t)*v, id, q);
        }
        *v = id;
    }
    for (int b = 0; b < 256; b++) {
        unsigned char c = (unsigned char)b;
        uint64_t *v = tok_bytemap_find(by_bytes, &c, 1, tok_hash_bytes(&c, 1));
        if (!v)
            return tok_fail(err, errlen, "%s: no token for byte 0x%02x (byte-level BPE needs all 256)",
                            source, b);
        t->byte_id[b] = (uint32_t)*v;
    }
    return 0;
}

// Derives each merge's result and fills the rank map, rejecting merges of
// unknown or special ids, merges whose joined bytes are not a token, and a
// pair listed twice.
static int index_merges(Tokenizer *t, const TokSpec *spec, const TokByteMap *by_bytes,
                        const char *source, char *err, size_t errlen) {
    uint32_t M = spec->n_merges;
    t->merges = malloc((M ? M : 1) * sizeof *t->merges);
    if (!t->merges || tok_pairmap_init(&t->rank_of, M) != 0)
        return tok_fail(err, errlen, "%s: out of memory for %u merges", source, M);
    unsigned char *joined = NULL;  // [len(left) + len(right)] scratch
    size_t joined_cap = 0;
    char q[96];
    for (uint32_t r = 0; r < M; r++) {
        uint32_t a = spec->merges[2 * r], b = spec->merges[2 * r + 1];
        if (a >= t->n_vocab || b >= t->n_vocab) {
            free(joined);
            return tok_fail(err, errlen, "%s: merge %u (%u, %u) names an id >= vocab size %u",
                            source, r, a, b, t->n_vocab);
        }
        if (t->is_special[a] || t->is_special[b] || t->tok_len[a] == 0 || t->tok_len[b] == 0) {
            free(joined);
            return tok_fail(err, errlen, "%s: merge %u (%u, %u) uses a special or unused id",
                            source, r, a, b);
        }
        size_t la = t->tok_len[a], lb = t->tok_len[b];
        if (la + lb > joined_cap) {
            joined_cap = 2 * (la + lb);
            unsigned char *j = realloc(joined, joined_cap);
            if (!j) {
                free(joined);
                return tok_fail(err, errlen, "%s: out of memory", source);
            }
            joined = j;
        }
        memcpy(joined, t->tok_bytes + t->tok_off[a], la);
        memcpy(joined + la, t->tok_bytes + t->tok_off[b], lb);
        uint64_t *v = tok_bytemap_find(by_bytes, joined, la + lb, tok_hash_bytes(joined, la + lb));
        if (!v) {
            tok_quote(joined, la + lb, q, sizeof q);
            free(joined);
            return tok_fail(err, errlen, "%s: merge %u (%u, %u) makes %s, which is not a token",
                            source, r, a, b, q);
        }
        t->merges[r] = (TokMerge){a, b, (uint32_t)*v};
        int created;
        uint32_t *rank = tok_pairmap_insert(&t->rank_of, a, b, r, &created);
        if (!rank || !created) {
            free(joined);
            if (!rank) return tok_fail(err, errlen, "%s: out of memory", source);
            return tok_fail(err, errlen, "%s: merges %u and %u are the same pair (%u, %u)",
                            source, *rank, r, a, b);
        }
    }
    free(joined);
    t->n_merges = M;
    return 0;
}

typedef struct {
    uint32_t len, id;
} LenId;

static int longer_first(const void *pa, const void *pb) {
    const LenId *a = pa, *b = pb;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

// Lists the specials, in id order and longest-first for matching, and checks
// that no two share a string and that the EOT is one of them.
static int index_specials(Tokenizer *t, uint32_t eot_id, const char *source, char *err, size_t errlen) {
    uint32_t S = t->n_special;
    t->specials = malloc((S ? S : 1) * sizeof *t->specials);
    t->special_match = malloc((S ? S : 1) * sizeof *t->special_match);
    if (!t->specials || !t->special_match) return tok_fail(err, errlen, "%s: out of memory", source);
    LenId *order = malloc((S ? S : 1) * sizeof *order);  // [S] for sorting longest-first
    if (!order) return tok_fail(err, errlen, "%s: out of memory", source);
    uint32_t k = 0;
    for (uint32_t id = 0; id < t->n_vocab; id++) {
        if (!t->is_special[id]) continue;
        t->specials[k] = id;
        order[k++] = (LenId){t->tok_len[id], id};
    }
    // Longest first, so that a special that is a prefix of another never hides it.
    qsort(order, S, sizeof *order, longer_first);
    for (k = 0; k < S; k++) t->special_match[k] = order[k].id;
    free(order);
    for (uint32_t i = 0; i + 1 < S; i++) {
        uint32_t a = t->special_match[i], b = t->special_match[i + 1];
        if (t->tok_len[a] == t->tok_len[b] &&
            memcmp(t->tok_bytes + t->tok_off[a], t->tok_bytes + t->tok_off[b], t->tok_len[a]) == 0)
            return tok_fail(err, errlen, "%s: special tokens %u and %u have the same string", source, a, b);
    }
    memset(t->special_first, 0, sizeof t->special_first);
    for (uint32_t i = 0; i < S; i++) t->special_first[t->tok_bytes[t->tok_off[t->specials[i]]]] = 1;
    if (eot_id != TOK_NO_ID && (eot_id >= t->n_vocab || !t->is_special[eot_id]))
        return tok_fail(err, errlen, "%s: end-of-text id %u is not a special token", source, eot_id);
    t->eot_id = eot_id;
    return 0;
}

Tokenizer *tok_build(const TokSpec *spec, const char *source, char *err, size_t errlen) {
    if (spec->n_vocab < 256 || spec->n_vocab > (1u << 30)) {
        tok_fail(err, errlen, "%s: vocab size %u is outside [256, 2^30]", source, spec->n_vocab);
        return NULL;
    }
    Tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        tok_fail(err, errlen, "%s: out of memory", source);
        return NULL;
    }
    t->n_vocab = spec->n_vocab;
    TokByteMap by_bytes;  // normal token bytes -> id, only while building
    if (tok_bytemap_init(&by_bytes, spec->n_vocab) != 0) {
        tok_fail(err, errlen, "%s: out of memory", source);
        tok_free(t);
        return NULL;
    }
    int rc = copy_tokens(t, spec, source, err, errlen);
    if (rc == 0) rc = index_tokens(t, &by_bytes, source, err, errlen);
    if (rc == 0) rc = index_merges(t, spec, &by_bytes, source, err, errlen);
    if (rc == 0) rc = index_specials(t, spec->eot_id, source, err, errlen);
    tok_bytemap_free(&by_bytes);
    if (rc != 0) {
        tok_free(t);
        return NULL;
    }
    return t;
}

Tokenizer *tok_create(const uint32_t *merges, size_t n_merges, const char *const *specials,
                      size_t n_specials, char *err, size_t errlen) {
    const char *src = "tok_create";
    if (n_merges + n_specials > (1u << 30) - 256) {
        tok_fail(err, errlen, "%s: too many merges or specials", src);
        return NULL;
    }
    uint32_t V = (uint32_t)(256 + n_merges + n_specials);
    uint64_t *off = malloc(V * sizeof *off);
    uint32_t *len = malloc(V * sizeof *len);
    uint8_t *special = calloc(V, 1);
    unsigned char *bytes = NULL;
    Tokenizer *t = NULL;
    uint32_t eot = TOK_NO_ID;
    if (!off || !len || !special) {
        tok_fail(err, errlen, "%s: out of memory", src);
        goto done;
    }
    // Token lengths first (merge r joins two earlier tokens), then the bytes.
    uint64_t total = 256;
    for (uint32_t id = 0; id < 256; id++) len[id] = 1;
    for (size_t r = 0; r < n_merges; r++) {
        uint32_t a = merges[2 * r], b = merges[2 * r + 1], id = (uint32_t)(256 + r);
        if (a >= id || b >= id) {
            tok_fail(err, errlen, "%s: merge %zu (%u, %u) uses an id not defined before it", src, r, a, b);
            goto done;
        }
        uint64_t l = (uint64_t)len[a] + len[b];
        if (l > UINT32_MAX) {
            tok_fail(err, errlen, "%s: merge %zu makes a token over 4 GiB", src, r);
            goto done;
        }
        len[id] = (uint32_t)l;
        total += l;
    }
    for (size_t i = 0; i < n_specials; i++) {
        size_t l = strlen(specials[i]);
        len[256 + n_merges + i] = (uint32_t)l;
        total += l;
        special[256 + n_merges + i] = 1;
        if (eot == TOK_NO_ID && strcmp(specials[i], TOK_EOT_STRING) == 0) eot = (uint32_t)(256 + n_merges + i);
    }
    bytes = malloc(total ? total : 1);
    if (!bytes) {
        tok_fail(err, errlen, "%s: out of memory", src);
        goto done;
    }
    uint64_t o = 0;
    for (uint32_t id = 0; id < V; id++) {
        off[id] = o;
        if (id < 256) {
            bytes[o] = (unsigned char)id;
        } else if (id < 256 + n_merges) {
            uint32_t a = merges[2 * (id - 256)], b = merges[2 * (id - 256) + 1];
            memcpy(bytes + o, bytes + off[a], len[a]);
            memcpy(bytes + o + len[a], bytes + off[b], len[b]);
        } else {
            memcpy(bytes + o, specials[id - 256 - n_merges], len[id]);
        }
        o += len[id];
    }
    TokSpec spec = {V, off, len, bytes, special, merges, (uint32_t)n_merges, eot};
    t = tok_build(&spec, src, err, errlen);
done:
    free(off);
    free(len);
    free(special);
    free(bytes);
    return t;
}

// ---- decoding ------------------------------------------------------------

size_t tok_decode(const Tokenizer *t, const uint32_t *ids, size_t n, char **text_out) {
    *text_out = NULL;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] >= t->n_vocab) return TOK_ERROR;
        total += t->tok_len[ids[i]];
    }
    char *out = malloc(total + 1);
    if (!out) return TOK_ERROR;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        memcpy(out + o, t->tok_bytes + t->tok_off[ids[i]], t->tok_len[ids[i]]);
        o += t->tok_len[ids[i]];
    }
    out[o] = 0;
    *text_out = out;
    return total;
}

const char *tok_token_bytes(const Tokenizer *t, uint32_t id, size_t *len) {
    if (id >= t->n_vocab) return NULL;
    *len = t->tok_len[id];
    return (const char *)t->tok_bytes + t->tok_off[id];
}

// ---- queries -------------------------------------------------------------

int tok_vocab_size(const Tokenizer *t) { return (int)t->n_vocab; }
int tok_eot_id(const Tokenizer *t) { return t->eot_id == TOK_NO_ID ? -1 : (int)t->eot_id; }
size_t tok_n_merges(const Tokenizer *t) { return t->n_merges; }
size_t tok_n_special(const Tokenizer *t) { return t->n_special; }
uint32_t tok_special_id(const Tokenizer *t, size_t i) { return i < t->n_special ? t->specials[i] : TOK_NO_ID; }
int tok_is_special(const Tokenizer *t, uint32_t id) { return id < t->n_vocab && t->is_special[id]; }
uint32_t tok_byte_id(const Tokenizer *t, unsigned char byte) { return t->byte_id[byte]; }

int tok_merge(const Tokenizer *t, size_t r, uint32_t *left, uint32_t *right, uint32_t *result) {
    if (r >= t->n_merges) return -1;
    *left = t->merges[r].left;
    *right = t->merges[r].right;
    *result = t->merges[r].result;
    return 0;
}
