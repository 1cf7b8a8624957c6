// CUDA emulation on the CPU: the race build's access checker (tests/emu;
// docs/gpu.md, "Races and exact bounds"). The emulator runs a block's threads
// one at a time, so an unsynchronised access that would race on a GPU gives
// the same bits here in every order. This file sees such accesses instead:
// the CUDA code is compiled with -fsanitize=thread, whose instrumentation
// calls __tsan_read4(p), __tsan_write8(p), __tsan_atomic32_fetch_add(p, ...)
// ... before every memory access, and the functions below (not
// ThreadSanitizer's runtime, which is not linked) check each access against
// what earlier accesses to the same bytes the GPU's rules order before it:
//
//   - blocks of one launch are not ordered with each other; launches are
//     ordered (one stream, in order);
//   - within a block, a __syncthreads orders what the threads that reach it
//     did before it with what any thread does after it; a thread that has
//     exited does not take part, so its accesses stay unordered with the
//     later ones, unless a __syncwarp had passed them to a lane that did;
//   - within a warp, a __syncwarp(mask) orders the accesses of the lanes of
//     its mask before it with theirs after it; shuffles order nothing
//     (PTX guarantees memory ordering for bar.warp.sync, not for shfl.sync);
//   - atomics do not race with atomics.
// The accesses the emulator's own code makes for a thread (emu_mma.cc: a
// cp.async's source and destination, an ldmatrix's rows) come through
// race_access and are checked as that thread's.
// Two accesses to a byte race when at least one writes, they are not both
// atomic and neither is ordered before the other. The first race stops the
// run, naming both threads. Every access to device memory is also checked
// against the exact size of its allocation: the rounding slack up to the
// next 256 bytes, which the canaries of emu_memory.cc see only when written,
// is out of bounds here for reads too.
//
// What is tracked: device memory and shared memory (static and dynamic), per
// byte, a summary of the latest writes and of the latest reads; not the
// threads' stacks or host memory. Per byte 32 bytes of shadow, made on first
// access. Ordering is kept per thread: its barrier phase (__syncthreads
// passed) and, per lane of its warp, the latest __syncwarp of that lane it
// knows of (a vector clock over the warp's 32 lanes). A summary of several
// lanes' accesses keeps only the latest warp event among them, which can only
// make the check stricter; accesses of several warps in one phase are
// assumed ordered by the next __syncthreads.
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <vector>

#include "cuda_runtime.h"
#include "emu_internal.h"

using namespace emu;

namespace {

// A summary of the latest accesses of one kind (writes, or reads) to a byte.
struct Acc {
    uint32_t serial; // the block execution that made them (0: none); see g_serial
    uint16_t phase;  // their barrier phase
    uint8_t warp;    // their warp, unless ACC_MULTI_WARP
    uint8_t flags;
    uint32_t lanes;  // their lanes in that warp
    uint32_t event;  // the warp's event count when the latest of them was made
};
enum { ACC_PLAIN = 1, ACC_MULTI_WARP = 2, ACC_MULTI_BLOCK = 4 }; // PLAIN: not all atomic

struct Cell {
    Acc w, r;
};
static_assert(sizeof(Cell) == 32, "the shadow is 32 bytes per byte (docs/gpu.md)");

// One thread of the block being run.
struct RThread {
    uint16_t phase;     // __syncthreads it has passed (frozen when it exits)
    uint8_t exited;
    uint8_t published;  // exited and the next __syncthreads has completed: pub is set
    uint32_t pub;       // its latest warp event a lane that reached that __syncthreads knew of
    uint32_t know[32];  // know[l]: the latest warp event of lane l of its warp it knows of
};

enum { REGION_DEVICE, REGION_STATIC_SMEM, REGION_DYN_SMEM };

struct Region {
    int kind;
    uintptr_t base; // the address of cells[0]
    Cell *cells;
    DevRegion dev;  // REGION_DEVICE
};

bool g_instrumented;          // some code was compiled with -fsanitize=thread
uint32_t g_serial;            // block executions so far, over all launches (one kernel runs at a time)
uint32_t g_launch_first;      // the serial of the current launch's first block
const char *g_kernel;
dim3 g_grid, g_block;
int g_nthreads;
std::vector<RThread> g_thr;                 // (nthreads)
std::vector<uint32_t> g_warp_event;         // (warps) __syncwarp events completed in each warp
std::vector<unsigned int> g_block_of;       // linear block index of each serial of this launch
uintptr_t g_dyn;                            // dynamic shared memory
size_t g_dyn_bytes;
Cell *g_dyn_cells;
size_t g_dyn_cap;
Cell *g_static_cells;

thread_local RThread *t_cur; // the thread running on this OS thread (NULL: not a kernel thread, or checks off)
thread_local int t_tid;
thread_local uintptr_t t_stack_lo, t_stack_hi;
thread_local DevRegion t_last;   // the device allocation of the last device access
thread_local int t_last_valid;
thread_local uintptr_t t_host_page[4]; // pages recently found not to be device memory
thread_local int t_host_next;

} // namespace

