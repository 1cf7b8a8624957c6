// CUDA emulation on the CPU (see docs/gpu.md, "The emulator"): runs the GPU
// trainer's own .cu code on a machine without a GPU, to check its logic --
// indexing, barriers and shuffles, host/device protocol, cuBLAS arguments,
// NCCL traffic between ranks -- against the CPU reference. It is a test
// harness, not a GPU: threads of a block run one at a time (a chosen order,
// no memory-model effects), device work completes when it is enqueued, the
// GEMMs are plain loops, and NCCL ranks are processes sharing memory.
//
// What it checks that a GPU would only show as a crash or a wrong number:
//   - device memory lives in its own pages, inaccessible while host code
//     runs: host code that dereferences a device pointer stops with the
//     allocation and offset named (the kernels, copies, GEMMs and collectives
//     open the pages they touch on demand, through the SIGSEGV handler);
//   - a guard page before and after every allocation, and canary bytes in
//     the slack, catch out-of-bounds accesses (compute-sanitizer's memcheck);
//   - fresh allocations and shared memory are filled with 0xff bytes (NaN as
//     floats, -1 as integers), so reading before writing shows;
//   - kernel pointer arguments must be device memory; copies must match
//     their cudaMemcpyKind and stay inside their allocations; a barrier or
//     shuffle that not every thread reaches is a deadlock, reported;
//   - an asynchronous copy to or from pinned memory completes at the
//     stream's synchronisation, and the host touching its buffer before
//     then stops;
//   - launch configurations CUDA rejects (an empty grid, > 1024 threads,
//     > 48 KiB of dynamic shared memory) set the error KERNEL_CHECK reads.
// EMU_ORDER=reverse|shuffle changes the order of blocks and threads;
// EMU_PROFILE=1 counts what was asked of the GPU.
//
// The emulator's files: emu_memory.cc (this one: reporting, the profile,
// device and pinned memory, the runtime API), emu_kernel.cc (kernel launches,
// barriers, shuffles), emu_event.cc (events), emu_graph.cc (stream capture
// and graphs), emu_blas.cc (cuBLAS, cuBLASLt), emu_nccl.cc (NCCL),
// emu_race.cc (the race build's access checker).
#include <errno.h>
#include <execinfo.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "emu_internal.h"

using namespace emu;

// ----------------------------------------------------------------------------
// Reporting

void emu::emu_fail(const char *fmt, ...) {
    nccl_mark_aborted();
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "emulator: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    describe_kernel_context(stderr);
    void *frames[48];
    int n = backtrace(frames, 48);
    backtrace_symbols_fd(frames, n, 2);
    fflush(stderr);
    abort();
}

size_t emu::page_size() {
    static size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}
size_t emu::round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// ----------------------------------------------------------------------------
// Profile (EMU_PROFILE=1): what the program asked of the GPU, printed at exit
// -- kernel launches by name, host waits, copies, GEMMs, collectives. Counts,
// not times: they are the same on a GPU, so they show e.g. how often a step
// waits for the device.

static const char *prof_names[PROF_N] = {
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy (synchronous)", "cudaMemcpyAsync to host",
    "cudaMemcpyAsync to device", "cudaMemcpyAsync device to device", "cudaMemset(Async)", "cublasGemmEx",
    "cublasLtMatmul",
    "cublasGemmStridedBatchedEx", "cublasGemmGroupedBatchedEx", "ncclAllReduce", "ncclBroadcast",
    "ncclGroupEnd (send/recv)", "cudaMalloc", "cudaGraphLaunch"};
static long g_prof[PROF_N];
struct ProfKernel {
    long launches;
    long long threads;
};
static std::mutex g_prof_mutex;
static std::map<std::string, ProfKernel> g_prof_kernels;
static int g_profile = -1; // -1: EMU_PROFILE not read yet

static int profiling() {
    if (g_profile < 0) {
        const char *p = getenv("EMU_PROFILE");
        g_profile = p && *p && strcmp(p, "0") != 0;
    }
    return g_profile;
}

static void prof_print() {
    std::lock_guard<std::mutex> lock(g_prof_mutex);
    fprintf(stderr, "emulator profile (pid %d):\n", (int)getpid());
    for (int i = 0; i < PROF_N; i++)
        if (g_prof[i]) fprintf(stderr, "  %10ld  %s\n", g_prof[i], prof_names[i]);
    long total = 0;
    for (auto &k : g_prof_kernels) total += k.second.launches;
    fprintf(stderr, "  %10ld  kernel launches:\n", total);
    for (auto &k : g_prof_kernels)
        fprintf(stderr, "  %10ld    %s (%.0f threads per launch)\n", k.second.launches, k.first.c_str(),
                (double)k.second.threads / k.second.launches);
}

