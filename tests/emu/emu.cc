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
#include <errno.h>
#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <vector>

#include "cublasLt.h"
#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "cuda_runtime.h"
#include "nccl.h"

#if !defined(__x86_64__) || !defined(__linux__)
#error "the CUDA emulator (tests/emu) switches threads with x86-64 Linux assembly"
#endif

// ----------------------------------------------------------------------------
// Reporting

namespace emu {
struct Block;
}
static thread_local emu::Block *t_blk;      // the block being run by this OS thread (NULL outside kernels)
static void describe_kernel_context(FILE *f); // below, with the scheduler

static void nccl_mark_aborted(); // below, with NCCL

[[noreturn]] static void emu_fail(const char *fmt, ...) {
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

static size_t page_size() {
    static size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}
static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// ----------------------------------------------------------------------------
// Profile (EMU_PROFILE=1): what the program asked of the GPU, printed at exit
// -- kernel launches by name, host waits, copies, GEMMs, collectives. Counts,
// not times: they are the same on a GPU, so they show e.g. how often a step
// waits for the device.

enum {
    PROF_STREAM_SYNC, PROF_DEVICE_SYNC, PROF_COPY_SYNC, PROF_COPY_D2H_ASYNC, PROF_COPY_H2D_ASYNC, PROF_COPY_D2D_ASYNC,
    PROF_MEMSET, PROF_GEMM, PROF_LT_MATMUL, PROF_GEMM_STRIDED, PROF_GEMM_GROUPED, PROF_NCCL_ALLREDUCE, PROF_NCCL_BCAST,
    PROF_NCCL_GROUP, PROF_MALLOC, PROF_N
};
static const char *prof_names[PROF_N] = {
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy (synchronous)", "cudaMemcpyAsync to host",
    "cudaMemcpyAsync to device", "cudaMemcpyAsync device to device", "cudaMemset(Async)", "cublasGemmEx",
    "cublasLtMatmul",
    "cublasGemmStridedBatchedEx", "cublasGemmGroupedBatchedEx", "ncclAllReduce", "ncclBroadcast",
    "ncclGroupEnd (send/recv)", "cudaMalloc"};
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

static void prof_count(int what) {
    if (!prof_on()) return;
    std::lock_guard<std::mutex> lock(g_prof_mutex);
    g_prof[what]++;
}

static void prof_kernel(const char *name, long long threads) {
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

// Completes the pending copies of a stream (all streams: all = 1), in order.
static void complete_pending(cudaStream_t stream, int all) {
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    std::vector<PendingCopy> keep;
    std::vector<uintptr_t> touched;
    for (auto &pc : g_pending) {
        if (!all && pc.stream != stream) {
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

static void enter_device() { t_device_depth++; }

// The end of this OS thread's device work: close what it opened (the last
// user of an allocation checks its canaries and makes it inaccessible again).
static void exit_device() {
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
             t_blk ? "; inside a kernel: a stale or freed pointer, or a stack overflow" : "");
}

// The order in which blocks, and the threads of a block between barriers,
// run (EMU_ORDER). Correct CUDA code gives the same bits in every order; a
// missing barrier or an order-dependent write shows as a difference between
// a forward and a reverse (or shuffled) run.
enum { ORDER_FORWARD, ORDER_REVERSE, ORDER_SHUFFLE };
static int g_order = ORDER_FORWARD;
static thread_local uint64_t t_shuffle_state = 0x9e3779b97f4a7c15ull;

namespace emu {
void set_order(const char *order) {
    g_order = strcmp(order, "reverse") == 0 ? ORDER_REVERSE : strcmp(order, "shuffle") == 0 ? ORDER_SHUFFLE : ORDER_FORWARD;
}
} // namespace emu

// order[0..n) = 0..n-1 in the chosen order.
static void make_order(std::vector<int> &order, int n) {
    order.resize(n);
    for (int i = 0; i < n; i++) order[i] = g_order == ORDER_REVERSE ? n - 1 - i : i;
    if (g_order != ORDER_SHUFFLE) return;
    for (int i = n - 1; i > 0; i--) { // Fisher-Yates with a xorshift generator
        t_shuffle_state ^= t_shuffle_state << 13;
        t_shuffle_state ^= t_shuffle_state >> 7;
        t_shuffle_state ^= t_shuffle_state << 17;
        int j = (int)(t_shuffle_state % (uint64_t)(i + 1)), tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
}

static void install_handler() {
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
        const char *order = getenv("EMU_ORDER");
        if (order && strcmp(order, "reverse") == 0)
            g_order = ORDER_REVERSE;
        else if (order && strcmp(order, "shuffle") == 0)
            g_order = ORDER_SHUFFLE;
        else if (order && *order && strcmp(order, "forward") != 0) {
            fprintf(stderr, "emulator: EMU_ORDER must be forward, reverse or shuffle, not '%s'\n", order);
            exit(1);
        }
        const char *lim = getenv("EMU_MEM_LIMIT_GB");
        g_mem_limit = (size_t)((lim ? atof(lim) : 8.0) * 1073741824.0);
    });
}

enum Where { WHERE_HOST, WHERE_DEVICE, WHERE_PINNED };

// Where [p, p + bytes) lives. A device range must lie inside one allocation's
// user bytes (what = a description for the error message).
static Where where_range(const void *p, size_t bytes, const char *what) {
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

static void need_device(const void *p, size_t bytes, const char *what) {
    if (bytes == 0) return;
    if (where_range(p, bytes, what) != WHERE_DEVICE) emu_fail("%s: %p is not device memory", what, p);
}

static void need_host(const void *p, const char *what) {
    if (where_range(p, 1, what) == WHERE_DEVICE) emu_fail("%s: %p is device memory, a host pointer is required", what, p);
}

// ----------------------------------------------------------------------------
// Runtime: errors, devices

static thread_local cudaError_t t_last_error = cudaSuccess;
static void set_error(cudaError_t e) {
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
    prof_count(PROF_DEVICE_SYNC);
    complete_pending(NULL, 1);
    return cudaSuccess;
}

// ----------------------------------------------------------------------------
// Runtime: memory

extern "C" cudaError_t cudaMalloc(void **ptr, size_t bytes) {
    install_handler();
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
    return cudaSuccess;
}

extern "C" cudaError_t cudaMallocHost(void **ptr, size_t bytes) {
    install_handler();
    size_t map_len = round_up(bytes ? bytes : 1, page_size());
    void *p = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return cudaErrorMemoryAllocation;
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    g_pinned[(uintptr_t)p] = Pinned{bytes, map_len, 0, 0, 0};
    *ptr = p;
    return cudaSuccess;
}

extern "C" cudaError_t cudaFreeHost(void *ptr) {
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

static cudaError_t memcpy_checked(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return cudaSuccess;
    if (!dst || !src) return cudaErrorInvalidValue;
    Where d = where_range(dst, bytes, "cudaMemcpy destination"), s = where_range(src, bytes, "cudaMemcpy source");
    int d_dev = d == WHERE_DEVICE, s_dev = s == WHERE_DEVICE;
    static const char *names[] = {"HostToHost", "HostToDevice", "DeviceToHost", "DeviceToDevice", "Default"};
    int want_d = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    int want_s = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (kind != cudaMemcpyDefault && (d_dev != want_d || s_dev != want_s))
        emu_fail("cudaMemcpy%s of %zu bytes, but the source is %s memory and the destination %s memory",
                 names[kind], bytes, s_dev ? "device" : "host", d_dev ? "device" : "host");
    enter_device();
    memmove(dst, src, bytes);
    exit_device();
    return cudaSuccess;
}

extern "C" cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    prof_count(PROF_COPY_SYNC);
    return memcpy_checked(dst, src, bytes, kind);
}

extern "C" cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
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

extern "C" cudaError_t cudaMemset(void *ptr, int value, size_t bytes) {
    prof_count(PROF_MEMSET);
    if (bytes == 0) return cudaSuccess;
    need_device(ptr, bytes, "cudaMemset");
    enter_device();
    memset(ptr, value, bytes);
    exit_device();
    return cudaSuccess;
}

extern "C" cudaError_t cudaMemsetAsync(void *ptr, int value, size_t bytes, cudaStream_t stream) {
    (void)stream;
    return cudaMemset(ptr, value, bytes);
}

// Streams: everything is synchronous; a stream is a tag.
struct EmuStream {
    unsigned int flags;
};
extern "C" cudaError_t cudaStreamCreate(cudaStream_t *stream) { return cudaStreamCreateWithFlags(stream, 0); }
extern "C" cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags) {
    install_handler();
    *stream = new EmuStream{flags};
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    delete stream;
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    prof_count(PROF_STREAM_SYNC);
    complete_pending(stream, 0);
    return cudaSuccess;
}

// ----------------------------------------------------------------------------
// Kernels: blocks of coroutine threads

namespace emu {

enum { T_RUN, T_AT_BLOCK, T_AT_WARP, T_DONE };

struct Thread {
    void *sp;   // saved stack pointer while switched out
    uint3 idx;
    int state;
    int lane, warp;
    uint64_t shfl; // the value this thread offers in a shuffle
};

struct Block {
    const char *name;
    dim3 grid, block;
    uint3 bidx;
    int nthreads;
    Thread *threads;
    Thread *cur;
    void *sched_sp; // the scheduler's saved stack pointer
    const std::function<void()> *body;
    char *smem;
};

} // namespace emu

static const size_t STACK_BYTES = 256 * 1024;

// Static __shared__ variables (emu_device.h puts them in this section; the
// linker defines its bounds; weak: a program may have none).
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

// One kernel at a time in the process: static shared memory has one copy.
static std::mutex g_kernel_mutex;
// One stack per thread of a block (with a guard page below), reused by every
// launch of this OS thread and unmapped when it ends.
struct StackPool {
    std::vector<char *> stacks;
    ~StackPool() {
        for (char *s : stacks) munmap(s - page_size(), STACK_BYTES + page_size());
    }
};
static thread_local StackPool t_pool;
static thread_local std::vector<emu::Thread> t_threads;
static thread_local std::vector<char> t_smem;

static void describe_kernel_context(FILE *f) {
    if (!t_blk) return;
    emu::Block *b = t_blk;
    fprintf(f, "  in kernel %s, grid (%u,%u,%u) block (%u,%u,%u), at block (%u,%u,%u)", b->name, b->grid.x, b->grid.y,
            b->grid.z, b->block.x, b->block.y, b->block.z, b->bidx.x, b->bidx.y, b->bidx.z);
    if (b->cur) fprintf(f, " thread (%u,%u,%u)", b->cur->idx.x, b->cur->idx.y, b->cur->idx.z);
    fprintf(f, "\n");
}

// Switching between a block's threads. A thread switches only when it
// calls a barrier, so only the registers a function call preserves need
// saving: rbp, rbx, r12-r15, the SSE and x87 control words, and the stack
// pointer. (ucontext's swapcontext also saves the signal mask with a system
// call per switch: several times slower.)
extern "C" void emu_switch(void **save_sp, void *load_sp);
__asm__(".text\n"
        ".globl emu_switch\n"
        ".type emu_switch, @function\n"
        "emu_switch:\n"
        "    pushq %rbp\n"
        "    pushq %rbx\n"
        "    pushq %r12\n"
        "    pushq %r13\n"
        "    pushq %r14\n"
        "    pushq %r15\n"
        "    subq $8, %rsp\n"
        "    stmxcsr (%rsp)\n"
        "    fnstcw 4(%rsp)\n"
        "    movq %rsp, (%rdi)\n"
        "    movq %rsi, %rsp\n"
        "    ldmxcsr (%rsp)\n"
        "    fldcw 4(%rsp)\n"
        "    addq $8, %rsp\n"
        "    popq %r15\n"
        "    popq %r14\n"
        "    popq %r13\n"
        "    popq %r12\n"
        "    popq %rbx\n"
        "    popq %rbp\n"
        "    ret\n"
        ".size emu_switch, .-emu_switch\n");

// The first code a thread runs; it never returns (its last switch goes back
// to the scheduler for good).
static void thread_entry() {
    emu::Block *b = t_blk;
    (*b->body)();
    emu::Thread *t = b->cur;
    t->state = emu::T_DONE;
    emu_switch(&t->sp, b->sched_sp);
    abort();
}

// A fresh stack for thread_entry, laid out as emu_switch leaves a switched-out
// thread: control words, six saved registers, then the address to "return" to.
static void *initial_stack(char *stack, size_t bytes) {
    uintptr_t top = ((uintptr_t)(stack + bytes) & ~(uintptr_t)15) - 16; // 16-aligned, room for a fake return slot
    uint64_t *sp = (uint64_t *)top;
    sp[1] = 0;                       // thread_entry's own return address: never used
    sp[0] = (uint64_t)(uintptr_t)thread_entry; // popped by ret: at entry rsp = top + 8, as after a call
    sp -= 6;                         // rbp rbx r12 r13 r14 r15 (popped in reverse)
    for (int i = 0; i < 6; i++) sp[i] = 0;
    sp -= 1;                         // mxcsr, x87 control word: this thread's current ones
    uint32_t mxcsr;
    uint16_t fpucw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fpucw));
    memcpy((char *)sp, &mxcsr, 4);
    memcpy((char *)sp + 4, &fpucw, 2);
    return sp;
}

static void wait_at(int state) {
    emu::Block *b = t_blk;
    if (!b) emu_fail("a barrier or shuffle called outside a kernel");
    emu::Thread *t = b->cur;
    t->state = state;
    emu_switch(&t->sp, b->sched_sp);
}

namespace emu {

static const uint3 &current_thread_idx() {
    if (!t_blk || !t_blk->cur) emu_fail("threadIdx used outside a kernel");
    return t_blk->cur->idx;
}
const uint3 &thread_idx() { return current_thread_idx(); }
const uint3 &block_idx() {
    if (!t_blk) emu_fail("blockIdx used outside a kernel");
    return t_blk->bidx;
}
const dim3 &block_dim() {
    if (!t_blk) emu_fail("blockDim used outside a kernel");
    return t_blk->block;
}
const dim3 &grid_dim() {
    if (!t_blk) emu_fail("gridDim used outside a kernel");
    return t_blk->grid;
}
void *dyn_smem() {
    if (!t_blk) emu_fail("dynamic shared memory used outside a kernel");
    return t_blk->smem;
}
void syncthreads() { wait_at(T_AT_BLOCK); }
void syncwarp(unsigned int mask) {
    (void)mask;
    wait_at(T_AT_WARP);
}

uint64_t shfl_xor(unsigned int mask, uint64_t bits, int lane_mask, int width) {
    Block *b = t_blk;
    if (!b) emu_fail("a shuffle called outside a kernel");
    Thread *t = b->cur;
    if (width <= 0 || width > 32 || (width & (width - 1))) emu_fail("shuffle width %d is not a power of 2 <= 32", width);
    int src = (t->lane & ~(width - 1)) | ((t->lane ^ lane_mask) & (width - 1));
    if (!(mask >> t->lane & 1u) || !(mask >> src & 1u))
        emu_fail("shuffle by lane %d from lane %d outside its mask 0x%08x", t->lane, src, mask);
    t->shfl = bits;
    wait_at(T_AT_WARP); // every live lane has offered its value
    int si = t->warp * 32 + src;
    if (si >= b->nthreads || b->threads[si].state == T_DONE)
        emu_fail("shuffle by lane %d reads lane %d, which %s", t->lane, src,
                 si >= b->nthreads ? "does not exist (block size not a multiple of 32)" : "has exited");
    uint64_t r = b->threads[si].shfl;
    wait_at(T_AT_WARP); // nobody offers the next value before every lane has read this one
    return r;
}

// Runs the live threads until each waits or ends, then releases barriers,
// until every thread has ended. A state where nobody can move is a deadlock.
static void run_block(Block *b) {
    static thread_local std::vector<int> order;
    for (;;) {
        make_order(order, b->nthreads);
        for (int k = 0; k < b->nthreads; k++) {
            int i = order[k];
            if (b->threads[i].state != T_RUN) continue;
            b->cur = &b->threads[i];
            emu_switch(&b->sched_sp, b->threads[i].sp);
        }
        b->cur = NULL;
        int live = 0, at_block = 0, released = 0;
        for (int w = 0; w * 32 < b->nthreads; w++) {
            int wlive = 0, wat = 0, end = w * 32 + 32 < b->nthreads ? w * 32 + 32 : b->nthreads;
            for (int i = w * 32; i < end; i++) {
                int s = b->threads[i].state;
                wlive += s != T_DONE;
                wat += s == T_AT_WARP;
                at_block += s == T_AT_BLOCK;
            }
            live += wlive;
            if (wlive > 0 && wat == wlive) {
                for (int i = w * 32; i < end; i++)
                    if (b->threads[i].state == T_AT_WARP) b->threads[i].state = T_RUN;
                released = 1;
            }
        }
        if (released) continue;
        if (live == 0) return;
        if (at_block == live) {
            for (int i = 0; i < b->nthreads; i++)
                if (b->threads[i].state == T_AT_BLOCK) b->threads[i].state = T_RUN;
            continue;
        }
        int n_warp = 0;
        for (int i = 0; i < b->nthreads; i++) n_warp += b->threads[i].state == T_AT_WARP;
        emu_fail("deadlock: of %d live threads, %d wait at __syncthreads and %d at a warp barrier or shuffle "
                 "whose warp has threads elsewhere",
                 live, at_block, n_warp);
    }
}

// Thread i of block b, ready to run the kernel from its start.
static void start_thread(Block *b, int i) {
    Thread *t = &b->threads[i];
    dim3 bd = b->block;
    t->idx = uint3{(unsigned int)(i % bd.x), (unsigned int)(i / bd.x % bd.y), (unsigned int)(i / (bd.x * bd.y))};
    t->state = T_RUN;
    t->lane = i % 32;
    t->warp = i / 32;
    t->sp = initial_stack(t_pool.stacks[i], STACK_BYTES);
}

void launch(const char *name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            const std::function<void()> &body, const void *const *ptrs, const int *ptr_arg_index, int n_ptrs) {
    (void)stream;
    install_handler();
    if (t_blk) emu_fail("kernel %s launched from inside a kernel", name);
    uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0 || nthreads > 1024 || block.z > 64 ||
        grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
        fprintf(stderr, "emulator: kernel %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)\n", name,
                grid.x, grid.y, grid.z, block.x, block.y, block.z);
        set_error(cudaErrorInvalidConfiguration);
        return;
    }
    if (smem > 48 * 1024) {
        fprintf(stderr, "emulator: kernel %s asks for %zu bytes of dynamic shared memory (> 48 KiB without "
                        "cudaFuncSetAttribute)\n", name, smem);
        set_error(cudaErrorInvalidValue);
        return;
    }
    for (int i = 0; i < n_ptrs; i++) {
        if (!ptrs[i]) continue;
        Where w = where_range(ptrs[i], 0, name);
        if (w == WHERE_HOST) emu_fail("kernel %s: argument %d (%p) is a host pointer", name, ptr_arg_index[i], ptrs[i]);
    }

    int n = (int)nthreads;
    while ((int)t_pool.stacks.size() < n) {
        size_t pg = page_size();
        char *m = (char *)mmap(NULL, STACK_BYTES + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                               -1, 0);
        if (m == MAP_FAILED) emu_fail("cannot map a thread stack: %s", strerror(errno));
        if (mprotect(m, pg, PROT_NONE) != 0) emu_fail("mprotect: %s", strerror(errno)); // stack overflow guard
        t_pool.stacks.push_back(m + pg);
    }
    t_threads.resize(n);
    t_smem.assign(smem ? smem : 1, 0);

    Block b;
    b.name = name;
    b.grid = grid;
    b.block = block;
    b.nthreads = n;
    b.threads = t_threads.data();
    b.cur = NULL;
    b.body = &body;
    b.smem = t_smem.data();
    std::lock_guard<std::mutex> one_kernel(g_kernel_mutex);
    enter_device();
    t_blk = &b;
    static thread_local std::vector<int> block_order;
    uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
    if (nblocks > (1u << 30)) emu_fail("kernel %s: %llu blocks is more than the emulator runs", name,
                                       (unsigned long long)nblocks);
    prof_kernel(name, (long long)(nthreads * nblocks));
    make_order(block_order, (int)nblocks);
    for (uint64_t k = 0; k < nblocks; k++) {
        unsigned int q = (unsigned int)block_order[k];
        b.bidx = uint3{q % grid.x, q / grid.x % grid.y, q / (grid.x * grid.y)};
        memset(b.smem, 0xff, smem); // unwritten shared memory reads as NaN / -1
        uintptr_t sh0 = (uintptr_t)__start_emu_shared, sh1 = (uintptr_t)__stop_emu_shared;
        if (sh0 && sh1 > sh0) memset(__start_emu_shared, 0xff, sh1 - sh0);
        for (int i = 0; i < n; i++) start_thread(&b, i);
        run_block(&b);
    }
    t_blk = NULL;
    exit_device();
}

} // namespace emu

