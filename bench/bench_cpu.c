// CPU throughput of the reference model: forward + backward tokens per second
// and achieved GFLOP/s (training FLOPs of model/config.c) for a preset.
//   bench_cpu [preset] [B] [T] [repeats]      defaults: small 8 256 5
// One warm-up step, then `repeats` timed steps; prints the median.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/model.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    const char *preset = argc > 1 ? argv[1] : "small";
    MoeConfig c;
    if (config_preset(&c, preset) != 0) {
        fprintf(stderr, "unknown preset %s\n", preset);
        return 2;
    }
    int B = argc > 2 ? atoi(argv[2]) : 8, T = argc > 3 ? atoi(argv[3]) : 256;
    int R = argc > 4 ? atoi(argv[4]) : 5;
    if (B < 1 || T < 1 || R < 1) {
        fprintf(stderr, "usage: bench_cpu [preset] [B] [T] [repeats]\n");
        return 2;
    }
    c.seq_len = T;
    Model m;
    model_create(&m, &c, B, T);
    model_init_params(&m, 1, 0.0f);
    int N = B * T;
    int *tok = malloc(sizeof(int) * N), *tgt = malloc(sizeof(int) * N);
    Rng rng = { 7 };
    for (int i = 0; i < N; i++) {
        tok[i] = (int)(rng_u64(&rng) % c.vocab_size);
        tgt[i] = (int)(rng_u64(&rng) % c.vocab_size);
    }
    double *t = malloc(sizeof(double) * R), *tf = malloc(sizeof(double) * R);
    for (int r = -1; r < R; r++) {
        double t0 = omp_get_wtime();
        model_forward(&m, tok, tgt, B, T);
        double t1 = omp_get_wtime();
        model_zero_grad(&m);
        model_backward(&m, 1.0f);
        double t2 = omp_get_wtime();
        if (r >= 0) {
            t[r] = t2 - t0;
            tf[r] = t1 - t0;
        }
    }
    qsort(t, R, sizeof(double), cmp_double);
    qsort(tf, R, sizeof(double), cmp_double);
    double med = t[R / 2], flops = config_train_flops_per_token(&c, T) * N;
    printf("%s B=%d T=%d threads=%d: %.0f tokens/s forward+backward (median of %d; min %.0f, max %.0f), "
           "forward %.0f%% of the time, %.1f GFLOP/s\n",
           preset, B, T, omp_get_max_threads(), N / med, R, N / t[R - 1], N / t[0], 100 * tf[R / 2] / med,
           flops / med / 1e9);
    free(t);
    free(tf);
    free(tok);
    free(tgt);
    model_free(&m);
    return 0;
}
