// Encoding: pre-tokenise the text into chunks (pretok.c), then within each
// chunk apply merges lowest rank first. A per-thread cache remembers the ids
// of recent chunks; large inputs are cut at chunk boundaries into parts that
// OpenMP threads encode independently, with output identical to one pass.
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bpe_internal.h"

#define DEAD UINT32_MAX                 // id of a symbol merged into its left neighbour
#define NONE SIZE_MAX                   // "no position" in the symbol list
#define CACHE_LINES ((size_t)1 << 15)  // most chunk cache entries per thread (2 MiB)
#define CACHE_KEY_BYTES 24              // longest chunk the cache holds
#define CACHE_IDS 8                     // most ids a cached chunk may have
#define DEFAULT_PART_BYTES ((size_t)1 << 20)

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

typedef struct {
    uint32_t tag;                           // high hash bits of the chunk; 0: empty line
    uint8_t key_len, n_ids;
    uint8_t unused[2];
    unsigned char key[CACHE_KEY_BYTES];     // the chunk
    uint32_t ids[CACHE_IDS];                // its encoding
} CacheLine;
_Static_assert(sizeof(CacheLine) == 64, "a cache entry should fill exactly one 64-byte cache line");

// Per-thread state of the encoder: the symbol list of the chunk being merged,
// the heap of candidate merges, and the cache of already-encoded chunks.
typedef struct {
    size_t cap;           // symbols the arrays below can hold
    uint32_t *ids;        // [cap] current token of each symbol (DEAD once merged away)
    size_t *next, *prev;  // [cap] doubly linked list of live symbols
    HeapEnt *heap;        // [3 cap] min-heap on (rank, pos); n-1 initial pairs + 2 per merge
    size_t heap_n;
    CacheLine *cache;     // [cache_lines] allocated on first use
    size_t cache_lines;   // a power of two; set before first use
} Worker;

// Cache size for encoding len bytes: about one line per 16 bytes (a chunk is
// 4-5 bytes, and words repeat), so a short text does not pay for clearing 2 MiB.
static size_t cache_lines_for(size_t len) {
    size_t lines = 64;
    while (lines < CACHE_LINES && lines * 16 < len) lines *= 2;
    return lines;
}

static void worker_free(Worker *w) {
    free(w->ids);
    free(w->next);
    free(w->prev);
    free(w->heap);
    free(w->cache);
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

// The chunk cache: direct-mapped, one 64-byte line per entry, so a lookup
// touches a single cache line. A line holds a chunk of up to 24 bytes and its
// up to 8 ids (nearly every word of natural text); a new chunk simply
// overwrites whatever shared its line. Longer chunks are encoded every time.
static int encode_chunk(const Tokenizer *t, Worker *w, const unsigned char *s, size_t n, IdVec *out) {
    if (n == 1) return idvec_push(out, t->byte_id[s[0]]);
    if (n > CACHE_KEY_BYTES) return bpe_chunk(t, w, s, n, out);
    if (!w->cache) {
        w->cache = aligned_alloc(64, w->cache_lines * sizeof *w->cache);
        if (!w->cache) return -1;
        memset(w->cache, 0, w->cache_lines * sizeof *w->cache);
    }
    uint64_t h = tok_hash_bytes(s, n);
    CacheLine *line = &w->cache[h & (w->cache_lines - 1)];
    uint32_t tag = (uint32_t)(h >> 32) | 1;  // never 0, the tag of an empty line
    if (line->tag == tag && line->key_len == n && memcmp(line->key, s, n) == 0) {
        if (idvec_reserve(out, line->n_ids) != 0) return -1;
        memcpy(out->v + out->n, line->ids, line->n_ids * sizeof *out->v);
        out->n += line->n_ids;
        return 0;
    }
    size_t start = out->n;
    if (bpe_chunk(t, w, s, n, out) != 0) return -1;
    size_t cnt = out->n - start;
    if (cnt <= CACHE_IDS) {
        line->tag = tag;
        line->key_len = (uint8_t)n;
        line->n_ids = (uint8_t)cnt;
        memcpy(line->key, s, n);
        memcpy(line->ids, out->v + start, cnt * sizeof *out->v);
    }
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

// Appends the ids of one piece to out.
static int encode_piece(const Tokenizer *t, Worker *w, const unsigned char *s, const Piece *pc, IdVec *out) {
    if (pc->special != TOK_NO_ID) return idvec_push(out, pc->special);
    // About 3.5-4.5 bytes per token for English text; reserving len/3 avoids most regrowth.
    if (idvec_reserve(out, (pc->end - pc->start) / 3 + 16) != 0) return -1;
    const unsigned char *text = s + pc->start;
    size_t n = pc->end - pc->start;
    for (size_t i = 0; i < n;) {
        size_t e = tok_chunk_end((const char *)text, n, i);
        if (encode_chunk(t, w, text + i, e - i, out) != 0) return -1;
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
    for (int k = 0; k < n_workers && !failed; k++) workers[k].cache_lines = cache_lines_for(len / (size_t)n_workers);
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
            if (encode_piece(t, &workers[me], s, &pieces.v[k], &pieces.v[k].out) != 0) {
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
    uint32_t *ids = NULL;
    if (!failed && pieces.n == 1) {  // the common serial case: hand the one vector over
        ids = pieces.v[0].out.v;
        pieces.v[0].out.v = NULL;
    } else if (!failed) {
        ids = malloc((total ? total : 1) * sizeof *ids);
    }
    if (ids && pieces.n > 1) {
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

struct TokEncoder {
    const Tokenizer *t;
    Worker w;  // its chunk cache lives as long as the encoder
};

TokEncoder *tok_encoder_new(const Tokenizer *t) {
    TokEncoder *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->t = t;
    e->w.cache_lines = CACHE_LINES;  // it will see many texts
    return e;
}

void tok_encoder_free(TokEncoder *e) {
    if (!e) return;
    worker_free(&e->w);
    free(e);
}

size_t tok_encoder_encode(TokEncoder *e, const char *text, size_t len, int allow_special, uint32_t **ids_out) {
    const unsigned char *s = (const unsigned char *)text;
    *ids_out = NULL;
    PieceVec pieces = {NULL, 0, 0};
    IdVec out = {NULL, 0, 0};
    int failed = make_pieces(e->t, s, len, allow_special, 0, &pieces) != 0 || idvec_reserve(&out, 1) != 0;
    for (size_t k = 0; k < pieces.n && !failed; k++) failed = encode_piece(e->t, &e->w, s, &pieces.v[k], &out) != 0;
    free(pieces.v);
    if (failed) {
        free(out.v);
        return TOK_ERROR;
    }
    *ids_out = out.v;
    return out.n;
}

