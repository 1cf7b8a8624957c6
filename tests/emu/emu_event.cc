// CUDA emulation on the CPU: events (tests/emu; see emu_memory.cc for what
// the emulator is). Kernels and copies run when they are enqueued, so an
// event's timestamp is the host clock at cudaEventRecord: the moment every
// piece of work enqueued before it on its stream has run.
//
// What a GPU would refuse is refused the same way (CUDA Runtime API,
// "Event Management"):
//   - cudaEventElapsedTime on an event never recorded:
//     cudaErrorInvalidResourceHandle;
//   - cudaEventElapsedTime or cudaEventQuery on an event the host has not
//     synchronised with (cudaEventSynchronize on it, or on a later event of
//     its stream, cudaStreamSynchronize, cudaDeviceSynchronize): on a GPU the
//     event may still be pending, so cudaErrorNotReady;
//   - a destroyed or null event: cudaErrorInvalidResourceHandle.
// cudaEventSynchronize completes the pending copies enqueued before the
// record (not those after it), as the GPU's stream order does.
//
// In a stream capture (emu_graph.cc), cudaEventRecord records no work: the
// event only marks a point of the capture (for other streams to join, which
// the emulator does not model), and the host can neither wait for it nor
// query it -- cudaEventSynchronize, cudaEventQuery and cudaEventElapsedTime
// return cudaErrorCapturedEvent (and invalidate the capture while it is in
// progress) until the event is recorded again outside a capture. The
// documentation does not say what they return once the capture has ended;
// the emulator keeps refusing, the strict reading. A record with
// cudaEventRecordWithFlags(..., cudaEventRecordExternal) is a node of the
// graph: every replay records the event on the launch stream.
#include <stdint.h>
#include <time.h>

#include <map>
#include <mutex>
#include <set>

#include "cuda_runtime.h"
#include "emu_internal.h"

using namespace emu;

struct EmuEvent {
    int recorded;          // cudaEventRecord was called
    unsigned long capture; // the last record was in this capture (emu_graph.cc), 0: it was not
    cudaStream_t stream;   // of the last record
    unsigned long seq;     // emu::work_seq() at the last record
    double t_ms;           // host clock at the last record, in milliseconds
};

static std::mutex g_event_mutex;
static std::set<EmuEvent *> g_events;                 // live events
static std::map<cudaStream_t, unsigned long> g_synced; // per stream: records with seq < this are complete
static unsigned long g_synced_all;                     // cudaDeviceSynchronize: every record before this

static double now_ms() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static int live(EmuEvent *e) { return e && g_events.count(e); }

static int complete_locked(const EmuEvent *e) {
    if (e->seq < g_synced_all) return 1;
    auto it = g_synced.find(e->stream);
    return it != g_synced.end() && e->seq < it->second;
}

void emu::events_synced(cudaStream_t stream) {
    unsigned long now = work_seq();
    std::lock_guard<std::mutex> lock(g_event_mutex);
    if (!stream) g_synced_all = now;
    else g_synced[stream] = now;
}

extern "C" cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags) {
    if (!event || flags != cudaEventDefault) return cudaErrorInvalidValue;
    install_handler();
    EmuEvent *e = new EmuEvent{0, 0, NULL, 0, 0.0};
    std::lock_guard<std::mutex> lock(g_event_mutex);
    g_events.insert(e);
    *event = e;
    return cudaSuccess;
}

extern "C" cudaError_t cudaEventCreate(cudaEvent_t *event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

extern "C" cudaError_t cudaEventDestroy(cudaEvent_t event) {
    std::lock_guard<std::mutex> lock(g_event_mutex);
    if (!live(event)) return cudaErrorInvalidResourceHandle;
    g_events.erase(event);
    delete event;
    return cudaSuccess;
}

// The record itself, when it runs (enqueued, or replayed on stream).
static cudaError_t record_run(cudaEvent_t event, cudaStream_t stream) {
    unsigned long seq = work_seq();
    double t = now_ms();
    std::lock_guard<std::mutex> lock(g_event_mutex);
    if (!live(event)) return cudaErrorInvalidResourceHandle;
    event->recorded = 1;
    event->capture = 0;
    event->stream = stream;
    event->seq = seq;
    event->t_ms = t;
    return cudaSuccess;
}

extern "C" cudaError_t cudaEventRecordWithFlags(cudaEvent_t event, cudaStream_t stream, unsigned int flags) {
    if (in_kernel()) emu_fail("cudaEventRecord called from device code");
    if (flags != cudaEventRecordDefault && flags != cudaEventRecordExternal) return cudaErrorInvalidValue;
    {
        std::lock_guard<std::mutex> lock(g_event_mutex);
        if (!live(event)) return cudaErrorInvalidResourceHandle;
    }
    bool record;
    unsigned long capture;
    cudaError_t e = capture_check(stream, "cudaEventRecord", &record, &capture);
    if (e != cudaSuccess) return e;
    if (!record) return flags == cudaEventRecordExternal ? cudaErrorInvalidValue : record_run(event, stream);
    if (flags == cudaEventRecordExternal) {
        capture_record(stream, "cudaEventRecordWithFlags", [event](cudaStream_t s) {
            if (record_run(event, s) != cudaSuccess)
                emu_fail("a graph replays the record of event %p, which was destroyed", (void *)event);
        });
        return cudaSuccess;
    }
    std::lock_guard<std::mutex> lock(g_event_mutex);
    event->capture = capture;
    return cudaSuccess;
}

extern "C" cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    return cudaEventRecordWithFlags(event, stream, cudaEventRecordDefault);
}

extern "C" cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    cudaStream_t stream;
    unsigned long seq, capture;
    {
        std::lock_guard<std::mutex> lock(g_event_mutex);
        if (!live(event)) return cudaErrorInvalidResourceHandle;
        capture = event->capture;
        if (!capture && !event->recorded) return cudaSuccess; // as CUDA: nothing to wait for
        stream = event->stream;
        seq = event->seq;
    }
    if (capture) return capture_event_use(capture, "cudaEventSynchronize");
    complete_pending_before(stream, seq);
    std::lock_guard<std::mutex> lock(g_event_mutex);
    unsigned long &s = g_synced[stream];
    if (s < seq + 1) s = seq + 1;
    return cudaSuccess;
}

extern "C" cudaError_t cudaEventQuery(cudaEvent_t event) {
    unsigned long capture;
    {
        std::lock_guard<std::mutex> lock(g_event_mutex);
        if (!live(event)) return cudaErrorInvalidResourceHandle;
        capture = event->capture;
        if (!capture) return !event->recorded || complete_locked(event) ? cudaSuccess : cudaErrorNotReady;
    }
    return capture_event_use(capture, "cudaEventQuery");
}

extern "C" cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    unsigned long capture = 0;
    {
        std::lock_guard<std::mutex> lock(g_event_mutex);
        if (!ms || !live(start) || !live(end)) return cudaErrorInvalidResourceHandle;
        capture = start->capture ? start->capture : end->capture;
    }
    if (capture) return capture_event_use(capture, "cudaEventElapsedTime");
    std::lock_guard<std::mutex> lock(g_event_mutex);
    if (!live(start) || !live(end)) return cudaErrorInvalidResourceHandle;
    if (!start->recorded || !end->recorded) return cudaErrorInvalidResourceHandle;
    if (!complete_locked(start) || !complete_locked(end)) return cudaErrorNotReady;
    *ms = (float)(end->t_ms - start->t_ms);
    return cudaSuccess;
}
