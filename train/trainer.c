// The training loop shared by both trainers (see trainer.h). Read top to
// bottom: setup, one optimizer step, evaluation, checkpoints, sampling, main.
#include "trainer.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../data/loader.h"
#include "../model/balance.h"
#include "../model/layout.h"
#include "../tokenizer/bpe.h"
#include "../util/util.h"
#include "ckpt.h"
#include "ckpt_state.h"
#include "lr.h"
#include "profile.h"
#include "trace.h"

// ----------------------------------------------------------------------------
// Small helpers

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static volatile sig_atomic_t stop_requested;
static void on_signal(int sig) { stop_requested = sig; }

static void fmt_duration(char *buf, size_t n, double s) {
    if (s < 0 || !isfinite(s)) snprintf(buf, n, "?");
    else if (s < 60) snprintf(buf, n, "%.0fs", s);
    else if (s < 3600) snprintf(buf, n, "%dm%02ds", (int)s / 60, (int)s % 60);
    else snprintf(buf, n, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

// ----------------------------------------------------------------------------
// Run state: everything a checkpoint holds besides the backend's tensors.

typedef struct {
    const TrainOptions *o;
    Backend *be;
    const Comm *comm;
    int main;               // 1 on rank 0: the rank that prints, logs and writes
    MoeConfig cfg;
    int n_moe, E;           // MoE layers, routed experts
    int64_t accum;          // micro-batches per step
    int64_t step;           // optimizer steps completed
    float *bias;            // (n_moe, E) the authoritative fp32 biases
    float *bias_step0;      // (n_moe, E) the biases at the start of the step (updated per micro-batch: for the metrics)
    int64_t *counts;        // (n_moe, E) counts of the current step
    int64_t *micro_counts;  // (n_moe, E) counts of one micro-batch (--bias-update-every micro)
    int *tokens, *targets;  // (B, T)
    Loader *train, *val;
    BalanceAccum eval_acc;  // counts over an evaluation pass
    int has_eval_acc;       // eval_acc was initialised
    int created;            // the backend's model exists (be->destroy is due)
    FILE *log;              // JSON lines, or NULL
    int log_failed;         // a write to the log failed: the run stops
    int lock_fd;            // the lock on --ckpt-dir held by rank 0, or -1
    Tokenizer *tok;         // --tokenizer, or NULL
    BalanceConfig balance;  // the balancing policy (a sampled checkpoint's own)
    uint64_t rng;           // sampling RNG state
    // the primal-dual quantities of the routing (docs/balance.md "In the trainers")
    DualAccum *dual;        // (n_moe) sums of the batch routed under one bias, over ranks
    DualStats *dstats;      // (n_moe) the step's statistics
    int64_t *pack;          // (n_moe (1 + 4 E)) the integer sums, packed for the all-reduce
    double *pack_f;         // (n_moe) the primal sums, packed
    // --trace-router (train/trace.h): rank 0 writes, every rank sends its rows
    int trace_on;           // this run traces
    TraceWriter *trace;     // rank 0's writer
    float *trace_rows;      // (world B T, E) one layer's rows of a micro-batch, every rank's
} Run;

// ----------------------------------------------------------------------------
// Checkpoints

// Every rank calls this (gathering expert shards is collective); rank 0
// writes the one file, which holds the whole model whatever the EP size.
static int trainer_save_main(Run *r, float *params, float *m, float *v);

static int trainer_save(Run *r) {
    int64_t n = r->be->n_params;
    float *p = xcalloc((size_t)n, sizeof(float));
    float *m = xcalloc((size_t)n, sizeof(float));
    float *v = xcalloc((size_t)n, sizeof(float));
    r->be->get_params(r->be, p);
    r->be->get_opt_state(r->be, m, v);
    int64_t rc = r->main ? trainer_save_main(r, p, m, v) : 0;
    free(p);
    free(m);
    free(v);
    // Every rank learns whether the write succeeded, so all stop together.
    comm_allreduce_max_i64(r->comm, COMM_WORLD, &rc, 1);
    return rc ? -1 : 0;
}

static int trainer_save_main(Run *r, float *params, float *adam_m, float *adam_v) {
    const TrainOptions *o = r->o;
    char path[OPT_PATH + 64], err[2048];
    if (ckpt_path(path, sizeof path, o->ckpt_dir, r->step) != 0) {
        fprintf(stderr, "error: checkpoint path too long in %s\n", o->ckpt_dir);
        return -1;
    }
    LoaderState ls = loader_get_state(r->train);
    CkptState st = { .cfg = r->cfg, .step = r->step, .loader = { ls.epoch, ls.batch, ls.fingerprint },
                     .rng = r->rng, .n_params = r->be->n_params, .bias = r->bias, .params = params,
                     .adam_m = adam_m, .adam_v = adam_v };
    size_t len;
    FILE *m = open_memstream(&st.options, &len);
    if (!m) FATAL("out of memory writing a checkpoint");
    options_write(o, m);
    fclose(m);
    int rc = ckpt_state_write(&st, path, err, sizeof err);
    free(st.options);
    if (rc != 0) {
        fprintf(stderr, "error: checkpoint not written: %s\n", err);
        return -1;
    }
    printf("checkpoint: wrote %s\n", path);
    if (o->keep_last > 0 && ckpt_prune(o->ckpt_dir, o->keep_last, r->step, err, sizeof err) < 0)
        fprintf(stderr, "warning: pruning old checkpoints: %s\n", err);
    return 0;
}

// Checks that the checkpoint's model equals the run's in every field but
// `ignore` (when not NULL). Returns 0, or -1 with a message.
static int trainer_check_model(Run *r, const CkptState *st, const char *ignore) {
    char fields[512];
    if (config_diff(&st->cfg, &r->cfg, ignore, fields, sizeof fields) == 0) return 0;
    if (r->main) {
        fprintf(stderr, "error: %s holds a different model than the options ask for (%s differ); its model is:\n",
                st->path, fields);
        config_write(&st->cfg, stderr);
    }
    return -1;
}

// What a resumed run continues from, checked against the options: the step
// within --steps, the data loader's position (the data and batch shape must
// be the saved ones), and a note listing every option that changed.
static int trainer_resume_state(Run *r, const CkptState *st) {
    const TrainOptions *o = r->o;
    char changes[4096];
    int n = options_changes(st->options, o, changes, sizeof changes);
    if (r->main && n > 0) printf("note: %d option(s) differ from the checkpoint's: %s\n", n, changes);
    if (st->step > o->steps) {
        if (r->main)
            fprintf(stderr, "error: %s: section 'step': the checkpoint is at step %lld, past --steps %lld "
                    "(raise --steps to continue it)\n", st->path, (long long)st->step, (long long)o->steps);
        return -1;
    }
    LoaderState ls = { st->loader[0], st->loader[1], st->loader[2] };
    if (loader_set_state(r->train, &ls) != 0) {
        if (r->main)
            fprintf(stderr, "error: %s: section 'loader': the data loader cannot resume: %s (were the data, -b, "
                    "--seq-len, --seed or the number of ranks changed?)\n", st->path, loader_error(r->train));
        return -1;
    }
    return 0;
}

// Hands a loaded checkpoint to the run and its backend: parameters and
// biases, and with full the AdamW moments, step and RNG state.
static int trainer_use_state(Run *r, const CkptState *st, int full) {
    size_t nb = (size_t)r->n_moe * r->E;
    // The multiplicative rule scales affinities by the bias: only a positive one selects sensibly.
    if (balance_bias_is_multiplicative(&r->balance))
        for (size_t i = 0; i < nb; i++)
            if (!(st->bias[i] > 0)) {
                if (r->main)
                    fprintf(stderr, "error: %s: section 'bias': element %zu is %g, but the multiplicative "
                            "rule needs biases > 0\n", st->path, i, st->bias[i]);
                return -1;
            }
    memcpy(r->bias, st->bias, nb * sizeof(float));
    r->be->set_params(r->be, st->params);
    r->be->set_bias(r->be, r->bias);
    if (full) {
        r->be->set_opt_state(r->be, st->adam_m, st->adam_v);
        r->step = st->step;
        r->rng = st->rng;
    }
    return 0;
}

// Loads a checkpoint file: parameters and biases, and with full (a resume)
// the optimizer state, step, loader and RNG state. Every value is checked
// (train/ckpt_state.c) before the backend sees any. Returns 0 or -1 with a message.
static int trainer_load(Run *r, const char *path, int full) {
    char err[2048];
    CkptState st;
    if (ckpt_state_open(&st, path, err, sizeof err) != 0) {
        fprintf(stderr, "error: %s\n", err);
        return -1;
    }
    // A model to start from (not resume) may have been trained at another
    // sequence length: no parameter depends on it (the RoPE tables are rebuilt).
    int rc = trainer_check_model(r, &st, full ? NULL : "seq_len");
    if (rc == 0 && (rc = ckpt_state_load(&st, full, err, sizeof err)) != 0) fprintf(stderr, "error: %s\n", err);
    if (rc == 0 && full) rc = trainer_resume_state(r, &st);
    if (rc == 0) rc = trainer_use_state(r, &st, full);
    ckpt_state_close(&st);
    return rc;
}

// ----------------------------------------------------------------------------
// Evaluation: validation loss and MaxVio_global over the evaluation set.

static int trainer_eval(Run *r, double *val_loss) {
    const TrainOptions *o = r->o;
    int B = o->micro_batch, T = r->cfg.seq_len;
    // Each rank evaluates its own part of the set (--eval-batches per rank).
    uint64_t nb = loader_num_batches(r->val);
    if (o->eval_batches > 0 && (uint64_t)o->eval_batches < nb) nb = (uint64_t)o->eval_batches;
    loader_reset(r->val);
    if (r->n_moe > 0) balance_accum_reset(&r->eval_acc);
    size_t ncounts = (size_t)r->n_moe * r->E;
    int64_t *sum_counts = xcalloc(ncounts + 1, sizeof(int64_t));
    double sum = 0, aux;
    for (uint64_t i = 0; i < nb; i++) {
        if (loader_next(r->val, r->tokens, r->targets) != 0) {
            fprintf(stderr, "error: %s\n", loader_error(r->val));
            free(sum_counts);
            return -1;
        }
        // An evaluation forward: no gradient, and its counts never reach the bias.
        r->be->micro_batch(r->be, r->tokens, r->targets, B, T, 0, 0.0f, 1.0);
    }
    // The sums of the batches' counts and mean losses, read once.
    r->be->step_stats(r->be, sum_counts, &sum, &aux);
    // Sum over ranks: exact integer counts, and the mean of the per-batch losses.
    comm_allreduce_i64(r->comm, COMM_WORLD, sum_counts, ncounts);
    comm_allreduce_f64(r->comm, COMM_WORLD, &sum, 1);
    if (r->n_moe > 0) balance_accum_add(&r->eval_acc, sum_counts, (int64_t)nb * B * T * r->comm->world);
    free(sum_counts);
    *val_loss = sum / ((double)nb * r->comm->world);
    return 0;
}

// Ends a log record: flushes it and checks that every write of it reached
// the file. A failure (a full disk) is fatal: the run stops at the end of
// this step without writing a checkpoint, so those on disk stay as they were.
// Returns 0, or -1 after printing the error once.
static int trainer_log_flush(Run *r) {
    if (fflush(r->log) == 0 && !ferror(r->log)) return 0;
    if (!r->log_failed)
        fprintf(stderr, "error: writing the log %s failed: %s; stopping without a checkpoint (those already "
                "written are intact)\n", r->o->log, strerror(errno ? errno : EIO));
    r->log_failed = 1;
    return -1;
}

static void trainer_log_eval(Run *r, double val_loss) {
    if (!r->main) return;
    double mv = r->n_moe > 0 ? balance_accum_maxvio(&r->eval_acc, NULL) : 0;
    printf("eval step %lld | val_loss %.4f | val_ppl %.2f | maxvio_global %.4f\n", (long long)r->step, val_loss,
           exp(val_loss), mv);
    if (r->log && !r->log_failed) {
        char frag[16384] = "\"maxvio_global\":0";
        if (r->n_moe > 0) balance_accum_json(&r->eval_acc, frag, sizeof frag);
        fprintf(r->log, "{\"type\":\"eval\",\"step\":%lld,\"val_loss\":%.6f,\"val_ppl\":%.4f,%s}\n",
                (long long)r->step, val_loss, exp(val_loss), frag);
        trainer_log_flush(r);
    }
}

// ----------------------------------------------------------------------------
// Sampling

static uint64_t sample_rand(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Picks a token from logits (V) with temperature and top-k; temperature 0 is
// greedy: the largest logit, the lowest id on a tie.
static int sample_token(float *logits, int V, float temperature, int top_k, uint64_t *rng) {
    if (temperature == 0) {
        int best = 0;
        for (int v = 1; v < V; v++) best = logits[v] > logits[best] ? v : best;
        return best;
    }
    if (top_k > 0 && top_k < V) {
        // The k-th largest logit is the cut: partial selection by repeated max
        // would be O(kV); a copy + nth-element is overkill for V ~ 32k once per token.
        float *tmp = malloc(sizeof(float) * V);
        if (!tmp) abort();
        memcpy(tmp, logits, sizeof(float) * V);
        float cut = INFINITY;
        for (int k = 0; k < top_k; k++) {
            int best = -1;
            for (int v = 0; v < V; v++)
                if (tmp[v] < cut && (best < 0 || tmp[v] > tmp[best])) best = v;
            if (best < 0) break;
            cut = tmp[best];
        }
        free(tmp);
        for (int v = 0; v < V; v++)
            if (logits[v] < cut) logits[v] = -INFINITY;
    }
    float mx = -INFINITY;
    for (int v = 0; v < V; v++) mx = logits[v] > mx ? logits[v] : mx;
    double sum = 0;
    for (int v = 0; v < V; v++) sum += exp((double)(logits[v] - mx) / temperature);
    double u = (double)(sample_rand(rng) >> 11) * (1.0 / 9007199254740992.0) * sum, acc = 0;
    for (int v = 0; v < V; v++) {
        acc += exp((double)(logits[v] - mx) / temperature);
        if (acc > u) return v;
    }
    return V - 1;
}

// Loads --tokenizer (when given) for sampling: before training, so that a
// file that is no tokenizer, or one with more tokens than the model (whose
// prompt could encode to ids the model cannot embed), stops the run at start.
// Returns 0, or 1 with a message.
static int trainer_open_tokenizer(Run *r) {
    const TrainOptions *o = r->o;
    char err[2048];
    if (!o->tokenizer[0]) return 0;
    r->tok = tok_load(o->tokenizer, err, sizeof err);
    if (!r->tok) {
        if (r->main) fprintf(stderr, "error: --tokenizer: %s\n", err);
        return 1;
    }
    if (tok_vocab_size(r->tok) > r->cfg.vocab_size) {
        if (r->main)
            fprintf(stderr, "error: --tokenizer %s has %d tokens, more than the model's vocab_size %d\n",
                    o->tokenizer, tok_vocab_size(r->tok), r->cfg.vocab_size);
        return 1;
    }
    return 0;
}

// Every rank runs the forwards (expert parallelism needs them all) with the
// same RNG, so all draw the same tokens; rank 0 prints.
static void trainer_sample(Run *r, uint64_t *rng) {
    const TrainOptions *o = r->o;
    const MoeConfig *c = &r->cfg;
    Backend *be = r->be;
    Tokenizer *tok = r->tok;
    if (o->sample_tokens <= 0) return;
    // The context: the last T tokens, all the model sees (a window, so that
    // any --sample-tokens needs no more memory than one sequence).
    int T = c->seq_len, n = 0;
    int *ctx = xcalloc((size_t)T, sizeof(int)); // (T)
    if (tok && o->prompt[0]) {
        uint32_t *ids = NULL;
        size_t k = tok_encode(tok, o->prompt, strlen(o->prompt), &ids);
        for (size_t i = k > (size_t)T ? k - T : 0; i < k; i++) ctx[n++] = (int)ids[i];
        free(ids);
    }
    if (n == 0) ctx[n++] = tok && tok_eot_id(tok) >= 0 ? tok_eot_id(tok) : 0;
    float *logits = xcalloc((size_t)c->vocab_size, sizeof(float));
    if (r->main)
        printf("sample (%d tokens, temperature %.2f, top-k %d):\n---\n%s", o->sample_tokens, o->temperature,
               o->sample_top_k, tok ? o->prompt : "");
    for (int i = 0; i < o->sample_tokens; i++) {
        be->last_logits(be, ctx, n, logits);
        int next = sample_token(logits, c->vocab_size, o->temperature, o->sample_top_k, rng);
        if (n == T) { // slide the window
            memmove(ctx, ctx + 1, sizeof(int) * (size_t)(T - 1));
            n--;
        }
        ctx[n++] = next;
        if (!r->main) continue;
        // A model's vocabulary may be larger than its tokenizer's (padded):
        // ids the tokenizer does not know are printed as ids.
        if (tok && next < tok_vocab_size(tok) && !tok_is_special(tok, (uint32_t)next)) {
            size_t blen;
            const char *bytes = tok_token_bytes(tok, (uint32_t)next, &blen);
            fwrite(bytes, 1, blen, stdout);
        } else if (tok) {
            printf("\n<|%s %d|>\n", next < tok_vocab_size(tok) ? "special" : "id", next);
        } else {
            printf("%d ", next);
        }
        fflush(stdout);
    }
    if (r->main) printf("\n---\n");
    free(ctx);
    free(logits);
}

// ----------------------------------------------------------------------------
// One optimizer step: accumulate gradients over the micro-batches, clip,
// update, then the balancing update from the step's exact counts.

typedef struct {
    double loss, aux;
    float grad_norm;
    double lr, gamma;
    BalanceMetrics bm;
} StepResult;

// The sums of one batch's primal-dual accumulators over the ranks: exact
// integer counts, then the primal sums (the same order on every run).
static void trainer_reduce_dual(Run *r) {
    if (r->comm->world == 1) return;
    int64_t per = 1 + 4 * (int64_t)r->E; // n_tokens, then counts, counts0, lost, gained
    for (int l = 0; l < r->n_moe; l++) {
        r->pack[l * per] = r->dual[l].n_tokens;
        memcpy(r->pack + l * per + 1, r->dual[l].counts, sizeof(int64_t) * 4 * (size_t)r->E);
        r->pack_f[l] = r->dual[l].primal;
    }
    comm_allreduce_i64(r->comm, COMM_WORLD, r->pack, (size_t)(r->n_moe * per));
    comm_allreduce_f64(r->comm, COMM_WORLD, r->pack_f, (size_t)r->n_moe);
    for (int l = 0; l < r->n_moe; l++) {
        r->dual[l].n_tokens = r->pack[l * per];
        memcpy(r->dual[l].counts, r->pack + l * per + 1, sizeof(int64_t) * 4 * (size_t)r->E);
        r->dual[l].primal = r->pack_f[l];
    }
}

// The statistics of the batch in r->dual under the bias that routed it
// (r->bias, before its update), added to the step's.
static void trainer_finish_dual(Run *r) {
    trainer_reduce_dual(r);
    for (int l = 0; l < r->n_moe; l++) {
        DualStats st;
        if (dual_finish(&r->dual[l], r->bias + (size_t)l * r->E, &st) == 0) dual_stats_add(&r->dstats[l], &st);
        dual_accum_reset(&r->dual[l]);
    }
}

// On a traced step, after each micro-batch: every MoE layer's scores of every
// rank's tokens reach rank 0 (each rank's rows in its own slot of a zeroed
// buffer, summed over the ranks: x + 0 is exact), which hands them to the
// writer. Rows in the order micro-batch, rank, token.
static int trainer_trace_rows(Run *r) {
    int64_t n = (int64_t)r->o->micro_batch * r->cfg.seq_len, W = r->comm->world;
    int rc = 0;
    for (int l = 0; l < r->n_moe; l++) {
        if (W > 1) memset(r->trace_rows, 0, sizeof(float) * (size_t)(W * n * r->E));
        r->be->route_scores(r->be, l, r->trace_rows + r->comm->rank * n * r->E);
        if (W > 1) comm_allreduce_f32(r->comm, COMM_WORLD, r->trace_rows, (size_t)(W * n * r->E));
        if (r->main && rc == 0) rc = trace_add_scores(r->trace, l, r->trace_rows, W * n);
    }
    return rc;
}

// The balancing update (and a traced step's record) from counts (n_moe, E) of
// n_tokens tokens, summed over the ranks; the routing statistics first, with
// the bias that routed those tokens. trace_step: the record's step, or -1.
static int trainer_balance(Run *r, const int64_t *counts, int64_t n_tokens, int64_t trace_step) {
    const TrainOptions *o = r->o;
    trainer_finish_dual(r);
    if (trace_step >= 0 && r->main && trace_end_step(r->trace, r->bias, counts, n_tokens) != 0) return -1;
    if (balance_update(&o->balance, r->step, o->steps, counts, r->n_moe, r->E, r->cfg.top_k, n_tokens,
                       r->bias) != 0) {
        fprintf(stderr, "error: step %lld: token counts do not sum to top_k x tokens (a counting bug)\n",
                (long long)r->step + 1);
        return -1;
    }
    r->be->set_bias(r->be, r->bias);
    return 0;
}

static int trainer_step(Run *r, StepResult *res) {
    const TrainOptions *o = r->o;
    int B = o->micro_batch, T = r->cfg.seq_len;
    size_t nb = (size_t)r->n_moe * r->E;
    // --bias-update-every micro: one update (and one traced record) per
    // micro-batch, from its counts summed over the ranks.
    int micro = r->n_moe > 0 && balance_updates_per_micro_batch(&o->balance);
    int traced = r->trace_on && r->step % o->trace_every == 0; // the same on every rank
    int64_t micro_tokens = (int64_t)B * T * r->comm->world;
    int rc = 0;
    memset(r->counts, 0, nb * sizeof(int64_t));
    memcpy(r->bias_step0, r->bias, nb * sizeof(float));
    for (int l = 0; l < r->n_moe; l++) memset(&r->dstats[l], 0, sizeof(DualStats));
    r->be->zero_grad(r->be);
    if (traced) r->be->keep_scores(r->be, 1);
    if (traced && r->main && !micro) rc = trace_begin_step(r->trace, r->step);
    res->loss = res->aux = 0;
    for (int64_t a = 0; a < r->accum; a++) {
        if (loader_next(r->train, r->tokens, r->targets) != 0) {
            fprintf(stderr, "error: %s\n", loader_error(r->train));
            return -1;
        }
        int64_t trace_step = traced ? (micro ? r->step * r->accum + a : r->step) : -1;
        if (traced && r->main && micro && rc == 0) rc = trace_begin_step(r->trace, trace_step);
        // Each micro-batch's mean loss enters the step's mean as loss / accum.
        r->be->micro_batch(r->be, r->tokens, r->targets, B, T, 1, 1.0f / (float)r->accum, (double)r->accum);
        // Traced steps read the scores of every micro-batch (a host wait each, on those steps only).
        if (traced && trainer_trace_rows(r) != 0) rc = -1;
        if (micro) {
            // The micro-batch's own statistics, for its update: a host wait per micro-batch.
            double loss, aux;
            r->be->step_stats(r->be, r->micro_counts, &loss, &aux);
            r->be->route_dual(r->be, r->dual);
            comm_allreduce_i64(r->comm, COMM_WORLD, r->micro_counts, nb);
            if (trainer_balance(r, r->micro_counts, micro_tokens, rc == 0 ? trace_step : -1) != 0) rc = -1;
            for (size_t i = 0; i < nb; i++) r->counts[i] += r->micro_counts[i];
            res->loss += loss;
            res->aux += aux;
        }
    }
    if (!micro) {
        // The step's counts, losses and primal-dual sums reach the host once, after its micro-batches.
        r->be->step_stats(r->be, r->counts, &res->loss, &res->aux);
        if (r->n_moe > 0) r->be->route_dual(r->be, r->dual);
    }
    if (traced) r->be->keep_scores(r->be, 0);
    // One synchronisation per step: gradients averaged over the ranks, counts
    // summed as exact integers (every rank then applies the same bias update),
    // losses averaged for the log.
    double losses[2] = { res->loss, res->aux };
    comm_allreduce_f64(r->comm, COMM_WORLD, losses, 2);
    res->loss = losses[0] / r->comm->world;
    res->aux = losses[1] / r->comm->world;
    if (!micro) comm_allreduce_i64(r->comm, COMM_WORLD, r->counts, nb);
    if (r->be->sync_grads) r->be->sync_grads(r->be);
    res->grad_norm = r->be->grad_norm(r->be);
    if (!isfinite(res->loss) || !isfinite(res->grad_norm)) {
        fprintf(stderr, "error: step %lld: loss %g, gradient norm %g are not finite; stopping without "
                "updating (the last checkpoint is intact)\n", (long long)r->step + 1, res->loss, res->grad_norm);
        return -1;
    }
    res->lr = lr_at(&o->lr, r->step, o->steps);
    float mult = grad_clip_scale(res->grad_norm, (float)o->adamw.grad_clip);
    r->be->update(r->be, &o->adamw, res->lr, r->step + 1, mult);

    // Balance: metrics of the bias that routed this step, then the update,
    // once per global batch from the counts of all its micro-batches (or, with
    // micro updates, already done above; the metrics then take the bias
    // before the step's first update).
    int64_t tokens = r->accum * (int64_t)B * T * r->comm->world;
    if (r->n_moe > 0) {
        balance_metrics(r->counts, r->n_moe, r->E, r->cfg.top_k, tokens, micro ? r->bias_step0 : r->bias,
                        &res->bm);
        res->gamma = balance_uses_bias(&o->balance) ? balance_gamma_at(&o->balance, r->step, o->steps) : 0;
        if (!micro && trainer_balance(r, r->counts, tokens, traced && rc == 0 ? r->step : -1) != 0) rc = -1;
        // A cheap guard against ranks that route differently: all must hold
        // the same biases bit for bit (max and -min of a checksum agree).
        if (r->comm->world > 1) {
            int64_t h[2] = { (int64_t)(ckpt_hash(r->bias, nb * sizeof(float)) >> 1), 0 };
            h[1] = -h[0];
            comm_allreduce_max_i64(r->comm, COMM_WORLD, h, 2);
            if (h[0] != -h[1]) {
                fprintf(stderr, "error: rank %d: the balancing biases differ between ranks after step %lld\n",
                        r->comm->rank, (long long)r->step + 1);
                return -1;
            }
        }
    } else {
        memset(&res->bm, 0, sizeof res->bm);
        res->gamma = 0;
    }
    // A trace that cannot be written (rank 0 only knows) stops every rank.
    if (traced) {
        int64_t failed = rc != 0;
        comm_allreduce_max_i64(r->comm, COMM_WORLD, &failed, 1);
        if (failed) {
            if (r->main && trace_writer_error(r->trace)[0])
                fprintf(stderr, "error: --trace-router: %s\n", trace_writer_error(r->trace));
            return -1;
        }
    } else if (rc != 0) {
        return -1;
    }
    r->step++;
    return 0;
}

// A JSON number; null for what JSON cannot hold (NaN: nothing moved). %.17g
// round-trips a double, so a log can be checked against a recomputation exactly.
static void json_num(FILE *f, double v) {
    if (isfinite(v)) fprintf(f, "%.17g", v);
    else fprintf(f, "null");
}

// The step's primal-dual quantities (docs/balance.md "In the trainers"): per
// MoE layer, and their mean over the layers (from_over, to_under pooled).
static void trainer_log_dual(Run *r) {
    FILE *f = r->log;
    const DualStats *st = r->dstats;
    int L = r->n_moe;
    static const char *names[] = { "dual", "primal", "gap", "subgrad_l1", "subgrad_l2", "moved_frac" };
    for (int k = 0; k < 6; k++) {
        double mean = 0;
        for (int l = 0; l < L; l++) {
            const double v[6] = { st[l].dual, st[l].primal, st[l].gap, st[l].subgrad_l1, st[l].subgrad_l2,
                                  st[l].moved_frac };
            mean += v[k] / L;
        }
        fprintf(f, ",\"%s\":", names[k]);
        json_num(f, mean);
    }
    int64_t moved = 0, over = 0, under = 0;
    for (int l = 0; l < L; l++) {
        moved += st[l].moved;
        over += st[l].moved_from_over;
        under += st[l].moved_to_under;
    }
    fprintf(f, ",\"from_over\":");
    json_num(f, moved ? (double)over / (double)moved : NAN);
    fprintf(f, ",\"to_under\":");
    json_num(f, moved ? (double)under / (double)moved : NAN);
    for (int k = 0; k < 5; k++) {
        fprintf(f, ",\"%s_layers\":[", names[k]);
        for (int l = 0; l < L; l++) {
            const double v[5] = { st[l].dual, st[l].primal, st[l].gap, st[l].subgrad_l1, st[l].subgrad_l2 };
            if (l) fputc(',', f);
            json_num(f, v[k]);
        }
        fputc(']', f);
    }
    fprintf(f, ",\"moved_layers\":[");
    for (int l = 0; l < L; l++) fprintf(f, "%s%lld", l ? "," : "", (long long)st[l].moved);
    fputc(']', f);
}

static void trainer_log_step(Run *r, const StepResult *res, double dt, double elapsed, int64_t steps_done) {
    const TrainOptions *o = r->o;
    if (!r->main) return;
    int64_t tokens = r->accum * (int64_t)o->micro_batch * r->cfg.seq_len * r->comm->world;
    double tps = tokens / dt;
    double eta = elapsed / (double)steps_done * (double)(o->steps - r->step);
    if (r->step % o->print_every == 0 || r->step == o->steps) {
        char eta_s[32];
        fmt_duration(eta_s, sizeof eta_s, eta);
        printf("step %5lld/%lld | loss %.4f", (long long)r->step, (long long)o->steps, res->loss);
        if (res->aux != 0) printf(" (aux %.5f)", res->aux);
        printf(" | lr %.2e | gamma %.2e | gnorm %.3f | maxvio %.3f", res->lr, res->gamma, res->grad_norm,
               res->bm.maxvio_batch);
        if (res->bm.idle_total > 0) printf(" (%d idle)", res->bm.idle_total);
        printf(" | %.0f tok/s | eta %s\n", tps, eta_s);
        fflush(stdout);
    }
    if (!r->log || r->log_failed) return;
    fprintf(r->log,
            "{\"type\":\"step\",\"step\":%lld,\"loss\":%.6f,\"aux_loss\":%.6g,\"lr\":%.6g,\"gamma\":%.6g,"
            "\"grad_norm\":%.6g,\"tokens\":%lld,\"tokens_per_s\":%.1f,\"step_time_s\":%.4f,\"time_s\":%.2f",
            (long long)r->step, res->loss, res->aux, res->lr, res->gamma, res->grad_norm, (long long)(tokens * r->step), tps,
            dt, elapsed);
    if (r->n_moe > 0) {
        fputc(',', r->log);
        balance_metrics_json_file(&res->bm, r->log);
        trainer_log_dual(r);
        if (o->log_loads_every > 0 && (r->step % o->log_loads_every == 0 || r->step == o->steps)) {
            // Per-layer expert counts of this step: "loads":[[c_0,...,c_E-1],...]
            fprintf(r->log, ",\"loads\":[");
            for (int l = 0; l < r->n_moe; l++) {
                fprintf(r->log, "%s[", l ? "," : "");
                for (int e = 0; e < r->E; e++)
                    fprintf(r->log, "%s%lld", e ? "," : "", (long long)r->counts[(size_t)l * r->E + e]);
                fputc(']', r->log);
            }
            // The biases after this step's update (bias_mean/min/max above
            // describe the biases that routed the step, before it).
            fprintf(r->log, "],\"bias\":[");
            for (int l = 0; l < r->n_moe; l++) {
                fprintf(r->log, "%s[", l ? "," : "");
                for (int e = 0; e < r->E; e++) {
                    float b = r->bias[(size_t)l * r->E + e];
                    if (isfinite(b)) fprintf(r->log, "%s%.9g", e ? "," : "", b);
                    else fprintf(r->log, "%snull", e ? "," : "");
                }
                fputc(']', r->log);
            }
            fputc(']', r->log);
        }
    }
    fprintf(r->log, "}\n");
    trainer_log_flush(r);
}

// ----------------------------------------------------------------------------
// The run

// The config record that starts every invocation's part of the log. Returns
// 0, or -1 when it could not be written.
static int trainer_log_header(Run *r) {
    if (!r->log) return 0;
    fprintf(r->log, "{\"type\":\"config\",\"format\":\"moe-train-log\",\"version\":1,\"backend\":\"%s\",\"ranks\":%d,\"ep\":%d,\"resumed_at\":%lld,"
            "\"params\":%lld,\"options\":{", r->be->name, r->comm->world, r->comm->ep, (long long)r->step,
            (long long)r->be->n_params);
    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    if (!m) FATAL("out of memory writing the log");
    options_write(r->o, m);
    fclose(m);
    int first = 1;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        char *eq = strstr(line, " = ");
        if (!eq) eq = strchr(line, '=');
        if (!eq) continue;
        char *v = eq + (eq[0] == ' ' ? 3 : 1);
        *eq = '\0';
        fprintf(r->log, "%s\"%s\":\"", first ? "" : ",", line);
        for (const char *p = v; *p; p++) {
            if (*p == '"' || *p == '\\') fputc('\\', r->log);
            if ((unsigned char)*p >= 0x20) fputc(*p, r->log);
        }
        fputc('"', r->log);
        first = 0;
    }
    free(text);
    fprintf(r->log, "}}\n");
    return trainer_log_flush(r);
}

// The training and validation loaders: each rank reads its own share of
// every epoch. Returns 0, or 1 with a message.
static int trainer_open_data(Run *r) {
    const TrainOptions *o = r->o;
    const Comm *comm = r->comm;
    char err[1024];
    int B = o->micro_batch, T = r->cfg.seq_len;
    r->train = loader_open(o->train_data, B, T, comm->rank, comm->world, o->seed, 1, err, sizeof err);
    if (!r->train) {
        fprintf(stderr, "error: --train-data: %s\n", err);
        return 1;
    }
    if (loader_vocab_size(r->train) > (uint32_t)r->cfg.vocab_size) {
        fprintf(stderr, "error: the training shards use a vocabulary of %u tokens but the model has vocab_size %d\n",
                loader_vocab_size(r->train), r->cfg.vocab_size);
        return 1;
    }
    if (o->val_data[0]) {
        r->val = loader_open(o->val_data, B, T, comm->rank, comm->world, o->seed, 0, err, sizeof err);
        if (!r->val) {
            fprintf(stderr, "error: --val-data: %s\n", err);
            return 1;
        }
        if (loader_vocab_size(r->val) > (uint32_t)r->cfg.vocab_size) {
            fprintf(stderr, "error: the validation shards use a vocabulary of %u tokens but the model has %d\n",
                    loader_vocab_size(r->val), r->cfg.vocab_size);
            return 1;
        }
    }
    return 0;
}

// Rank 0's outputs: the checkpoint directory, created if need be and locked
// for this run (a second trainer on it stops here, before training), and the
// log. Returns 0, or 1 with a message.
static int trainer_open_outputs(Run *r) {
    const TrainOptions *o = r->o;
    char err[2048];
    if (o->ckpt_dir[0] && (r->lock_fd = ckpt_dir_lock(o->ckpt_dir, err, sizeof err)) < 0) {
        fprintf(stderr, "error: --ckpt-dir: %s\n", err);
        return 1;
    }
    if (o->log[0] && !(r->log = fopen(o->log, "a"))) {
        fprintf(stderr, "error: cannot open log file %s: %s\n", o->log, strerror(errno));
        return 1;
    }
    return 0;
}

// --resume: rank 0 finds and verifies the newest checkpoint in --ckpt-dir and
// the others take its choice (each rank verifying the whole file would
// multiply the reads by the number of ranks; loading checks every section it
// reads anyway). None there yet is a fresh start, so that one command serves
// the first and every later job of a preemptible run. Returns 0 with the
// checkpoint's path in path ("" for none), or 1 with a message.
static int trainer_find_resume(Run *r, char *path, size_t len) {
    const TrainOptions *o = r->o;
    char err[2048];
    int64_t at, found = 1;
    path[0] = '\0';
    if (!o->resume) return 0;
    if (r->main) found = ckpt_latest(o->ckpt_dir, 0, path, len, &at, err, sizeof err);
    comm_bcast(r->comm, &found, sizeof found, 0);
    comm_bcast(r->comm, path, len, 0);
    if (found < 0) {
        if (r->main) fprintf(stderr, "error: --resume: %s\n", err);
        return 1;
    }
    if (found == 1 && r->main)
        printf("note: --resume: no checkpoint in %s yet: starting a new run%s\n", o->ckpt_dir,
               o->init_from[0] ? " from --init-from" : "");
    return 0;
}

// The model on the backend, the biases, and the starting point: the resumed
// checkpoint (resume non-empty), or fresh parameters (then optionally
// --init-from's). Returns 0, or 1 with a message.
static int trainer_init_model(Run *r, const char *resume) {
    const TrainOptions *o = r->o;
    Backend *be = r->be;
    int B = o->micro_batch, T = r->cfg.seq_len;
    // Model, biases and optimizer.
    RouteOptions ro = balance_route_options(&r->balance);
    if (be->create(be, &r->cfg, &ro, B, T) != 0) return 1;
    r->created = 1;
    size_t nb = (size_t)r->n_moe * r->E;
    r->bias = xcalloc(nb, sizeof(float));
    r->bias_step0 = xcalloc(nb + 1, sizeof(float));
    r->counts = xcalloc(nb, sizeof(int64_t));
    r->dual = xcalloc((size_t)r->n_moe + 1, sizeof(DualAccum));
    r->dstats = xcalloc((size_t)r->n_moe + 1, sizeof(DualStats));
    for (int l = 0; l < r->n_moe; l++) dual_accum_init(&r->dual[l], r->E, r->cfg.top_k, ro.bias_mult);
    r->pack = xcalloc((size_t)r->n_moe * (1 + 4 * (size_t)r->E) + 1, sizeof(int64_t));
    r->pack_f = xcalloc((size_t)r->n_moe + 1, sizeof(double));
    r->micro_counts = xcalloc(nb, sizeof(int64_t));
    r->tokens = xcalloc((size_t)B * T, sizeof(int));
    r->targets = xcalloc((size_t)B * T, sizeof(int));
    if (r->n_moe > 0 && balance_accum_init(&r->eval_acc, r->n_moe, r->E, r->cfg.top_k) != 0) {
        fprintf(stderr, "error: out of memory\n");
        return 1;
    }
    r->has_eval_acc = r->n_moe > 0;
    if (resume[0]) {
        if (trainer_load(r, resume, 1) != 0) return 1;
        if (r->main) printf("resumed from %s at step %lld\n", resume, (long long)r->step);
        return 0;
    }
    float *p = xcalloc((size_t)be->n_params, sizeof(float));
    ParamLayout lay;
    layout_build(&lay, &r->cfg);
    layout_init_params(&lay, &r->cfg, o->seed, p);
    layout_free(&lay);
    be->set_params(be, p);
    free(p);
    if (r->n_moe > 0) balance_bias_init(&r->balance, r->bias, r->n_moe, r->E);
    be->set_bias(be, r->bias);
    if (o->init_from[0]) {
        if (trainer_load(r, o->init_from, 0) != 0) return 1;
        if (r->main) printf("initialised from %s\n", o->init_from);
    }
    return 0;
}

// --trace-router: rank 0 opens the trace (continues it when resuming: cut to
// the checkpoint's step); every rank learns whether that worked. One record
// per traced step, or per micro-batch with --bias-update-every micro.
// Returns 0, or 1 with a message.
static int trainer_open_trace(Run *r) {
    const TrainOptions *o = r->o;
    if (!o->trace_router[0]) return 0;
    int micro = balance_updates_per_micro_batch(&o->balance);
    int64_t rows = (int64_t)o->micro_batch * r->cfg.seq_len * r->comm->world; // one micro-batch, every rank
    int64_t tokens_per_step = micro ? rows : rows * r->accum;
    r->trace_rows = xcalloc((size_t)(rows * r->E), sizeof(float));
    r->trace_on = 1;
    int64_t failed = 0;
    if (r->main) {
        RouteOptions ro = balance_route_options(&o->balance);
        TraceHeader h = { r->n_moe, r->E, r->cfg.top_k,
                          (o->trace_bf16 ? TRACE_BF16 : 0) | (ro.bias_mult ? TRACE_MULT : 0) |
                              (ro.bias_logits ? TRACE_LOGITS : 0),
                          tokens_per_step, o->trace_tokens > 0 && o->trace_tokens < tokens_per_step ? o->trace_tokens
                                                                                                  : tokens_per_step,
                          o->seed, o->steps, micro ? (int)r->accum : 1 };
        char err[2048];
        int64_t ups = micro ? r->accum : 1;
        r->trace = r->step > 0 ? trace_writer_resume(o->trace_router, &h, r->step * ups, err, sizeof err)
                               : trace_writer_open(o->trace_router, &h, err, sizeof err);
        if (!r->trace) {
            fprintf(stderr, "error: --trace-router: %s\n", err);
            failed = 1;
        } else if (r->step > 0) {
            printf("trace: continuing %s at step %lld (%lld recorded steps kept)\n", o->trace_router,
                   (long long)(r->step * ups), (long long)trace_writer_steps(r->trace));
        }
    }
    comm_allreduce_max_i64(r->comm, COMM_WORLD, &failed, 1);
    return failed ? 1 : 0;
}

// 1 when `failed` is set on any rank (every rank must call it).
static int trainer_any_failed(Run *r, int failed) {
    int64_t f = failed != 0;
    comm_allreduce_max_i64(r->comm, COMM_WORLD, &f, 1);
    return f != 0;
}

// Everything before the first step. What a user can get wrong is checked
// before the model is built: the checkpoint directory and the log (rank 0
// writes both), the tokenizer, the data, then the checkpoint to resume from.
// Every rank learns whether any failed, so that all stop together. Returns
// 0, or 1 with a message; what it acquired is in r either way, for
// trainer_teardown.
static int trainer_setup(Run *r) {
    const TrainOptions *o = r->o;
    const Comm *comm = r->comm;
    int B = o->micro_batch, T = r->cfg.seq_len;
    if (r->main) {
        options_print_table(o, stdout);
        printf("model: %lld parameters (%lld active per token), %.3g training FLOPs per token\n",
               (long long)config_total_params(&r->cfg), (long long)config_active_params(&r->cfg),
               config_train_flops_per_token(&r->cfg, T));
        printf("batch: %d rank(s) (expert parallel groups of %d) x %lld micro-batches of %d x %d = %lld tokens "
               "per step\n", comm->world, comm->ep, (long long)r->accum, B, T,
               (long long)(r->accum * B * T * comm->world));
    }
    char resume[OPT_PATH + 64];
    int failed = r->main ? trainer_open_outputs(r) : 0;
    failed |= trainer_open_tokenizer(r);
    failed |= trainer_open_data(r);
    if (trainer_any_failed(r, failed) || trainer_find_resume(r, resume, sizeof resume) != 0) return 1;
    failed = trainer_init_model(r, resume);
    failed |= r->main && trainer_log_header(r) != 0;
    if (trainer_any_failed(r, failed)) return 1;
    return trainer_open_trace(r);
}

// The steps, each followed by its log line, evaluation and checkpoint when
// due; stops early (with a checkpoint) on a signal or at --run-steps, and
// (without one) when the log cannot be written. Returns the exit code.
static int trainer_loop(Run *r) {
    const TrainOptions *o = r->o;
    int rc = 0;
    double t_start = now_seconds();
    int64_t first = r->step;
    while (r->step < o->steps) {
        double t0 = now_seconds();
        StepResult res;
        if (trainer_step(r, &res) != 0) {
            rc = 1;
            break;
        }
        double t1 = now_seconds();
        trainer_log_step(r, &res, t1 - t0, t1 - t_start, r->step - first);
        int last = r->step == o->steps;
        // --run-steps ends this invocation early, as a signal does, with a checkpoint.
        if (o->run_steps > 0 && r->step - first >= o->run_steps && !last && !stop_requested) {
            if (r->main)
                printf("--run-steps %lld reached: stopping at step %lld\n", (long long)o->run_steps,
                       (long long)r->step);
            stop_requested = -1;
        }
        if (r->val && ((o->eval_every > 0 && r->step % o->eval_every == 0) || last)) {
            double vl;
            if (trainer_eval(r, &vl) != 0) {
                rc = 1;
                break;
            }
            trainer_log_eval(r, vl);
        }
        // One agreement per step: a signal may reach some ranks only, and a
        // failed log write (on rank 0) stops every rank.
        int64_t flags[2] = { stop_requested, r->log_failed };
        comm_allreduce_max_i64(r->comm, COMM_WORLD, flags, 2);
        if (flags[1]) {
            rc = 1;
            break;
        }
        if (flags[0] && !stop_requested) stop_requested = (sig_atomic_t)flags[0];
        int want_ckpt = o->ckpt_dir[0] && ((o->ckpt_every > 0 && r->step % o->ckpt_every == 0) || last);
        if (stop_requested) {
            if (stop_requested > 0 && r->main)
                printf("received signal %d: finishing at step %lld\n", (int)stop_requested, (long long)r->step);
            if (o->ckpt_dir[0] && !want_ckpt && trainer_save(r) != 0) rc = 1;
        }
        if (want_ckpt && trainer_save(r) != 0) {
            rc = 1;
            break;
        }
        if (stop_requested) break;
    }
    return rc;
}

// --profile N: TRAINER_PROFILE_WARMUP steps, then N steps timed by the host
// clock and, per phase, by the backend's timers (train/profile.h); prints the
// table and writes it to the log. No checkpoint, evaluation or sample.
static int trainer_profile(Run *r) {
    const TrainOptions *o = r->o;
    Backend *be = r->be;
    StepResult res;
    double t_start = now_seconds();
    // Every step is logged as usual (the step records carry tokens_per_s).
    for (int i = 0; i < TRAINER_PROFILE_WARMUP; i++) {
        double ts = now_seconds();
        if (trainer_step(r, &res) != 0) return 1;
        trainer_log_step(r, &res, now_seconds() - ts, now_seconds() - t_start, i + 1);
    }
    ProfileReport rep = { 0 };
    char device[256] = "";
    rep.backend = be->name;
    rep.device = device;
    rep.steps = o->profile;
    rep.warmup = TRAINER_PROFILE_WARMUP;
    rep.tokens_per_step = (double)r->accum * o->micro_batch * r->cfg.seq_len * r->comm->world;
    if (be->profile_start) be->profile_start(be);
    // The step time is the whole timed window over N, each step's logging
    // included (as in a training run), so that it covers what the phase
    // timers see: their "idle (host)" holds the logging and the bookkeeping.
    double t0 = now_seconds();
    for (int i = 0; i < o->profile; i++) {
        double ts = now_seconds();
        if (trainer_step(r, &res) != 0) return 1;
        trainer_log_step(r, &res, now_seconds() - ts, now_seconds() - t_start, TRAINER_PROFILE_WARMUP + i + 1);
    }
    double t1 = now_seconds();
    if (be->profile_stop) be->profile_stop(be, rep.ms, device, sizeof device);
    rep.step_ms = (t1 - t0) * 1e3 / o->profile;
    profile_phase_flops(&r->cfg, r->cfg.seq_len, rep.flops);
    for (int i = 0; i < PH_COUNT; i++) {
        rep.ms[i] /= o->profile;
        rep.flops[i] *= rep.tokens_per_step;
    }
    if (r->main) {
        if (!be->profile_stop) printf("(the %s backend has no phase timers: the host clock only)\n", be->name);
        profile_print(&rep, stdout);
        profile_json(&rep, r->log);
    }
    return 0;
}

// Releases whatever trainer_setup acquired, however far it got.
static void trainer_teardown(Run *r) {
    if (r->log) fclose(r->log);
    ckpt_dir_unlock(r->lock_fd);
    if (r->tok) tok_free(r->tok);
    loader_close(r->train);
    loader_close(r->val);
    if (r->has_eval_acc) balance_accum_free(&r->eval_acc);
    if (r->trace) {
        char err[1024];
        if (trace_writer_close(r->trace, err, sizeof err) != 0) fprintf(stderr, "error: --trace-router: %s\n", err);
    }
    free(r->trace_rows);
    for (int l = 0; r->dual && l < r->n_moe; l++) dual_accum_free(&r->dual[l]);
    free(r->dual);
    free(r->dstats);
    free(r->pack);
    free(r->pack_f);
    free(r->bias_step0);
    free(r->bias);
    free(r->counts);
    free(r->micro_counts);
    free(r->tokens);
    free(r->targets);
    if (r->created) r->be->destroy(r->be);
    memset(r, 0, sizeof *r);
}

// A run for options o on backend be, owning nothing yet.
static void trainer_init_run(Run *r, const TrainOptions *o, Backend *be) {
    memset(r, 0, sizeof *r);
    r->o = o;
    r->be = be;
    r->comm = be->comm;
    r->main = be->comm->rank == 0;
    r->lock_fd = -1;
    r->balance = o->balance;
}

// --threads: the OpenMP threads of the CPU backend and the host-side loops
// (0: OpenMP's default, OMP_NUM_THREADS or one per core).
static void trainer_set_threads(const TrainOptions *o) {
#ifdef _OPENMP
    if (o->threads > 0) omp_set_num_threads(o->threads);
#else
    (void)o;
#endif
}

int trainer_run(const TrainOptions *o, Backend *be) {
    char err[1024];
    const Comm *comm = be->comm;
    if (options_validate(o, comm->world, err, sizeof err) != 0) {
        if (comm->rank == 0) fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    trainer_set_threads(o);
    Run run, *r = &run;
    trainer_init_run(r, o, be);
    r->cfg = o->model;
    r->n_moe = config_n_moe(&r->cfg);
    r->E = r->cfg.n_routed;
    r->accum = o->batch_tokens > 0 ? options_accum_steps(o, comm->world) : 1;
    r->rng = o->seed ^ 0x5DEECE66DULL;

    int rc = trainer_setup(r);
    if (rc == 0) {
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
        rc = o->profile > 0 ? trainer_profile(r) : trainer_loop(r);
    }
    if (rc == 0 && !stop_requested && o->profile == 0) trainer_sample(r, &r->rng);
    if (rc == 0) {
        // For tests and for the record: every rank's final biases, by checksum.
        size_t nb = (size_t)r->n_moe * r->E * sizeof(float);
        printf("rank %d: final bias xxh64 %016llx\n", comm->rank, (unsigned long long)ckpt_hash(r->bias, nb));
    }
    trainer_teardown(r);
    return rc;
}

// The balancing options a checkpoint was trained with (its options section)
// on top of `base`: the routing must be the model's own (an additive or a
// multiplicative bias). Returns 0, or -1 with a message.
static int trainer_saved_balance(const CkptState *st, const BalanceConfig *base, BalanceConfig *out) {
    char err[1024], *text = xmalloc(strlen(st->options) + 1);
    strcpy(text, st->options);
    *out = *base;
    int rc = 0;
    for (char *line = strtok(text, "\n"); line && rc == 0; line = strtok(NULL, "\n")) {
        char *eq = strstr(line, " = "); // options_write's "key = value"
        if (!eq) continue;
        *eq = '\0';
        if (balance_has_option(line) && balance_set_option(out, line, eq + 3, err, sizeof err) != 0) rc = -1;
    }
    free(text);
    if (rc == 0 && balance_validate(out, err, sizeof err) != 0) rc = -1;
    if (rc != 0) fprintf(stderr, "error: %s: section 'options': %s\n", st->path, err);
    return rc;
}

int trainer_sample_from_checkpoint(const TrainOptions *o, Backend *be, const char *ckpt_path) {
    char err[2048];
    trainer_set_threads(o);
    Run run, *r = &run;
    trainer_init_run(r, o, be);
    CkptState st;
    if (ckpt_state_open(&st, ckpt_path, err, sizeof err) != 0) {
        fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    r->cfg = st.cfg;
    r->n_moe = config_n_moe(&r->cfg);
    r->E = r->cfg.n_routed;
    int rc = trainer_saved_balance(&st, &o->balance, &r->balance) != 0 || trainer_open_tokenizer(r) != 0;
    if (rc == 0) {
        RouteOptions ro = balance_route_options(&r->balance);
        rc = be->create(be, &r->cfg, &ro, 1, r->cfg.seq_len) != 0;
        r->created = rc == 0;
    }
    if (rc == 0 && ckpt_state_load(&st, 0, err, sizeof err) != 0) {
        fprintf(stderr, "error: %s\n", err);
        rc = 1;
    }
    if (rc == 0) {
        r->bias = xcalloc((size_t)r->n_moe * r->E + 1, sizeof(float));
        rc = trainer_use_state(r, &st, 0) != 0;
    }
    ckpt_state_close(&st);
    if (rc == 0) {
        uint64_t rng = o->seed;
        trainer_sample(r, &rng);
    }
    trainer_teardown(r);
    return rc;
}

// --print-memory: the backend's memory plan for the options' micro-batch, and
// the largest micro-batch whose plan fits --gpu-mem (doubling, then bisection:
// the plan grows with B). Needs no device.
static int trainer_print_memory(const TrainOptions *o, Backend *be) {
    char err[512];
    if (config_validate(&o->model, err, sizeof err) != 0) {
        fprintf(stderr, "error: invalid model: %s\n", err);
        return 1;
    }
    if (!be->plan_memory) {
        fprintf(stderr, "error: --print-memory: the %s backend has no device memory to plan (use train_moecu)\n",
                be->name);
        return 1;
    }
    if (o->ep < 1 || o->model.n_routed % o->ep != 0) {
        fprintf(stderr, "error: --ep %d must divide n_routed (%d)\n", o->ep, o->model.n_routed);
        return 1;
    }
    RouteOptions ro = balance_route_options(&o->balance);
    int T = o->model.seq_len;
    MemoryPlan plan;
    if (be->plan_memory(be, &o->model, &ro, o->micro_batch, T, o->ep, &plan) != 0) return 1;
    const double GiB = 1073741824.0;
    double budget = o->gpu_mem > 0 ? o->gpu_mem : plan.device_bytes > 0 ? plan.device_bytes / GiB : 80.0;
    printf("model: %lld parameters (%lld active per token), --ep %d: this rank holds %d of %d routed experts per "
           "layer\n", (long long)config_total_params(&o->model), (long long)config_active_params(&o->model), o->ep,
           o->model.n_routed / o->ep, o->model.n_routed);
    memplan_print(&plan, o->micro_batch, T, stdout);
    printf("not counted: the CUDA context (some hundreds of MiB), cuBLAS's and NCCL's own buffers, fragmentation\n");
    // The largest B that fits.
    int lo = 0, hi = 1;
    for (;;) {
        MemoryPlan p;
        if (be->plan_memory(be, &o->model, &ro, hi, T, o->ep, &p) != 0) return 1;
        if (memplan_total(&p) / GiB > budget) break;
        lo = hi;
        if (hi > (1 << 20)) break;
        hi *= 2;
    }
    while (hi - lo > 1) {
        int mid = lo + (hi - lo) / 2;
        MemoryPlan p;
        if (be->plan_memory(be, &o->model, &ro, mid, T, o->ep, &p) != 0) return 1;
        if (memplan_total(&p) / GiB > budget) hi = mid;
        else lo = mid;
    }
    const char *source = o->gpu_mem > 0 ? "--gpu-mem" : plan.device_bytes > 0 ? plan.device : "no GPU detected: 80 GiB";
    if (lo == 0) {
        printf("no micro-batch of sequences of %d tokens fits %.1f GiB (%s)\n", T, budget, source);
    } else {
        MemoryPlan p;
        be->plan_memory(be, &o->model, &ro, lo, T, o->ep, &p);
        printf("largest micro-batch that fits %.1f GiB (%s): -b %d (%.2f GiB)\n", budget, source, lo,
               memplan_total(&p) / GiB);
    }
    return 0;
}

static int trainer_dispatch(int argc, char **argv, const char *prog, Backend *be) {
    TrainOptions o;
    options_default(&o);
    be->opts = &o; // what a backend reads of them at create (e.g. the GPU's --grouped-gemm)
    int main_rank = be->comm->rank == 0;
    if (argc >= 2 && strcmp(argv[1], "sample") == 0) {
        // PROG sample CKPT [options]: generate from a checkpoint.
        if (argc < 3 || argv[2][0] == '-') {
            fprintf(stderr, "usage: %s sample CHECKPOINT [--tokenizer FILE] [--prompt TEXT] [--sample-tokens N] "
                    "[--temperature T] [--sample-top-k K] [--seed S] [--threads N]\n", prog);
            return 1;
        }
        o.sample_tokens = 256;
        int rc = options_parse(&o, argc - 2, argv + 2, prog);
        if (rc != 0) return rc > 0 ? 0 : 1;
        if (o.sample_tokens <= 0 || o.temperature < 0 || o.sample_top_k < 0) {
            fprintf(stderr, "error: --sample-tokens must be > 0, --temperature >= 0 (0: greedy), --sample-top-k >= 0\n");
            return 1;
        }
        if (o.prompt[0] && !o.tokenizer[0]) {
            fprintf(stderr, "error: --prompt needs --tokenizer (to encode the prompt)\n");
            return 1;
        }
        return trainer_sample_from_checkpoint(&o, be, argv[2]);
    }
    int rc = options_parse(&o, argc, argv, prog);
    if (rc != 0) return rc > 0 ? 0 : 1;
    if (o.print_config) {
        char err[512];
        if (config_validate(&o.model, err, sizeof err) != 0) {
            fprintf(stderr, "error: invalid model: %s\n", err);
            return 1;
        }
        if (!main_rank) return 0;
        config_write(&o.model, stdout);
        printf("total parameters: %lld\n", (long long)config_total_params(&o.model));
        printf("active parameters per token: %lld\n", (long long)config_active_params(&o.model));
        printf("training FLOPs per token (T=%d): %.4g\n", o.model.seq_len,
               config_train_flops_per_token(&o.model, o.model.seq_len));
        return 0;
    }
    if (o.print_memory) return main_rank ? trainer_print_memory(&o, be) : 0;
    char err[512];
    if (o.ep > 1 && o.model.n_routed % o.ep != 0) {
        if (main_rank) fprintf(stderr, "error: --ep %d must divide n_routed (%d)\n", o.ep, o.model.n_routed);
        return 1;
    }
    if (o.ep > 1 && comm_set_ep((Comm *)be->comm, o.ep, err, sizeof err) != 0) {
        if (main_rank) fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    return trainer_run(&o, be);
}

int trainer_main(int argc, char **argv, const char *prog, Backend *be) {
    Comm comm;
    if (comm_init(&comm, &argc, &argv) != 0) return 1;
    be->comm = &comm;
    int rc = trainer_dispatch(argc, argv, prog, be);
    comm_finalize(&comm);
    return rc;
}