// ----------------------------------------------------------------------------
// cuBLAS

struct EmuCublas {
    cudaStream_t stream;
    cublasMath_t math;
};

extern "C" cublasStatus_t cublasCreate(cublasHandle_t *handle) {
    install_handler();
    *handle = new EmuCublas{NULL, CUBLAS_DEFAULT_MATH};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasDestroy(cublasHandle_t handle) {
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" const char *cublasGetStatusName(cublasStatus_t status) {
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
extern "C" const char *cublasGetStatusString(cublasStatus_t status) { return cublasGetStatusName(status); }

static size_t type_bytes(cudaDataType t) { return t == CUDA_R_32F ? 4 : t == CUDA_R_64F ? 8 : 2; }

static float load_elem(const void *p, cudaDataType t, size_t i) {
    if (t == CUDA_R_32F) return ((const float *)p)[i];
    return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
}
static void store_elem(void *p, cudaDataType t, size_t i, float v) {
    if (t == CUDA_R_32F)
        ((float *)p)[i] = v;
    else
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
}

// The type combinations cuBLAS supports with CUBLAS_COMPUTE_32F that this
// project can use: fp32 everywhere, or bf16 inputs with a bf16 or fp32 output.
static int types_ok(cudaDataType at, cudaDataType bt, cudaDataType ct, cublasComputeType_t compute) {
    if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_TF32) return 0;
    if (at != bt) return 0;
    if (at == CUDA_R_32F) return ct == CUDA_R_32F;
    if (at == CUDA_R_16BF) return ct == CUDA_R_16BF || ct == CUDA_R_32F;
    return 0;
}

// Bytes spanned by a column-major rows x cols matrix with leading dimension ld.
static size_t span_bytes(int rows, int cols, int ld, cudaDataType t) {
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * ld + rows) * type_bytes(t);
}

