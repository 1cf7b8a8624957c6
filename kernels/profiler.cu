// Per-phase device timing with CUDA events (see profiler.cuh).
#include "profiler.cuh"

#include <string.h>

void profiler_init(GpuProfiler *p, int cap) {
    memset(p, 0, sizeof *p);
    p->cap = cap;
    p->ev = (cudaEvent_t *)xcalloc((size_t)cap, sizeof(cudaEvent_t));
    p->phase = (int *)xcalloc((size_t)cap, sizeof(int));
    for (int i = 0; i < cap; i++) CUDA_CHECK(cudaEventCreate(&p->ev[i]));
}

void profiler_free(GpuProfiler *p) {
    for (int i = 0; i < p->cap; i++) CUDA_CHECK(cudaEventDestroy(p->ev[i]));
    free(p->ev);
    free(p->phase);
    memset(p, 0, sizeof *p);
}

void profiler_start(GpuProfiler *p) {
    memset(p->ms, 0, sizeof p->ms);
    p->n = 0;
    p->on = 1;
}

void profiler_flush(GpuProfiler *p) {
    if (p->n < 2) return;
    CUDA_CHECK(cudaEventSynchronize(p->ev[p->n - 1]));
    for (int i = 1; i < p->n; i++) {
        float ms;
        CUDA_CHECK(cudaEventElapsedTime(&ms, p->ev[i - 1], p->ev[i]));
        p->ms[p->phase[i - 1]] += ms;
    }
    // The last mark opens the interval that the next mark closes.
    cudaEvent_t last = p->ev[p->n - 1];
    p->ev[p->n - 1] = p->ev[0];
    p->ev[0] = last;
    p->phase[0] = p->phase[p->n - 1];
    p->n = 1;
}

void profiler_mark(GpuProfiler *p, ProfilePhase phase, cudaStream_t stream) {
    if (!p->on) return;
    if (p->n == p->cap) profiler_flush(p); // a full pool: one extra wait, only while profiling
    CUDA_CHECK(cudaEventRecord(p->ev[p->n], stream));
    p->phase[p->n++] = phase;
}

void profiler_stop(GpuProfiler *p, double *ms) {
    profiler_flush(p);
    p->on = 0;
    p->n = 0;
    memcpy(ms, p->ms, sizeof p->ms);
}
