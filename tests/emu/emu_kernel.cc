// CUDA emulation on the CPU: kernel launches (tests/emu; see emu_memory.cc).
// A launch runs the grid block after block; the threads of a block are
// coroutines with their own stacks that switch only at __syncthreads,
// __syncwarp, warp shuffles and the warp-wide matrix instructions.
//
// Barriers, as CUDA and PTX define them:
//   - __syncthreads completes when every thread of the block that has not
//     exited waits at it (exited threads count as arrived, as bar.sync
//     defines); threads waiting at two different __syncthreads stop the run
//     (a divergent barrier: the Programming Guide allows __syncthreads in
//     conditional code only if the condition is the same for the whole block);
//   - __syncwarp(mask) completes when every lane of the mask waits at a
//     __syncwarp with the same mask (bar.warp.sync: "all threads in
//     membermask"); the calling lane must be in the mask;
//   - a shuffle with a mask completes when every lane of the mask that has
//     not exited waits at a shuffle with the same mask (shfl.sync); the caller
//     and the lane it reads must be in the mask, and the lane it reads must
//     not have exited;
//   - a warp-wide instruction (mma.sync, ldmatrix: .sync.aligned) completes
//     when all 32 lanes of the warp wait at one; no lane is excused.
// A state where nothing can move (lanes of a mask that never arrive, a
// shuffle and a __syncwarp mixed in one warp, an mma.sync half of whose
// lanes have exited, half a warp at __syncthreads)
// stops with "deadlock" and says who waits for whom.
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <functional>
#include <mutex>
#include <vector>

#include "cuda_runtime.h"
#include "emu_internal.h"

using namespace emu;

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

void emu::order_from_env() {
    const char *order = getenv("EMU_ORDER");
    if (order && strcmp(order, "reverse") == 0)
        g_order = ORDER_REVERSE;
    else if (order && strcmp(order, "shuffle") == 0)
        g_order = ORDER_SHUFFLE;
    else if (order && *order && strcmp(order, "forward") != 0) {
        fprintf(stderr, "emulator: EMU_ORDER must be forward, reverse or shuffle, not '%s'\n", order);
        exit(1);
    }
}

// ----------------------------------------------------------------------------
// Kernels: blocks of coroutine threads

namespace emu {

enum { T_RUN, T_AT_BLOCK, T_AT_WARP, T_DONE };
// What a thread in T_AT_WARP waits at: a __syncwarp, a shuffle offering its
// value, a shuffle waiting for every lane to have read the offers, a
// warp-wide instruction (mma.sync, ldmatrix) offering its operands, or one
// waiting for lane 0 to have computed it for the warp.
enum { W_SYNC, W_SHFL, W_SHFL_READ, W_COLL, W_COLL_DONE };

struct Thread {
    void *sp;   // saved stack pointer while switched out
    uint3 idx;
    int state;
    int lane, warp;
    uint64_t shfl;      // the value this thread offers in a shuffle
    const void *coll;   // what it offers in a warp-wide instruction (warp_collective), NULL elsewhere
    int wkind;          // T_AT_WARP: W_SYNC, W_SHFL, W_SHFL_READ, W_COLL or W_COLL_DONE
    unsigned int wmask; // T_AT_WARP: the mask
    const char *file;   // T_AT_BLOCK: where the __syncthreads is
    int line;
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
    uint64_t barriers; // __syncthreads completed in this block
};

} // namespace emu

static thread_local emu::Block *t_blk; // the block being run by this OS thread (NULL outside kernels)
static thread_local uint64_t t_block_serial; // blocks run by this OS thread, the current one included

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

bool emu::in_kernel() { return t_blk != NULL; }

