// BPE training (Sennrich et al., arXiv:1508.07909, on bytes as in GPT-2).
//
// The corpus is read once: pre-tokenised into chunks ("words") whose
// frequencies go into a hash map. Merging then works on the unique words only:
//   - pair table: (left, right) -> count over all words (weighted by word
//     frequency) and an occurrence list of the words that contain the pair;
//   - a max-heap of (count, left, right) with lazy deletion: an entry whose
//     count is out of date is re-pushed with the current count when popped;
//   - each merge rewrites only the words in the chosen pair's occurrence list
//     and updates the counts of the pairs in those words.
// Ties between equal counts go to the smallest (left, right), so training is
// deterministic. Nothing rescans the corpus per merge.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe_internal.h"

struct TokTrainer {
    TokByteMap words;  // chunk bytes -> frequency
    uint64_t bytes;    // text bytes added
};

TokTrainer *tok_trainer_new(void) {
    TokTrainer *tr = calloc(1, sizeof *tr);
    if (!tr) return NULL;
    if (tok_bytemap_init(&tr->words, 1 << 16) != 0) {
        free(tr);
        return NULL;
    }
    return tr;
}

void tok_trainer_free(TokTrainer *tr) {
    if (!tr) return;
    tok_bytemap_free(&tr->words);
    free(tr);
}

uint64_t tok_trainer_bytes(const TokTrainer *tr) { return tr->bytes; }

int tok_trainer_add(TokTrainer *tr, const char *text, size_t len) {
    for (size_t i = 0; i < len;) {
        size_t e = tok_chunk_end(text, len, i);
        int created;
        uint64_t *count = tok_bytemap_insert(&tr->words, text + i, e - i, tok_hash_bytes(text + i, e - i), &created);
        if (!count) return -1;
        (*count)++;
        i = e;
    }
    tr->bytes += len;
    return 0;
}

// ---- merge state ---------------------------------------------------------

typedef struct {
    uint32_t off, len;  // symbols sym[off .. off+len) (len shrinks as merges apply)
    uint64_t freq;      // how often the word occurs in the corpus
    uint32_t stamp;     // last merge step that visited the word (skips duplicates in lists)
} Word;

typedef struct {
    uint32_t left, right;
    int64_t count;     // occurrences in the corpus, weighted by word frequency
    uint32_t *occ;     // [n_occ] words that contain (or once contained) the pair
    uint32_t n_occ, cap_occ;
    uint32_t stamp;    // last merge step that queued the pair for a heap push
} Pair;

typedef struct {
    int64_t count;  // the pair's count when pushed (may be out of date)
    uint32_t left, right, pair;
} HeapItem;

typedef struct {
    Word *words;        // [n_words] unique chunks of length >= 2
    uint32_t n_words;
    uint32_t *sym;      // [total chunk bytes] token ids of every word
    Pair *pairs;        // [n_pairs]
    uint32_t n_pairs, cap_pairs;
    TokPairMap pair_index;  // (left, right) -> index in pairs
    HeapItem *heap;     // max-heap on (count, then smallest left, right)
    size_t n_heap, cap_heap;
    uint32_t *fresh;    // pairs whose count grew during the current merge
    size_t n_fresh, cap_fresh;
    uint32_t step;      // current merge step, from 1
} Train;

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

static int heap_above(const HeapItem *a, const HeapItem *b) {
    if (a->count != b->count) return a->count > b->count;
    if (a->left != b->left) return a->left < b->left;
    return a->right < b->right;
}

static int heap_push(Train *tr, uint32_t pair) {
    if (grow((void **)&tr->heap, &tr->cap_heap, tr->n_heap + 1, sizeof *tr->heap) != 0) return -1;
    const Pair *p = &tr->pairs[pair];
    HeapItem e = {p->count, p->left, p->right, pair};
    size_t i = tr->n_heap++;
    while (i > 0 && heap_above(&e, &tr->heap[(i - 1) / 2])) {
        tr->heap[i] = tr->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    tr->heap[i] = e;
    return 0;
}

static HeapItem heap_pop(Train *tr) {
    HeapItem top = tr->heap[0], last = tr->heap[--tr->n_heap];
    size_t i = 0, n = tr->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_above(&tr->heap[c + 1], &tr->heap[c])) c++;
        if (!heap_above(&tr->heap[c], &last)) break;
        tr->heap[i] = tr->heap[c];
        i = c;
    }
    tr->heap[i] = last;
    return top;
}

