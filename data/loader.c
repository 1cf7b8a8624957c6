// Data loader: shard discovery (comma-separated globs), windowing of shards
// into samples of T+1 tokens, the per-epoch shuffle (splitmix64 + Fisher-Yates,
// identical on every host), the split of an epoch across data-parallel ranks,
// and the resume state. docs/data.md describes the behaviour this implements.
#if !defined(_GNU_SOURCE) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700 // glob
#endif

#include "loader.h"
#include "shard.h"

#include <glob.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../util/util.h"

struct Loader {
    Shard *shards;          // (n_shards) sorted by path
    int n_shards;
    uint64_t *first_window; // (n_shards + 1) global id of each shard's first window; [n_shards] = n_windows
    uint64_t n_windows;     // windows of T+1 tokens in all shards
    int B, T, rank, world;
    int shuffle;
    uint64_t seed;
    uint32_t vocab_size;
    uint64_t n_batches;     // micro-batches per epoch per rank
    uint64_t fingerprint;
    uint64_t *order;        // (n_windows) epoch order of window ids; NULL when shuffle is off
    int order_valid;        // order holds the permutation of order_epoch
    uint64_t order_epoch;
    uint32_t *window;       // (T + 1) scratch for one window
    LoaderState state;
    char err[1024];
};

// ---------------------------------------------------------------- PRNG

// splitmix64's output function: a bijective 64-bit mixer.
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t splitmix64_next(uint64_t *state) {
    *state += 0x9E3779B97F4A7C15ull;
    return mix64(*state);
}

// Uniform in [0, n), n >= 1, without modulo bias: draws below 2^64 mod n are
// rejected so that the accepted range is a whole multiple of n.
static uint64_t rng_below(uint64_t *state, uint64_t n) {
    uint64_t threshold = (0 - n) % n; // == 2^64 mod n
    for (;;) {
        uint64_t x = splitmix64_next(state);
        if (x >= threshold) return x % n;
    }
}

// The epoch's order depends on (seed, epoch) only, never on earlier epochs, so
// a resumed run rebuilds it from the state alone.
static void build_order(Loader *L, uint64_t epoch) {
    uint64_t n = L->n_windows;
    for (uint64_t i = 0; i < n; i++) L->order[i] = i;
    uint64_t state = mix64(L->seed ^ mix64(epoch));
    for (uint64_t i = n - 1; i > 0; i--) { // Fisher-Yates, from the back
        uint64_t j = rng_below(&state, i + 1);
        uint64_t t = L->order[i];
        L->order[i] = L->order[j];
        L->order[j] = t;
    }
    L->order_epoch = epoch;
    L->order_valid = 1;
}

// ---------------------------------------------------------------- shard list

typedef struct {
    char **paths; // (n) owned strings
    size_t n, cap;
} PathList;

static void paths_free(PathList *p) {
    for (size_t i = 0; i < p->n; i++) free(p->paths[i]);
    free(p->paths);
    memset(p, 0, sizeof *p);
}

static int paths_push(PathList *p, const char *s) {
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 16;
        char **np = realloc(p->paths, cap * sizeof *np);
        if (!np) return -1;
        p->paths = np;
        p->cap = cap;
    }
    size_t len = strlen(s) + 1;
    char *d = malloc(len);
    if (!d) return -1;
    memcpy(d, s, len);
    p->paths[p->n++] = d;
    return 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

// Expands one glob into p. Returns -1 with a message if it matches nothing.
static int expand_glob(const char *pat, PathList *p, char *err, size_t errlen) {
    glob_t g;
    int rc = glob(pat, 0, NULL, &g);
    if (rc == GLOB_NOMATCH) {
        util_set_err(err, errlen, "shard pattern '%s' matches no files", pat);
        return -1;
    }
    if (rc != 0) {
        util_set_err(err, errlen, "shard pattern '%s': %s", pat,
                rc == GLOB_NOSPACE ? "out of memory" : "read error while matching");
        globfree(&g);
        return -1;
    }
    for (size_t i = 0; i < g.gl_pathc; i++) {
        if (paths_push(p, g.gl_pathv[i]) != 0) {
            util_set_err(err, errlen, "shard pattern '%s': out of memory", pat);
            globfree(&g);
            return -1;
        }
    }
    globfree(&g);
    return 0;
}

