// CUDA emulation on the CPU: tensor-core matrix instructions and
// asynchronous copies into shared memory (tests/emu; declared in
// include/emu_mma.h, used by kernels/mma.cuh). Written from the PTX ISA:
//
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32  warp-wide D = A B + C;
//       which lane holds which element is the fragment layout of "Matrix
//       Fragments for mma.m16n8k16 with floating point type" (below, once,
//       as the formulas of that section). The products of bf16 values are
//       exact; the emulator sums them and C in double and rounds once to
//       fp32 (the ISA leaves the tensor core's internal rounding open; a GPU
//       differs by a few fp32 ulps);
//   ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16  warp-wide load of
//       8 x 8 matrices of 16-bit elements, each row's address given by one
//       lane; the thread of lane l gets row l/4, elements 2 (l%4) and
//       2 (l%4) + 1 (transposed: column l/4, rows 2 (l%4) and 2 (l%4) + 1);
//   cp.async (4, 8 or 16 bytes, zero-filled beyond src-size), commit_group,
//       wait_group N.
//
// What it enforces beyond the arithmetic: the warp-wide instructions need
// all 32 lanes at the same instruction (emu_kernel.cc's warp_collective);
// ldmatrix rows are 16-byte aligned shared memory; cp.async goes from device
// (or pinned) memory to aligned shared memory. A cp.async lands only at its
// thread's cp.async.wait_group (until then its destination holds 0xff
// bytes), and a shadow of shared memory records every pending or landed
// copy: reading a destination (ldmatrix, or kernel code through
// kernels/mma.cuh's lds) before its copy landed stops; so does reading data
// that another thread's wait landed with no __syncthreads since (the wait
// makes it visible to the waiting thread only), and a second cp.async into
// a destination whose copy is still pending. A thread that ends with copies
// it never waited for is reported when a later block uses cp.async. In the
// race build (emu_race.cc) the accesses these instructions make are checked
// as the calling thread's: a cp.async reads its source and writes its
// destination when issued, an ldmatrix reads the row its lane names.
//
// EMU_PROFILE=1 also counts these instructions (warp-wide ones once per warp).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mutex>
#include <vector>

#include "cuda_runtime.h"
#include "emu_internal.h"
#include "emu_mma.h"

using namespace emu;

extern "C" char __start_emu_shared[] __attribute__((weak));

