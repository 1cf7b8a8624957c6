// The best fixed bias in hindsight: for the score rows of every token of
// several steps of one MoE layer (n rows of E scores, top-K),
//
//   min_b F(b),   F(b) = sum_i (sum of the K largest s[i,e] + b[e]) - C sum_e b[e],  C = K n / E,
//
// the sum of the steps' dual functions (docs/balance.md). By LP duality its value
// is the best assignment of all tokens with each expert's capacity summed over
// the steps, and the solver returns both sides, so the answer comes with a
// certified duality gap:
//
//   upper = F(b) at the bias returned        (every b bounds the optimum from above)
//   lower = the value of a feasible assignment (every one bounds it from below)
//
// How (docs/balance.md "The hindsight solver"): damped Newton steps on F with a
// Hessian estimated from the tokens at the selection boundary bring b close;
// then successive shortest paths (the exact min-cost-flow method, with b as the
// potentials) turn the TopK assignment at b into a feasible optimal one. The
// final b makes that assignment a TopK of s + b, so upper and lower agree up
// to rounding; both are returned so that the claim is checked, not assumed.
#ifndef MOE_HINDSIGHT_H
#define MOE_HINDSIGHT_H

#include <stdint.h>

typedef struct {
    int max_newton;      // Newton iterations at most (default 60)
} HindsightOptions;

void hindsight_options_default(HindsightOptions *o);

typedef struct {
    double upper;      // F(b) at the returned b, >= the optimum
    double lower;      // value of a feasible assignment, <= the optimum
    double gap;        // upper - lower
    double rel_gap;    // gap / |upper|
    int newton_iters;  // Newton iterations taken
    int64_t augments;  // shortest paths along which weight was shifted
    int scans;         // searches of the cheap moves (each reads the rows near the boundary)
    double seconds;
} HindsightResult;

// F(b) in double; when counts (E) is not NULL, the counts of the TopK of s + b
// (ties to the lower index), whose difference to C is a subgradient of F.
double hindsight_dual(const float *s /* (n, E) */, int64_t n, int E, int K, const double *b /* (E) */,
                      int64_t *counts /* (E) or NULL */);

// Solves min_b F(b). b (E): the start on entry (e.g. the solution of a shorter
// horizon, or zeros), the best bias found on return. Returns 0, or -1 when the
// sizes are invalid or the shortest-path phase got stuck (not expected; a
// message on stderr).
int hindsight_solve(const float *s /* (n, E) */, int64_t n, int E, int K, double *b /* (E) */,
                    const HindsightOptions *opt, HindsightResult *res);

#endif
