// CUDA emulation on the CPU: stream capture and graphs (tests/emu; see
// emu_memory.cc for what the emulator is, docs/gpu.md "Graphs" for the
// contract). The GPU trainer captures a micro-batch into a CUDA graph and
// replays it; a trainer that only works because capture is lenient must not
// pass here, so this file follows the CUDA Runtime API ("Stream Management",
// "Graph Management", cudaThreadExchangeStreamCaptureMode) and the
// Programming Guide's "CUDA Graphs" section, refusing what they refuse.
//
// Capture: between cudaStreamBeginCapture and cudaStreamEndCapture, work
// enqueued on the stream -- kernels (arguments by value, launch
// configuration), cudaMemcpyAsync, cudaMemsetAsync, cuBLAS and cuBLASLt calls
// on a handle whose stream captures, NCCL collectives, event records with
// cudaEventRecordExternal, graph launches -- is checked as the library
// checks it and recorded, not run. What it reads (device memory, a pinned
// source, a GEMM's device pointer arrays) is read at replay; what the host
// passes by value (kernel arguments, alpha and beta, a grouped GEMM's
// per-group sizes) is taken at capture, as on a GPU.
//
// Replay: cudaGraphLaunch runs the recorded work in order on the launch
// stream through the emulator's ordinary paths, so every check applies again
// (device memory, races in the race build, copies into pinned memory that
// land at the next synchronisation of that stream), and EMU_PROFILE counts
// the work a replay runs (and the launch), not the work captured.
//
// Refusals, with CUDA's return codes; each invalidates the capture it
// conflicts with, so that cudaStreamEndCapture returns
// cudaErrorStreamCaptureInvalidated and no graph:
//   - waiting for a capturing stream: cudaStreamSynchronize on it
//     (cudaErrorStreamCaptureUnsupported), cudaDeviceSynchronize during any
//     capture (the same; every capture), cudaEventSynchronize, cudaEventQuery
//     or cudaEventElapsedTime of an event last recorded in a capture
//     (cudaErrorCapturedEvent);
//   - the legacy default stream while a blocking stream captures: work on
//     it, waiting for it, and the synchronous cudaMemcpy and cudaMemset,
//     which use it (cudaErrorStreamCaptureImplicit; a cudaStreamNonBlocking
//     capture is not concerned);
//   - "potentially unsafe" calls -- cudaMalloc, cudaMallocHost, cudaFree,
//     cudaFreeHost, the synchronous cudaMemcpy -- as the calling thread's
//     mode (cudaThreadExchangeStreamCaptureMode) and the captures' modes
//     prohibit them (cudaErrorStreamCaptureUnsupported);
//   - further work on an invalidated capture: cudaErrorStreamCaptureInvalidated.
// And without invalidation: beginning a capture on the legacy stream
// (cudaErrorStreamCaptureUnsupported) or on a stream that captures
// (cudaErrorIllegalState), ending one on a stream that does not capture
// (cudaErrorIllegalState), ending a Global or ThreadLocal capture from
// another thread (cudaErrorStreamCaptureWrongThread).
//
// Not emulated: several streams in one capture (cudaStreamWaitEvent, which
// the emulator does not have), graph editing and update (cudaGraphAdd*Node,
// cudaGraphExecUpdate, cudaGraphExec*SetParams), conditional nodes, memory
// allocation nodes (cudaMallocAsync), device-side graph launch, copies
// involving pageable host memory in a capture (they stop the run).
#include <stdio.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "cuda_runtime.h"
#include "emu_internal.h"

using namespace emu;

// One piece of recorded work, and what it is (for messages).
struct Node {
    const char *what;
    Work run;
};
typedef std::vector<Node> Nodes;

// A graph and its instantiation share the recorded work: neither can be
// edited, and destroying the graph leaves the executable graph intact.
struct EmuGraph {
    std::shared_ptr<const Nodes> nodes;
};
struct EmuGraphExec {
    std::shared_ptr<const Nodes> nodes;
};