void emu::describe_kernel_context(FILE *f) {
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

static void wait_at_warp(int kind, unsigned int mask) {
    emu::Thread *t = t_blk->cur;
    t->wkind = kind;
    t->wmask = mask;
    wait_at(emu::T_AT_WARP);
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
void syncthreads(const char *file, int line) {
    if (!t_blk) emu_fail("__syncthreads called outside a kernel");
    t_blk->cur->file = file;
    t_blk->cur->line = line;
    wait_at(T_AT_BLOCK);
}

void syncwarp(unsigned int mask) {
    if (!t_blk) emu_fail("__syncwarp called outside a kernel");
    Thread *t = t_blk->cur;
    if (!(mask >> t->lane & 1u)) emu_fail("__syncwarp(0x%08x) called by lane %d, which is not in its mask", mask, t->lane);
    wait_at_warp(W_SYNC, mask);
}

uint64_t shfl_xor(unsigned int mask, uint64_t bits, int lane_mask, int width) {
    Block *b = t_blk;
    if (!b) emu_fail("a shuffle called outside a kernel");
    Thread *t = b->cur;
    if (width <= 0 || width > 32 || (width & (width - 1))) emu_fail("shuffle width %d is not a power of 2 <= 32", width);
    int src = (t->lane & ~(width - 1)) | ((t->lane ^ lane_mask) & (width - 1));
    if (!(mask >> t->lane & 1u)) emu_fail("shuffle with mask 0x%08x by lane %d, which is not in its mask", mask, t->lane);
    if (!(mask >> src & 1u)) emu_fail("shuffle by lane %d from lane %d outside its mask 0x%08x", t->lane, src, mask);
    t->shfl = bits;
    wait_at_warp(W_SHFL, mask); // every lane of the mask has offered its value (or exited)
    int si = t->warp * 32 + src;
    if (si >= b->nthreads || b->threads[si].state == T_DONE)
        emu_fail("shuffle by lane %d reads lane %d, which %s", t->lane, src,
                 si >= b->nthreads ? "does not exist (block size not a multiple of 32)" : "has exited");
    uint64_t r = b->threads[si].shfl;
    wait_at_warp(W_SHFL_READ, mask); // nobody offers the next value before every lane has read this one
    return r;
}

// A set of lanes for messages: "lane 3", "lanes 0-15,17".
static void lane_set(unsigned int lanes, char *buf, size_t size) {
    size_t len = (size_t)snprintf(buf, size, __builtin_popcount(lanes) == 1 ? "lane " : "lanes ");
    const char *sep = "";
    for (int l = 0; l < 32 && len < size; l++) {
        if (!(lanes >> l & 1u) || (l > 0 && (lanes >> (l - 1) & 1u))) continue; // not the start of a run
        int e = l;
        while (e < 31 && (lanes >> (e + 1) & 1u)) e++;
        len += (size_t)snprintf(buf + len, size - len, e > l ? "%s%d-%d" : "%s%d", sep, l, e);
        sep = ",";
    }
}

// The kinds of warp operation, for messages and for what they wait for.
enum { OP_SYNCWARP, OP_SHUFFLE, OP_COLLECTIVE };
static int warp_op_family(int kind) {
    return kind == W_SYNC ? OP_SYNCWARP : kind == W_SHFL || kind == W_SHFL_READ ? OP_SHUFFLE : OP_COLLECTIVE;
}
static const char *warp_op(int kind) {
    static const char *names[] = {"__syncwarp", "a shuffle", "a warp-wide instruction (mma.sync, ldmatrix)"};
    return names[warp_op_family(kind)];
}
// The same with an article, for "a shuffle and a __syncwarp mixed in one warp".
static const char *warp_op_a(int kind) {
    static const char *names[] = {"a __syncwarp", "a shuffle", "a warp-wide instruction (mma.sync, ldmatrix)"};
    return names[warp_op_family(kind)];
}
// Shuffles excuse exited (or absent) lanes of their mask; __syncwarp and the
// warp-wide instructions wait for every lane of theirs.
static int excuses_exited(int kind) { return warp_op_family(kind) == OP_SHUFFLE; }

// The lanes of warp w (a bit per lane) that exist in the block.
static unsigned int warp_lanes(const Block *b, int w) {
    int n = b->nthreads - w * 32;
    return n >= 32 ? 0xffffffffu : (1u << n) - 1;
}

// Whether lane l of warp w is ready for the warp operation (kind, mask):
// waiting at one with the same mask, or, for a shuffle, exited or absent.
static int lane_ready(const Block *b, int w, int l, int kind, unsigned int mask) {
    if (!(warp_lanes(b, w) >> l & 1u)) return excuses_exited(kind);
    const Thread *x = &b->threads[w * 32 + l];
    if (x->state == T_AT_WARP) return x->wkind == kind && x->wmask == mask;
    return x->state == T_DONE && excuses_exited(kind);
}

// Completes every warp operation whose lanes are all there; returns whether one did.
static int release_warps(Block *b) {
    int released = 0;
    for (int w = 0; w * 32 < b->nthreads; w++) {
        unsigned int done = 0; // lanes already looked at
        for (int l = 0; l < 32; l++) {
            Thread *t = &b->threads[w * 32 + l];
            if (!(warp_lanes(b, w) >> l & 1u) || t->state != T_AT_WARP || (done >> l & 1u)) continue;
            int kind = t->wkind, ok = 1;
            unsigned int mask = t->wmask, members = 0;
            for (int m = 0; m < 32; m++) {
                if (!(mask >> m & 1u)) continue;
                int ready = lane_ready(b, w, m, kind, mask);
                ok &= ready;
                if (ready && (warp_lanes(b, w) >> m & 1u) && b->threads[w * 32 + m].state == T_AT_WARP)
                    members |= 1u << m;
            }
            done |= members;
            if (!ok) continue;
            for (int m = 0; m < 32; m++)
                if (members >> m & 1u) b->threads[w * 32 + m].state = T_RUN;
            if (kind == W_SYNC) race_warp_sync(w, members); // a shuffle does not order memory, a __syncwarp does
            released = 1;
        }
    }
    return released;
}

// Completes the __syncthreads every live thread waits at; stops if they wait at different ones.
static void release_block(Block *b) {
    const Thread *first = NULL;
    for (int i = 0; i < b->nthreads; i++) {
        Thread *t = &b->threads[i];
        if (t->state != T_AT_BLOCK) continue;
        if (first && (first->line != t->line || strcmp(first->file, t->file) != 0))
            emu_fail("divergent __syncthreads: thread (%u,%u,%u) waits at %s:%d and thread (%u,%u,%u) at %s:%d; one "
                     "barrier reached from two places (__syncthreads in conditional code must be reached by the whole "
                     "block)", first->idx.x, first->idx.y, first->idx.z, first->file, first->line, t->idx.x, t->idx.y,
                     t->idx.z, t->file, t->line);
        if (!first) first = t;
        t->state = T_RUN;
    }
    b->barriers++;
    race_block_barrier();
}

// Nothing can move: says which warp operation waits for which lane, and why it never comes.
[[noreturn]] static void report_deadlock(const Block *b) {
    for (int w = 0; w * 32 < b->nthreads; w++)
        for (int l = 0; l < 32; l++) {
            const Thread *t = &b->threads[w * 32 + l];
            if (!(warp_lanes(b, w) >> l & 1u) || t->state != T_AT_WARP) continue;
            unsigned int waiting = 0;
            int missing = -1;
            for (int m = 0; m < 32; m++) {
                if (!(t->wmask >> m & 1u)) continue;
                if ((warp_lanes(b, w) >> m & 1u) && b->threads[w * 32 + m].state == T_AT_WARP &&
                    b->threads[w * 32 + m].wkind == t->wkind && b->threads[w * 32 + m].wmask == t->wmask)
                    waiting |= 1u << m;
                else if (missing < 0 && !lane_ready(b, w, m, t->wkind, t->wmask))
                    missing = m;
            }
            char who[160], why[160];
            lane_set(waiting, who, sizeof who);
            const Thread *x = missing >= 0 && (warp_lanes(b, w) >> missing & 1u) ? &b->threads[w * 32 + missing] : NULL;
            if (!x)
                snprintf(why, sizeof why, "does not exist (the block has %d threads)", b->nthreads);
            else if (x->state == T_DONE)
                snprintf(why, sizeof why, "has exited (%s)",
                         warp_op_family(t->wkind) == OP_SYNCWARP ? "a __syncwarp waits for every lane of its mask"
                                                                  : "a warp-wide instruction needs all 32 lanes");
            else if (x->state == T_AT_BLOCK)
                snprintf(why, sizeof why, "waits at __syncthreads (%s:%d)", x->file, x->line);
            else {
                // Two kinds of warp operation in one warp: named in the order
                // warp-wide instruction, shuffle, __syncwarp.
                int fx = warp_op_family(x->wkind), ft = warp_op_family(t->wkind);
                char mixed[128] = "";
                if (fx != ft)
                    snprintf(mixed, sizeof mixed, ": %s and %s mixed in one warp",
                             warp_op_a(fx > ft ? x->wkind : t->wkind), warp_op_a(fx > ft ? t->wkind : x->wkind));
                snprintf(why, sizeof why, "waits at %s with mask 0x%08x%s", warp_op(x->wkind), x->wmask, mixed);
            }
            emu_fail("deadlock: in warp %d, %s %s at %s with mask 0x%08x for lane %d, which %s", w, who,
                     __builtin_popcount(waiting) == 1 ? "waits" : "wait", warp_op(t->wkind), t->wmask, missing, why);
        }
    emu_fail("deadlock: no thread can move"); // not reached: only warp operations can be incomplete
}

// Warp-wide instructions (mma.sync, ldmatrix: emu_mma.cc; .sync.aligned in
// PTX: every lane of the warp executes the same instruction). Every lane
// offers `mine` and waits at a rendezvous of the whole warp (mask
// 0xffffffff, no lane excused: release_warps); then lane 0 runs
// between(all, ctx) with the 32 offered pointers -- it computes the
// instruction for the warp, writing each lane's results through its
// pointer -- and a second rendezvous keeps every lane (and its offer) there
// until it has. A lane that has exited, or is at another warp operation or
// at __syncthreads, leaves the rest waiting: report_deadlock names it.
// Like a shuffle, neither rendezvous orders memory for the race checker.
void warp_collective(const void *mine, void (*between)(const void *const *all, void *ctx), void *ctx) {
    Block *b = t_blk;
    if (!b) emu_fail("a warp-wide instruction called outside a kernel");
    Thread *t = b->cur;
    if (warp_lanes(b, t->warp) != 0xffffffffu)
        emu_fail("a warp-wide instruction (mma.sync, ldmatrix) needs all 32 lanes, and warp %d has %d (block size "
                 "not a multiple of 32)", t->warp, b->nthreads - t->warp * 32);
    t->coll = mine;
    wait_at_warp(W_COLL, 0xffffffffu);
    if (t->lane == 0) {
        const Thread *w = b->threads + t->warp * 32;
        const void *all[32];
        for (int l = 0; l < 32; l++) all[l] = w[l].coll;
        between(all, ctx);
    }
    wait_at_warp(W_COLL_DONE, 0xffffffffu);
    t->coll = NULL;
}

uint64_t block_serial() { return t_blk ? t_block_serial : 0; }
uint64_t block_barriers() { return t_blk ? t_blk->barriers : 0; }

int is_shared(const void *p, size_t bytes) {
    uintptr_t a = (uintptr_t)p, d0 = (uintptr_t)t_smem.data(), s0 = (uintptr_t)__start_emu_shared,
              s1 = (uintptr_t)__stop_emu_shared;
    if (t_blk && a >= d0 && a + bytes <= d0 + t_smem.size()) return 1;
    return s0 && a >= s0 && a + bytes <= s1 ? 2 : 0;
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
            race_enter(i, t_pool.stacks[i], t_pool.stacks[i] + STACK_BYTES);
            emu_switch(&b->sched_sp, b->threads[i].sp);
            race_leave(b->threads[i].state == T_DONE);
        }
        b->cur = NULL;
        if (release_warps(b)) continue;
        int live = 0, at_block = 0;
        for (int i = 0; i < b->nthreads; i++) {
            live += b->threads[i].state != T_DONE;
            at_block += b->threads[i].state == T_AT_BLOCK;
        }
        if (live == 0) return;
        if (at_block == live) {
            release_block(b);
            continue;
        }
        report_deadlock(b);
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

// Kernel pointer arguments must be device (or pinned) memory: checked at the
// launch, at its capture into a graph and at every replay.
static void check_ptr_args(const char *name, const void *const *ptrs, const int *ptr_arg_index, int n_ptrs) {
    for (int i = 0; i < n_ptrs; i++) {
        if (!ptrs[i]) continue;
        Where w = where_range(ptrs[i], 0, name);
        if (w == WHERE_HOST) emu_fail("kernel %s: argument %d (%p) is a host pointer", name, ptr_arg_index[i], ptrs[i]);
    }
}

// Runs a launch that passed its checks: every block, one after the other.
static void run_launch(const char *name, dim3 grid, dim3 block, size_t smem, const std::function<void()> &body,
                       const void *const *ptrs, const int *ptr_arg_index, int n_ptrs) {
    check_ptr_args(name, ptrs, ptr_arg_index, n_ptrs);
    uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
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
    race_launch_begin(name, grid, block, b.smem, smem);
    for (uint64_t k = 0; k < nblocks; k++) {
        unsigned int q = (unsigned int)block_order[k];
        b.bidx = uint3{q % grid.x, q / grid.x % grid.y, q / (grid.x * grid.y)};
        memset(b.smem, 0xff, smem); // unwritten shared memory reads as NaN / -1
        uintptr_t sh0 = (uintptr_t)__start_emu_shared, sh1 = (uintptr_t)__stop_emu_shared;
        if (sh0 && sh1 > sh0) memset(__start_emu_shared, 0xff, sh1 - sh0);
        for (int i = 0; i < n; i++) start_thread(&b, i);
        b.barriers = 0;
        t_block_serial++;
        race_block_begin(q);
        run_block(&b);
    }
    race_launch_end();
    t_blk = NULL;
    exit_device();
}

void launch(const char *name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            const std::function<void()> &body, const void *const *ptrs, const int *ptr_arg_index, int n_ptrs) {
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
    bool record;
    cudaError_t e = capture_check(stream, name, &record);
    if (e != cudaSuccess) {
        set_error(e);
        return;
    }
    if (!record) {
        run_launch(name, grid, block, smem, body, ptrs, ptr_arg_index, n_ptrs);
        return;
    }
    // Captured: the configuration and the arguments (by value, in body) as they are now.
    check_ptr_args(name, ptrs, ptr_arg_index, n_ptrs);
    std::vector<const void *> p(ptrs, ptrs + n_ptrs);
    std::vector<int> idx(ptr_arg_index, ptr_arg_index + n_ptrs);
    std::function<void()> b = body;
    capture_record(stream, name, [=](cudaStream_t) { run_launch(name, grid, block, smem, b, p.data(), idx.data(), n_ptrs); });
}

} // namespace emu