// One GEMM, D = alpha op(A) op(B) + beta C, column-major (cuBLAS's
// definition; cuBLAS itself has D = C, cuBLASLt may not).
static cublasStatus_t gemm_cd(const char *who, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                              float alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                              int ldb, float beta, const void *C, cudaDataType ct, int ldc, void *D, cudaDataType dt,
                              int ldd) {
    int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
    int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
    if (m < 0 || n < 0 || k < 0 || lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
        ldc < (m > 1 ? m : 1) || ldd < (m > 1 ? m : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    char what[128];
    snprintf(what, sizeof what, "%s: matrix A", who);
    if (k > 0) need_device(A, span_bytes(a_rows, a_cols, lda, at), what);
    snprintf(what, sizeof what, "%s: matrix B", who);
    if (k > 0) need_device(B, span_bytes(b_rows, b_cols, ldb, bt), what);
    snprintf(what, sizeof what, "%s: matrix C", who);
    if (beta != 0.0f) need_device(C, span_bytes(m, n, ldc, ct), what);
    snprintf(what, sizeof what, "%s: matrix D", who);
    need_device(D, span_bytes(m, n, ldd, dt), what);
    enter_device();
    std::vector<float> a((size_t)m * k), b((size_t)n * k); // a[i][p] = op(A)(i,p), b[j][p] = op(B)(p,j)
    for (int i = 0; i < m; i++)
        for (int p = 0; p < k; p++)
            a[(size_t)i * k + p] = load_elem(A, at, ta == CUBLAS_OP_N ? i + (size_t)p * lda : p + (size_t)i * lda);
    for (int j = 0; j < n; j++)
        for (int p = 0; p < k; p++)
            b[(size_t)j * k + p] = load_elem(B, bt, tb == CUBLAS_OP_N ? p + (size_t)j * ldb : j + (size_t)p * ldb);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double acc = 0.0;
            const float *ar = &a[(size_t)i * k], *br = &b[(size_t)j * k];
            for (int p = 0; p < k; p++) acc += (double)ar[p] * br[p];
            // beta == 0: C is not read (it may hold NaN), as cuBLAS documents.
            double c = alpha * acc + (beta != 0.0f ? (double)beta * load_elem(C, ct, i + (size_t)j * ldc) : 0.0);
            store_elem(D, dt, i + (size_t)j * ldd, (float)c);
        }
    exit_device();
    return CUBLAS_STATUS_SUCCESS;
}

static cublasStatus_t gemm_one(const char *who, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                               float alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                               int ldb, float beta, void *C, cudaDataType ct, int ldc) {
    return gemm_cd(who, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, C, ct, ldc);
}

extern "C" cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                       int m, int n, int k, const void *alpha, const void *A, cudaDataType Atype,
                                       int lda, const void *B, cudaDataType Btype, int ldb, const void *beta, void *C,
                                       cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                                       cublasGemmAlgo_t algo) {
    (void)algo;
    prof_count(PROF_GEMM);
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!types_ok(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
    need_host(alpha, "cublasGemmEx alpha (host pointer mode)");
    need_host(beta, "cublasGemmEx beta (host pointer mode)");
    return gemm_one("cublasGemmEx", transa, transb, m, n, k, *(const float *)alpha, A, Atype, lda, B, Btype, ldb,
                    *(const float *)beta, C, Ctype, ldc);
}

extern "C" cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                                     cublasOperation_t transb, int m, int n, int k, const void *alpha,
                                                     const void *A, cudaDataType Atype, int lda, long long int strideA,
                                                     const void *B, cudaDataType Btype, int ldb, long long int strideB,
                                                     const void *beta, void *C, cudaDataType Ctype, int ldc,
                                                     long long int strideC, int batchCount,
                                                     cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    (void)algo;
    prof_count(PROF_GEMM_STRIDED);
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!types_ok(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (batchCount < 0) return CUBLAS_STATUS_INVALID_VALUE;
    need_host(alpha, "cublasGemmStridedBatchedEx alpha (host pointer mode)");
    need_host(beta, "cublasGemmStridedBatchedEx beta (host pointer mode)");
    for (int i = 0; i < batchCount; i++) {
        cublasStatus_t st = gemm_one("cublasGemmStridedBatchedEx", transa, transb, m, n, k, *(const float *)alpha,
                                     (const char *)A + i * strideA * (long long)type_bytes(Atype), Atype, lda,
                                     (const char *)B + i * strideB * (long long)type_bytes(Btype), Btype, ldb,
                                     *(const float *)beta, (char *)C + i * strideC * (long long)type_bytes(Ctype),
                                     Ctype, ldc);
        if (st != CUBLAS_STATUS_SUCCESS) return st;
    }
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasGemmGroupedBatchedEx(
    cublasHandle_t handle, const cublasOperation_t transa_array[], const cublasOperation_t transb_array[],
    const int m_array[], const int n_array[], const int k_array[], const void *alpha_array, const void *const Aarray[],
    cudaDataType_t Atype, const int lda_array[], const void *const Barray[], cudaDataType_t Btype,
    const int ldb_array[], const void *beta_array, void *const Carray[], cudaDataType_t Ctype, const int ldc_array[],
    int group_count, const int group_size[], cublasComputeType_t computeType) {
    prof_count(PROF_GEMM_GROUPED);
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!types_ok(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
    // The per-group parameters are host arrays; the matrix pointer arrays are device arrays.
    const char *who = "cublasGemmGroupedBatchedEx";
    need_host(transa_array, "cublasGemmGroupedBatchedEx transa_array");
    need_host(m_array, "cublasGemmGroupedBatchedEx m_array");
    need_host(alpha_array, "cublasGemmGroupedBatchedEx alpha_array (host pointer mode)");
    need_host(group_size, "cublasGemmGroupedBatchedEx group_size");
    int total = 0;
    for (int g = 0; g < group_count; g++) {
        if (group_size[g] < 0) return CUBLAS_STATUS_INVALID_VALUE;
        total += group_size[g];
    }
    need_device(Aarray, sizeof(void *) * total, "cublasGemmGroupedBatchedEx Aarray");
    need_device(Barray, sizeof(void *) * total, "cublasGemmGroupedBatchedEx Barray");
    need_device(Carray, sizeof(void *) * total, "cublasGemmGroupedBatchedEx Carray");
    std::vector<const void *> pa(total), pb(total);
    std::vector<void *> pc(total);
    enter_device();
    for (int i = 0; i < total; i++) {
        pa[i] = Aarray[i];
        pb[i] = Barray[i];
        pc[i] = Carray[i];
    }
    exit_device();
    const float *alphas = (const float *)alpha_array, *betas = (const float *)beta_array;
    for (int g = 0, idx = 0; g < group_count; g++)
        for (int i = 0; i < group_size[g]; i++, idx++) {
            cublasStatus_t st = gemm_one(who, transa_array[g], transb_array[g], m_array[g], n_array[g], k_array[g],
                                         alphas[g], pa[idx], Atype, lda_array[g], pb[idx], Btype, ldb_array[g],
                                         betas[g], pc[idx], Ctype, ldc_array[g]);
            if (st != CUBLAS_STATUS_SUCCESS) return st;
        }
    return CUBLAS_STATUS_SUCCESS;
}

// ----------------------------------------------------------------------------
// cuBLASLt

struct EmuLt {
    int dummy;
};
struct EmuLtDesc {
    cublasComputeType_t compute;
    cudaDataType_t scale;
    cublasOperation_t ta, tb;
    int epilogue;
};
struct EmuLtLayout {
    cudaDataType type;
    uint64_t rows, cols;
    int64_t ld;
};
struct EmuLtPref {
    uint64_t max_workspace;
    uint32_t align[4]; // minimum alignment of A, B, C, D the algorithm may assume
};

extern "C" cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    install_handler();
    *h = new EmuLt{0};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute,
                                                   cudaDataType_t scale) {
    *d = new EmuLtDesc{compute, scale, CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                                         const void *buf, size_t size) {
    // Sizes as cuBLASLt checks them: the transposes are int32 (cublasOperation_t), the epilogue uint32.
    if (!d || !buf || size != 4) return CUBLAS_STATUS_INVALID_VALUE;
    int v;
    memcpy(&v, buf, 4);
    if (attr == CUBLASLT_MATMUL_DESC_TRANSA) d->ta = (cublasOperation_t)v;
    else if (attr == CUBLASLT_MATMUL_DESC_TRANSB) d->tb = (cublasOperation_t)v;
    else if (attr == CUBLASLT_MATMUL_DESC_EPILOGUE) d->epilogue = v;
    else return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType type, uint64_t rows,
                                                     uint64_t cols, int64_t ld) {
    *l = new EmuLtLayout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = new EmuLtPref{0, {256, 256, 256, 256}};
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                               cublasLtMatmulPreferenceAttributes_t attr,
                                                               const void *buf, size_t size) {
    if (!p || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES && size == 8) {
        memcpy(&p->max_workspace, buf, 8);
        return CUBLAS_STATUS_SUCCESS;
    }
    if (attr >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES && attr <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES &&
        size == 4) {
        memcpy(&p->align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, 4);
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_INVALID_VALUE;
}

// The problem the descriptors describe, or an error: m, n, k from D and op(A),
// everything else consistent with them, types supported.
static cublasStatus_t lt_shape(cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                               cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D, int *m, int *n, int *k) {
    if (!d || !A || !B || !C || !D) return CUBLAS_STATUS_INVALID_VALUE;
    if (d->epilogue != CUBLASLT_EPILOGUE_DEFAULT || d->scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    *m = (int)D->rows;
    *n = (int)D->cols;
    *k = (int)(d->ta == CUBLAS_OP_N ? A->cols : A->rows);
    uint64_t a_rows = d->ta == CUBLAS_OP_N ? *m : *k, b_rows = d->tb == CUBLAS_OP_N ? *k : *n,
             b_cols = d->tb == CUBLAS_OP_N ? *n : *k;
    if (A->rows != a_rows || B->rows != b_rows || B->cols != b_cols || C->rows != D->rows || C->cols != D->cols)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (C->type != D->type || !types_ok(A->type, B->type, D->type, d->compute)) return CUBLAS_STATUS_NOT_SUPPORTED;
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                                         cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                                                         cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D,
                                                         cublasLtMatmulPreference_t pref, int requested,
                                                         cublasLtMatmulHeuristicResult_t results[], int *returned) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!pref || requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    int m, n, k;
    cublasStatus_t st = lt_shape(d, A, B, C, D, &m, &n, &k);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    memset(&results[0], 0, sizeof results[0]);
    results[0].algo.data[0] = 0x454d55; // "EMU": the only algorithm, for the preference's alignments
    for (int i = 0; i < 4; i++) results[0].algo.data[1 + i] = pref->align[i];
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *A,
                                         cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                                         const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                                         cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo,
                                         void *workspace, size_t workspace_bytes, cudaStream_t stream) {
    (void)stream;
    prof_count(PROF_LT_MATMUL);
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    int m, n, k;
    cublasStatus_t st = lt_shape(d, Adesc, Bdesc, Cdesc, Ddesc, &m, &n, &k);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    if (algo && algo->data[0] != 0x454d55) return CUBLAS_STATUS_INVALID_VALUE; // not from the heuristic
    const void *ptrs[4] = {A, B, C, D};
    for (int i = 0; algo && i < 4; i++)
        if ((uintptr_t)ptrs[i] % algo->data[1 + i]) {
            fprintf(stderr, "emulator: cublasLtMatmul: matrix %c at %p is not aligned to the %u bytes its algorithm "
                    "was chosen for (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_%c_BYTES)\n", "ABCD"[i], ptrs[i],
                    (unsigned)algo->data[1 + i], "ABCD"[i]);
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
    if (workspace_bytes) need_device(workspace, workspace_bytes, "cublasLtMatmul workspace");
    // In place only with the same layout.
    if (C == D && (Cdesc->ld != Ddesc->ld || Cdesc->type != Ddesc->type)) return CUBLAS_STATUS_INVALID_VALUE;
    need_host(alpha, "cublasLtMatmul alpha (host pointer mode)");
    need_host(beta, "cublasLtMatmul beta (host pointer mode)");
    return gemm_cd("cublasLtMatmul", d->ta, d->tb, m, n, k, *(const float *)alpha, A, Adesc->type, (int)Adesc->ld, B,
                   Bdesc->type, (int)Bdesc->ld, *(const float *)beta, C, Cdesc->type, (int)Cdesc->ld, D, Ddesc->type,
                   (int)Ddesc->ld);
}

// ----------------------------------------------------------------------------
// NCCL
//
// One rank: collectives copy. Several ranks are several processes (each its
// own emulated GPU); a communicator is a POSIX shared-memory segment: a
// header (a barrier, the split table, the point-to-point table) and one
// staging slot per rank. A collective puts each rank's data in its slot,
// waits at the barrier, and every rank computes the result from all slots in
// rank order -- the same bits on every rank, like NCCL's deterministic
// algorithms with a fixed topology. A rank that does not arrive within
// EMU_NCCL_TIMEOUT seconds (default 300) stops every waiting rank.

static const uint32_t SHM_MAGIC = 0x4e43434cu; // "NCCL"
static const int SHM_MAX_RANKS = 64, SHM_MAX_MSGS = 16;

// Point-to-point traffic from one rank to another: a mailbox holding one
// group's messages at a time (the region of the sender's slot reserved for
// that receiver), with counters of batches posted and consumed.
struct ShmMailbox {
    int posted, consumed; // atomics
    int n;
    size_t bytes[SHM_MAX_MSGS];
};

struct ShmHeader {
    uint32_t magic;    // written last by the creator
    int nranks;
    size_t slot_bytes;
    int count, generation; // the barrier (atomics)
    int aborted;           // set by a rank that stops: the others stop too instead of waiting
    int split_color[SHM_MAX_RANKS], split_key[SHM_MAX_RANKS];
    ShmMailbox box[SHM_MAX_RANKS][SHM_MAX_RANKS]; // [sender][receiver]
};

struct EmuNcclComm {
    int nranks, rank;
    char name[96];       // the shared-memory segment (several ranks)
    ShmHeader *shm;      // NULL with one rank
    size_t map_bytes;
    char *slots;         // nranks * slot_bytes after the header
    int n_splits;        // how many splits of this communicator so far (the same on every rank)
};

struct PendingP2P {
    ncclComm_t comm;
    int peer;
    const void *send;
    void *recv;
    size_t bytes;
};
static thread_local int t_group_depth;
static thread_local std::vector<PendingP2P> t_sends, t_recvs;
static thread_local char t_nccl_error[256];

static size_t nccl_type_bytes(ncclDataType_t t) {
    switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    }
    return 0;
}

static ncclResult_t nccl_error(ncclResult_t r, const char *msg) {
    snprintf(t_nccl_error, sizeof t_nccl_error, "%s", msg);
    return r;
}

static double nccl_timeout_s() {
    const char *t = getenv("EMU_NCCL_TIMEOUT");
    return t ? atof(t) : 300.0;
}

static double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// The communicators of several ranks this process has attached.
static std::mutex g_comms_mutex;
static std::vector<EmuNcclComm *> g_comms;

static void nccl_mark_aborted() {
    for (EmuNcclComm *c : g_comms) // (no lock: the process is about to stop)
        if (c->shm) __atomic_store_n(&c->shm->aborted, 1, __ATOMIC_RELEASE);
}

static void check_aborted(EmuNcclComm *c, const char *what) {
    if (__atomic_load_n(&c->shm->aborted, __ATOMIC_ACQUIRE))
        emu_fail("%s: rank %d of %d: another rank of this communicator stopped", what, c->rank, c->nranks);
}

// Sense-reversing barrier over the processes of a communicator.
static void shm_barrier(EmuNcclComm *c, const char *what) {
    ShmHeader *h = c->shm;
    int gen = __atomic_load_n(&h->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&h->count, 1, __ATOMIC_ACQ_REL) == h->nranks) {
        __atomic_store_n(&h->count, 0, __ATOMIC_RELAXED);
        __atomic_add_fetch(&h->generation, 1, __ATOMIC_RELEASE);
        return;
    }
    double t0 = now_s(), limit = nccl_timeout_s();
    for (long spin = 0; __atomic_load_n(&h->generation, __ATOMIC_ACQUIRE) == gen; spin++) {
        if (spin < 1000) continue;
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
        if ((spin & 1023) == 0) check_aborted(c, what);
        if ((spin & 1023) == 0 && now_s() - t0 > limit)
            emu_fail("%s: rank %d of %d waited %.0f s for the other ranks (%s); a rank failed or called another "
                     "collective", what, c->rank, c->nranks, limit, c->name);
    }
}

// Waits until *counter reaches want (another process advances it).
static void wait_until(int *counter, int want, EmuNcclComm *c, const char *what) {
    double t0 = now_s(), limit = nccl_timeout_s();
    for (long spin = 0; __atomic_load_n(counter, __ATOMIC_ACQUIRE) < want; spin++) {
        if (spin < 1000) continue;
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
        if ((spin & 1023) == 0) check_aborted(c, what);
        if ((spin & 1023) == 0 && now_s() - t0 > limit)
            emu_fail("%s: rank %d of %d waited %.0f s for its peer (%s)", what, c->rank, c->nranks, limit, c->name);
    }
}

static size_t shm_slot_bytes() {
    const char *m = getenv("EMU_NCCL_SLOT_MB");
    return (size_t)(m ? atof(m) : 16.0) * 1048576;
}

// Creates (rank 0) or opens the segment of a communicator of n ranks.
static ncclResult_t shm_attach(EmuNcclComm *c, const char *name, int n, int rank) {
    if (n > SHM_MAX_RANKS) return nccl_error(ncclInvalidArgument, "the emulator's NCCL has at most 64 ranks");
    snprintf(c->name, sizeof c->name, "%s", name);
    c->nranks = n;
    c->rank = rank;
    size_t slot = shm_slot_bytes();
    c->map_bytes = round_up(sizeof(ShmHeader), 4096) + (size_t)n * slot;
    int fd = -1;
    if (rank == 0) {
        fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0 || ftruncate(fd, (off_t)c->map_bytes) != 0)
            return nccl_error(ncclSystemError, "cannot create the emulator's shared-memory communicator");
    } else {
        double t0 = now_s();
        while ((fd = shm_open(name, O_RDWR, 0600)) < 0) {
            if (now_s() - t0 > nccl_timeout_s())
                return nccl_error(ncclSystemError, "timed out waiting for rank 0's shared-memory communicator");
            usleep(1000);
        }
    }
    void *m = MAP_FAILED;
    for (double t0 = now_s(); m == MAP_FAILED; usleep(1000)) {
        struct stat st;
        if (fstat(fd, &st) == 0 && (size_t)st.st_size >= c->map_bytes)
            m = mmap(NULL, c->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED && now_s() - t0 > nccl_timeout_s()) {
            close(fd);
            return nccl_error(ncclSystemError, "cannot map the emulator's shared-memory communicator");
        }
    }
    close(fd);
    c->shm = (ShmHeader *)m;
    c->slots = (char *)m + round_up(sizeof(ShmHeader), 4096);
    if (rank == 0) {
        c->shm->nranks = n;
        c->shm->slot_bytes = slot;
        __atomic_store_n(&c->shm->magic, SHM_MAGIC, __ATOMIC_RELEASE);
    } else {
        for (double t0 = now_s(); __atomic_load_n(&c->shm->magic, __ATOMIC_ACQUIRE) != SHM_MAGIC; usleep(1000))
            if (now_s() - t0 > nccl_timeout_s())
                return nccl_error(ncclSystemError, "rank 0 never initialised the shared-memory communicator");
        if (c->shm->nranks != n || c->shm->slot_bytes != slot)
            return nccl_error(ncclInvalidUsage, "ranks disagree on the communicator size or EMU_NCCL_SLOT_MB");
    }
    {
        std::lock_guard<std::mutex> lock(g_comms_mutex);
        g_comms.push_back(c);
    }
    // Everyone has it open: its name can go (nothing is left behind if a rank dies later).
    shm_barrier(c, "ncclCommInitRank");
    if (rank == 0) shm_unlink(name);
    return ncclSuccess;
}

static char *slot_of(EmuNcclComm *c, int r) { return c->slots + (size_t)r * c->shm->slot_bytes; }

extern "C" ncclResult_t ncclGetVersion(int *version) {
    *version = NCCL_VERSION_CODE;
    return ncclSuccess;
}
extern "C" ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId) {
    static int counter;
    memset(uniqueId, 0, sizeof *uniqueId);
    snprintf(uniqueId->internal, sizeof uniqueId->internal, "/moe-emu-nccl-%d-%d-%lx", (int)getpid(), counter++,
             (unsigned long)(now_s() * 1e6));
    return ncclSuccess;
}
extern "C" ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank) {
    if (nranks < 1 || rank < 0 || rank >= nranks) return nccl_error(ncclInvalidArgument, "bad nranks or rank");
    EmuNcclComm *c = new EmuNcclComm();
    c->nranks = nranks;
    c->rank = rank;
    if (nranks > 1) {
        char name[96];
        memcpy(name, commId.internal, sizeof name - 1);
        name[sizeof name - 1] = 0;
        ncclResult_t r = shm_attach(c, name, nranks, rank);
        if (r != ncclSuccess) {
            delete c;
            return r;
        }
    }
    *comm = c;
    return ncclSuccess;
}

