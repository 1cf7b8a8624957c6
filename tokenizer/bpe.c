// The byte-level BPE tokenizer itself: the validating builder every loader and
// the trainer end in, encoding (pre-tokenise, then apply merges in rank order
// within each chunk, with a per-thread chunk cache and OpenMP over large
// parts of the text), decoding, and the small query functions.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bpe_internal.h"

#define DEAD UINT32_MAX                 // id of a symbol merged into its left neighbour
#define NONE SIZE_MAX                   // "no position" in the symbol list
#define CACHE_MAX_CHUNK 64              // longer chunks are rare and not cached
#define CACHE_MAX_ENTRIES ((size_t)1 << 17)  // a full cache is emptied and refilled
#define DEFAULT_PART_BYTES ((size_t)1 << 20)

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

// ---- encoding ------------------------------------------------------------

typedef struct {
    uint32_t *v;  // [cap]
    size_t n, cap;
} IdVec;

static int idvec_reserve(IdVec *a, size_t extra) {
    if (a->n + extra <= a->cap) return 0;
    size_t cap = a->cap ? a->cap : 256;
    while (cap < a->n + extra) cap *= 2;
    uint32_t *v = realloc(a->v, cap * sizeof *v);
    if (!v) return -1;
    a->v = v;
    a->cap = cap;
    return 0;
}

static inline int idvec_push(IdVec *a, uint32_t id) {
    if (a->n == a->cap && idvec_reserve(a, 1) != 0) return -1;
    a->v[a->n++] = id;
    return 0;
}

typedef struct {
    uint32_t rank;
    size_t pos;
} HeapEnt;

// Per-thread state of the encoder: the symbol list of the chunk being merged,
// the heap of candidate merges, and the cache of already-encoded chunks.
typedef struct {
    size_t cap;           // symbols the arrays below can hold
    uint32_t *ids;        // [cap] current token of each symbol (DEAD once merged away)
    size_t *next, *prev;  // [cap] doubly linked list of live symbols
    HeapEnt *heap;        // [3 cap] min-heap on (rank, pos); n-1 initial pairs + 2 per merge
    size_t heap_n;
    int cache_ready;
    TokByteMap cache;     // chunk bytes -> (offset in cache_ids) << 8 | id count
    IdVec cache_ids;
} Worker;

static void worker_free(Worker *w) {
    free(w->ids);
    free(w->next);
    free(w->prev);
    free(w->heap);
    if (w->cache_ready) tok_bytemap_free(&w->cache);
    free(w->cache_ids.v);
    memset(w, 0, sizeof *w);
}

static int worker_reserve(Worker *w, size_t n) {
    if (n <= w->cap) return 0;
    size_t cap = w->cap ? w->cap : 64;
    while (cap < n) cap *= 2;
    free(w->ids);
    free(w->next);
    free(w->prev);
    free(w->heap);
    w->ids = malloc(cap * sizeof *w->ids);
    w->next = malloc(cap * sizeof *w->next);
    w->prev = malloc(cap * sizeof *w->prev);
    w->heap = malloc(3 * cap * sizeof *w->heap);
    w->cap = (w->ids && w->next && w->prev && w->heap) ? cap : 0;
    return w->cap ? 0 : -1;
}

