// Tensor-core building blocks, shared by the kernels that multiply tiles
// staged in shared memory (the fused attention, the grouped expert GEMM):
// the warp-level fragments of mma.m16n8k16 (bf16 inputs, fp32
// accumulators), their loads from shared memory (ldmatrix), the mma itself,
// the asynchronous global -> shared copies that stage tiles (cp.async), a
// swizzled shared-memory tile layout, and the warp-level GEMM loops built
// from them.
//
// Why mma.sync and not WMMA: the PTX ISA documents which lane holds which
// element of an mma.sync fragment ("Matrix Fragments for mma.m16n8k16 with
// floating point type"), while WMMA's fragment layout is unspecified. The
// attention kernels need the layout: they mask, exponentiate and rescale
// accumulator elements knowing their row and column, and they reuse the
// accumulators of one product (the probabilities) as the A operand of the
// next in registers, as FlashAttention-2 does (arXiv 2307.08691). The
// emulator (tests/emu) can implement a documented layout; an unspecified one
// it could only guess.
//
// The FP32 build (-DENABLE_FP32) has no bf16 tensor cores to use (and TF32
// would round the inputs to 10 mantissa bits): the same fragment types and
// functions exist with plain fp32 FMAs behind them, and a thread owns the
// same accumulator elements as in the bf16 build, so a kernel written with
// them runs the same tiling in both builds. Only what is inside a fragment
// differs: a thread holds the whole 16-long k-vectors it needs (rows g and
// g + 8 of A, columns 2t and 2t + 1 of B) and multiplies them itself.
//
// Lane naming of the PTX ISA: g = groupID = lane >> 2, t =
// threadID_in_group = lane % 4. Blocks are one-dimensional (lane =
// threadIdx.x % 32), and every lane of a warp calls the warp-level functions
// together (they are .sync.aligned).
//
// With nvcc the instructions are inline PTX; on the CPU emulator (a host
// compiler, no __CUDACC__) the same functions call tests/emu/emu_mma.cc,
// which implements the instructions from the ISA's definitions.
#ifndef KERNELS_MMA_CUH
#define KERNELS_MMA_CUH

#include "common.cuh"

#ifndef __CUDACC__
#include <emu_mma.h>
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kernels/mma.cuh needs sm_80 or newer (bf16 mma.sync, cp.async): build with GPU_ARCH=sm_80 or later"
#endif

// Before a loop over register arrays (fragments): unrolled, so that every
// index is a constant and the arrays stay in registers.
#ifdef __CUDACC__
#define UNROLL _Pragma("unroll")
#else
#define UNROLL
#endif
// The k loop of warp_gemm_abt: unrolled with tensor cores; in the FP32 build
// each step is already 4 N k-long dot products per thread, and unrolling
// them all only makes nvcc spill.
#if defined(__CUDACC__) && defined(ENABLE_FP32)
#define UNROLL_K _Pragma("unroll 1")
#else
#define UNROLL_K UNROLL
#endif

// ----------------------------------------------------------------------------
// The instructions

// A plain read of shared memory that a cp.async may have written: on the
// emulator it stops if the copy has not landed or is not yet visible to this
// thread (see emu_mma.cc).
__device__ __forceinline__ void smem_check(const void *p, size_t bytes) {
#ifndef __CUDACC__
    emu::smem_read_check(p, bytes);
#endif
}
template <class T> __device__ __forceinline__ T lds(const T *p) {
    smem_check(p, sizeof(T));
    return *p;
}

#ifdef __CUDACC__
// The .shared address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
#endif

// cp.async.cg of 16 bytes from global to shared memory; only the first
// src_bytes (0 or 16 here) are read, the rest is zero-filled. Both addresses
// 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void *smem, const void *gmem, int src_bytes) {
#ifdef __CUDACC__
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
                 : "memory");
#else
    emu::cp_async(smem, gmem, 16, src_bytes);
#endif
}

// The copies issued since the last commit become one group.
__device__ __forceinline__ void cp_async_commit() {
#ifdef __CUDACC__
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    emu::cp_async_commit();
#endif
}