// Collective over comm: ranks of the same color form a communicator, ordered
// by (key, rank); its first member creates the segment.
extern "C" ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm, ncclConfig_t *config) {
    (void)config;
    if (!comm) return nccl_error(ncclInvalidArgument, "ncclCommSplit of a NULL communicator");
    if (comm->nranks == 1) {
        *newcomm = color == NCCL_SPLIT_NOCOLOR ? NULL : new EmuNcclComm{1, 0, "", NULL, 0, NULL, 0};
        return ncclSuccess;
    }
    ShmHeader *h = comm->shm;
    h->split_color[comm->rank] = color;
    h->split_key[comm->rank] = key;
    shm_barrier(comm, "ncclCommSplit");
    int n = 0, me = 0;
    for (int r = 0; r < comm->nranks; r++) {
        if (h->split_color[r] != color) continue;
        if (h->split_key[r] < key || (h->split_key[r] == key && r < comm->rank)) me++;
        n++;
    }
    int split = comm->n_splits++;
    shm_barrier(comm, "ncclCommSplit"); // the table is read by all before the next split writes it
    if (color == NCCL_SPLIT_NOCOLOR) {
        *newcomm = NULL;
        return ncclSuccess;
    }
    EmuNcclComm *c = new EmuNcclComm();
    c->nranks = n;
    c->rank = me;
    if (n > 1) {
        char name[96];
        snprintf(name, sizeof name, "%.60s-s%d-c%d", comm->name, split, color);
        ncclResult_t r = shm_attach(c, name, n, me);
        if (r != ncclSuccess) {
            delete c;
            return r;
        }
    }
    *newcomm = c;
    return ncclSuccess;
}