static inline int heap_less(HeapEnt a, HeapEnt b) {
    // Lowest rank first; among equal ranks (the same pair) the leftmost.
    return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static void heap_push(Worker *w, uint32_t rank, size_t pos) {
    size_t i = w->heap_n++;
    HeapEnt e = {rank, pos};
    while (i > 0 && heap_less(e, w->heap[(i - 1) / 2])) {
        w->heap[i] = w->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    w->heap[i] = e;
}

static HeapEnt heap_pop(Worker *w) {
    HeapEnt top = w->heap[0], last = w->heap[--w->heap_n];
    size_t i = 0, n = w->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_less(w->heap[c + 1], w->heap[c])) c++;
        if (!heap_less(w->heap[c], last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    w->heap[i] = last;
    return top;
}

static inline void push_pair(const Tokenizer *t, Worker *w, size_t pos, size_t right) {
    uint32_t r = tok_pairmap_get(&t->rank_of, w->ids[pos], w->ids[right]);
    if (r != UINT32_MAX) heap_push(w, r, pos);
}

// BPE on one chunk of n >= 2 bytes: repeatedly applies the lowest-ranked merge
// present (leftmost first among equal ranks) until none applies. A heap of
// candidate (rank, position) pairs with lazy deletion makes this O(n log n):
// stale entries are recognised when popped because the pair at that position
// no longer matches the merge. Appends the resulting ids to out.
static int bpe_chunk(const Tokenizer *t, Worker *w, const unsigned char *s, size_t n, IdVec *out) {
    if (worker_reserve(w, n) != 0) return -1;
    for (size_t i = 0; i < n; i++) {
        w->ids[i] = t->byte_id[s[i]];
        w->next[i] = i + 1;  // n marks the end
        w->prev[i] = i ? i - 1 : NONE;
    }
    w->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++) push_pair(t, w, i, i + 1);
    while (w->heap_n > 0) {
        HeapEnt e = heap_pop(w);
        size_t i = e.pos, j = w->next[i];
        if (w->ids[i] == DEAD || j >= n) continue;
        const TokMerge *m = &t->merges[e.rank];
        if (w->ids[i] != m->left || w->ids[j] != m->right) continue;  // stale entry
        w->ids[i] = m->result;
        w->ids[j] = DEAD;
        w->next[i] = w->next[j];
        if (w->next[j] < n) w->prev[w->next[j]] = i;
        if (w->prev[i] != NONE) push_pair(t, w, w->prev[i], i);
        if (w->next[i] < n) push_pair(t, w, i, w->next[i]);
    }
    for (size_t i = 0; i < n; i = w->next[i])
        if (idvec_push(out, w->ids[i]) != 0) return -1;
    return 0;
}

static int encode_chunk(const Tokenizer *t, Worker *w, const unsigned char *s, size_t n, IdVec *out) {
    if (n == 1) return idvec_push(out, t->byte_id[s[0]]);
    if (n > CACHE_MAX_CHUNK) return bpe_chunk(t, w, s, n, out);
    if (!w->cache_ready) {
        if (tok_bytemap_init(&w->cache, 1024) != 0) return -1;
        w->cache_ready = 1;
    }
    uint64_t h = tok_hash_bytes(s, n);
    uint64_t *v = tok_bytemap_find(&w->cache, s, n, h);
    if (v) {
        size_t off = (size_t)(*v >> 8), cnt = (size_t)(*v & 0xff);
        if (idvec_reserve(out, cnt) != 0) return -1;
        memcpy(out->v + out->n, w->cache_ids.v + off, cnt * sizeof *out->v);
        out->n += cnt;
        return 0;
    }
    size_t start = out->n;
    if (bpe_chunk(t, w, s, n, out) != 0) return -1;
    size_t cnt = out->n - start;  // <= n <= 64: fits the 8 count bits
    if (w->cache.n >= CACHE_MAX_ENTRIES) {
        tok_bytemap_clear(&w->cache);
        w->cache_ids.n = 0;
    }
    int created;
    size_t off = w->cache_ids.n;
    if (idvec_reserve(&w->cache_ids, cnt) != 0) return -1;
    v = tok_bytemap_insert(&w->cache, s, n, h, &created);
    if (!v) return -1;
    memcpy(w->cache_ids.v + off, out->v + start, cnt * sizeof *out->v);
    w->cache_ids.n += cnt;
    *v = (uint64_t)off << 8 | cnt;
    return 0;
}

// A stretch of the input encoded as one unit: plain text, or one special token.
typedef struct {
    size_t start, end;  // byte range in the text
    uint32_t special;   // the special token's id, or TOK_NO_ID for text
    IdVec out;
} Piece;

typedef struct {
    Piece *v;
    size_t n, cap;
} PieceVec;

static int piece_add(PieceVec *p, size_t start, size_t end, uint32_t special) {
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 16;
        Piece *v = realloc(p->v, cap * sizeof *v);
        if (!v) return -1;
        p->v = v;
        p->cap = cap;
    }
    p->v[p->n++] = (Piece){start, end, special, {NULL, 0, 0}};
    return 0;
}

// The special token starting at s[i], longest match first; TOK_NO_ID if none.
static uint32_t special_at(const Tokenizer *t, const unsigned char *s, size_t len, size_t i) {
    if (!t->special_first[s[i]]) return TOK_NO_ID;
    for (uint32_t k = 0; k < t->n_special; k++) {
        uint32_t id = t->special_match[k];
        size_t l = t->tok_len[id];
        if (l <= len - i && memcmp(s + i, t->tok_bytes + t->tok_off[id], l) == 0) return id;
    }
    return TOK_NO_ID;
}

// The first p in [from, end) where s[p-1] is not whitespace and s[p] is, or
// end. Such a p always ends a chunk: the chunk holding s[p-1] is a run of
// letters, digits or punctuation (or a contraction), and none of those
// contain whitespace after their first byte. So encoding [start, p) and
// [p, end) separately gives the same ids as encoding [start, end).
static size_t safe_cut(const unsigned char *s, size_t from, size_t end) {
    for (size_t p = from; p < end; p++) {
        int sp = s[p] == ' ' || (s[p] >= '\t' && s[p] <= '\r');
        int prev_sp = s[p - 1] == ' ' || (s[p - 1] >= '\t' && s[p - 1] <= '\r');
        if (sp && !prev_sp) return p;
    }
    return end;
}

// Adds text [start, end) as pieces of about part bytes each (one piece when
// part is 0).
static int add_text(PieceVec *p, const unsigned char *s, size_t start, size_t end, size_t part) {
    while (part && end - start > part + part / 2) {
        size_t cut = safe_cut(s, start + part, end);
        if (piece_add(p, start, cut, TOK_NO_ID) != 0) return -1;
        start = cut;
    }
    return start < end ? piece_add(p, start, end, TOK_NO_ID) : 0;
}

// Cuts the input into pieces: special tokens (when allowed) and text between.
static int make_pieces(const Tokenizer *t, const unsigned char *s, size_t len, int allow_special,
                       size_t part, PieceVec *p) {
    size_t text_start = 0;
    if (allow_special && t->n_special > 0) {
        for (size_t i = 0; i < len;) {
            uint32_t id = special_at(t, s, len, i);
            if (id == TOK_NO_ID) {
                i++;
                continue;
            }
            if (add_text(p, s, text_start, i, part) != 0) return -1;
            if (piece_add(p, i, i + t->tok_len[id], id) != 0) return -1;
            i += t->tok_len[id];
            text_start = i;
        }
    }
    return add_text(p, s, text_start, len, part);
}

static int encode_piece(const Tokenizer *t, Worker *w, const unsigned char *s, Piece *pc) {
    if (pc->special != TOK_NO_ID) return idvec_push(&pc->out, pc->special);
    // About 3.5-4.5 bytes per token for English text; reserving len/3 avoids most regrowth.
    if (idvec_reserve(&pc->out, (pc->end - pc->start) / 3 + 16) != 0) return -1;
    const unsigned char *text = s + pc->start;
    size_t n = pc->end - pc->start;
    for (size_t i = 0; i < n;) {
        size_t e = tok_chunk_end((const char *)text, n, i);
        if (encode_chunk(t, w, text + i, e - i, &pc->out) != 0) return -1;
        i = e;
    }
    return 0;
}

size_t tok_encode_ex(const Tokenizer *t, const char *text, size_t len, const TokEncodeOptions *opt,
                     uint32_t **ids_out) {
    const unsigned char *s = (const unsigned char *)text;
    TokEncodeOptions o = opt ? *opt : (TokEncodeOptions){0, 0, 0};
    size_t part = o.serial ? 0 : (o.part_bytes ? o.part_bytes : DEFAULT_PART_BYTES);
    *ids_out = NULL;
    PieceVec pieces = {NULL, 0, 0};
    if (make_pieces(t, s, len, o.allow_special, part, &pieces) != 0) {
        free(pieces.v);
        return TOK_ERROR;
    }
    int n_workers = 1;
#ifdef _OPENMP
    if (!o.serial && pieces.n > 1) n_workers = omp_get_max_threads();
#endif
    Worker *workers = calloc((size_t)n_workers, sizeof *workers);
    int failed = workers == NULL;
    if (!failed) {
        long n_pieces = (long)pieces.n;
        // Dynamic scheduling: pieces of text cost far more than special tokens.
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_workers) if (n_workers > 1)
#endif
        for (long k = 0; k < n_pieces; k++) {
            int me = 0;
#ifdef _OPENMP
            me = omp_get_thread_num();
#endif
            if (encode_piece(t, &workers[me], s, &pieces.v[k]) != 0) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
                failed = 1;
            }
        }
        for (int k = 0; k < n_workers; k++) worker_free(&workers[k]);
        free(workers);
    }
    size_t total = 0;
    for (size_t k = 0; k < pieces.n; k++) total += pieces.v[k].out.n;
    uint32_t *ids = failed ? NULL : malloc((total ? total : 1) * sizeof *ids);
    if (ids) {
        size_t o2 = 0;
        for (size_t k = 0; k < pieces.n; k++) {
            memcpy(ids + o2, pieces.v[k].out.v, pieces.v[k].out.n * sizeof *ids);
            o2 += pieces.v[k].out.n;
        }
    }
    for (size_t k = 0; k < pieces.n; k++) free(pieces.v[k].out.v);
    free(pieces.v);
    if (!ids) return TOK_ERROR;
    *ids_out = ids;
    return total;
}

size_t tok_encode(const Tokenizer *t, const char *text, size_t len, uint32_t **ids_out) {
    return tok_encode_ex(t, text, len, NULL, ids_out);
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