// Whether to count; the first time, arranges the printout at exit.
static int prof_on() {
    if (!profiling()) return 0;
    static std::once_flag once;
    std::call_once(once, [] { atexit(prof_print); });
    return 1;
}

void emu::prof_count(int what) {
    if (!prof_on()) return;
    std::lock_guard<std::mutex> lock(g_prof_mutex);
    g_prof[what]++;
}

void emu::prof_kernel(const char *name, long long threads) {
    if (!prof_on()) return;
    std::lock_guard<std::mutex> lock(g_prof_mutex);
    ProfKernel &k = g_prof_kernels[name];
    k.launches++;
    k.threads += threads;
}

// ----------------------------------------------------------------------------
// Device memory
//
// Layout of one allocation: [guard page][slack | user bytes | slack][guard page]
// with the user bytes 256-aligned and ending at most 255 bytes before the
// second guard page; the slack holds canary bytes, checked when the memory is
// closed again after device work and when it is freed.

static const unsigned char CANARY = 0xa5;

struct Alloc {
    char *map;       // the whole mapping, guards included
    size_t map_len;
    char *data;      // first byte after the first guard page
    size_t data_len; // pages between the guards
    char *user;      // what cudaMalloc returned
    size_t size;     // what was asked for
    unsigned long id;
    int open_count; // device work in progress on it, over all OS threads: pages readable while > 0
    void *shadow;   // the race checker's record of its bytes (emu_race.cc), or NULL
    size_t shadow_len;
};

static std::mutex g_mem_mutex;
static std::map<uintptr_t, Alloc> g_allocs;   // key: data address
// Pinned host memory (cudaMallocHost): its own pages, so that the pages an
// asynchronous copy has not finished with can be protected until the stream
// is synchronised (see "Asynchronous copies" below).
struct Pinned {
    size_t bytes, map_len;
    int readers, writers; // pending async copies reading it (H2D) / writing it (D2H)
    int unchecked;        // touched legitimately while protected: unprotected until the next sync
};
static std::map<uintptr_t, Pinned> g_pinned; // key: address

// The pinned allocation holding p, or NULL. Called with g_mem_mutex held.
static Pinned *pinned_of_locked(const void *p) {
    auto it = g_pinned.upper_bound((uintptr_t)p);
    if (it == g_pinned.begin()) return NULL;
    --it;
    return (uintptr_t)p < it->first + it->second.map_len ? &it->second : NULL;
}

// ----------------------------------------------------------------------------
// Asynchronous copies between device and pinned host memory
//
// On a GPU, cudaMemcpyAsync to or from pinned memory returns at once: the
// host must not read the destination of a device-to-host copy, nor write the
// source of a host-to-device copy, before synchronising the stream. The
// emulator keeps that contract visible: a device-to-host copy into pinned
// memory lands only at the stream's synchronisation (its data is taken in
// stream order, when the call is made), and until then the destination's
// pages are inaccessible and a host-to-device source's pages read-only; the
// host touching them stops with "before the stream was synchronised".

struct PendingCopy {
    cudaStream_t stream;
    unsigned long seq;      // emu::work_seq() when it was enqueued (events order against it)
    int d2h;                // 1: data lands in host at the sync; 0: host is the source of an H2D copy
    char *host;
    size_t bytes;
    std::vector<char> data; // d2h: the device data, taken when the copy was enqueued
};
static std::vector<PendingCopy> g_pending; // under g_mem_mutex

// Protects a pinned allocation as its pending copies require. Locked.
static void pinned_protect_locked(uintptr_t key, Pinned *pn) {
    int prot = pn->unchecked || (!pn->readers && !pn->writers) ? PROT_READ | PROT_WRITE
               : pn->writers                                  ? PROT_NONE
                                                              : PROT_READ;
    if (mprotect((void *)key, pn->map_len, prot) != 0) emu_fail("mprotect of pinned memory: %s", strerror(errno));
}