// Static __shared__ variables (emu_device.h), as in emu_kernel.cc.
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

bool emu::race_on() { return g_instrumented; }

static Cell *map_cells(size_t n) {
    void *m = mmap(NULL, (n ? n : 1) * sizeof(Cell), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) emu_fail("race checker: cannot map %zu bytes of shadow", n * sizeof(Cell));
    return (Cell *)m;
}

void emu::race_launch_begin(const char *name, dim3 grid, dim3 block, void *dyn_smem, size_t dyn_bytes) {
    if (!g_instrumented) return;
    g_kernel = name;
    g_grid = grid;
    g_block = block;
    g_nthreads = (int)(block.x * block.y * block.z);
    g_thr.resize(g_nthreads);
    g_warp_event.resize((g_nthreads + 31) / 32);
    g_block_of.clear();
    g_launch_first = g_serial + 1;
    g_dyn = (uintptr_t)dyn_smem;
    g_dyn_bytes = dyn_bytes;
    if (dyn_bytes > g_dyn_cap) { // cells of other blocks do not count (their serial differs): no reset needed
        if (g_dyn_cells) munmap(g_dyn_cells, g_dyn_cap * sizeof(Cell));
        g_dyn_cells = map_cells(dyn_bytes);
        g_dyn_cap = dyn_bytes;
    }
    uintptr_t s0 = (uintptr_t)__start_emu_shared, s1 = (uintptr_t)__stop_emu_shared;
    if (!g_static_cells && s0 && s1 > s0) g_static_cells = map_cells(s1 - s0);
    t_last_valid = 0; // allocations may have come and gone since the last launch
    memset(t_host_page, 0, sizeof t_host_page);
}

void emu::race_block_begin(unsigned int linear_block) {
    if (!g_instrumented) return;
    if (++g_serial == 0) emu_fail("race checker: more than 2^32 blocks run");
    g_block_of.push_back(linear_block);
    memset(g_thr.data(), 0, sizeof(RThread) * g_thr.size());
    memset(g_warp_event.data(), 0, sizeof(uint32_t) * g_warp_event.size());
}

void emu::race_launch_end() {}

void emu::race_enter(int tid, const void *stack_lo, const void *stack_hi) {
    if (!g_instrumented) return;
    t_cur = &g_thr[tid];
    t_tid = tid;
    t_stack_lo = (uintptr_t)stack_lo;
    t_stack_hi = (uintptr_t)stack_hi;
}

void emu::race_leave(int exited) {
    if (!g_instrumented) return;
    if (exited) t_cur->exited = 1;
    t_cur = NULL;
}