extern "C" ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (comm && comm->shm) {
        std::lock_guard<std::mutex> lock(g_comms_mutex);
        g_comms.erase(std::remove(g_comms.begin(), g_comms.end(), comm), g_comms.end());
        munmap(comm->shm, comm->map_bytes);
    }
    delete comm;
    return ncclSuccess;
}
extern "C" const char *ncclGetErrorString(ncclResult_t result) {
    switch (result) {
    case ncclSuccess: return "no error";
    case ncclSystemError: return "unhandled system error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    default: return "NCCL error (emulator)";
    }
}
extern "C" const char *ncclGetLastError(ncclComm_t comm) {
    (void)comm;
    return t_nccl_error;
}

// acc[i] = acc[i] op x[i] for n elements of type T.
template <class T> static void reduce_into(T *acc, const T *x, size_t n, ncclRedOp_t op) {
    for (size_t i = 0; i < n; i++) {
        switch (op) {
        case ncclSum: case ncclAvg: acc[i] = acc[i] + x[i]; break;
        case ncclProd: acc[i] = acc[i] * x[i]; break;
        case ncclMax: acc[i] = x[i] > acc[i] ? x[i] : acc[i]; break;
        case ncclMin: acc[i] = x[i] < acc[i] ? x[i] : acc[i]; break;
        }
    }
}