// Completes the pending copies of a stream (all streams: all = 1), in order;
// only those enqueued before `before` (an emu::work_seq() value; ~0ul: all).
static void complete_pending(cudaStream_t stream, int all, unsigned long before = ~0ul) {
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    std::vector<PendingCopy> keep;
    std::vector<uintptr_t> touched;
    for (auto &pc : g_pending) {
        if ((!all && pc.stream != stream) || pc.seq >= before) {
            keep.push_back(std::move(pc));
            continue;
        }
        auto it = g_pinned.upper_bound((uintptr_t)pc.host);
        --it;
        Pinned *pn = &it->second;
        mprotect((void *)it->first, pn->map_len, PROT_READ | PROT_WRITE);
        if (pc.d2h) {
            memcpy(pc.host, pc.data.data(), pc.bytes);
            pn->writers--;
        } else {
            pn->readers--;
        }
        touched.push_back(it->first);
    }
    g_pending.swap(keep);
    for (uintptr_t key : touched) {
        Pinned *pn = &g_pinned[key];
        if (!pn->readers && !pn->writers) pn->unchecked = 0;
        pinned_protect_locked(key, pn);
    }
}
static unsigned long g_next_id = 1;
static size_t g_bytes_in_use, g_mem_limit;

// The allocation whose mapping contains p (guard pages included), or NULL.
// Called with g_mem_mutex held.
static Alloc *alloc_of_locked(const void *p) {
    uintptr_t a = (uintptr_t)p;
    auto it = g_allocs.upper_bound(a + page_size()); // data > a - page: the map may start one page before data
    if (it == g_allocs.begin()) return NULL;
    --it;
    Alloc *al = &it->second;
    if (a >= (uintptr_t)al->map && a < (uintptr_t)al->map + al->map_len) return al;
    return NULL;
}

// Per OS thread: inside device work (kernel, copy, GEMM, collective), and
// the allocations opened for it.
static thread_local int t_device_depth;
static const int MAX_OPEN = 8192;
struct OpenRef {
    char *data;       // the allocation's key
    unsigned long id; // to tell it from a later allocation at the same address
};
static thread_local OpenRef t_open[MAX_OPEN];
static thread_local int t_n_open;

static void check_canary(const Alloc *al) {
    for (const char *p = al->data; p < al->user; p++)
        if ((unsigned char)*p != CANARY)
            emu_fail("out-of-bounds write at byte offset %zd of device allocation #%lu (%zu bytes): before its start",
                     p - al->user, al->id, al->size);
    for (const char *p = al->user + al->size; p < al->data + al->data_len; p++)
        if ((unsigned char)*p != CANARY)
            emu_fail("out-of-bounds write at byte offset %zd of device allocation #%lu (%zu bytes): past its end",
                     p - al->user, al->id, al->size);
}

void emu::enter_device() { t_device_depth++; }

// The end of this OS thread's device work: close what it opened (the last
// user of an allocation checks its canaries and makes it inaccessible again).
void emu::exit_device() {
    if (--t_device_depth > 0) return;
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    for (int i = 0; i < t_n_open; i++) {
        Alloc *al = alloc_of_locked(t_open[i].data);
        if (!al || al->id != t_open[i].id) continue; // freed meanwhile
        if (--al->open_count > 0) continue;
        check_canary(al);
        if (mprotect(al->data, al->data_len, PROT_NONE) != 0) emu_fail("mprotect: %s", strerror(errno));
    }
    t_n_open = 0;
}