// Splits the comma-separated pattern list, expands each glob, then sorts by
// byte order (independent of the locale) and drops files matched twice.
static int collect_paths(const char *pattern, PathList *p, char *err, size_t errlen) {
    size_t len = strlen(pattern);
    char *buf = malloc(len + 1);
    if (!buf) {
        util_set_err(err, errlen, "out of memory");
        return -1;
    }
    memcpy(buf, pattern, len + 1);
    int rc = 0;
    char *piece = buf;
    for (;;) {
        char *comma = strchr(piece, ',');
        if (comma) *comma = 0;
        if (*piece == 0) {
            util_set_err(err, errlen, "shard pattern list '%s' has an empty entry", pattern);
            rc = -1;
            break;
        }
        if (expand_glob(piece, p, err, errlen) != 0) {
            rc = -1;
            break;
        }
        if (!comma) break;
        piece = comma + 1;
    }
    free(buf);
    if (rc != 0) return -1;
    qsort(p->paths, p->n, sizeof *p->paths, cmp_str);
    size_t kept = 0;
    for (size_t i = 0; i < p->n; i++) {
        if (kept > 0 && strcmp(p->paths[kept - 1], p->paths[i]) == 0) {
            free(p->paths[i]);
        } else {
            p->paths[kept++] = p->paths[i];
        }
    }
    p->n = kept;
    return 0;
}

// ---------------------------------------------------------------- open

// Windows in a shard: starts at multiples of T with T+1 tokens available,
// i.e. j*T + T + 1 <= n, so (n - 1) / T of them; the partial tail is dropped.
static uint64_t windows_in(uint64_t n_tokens, int T) {
    return n_tokens == 0 ? 0 : (n_tokens - 1) / (uint64_t)T;
}

// Everything a saved state depends on except the rank (all ranks share one
// state): batch shape, world size, order settings and the shards' sizes.
static uint64_t compute_fingerprint(const Loader *L) {
    uint64_t vals[] = {1, (uint64_t)L->B, (uint64_t)L->T, (uint64_t)L->world,
                       (uint64_t)L->shuffle, L->shuffle ? L->seed : 0, L->vocab_size,
                       (uint64_t)L->n_shards};
    uint64_t h = 0x6d6f652d64617461ull;
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) h = mix64(h ^ vals[i]);
    for (int i = 0; i < L->n_shards; i++) h = mix64(h ^ L->shards[i].header.n_tokens);
    return h;
}

static int check_args(int B, int T, int rank, int world, char *err, size_t errlen) {
    if (B < 1 || T < 1 || T == INT32_MAX) {
        util_set_err(err, errlen, "loader: batch size B=%d and sequence length T=%d must be >= 1 (T < 2^31 - 1)", B, T);
        return -1;
    }
    if (world < 1 || rank < 0 || rank >= world) {
        util_set_err(err, errlen, "loader: rank %d is not in [0, world=%d)", rank, world);
        return -1;
    }
    return 0;
}

// Opens every shard, checks they share one vocabulary and counts windows.
static int open_shards(Loader *L, const PathList *p, char *err, size_t errlen) {
    L->shards = calloc(p->n, sizeof *L->shards);
    L->first_window = calloc(p->n + 1, sizeof *L->first_window);
    if (!L->shards || !L->first_window) {
        util_set_err(err, errlen, "loader: out of memory for %zu shards", p->n);
        return -1;
    }
    for (size_t i = 0; i < p->n; i++) {
        if (shard_open(&L->shards[i], p->paths[i], err, errlen) != 0) return -1;
        L->n_shards = (int)i + 1;
        const ShardHeader *h = &L->shards[i].header;
        if (i == 0) L->vocab_size = h->vocab_size;
        if (h->vocab_size != L->vocab_size) {
            util_set_err(err, errlen, "%s: vocabulary size %" PRIu32 " differs from %" PRIu32
                    " in %s", p->paths[i], h->vocab_size, L->vocab_size, p->paths[0]);
            return -1;
        }
        L->first_window[i + 1] = L->first_window[i] + windows_in(h->n_tokens, L->T);
    }
    L->n_windows = L->first_window[p->n];
    return 0;
}