static void reduce_typed(void *acc, const void *x, size_t n, ncclDataType_t t, ncclRedOp_t op) {
    switch (t) {
    case ncclInt8: reduce_into((int8_t *)acc, (const int8_t *)x, n, op); break;
    case ncclUint8: reduce_into((uint8_t *)acc, (const uint8_t *)x, n, op); break;
    case ncclInt32: reduce_into((int32_t *)acc, (const int32_t *)x, n, op); break;
    case ncclUint32: reduce_into((uint32_t *)acc, (const uint32_t *)x, n, op); break;
    case ncclInt64: reduce_into((int64_t *)acc, (const int64_t *)x, n, op); break;
    case ncclUint64: reduce_into((uint64_t *)acc, (const uint64_t *)x, n, op); break;
    case ncclFloat32: reduce_into((float *)acc, (const float *)x, n, op); break;
    case ncclFloat64: reduce_into((double *)acc, (const double *)x, n, op); break;
    default: emu_fail("the emulator's NCCL does not reduce 16-bit types");
    }
}

extern "C" ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                                      ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    (void)stream;
    prof_count(PROF_NCCL_ALLREDUCE);
    if (!comm) return nccl_error(ncclInvalidArgument, "NULL communicator");
    size_t es = nccl_type_bytes(datatype), bytes = count * es;
    need_device(sendbuff, bytes, "ncclAllReduce send buffer");
    need_device(recvbuff, bytes, "ncclAllReduce receive buffer");
    if (op == ncclAvg) return nccl_error(ncclInvalidArgument, "ncclAvg is not emulated");
    enter_device();
    if (comm->nranks == 1) {
        if (sendbuff != recvbuff) memmove(recvbuff, sendbuff, bytes);
    } else {
        size_t chunk = comm->shm->slot_bytes / es * es;
        std::vector<char> acc(chunk);
        for (size_t off = 0; off < bytes; off += chunk) {
            size_t k = bytes - off < chunk ? bytes - off : chunk;
            memcpy(slot_of(comm, comm->rank), (const char *)sendbuff + off, k);
            shm_barrier(comm, "ncclAllReduce");
            memcpy(acc.data(), slot_of(comm, 0), k); // rank order: the same bits on every rank
            for (int r = 1; r < comm->nranks; r++) reduce_typed(acc.data(), slot_of(comm, r), k / es, datatype, op);
            shm_barrier(comm, "ncclAllReduce");
            memcpy((char *)recvbuff + off, acc.data(), k);
        }
    }
    exit_device();
    return ncclSuccess;
}

