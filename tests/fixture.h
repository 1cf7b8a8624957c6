// Reader of the named-tensor fixture files written by the PyTorch reference
// (scripts/reference/moe_reference.py); the format is in docs/fixtures.md.
// A fixture is loaded whole: every entry gets its own aligned copy of its
// data, converted to host byte order, so `data` can be read directly as
// float / double / int32_t / uint8_t according to `dtype`.
#ifndef MOE_FIXTURE_H
#define MOE_FIXTURE_H

#include <stddef.h>
#include <stdint.h>

#include "../model/route.h"

typedef enum { FIX_F32 = 0, FIX_F64 = 1, FIX_I32 = 2, FIX_U8 = 3 } FixtureDtype;

typedef struct {
    char *name;        // NUL-terminated
    FixtureDtype dtype;
    int ndim;          // 0 (scalar) .. 4
    int64_t dims[4];   // dims[i] for i < ndim, 1 beyond
    int64_t numel;     // product of the dims (1 for a scalar)
    void *data;        // numel elements of dtype, followed by one NUL byte (a u8 entry is a C string)
} FixtureEntry;

typedef struct {
    char *path;
    int n;             // number of entries
    FixtureEntry *entries;  // (n) in file order
} Fixture;

// Reads and validates a fixture file (magic, version, every entry's header and
// size against the file length, no duplicate names, nothing after the last
// entry). Returns NULL on any error, with a message naming the file in err.
Fixture *fixture_load(const char *path, char *err, size_t errlen);
// The entry with this name, or NULL.
const FixtureEntry *fixture_get(const Fixture *f, const char *name);
// The entry with this name; exits with a message naming the file when it is missing.
const FixtureEntry *fixture_need(const Fixture *f, const char *name);
// The routing options a model fixture was made with (its route.* entries;
// route.bias_logits, absent in the older files, means 0).
RouteOptions fixture_route_options(const Fixture *f);
// The name of the entry holding what MoE layer l's bias is added to:
// "affinity.<l>", or "route_score.<l>" with the bias on the logits.
void fixture_route_base_name(const RouteOptions *ro, int l, char *name, size_t len);
// The one element of an entry with numel == 1, as a double (aborts with a
// message for any other entry: a programming error in the caller).
double fixture_scalar(const FixtureEntry *e);
// Converts all numel elements of the entry (any dtype) into out.
void fixture_to_double(const FixtureEntry *e, double *out);
void fixture_to_float(const FixtureEntry *e, float *out);
// Routing of one token of a model fixture, from its reference affinities aff
// (E) and the layer's bias (E), with rule mult (1: s * b) and top_k K:
// returns the smallest gap between consecutive scores of ranks 1..min(K+1, E)
// divided by the token's largest |score| (INFINITY when K = E = 1), leaving
// out a gap of exactly 0 between the fixture's designed tie pair tie[0],
// tie[1] (NULL: none; docs/fixtures.md). *tie_kind (may be NULL) gets
// FIX_TIE_SET when the pair sits at ranks K and K+1 (the tie rule decides
// which one is selected), FIX_TIE_ORDER when both are selected (it decides
// their order), FIX_TIE_NONE otherwise.
enum { FIX_TIE_NONE = 0, FIX_TIE_SET = 1, FIX_TIE_ORDER = 2 };
double fixture_route_margin(const double *aff, const float *bias, int E, int K, int mult, const int32_t *tie,
                            int *tie_kind);
// Size in bytes of one element of a dtype.
size_t fixture_dtype_size(FixtureDtype dt);
void fixture_free(Fixture *f);

#endif