namespace {

// ----------------------------------------------------------------------------
// Profile

long g_mma, g_ldmatrix, g_cp_async;
long long g_cp_bytes;

void prof_print_mma() {
    if (!g_mma && !g_ldmatrix && !g_cp_async) return;
    fprintf(stderr, "emulator profile: warp-level matrix instructions and asynchronous copies:\n");
    fprintf(stderr, "  %10ld  mma.sync.m16n8k16 (warp instructions, %.3g FLOP)\n", g_mma, 4096.0 * (double)g_mma);
    fprintf(stderr, "  %10ld  ldmatrix (warp instructions)\n", g_ldmatrix);
    fprintf(stderr, "  %10ld  cp.async (%lld bytes)\n", g_cp_async, g_cp_bytes);
}

int profiling() {
    static int on = -1;
    if (on < 0) {
        const char *p = getenv("EMU_PROFILE");
        on = p && *p && strcmp(p, "0") != 0;
        if (on) atexit(prof_print_mma);
    }
    return on;
}

// ----------------------------------------------------------------------------
// The block's asynchronous copies and the shadow of its shared memory

enum { W_FREE, W_PENDING, W_LANDED };

// One per 4-byte word of shared memory.
struct Word {
    uint8_t state;
    int owner;      // the thread (linear index in the block) whose cp.async wrote it
    uint64_t epoch; // W_LANDED: the block's __syncthreads count when it landed
};

struct Copy {
    char *dst;
    unsigned char data[16]; // the source bytes, taken when it was issued
    int bytes;
    long group; // -1 until committed
};

struct ThreadCopies {
    std::vector<Copy> copies;
    long committed = 0; // groups committed so far
};

struct BlockState {
    uint64_t serial = 0; // emu::block_serial() of the block this state belongs to
    uint3 bidx;
    std::vector<ThreadCopies> th;
    char *dyn0 = NULL;
    std::vector<Word> dyn, stat; // shadows of the dynamic and static shared memory (grown on demand)
    long pending = 0;            // words of shared memory with a copy in flight
    long landed = 0;             // words landed so far; the last at __syncthreads count land_epoch
    uint64_t land_epoch = 0;
};
thread_local BlockState t_bs;

int linear_tid() {
    const uint3 &t = emu::thread_idx();
    const dim3 &b = emu::block_dim();
    return (int)(t.x + b.x * (t.y + b.y * t.z));
}

// The state of the current block, reset when a new block starts.
BlockState &block_state(const char *what) {
    uint64_t s = emu::block_serial();
    if (s == 0) emu_fail("%s outside a kernel", what);
    BlockState &bs = t_bs;
    if (s != bs.serial) {
        for (size_t i = 0; i < bs.th.size(); i++)
            if (!bs.th[i].copies.empty())
                emu_fail("thread %zu of block (%u,%u,%u) of an earlier launch ended with %zu cp.async copies it "
                         "never waited for (cp.async.wait_group)", i, bs.bidx.x, bs.bidx.y, bs.bidx.z,
                         bs.th[i].copies.size());
        const dim3 &b = emu::block_dim();
        bs.serial = s;
        bs.bidx = emu::block_idx();
        bs.th.assign((size_t)b.x * b.y * b.z, ThreadCopies());
        bs.dyn0 = (char *)emu::dyn_smem();
        bs.dyn.clear();
        bs.stat.clear();
        bs.pending = bs.landed = 0;
        bs.land_epoch = 0;
    }
    return bs;
}

// Whether every copy of the block has landed and been published by a
// __syncthreads: then any read is fine (the common case, checked first).
bool all_published(const BlockState &bs) {
    return bs.pending == 0 && (bs.landed == 0 || emu::block_barriers() > bs.land_epoch);
}

// The shadow word of shared-memory byte p (which is_shared has accepted).
Word &word_of(BlockState &bs, const char *p) {
    std::vector<Word> *v;
    size_t i;
    if (emu::is_shared(p, 1) == 1) {
        v = &bs.dyn;
        i = (size_t)(p - bs.dyn0) / 4;
    } else {
        v = &bs.stat;
        i = (size_t)(p - __start_emu_shared) / 4;
    }
    if (i >= v->size()) v->resize(i + 1, Word{W_FREE, 0, 0});
    return (*v)[i];
}

// "dynamic, byte 96" or "static, byte 8": where in shared memory p is, for messages.
const char *where_in_smem(BlockState &bs, const char *p) {
    static thread_local char buf[64];
    int dyn = emu::is_shared(p, 1) == 1;
    snprintf(buf, sizeof buf, "%s, byte %zd", dyn ? "dynamic" : "static", p - (dyn ? bs.dyn0 : __start_emu_shared));
    return buf;
}

// Thread `reader` reads [p, p + n) of shared memory.
void check_read(BlockState &bs, const char *p, size_t n, int reader, const char *what) {
    if (all_published(bs)) return;
    const char *first = (const char *)((uintptr_t)p & ~(uintptr_t)3);
    word_of(bs, p + n - 1); // the shadow covers the range (one region: the callers checked)
    Word *w0 = &word_of(bs, first);
    for (const char *q = first; q < p + n; q += 4) {
        Word &w = w0[(q - first) / 4];
        if (w.state == W_PENDING)
            emu_fail("%s by thread %d reads shared memory (%s) whose cp.async (thread %d) has not landed: "
                     "cp.async.wait_group is missing before the read", what, reader, where_in_smem(bs, q), w.owner);
        if (w.state == W_LANDED && w.owner != reader) {
            if (emu::block_barriers() > w.epoch)
                w.state = W_FREE; // published by a __syncthreads since
            else
                emu_fail("%s by thread %d reads shared memory (%s) that thread %d's cp.async.wait_group landed "
                         "with no __syncthreads since (the wait makes it visible to thread %d only)", what, reader,
                         where_in_smem(bs, q), w.owner, w.owner);
        }
    }
}

// ----------------------------------------------------------------------------
// mma.sync.m16n8k16 (bf16 in, fp32 accumulators)

float bf16_bits_to_float(uint32_t bits16) {
    uint32_t u = bits16 << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

struct MmaOffer {
    const char *what;
    const uint32_t *a, *b;
    const float *c;
    float *d;
};

const char *const MMA_NAME = "mma.sync.m16n8k16";

// The fragment layouts of the PTX ISA, groupID = lane >> 2,
// threadID_in_group = lane % 4, element i of a fragment in register i / 2
// (the lower 16 bits first):
//   A (16 x 16): row = groupID for i < 2 or 4 <= i < 6, else groupID + 8;
//                col = 2 threadID_in_group + (i & 1), + 8 for i >= 4
//   B (16 x 8):  row = 2 threadID_in_group + (i & 1), + 8 for i >= 2; col = groupID
//   C, D (16 x 8, fp32, one element per register):
//                row = groupID for i < 2, else groupID + 8; col = 2 threadID_in_group + (i & 1)
void mma_between(const void *const *all, void *ctx) {
    (void)ctx;
    double A[16][16], Bt[8][16]; // Bt: B transposed, so that both operands run along k
    float C[16][8];
    for (int l = 0; l < 32; l++) {
        const MmaOffer *o = (const MmaOffer *)all[l];
        if (o->what != MMA_NAME) emu_fail("lane %d is at another warp-wide instruction than lane 0's %s", l, MMA_NAME);
        int g = l >> 2, t = l % 4;
        for (int i = 0; i < 8; i++) {
            int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
            int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = bf16_bits_to_float((o->a[i / 2] >> (16 * (i & 1))) & 0xffffu);
        }
        for (int i = 0; i < 4; i++) {
            int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0), col = g;
            Bt[col][row] = bf16_bits_to_float((o->b[i / 2] >> (16 * (i & 1))) & 0xffffu);
        }
        for (int i = 0; i < 4; i++) C[i < 2 ? g : g + 8][2 * t + (i & 1)] = o->c[i];
    }
    for (int l = 0; l < 32; l++) {
        const MmaOffer *o = (const MmaOffer *)all[l];
        int g = l >> 2, t = l % 4;
        for (int i = 0; i < 4; i++) {
            int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
            double s = C[row][col];
            for (int k = 0; k < 16; k++) s += A[row][k] * Bt[col][k];
            o->d[i] = (float)s;
        }
    }
    if (profiling()) g_mma++;
}

// ----------------------------------------------------------------------------
// ldmatrix

struct LdOffer {
    const char *what;
    const char *addr;
    int num, trans;
    uint32_t *r;
};

const char *const LDMATRIX_NAME = "ldmatrix";

uint32_t load16(const char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

void ldmatrix_between(const void *const *all, void *ctx) {
    (void)ctx;
    const LdOffer *l0 = (const LdOffer *)all[0];
    for (int l = 0; l < 32; l++) {
        const LdOffer *o = (const LdOffer *)all[l];
        if (o->what != LDMATRIX_NAME) emu_fail("lane %d is at another warp-wide instruction than lane 0's ldmatrix", l);
        if (o->num != l0->num || o->trans != l0->trans)
            emu_fail("the lanes of a warp execute different ldmatrix forms (.x%d%s and .x%d%s)", l0->num,
                     l0->trans ? ".trans" : "", o->num, o->trans ? ".trans" : "");
    }
    for (int lane = 0; lane < 32; lane++) {
        const LdOffer *me = (const LdOffer *)all[lane];
        int g = lane >> 2, t = lane % 4;
        for (int i = 0; i < me->num; i++) {
            const LdOffer *const *rows = (const LdOffer *const *)(all + 8 * i); // the rows of matrix i
            if (!me->trans) {
                const char *row = rows[g]->addr;
                me->r[i] = load16(row + 4 * t) | load16(row + 4 * t + 2) << 16;
            } else {
                me->r[i] = load16(rows[2 * t]->addr + 2 * g) | load16(rows[2 * t + 1]->addr + 2 * g) << 16;
            }
        }
    }
    if (profiling()) g_ldmatrix++;
}

} // namespace

// ----------------------------------------------------------------------------
// The instructions

void emu::mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    MmaOffer me = {MMA_NAME, a, b, c, d};
    warp_collective(&me, mma_between, NULL);
}

