// CUDA emulation on the CPU, device side (tests/emu; C++ only, included by
// the emulated cuda_runtime.h). A kernel launch runs the grid block after
// block; the threads of a block are coroutines that switch only at
// __syncthreads, __syncwarp and warp shuffles, so barriers and shuffles have
// CUDA's semantics -- a __syncwarp or shuffle waits for the lanes its mask
// names -- and a barrier that cannot complete is reported (emu_kernel.cc).
// __shared__ variables are statics, shared by the block being run. Launches
// are rewritten from `k<<<cfg>>>(args)` to `emu::Cfg("k", cfg).run(k)(args)`
// by tests/emu/cu2cc.sed. Atomics are real atomic instructions, so that the
// race build (emu_race.cc) sees them as atomic accesses.
#ifndef EMU_DEVICE_H
#define EMU_DEVICE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
    unsigned int x, y, z, w;
};
struct float4 {
    float x, y, z, w;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
// Static shared memory: one copy per variable in the section emu_shared,
// poisoned (0xff) before every block like dynamic shared memory; kernels run
// one at a time in the whole process, so one copy is enough.
#define __shared__ static __attribute__((section("emu_shared"), used))

namespace emu {

const uint3 &thread_idx();
const uint3 &block_idx();
const dim3 &block_dim();
const dim3 &grid_dim();
void *dyn_smem();
// The order blocks and threads run in: "forward", "reverse" or "shuffle"
// (the environment's EMU_ORDER at start-up; this is for the emulator's test).
void set_order(const char *order);
// Whether this program is the race build (make test-emu-race), whose kernels
// have every memory access checked (emu_race.cc).
bool race_on();
// file and line: where the __syncthreads is, to tell one barrier reached from
// two places (a divergent __syncthreads).
void syncthreads(const char *file, int line);
void syncwarp(unsigned int mask);
uint64_t shfl_xor(unsigned int mask, uint64_t bits, int lane_mask, int width);

// Runs body() for every thread of every block. ptrs: the kernel's pointer
// arguments, each checked to be device memory (or NULL) before the launch.
void launch(const char *name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            const std::function<void()> &body, const void *const *ptrs, const int *ptr_arg_index, int n_ptrs);

template <class T> static inline void collect_ptr(const T &, const void **, int *, int, int &) {}
template <class T> static inline void collect_ptr(T *const &p, const void **ptrs, int *idx, int i, int &n) {
    ptrs[n] = (const void *)p;
    idx[n++] = i;
}

struct Cfg {
    const char *name;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    Cfg(const char *n, dim3 g, dim3 b, size_t s = 0, cudaStream_t st = 0) : name(n), grid(g), block(b), smem(s), stream(st) {}

    template <class... P> auto run(void (*kernel)(P...)) const {
        Cfg cfg = *this;
        return [cfg, kernel](auto &&...a) {
            // The arguments by value, kept with the launch (a captured launch runs at every replay).
            auto args = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<decltype(a)>(a)...);
            const void *ptrs[sizeof...(P) + 1];
            int idx[sizeof...(P) + 1], n = 0, i = 0;
            std::apply([&](const auto &...x) { ((collect_ptr(x, ptrs, idx, i++, n)), ...); }, *args);
            // Every thread gets its own copy of the arguments, as on the GPU.
            std::function<void()> body = [args, kernel]() { std::apply(kernel, *args); };
            launch(cfg.name, cfg.grid, cfg.block, cfg.smem, cfg.stream, body, ptrs, idx, n);
        };
    }
};

} // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx())
#define blockDim (emu::block_dim())
#define gridDim (emu::grid_dim())
#define warpSize 32

#define __syncthreads() emu::syncthreads(__FILE__, __LINE__)
static inline void __syncwarp(unsigned int mask = 0xffffffffu) { emu::syncwarp(mask); }

template <class T> static inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    bits = emu::shfl_xor(mask, bits, lane_mask, width);
    T out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

// Atomics as read-modify-writes of the __atomic builtins: integers by
// fetch-and-add, floating point by compare-and-swap. (Threads of one OS
// thread never run at the same time, so a plain update would compute the
// same; the builtins are what lets the race build tell them from plain
// accesses.)
template <class T> static inline T atomicAdd(T *p, T v) {
    if constexpr (std::is_integral<T>::value) {
        return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    } else {
        T old, sum;
        __atomic_load(p, &old, __ATOMIC_RELAXED);
        do sum = old + v;
        while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        return old;
    }
}
template <class T> static inline T atomicMax(T *p, T v) {
    T old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange(p, &old, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

// CUDA's integer and floating-point min/max overloads.
#define EMU_MINMAX(T)                                          \
    static inline T min(T a, T b) { return b < a ? b : a; } \
    static inline T max(T a, T b) { return a < b ? b : a; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned int)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
EMU_MINMAX(long)
EMU_MINMAX(unsigned long)
#undef EMU_MINMAX
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

// __expf and __logf: glibc declares them with the same meaning.
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, sizeof i);
    return i;
}
static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}

#endif
