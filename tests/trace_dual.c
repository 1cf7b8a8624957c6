// Recomputes a training run's logged primal-dual quantities from its
// router-score trace, with model/dual.c (the functions tests/test_dual.c checks
// against brute force), for tests/test_lab_trace.sh.
//
//   trace_dual TRACE ROWS RANKS
//
// TRACE holds every token of every step (no sample). ROWS is the rows of one
// micro-batch of one rank (B T), RANKS the number of ranks. The trace's rows
// come micro-batch by micro-batch, rank by rank (train/trainer.c). Sums are
// formed as the trainer forms them: each micro-batch token by token from zero,
// micro-batches added in order per rank, then the ranks in rank order (the
// order of an all-reduce of two values does not matter; for more ranks MPI's
// may differ from this one). A run that updated after every micro-batch
// (updates_per_step > 1) recorded one step per update: their statistics are
// finished one by one and added with dual_stats_add, as the trainer does.
//
// Prints one JSON line per optimizer step: "step", and per MoE layer
// "dual_layers", "primal_layers", "gap_layers", "subgrad_l1_layers",
// "subgrad_l2_layers", "moved_layers", with the trainer's number format.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/dual.h"
#include "../train/trace.h"
#include "../util/util.h"

static void print_num(double v) {
    if (isfinite(v)) printf("%.17g", v);
    else printf("null");
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: trace_dual TRACE ROWS RANKS\n");
        return 2;
    }
    char err[1024];
    TraceReader *r = trace_reader_open(argv[1], 0, err, sizeof err);
    if (!r) {
        fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    const TraceHeader *h = trace_reader_header(r);
    int64_t rows = atoll(argv[2]), ranks = atoll(argv[3]);
    int L = h->n_layers, E = h->E, K = h->K, mult = (h->flags & TRACE_MULT) != 0;
    int64_t M = h->sample;
    if (M != h->tokens_per_step || rows < 1 || ranks < 1 || M % (rows * ranks) != 0) {
        fprintf(stderr, "error: %s: needs every token, in micro-batches of ROWS x RANKS rows (M = %lld)\n", argv[1],
                (long long)M);
        return 1;
    }
    int64_t micro = M / (rows * ranks); // micro-batches per recorded step
    DualAccum step_acc, rank_acc, mb_acc;
    dual_accum_init(&step_acc, E, K, mult);
    dual_accum_init(&rank_acc, E, K, mult);
    dual_accum_init(&mb_acc, E, K, mult);
    DualStats *sum = xcalloc((size_t)L, sizeof(DualStats)); // (L) the optimizer step's statistics
    int *sel = xmalloc(sizeof(int) * (size_t)(2 * rows * K)); // (2, rows, K) biased, reference
    TraceRecord rec;
    int rc;
    int64_t updates = 0;
    while ((rc = trace_next(r, &rec, err, sizeof err)) == 1) {
        // The ranks' sums in rank order, each over its micro-batches in order.
        dual_accum_reset(&step_acc);
        for (int64_t q = 0; q < ranks; q++) {
            dual_accum_reset(&rank_acc);
            for (int64_t a = 0; a < micro; a++) {
                const float *s = rec.scores + ((a * ranks + q) * rows) * E; // (rows, E)
                dual_select(s, rows, E, K, rec.bias, mult, sel);
                dual_select(s, rows, E, K, NULL, mult, sel + rows * K);
                dual_accum_reset(&mb_acc);
                dual_accum_tokens(&mb_acc, s, rows, sel, sel + rows * K);
                dual_accum_add(&rank_acc, &mb_acc);
            }
            dual_accum_add(&step_acc, &rank_acc);
        }
        DualStats st;
        if (dual_finish(&step_acc, rec.bias, &st) != 0) {
            fprintf(stderr, "error: %s: step %lld layer %d: no statistics\n", argv[1], (long long)rec.step, rec.layer);
            return 1;
        }
        dual_stats_add(&sum[rec.layer], &st);
        if (rec.layer < L - 1) continue;
        if (++updates % h->updates_per_step != 0) continue;
        // A whole optimizer step: the step the trainer logs is the one after it.
        printf("{\"step\":%lld", (long long)(rec.step / h->updates_per_step + 1));
        static const char *names[] = { "dual", "primal", "gap", "subgrad_l1", "subgrad_l2" };
        for (int k = 0; k < 5; k++) {
            printf(",\"%s_layers\":[", names[k]);
            for (int l = 0; l < L; l++) {
                const double v[5] = { sum[l].dual, sum[l].primal, sum[l].gap, sum[l].subgrad_l1, sum[l].subgrad_l2 };
                if (l) printf(",");
                print_num(v[k]);
            }
            printf("]");
        }
        printf(",\"moved_layers\":[");
        for (int l = 0; l < L; l++) printf("%s%lld", l ? "," : "", (long long)sum[l].moved);
        printf("]}\n");
        memset(sum, 0, sizeof(DualStats) * (size_t)L);
    }
    trace_reader_close(r);
    if (rc < 0) {
        fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    dual_accum_free(&step_acc);
    dual_accum_free(&rank_acc);
    dual_accum_free(&mb_acc);
    free(sum);
    free(sel);
    return 0;
}