void emu::race_block_barrier() {
    if (!g_instrumented) return;
    for (int i = 0; i < g_nthreads; i++) {
        RThread *x = &g_thr[i];
        if (!x->exited) {
            if (++x->phase == 0) emu_fail("race checker: more than 65535 __syncthreads in one block of %s", g_kernel);
            continue;
        }
        if (x->published) continue;
        // Exited before this barrier: its accesses are ordered before it only
        // as far as a lane of its warp that reached it knew of them.
        int w = i / 32;
        for (int m = w * 32; m < w * 32 + 32 && m < g_nthreads; m++)
            if (!g_thr[m].exited && g_thr[m].know[i % 32] > x->pub) x->pub = g_thr[m].know[i % 32];
        x->published = 1;
    }
}

void emu::race_warp_sync(int warp, unsigned int lanes) {
    if (!g_instrumented) return;
    uint32_t id = ++g_warp_event[warp];
    if (id == 0) emu_fail("race checker: more than 2^32 __syncwarp in one warp");
    uint32_t joined[32] = {0};
    for (int l = 0; l < 32; l++)
        if (lanes >> l & 1u)
            for (int j = 0; j < 32; j++)
                if (g_thr[warp * 32 + l].know[j] > joined[j]) joined[j] = g_thr[warp * 32 + l].know[j];
    for (int l = 0; l < 32; l++)
        if (lanes >> l & 1u) joined[l] = id; // every member took part in event id
    for (int l = 0; l < 32; l++)
        if (lanes >> l & 1u) memcpy(g_thr[warp * 32 + l].know, joined, sizeof joined);
}

// ----------------------------------------------------------------------------
// Finding what an address is

// Whether a belongs to memory the checker tracks; fills r.
static bool find_region(uintptr_t a, Region *r) {
    uintptr_t s0 = (uintptr_t)__start_emu_shared, s1 = (uintptr_t)__stop_emu_shared;
    if (a >= s0 && a < s1) {
        *r = Region{REGION_STATIC_SMEM, s0, g_static_cells, DevRegion{}};
        return true;
    }
    if (a >= g_dyn && a < g_dyn + g_dyn_bytes) {
        *r = Region{REGION_DYN_SMEM, g_dyn, g_dyn_cells, DevRegion{}};
        return true;
    }
    if (a >= t_stack_lo && a < t_stack_hi) return false; // the thread's own stack
    if (!(t_last_valid && a >= t_last.map_lo && a < t_last.map_hi)) {
        uintptr_t page = a >> 12;
        for (uintptr_t p : t_host_page)
            if (p == page) return false;
        if (!device_region((const void *)a, sizeof(Cell), &t_last)) {
            t_host_page[t_host_next++ % 4] = page;
            return false;
        }
        t_last_valid = 1;
    }
    *r = Region{REGION_DEVICE, t_last.user, (Cell *)t_last.shadow, t_last};
    return true;
}

// ----------------------------------------------------------------------------
// Reports

// "kernels/x.cu:12 (function)" for a code address, from the debug information if addr2line can read it.
static void code_place(void *pc, char *buf, size_t size) {
    Dl_info info;
    snprintf(buf, size, "%p", pc);
    if (!dladdr(pc, &info) || !info.dli_fname) return;
    char cmd[1200], line[512] = "", func[512] = "";
    snprintf(cmd, sizeof cmd, "addr2line -C -f -i -e '%s' %#lx 2>/dev/null", info.dli_fname,
             (unsigned long)((uintptr_t)pc - (uintptr_t)info.dli_fbase - 1));
    FILE *f = popen(cmd, "r");
    if (!f) return;
    if (fgets(func, sizeof func, f) && fgets(line, sizeof line, f) && line[0] != '?') {
        func[strcspn(func, "\n")] = 0;
        line[strcspn(line, " \n")] = 0; // "file:line (discriminator 3)": the file and line
        snprintf(buf, size, "%s (%s)", line, func);
    }
    pclose(f);
}