static void segv_handler(int sig, siginfo_t *si, void *uctx) {
    (void)sig;
    (void)uctx;
    const char *addr = (const char *)si->si_addr;
    Alloc copy;
    int found = 0;
    {
        std::lock_guard<std::mutex> lock(g_mem_mutex);
        Alloc *al = alloc_of_locked(addr);
        if (al && addr >= al->data && addr < al->data + al->data_len && t_device_depth > 0) {
            // Device work touching device memory: open the allocation until the work ends.
            // (Another thread may have opened it between the fault and the lock: then it is readable already.)
            for (int i = 0; i < t_n_open; i++)
                if (t_open[i].id == al->id)
                    emu_fail("fault on device allocation #%lu although it is open (%p)", al->id, (const void *)addr);
            if (t_n_open == MAX_OPEN) emu_fail("more than %d device allocations open at once", MAX_OPEN);
            if (al->open_count++ == 0 && mprotect(al->data, al->data_len, PROT_READ | PROT_WRITE) != 0)
                emu_fail("mprotect: %s (too many mappings? see /proc/sys/vm/max_map_count)", strerror(errno));
            t_open[t_n_open++] = OpenRef{al->data, al->id};
            return;
        }
        if (al) {
            copy = *al;
            found = 1;
        }
    }
    if (found) {
        if (addr < copy.data || addr >= copy.data + copy.data_len)
            emu_fail("out-of-bounds access at byte offset %zd of device allocation #%lu (%zu bytes): %s",
                     addr - copy.user, copy.id, copy.size, addr < copy.data ? "before its start" : "past its end");
        emu_fail("host code dereferenced device memory: allocation #%lu (%zu bytes), offset %zd", copy.id, copy.size,
                 addr - copy.user);
    }
    {
        std::unique_lock<std::mutex> lock(g_mem_mutex);
        Pinned *pn = pinned_of_locked(addr);
        if (pn && (pn->readers || pn->writers) && !pn->unchecked) {
            const PendingCopy *hit = NULL;
            for (auto &pc : g_pending)
                if (addr >= pc.host && addr < pc.host + pc.bytes) hit = &pc;
            if (hit && t_device_depth == 0) {
                int d2h = hit->d2h;
                size_t off = (size_t)(addr - hit->host), bytes = hit->bytes;
                lock.unlock();
                emu_fail("host code touched byte %zu of a pinned buffer (%zu bytes) %s before the stream was "
                         "synchronised", off, bytes,
                         d2h ? "that a cudaMemcpyAsync from the device fills" : "that a cudaMemcpyAsync to the device "
                                                                              "still reads (a write)");
            }
            // Another part of the allocation, or a kernel reading host memory: allowed; no more checks on
            // this allocation until its copies complete.
            auto it = g_pinned.upper_bound((uintptr_t)addr);
            --it;
            pn->unchecked = 1;
            pinned_protect_locked(it->first, pn);
            return;
        }
    }
    emu_fail("segmentation fault at %p (not device memory%s)", (const void *)addr,
             in_kernel() ? "; inside a kernel: a stale or freed pointer, or a stack overflow" : "");
}

void emu::install_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        // The handler may run on a kernel thread's small stack: give it its own.
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = segv_handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, NULL);
        sigaction(SIGBUS, &sa, NULL);
        order_from_env();
        const char *lim = getenv("EMU_MEM_LIMIT_GB");
        g_mem_limit = (size_t)((lim ? atof(lim) : 8.0) * 1073741824.0);
    });
}

// Where [p, p + bytes) lives. A device range must lie inside one allocation's
// user bytes (what = a description for the error message).
Where emu::where_range(const void *p, size_t bytes, const char *what) {
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    Alloc *al = alloc_of_locked(p);
    if (al) {
        const char *c = (const char *)p;
        if (c < al->user || c + bytes > al->user + al->size)
            emu_fail("%s: %zu bytes at offset %zd of device allocation #%lu (%zu bytes) run outside it", what, bytes,
                     c - al->user, al->id, al->size);
        return WHERE_DEVICE;
    }
    if (pinned_of_locked(p)) return WHERE_PINNED;
    return WHERE_HOST;
}

bool emu::device_region(const void *p, size_t cell_bytes, DevRegion *out) {
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    Alloc *al = alloc_of_locked(p);
    if (!al) return false;
    if (cell_bytes && !al->shadow) {
        size_t len = round_up((al->size ? al->size : 1) * cell_bytes, page_size());
        void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) emu_fail("cannot map %zu bytes for the race checker: %s", len, strerror(errno));
        al->shadow = m;
        al->shadow_len = len;
    }
    *out = DevRegion{(uintptr_t)al->map, (uintptr_t)al->map + al->map_len, (uintptr_t)al->user, al->size, al->id,
                     al->shadow};
    return true;
}

void emu::need_device(const void *p, size_t bytes, const char *what) {
    if (bytes == 0) return;
    if (where_range(p, bytes, what) != WHERE_DEVICE) emu_fail("%s: %p is not device memory", what, p);
}

void emu::need_host(const void *p, const char *what) {
    if (where_range(p, 1, what) == WHERE_DEVICE) emu_fail("%s: %p is device memory, a host pointer is required", what, p);
}

// ----------------------------------------------------------------------------
// Runtime: errors, devices

static thread_local cudaError_t t_last_error = cudaSuccess;
void emu::set_error(cudaError_t e) {
    if (t_last_error == cudaSuccess) t_last_error = e;
}

