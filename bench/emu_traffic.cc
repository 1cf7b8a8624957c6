// Device-memory traffic of every kernel, measured on the CPU emulator
// (tests/emu): launches, and bytes read and written -- as the threads ask for
// them, and distinct bytes -- per kernel name, written at exit. A benchmark, not a test (docs/gpu.md,
// "Memory-bound kernels").
//
// The race build (make test-emu-race) compiles the CUDA code with
// -fsanitize=thread, which calls __tsan_read4(p), __tsan_write16(p), ...
// before every memory access; the emulator's checker (tests/emu/emu_race.cc)
// implements them. This file is linked in front of it with the linker's
// --wrap (tests/emu/emu.mk, train_moecu_traffic): each hook counts the access
// when a kernel is running and the address is device memory, then calls the
// checker's own hook, so the races and bounds are still checked. Launches are
// attributed to kernels by wrapping emu::race_launch_begin, which the
// emulator calls with the kernel's name. Not counted: atomics, shared
// memory, the emulator's GEMMs, copies and collectives (not kernels).
//
// Two counts, bounds of what a GPU moves between its memory and its SMs:
// the bytes the threads ask for (a row read twice counts twice, and an index
// every thread of a block reads counts once per thread, though on a GPU the
// second read comes from a cache and the index is one broadcast), and the
// distinct bytes each launch reads and writes (what a perfect cache would
// move). (How many accesses carry the bytes says nothing about a GPU: the
// host compiler splits a 16-byte load of floats into four; the GPU's access
// widths are in the PTX.)
//
//   EMU_TRAFFIC=FILE build/emu-race/train_moecu_traffic ...   (the table goes to FILE)
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_runtime.h"
#include "tests/emu/emu_internal.h"

namespace {

struct Traffic {
    long launches;
    long long read_bytes, write_bytes;       // as asked for
    long long distinct_read, distinct_write; // distinct bytes, summed over launches
};

std::mutex g_mutex;
std::map<std::string, Traffic> g_traffic;
Traffic *g_current; // the kernel being run (kernels run one at a time in a process)

// The bytes the current launch has read and written so far, a bit per byte
// of each device allocation it touched (by allocation number).
struct Seen {
    std::vector<uint64_t> read, written;
};
std::unordered_map<unsigned long, Seen> g_seen;

// Marks [off, off + n) in bits; returns how many were not marked yet.
long long mark(std::vector<uint64_t> &bits, size_t size, uintptr_t off, unsigned long n) {
    if (bits.empty()) bits.assign((size + 63) / 64, 0);
    long long fresh = 0;
    for (uintptr_t i = off; i < off + n && i < size; i++) {
        uint64_t bit = 1ull << (i % 64);
        if (!(bits[i / 64] & bit)) {
            bits[i / 64] |= bit;
            fresh++;
        }
    }
    return fresh;
}

void count(const void *p, unsigned long n, int write) {
    emu::DevRegion r;
    if (!g_current || !emu::in_kernel() || !emu::device_region(p, 0, &r) || (uintptr_t)p < r.user) return;
    (write ? g_current->write_bytes : g_current->read_bytes) += (long long)n;
    Seen &s = g_seen[r.id];
    uintptr_t off = (uintptr_t)p - r.user;
    if (write) g_current->distinct_write += mark(s.written, r.size, off, n);
    else g_current->distinct_read += mark(s.read, r.size, off, n);
}

void print(void) {
    const char *path = getenv("EMU_TRAFFIC");
    FILE *f = path ? fopen(path, "w") : stderr;
    if (!f) {
        fprintf(stderr, "emu_traffic: cannot write %s\n", path);
        return;
    }
    fprintf(f, "# kernel launches read_bytes write_bytes distinct_read distinct_write\n");
    for (auto &k : g_traffic) {
        const Traffic &t = k.second;
        fprintf(f, "%s %ld %lld %lld %lld %lld\n", k.first.c_str(), t.launches, t.read_bytes, t.write_bytes,
                t.distinct_read, t.distinct_write);
    }
    if (f != stderr) fclose(f);
}

} // namespace

// The checker's hooks and the emulator's launch notice, as the linker's
// --wrap names them: __real_X is the original X, calls of X reach __wrap_X.
extern "C" {
#define TRAFFIC_HOOKS(n)                                                                                      \
    void __real___tsan_read##n(void *p);                                                                     \
    void __real___tsan_write##n(void *p);                                                                    \
    void __real___tsan_unaligned_read##n(void *p);                                                           \
    void __real___tsan_unaligned_write##n(void *p);                                                          \
    void __wrap___tsan_read##n(void *p) { count(p, n, 0); __real___tsan_read##n(p); }                        \
    void __wrap___tsan_write##n(void *p) { count(p, n, 1); __real___tsan_write##n(p); }                      \
    void __wrap___tsan_unaligned_read##n(void *p) { count(p, n, 0); __real___tsan_unaligned_read##n(p); }    \
    void __wrap___tsan_unaligned_write##n(void *p) { count(p, n, 1); __real___tsan_unaligned_write##n(p); }
TRAFFIC_HOOKS(1)
TRAFFIC_HOOKS(2)
TRAFFIC_HOOKS(4)
TRAFFIC_HOOKS(8)
TRAFFIC_HOOKS(16)
#undef TRAFFIC_HOOKS
void __real___tsan_read_range(void *p, unsigned long n);
void __real___tsan_write_range(void *p, unsigned long n);
void __wrap___tsan_read_range(void *p, unsigned long n) { count(p, n, 0); __real___tsan_read_range(p, n); }
void __wrap___tsan_write_range(void *p, unsigned long n) { count(p, n, 1); __real___tsan_write_range(p, n); }

// emu::race_launch_begin(const char *, dim3, dim3, void *, size_t), by its mangled name.
void __real__ZN3emu17race_launch_beginEPKc4dim3S2_Pvm(const char *name, dim3 grid, dim3 block, void *smem,
                                                       size_t bytes);
void __wrap__ZN3emu17race_launch_beginEPKc4dim3S2_Pvm(const char *name, dim3 grid, dim3 block, void *smem,
                                                       size_t bytes) {
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        static std::once_flag once;
        std::call_once(once, [] { atexit(print); });
        g_current = &g_traffic[name];
        g_current->launches++;
        g_seen.clear();
    }
    __real__ZN3emu17race_launch_beginEPKc4dim3S2_Pvm(name, grid, block, smem, bytes);
}
}
