// 16-byte (128-bit) loads and stores for the memory-bound kernels.
//
// A kernel that only moves data runs at the speed of its memory accesses, and
// a GPU moves the most bytes per instruction with one 16-byte access per
// thread (ld.global.v4 / st.global.v4) instead of 4 or 8 scalar ones. So the
// elementwise kernels give every thread a group of consecutive elements of a
// row -- VEC_X of them: 16 bytes of floatX, 8 in bf16, 4 in fp32 -- and are
// compiled twice, by a template parameter ALIGNED:
//
//   ALIGNED = true    each group is one 16-byte access per array (two for an
//                     fp32 array in the bf16 build); needs every pointer
//                     16-byte aligned and rows that are whole groups;
//   ALIGNED = false   the same groups, one element at a time: any alignment,
//                     any row length (a row's last group may be partial).
//
// The host decides once per call (vec_path). Both paths do the same
// arithmetic on the same groups in the same order, so their results are the
// same bits (tests/test_kernels.cu checks it for every kernel, and the
// emulator's test runs the whole trainer both ways). MOE_VEC=0 in the
// environment sends every call down the scalar path, for bisecting a bug.
#ifndef KERNELS_VEC_CUH
#define KERNELS_VEC_CUH

#include <string.h>

#include "common.cuh"

enum { VEC_BYTES = 16 };
// Elements per group: 16 bytes of floatX (for fp32 arrays in the same kernel,
// 32 bytes in the bf16 build); VEC_F: 16 bytes of fp32, for fp32-only kernels.
constexpr int VEC_X = VEC_BYTES / (int)sizeof(floatX);
constexpr int VEC_F = VEC_BYTES / (int)sizeof(float);

// 16 bytes of T, aligned so that copying one is a single 128-bit access.
template <class T> struct alignas(VEC_BYTES) Vec16 {
    T e[VEC_BYTES / sizeof(T)];
};

// ----------------------------------------------------------------------------
// Device side

// Rounds a float into an array's element type (to nearest even for bf16).
__device__ __forceinline__ void vec_put(float &dst, float v) { dst = v; }
__device__ __forceinline__ void vec_put(__nv_bfloat16 &dst, float v) { dst = __float2bfloat16_rn(v); }

// dst[0..G) = src[0..G) as floats, of which the first n exist (n >= 1, and
// n >= G for a whole group: callers pass what is left of the row; the
// missing ones read as 0). One 16-byte access per 16 bytes when ALIGNED and the
// group is whole (then src is 16-byte aligned: the caller's vec_path).
template <bool ALIGNED, int G, class T>
__device__ __forceinline__ void vec_load(float (&dst)[G], const T *src, int n) {
    constexpr int PER = VEC_BYTES / sizeof(T);
    static_assert(G % PER == 0, "a group is a whole number of 16-byte vectors");
    if (ALIGNED && n >= G) {
        for (int k = 0; k < G / PER; k++) {
            Vec16<T> v = reinterpret_cast<const Vec16<T> *>(src)[k];
            for (int i = 0; i < PER; i++) dst[k * PER + i] = to_f(v.e[i]);
        }
    } else {
        for (int i = 0; i < G; i++) dst[i] = i < n ? to_f(src[i]) : 0.0f;
    }
}

// dst[0..min(n, G)) = src[...], rounded to T; the same access rule as vec_load.
template <bool ALIGNED, int G, class T>
__device__ __forceinline__ void vec_store(T *dst, const float (&src)[G], int n) {
    constexpr int PER = VEC_BYTES / sizeof(T);
    static_assert(G % PER == 0, "a group is a whole number of 16-byte vectors");
    if (ALIGNED && n >= G) {
        for (int k = 0; k < G / PER; k++) {
            Vec16<T> v;
            for (int i = 0; i < PER; i++) vec_put(v.e[i], src[k * PER + i]);
            reinterpret_cast<Vec16<T> *>(dst)[k] = v;
        }
    } else {
        for (int i = 0; i < G; i++)
            if (i < n) vec_put(dst[i], src[i]);
    }
}

// dst[0..min(n, G)) = src[...] unchanged (bits copied), with G elements of T
// a whole number of 16-byte vectors; the same access rule as vec_load.
template <bool ALIGNED, int G, class T> __device__ __forceinline__ void vec_copy(T *dst, const T *src, int n) {
    constexpr int PER = VEC_BYTES / sizeof(T);
    static_assert(G % PER == 0, "a group is a whole number of 16-byte vectors");
    if (ALIGNED && n >= G) {
        for (int k = 0; k < G / PER; k++)
            reinterpret_cast<Vec16<T> *>(dst)[k] = reinterpret_cast<const Vec16<T> *>(src)[k];
    } else {
        for (int i = 0; i < G && i < n; i++) dst[i] = src[i];
    }
}

// ----------------------------------------------------------------------------
// Host side

// Which path the calls took since the start (the tests check that aligned
// rows take the vector path and the others do not). Atomic: the backends of
// test_gpu_dist run in threads.
struct VecStats {
    long vector, scalar;
};
inline VecStats &vec_stats() {
    static VecStats s;
    return s;
}

// 1 unless switched off: MOE_VEC=0 in the environment (read once, at the
// first call), or vec_set_enabled(0) (the tests, to run the scalar paths).
inline int vec_env_enabled() {
    const char *e = getenv("MOE_VEC");
    return !(e && strcmp(e, "0") == 0);
}
inline int &vec_enabled_flag() {
    static int on = vec_env_enabled();
    return on;
}
inline void vec_set_enabled(int on) { vec_enabled_flag() = on; }

// Whether a call takes the 16-byte path: its rows are whole groups
// (rows_ok: the row length a multiple of the group, decided by the caller),
// every pointer it accesses by groups is 16-byte aligned (NULL counts as
// aligned: an array the call does not touch), and the path is not switched off.
template <class... P> inline bool vec_path(bool rows_ok, const P *...p) {
    bool ok = rows_ok && vec_enabled_flag() && ((((uintptr_t)p) % VEC_BYTES == 0) && ...);
    __atomic_fetch_add(ok ? &vec_stats().vector : &vec_stats().scalar, 1, __ATOMIC_RELAXED);
    return ok;
}

#endif