extern "C" const char *cudaGetErrorName(cudaError_t err) {
    switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureImplicit: return "cudaErrorStreamCaptureImplicit";
    case cudaErrorCapturedEvent: return "cudaErrorCapturedEvent";
    case cudaErrorStreamCaptureWrongThread: return "cudaErrorStreamCaptureWrongThread";
    }
    return "cudaErrorUnknown";
}

extern "C" const char *cudaGetErrorString(cudaError_t err) {
    switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory (emulator limit EMU_MEM_LIMIT_GB)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalState: return "not possible in the current state";
    case cudaErrorStreamCaptureUnsupported: return "not allowed while a stream captures";
    case cudaErrorStreamCaptureInvalidated: return "the capture was invalidated by an earlier error";
    case cudaErrorStreamCaptureImplicit: return "the legacy stream would depend on a capturing blocking stream";
    case cudaErrorCapturedEvent: return "not allowed on an event last recorded in a capture";
    case cudaErrorStreamCaptureWrongThread: return "capture ended from another thread than the one that began it";
    }
    return "unknown error";
}

extern "C" cudaError_t cudaGetLastError(void) {
    cudaError_t e = t_last_error;
    t_last_error = cudaSuccess;
    return e;
}
extern "C" cudaError_t cudaPeekAtLastError(void) { return t_last_error; }

extern "C" cudaError_t cudaGetDeviceCount(int *count) {
    *count = 1;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGetDevice(int *device) {
    *device = 0;
    return cudaSuccess;
}
extern "C" cudaError_t cudaSetDevice(int device) {
    install_handler();
    return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}

extern "C" cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device) {
    if (device != 0) return cudaErrorInvalidDevice;
    install_handler();
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "CPU emulator (tests/emu), not a GPU");
    prop->totalGlobalMem = g_mem_limit;
    prop->sharedMemPerBlock = 48 * 1024;
    prop->maxThreadsPerBlock = 1024;
    prop->multiProcessorCount = 1;
    // EMU_DEVICE_CC (e.g. 80) pretends another architecture, for the trainer's arch check.
    const char *cc = getenv("EMU_DEVICE_CC");
    int v = cc ? atoi(cc) : 90;
    prop->major = v / 10;
    prop->minor = v % 10;
    return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceSynchronize(void) {
    cudaError_t e = capture_device_wait("cudaDeviceSynchronize");
    if (e != cudaSuccess) return e;
    prof_count(PROF_DEVICE_SYNC);
    complete_pending(NULL, 1);
    events_synced(NULL);
    return cudaSuccess;
}

// Stream-ordered work gets increasing numbers, so that an event (emu_event.cc)
// knows which pending copies precede it.
static std::atomic<unsigned long> g_work_seq{1};
unsigned long emu::work_seq() { return g_work_seq.fetch_add(1); }
void emu::complete_pending_before(cudaStream_t stream, unsigned long seq) { complete_pending(stream, 0, seq); }

// ----------------------------------------------------------------------------
// Runtime: memory

extern "C" cudaError_t cudaMalloc(void **ptr, size_t bytes) {
    install_handler();
    cudaError_t e = capture_unsafe_call("cudaMalloc");
    if (e != cudaSuccess) return e;
    prof_count(PROF_MALLOC);
    if (!ptr) return cudaErrorInvalidValue;
    size_t pg = page_size(), data_len = round_up(round_up(bytes, 256), pg);
    if (data_len == 0) data_len = pg;
    {
        std::lock_guard<std::mutex> lock(g_mem_mutex);
        if (g_bytes_in_use + data_len > g_mem_limit) return cudaErrorMemoryAllocation;
        g_bytes_in_use += data_len;
    }
    size_t map_len = data_len + 2 * pg;
    char *map = (char *)mmap(NULL, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) return cudaErrorMemoryAllocation;
    Alloc al;
    al.map = map;
    al.map_len = map_len;
    al.data = map + pg;
    al.data_len = data_len;
    al.user = al.data + data_len - round_up(bytes, 256);
    al.size = bytes;
    al.open_count = 0;
    al.shadow = NULL;
    al.shadow_len = 0;
    mprotect(al.data, data_len, PROT_READ | PROT_WRITE);
    memset(al.data, CANARY, data_len);
    memset(al.user, 0xff, bytes); // NaN / -1: reading what was never written shows
    mprotect(al.data, data_len, PROT_NONE);
    {
        std::lock_guard<std::mutex> lock(g_mem_mutex);
        al.id = g_next_id++;
        g_allocs[(uintptr_t)al.data] = al;
    }
    *ptr = al.user;
    return cudaSuccess;
}

