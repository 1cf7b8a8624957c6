// Per-phase device timing for `--profile` (train/profile.h): the backend
// marks, on its stream, the start of each phase; the time the GPU spends from
// one mark to the next is that phase's. Marks are CUDA events from a pool,
// recorded only while the profiler is on, so an ordinary run pays nothing.
// Reading the times synchronises with the last mark (profiler_flush), which
// the backend does where it synchronises anyway or when the pool is full.
#ifndef KERNELS_PROFILER_CUH
#define KERNELS_PROFILER_CUH

#include "common.cuh"

extern "C" {
#include "../train/profile.h"
}

typedef struct {
    int on;             // marks are recorded
    cudaEvent_t *ev;    // (cap) the event pool
    int *phase;         // (cap) the phase each recorded mark starts
    int n, cap;         // marks recorded since the last flush
    double ms[PH_COUNT];// device milliseconds per phase since profiler_start
} GpuProfiler;

void profiler_init(GpuProfiler *p, int cap);
void profiler_free(GpuProfiler *p);
// Starts accumulating (zeroes the times); the first mark opens the first phase.
void profiler_start(GpuProfiler *p);
// The phase that starts now in stream order (nothing when off).
void profiler_mark(GpuProfiler *p, ProfilePhase phase, cudaStream_t stream);
// Waits for the last mark and adds the intervals between marks to their
// phases; the last mark stays as the start of the next interval.
void profiler_flush(GpuProfiler *p);
// Flushes and stops; ms (PH_COUNT) gets the milliseconds per phase.
void profiler_stop(GpuProfiler *p, double *ms);

#endif