// Index of pair (a, b), created with count 0 if new; UINT32_MAX when out of memory.
static uint32_t pair_get(Train *tr, uint32_t a, uint32_t b) {
    int created;
    uint32_t *idx = tok_pairmap_insert(&tr->pair_index, a, b, tr->n_pairs, &created);
    if (!idx) return UINT32_MAX;
    if (!created) return *idx;
    size_t cap = tr->cap_pairs;
    if (grow((void **)&tr->pairs, &cap, (size_t)tr->n_pairs + 1, sizeof *tr->pairs) != 0) return UINT32_MAX;
    tr->cap_pairs = (uint32_t)cap;
    tr->pairs[tr->n_pairs] = (Pair){a, b, 0, NULL, 0, 0, 0};
    return tr->n_pairs++;
}

static int occ_add(Pair *p, uint32_t w) {
    if (p->n_occ > 0 && p->occ[p->n_occ - 1] == w) return 0;  // the same word twice in a row
    size_t cap = p->cap_occ;
    if (grow((void **)&p->occ, &cap, (size_t)p->n_occ + 1, sizeof *p->occ) != 0) return -1;
    p->cap_occ = (uint32_t)cap;
    p->occ[p->n_occ++] = w;
    return 0;
}

// Adds delta (times the word's frequency) to every adjacent pair of word w.
// With track set, the word joins the occurrence list of each pair involving
// token `track`, and those pairs are queued for a heap push.
static int word_pairs(Train *tr, uint32_t w, int sign, uint32_t track) {
    const Word *wd = &tr->words[w];
    const uint32_t *s = tr->sym + wd->off;
    for (uint32_t i = 0; i + 1 < wd->len; i++) {
        uint32_t pi = pair_get(tr, s[i], s[i + 1]);
        if (pi == UINT32_MAX) return -1;
        Pair *p = &tr->pairs[pi];
        p->count += sign * (int64_t)wd->freq;
        if (track == UINT32_MAX || (s[i] != track && s[i + 1] != track)) continue;
        if (occ_add(p, w) != 0) return -1;
        if (p->stamp != tr->step) {
            p->stamp = tr->step;
            if (grow((void **)&tr->fresh, &tr->cap_fresh, tr->n_fresh + 1, sizeof *tr->fresh) != 0) return -1;
            tr->fresh[tr->n_fresh++] = pi;
        }
    }
    return 0;
}

// Replaces every (a, b) in word w, left to right, by z. Returns 1 if any was replaced.
static int word_merge(Train *tr, uint32_t w, uint32_t a, uint32_t b, uint32_t z) {
    Word *wd = &tr->words[w];
    uint32_t *s = tr->sym + wd->off;
    uint32_t o = 0;
    int changed = 0;
    for (uint32_t i = 0; i < wd->len; i++) {
        if (i + 1 < wd->len && s[i] == a && s[i + 1] == b) {
            s[o++] = z;
            i++;
            changed = 1;
        } else {
            s[o++] = s[i];
        }
    }
    wd->len = o;
    return changed;
}

static int word_has_pair(const Train *tr, uint32_t w, uint32_t a, uint32_t b) {
    const Word *wd = &tr->words[w];
    const uint32_t *s = tr->sym + wd->off;
    for (uint32_t i = 0; i + 1 < wd->len; i++)
        if (s[i] == a && s[i + 1] == b) return 1;
    return 0;
}

// Applies merge (a, b) -> z to every word in the pair's occurrence list.
static int apply_merge(Train *tr, uint32_t pi, uint32_t z) {
    Pair *p = &tr->pairs[pi];
    uint32_t a = p->left, b = p->right;
    uint32_t *occ = p->occ, n_occ = p->n_occ;  // taken over: the pair will not occur again
    p->occ = NULL;
    p->n_occ = p->cap_occ = 0;
    tr->n_fresh = 0;
    int rc = 0;
    for (uint32_t k = 0; k < n_occ && rc == 0; k++) {
        uint32_t w = occ[k];
        if (tr->words[w].stamp == tr->step || !word_has_pair(tr, w, a, b)) continue;
        tr->words[w].stamp = tr->step;
        // Remove the word's pairs, rewrite it, add its pairs back: simple, and
        // words are short, so this costs little more than exact deltas.
        rc = word_pairs(tr, w, -1, UINT32_MAX);
        if (rc == 0) word_merge(tr, w, a, b, z);
        if (rc == 0) rc = word_pairs(tr, w, +1, z);
    }
    free(occ);
    // Counts of the other pairs only fell (their stale heap entries are
    // fixed when popped); pairs with z are new or grew, so push them now.
    for (size_t k = 0; k < tr->n_fresh && rc == 0; k++)
        if (tr->pairs[tr->fresh[k]].count > 0) rc = heap_push(tr, tr->fresh[k]);
    return rc;
}

// The pair with the highest count (smallest ids on ties), or UINT32_MAX when
// no pair is left. Out-of-date heap entries are re-pushed with their current count.
static uint32_t best_pair(Train *tr, int *oom) {
    while (tr->n_heap > 0) {
        HeapItem e = heap_pop(tr);
        const Pair *p = &tr->pairs[e.pair];
        if (p->count == e.count && p->count > 0) return e.pair;
        if (p->count > 0 && heap_push(tr, e.pair) != 0) {
            *oom = 1;
            return UINT32_MAX;
        }
    }
    return UINT32_MAX;
}