// A capture sequence in progress on one stream.
struct Capture {
    cudaStream_t stream;
    cudaStreamCaptureMode mode;
    int thread;        // the thread that began it
    unsigned long id;  // unique in the process (events recorded in it remember it)
    bool invalidated;  // a refusal conflicted with it: it ends with an error and no graph
    std::shared_ptr<Nodes> nodes;
};

static std::mutex g_mutex; // guards everything below
static std::vector<Capture *> g_captures;  // in progress, valid or invalidated
static std::atomic<int> g_n_captures{0};    // its size: no lock when nothing captures (the usual case)
static unsigned long g_next_id = 1;
static std::set<EmuGraph *> g_graphs;       // live handles: a destroyed one is refused, not dereferenced
static std::set<EmuGraphExec *> g_execs;

// The calling thread's capture interaction mode (cudaThreadExchangeStreamCaptureMode).
static thread_local cudaStreamCaptureMode t_mode = cudaStreamCaptureModeGlobal;

static int this_thread() {
    static std::atomic<int> next{1};
    static thread_local int id = 0;
    if (!id) id = next++;
    return id;
}

static Capture *capture_of_locked(cudaStream_t stream) {
    for (Capture *c : g_captures)
        if (c->stream == stream) return c;
    return NULL;
}

static int blocking(cudaStream_t stream) { return !(stream->flags & cudaStreamNonBlocking); }

// Marks a capture invalidated and says why on stderr: the program sees only
// the error codes, the message says which call broke which capture.
static void invalidate_locked(Capture *c, const char *what, const char *why, cudaError_t e) {
    if (c->invalidated) return;
    c->invalidated = true;
    fprintf(stderr, "emulator: %s %s: %s; the capture on stream %p is invalidated\n", what, why, cudaGetErrorName(e),
            (void *)c->stream);
}

// The legacy default stream waits for every blocking stream, so using it
// while one captures would make it depend on captured work: CUDA refuses
// and invalidates those captures. Returns whether there were any.
static bool legacy_conflict_locked(const char *what) {
    bool any = false;
    for (Capture *c : g_captures)
        if (blocking(c->stream)) {
            invalidate_locked(c, what, "uses the legacy default stream while a blocking stream captures",
                              cudaErrorStreamCaptureImplicit);
            any = true;
        }
    return any;
}

cudaError_t emu::capture_check(cudaStream_t stream, const char *what, bool *record, unsigned long *capture_id) {
    *record = false;
    if (g_n_captures.load() == 0) return cudaSuccess;
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!stream) return legacy_conflict_locked(what) ? cudaErrorStreamCaptureImplicit : cudaSuccess;
    Capture *c = capture_of_locked(stream);
    if (!c) return cudaSuccess;
    if (c->invalidated) return cudaErrorStreamCaptureInvalidated;
    *record = true;
    if (capture_id) *capture_id = c->id;
    return cudaSuccess;
}

void emu::capture_record(cudaStream_t stream, const char *what, Work work) {
    std::lock_guard<std::mutex> lock(g_mutex);
    Capture *c = capture_of_locked(stream);
    if (c && !c->invalidated) c->nodes->push_back(Node{what, std::move(work)}); // (invalidated meanwhile: dropped)
}