// Waits until at most N committed groups are in flight. The data is then
// visible to this thread; other threads need a __syncthreads after it.
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef __CUDACC__
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
    emu::cp_async_wait(N);
#endif
}

// ldmatrix .x4 (TRANS: .x4.trans): four 8 x 8 matrices of 16-bit elements;
// lane l gives the address of row l % 8 of matrix l / 8; r[i] receives, of
// matrix i, the two elements of row g at columns 2t, 2t + 1 (transposed: of
// column g at rows 2t, 2t + 1).
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *row) {
#ifdef __CUDACC__
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(row))
                     : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(row))
                     : "memory");
#else
    emu::ldmatrix_m8n8(r, 4, TRANS, row);
#endif
}

// c (16 x 8, fp32) += a (16 x 16, bf16) b (16 x 8, bf16), the warp together.
__device__ __forceinline__ void mma_bf16_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef __CUDACC__
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    emu::mma_m16n8k16_bf16(c, a, b, c);
#endif
}

// Two floats rounded to bf16 (nearest even) in one register, lo in the lower half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
#ifdef __CUDACC__
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
#else
    return (uint32_t)__float2bfloat16_rn(lo).x | (uint32_t)__float2bfloat16_rn(hi).x << 16;
#endif
}

// ----------------------------------------------------------------------------
// Shared-memory tiles
//
// A tile is ROWS x COLS floatX elements, row-major, with the 16-byte chunks
// of row r XOR-permuted by r (within aligned groups of up to 8 chunks), so
// that the 8 rows an ldmatrix reads, or that the threads of a warp write
// with cp.async, fall in different banks. Tile<COLS>::at(r, c) is the
// element's index.

template <int COLS> struct Tile {
    static constexpr int CHUNK = 16 / (int)sizeof(floatX); // elements per 16-byte chunk
    static constexpr int NCHUNK = COLS / CHUNK;
    static constexpr int SWZ = (NCHUNK & -NCHUNK) < 8 ? (NCHUNK & -NCHUNK) : 8;
    static_assert(COLS % CHUNK == 0, "tile rows are whole 16-byte chunks");
    static __device__ __forceinline__ int at(int row, int col) {
        return row * COLS + (((col / CHUNK) ^ (row & (SWZ - 1))) * CHUNK) + col % CHUNK;
    }
};

// Stages rows [0, valid) and columns [0, valid_cols) of a ROWS x COLS tile
// from global memory (row r at src + r * ld, 16-byte aligned rows) into
// `tile` with 16-byte cp.async, and zero-fills the rest; valid >= 1 and
// valid_cols >= 1 a multiple of Tile<COLS>::CHUNK (src itself is the address
// the zero-filling copies name). Every thread of the block takes part; the
// caller commits and waits.
template <int ROWS, int COLS>
__device__ __forceinline__ void tile_load_async(floatX *tile, const floatX *src, int64_t ld, int valid,
                                                int valid_cols = COLS) {
    constexpr int NCH = Tile<COLS>::NCHUNK, CH = Tile<COLS>::CHUNK;
    for (int i = threadIdx.x; i < ROWS * NCH; i += blockDim.x) {
        int r = i / NCH, c = i % NCH * CH, ok = r < valid && c < valid_cols;
        cp_async_16(tile + Tile<COLS>::at(r, c), src + (ok ? (int64_t)r * ld + c : 0), ok ? 16 : 0);
    }
}

// ----------------------------------------------------------------------------
// Fragments
//
// FragC: 16 x 8 fp32 accumulators; x[i] is row g + 8 (i >> 1), column
// 2t + (i & 1). FragA: a 16 x 16 A operand; FragB: a 16 x 8 B operand
// (k x n).
//   bf16: the PTX registers. A: x[0] row g, columns 2t, 2t + 1; x[1] row
//         g + 8; x[2], x[3] the same at columns + 8. B: x[0] rows (k) 2t,
//         2t + 1 of column g; x[1] rows + 8.
//   fp32: x[h][s] is row g + 8h of A (column 2t + h of B) at k = frag_k(s),
//         a permutation of 0..15 that puts the elements each quad lane
//         contributes (see frag_a_from_c) at fixed register indices.