void emu::ldmatrix_m8n8(uint32_t *r, int num, int trans, const void *row_addr) {
    BlockState &bs = block_state("ldmatrix");
    if (num != 1 && num != 2 && num != 4) emu_fail("ldmatrix .x%d: the number of matrices is 1, 2 or 4", num);
    const dim3 &bd = emu::block_dim();
    int tid = linear_tid();
    if ((bd.x * bd.y * bd.z) % 32 != 0)
        emu_fail("ldmatrix in a block of %u threads, not whole warps", bd.x * bd.y * bd.z);
    const char *p = (const char *)row_addr;
    if (tid % 32 < 8 * num) { // the lanes whose address is used
        if ((uintptr_t)p % 16 != 0) emu_fail("ldmatrix row address %p is not 16-byte aligned", row_addr);
        if (!is_shared(p, 16)) emu_fail("ldmatrix row address %p is not shared memory of this block", row_addr);
        check_read(bs, p, 16, tid, "ldmatrix");
        race_access(p, 16, 0, __builtin_return_address(0)); // the row, read for the warp by the lane naming it
    }
    LdOffer me = {LDMATRIX_NAME, p, num, trans, r};
    warp_collective(&me, ldmatrix_between, NULL);
}

void emu::cp_async(void *dst, const void *src, int cp_size, int src_size) {
    BlockState &bs = block_state("cp.async");
    int tid = linear_tid();
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) emu_fail("cp.async of %d bytes: it copies 4, 8 or 16", cp_size);
    if (src_size < 0 || src_size > cp_size)
        emu_fail("cp.async src-size %d outside [0, cp-size %d]", src_size, cp_size);
    char *d = (char *)dst;
    if ((uintptr_t)d % cp_size || (uintptr_t)src % cp_size)
        emu_fail("cp.async of %d bytes from %p to %p: both addresses must be %d-byte aligned", cp_size, src, dst,
                 cp_size);
    if (!is_shared(d, cp_size)) emu_fail("cp.async destination %p is not shared memory of this block", dst);
    Copy c;
    c.dst = d;
    c.bytes = cp_size;
    c.group = -1;
    if (src_size > 0) {
        if (where_range(src, src_size, "cp.async source") == WHERE_HOST)
            emu_fail("cp.async source %p is not device memory", src);
        memcpy(c.data, src, src_size);
    }
    memset(c.data + src_size, 0, cp_size - src_size);
    // For the race checker: the source is read now, and the destination
    // written now -- the copy may land any time until the wait, so whatever
    // another thread does to those bytes without a barrier since races with it.
    if (src_size > 0) race_access(src, src_size, 0, __builtin_return_address(0));
    race_access(d, cp_size, 1, __builtin_return_address(0));
    for (char *q = d; q < d + cp_size; q += 4) {
        Word &w = word_of(bs, q);
        if (w.state == W_PENDING)
            emu_fail("cp.async by thread %d into shared memory (%s) whose earlier cp.async (thread %d) has not "
                     "landed", tid, where_in_smem(bs, q), w.owner);
        w = Word{W_PENDING, tid, 0};
        bs.pending++;
    }
    memset(d, 0xff, cp_size); // undefined until it lands
    bs.th[tid].copies.push_back(c);
    if (profiling()) {
        g_cp_async++;
        g_cp_bytes += cp_size;
    }
}