extern "C" cudaError_t cudaFree(void *ptr) {
    cudaError_t e = capture_unsafe_call("cudaFree");
    if (e != cudaSuccess) return e;
    if (!ptr) return cudaSuccess;
    Alloc al;
    {
        std::lock_guard<std::mutex> lock(g_mem_mutex);
        Alloc *a = alloc_of_locked(ptr);
        if (!a || a->user != ptr) return cudaErrorInvalidValue; // not the start of a live allocation
        al = *a;
        g_allocs.erase((uintptr_t)a->data);
        g_bytes_in_use -= al.data_len;
    }
    mprotect(al.data, al.data_len, PROT_READ);
    check_canary(&al);
    munmap(al.map, al.map_len);
    if (al.shadow) munmap(al.shadow, al.shadow_len);
    return cudaSuccess;
}

extern "C" cudaError_t cudaMallocHost(void **ptr, size_t bytes) {
    install_handler();
    cudaError_t e = capture_unsafe_call("cudaMallocHost");
    if (e != cudaSuccess) return e;
    size_t map_len = round_up(bytes ? bytes : 1, page_size());
    void *p = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return cudaErrorMemoryAllocation;
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    g_pinned[(uintptr_t)p] = Pinned{bytes, map_len, 0, 0, 0};
    *ptr = p;
    return cudaSuccess;
}

extern "C" cudaError_t cudaFreeHost(void *ptr) {
    cudaError_t e = capture_unsafe_call("cudaFreeHost");
    if (e != cudaSuccess) return e;
    if (!ptr) return cudaSuccess;
    size_t map_len;
    {
        std::lock_guard<std::mutex> lock(g_mem_mutex);
        auto it = g_pinned.find((uintptr_t)ptr);
        if (it == g_pinned.end()) return cudaErrorInvalidValue;
        if (it->second.readers || it->second.writers)
            emu_fail("cudaFreeHost of a pinned buffer that an unfinished cudaMemcpyAsync still uses");
        map_len = it->second.map_len;
        g_pinned.erase(it);
    }
    munmap(ptr, map_len);
    return cudaSuccess;
}

// Where a copy's ends live (*d, *s), checked against its kind: a mismatch stops the run.
static void memcpy_check_kind(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, Where *d, Where *s) {
    *d = where_range(dst, bytes, "cudaMemcpy destination");
    *s = where_range(src, bytes, "cudaMemcpy source");
    int d_dev = *d == WHERE_DEVICE, s_dev = *s == WHERE_DEVICE;
    static const char *names[] = {"HostToHost", "HostToDevice", "DeviceToHost", "DeviceToDevice", "Default"};
    int want_d = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    int want_s = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (kind != cudaMemcpyDefault && (d_dev != want_d || s_dev != want_s))
        emu_fail("cudaMemcpy%s of %zu bytes, but the source is %s memory and the destination %s memory",
                 names[kind], bytes, s_dev ? "device" : "host", d_dev ? "device" : "host");
}

static cudaError_t memcpy_checked(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return cudaSuccess;
    if (!dst || !src) return cudaErrorInvalidValue;
    Where d, s;
    memcpy_check_kind(dst, src, bytes, kind, &d, &s);
    enter_device();
    memmove(dst, src, bytes);
    exit_device();
    return cudaSuccess;
}

// The synchronous copy runs on the legacy stream and waits for it: refused
// while a blocking stream captures, and "potentially unsafe" (emu_graph.cc).
extern "C" cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    bool record; // never set: the legacy stream does not capture
    cudaError_t e = capture_check(NULL, "cudaMemcpy", &record);
    if (e == cudaSuccess) e = capture_unsafe_call("cudaMemcpy");
    if (e != cudaSuccess) return e;
    prof_count(PROF_COPY_SYNC);
    return memcpy_checked(dst, src, bytes, kind);
}

