// Properties of the fp32 CPU model that need no oracle:
//  1. determinism: forward + backward give bit-identical loss and gradients
//     run after run and with 1 or 2 OpenMP threads;
//  2. the balancing bias changes only the selection: with a bias that reorders
//     the TopK, the gate values still equal the unbiased affinities of the
//     chosen experts (normalised, times route_scale);
//  3. per layer, the token counts sum to top_k x tokens and match the selections;
//  4. the 1b-hz preset is Han & Zhong's 1B setup (docs/model.md): its fields,
//     and its parameter count against a count by hand from those sizes.
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

static void test_preset_1b_hz(void) {
    MoeConfig c;
    CHECK(config_preset(&c, "1b-hz") == 0, "preset 1b-hz exists");
    CHECK(c.n_layers == 9 && c.n_dense == 1 && c.d_ff == 2816 && c.d_model == 1024 && c.n_heads == 8 &&
              c.vocab_size == 32064 && c.n_routed == 64 && c.d_expert == 528 && c.top_k == 6 && c.n_shared == 2 &&
              c.gate == GATE_SOFTMAX && c.norm_topk == 1 && c.parallel_residual == 1 && c.seq_len == 4096,
          "1b-hz: 9 layers (1 dense, d_ff 2816), d 1024, 8 heads, V 32064, 64 experts of 528, top-6, "
          "2 shared, softmax + normalised top-k, parallel residual, T 4096");
    // By hand: embedding and untied head, per layer two norms and attention, the
    // dense FFN, per MoE layer the router, the shared SwiGLU (2 x 528 = 1056
    // wide) and 64 expert SwiGLUs, the final norm.
    int64_t V = 32064, d = 1024, attn = 2 * d + 4 * d * d, dense = 3 * d * 2816;
    int64_t moe = 64 * d + 3 * d * 1056 + 64 * 3 * d * 528;
    int64_t want = 2 * V * d + 9 * attn + dense + 8 * moe + d;
    ParamLayout lay;
    layout_build(&lay, &c);
    CHECK(lay.total == want, "1b-hz parameters: %lld (by hand %lld)", (long long)lay.total, (long long)want);
    layout_free(&lay);
}

int main(void) {
    test_preset_1b_hz();
    test_determinism();
    test_bias_selection_only();
    printf("test_model: %s\n", failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}