static void train_free(Train *tr) {
    for (uint32_t i = 0; i < tr->n_pairs; i++) free(tr->pairs[i].occ);
    free(tr->pairs);
    free(tr->words);
    free(tr->sym);
    free(tr->heap);
    free(tr->fresh);
    tok_pairmap_free(&tr->pair_index);
}

// Builds the word list (chunks of >= 2 bytes; single bytes never merge), the
// pair counts with their occurrence lists, and the heap.
static int train_init(Train *tr, const TokTrainer *src, char *err, size_t errlen) {
    memset(tr, 0, sizeof *tr);
    const TokByteMap *m = &src->words;
    uint64_t total = 0;
    for (size_t i = 0; i < m->cap; i++)
        if (m->slots[i].key_len >= 2) {
            total += m->slots[i].key_len;
            tr->n_words++;
        }
    if (total > UINT32_MAX) return tok_fail(err, errlen, "trainer: over 4 GiB of unique chunks");
    tr->words = malloc((tr->n_words ? tr->n_words : 1) * sizeof *tr->words);
    tr->sym = malloc((total ? total : 1) * sizeof *tr->sym);
    if (!tr->words || !tr->sym || tok_pairmap_init(&tr->pair_index, 1 << 16) != 0)
        return tok_fail(err, errlen, "trainer: out of memory for %u words", tr->n_words);
    uint32_t w = 0, off = 0;
    for (size_t i = 0; i < m->cap; i++) {
        const TokByteSlot *s = &m->slots[i];
        if (s->key_len < 2) continue;
        const unsigned char *k = tok_bytemap_key(m, s);
        for (uint32_t j = 0; j < s->key_len; j++) tr->sym[off + j] = k[j];  // byte b has id b
        tr->words[w] = (Word){off, s->key_len, s->val, 0};
        off += s->key_len;
        w++;
    }
    for (w = 0; w < tr->n_words; w++) {
        const Word *wd = &tr->words[w];
        for (uint32_t i = 0; i + 1 < wd->len; i++) {
            uint32_t pi = pair_get(tr, tr->sym[wd->off + i], tr->sym[wd->off + i + 1]);
            if (pi == UINT32_MAX || occ_add(&tr->pairs[pi], w) != 0)
                return tok_fail(err, errlen, "trainer: out of memory");
            tr->pairs[pi].count += (int64_t)wd->freq;
        }
    }
    for (uint32_t pi = 0; pi < tr->n_pairs; pi++)
        if (heap_push(tr, pi) != 0) return tok_fail(err, errlen, "trainer: out of memory");
    return 0;
}

// ---- the vocabulary as it grows ------------------------------------------

typedef struct {
    uint64_t *off;           // [V] offsets into bytes
    uint32_t *len;           // [V]
    unsigned char *bytes;    // [n_bytes]
    size_t n_bytes, cap_bytes;
    uint32_t n;              // tokens so far
    TokByteMap index;        // token bytes -> id (a merge can remake an existing token)
} Vocab;

// Id of the token left+right, adding it to the vocabulary if new. *is_new
// tells which; returns UINT32_MAX when out of memory.
static uint32_t vocab_join(Vocab *v, uint32_t left, uint32_t right, int *is_new) {
    size_t la = v->len[left], lb = v->len[right];
    if (grow((void **)&v->bytes, &v->cap_bytes, v->n_bytes + la + lb, 1) != 0) return UINT32_MAX;
    unsigned char *s = v->bytes + v->n_bytes;
    memcpy(s, v->bytes + v->off[left], la);
    memcpy(s + la, v->bytes + v->off[right], lb);
    uint64_t *id = tok_bytemap_insert(&v->index, s, la + lb, tok_hash_bytes(s, la + lb), is_new);
    if (!id) return UINT32_MAX;
    if (*is_new) {
        *id = v->n;
        v->off[v->n] = v->n_bytes;
        v->len[v->n] = (uint32_t)(la + lb);
        v->n_bytes += la + lb;
        v->n++;
    }
    return (uint32_t)*id;
}

static void print_merge(const Vocab *v, uint32_t step, uint32_t a, uint32_t b, uint32_t z, int64_t count) {
    char qa[48], qb[48], qz[64];
    tok_quote(v->bytes + v->off[a], v->len[a], qa, sizeof qa);
    tok_quote(v->bytes + v->off[b], v->len[b], qb, sizeof qb);
    tok_quote(v->bytes + v->off[z], v->len[z], qz, sizeof qz);
    fprintf(stderr, "merge %6u: %s + %s -> %s (id %u, count %lld)\n", step, qa, qb, qz, z, (long long)count);
}