struct FragC {
    float x[4];
};

#ifdef ENABLE_FP32
struct FragA {
    float x[2][16];
};
struct FragB {
    float x[2][16];
};
// Slot s = 8 half + 2 m + j holds k = 8 half + 2 (t ^ m) + j.
__device__ __forceinline__ int frag_k(int s, int t) { return (s & 8) + 2 * (((s >> 1) & 3) ^ t) + (s & 1); }
#else
struct FragA {
    uint32_t x[4];
};
struct FragB {
    uint32_t x[2];
};
#endif

__device__ __forceinline__ void frag_zero(FragC *c, int n) {
    UNROLL
    for (int i = 0; i < n; i++) c[i].x[0] = c[i].x[1] = c[i].x[2] = c[i].x[3] = 0.0f;
}

#ifdef ENABLE_FP32
// The emulator's read checks (smem_check) of what an fp32 fragment load
// reads, by 16-byte chunks rather than element by element: row r at columns
// k0 .. k0 + 15 (four chunks), and columns c, c + 1, c + 8, c + 9 (c even).
template <int COLS> __device__ __forceinline__ void frag_check_row(const floatX *tile, int r, int k0) {
    UNROLL
    for (int c = 0; c < 16; c += 4) smem_check(tile + Tile<COLS>::at(r, k0 + c), 16);
}
template <int COLS> __device__ __forceinline__ void frag_check_pair(const floatX *tile, int r, int c) {
    smem_check(tile + Tile<COLS>::at(r, c), 8);
    smem_check(tile + Tile<COLS>::at(r, c + 8), 8);
}
#endif

// A (16 x 16) = tile[r0 .. r0 + 15][k0 .. k0 + 15].
template <int COLS> __device__ __forceinline__ void frag_load_a(FragA &a, const floatX *tile, int r0, int k0) {
    int lane = threadIdx.x & 31;
#ifdef ENABLE_FP32
    int g = lane >> 2, t = lane & 3;
    UNROLL
    for (int h = 0; h < 2; h++) {
        frag_check_row<COLS>(tile, r0 + g + 8 * h, k0);
        UNROLL
        for (int s = 0; s < 16; s++) a.x[h][s] = tile[Tile<COLS>::at(r0 + g + 8 * h, k0 + frag_k(s, t))];
    }
#else
    // matrices: rows r0 / r0 + 8 (bit 0 of the matrix index) x columns k0 / k0 + 8 (bit 1)
    int m = lane >> 3, r = r0 + (lane & 7) + 8 * (m & 1), c = k0 + 8 * (m >> 1);
    ldmatrix_x4<false>(a.x, tile + Tile<COLS>::at(r, c));
#endif
}

// A (16 x 16) from a tile stored k-major: A[m][k] = tile[k0 + k][m0 + m]
// (e.g. dY in dW = dY^T X, whose rows are the reduction).
template <int COLS> __device__ __forceinline__ void frag_load_a_km(FragA &a, const floatX *tile, int k0, int m0) {
    int lane = threadIdx.x & 31;
#ifdef ENABLE_FP32
    int g = lane >> 2, t = lane & 3;
    UNROLL
    for (int h = 0; h < 2; h++)
        UNROLL
        for (int s = 0; s < 16; s++) {
            const floatX *p = tile + Tile<COLS>::at(k0 + frag_k(s, t), m0 + g + 8 * h);
            smem_check(p, sizeof(floatX));
            a.x[h][s] = *p;
        }
#else
    // transposed matrices: columns m0 / m0 + 8 (bit 0 of the matrix index) x rows k0 / k0 + 8 (bit 1),
    // the order of the A registers (x[1]: rows + 8, x[2]: columns + 8 of A)
    int m = lane >> 3, r = k0 + (lane & 7) + 8 * (m >> 1), c = m0 + 8 * (m & 1);
    ldmatrix_x4<true>(a.x, tile + Tile<COLS>::at(r, c));
#endif
}

