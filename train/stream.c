// Synthetic streams of router affinities (train/stream.h).
#include "stream.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../util/util.h"

static const double STREAM_PI = 3.14159265358979323846;
static const char *const stream_names[STREAM_NKINDS] = {"stationary", "drift", "zipf", "adversarial"};

void stream_config_default(StreamConfig *c) {
    c->kind = STREAM_STATIONARY;
    c->E = 64; // the small, 1b and 3b presets: 64 routed experts, top-6
    c->K = 6;
    c->n_layers = 1;
    c->tokens = 2048; // the small preset's batch: 8 x 256
    c->steps = 400;
    c->seed = 1;
    c->noise = 1.0;
    c->pref = 1.0;
    c->zipf_a = 1.0;
    c->period = 200.0;
    c->alt_period = 1;
    c->repeat = 0;
}

int stream_kind_from_name(const char *name) {
    for (int k = 0; k < STREAM_NKINDS; k++)
        if (strcmp(stream_names[k], name) == 0) return k;
    return -1;
}

const char *stream_kind_name(StreamKind k) { return k >= 0 && k < STREAM_NKINDS ? stream_names[k] : "?"; }

void stream_describe(const StreamConfig *c, char *buf, int len) {
    if (c->repeat) { // one batch, again and again
        char inner[200];
        StreamConfig once = *c;
        once.repeat = 0;
        stream_describe(&once, inner, (int)sizeof(inner));
        snprintf(buf, (size_t)len, "%s, one batch repeated", inner);
        return;
    }
    switch (c->kind) {
    case STREAM_STATIONARY: snprintf(buf, (size_t)len, "stationary(pref=%g)", c->pref); break;
    case STREAM_DRIFT: snprintf(buf, (size_t)len, "drift(pref=%g,period=%g)", c->pref, c->period); break;
    case STREAM_ZIPF: snprintf(buf, (size_t)len, "zipf(a=%g)", c->zipf_a); break;
    default: snprintf(buf, (size_t)len, "adversarial(pref=%g,alt=%lld)", c->pref, (long long)c->alt_period); break;
    }
}

// ---------------------------------------------------------------- random numbers

// splitmix64 (Steele, Lea, Flood 2014) from a state the caller keys.
static uint64_t sm_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// A state for the given key words: each is mixed in through a splitmix64 step.
static uint64_t sm_key(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
    uint64_t st = a;
    st = sm_next(&st) ^ b;
    st = sm_next(&st) ^ c;
    st = sm_next(&st) ^ d;
    return sm_next(&st);
}

static double sm_uniform(uint64_t *st) { return (double)(sm_next(st) >> 11) * (1.0 / 9007199254740992.0); }

// Two standard normals by Box-Muller.
static void sm_normal2(uint64_t *st, double *z0, double *z1) {
    double u = sm_uniform(st), v = sm_uniform(st);
    double r = sqrt(-2.0 * log(1.0 - u));
    *z0 = r * cos(2.0 * STREAM_PI * v);
    *z1 = r * sin(2.0 * STREAM_PI * v);
}

// ---------------------------------------------------------------- preferences

// mu (E) of layer `layer` at step `step`.
static void stream_mu(const StreamConfig *c, int64_t step, int layer, double *mu) {
    int E = c->E;
    uint64_t st = sm_key(c->seed, 0x6d75ull /* "mu" */, (uint64_t)layer, (uint64_t)c->kind);
    switch (c->kind) {
    case STREAM_STATIONARY:
    case STREAM_ADVERSARIAL: {
        double flip = 1.0;
        if (c->kind == STREAM_ADVERSARIAL && (step / c->alt_period) % 2 == 1) flip = -1.0;
        for (int e = 0; e < E; e += 2) {
            double z0, z1;
            sm_normal2(&st, &z0, &z1);
            mu[e] = flip * c->pref * 0.5 * (exp(z0) - 1.0);
            if (e + 1 < E) mu[e + 1] = flip * c->pref * 0.5 * (exp(z1) - 1.0);
        }
        break;
    }
    case STREAM_DRIFT:
        for (int e = 0; e < E; e++) {
            double phase = sm_uniform(&st);
            mu[e] = c->pref * sin(2.0 * STREAM_PI * ((double)step / c->period + phase));
        }
        break;
    case STREAM_ZIPF: {
        int *rank = xmalloc(sizeof(int) * (size_t)E); // (E) a random permutation of 1..E
        for (int e = 0; e < E; e++) rank[e] = e + 1;
        for (int e = E - 1; e > 0; e--) { // Fisher-Yates
            int j = (int)(sm_next(&st) % (uint64_t)(e + 1));
            int t = rank[e];
            rank[e] = rank[j];
            rank[j] = t;
        }
        for (int e = 0; e < E; e++) mu[e] = -c->zipf_a * log((double)rank[e]);
        free(rank);
        break;
    }
    default: ASSERT(0, "unknown stream kind %d", (int)c->kind);
    }
}

void stream_generate(const StreamConfig *c, int64_t step, int layer, float *scores) {
    int E = c->E;
    if (c->repeat) step = 0;
    double *mu = xmalloc(sizeof(double) * (size_t)E); // (E)
    stream_mu(c, step, layer, mu);
    for (int64_t t = 0; t < c->tokens; t++) {
        uint64_t st = sm_key(c->seed, (uint64_t)step, (uint64_t)layer, (uint64_t)t);
        float *s = scores + t * E;
        for (int e = 0; e < E; e += 2) {
            double z0, z1;
            sm_normal2(&st, &z0, &z1);
            s[e] = (float)(1.0 / (1.0 + exp(-(mu[e] + c->noise * z0))));
            if (e + 1 < E) s[e + 1] = (float)(1.0 / (1.0 + exp(-(mu[e + 1] + c->noise * z1))));
        }
    }
    free(mu);
}