extern "C" ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                                      int root, ncclComm_t comm, cudaStream_t stream) {
    (void)stream;
    if (!comm) return nccl_error(ncclInvalidArgument, "NULL communicator");
    prof_count(PROF_NCCL_BCAST);
    if (root < 0 || root >= comm->nranks) return nccl_error(ncclInvalidArgument, "ncclBroadcast root outside the communicator");
    size_t bytes = count * nccl_type_bytes(datatype);
    if (comm->rank == root) need_device(sendbuff, bytes, "ncclBroadcast send buffer");
    need_device(recvbuff, bytes, "ncclBroadcast receive buffer");
    enter_device();
    if (comm->nranks == 1) {
        if (sendbuff != recvbuff) memmove(recvbuff, sendbuff, bytes);
    } else {
        size_t chunk = comm->shm->slot_bytes;
        for (size_t off = 0; off < bytes; off += chunk) {
            size_t k = bytes - off < chunk ? bytes - off : chunk;
            if (comm->rank == root) memcpy(slot_of(comm, root), (const char *)sendbuff + off, k);
            shm_barrier(comm, "ncclBroadcast");
            if (comm->rank != root || sendbuff != recvbuff) memcpy((char *)recvbuff + off, slot_of(comm, root), k);
            shm_barrier(comm, "ncclBroadcast");
        }
    }
    exit_device();
    return ncclSuccess;
}