void emu::cp_async_commit() {
    BlockState &bs = block_state("cp.async.commit_group");
    ThreadCopies &tc = bs.th[linear_tid()];
    for (Copy &c : tc.copies)
        if (c.group < 0) c.group = tc.committed;
    tc.committed++;
}

void emu::cp_async_wait(int n) {
    BlockState &bs = block_state("cp.async.wait_group");
    if (n < 0) emu_fail("cp.async.wait_group %d", n);
    int tid = linear_tid();
    ThreadCopies &tc = bs.th[tid];
    long limit = tc.committed - n; // groups [0, limit) complete
    std::vector<Copy> keep;
    for (Copy &c : tc.copies) {
        if (c.group < 0 || c.group >= limit) {
            keep.push_back(c);
            continue;
        }
        memcpy(c.dst, c.data, c.bytes);
        uint64_t now = block_barriers();
        for (char *q = c.dst; q < c.dst + c.bytes; q += 4) word_of(bs, q) = Word{W_LANDED, tid, now};
        bs.pending -= c.bytes / 4;
        bs.landed += c.bytes / 4;
        bs.land_epoch = now;
    }
    tc.copies.swap(keep);
}

void emu::smem_read_check(const void *p, size_t bytes) {
    BlockState &bs = block_state("a shared-memory read");
    if (all_published(bs)) return;
    if (!is_shared(p, bytes)) return; // not shared memory: nothing a cp.async could write
    check_read(bs, (const char *)p, bytes, linear_tid(), "a read");
}