static void describe_byte(const Region &r, uintptr_t a, char *buf, size_t size) {
    if (r.kind == REGION_DEVICE)
        snprintf(buf, size, "byte %zu of device allocation #%lu (%zu bytes)", (size_t)(a - r.dev.user), r.dev.id,
                 r.dev.size);
    else
        snprintf(buf, size, "byte %zu of %s shared memory", (size_t)(a - r.base),
                 r.kind == REGION_STATIC_SMEM ? "static" : "dynamic");
}

static void thread_name(int tid, char *buf, size_t size) {
    snprintf(buf, size, "(%u,%u,%u)", tid % g_block.x, tid / g_block.x % g_block.y, tid / (g_block.x * g_block.y));
}

static void block_name(uint32_t serial, char *buf, size_t size) {
    unsigned int q = g_block_of[serial - g_launch_first];
    snprintf(buf, size, "(%u,%u,%u)", q % g_grid.x, q / g_grid.x % g_grid.y, q / (g_grid.x * g_grid.y));
}

enum { WHY_BLOCKS = 1, WHY_WARPS, WHY_LANES, WHY_EXITED };

[[noreturn]] static void report_race(const Region &r, uintptr_t a, size_t n, int write, int atomic, const Acc &s,
                                     int s_write, int why, void *pc) {
    char where[160], place[700], me[32], my_block[32], other[200], ob[32];
    describe_byte(r, a, where, sizeof where);
    code_place(pc, place, sizeof place);
    thread_name(t_tid, me, sizeof me);
    block_name(g_serial, my_block, sizeof my_block);
    if (s.flags & ACC_MULTI_BLOCK) {
        snprintf(other, sizeof other, "threads of several blocks");
    } else {
        char ot[32];
        block_name(s.serial, ob, sizeof ob);
        if (s.flags & ACC_MULTI_WARP) snprintf(ot, sizeof ot, "threads of several warps");
        else thread_name(s.warp * 32 + __builtin_ctz(s.lanes), ot, sizeof ot);
        snprintf(other, sizeof other, "%s%s of block %s", s.flags & ACC_MULTI_WARP ? "" : "thread ", ot, ob);
    }
    static const char *whys[] = {
        "", "in another block of the same launch: blocks are not ordered (an atomic, or another launch, is needed)",
        "in another warp, with no __syncthreads between them",
        "in the same warp, with no __syncwarp naming both lanes (nor a __syncthreads) between them",
        "by a thread that exited before the __syncthreads between them: a barrier orders only the threads that reach it"};
    emu_fail("data race in kernel %s: thread %s of block %s %s %zu byte%s at %s (%s), and %s %s it earlier %s", g_kernel,
             me, my_block, write ? (atomic ? "atomically updates" : "writes") : (atomic ? "atomically reads" : "reads"),
             n, n == 1 ? "" : "s", where, place, other, s_write ? "wrote" : "read", whys[why]);
}

[[noreturn]] static void report_bounds(const Region &r, uintptr_t a, size_t n, int write, void *pc) {
    char place[700];
    code_place(pc, place, sizeof place);
    uintptr_t end = r.dev.user + r.dev.size;
    emu_fail("out-of-bounds %s at byte offset %td of device allocation #%lu (%zu bytes): %s (%zu byte%s, %s)",
             write ? "write" : "read", (ptrdiff_t)(a - r.dev.user), r.dev.id, r.dev.size,
             a < r.dev.user ? "before its start" : a >= end ? "past its end" : "running past its end", n,
             n == 1 ? "" : "s", place);
}

// ----------------------------------------------------------------------------
// The check

// Whether s holds accesses that still count: made in this launch (for shared
// memory: in this block, whose shared memory it is).
static inline bool live(const Acc &s, bool shared) {
    return s.serial != 0 && s.serial >= g_launch_first && (!shared || s.serial == g_serial);
}