// cudaThreadExchangeStreamCaptureMode's rule: a thread in Relaxed mode may
// make potentially unsafe calls; otherwise not while it has a capture of its
// own that is not Relaxed, nor, in Global mode, while another thread has a
// Global one.
cudaError_t emu::capture_unsafe_call(const char *what) {
    if (g_n_captures.load() == 0 || t_mode == cudaStreamCaptureModeRelaxed) return cudaSuccess;
    std::lock_guard<std::mutex> lock(g_mutex);
    bool refused = false;
    for (Capture *c : g_captures) {
        bool prohibits = c->thread == this_thread() ? c->mode != cudaStreamCaptureModeRelaxed
                                                    : t_mode == cudaStreamCaptureModeGlobal &&
                                                          c->mode == cudaStreamCaptureModeGlobal;
        if (!prohibits) continue;
        invalidate_locked(c, what, "is potentially unsafe during a capture (the capture's and the thread's modes prohibit it)",
                          cudaErrorStreamCaptureUnsupported);
        refused = true;
    }
    return refused ? cudaErrorStreamCaptureUnsupported : cudaSuccess;
}

cudaError_t emu::capture_host_wait(cudaStream_t stream, const char *what) {
    if (g_n_captures.load() == 0) return cudaSuccess;
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!stream) return legacy_conflict_locked(what) ? cudaErrorStreamCaptureImplicit : cudaSuccess;
    Capture *c = capture_of_locked(stream);
    if (!c) return cudaSuccess;
    invalidate_locked(c, what, "waits for a stream that captures (its work is recorded, not run)",
                      cudaErrorStreamCaptureUnsupported);
    return cudaErrorStreamCaptureUnsupported;
}

cudaError_t emu::capture_device_wait(const char *what) {
    if (g_n_captures.load() == 0) return cudaSuccess;
    std::lock_guard<std::mutex> lock(g_mutex);
    for (Capture *c : g_captures)
        invalidate_locked(c, what, "waits for the device while a stream captures", cudaErrorStreamCaptureUnsupported);
    return g_captures.empty() ? cudaSuccess : cudaErrorStreamCaptureUnsupported;
}

// An event last recorded in a capture (without cudaEventRecordExternal)
// stands for recorded work, not work the host could wait for.
cudaError_t emu::capture_event_use(unsigned long capture_id, const char *what) {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (Capture *c : g_captures)
        if (c->id == capture_id)
            invalidate_locked(c, what, "of an event recorded in the capture", cudaErrorCapturedEvent);
    return cudaErrorCapturedEvent;
}

void emu::capture_stream_destroyed(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (capture_of_locked(stream))
        emu_fail("cudaStreamDestroy of stream %p while it captures: end the capture (cudaStreamEndCapture) first",
                 (void *)stream);
}

// ----------------------------------------------------------------------------
// Runtime API: capture

extern "C" cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
    install_handler();
    if (mode != cudaStreamCaptureModeGlobal && mode != cudaStreamCaptureModeThreadLocal &&
        mode != cudaStreamCaptureModeRelaxed)
        return cudaErrorInvalidValue;
    if (!stream) return cudaErrorStreamCaptureUnsupported; // the legacy stream cannot capture
    std::lock_guard<std::mutex> lock(g_mutex);
    if (capture_of_locked(stream)) return cudaErrorIllegalState;
    g_captures.push_back(new Capture{stream, mode, this_thread(), g_next_id++, false, std::make_shared<Nodes>()});
    g_n_captures = (int)g_captures.size();
    return cudaSuccess;
}

extern "C" cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *pGraph) {
    std::lock_guard<std::mutex> lock(g_mutex);
    Capture *c = stream ? capture_of_locked(stream) : NULL;
    if (!c) return cudaErrorIllegalState; // not capturing (or another stream than the one that began)
    if (!pGraph) return cudaErrorInvalidValue;
    if (c->mode != cudaStreamCaptureModeRelaxed && c->thread != this_thread()) return cudaErrorStreamCaptureWrongThread;
    g_captures.erase(std::find(g_captures.begin(), g_captures.end(), c));
    g_n_captures = (int)g_captures.size();
    cudaError_t e = cudaSuccess;
    if (c->invalidated) {
        *pGraph = NULL;
        e = cudaErrorStreamCaptureInvalidated;
    } else {
        *pGraph = new EmuGraph{c->nodes};
        g_graphs.insert(*pGraph);
    }
    delete c;
    return e;
}