// cudaMemcpyAsync's work, when it runs (enqueued, or replayed on stream).
static cudaError_t memcpy_async_run(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                                    cudaStream_t stream) {
    prof_count(kind == cudaMemcpyDeviceToHost ? PROF_COPY_D2H_ASYNC
               : kind == cudaMemcpyHostToDevice ? PROF_COPY_H2D_ASYNC : PROF_COPY_D2D_ASYNC);
    if (bytes == 0) return cudaSuccess;
    // Pageable host memory: the copy is synchronous for the host, as CUDA's is.
    int d2h_pinned = kind == cudaMemcpyDeviceToHost && where_range(dst, bytes, "cudaMemcpyAsync") == WHERE_PINNED;
    int h2d_pinned = kind == cudaMemcpyHostToDevice && where_range(src, bytes, "cudaMemcpyAsync") == WHERE_PINNED;
    if (!d2h_pinned && !h2d_pinned) return memcpy_checked(dst, src, bytes, kind);
    PendingCopy pc;
    pc.stream = stream;
    pc.seq = work_seq();
    pc.d2h = d2h_pinned;
    pc.host = (char *)(d2h_pinned ? dst : src);
    pc.bytes = bytes;
    if (d2h_pinned) {
        need_device(src, bytes, "cudaMemcpyAsync source");
        pc.data.resize(bytes);
        enter_device();
        memcpy(pc.data.data(), src, bytes);
        exit_device();
    } else {
        cudaError_t e = memcpy_checked(dst, src, bytes, kind); // the data as it is now: in stream order
        if (e != cudaSuccess) return e;
    }
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    auto it = g_pinned.upper_bound((uintptr_t)pc.host);
    --it;
    (d2h_pinned ? it->second.writers : it->second.readers)++;
    pinned_protect_locked(it->first, &it->second);
    g_pending.push_back(std::move(pc));
    return cudaSuccess;
}

extern "C" cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                                       cudaStream_t stream) {
    bool record;
    cudaError_t e = capture_check(stream, "cudaMemcpyAsync", &record);
    if (e != cudaSuccess) return e;
    if (!record) return memcpy_async_run(dst, src, bytes, kind, stream);
    // Captured: checked now, run at every replay (reading its source then).
    if (bytes && (!dst || !src)) return cudaErrorInvalidValue;
    if (bytes) {
        Where d, s;
        memcpy_check_kind(dst, src, bytes, kind, &d, &s);
        if (d == WHERE_HOST || s == WHERE_HOST)
            emu_fail("cudaMemcpyAsync of %zu bytes %s pageable host memory in a stream capture: not emulated (use "
                     "pinned memory, cudaMallocHost)", bytes, d == WHERE_HOST ? "to" : "from");
    }
    capture_record(stream, "cudaMemcpyAsync", [=](cudaStream_t s) { memcpy_async_run(dst, src, bytes, kind, s); });
    return cudaSuccess;
}

static void memset_run(void *ptr, int value, size_t bytes) {
    prof_count(PROF_MEMSET);
    if (bytes == 0) return;
    need_device(ptr, bytes, "cudaMemset");
    enter_device();
    memset(ptr, value, bytes);
    exit_device();
}

// The synchronous memset is work on the legacy stream (it does not wait for it).
extern "C" cudaError_t cudaMemset(void *ptr, int value, size_t bytes) {
    bool record; // never set: the legacy stream does not capture
    cudaError_t e = capture_check(NULL, "cudaMemset", &record);
    if (e != cudaSuccess) return e;
    memset_run(ptr, value, bytes);
    return cudaSuccess;
}

extern "C" cudaError_t cudaMemsetAsync(void *ptr, int value, size_t bytes, cudaStream_t stream) {
    bool record;
    cudaError_t e = capture_check(stream, "cudaMemsetAsync", &record);
    if (e != cudaSuccess) return e;
    if (!record) {
        memset_run(ptr, value, bytes);
        return cudaSuccess;
    }
    need_device(ptr, bytes, "cudaMemsetAsync");
    capture_record(stream, "cudaMemsetAsync", [=](cudaStream_t) { memset_run(ptr, value, bytes); });
    return cudaSuccess;
}

// Streams: everything is synchronous; a stream is a tag (and a capture's key).
extern "C" cudaError_t cudaStreamCreate(cudaStream_t *stream) { return cudaStreamCreateWithFlags(stream, 0); }
extern "C" cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags) {
    install_handler();
    *stream = new EmuStream{flags};
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    capture_stream_destroyed(stream);
    delete stream;
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    cudaError_t e = capture_host_wait(stream, "cudaStreamSynchronize");
    if (e != cudaSuccess) return e;
    prof_count(PROF_STREAM_SYNC);
    complete_pending(stream, 0);
    events_synced(stream);
    return cudaSuccess;
}