Tokenizer *tok_trainer_finish(TokTrainer *src, int vocab_size, int verbose, char *err, size_t errlen) {
    if (vocab_size < 257 || vocab_size > (1 << 30)) {
        tok_fail(err, errlen, "trainer: vocab size %d is outside [257, 2^30] (256 bytes + <|endoftext|>)", vocab_size);
        return NULL;
    }
    uint32_t target = (uint32_t)vocab_size - 1;  // the last id is <|endoftext|>
    Train tr = {0};
    Vocab v = {0};
    uint32_t *merges = NULL;  // [2 * merges] (left, right) in rank order
    size_t n_merges = 0, cap_merges = 0;
    Tokenizer *t = NULL;
    uint8_t *special = NULL;
    v.off = malloc((size_t)(target + 1) * sizeof *v.off);
    v.len = malloc((size_t)(target + 1) * sizeof *v.len);
    if (!v.off || !v.len || tok_bytemap_init(&v.index, target) != 0) goto oom;
    if (train_init(&tr, src, err, errlen) != 0) goto done;
    for (uint32_t b = 0; b < 256; b++) {
        int is_new;
        unsigned char c = (unsigned char)b;
        // Ids 0..255 are the bytes; indexing them lets vocab_join recognise every token.
        if (grow((void **)&v.bytes, &v.cap_bytes, v.n_bytes + 1, 1) != 0) goto oom;
        v.bytes[v.n_bytes] = c;
        uint64_t *id = tok_bytemap_insert(&v.index, &c, 1, tok_hash_bytes(&c, 1), &is_new);
        if (!id) goto oom;
        *id = b;
        v.off[b] = v.n_bytes++;
        v.len[b] = 1;
    }
    v.n = 256;
    while (v.n < target) {
        int oom = 0, is_new;
        uint32_t pi = best_pair(&tr, &oom);
        if (oom) goto oom;
        if (pi == UINT32_MAX) {
            if (verbose) fprintf(stderr, "trainer: no pairs left after %zu merges; vocab is %u\n", n_merges, v.n + 1);
            break;
        }
        tr.step++;
        uint32_t a = tr.pairs[pi].left, b = tr.pairs[pi].right;
        int64_t count = tr.pairs[pi].count;
        uint32_t z = vocab_join(&v, a, b, &is_new);
        if (z == UINT32_MAX || grow((void **)&merges, &cap_merges, 2 * n_merges + 2, sizeof *merges) != 0) goto oom;
        merges[2 * n_merges] = a;
        merges[2 * n_merges + 1] = b;
        n_merges++;
        if (apply_merge(&tr, pi, z) != 0) goto oom;
        if (tr.pairs[pi].count != 0) {  // every occurrence was merged: a broken count is a bug
            tok_fail(err, errlen, "trainer: internal error: pair (%u, %u) still counts %lld after its merge",
                     a, b, (long long)tr.pairs[pi].count);
            goto done;
        }
        if (verbose && (n_merges <= 10 || n_merges % 500 == 0)) print_merge(&v, tr.step, a, b, z, count);
    }
    // <|endoftext|> takes the id after the last token.
    const char *eot = TOK_EOT_STRING;
    size_t le = strlen(eot);
    if (grow((void **)&v.bytes, &v.cap_bytes, v.n_bytes + le, 1) != 0) goto oom;
    memcpy(v.bytes + v.n_bytes, eot, le);
    v.off[v.n] = v.n_bytes;
    v.len[v.n] = (uint32_t)le;
    v.n_bytes += le;
    special = calloc(v.n + 1, 1);
    if (!special) goto oom;
    special[v.n] = 1;
    TokSpec spec = {v.n + 1, v.off, v.len, v.bytes, special, merges, (uint32_t)n_merges, v.n};
    t = tok_build(&spec, "trainer", err, errlen);
    goto done;
oom:
    tok_fail(err, errlen, "trainer: out of memory");
done:
    train_free(&tr);
    free(v.off);
    free(v.len);
    free(v.bytes);
    tok_bytemap_free(&v.index);
    free(merges);
    free(special);
    return t;
}

Tokenizer *tok_train(const char *text, size_t len, int vocab_size, int verbose) {
    char err[256] = "";
    TokTrainer *tr = tok_trainer_new();
    Tokenizer *t = NULL;
    if (!tr) {
        fprintf(stderr, "tok_train: out of memory\n");
        return NULL;
    }
    if (tok_trainer_add(tr, text, len) != 0) snprintf(err, sizeof err, "trainer: out of memory");
    else t = tok_trainer_finish(tr, vocab_size, verbose, err, sizeof err);
    if (!t) fprintf(stderr, "tok_train: %s\n", err);
    tok_trainer_free(tr);
    return t;
}
