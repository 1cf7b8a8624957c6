// Router-score traces: per recorded training step and MoE layer, the router's
// scores before the bias (every token of the step or a deterministic sample of
// M), the step, the bias that routed the step and the whole batch's token counts.
// Written streamed by a trainer (rank 0), read by moe_replay to run balancing
// policies offline. Layout, checksums and the sample: docs/trace.md.
//
// Every error message names the file.
#ifndef MOE_TRACE_H
#define MOE_TRACE_H

#include <stddef.h>
#include <stdint.h>

enum { TRACE_VERSION = 2 }; // written; readers also accept version 1 (no logits flag, one update per step)
enum { TRACE_BF16 = 1, TRACE_MULT = 2, TRACE_LOGITS = 4 }; // header flags

typedef struct {
    int n_layers;             // MoE layers recorded per step
    int E, K;                 // routed experts, experts per token
    int flags;                // TRACE_BF16: scores stored as bf16 (else fp32);
                              // TRACE_MULT: the run selected on s * b (else s + b);
                              // TRACE_LOGITS: the scores are the router logits, which the
                              // run added its bias to (else the affinities)
    int64_t tokens_per_step;  // score rows the writer is given per step and layer
    int64_t sample;           // M rows recorded per step and layer (<= tokens_per_step;
                              // equal: every row, in order)
    uint64_t seed;            // of the sample
    int64_t run_steps;        // total optimizer steps of the run (for cosine / stop); 0 unknown
    int updates_per_step;     // bias updates per optimizer step: 1, or the micro-batches of a
                              // step when the run updated after each (a recorded "step" is then
                              // one update: optimizer step t, micro-batch a is t * this + a);
                              // 0 is taken as 1
} TraceHeader;

// ---------------------------------------------------------------- writing
//
// Per recorded step:  trace_begin_step, then trace_add_scores once or more per
// layer with that layer's rows in the step's token order (e.g. one call per
// micro-batch), then trace_end_step with the bias and the counts; it writes one
// record per layer. Under several ranks only rank 0 writes, from its own rows
// (tokens_per_step counts the rows it sees), with the counts of the whole
// global batch.

typedef struct TraceWriter TraceWriter;

// Creates path (an existing file is refused, never overwritten) and writes the
// header. NULL on error (message in err).
TraceWriter *trace_writer_open(const char *path, const TraceHeader *h, char *err, size_t errlen);
// Continues the trace of a resumed run: when path does not exist, as
// trace_writer_open. Else its header must equal h (the same run settings), its
// records are read and checked up to the first of step >= from_step, and the
// file is cut there (the records of steps >= from_step, a cut last record and
// the end record go: the resumed run records those steps again); writing goes
// on from there. A file that differs from h or is damaged before from_step is
// refused and left as it is. NULL on error (message in err).
TraceWriter *trace_writer_resume(const char *path, const TraceHeader *h, int64_t from_step, char *err,
                                 size_t errlen);
int trace_begin_step(TraceWriter *w, int64_t step);
// n rows of one layer, following the rows already added to it this step.
int trace_add_scores(TraceWriter *w, int layer, const float *scores /* (n, E) */, int64_t n);
// Checks that every layer got tokens_per_step rows, writes the step's records.
// n_tokens: tokens of the whole batch, whose counts sum to K n_tokens per layer.
int trace_end_step(TraceWriter *w, const float *bias /* (n_layers, E) */,
                   const int64_t *counts /* (n_layers, E) */, int64_t n_tokens);
// The first error, or "" if none; after an error every call returns -1.
const char *trace_writer_error(const TraceWriter *w);
// Steps in the file so far (those kept by trace_writer_resume included).
int64_t trace_writer_steps(const TraceWriter *w);
// Writes the end record, flushes, fsyncs and closes; frees w. Returns 0, or -1
// (message in err). Closing without it leaves a trace that readers refuse
// unless they accept unfinished traces.
int trace_writer_close(TraceWriter *w, char *err, size_t errlen);

// The deterministic sample: mask (tokens_per_step) gets 1 for the sample rows of
// step `step` (the M rows with the smallest trace_sample_key, ties by row).
void trace_sample_mask(uint64_t seed, int64_t step, int64_t tokens_per_step, int64_t sample,
                       unsigned char *mask);
uint64_t trace_sample_key(uint64_t seed, int64_t step, int64_t row);

// ---------------------------------------------------------------- reading

typedef struct TraceReader TraceReader;

typedef struct {
    int64_t step;
    int layer;
    int64_t n_tokens;     // tokens of the whole batch behind counts
    int64_t m;            // score rows in this record (= header sample)
    const float *bias;    // (E) the bias that routed the step
    const int64_t *counts;// (E) the whole batch's counts
    const int64_t *rows;  // (m) the rows' positions in the step (0..m-1 when not sampled)
    const float *scores;  // (m, E) converted to fp32
} TraceRecord;

// Opens and checks the header. allow_unfinished: accept a trace without its end
// record (a run that stopped): the whole records are read and checked as usual,
// a cut last record is ignored (trace_reader_tail_bytes); the caller drops an
// incomplete last step.
TraceReader *trace_reader_open(const char *path, int allow_unfinished, char *err, size_t errlen);
const TraceHeader *trace_reader_header(const TraceReader *r);
// After trace_next returned 0: 1 when the end record was read (a finished
// trace), and the bytes of a cut last record that an unfinished read ignored.
int trace_reader_finished(const TraceReader *r);
int64_t trace_reader_tail_bytes(const TraceReader *r);
// The next record (valid until the next call): 1, 0 at the end (end record
// checked), -1 on a corrupt or truncated file (message in err).
int trace_next(TraceReader *r, TraceRecord *rec, char *err, size_t errlen);
void trace_reader_close(TraceReader *r);

// bf16 <-> fp32, round to nearest even (NaN stays NaN).
uint16_t trace_f32_to_bf16(float x);
float trace_bf16_to_f32(uint16_t h);

#endif
