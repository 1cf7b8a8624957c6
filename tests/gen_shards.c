// Writes a synthetic token corpus as train and validation shards, for the
// trainer's tests: a Markov chain over V tokens whose next token is one of
// four successors of the current one, so a model can learn it (the loss of
// a perfect model is log 4 = 1.386) and a fresh model cannot (log V).
//   gen_shards DIR V TRAIN_TOKENS VAL_TOKENS SEED
#include <stdio.h>
#include <stdlib.h>

#include "../data/shard.h"

static uint64_t next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static int write_chain(const char *path, uint32_t V, size_t n, uint64_t seed) {
    uint32_t *tok = malloc(sizeof(uint32_t) * n);
    if (!tok) return -1;
    uint64_t s = seed;
    uint32_t cur = 0;
    for (size_t i = 0; i < n; i++) {
        tok[i] = cur;
        // successors of t: (7t + 1 + j*13) mod V for j = 0..3
        cur = (uint32_t)((7ULL * cur + 1 + 13 * (next(&s) % 4)) % V);
    }
    char err[512];
    int rc = shard_write_file(path, tok, n, V, err, sizeof err);
    if (rc) fprintf(stderr, "%s\n", err);
    free(tok);
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: gen_shards DIR V TRAIN_TOKENS VAL_TOKENS SEED\n");
        return 2;
    }
    char path[4096];
    uint32_t V = (uint32_t)atoi(argv[2]);
    uint64_t seed = strtoull(argv[5], NULL, 10);
    snprintf(path, sizeof path, "%s/train_000.bin", argv[1]);
    if (write_chain(path, V, (size_t)atoll(argv[3]), seed)) return 1;
    snprintf(path, sizeof path, "%s/val_000.bin", argv[1]);
    if (write_chain(path, V, (size_t)atoll(argv[4]), seed + 1)) return 1;
    return 0;
}