// 0 if every access of s is ordered before the current thread's next one,
// else why not (WHY_*).
static int unordered(const Acc &s, const RThread *u) {
    if ((s.flags & ACC_MULTI_BLOCK) || s.serial != g_serial) return WHY_BLOCKS;
    if (s.flags & ACC_MULTI_WARP) return s.phase < u->phase ? 0 : WHY_WARPS;
    int uw = t_tid / 32;
    for (uint32_t lanes = s.lanes; lanes; lanes &= lanes - 1) {
        int l = __builtin_ctz(lanes), t = s.warp * 32 + l;
        if (t == t_tid) continue;                              // program order
        if (s.warp == uw && u->know[l] > s.event) continue;    // a __syncwarp of lane l after it, known here
        if (s.phase < u->phase) {                              // a __syncthreads since
            const RThread *x = &g_thr[t];
            if (!x->exited || x->phase > s.phase || (x->published && x->pub > s.event)) continue;
            return WHY_EXITED;
        }
        return s.warp == uw ? WHY_LANES : WHY_WARPS;
    }
    return 0;
}

static inline Acc single(const RThread *u, int atomic) {
    int w = t_tid / 32;
    return Acc{g_serial, u->phase, (uint8_t)w, (uint8_t)(atomic ? 0 : ACC_PLAIN), 1u << (t_tid % 32),
               g_warp_event[w]};
}

// s with the current thread's access added, for accesses that may be concurrent.
static inline void merge(Acc *s, const RThread *u, int atomic) {
    int w = t_tid / 32;
    if (s->serial != g_serial) s->flags |= ACC_MULTI_BLOCK;
    else if (!(s->flags & ACC_MULTI_WARP) && s->warp != w) s->flags |= ACC_MULTI_WARP;
    s->lanes |= 1u << (t_tid % 32);
    if (g_warp_event[w] > s->event) s->event = g_warp_event[w];
    if (u->phase > s->phase) s->phase = u->phase;
    if (!atomic) s->flags |= ACC_PLAIN;
}

static void access(const void *p, size_t n, int write, int atomic, void *pc) {
    const RThread *u = t_cur;
    if (!u || n == 0) return;
    uintptr_t a = (uintptr_t)p;
    Region r;
    if (!find_region(a, &r)) return;
    if (r.kind == REGION_DEVICE && (a < r.dev.user || a + n > r.dev.user + r.dev.size))
        report_bounds(r, a, n, write, pc);
    bool shared = r.kind != REGION_DEVICE;
    Cell *c = r.cells + (a - r.base);
    for (size_t i = 0; i < n; i++, c++) {
        int why;
        // Against the writes: always, unless both this access and they are atomic.
        if (live(c->w, shared) && !(atomic && !(c->w.flags & ACC_PLAIN)) && (why = unordered(c->w, u)))
            report_race(r, a, n, write, atomic, c->w, 1, why, pc);
        if (!write) {
            if (live(c->r, shared) && unordered(c->r, u)) merge(&c->r, u, atomic);
            else c->r = single(u, atomic);
            continue;
        }
        // A write, against the reads too; then it replaces what it is ordered after.
        int r_open = live(c->r, shared) ? unordered(c->r, u) : 0;
        if (r_open && !(atomic && !(c->r.flags & ACC_PLAIN))) report_race(r, a, n, write, atomic, c->r, 0, r_open, pc);
        if (live(c->w, shared) && unordered(c->w, u)) merge(&c->w, u, atomic); // atomics with atomics
        else c->w = single(u, atomic);
        if (!r_open) c->r = Acc{};
    }
}

void emu::race_access(const void *p, size_t bytes, int write, void *pc) {
    if (g_instrumented) access(p, bytes, write, 0, pc);
}

// ----------------------------------------------------------------------------
// The instrumentation's entry points (GCC's -fsanitize=thread, with
// --param=tsan-instrument-func-entry-exit=0). The atomics do what they are
// asked, with the __atomic builtins, after the check.

#define RET_PC __builtin_return_address(0)

