// Synthetic online streams of router affinities for moe_replay: no model, a
// fixed generator per step. Token t of step n in layer l has the logits
//
//   z[t,e] = mu_e(n) + noise * N(0, 1),   affinity s[t,e] = sigmoid(z[t,e]),
//
// and the kinds differ in the expert preferences mu (docs/balance.md "Streams"):
//
//   stationary   mu_e = pref * (exp(g_e) - 1) / 2, g_e ~ N(0, 1): a lognormal right
//                tail (the generator of tests/test_balance.c)
//   drift        mu_e(n) = pref * sin(2 pi (n / period + phi_e)), phi_e ~ U(0, 1):
//                every expert's preference cycles, out of phase with the others
//   zipf         mu_e = -zipf_a * ln(rank_e), rank a random permutation of 1..E:
//                exp(mu) follows Zipf's law with exponent zipf_a (heavy-tailed)
//   adversarial  the stationary mu with its sign flipped every alt_period steps:
//                what a lagging bias learned is wrong after every flip
//
// With repeat set, every step replays step 0's batch: the deterministic setting
// of the primal-dual analysis (one assignment problem, solved again and again).
//
// Everything is drawn from counter-based generators keyed by (seed, layer) for
// mu and (seed, step, layer, token) for the noise, so any step can be produced
// alone, by any thread, with the same result.
#ifndef MOE_STREAM_H
#define MOE_STREAM_H

#include <stdint.h>

typedef enum { STREAM_STATIONARY, STREAM_DRIFT, STREAM_ZIPF, STREAM_ADVERSARIAL, STREAM_NKINDS } StreamKind;

typedef struct {
    StreamKind kind;
    int E, K;            // experts, experts per token
    int n_layers;        // independent layers (each its own mu)
    int64_t tokens;      // per step
    int64_t steps;
    uint64_t seed;
    double noise;        // std of the per-token logit noise (default 1)
    double pref;         // scale of the preferences (stationary, drift, adversarial; default 1)
    double zipf_a;       // zipf exponent (default 1)
    double period;       // drift: steps per cycle (default 200)
    int64_t alt_period;  // adversarial: steps between flips (default 1)
    int repeat;          // 1: every step is step 0's batch (the deterministic setting)
} StreamConfig;

// The defaults above, with E 64, K 6, 1 layer, 2048 tokens, 400 steps, seed 1.
void stream_config_default(StreamConfig *c);
// "stationary", ... ; -1 for an unknown name.
int stream_kind_from_name(const char *name);
const char *stream_kind_name(StreamKind k);
// "name" with its parameters, e.g. "zipf(a=1.5)", into buf.
void stream_describe(const StreamConfig *c, char *buf, int len);

// The affinities of one step and layer: scores (tokens, E).
void stream_generate(const StreamConfig *c, int64_t step, int layer, float *scores);

#endif
