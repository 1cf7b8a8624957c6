// The hindsight solver (train/hindsight.c) on an instance read from standard
// input, for tests/test_hindsight_lp.py, which solves the same problem as a
// linear program with scipy and compares the optima.
//
//   hindsight_lp < INSTANCE
//
// INSTANCE (text): "n E K", then n rows of E scores. Prints one line:
// "upper LOWER rel_gap" (F at the returned bias, the value of the feasible
// assignment found, their relative gap), each with 17 significant digits.
#include <stdio.h>
#include <stdlib.h>

#include "../train/hindsight.h"
#include "../util/util.h"

int main(void) {
    long long n;
    int E, K;
    if (scanf("%lld %d %d", &n, &E, &K) != 3 || n < 1 || E < 1 || K < 1 || K > E || n > 1000000 || E > 4096) {
        fprintf(stderr, "hindsight_lp: expected 'n E K' (1 <= K <= E) on standard input\n");
        return 2;
    }
    float *s = xmalloc(sizeof(float) * (size_t)n * E); // (n, E)
    for (long long i = 0; i < n * E; i++)
        if (scanf("%f", &s[i]) != 1) {
            fprintf(stderr, "hindsight_lp: score %lld of %lld missing or not a number\n", i, n * E);
            return 2;
        }
    double *b = xcalloc((size_t)E, sizeof(double)); // (E) from zero
    HindsightOptions opt;
    hindsight_options_default(&opt);
    HindsightResult res;
    if (hindsight_solve(s, n, E, K, b, &opt, &res) != 0) return 1;
    printf("%.17g %.17g %.3g\n", res.upper, res.lower, res.rel_gap);
    free(s);
    free(b);
    return 0;
}