extern "C" {
void __tsan_init(void) { g_instrumented = true; }
void __tsan_func_entry(void *) {}
void __tsan_func_exit(void) {}
void __tsan_read_range(void *p, unsigned long n) { access(p, n, 0, 0, RET_PC); }
void __tsan_write_range(void *p, unsigned long n) { access(p, n, 1, 0, RET_PC); }
void __tsan_vptr_update(void **p, void *) { access(p, sizeof *p, 1, 0, RET_PC); }
void __tsan_vptr_read(void **p) { access(p, sizeof *p, 0, 0, RET_PC); }
void __tsan_atomic_thread_fence(int) {}
void __tsan_atomic_signal_fence(int) {}

#define EMU_PLAIN(n)                                                                        \
    void __tsan_read##n(void *p) { access(p, n, 0, 0, RET_PC); }                            \
    void __tsan_write##n(void *p) { access(p, n, 1, 0, RET_PC); }                           \
    void __tsan_unaligned_read##n(void *p) { access(p, n, 0, 0, RET_PC); }                  \
    void __tsan_unaligned_write##n(void *p) { access(p, n, 1, 0, RET_PC); }                 \
    void __tsan_volatile_read##n(void *p) { access(p, n, 0, 0, RET_PC); }                   \
    void __tsan_volatile_write##n(void *p) { access(p, n, 1, 0, RET_PC); }
EMU_PLAIN(1)
EMU_PLAIN(2)
EMU_PLAIN(4)
EMU_PLAIN(8)
EMU_PLAIN(16)
#undef EMU_PLAIN

#define EMU_RMW(n, T, op, builtin)                                                          \
    T __tsan_atomic##n##_##op(volatile T *p, T v, int) {                                    \
        access((const void *)p, sizeof(T), 1, 1, RET_PC);                                   \
        return builtin(p, v, __ATOMIC_SEQ_CST);                                             \
    }
#define EMU_ATOMICS(n, T)                                                                   \
    T __tsan_atomic##n##_load(const volatile T *p, int) {                                   \
        access((const void *)p, sizeof(T), 0, 1, RET_PC);                                   \
        return __atomic_load_n(p, __ATOMIC_SEQ_CST);                                        \
    }                                                                                       \
    void __tsan_atomic##n##_store(volatile T *p, T v, int) {                                \
        access((const void *)p, sizeof(T), 1, 1, RET_PC);                                   \
        __atomic_store_n(p, v, __ATOMIC_SEQ_CST);                                           \
    }                                                                                       \
    EMU_RMW(n, T, exchange, __atomic_exchange_n)                                            \
    EMU_RMW(n, T, fetch_add, __atomic_fetch_add)                                            \
    EMU_RMW(n, T, fetch_sub, __atomic_fetch_sub)                                            \
    EMU_RMW(n, T, fetch_and, __atomic_fetch_and)                                            \
    EMU_RMW(n, T, fetch_or, __atomic_fetch_or)                                              \
    EMU_RMW(n, T, fetch_xor, __atomic_fetch_xor)                                            \
    EMU_RMW(n, T, fetch_nand, __atomic_fetch_nand)                                          \
    int __tsan_atomic##n##_compare_exchange_strong(volatile T *p, T *expected, T v, int, int) { \
        access((const void *)p, sizeof(T), 1, 1, RET_PC);                                   \
        return __atomic_compare_exchange_n(p, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    }                                                                                       \
    int __tsan_atomic##n##_compare_exchange_weak(volatile T *p, T *expected, T v, int, int) { \
        access((const void *)p, sizeof(T), 1, 1, RET_PC);                                   \
        return __atomic_compare_exchange_n(p, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    }                                                                                       \
    T __tsan_atomic##n##_compare_exchange_val(volatile T *p, T expected, T v, int, int) {   \
        access((const void *)p, sizeof(T), 1, 1, RET_PC);                                   \
        __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
        return expected;                                                                    \
    }
EMU_ATOMICS(8, char)
EMU_ATOMICS(16, short)
EMU_ATOMICS(32, int)
EMU_ATOMICS(64, long long)
#undef EMU_ATOMICS
#undef EMU_RMW
}
