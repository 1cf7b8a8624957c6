// Properties of the fp32 CPU model that need no oracle:
//  1. determinism: forward + backward give bit-identical loss and gradients
//     run after run and with 1 or 2 OpenMP threads;
//  2. the balancing bias changes only the selection: with a bias that reorders
//     the TopK, the gate values still equal the unbiased affinities of the
//     chosen experts (normalised, times route_scale);
//  3. per layer, the token counts sum to top_k x tokens and match the selections.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/model.h"

static int failures;
#define CHECK(cond, ...)                                    \
    do {                                                    \
        int ok_ = (cond);                                   \
        printf("%s: ", ok_ ? "ok  " : "FAIL");              \
        printf(__VA_ARGS__);                                \
        printf("\n");                                       \
        failures += !ok_;                                   \
    } while (0)

static void make_batch(int *tok, int *tgt, int N, int V, uint64_t seed) {
    Rng r = { seed };
    for (int i = 0; i < N; i++) {
        tok[i] = (int)(rng_u64(&r) % V);
        tgt[i] = (int)(rng_u64(&r) % V);
    }
}

static void test_determinism(void) {
    MoeConfig c;
    config_preset(&c, "tiny");
    c.init_std = 0.1f;
    int B = 3, T = 16, N = B * T;
    Model m;
    model_create(&m, &c, B, T);
    model_init_params(&m, 7, 0.0f);
    m.route.aux_kind = AUX_SEQ;
    m.route.aux_alpha = 0.01f;
    int *tok = malloc(sizeof(int) * N), *tgt = malloc(sizeof(int) * N);
    make_batch(tok, tgt, N, c.vocab_size, 5);
    real *ref = malloc(sizeof(real) * m.lay.total);
    double ref_loss = 0;
    int threads[] = { 1, 2, 2, 1 };
    for (int run = 0; run < 4; run++) {
        omp_set_num_threads(threads[run]);
        model_forward(&m, tok, tgt, B, T);
        model_zero_grad(&m);
        model_backward(&m, 1.0f);
        if (run == 0) {
            memcpy(ref, m.grads, sizeof(real) * m.lay.total);
            ref_loss = m.loss + m.aux_loss;
            continue;
        }
        int same = memcmp(ref, m.grads, sizeof(real) * m.lay.total) == 0;
        CHECK(same && ref_loss == m.loss + m.aux_loss,
              "run %d with %d thread(s): loss and all %lld gradients bit-identical to run 0 (1 thread)", run,
              threads[run], (long long)m.lay.total);
    }
    omp_set_num_threads(2);
    free(ref);
    free(tok);
    free(tgt);
    model_free(&m);
}

static void test_bias_selection_only(void) {
    MoeConfig c;
    config_preset(&c, "tiny");
    c.init_std = 0.2f;
    c.route_scale = 1.5f;
    int B = 2, T = 16, N = B * T, E = c.n_routed, K = c.top_k;
    for (int mult = 0; mult <= 1; mult++) {
        Model m;
        model_create(&m, &c, B, T);
        model_init_params(&m, 11, mult ? 1.0f : 0.0f);
        m.route.bias_mult = mult;
        int *tok = malloc(sizeof(int) * N), *tgt = malloc(sizeof(int) * N);
        make_batch(tok, tgt, N, c.vocab_size, 3);
        model_forward(&m, tok, tgt, B, T);
        int l = c.n_dense;
        int *sel0 = malloc(sizeof(int) * N * K);
        memcpy(sel0, m.layer[l].moe.sel, sizeof(int) * N * K);
        // Favour the experts that were chosen least: the bias must reorder the TopK.
        int64_t *cnt = m.counts;
        for (int e = 0; e < E; e++) {
            float push = cnt[e] == 0 ? 0.5f : 0.5f / (float)cnt[e];
            m.bias[e] = mult ? 1.0f + 4 * push : push;
        }
        model_forward(&m, tok, tgt, B, T);
        const MoeActs *a = &m.layer[l].moe;
        int changed = 0;
        double maxdiff = 0;
        for (int t = 0; t < N; t++) {
            changed += memcmp(sel0 + t * K, a->sel + t * K, sizeof(int) * K) != 0;
            double z = 0;
            for (int j = 0; j < K; j++) z += a->s[t * E + a->sel[t * K + j]];
            for (int j = 0; j < K; j++) {
                double want = a->s[t * E + a->sel[t * K + j]] / z * c.route_scale;
                maxdiff = fmax(maxdiff, fabs(want - a->gates[t * K + j]));
            }
        }
        CHECK(changed > 0, "%s bias reorders the TopK of %d of %d tokens", mult ? "multiplicative" : "additive",
              changed, N);
        CHECK(maxdiff < 1e-6, "gates equal the unbiased normalised affinities x route_scale (max diff %.2e)",
              maxdiff);
        for (int k = 0; k < config_n_moe(&c); k++) {
            int64_t sum = 0;
            for (int e = 0; e < E; e++) sum += m.counts[k * E + e];
            int64_t recount = 0;
            for (int i = 0; i < N * K; i++) recount += m.layer[c.n_dense + k].moe.sel[i] == 0;
            CHECK(sum == (int64_t)K * N && recount == m.counts[k * E],
                  "MoE layer %d: counts sum to top_k x tokens = %lld (got %lld), expert 0 count matches", k,
                  (long long)K * N, (long long)sum);
        }
        free(sel0);
        free(tok);
        free(tgt);
        model_free(&m);
    }
}

int main(void) {
    test_determinism();
    test_bias_selection_only();
    printf("test_model: %s\n", failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}
