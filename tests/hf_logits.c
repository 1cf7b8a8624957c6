// A test tool: the CPU model's forward on one batch of a checkpoint, for
// comparison with transformers (tests/hf_check.py, tests/test_hf.sh).
//
//   hf_logits CKPT OUT B T SEED      tokens drawn uniformly from the vocabulary
//   hf_logits CKPT OUT B T @IDS      the first B (T + 1) ids of a file (one per line)
//
// Inputs are tokens[:, :T], targets tokens[:, 1:]. Prints the mean
// cross-entropy (decimal and hexadecimal float, for bit-exact comparisons) and
// writes OUT, little-endian:
//   "HFLG", int32 B, T, V, n_moe, K
//   int32 tokens (B, T + 1)
//   f32 logits (B T, V)
//   int32 selected experts (n_moe, B T, K), by decreasing score
//   f64 loss
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/model.h"
#include "../train/ckpt_model.h"
#include "../util/util.h"

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// tokens (n) from SEED or @FILE.
static int read_tokens(const char *src, int *tokens, int n, int V) {
    if (src[0] != '@') {
        uint64_t s = strtoull(src, NULL, 10);
        for (int i = 0; i < n; i++) tokens[i] = (int)(splitmix(&s) % (uint64_t)V);
        return 0;
    }
    FILE *f = fopen(src + 1, "r");
    int i = 0;
    while (f && i < n && fscanf(f, "%d", &tokens[i]) == 1) i++;
    if (f) fclose(f);
    for (int k = 0; k < i; k++)
        if (tokens[k] < 0 || tokens[k] >= V) i = -1;
    if (i < n) fprintf(stderr, "hf_logits: %s: fewer than %d ids in [0, %d)\n", src + 1, n, V);
    return i < n ? -1 : 0;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: hf_logits CKPT OUT B T SEED|@IDS\n");
        return 2;
    }
    char err[1024];
    CkptModel cm;
    if (ckpt_model_load(argv[1], &cm, err, sizeof err) != 0) {
        fprintf(stderr, "hf_logits: %s\n", err);
        return 1;
    }
    const MoeConfig *c = &cm.cfg;
    int B = atoi(argv[3]), T = atoi(argv[4]), V = c->vocab_size, K = c->top_k, n_moe = config_n_moe(c);
    if (B < 1 || T < 1 || T > c->seq_len) {
        fprintf(stderr, "hf_logits: need B >= 1 and 1 <= T <= seq_len (%d)\n", c->seq_len);
        return 2;
    }
    int N = B * T;
    int *all = xcalloc((size_t)B * (T + 1), sizeof(int)); // (B, T + 1)
    int *in = xcalloc((size_t)N, sizeof(int)), *tg = xcalloc((size_t)N, sizeof(int));
    if (read_tokens(argv[5], all, B * (T + 1), V) != 0) return 1;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            in[b * T + t] = all[b * (T + 1) + t];
            tg[b * T + t] = all[b * (T + 1) + t + 1];
        }

    Model m;
    model_create(&m, c, B, T);
    model_set_params(&m, cm.params);
    memcpy(m.bias, cm.bias, sizeof(float) * (size_t)n_moe * c->n_routed);
    m.route.bias_mult = cm.bias_mult;
    // Logits and selections from a forward without targets (with targets the
    // logits buffer ends up holding probabilities).
    model_forward(&m, in, NULL, B, T);
    FILE *f = fopen(argv[2], "wb");
    if (!f) {
        perror(argv[2]);
        return 1;
    }
    int32_t head[5] = { B, T, V, n_moe, K };
    fwrite("HFLG", 1, 4, f);
    fwrite(head, sizeof head, 1, f);
    for (int i = 0; i < B * (T + 1); i++) fwrite(&(int32_t){ all[i] }, 4, 1, f);
    for (size_t i = 0; i < (size_t)N * V; i++) fwrite(&(float){ (float)m.logits[i] }, 4, 1, f);
    for (int l = c->n_dense; l < c->n_layers; l++)
        for (size_t i = 0; i < (size_t)N * K; i++) fwrite(&(int32_t){ m.layer[l].moe.sel[i] }, 4, 1, f);
    model_forward(&m, in, tg, B, T);
    double loss = m.loss;
    fwrite(&loss, 8, 1, f);
    if (fclose(f) != 0) {
        perror(argv[2]);
        return 1;
    }
    printf("loss %.9f %a\n", loss, loss);
    model_free(&m);
    ckpt_model_free(&cm);
    free(all);
    free(in);
    free(tg);
    return 0;
}