Loader *loader_open(const char *pattern, int B, int T, int rank, int world, uint64_t seed,
                    int shuffle, char *err, size_t errlen) {
    if (check_args(B, T, rank, world, err, errlen) != 0) return NULL;
    PathList p = {0};
    if (collect_paths(pattern, &p, err, errlen) != 0) {
        paths_free(&p);
        return NULL;
    }
    if (p.n > (size_t)INT32_MAX) {
        util_set_err(err, errlen, "shard pattern '%s' matches too many files", pattern);
        paths_free(&p);
        return NULL;
    }
    Loader *L = calloc(1, sizeof *L);
    if (!L) {
        util_set_err(err, errlen, "loader: out of memory");
        paths_free(&p);
        return NULL;
    }
    L->B = B, L->T = T, L->rank = rank, L->world = world;
    L->shuffle = shuffle != 0;
    L->seed = seed;
    int rc = open_shards(L, &p, err, errlen);
    uint64_t per_batch = (uint64_t)B * (uint64_t)world; // windows one step of all ranks consumes
    if (rc == 0) {
        L->n_batches = L->n_windows / per_batch;
        if (L->n_batches == 0) {
            util_set_err(err, errlen, "shards matched by '%s' hold %" PRIu64 " windows of T+1=%d tokens,"
                    " fewer than one micro-batch per rank (B*world = %" PRIu64 ")", pattern,
                    L->n_windows, T + 1, per_batch);
            rc = -1;
        }
    }
    if (rc == 0) {
        L->window = malloc(((size_t)T + 1) * sizeof *L->window);
        if (L->shuffle) {
            L->order = L->n_windows <= SIZE_MAX / sizeof *L->order
                           ? malloc((size_t)L->n_windows * sizeof *L->order) : NULL;
        }
        if (!L->window || (L->shuffle && !L->order)) {
            util_set_err(err, errlen, "loader: out of memory for %" PRIu64 " windows", L->n_windows);
            rc = -1;
        }
    }
    paths_free(&p);
    if (rc != 0) {
        loader_close(L);
        return NULL;
    }
    L->fingerprint = compute_fingerprint(L);
    return L;
}

// ---------------------------------------------------------------- reading

// The shard holding global window w: the last shard whose first window is
// <= w (empty shards share their first window with the next one, so "last"
// skips them).
static int shard_of_window(const Loader *L, uint64_t w) {
    int lo = 0, hi = L->n_shards - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        if (L->first_window[mid] <= w) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

int loader_next(Loader *L, int32_t *inputs, int32_t *targets) {
    if (L->shuffle && (!L->order_valid || L->order_epoch != L->state.epoch)) {
        build_order(L, L->state.epoch);
    }
    size_t T = (size_t)L->T;
    for (int b = 0; b < L->B; b++) {
        // Rank r takes epoch positions r, r+world, r+2*world, ...
        uint64_t pos = (L->state.batch * (uint64_t)L->B + (uint64_t)b) * (uint64_t)L->world
                       + (uint64_t)L->rank;
        uint64_t w = L->shuffle ? L->order[pos] : pos;
        int s = shard_of_window(L, w);
        uint64_t start = (w - L->first_window[s]) * (uint64_t)T;
        if (shard_read(&L->shards[s], start, T + 1, L->window, L->err, sizeof L->err) != 0) {
            return -1;
        }
        for (size_t t = 0; t < T; t++) {
            inputs[(size_t)b * T + t] = (int32_t)L->window[t]; // ids < vocab <= INT32_MAX
            targets[(size_t)b * T + t] = (int32_t)L->window[t + 1];
        }
    }
    if (++L->state.batch == L->n_batches) {
        L->state.batch = 0;
        L->state.epoch++;
    }
    return 0;
}

const char *loader_error(const Loader *L) { return L->err; }

LoaderState loader_get_state(const Loader *L) {
    LoaderState s = L->state;
    s.fingerprint = L->fingerprint;
    return s;
}

int loader_set_state(Loader *L, const LoaderState *s) {
    if (s->fingerprint != L->fingerprint) {
        util_set_err(L->err, sizeof L->err, "loader state (fingerprint %016" PRIx64 ") was saved with"
                " different shards, B, T, world size, seed or shuffle setting than this loader"
                " (fingerprint %016" PRIx64 ")", s->fingerprint, L->fingerprint);
        return -1;
    }
    if (s->batch >= L->n_batches) {
        util_set_err(L->err, sizeof L->err, "loader state batch %" PRIu64 " is out of range: an epoch"
                " has %" PRIu64 " micro-batches", s->batch, L->n_batches);
        return -1;
    }
    L->state.epoch = s->epoch;
    L->state.batch = s->batch;
    return 0;
}

void loader_reset(Loader *L) {
    L->state.epoch = 0;
    L->state.batch = 0;
}

uint64_t loader_num_batches(const Loader *L) { return L->n_batches; }
uint64_t loader_num_windows(const Loader *L) { return L->n_windows; }
uint32_t loader_vocab_size(const Loader *L) { return L->vocab_size; }
int loader_num_shards(const Loader *L) { return L->n_shards; }

void loader_close(Loader *L) {
    if (!L) return;
    for (int i = 0; i < L->n_shards; i++) shard_close(&L->shards[i]);
    free(L->shards);
    free(L->first_window);
    free(L->order);
    free(L->window);
    free(L);
}