// Two B operands (n-tiles n0 .. n0 + 7 and n0 + 8 .. n0 + 15) of a tile
// stored n-major: B[k][n] = tile[n0 + n][k0 + k] (e.g. K in S = Q K^T).
template <int COLS> __device__ __forceinline__ void frag_load_b2_nk(FragB b[2], const floatX *tile, int n0, int k0) {
    int lane = threadIdx.x & 31;
#ifdef ENABLE_FP32
    int t = lane & 3;
    UNROLL
    for (int nt = 0; nt < 2; nt++)
        UNROLL
        for (int j = 0; j < 2; j++) {
            frag_check_row<COLS>(tile, n0 + 8 * nt + 2 * t + j, k0);
            UNROLL
            for (int s = 0; s < 16; s++)
                b[nt].x[j][s] = tile[Tile<COLS>::at(n0 + 8 * nt + 2 * t + j, k0 + frag_k(s, t))];
        }
#else
    // matrices: columns k0 / k0 + 8 (bit 0) x rows n0 / n0 + 8 (bit 1)
    int m = lane >> 3, r = n0 + (lane & 7) + 8 * (m >> 1), c = k0 + 8 * (m & 1);
    uint32_t x[4];
    ldmatrix_x4<false>(x, tile + Tile<COLS>::at(r, c));
    b[0].x[0] = x[0], b[0].x[1] = x[1], b[1].x[0] = x[2], b[1].x[1] = x[3];
#endif
}

// Two B operands of a tile stored k-major: B[k][n] = tile[k0 + k][n0 + n]
// (e.g. V in O = P V).
template <int COLS> __device__ __forceinline__ void frag_load_b2_kn(FragB b[2], const floatX *tile, int k0, int n0) {
    int lane = threadIdx.x & 31;
#ifdef ENABLE_FP32
    int t = lane & 3;
    UNROLL
    for (int s = 0; s < 16; s++) frag_check_pair<COLS>(tile, k0 + frag_k(s, t), n0 + 2 * t); // rows k0 .. k0 + 15
    UNROLL
    for (int nt = 0; nt < 2; nt++)
        UNROLL
        for (int j = 0; j < 2; j++)
            UNROLL
            for (int s = 0; s < 16; s++)
                b[nt].x[j][s] = tile[Tile<COLS>::at(k0 + frag_k(s, t), n0 + 8 * nt + 2 * t + j)];
#else
    // transposed matrices: rows k0 / k0 + 8 (bit 0) x columns n0 / n0 + 8 (bit 1)
    int m = lane >> 3, r = k0 + (lane & 7) + 8 * (m & 1), c = n0 + 8 * (m >> 1);
    uint32_t x[4];
    ldmatrix_x4<true>(x, tile + Tile<COLS>::at(r, c));
    b[0].x[0] = x[0], b[0].x[1] = x[1], b[1].x[0] = x[2], b[1].x[1] = x[3];
#endif
}

// The accumulators of a 16 x 16 product (lo: columns 0-7, hi: 8-15) as the
// A operand of the next product, in registers (rounded to bf16 in the bf16
// build). In the fp32 build each lane gathers its rows from the other three
// lanes of its quad with shuffles.
__device__ __forceinline__ void frag_a_from_c(FragA &a, const FragC &lo, const FragC &hi) {
#ifdef ENABLE_FP32
    UNROLL
    for (int m = 0; m < 4; m++) {
        float v[8] = {lo.x[0], lo.x[1], lo.x[2], lo.x[3], hi.x[0], hi.x[1], hi.x[2], hi.x[3]};
        if (m > 0) // lane ^ m's values, two per 64-bit shuffle
            UNROLL
            for (int q = 0; q < 4; q++) {
                unsigned long long w = (unsigned long long)(unsigned int)__float_as_int(v[2 * q]) |
                                       (unsigned long long)(unsigned int)__float_as_int(v[2 * q + 1]) << 32;
                w = __shfl_xor_sync(0xffffffffu, w, m);
                v[2 * q] = __int_as_float((int)(unsigned int)(w & 0xffffffffu));
                v[2 * q + 1] = __int_as_float((int)(unsigned int)(w >> 32));
            }
        UNROLL
        for (int h = 0; h < 2; h++)
            UNROLL
            for (int j = 0; j < 2; j++) {
                a.x[h][2 * m + j] = v[2 * h + j];         // k = 2 (t ^ m) + j
                a.x[h][8 + 2 * m + j] = v[4 + 2 * h + j]; // k = 8 + 2 (t ^ m) + j
            }
    }
#else
    a.x[0] = pack_bf16x2(lo.x[0], lo.x[1]);
    a.x[1] = pack_bf16x2(lo.x[2], lo.x[3]);
    a.x[2] = pack_bf16x2(hi.x[0], hi.x[1]);
    a.x[3] = pack_bf16x2(hi.x[2], hi.x[3]);
#endif
}

