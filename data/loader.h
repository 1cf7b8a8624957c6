// Data loader: turns a set of token shards into micro-batches of (inputs,
// targets) for one data-parallel rank. Owns the windowing of shards, the
// per-epoch shuffle, the split of each epoch across ranks and the small state
// a checkpoint stores for exact resume. Behaviour is specified in docs/data.md.
#ifndef MOE_LOADER_H
#define MOE_LOADER_H

#include <stddef.h>
#include <stdint.h>

typedef struct Loader Loader;

// Where the loader stands. All ranks of a run hold the same state, so a
// checkpoint may store rank 0's and give it to every rank.
typedef struct {
    uint64_t epoch;       // epochs completed
    uint64_t batch;       // next micro-batch within the epoch, < loader_num_batches
    uint64_t fingerprint; // hash of the data and settings the state belongs to (see docs)
} LoaderState;

// Opens the shards matched by `pattern`: one glob, or several separated by
// commas, e.g. "data/train_*.bin" or "a/*.bin,b/*.bin". Matches are sorted by
// name (byte order) and duplicates dropped; every shard is validated now.
// B windows of T+1 tokens make one micro-batch; this is rank `rank` of `world`.
// shuffle = 1: a new permutation of all windows each epoch, from (seed, epoch);
// shuffle = 0: windows in file order (evaluation). Returns NULL with a message
// in err (naming the file where one is at fault) on any error, including data
// too small for one micro-batch per rank or shards with different vocabularies.
Loader *loader_open(const char *pattern, int B, int T, int rank, int world, uint64_t seed,
                    int shuffle, char *err, size_t errlen);

// Fills the next micro-batch: inputs[b*T + t] is token t of window b and
// targets[b*T + t] is token t+1 of it. Both point to B*T int32 values. Past the
// last micro-batch of an epoch the next epoch starts. Returns 0, or -1 when a
// token id is >= the vocabulary size (message in loader_error; the state does
// not advance).
int loader_next(Loader *L, int32_t *inputs /* (B,T) */, int32_t *targets /* (B,T) */);

// The message of the last failed loader_next or loader_set_state.
const char *loader_error(const Loader *L);

LoaderState loader_get_state(const Loader *L);
// Restores a state taken by loader_get_state from a loader opened on the same
// shards with the same B, T, world, seed and shuffle (the fingerprint checks
// this). Returns -1 with a message in loader_error for a state that does not
// belong to this loader or is out of range; the loader is then unchanged.
int loader_set_state(Loader *L, const LoaderState *s);

// Back to epoch 0, batch 0 (e.g. before each evaluation pass).
void loader_reset(Loader *L);

// Micro-batches per epoch for each rank (the same on every rank).
uint64_t loader_num_batches(const Loader *L);
// Windows of T+1 tokens in all shards together.
uint64_t loader_num_windows(const Loader *L);
// The vocabulary size recorded in the shards; the trainer compares it with the model.
uint32_t loader_vocab_size(const Loader *L);
int loader_num_shards(const Loader *L);

// Frees everything. NULL is allowed.
void loader_close(Loader *L);

#endif