static ncclResult_t p2p(const char *who, const void *send, void *recv, size_t count, ncclDataType_t t, int peer,
                        ncclComm_t comm) {
    if (!comm) return nccl_error(ncclInvalidArgument, "NULL communicator");
    if (peer < 0 || peer >= comm->nranks) return nccl_error(ncclInvalidArgument, "peer outside the communicator");
    size_t bytes = count * nccl_type_bytes(t);
    need_device(send ? send : recv, bytes, who);
    if (t_group_depth == 0) emu_fail("%s outside ncclGroupStart/End: the emulator pairs sends and receives there", who);
    (send ? t_sends : t_recvs).push_back(PendingP2P{comm, peer, send, recv, bytes});
    return ncclSuccess;
}

extern "C" ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer,
                                 ncclComm_t comm, cudaStream_t stream) {
    (void)stream;
    return p2p("ncclSend", sendbuff, NULL, count, datatype, peer, comm);
}
extern "C" ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                                 cudaStream_t stream) {
    (void)stream;
    return p2p("ncclRecv", NULL, recvbuff, count, datatype, peer, comm);
}

extern "C" ncclResult_t ncclGroupStart(void) {
    t_group_depth++;
    return ncclSuccess;
}

// The point-to-point operations of one communicator in a group: every rank
// posts its sends in its slot, then takes, for its i-th receive from peer p,
// p's i-th send to it.
static void p2p_exchange(ncclComm_t comm) {
    std::vector<PendingP2P> sends, recvs;
    for (auto &x : t_sends)
        if (x.comm == comm) sends.push_back(x);
    for (auto &x : t_recvs)
        if (x.comm == comm) recvs.push_back(x);
    enter_device();
    if (comm->nranks == 1) {
        if (sends.size() != recvs.size())
            emu_fail("ncclGroupEnd: %zu sends to self but %zu receives: NCCL would wait forever", sends.size(),
                     recvs.size());
        for (size_t i = 0; i < sends.size(); i++) {
            if (sends[i].bytes != recvs[i].bytes)
                emu_fail("ncclGroupEnd: send %zu has %zu bytes, its receive %zu", i, sends[i].bytes, recvs[i].bytes);
            memmove(recvs[i].recv, sends[i].send, sends[i].bytes);
        }
        exit_device();
        return;
    }
    // Only the ranks that exchange something take part (as with NCCL): no
    // barrier over the communicator. First post, per receiver, this group's
    // messages to it (once it has taken the previous group's); then take,
    // per sender, its batch to this rank.
    ShmHeader *h = comm->shm;
    int P = comm->nranks, me = comm->rank;
    size_t region = h->slot_bytes / (size_t)P;
    for (int q = 0; q < P; q++) {
        ShmMailbox *b = &h->box[me][q];
        int n = 0;
        size_t off = 0;
        for (auto &x : sends) n += x.peer == q;
        if (n == 0) continue;
        if (n > SHM_MAX_MSGS) emu_fail("ncclGroupEnd: more than %d sends to one peer in a group", SHM_MAX_MSGS);
        wait_until(&b->consumed, __atomic_load_n(&b->posted, __ATOMIC_ACQUIRE), comm, "ncclSend");
        char *dst = slot_of(comm, me) + (size_t)q * region;
        b->n = 0;
        for (auto &x : sends) {
            if (x.peer != q) continue;
            if (off + x.bytes > region)
                emu_fail("ncclGroupEnd: %zu bytes from rank %d to rank %d in one group exceed the emulator's %zu "
                         "(EMU_NCCL_SLOT_MB / ranks)", off + x.bytes, me, q, region);
            memcpy(dst + off, x.send, x.bytes);
            b->bytes[b->n++] = x.bytes;
            off += x.bytes;
        }
        __atomic_add_fetch(&b->posted, 1, __ATOMIC_RELEASE);
    }
    for (int p = 0; p < P; p++) {
        ShmMailbox *b = &h->box[p][me];
        int n = 0;
        for (auto &x : recvs) n += x.peer == p;
        if (n == 0) continue;
        wait_until(&b->posted, __atomic_load_n(&b->consumed, __ATOMIC_ACQUIRE) + 1, comm, "ncclRecv");
        if (b->n != n)
            emu_fail("ncclGroupEnd: rank %d posts %d receives from rank %d, which sent %d messages", me, n, p, b->n);
        const char *src = slot_of(comm, p) + (size_t)me * region;
        size_t off = 0;
        int i = 0;
        for (auto &x : recvs) {
            if (x.peer != p) continue;
            if (b->bytes[i] != x.bytes)
                emu_fail("ncclGroupEnd: rank %d receives %zu bytes from rank %d, which sent %zu", me, x.bytes, p,
                         b->bytes[i]);
            memcpy(x.recv, src + off, x.bytes);
            off += x.bytes;
            i++;
        }
        __atomic_add_fetch(&b->consumed, 1, __ATOMIC_RELEASE);
    }
    exit_device();
}

extern "C" ncclResult_t ncclGroupEnd(void) {
    if (t_group_depth == 0) return nccl_error(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--t_group_depth > 0) return ncclSuccess;
    std::vector<ncclComm_t> comms; // in order of first use
    for (auto *v : {&t_sends, &t_recvs})
        for (auto &x : *v)
            if (std::find(comms.begin(), comms.end(), x.comm) == comms.end()) comms.push_back(x.comm);
    for (ncclComm_t c : comms) p2p_exchange(c);
    if (!comms.empty()) prof_count(PROF_NCCL_GROUP);
    t_sends.clear();
    t_recvs.clear();
    return ncclSuccess;
}