// c += a b, the warp together.
__device__ __forceinline__ void mma(FragC &c, const FragA &a, const FragB &b) {
#ifdef ENABLE_FP32
    UNROLL
    for (int i = 0; i < 4; i++) {
        float s = c.x[i];
        UNROLL
        for (int k = 0; k < 16; k++) s = fmaf(a.x[i >> 1][k], b.x[i & 1][k], s);
        c.x[i] = s;
    }
#else
    mma_bf16_16816(c.x, a.x, b.x);
#endif
}

// ----------------------------------------------------------------------------
// Warp-level GEMM loops over shared-memory tiles

// c (16 x N, N/8 fragments) += A (16 x K) B (K x N), with A the rows
// ra0 .. ra0 + 15 of tile ta and B the columns 0 .. N of tile tb, each
// stored either way: A_KM: ta[k][m] (k-major), else ta[m][k]; B_KM: tb[k][n],
// else tb[n][k]. Row widths CA and CB.
template <int N, int K, int CA, int CB, bool A_KM, bool B_KM>
__device__ __forceinline__ void warp_gemm_acc(FragC *c, const floatX *ta, int ra0, const floatX *tb) {
    static_assert(N % 16 == 0 && K % 16 == 0, "whole 16 x 16 steps");
    UNROLL_K
    for (int kk = 0; kk < K; kk += 16) {
        FragA a;
        if (A_KM)
            frag_load_a_km<CA>(a, ta, kk, ra0);
        else
            frag_load_a<CA>(a, ta, ra0, kk);
        UNROLL
        for (int n = 0; n < N; n += 16) {
            FragB b[2];
            if (B_KM)
                frag_load_b2_kn<CB>(b, tb, kk, n);
            else
                frag_load_b2_nk<CB>(b, tb, n, kk);
            mma(c[n / 8], a, b[0]);
            mma(c[n / 8 + 1], a, b[1]);
        }
    }
}

// c (16 x N, N/8 fragments) = ta[ra0 .. ra0 + 15][0 .. K) tb[0 .. N)[0 .. K)^T:
// both tiles k-contiguous (row widths CA and CB).
template <int N, int K, int CA, int CB>
__device__ __forceinline__ void warp_gemm_abt(FragC *c, const floatX *ta, int ra0, const floatX *tb) {
    frag_zero(c, N / 8);
    warp_gemm_acc<N, K, CA, CB, false, false>(c, ta, ra0, tb);
}

// c (16 x N, N/8 fragments) += p (16 x K, K/8 accumulator fragments used as
// A) tb[0 .. K)[0 .. N): tb n-contiguous (row width CB).
template <int N, int K, int CB> __device__ __forceinline__ void warp_gemm_cb(FragC *c, const FragC *p, const floatX *tb) {
    static_assert(N % 16 == 0 && K % 16 == 0, "whole 16 x 16 steps");
    UNROLL
    for (int kk = 0; kk < K; kk += 16) {
        FragA a;
        frag_a_from_c(a, p[kk / 8], p[kk / 8 + 1]);
        UNROLL
        for (int n = 0; n < N; n += 16) {
            FragB b[2];
            frag_load_b2_kn<CB>(b, tb, kk, n);
            mma(c[n / 8], a, b[0]);
            mma(c[n / 8 + 1], a, b[1]);
        }
    }
}

#endif