extern "C" cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus *pCaptureStatus) {
    if (!pCaptureStatus) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!stream) { // asking the legacy stream while a blocking stream captures is an error, not an invalidation
        for (Capture *c : g_captures)
            if (blocking(c->stream)) return cudaErrorStreamCaptureImplicit;
        *pCaptureStatus = cudaStreamCaptureStatusNone;
        return cudaSuccess;
    }
    Capture *c = capture_of_locked(stream);
    *pCaptureStatus = !c ? cudaStreamCaptureStatusNone
                      : c->invalidated ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}

extern "C" cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode *mode) {
    if (!mode || (*mode != cudaStreamCaptureModeGlobal && *mode != cudaStreamCaptureModeThreadLocal &&
                  *mode != cudaStreamCaptureModeRelaxed))
        return cudaErrorInvalidValue;
    cudaStreamCaptureMode old = t_mode;
    t_mode = *mode;
    *mode = old;
    return cudaSuccess;
}

// ----------------------------------------------------------------------------
// Runtime API: graphs

extern "C" cudaError_t cudaGraphInstantiate(cudaGraphExec_t *pGraphExec, cudaGraph_t graph, unsigned long long flags) {
    if (!pGraphExec) return cudaErrorInvalidValue;
    // The flags cudaGraphInstantiate accepts; Upload is cudaGraphInstantiateWithParams's only.
    // AutoFreeOnLaunch (allocation nodes) and UseNodePriority (one stream) change nothing here.
    const unsigned long long known = cudaGraphInstantiateFlagAutoFreeOnLaunch | cudaGraphInstantiateFlagDeviceLaunch |
                                     cudaGraphInstantiateFlagUseNodePriority;
    if (flags & ~known) return cudaErrorInvalidValue;
    if ((flags & cudaGraphInstantiateFlagDeviceLaunch) && (flags & cudaGraphInstantiateFlagAutoFreeOnLaunch))
        return cudaErrorInvalidValue;
    if (flags & cudaGraphInstantiateFlagDeviceLaunch)
        emu_fail("cudaGraphInstantiate with cudaGraphInstantiateFlagDeviceLaunch: device-side launch (and its limits "
                 "on the graph's nodes) is not emulated");
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_graphs.count(graph)) return cudaErrorInvalidValue;
    *pGraphExec = new EmuGraphExec{graph->nodes};
    g_execs.insert(*pGraphExec);
    return cudaSuccess;
}

// Runs an executable graph's work, in order, on the launch stream.
static void replay(const std::shared_ptr<const Nodes> &nodes, cudaStream_t stream) {
    prof_count(PROF_GRAPH_LAUNCH);
    for (const Node &n : *nodes) n.run(stream);
}

extern "C" cudaError_t cudaGraphLaunch(cudaGraphExec_t graphExec, cudaStream_t stream) {
    if (!graphExec) return cudaErrorInvalidValue;
    std::shared_ptr<const Nodes> nodes;
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        if (!g_execs.count(graphExec)) return cudaErrorInvalidResourceHandle;
        nodes = graphExec->nodes;
    }
    bool record;
    cudaError_t e = capture_check(stream, "cudaGraphLaunch", &record);
    if (e != cudaSuccess) return e;
    if (record) // a graph launched into a capture becomes part of it (a child graph)
        capture_record(stream, "cudaGraphLaunch", [nodes](cudaStream_t s) { replay(nodes, s); });
    else
        replay(nodes, stream);
    return cudaSuccess;
}

extern "C" cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_graphs.erase(graph)) return cudaErrorInvalidValue;
    delete graph;
    return cudaSuccess;
}

extern "C" cudaError_t cudaGraphExecDestroy(cudaGraphExec_t graphExec) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_execs.erase(graphExec)) return cudaErrorInvalidValue;
    delete graphExec;
    return cudaSuccess;
}
