// Fused causal attention with RoPE, forward and backward (see attention.cuh).
//
// Every block works on one (sequence b, head h) = blockIdx.y and one tile
// of rows = blockIdx.x; each warp owns 16 rows of that tile, and each of
// its threads the accumulator elements of kernels/mma.cuh's FragC: rows
// g and g + 8 of the warp's rows, columns 2t and 2t + 1 of every 8 columns.
// A row's statistics (max, sum) are therefore spread over the 4 threads of
// a quad and combined with two xor shuffles.
//
// Shared memory holds the tiles of the pass (rows of hd elements, swizzled,
// kernels/mma.cuh's Tile) and nothing else: 48 KiB at hd = 128, the most a
// block gets without opting in, so the tile sizes below are those that fit.
// The FP32 build's elements are twice as wide: its tiles have half the rows.
#include "attention.cuh"
#include "mma.cuh"

// Rows per tile: R_ROWS scale with the element size (64 in bf16, 32 in fp32).
#define R_ROWS(n) ((n) * 2 / (int)sizeof(floatX))
enum {
    FWD_M = R_ROWS(64), // forward: queries per block (16 per warp)
    FWD_N = R_ROWS(64), // forward: keys (and values) per step
    DQ_M = R_ROWS(64),  // dQ pass: queries per block
    DQ_N = R_ROWS(32),  // dQ pass: keys per step
    DKV_N = R_ROWS(64), // dK dV pass: keys per block (16 per warp)
    DKV_M = R_ROWS(32), // dK dV pass: queries per step
};

static const float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

__host__ __device__ static inline int cdiv(int a, int b) { return (a + b - 1) / b; }

// The head dims the kernels are compiled for.
#define ATT_FOR_HEAD_DIMS(X) X(16) X(32) X(64) X(128)

int attention_supported(int hd, char *err, size_t errlen) {
#define ATT_IS(n) if (hd == n) return 0;
    ATT_FOR_HEAD_DIMS(ATT_IS)
#undef ATT_IS
    util_set_err(err, errlen, "the fused attention kernels take head dims (d_model / n_heads) 16, 32, 64 or 128, "
                 "not %d", hd);
    return -1;
}

void attention_rope_tables(float *cos_t, float *sin_t, int T, int hd, float theta) {
    int half = hd / 2;
    for (int p = 0; p < T; p++)
        for (int i = 0; i < half; i++) {
            double f = pow((double)theta, -2.0 * i / hd);
            cos_t[p * half + i] = (float)cos(p * f);
            sin_t[p * half + i] = (float)sin(p * f);
        }
}

// ----------------------------------------------------------------------------
// RoPE on tiles and on gradients

// Rotates the ROWS x HD tile in shared memory in place ("rotate half" form,
// docs/model.md), row r at position p0 + r; rows at positions >= T are
// padding and left alone. The arithmetic of model/ops.c's rope_apply, in
// fp32 from the stored floatX values, rounded back to floatX.
template <int ROWS, int HD>
__device__ void rope_tile(floatX *tile, int p0, int T, const float *cos_t, const float *sin_t) {
    const int half = HD / 2;
    for (int i = threadIdx.x; i < ROWS * half; i += blockDim.x) {
        int r = i / half, c = i % half, p = p0 + r;
        if (p >= T) continue;
        int ia = Tile<HD>::at(r, c), ib = Tile<HD>::at(r, c + half);
        float a = to_f(lds(tile + ia)), b = to_f(lds(tile + ib));
        float cs = cos_t[p * half + c], sn = sin_t[p * half + c];
        tile[ia] = to_x(a * cs - b * sn);
        tile[ib] = to_x(b * cs + a * sn);
    }
}

// After a step's copies were issued and committed: waits for them, makes
// them visible to the block, rotates tile ta (RA rows from position pa) and,
// unless tb is NULL, tile tb (RB rows from pb), and makes that visible too.
template <int RA, int RB, int HD>
__device__ void tiles_land_rotated(floatX *ta, int pa, floatX *tb, int pb, int T, const float *cos_t,
                                   const float *sin_t) {
    cp_async_wait<0>();
    __syncthreads();
    rope_tile<RA, HD>(ta, pa, T, cos_t, sin_t);
    if (tb) rope_tile<RB, HD>(tb, pb, T, cos_t, sin_t);
    __syncthreads();
}

// The gradient with respect to rotated q or k, the warp's 16 rows x HD in
// accumulators (HD/8 fragments, this thread's rows at positions p_lo and
// p_lo + 8), rotated back by the transpose rotation: the gradient before
// RoPE. Column c pairs with c + HD/2, which is the same element of fragment
// n + HD/16, held by the same thread.
template <int HD> __device__ void rope_backward_frags(FragC *acc, int p_lo, int T, const float *cos_t, const float *sin_t) {
    const int half = HD / 2, t = threadIdx.x & 3;
    UNROLL
    for (int n = 0; n < HD / 16; n++)
        UNROLL
        for (int i = 0; i < 4; i++) {
            int p = p_lo + 8 * (i >> 1), c = 8 * n + 2 * t + (i & 1);
            if (p >= T) continue;
            float a = acc[n].x[i], b = acc[n + HD / 16].x[i], cs = cos_t[p * half + c], sn = sin_t[p * half + c];
            acc[n].x[i] = a * cs + b * sn;
            acc[n + HD / 16].x[i] = b * cs - a * sn;
        }
}

// Writes the warp's 16 rows x HD of accumulators to dst (row r at dst + r * ld,
// this thread's rows r_lo and r_lo + 8), multiplied by the row's scale;
// rows >= T are skipped.
template <int HD>
__device__ void frags_store(floatX *dst, int64_t ld, const FragC *acc, int r_lo, int T, const float scale[2]) {
    const int t = threadIdx.x & 3;
    UNROLL
    for (int n = 0; n < HD / 8; n++)
        UNROLL
        for (int i = 0; i < 4; i++) {
            int r = r_lo + 8 * (i >> 1);
            if (r < T) dst[(int64_t)r * ld + 8 * n + 2 * t + (i & 1)] = to_x(acc[n].x[i] * scale[i >> 1]);
        }
}

// Max and sum over the 4 threads of a quad (the threads of one row).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ----------------------------------------------------------------------------
// Forward

// Grid (T / FWD_M, B * H), FWD_M / 16 warps. The heaviest query tiles (the
// last ones, which see the most keys) run first.
template <int HD>
__global__ void __launch_bounds__(FWD_M * 2) attention_forward_kernel(floatX *out, float *lse, const floatX *qkv,
                                                                      const float *cos_t, const float *sin_t, int T,
                                                                      int d, int H) {
    extern __shared__ uint4 att_fwd_smem[];
    floatX *sQ = (floatX *)att_fwd_smem; // (FWD_M, HD) rotated queries
    floatX *sK = sQ + FWD_M * HD;        // (FWD_N, HD) rotated keys of the step
    floatX *sV = sK + FWD_N * HD;        // (FWD_N, HD) values of the step
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = (gridDim.x - 1 - blockIdx.x) * FWD_M;
    const int64_t ld = 3 * (int64_t)d;
    const floatX *qb = qkv + (int64_t)b * T * ld + h * HD, *kb = qb + d, *vb = qb + 2 * d; // row 0 of q, k, v
    const int r_lo = q0 + 16 * warp + g;                                                  // this thread's rows: r_lo, r_lo + 8
    // Key tiles with a key <= the tile's last query (and < T): the rest is masked.
    const int n_steps = min(cdiv(q0 + FWD_M, FWD_N), cdiv(T, FWD_N));
    const float scale_log2 = 1.0f / sqrtf((float)HD) * LOG2E; // scores in log2 units: exp2 instead of exp

    tile_load_async<FWD_M, HD>(sQ, qb + q0 * ld, ld, min(FWD_M, T - q0));
    tile_load_async<FWD_N, HD>(sK, kb, ld, min(FWD_N, T));
    cp_async_commit();
    tiles_land_rotated<FWD_M, FWD_N, HD>(sQ, q0, sK, 0, T, cos_t, sin_t);

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}; // running max (log2 units) and sum of this thread's rows
    FragC o[HD / 8];                                          // (16, HD) unnormalised output of the warp's rows
    frag_zero(o, HD / 8);
    for (int j = 0; j < n_steps; j++) {
        const int k0 = j * FWD_N;
        // V_j lands while S = Q K_j^T is computed.
        tile_load_async<FWD_N, HD>(sV, vb + k0 * ld, ld, min(FWD_N, T - k0));
        cp_async_commit();
        FragC s[FWD_N / 8]; // (16, FWD_N) scores of the warp's rows
        warp_gemm_abt<FWD_N, HD, HD, HD>(s, sQ, 16 * warp, sK);
        // Scale, mask the keys after each query, and the online softmax: the
        // new max rescales what was accumulated under the old one.
        float mx[2] = {-INFINITY, -INFINITY};
        UNROLL
        for (int n = 0; n < FWD_N / 8; n++)
            UNROLL
            for (int i = 0; i < 4; i++) {
                int key = k0 + 8 * n + 2 * t + (i & 1), row = r_lo + 8 * (i >> 1);
                float v = key > row ? -INFINITY : s[n].x[i] * scale_log2;
                s[n].x[i] = v;
                mx[i >> 1] = fmaxf(mx[i >> 1], v);
            }
        float alpha[2];
        UNROLL
        for (int r = 0; r < 2; r++) {
            // Finite from step 0 on: key 0 is in every row's first tile.
            float mn = fmaxf(m[r], quad_max(mx[r]));
            alpha[r] = exp2f(m[r] - mn); // 0 at step 0 (m = -inf), when o and l are still 0
            m[r] = mn;
            l[r] *= alpha[r];
        }
        UNROLL
        for (int n = 0; n < FWD_N / 8; n++)
            UNROLL
            for (int i = 0; i < 4; i++) {
                float p = exp2f(s[n].x[i] - m[i >> 1]); // masked: exp2(-inf) = 0
                s[n].x[i] = p;
                l[i >> 1] += p; // this thread's part of the row sum; the quad adds up at the end
            }
        UNROLL
        for (int n = 0; n < HD / 8; n++)
            UNROLL
            for (int i = 0; i < 4; i++) o[n].x[i] *= alpha[i >> 1];
        cp_async_wait<0>();
        __syncthreads(); // V_j visible to all; every warp is done reading K_j
        // K_{j+1} lands while O += P V_j is computed.
        if (j + 1 < n_steps) {
            tile_load_async<FWD_N, HD>(sK, kb + (k0 + FWD_N) * ld, ld, min(FWD_N, T - k0 - FWD_N));
            cp_async_commit();
        }
        warp_gemm_cb<HD, FWD_N, HD>(o, s, sV);
        if (j + 1 < n_steps) // K_{j+1} landed and rotated (the barrier also ends every warp's reads of V_j)
            tiles_land_rotated<FWD_N, FWD_N, HD>(sK, k0 + FWD_N, NULL, 0, T, cos_t, sin_t);
    }

    float inv[2];
    UNROLL
    for (int r = 0; r < 2; r++) {
        l[r] = quad_sum(l[r]);
        inv[r] = 1.0f / l[r];
    }
    frags_store<HD>(out + (int64_t)b * T * d + h * HD, d, o, r_lo, T, inv);
    if (t == 0) {
        UNROLL
        for (int r = 0; r < 2; r++)
            if (r_lo + 8 * r < T) lse[(int64_t)bh * T + r_lo + 8 * r] = (m[r] + log2f(l[r])) * LN2;
    }
}

// ----------------------------------------------------------------------------
// Backward: dQ (and D)

// Grid (T / DQ_M, B * H), DQ_M / 16 warps, the heaviest query tiles first.
// Per key tile: S = Q K^T, P = exp(S scale - lse), dP = dO V^T,
// dS = P (dP - D) scale, dQ += dS K.
template <int HD>
__global__ void __launch_bounds__(DQ_M * 2)
    attention_backward_dq_kernel(floatX *dqkv, float *D, const floatX *dout, const floatX *out, const floatX *qkv,
                                 const float *lse, const float *cos_t, const float *sin_t, int T, int d, int H) {
    extern __shared__ uint4 att_dq_smem[];
    floatX *sQ = (floatX *)att_dq_smem; // (DQ_M, HD) rotated queries
    floatX *sdO = sQ + DQ_M * HD;       // (DQ_M, HD) output gradients
    floatX *sK = sdO + DQ_M * HD;       // (DQ_N, HD) rotated keys of the step
    floatX *sV = sK + DQ_N * HD;        // (DQ_N, HD) values of the step
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = (gridDim.x - 1 - blockIdx.x) * DQ_M;
    const int64_t ld = 3 * (int64_t)d;
    const floatX *qb = qkv + (int64_t)b * T * ld + h * HD, *kb = qb + d, *vb = qb + 2 * d;
    const floatX *gob = dout + (int64_t)b * T * d + h * HD, *ob = out + (int64_t)b * T * d + h * HD;
    const int r_lo = q0 + 16 * warp + g;
    const int n_steps = min(cdiv(q0 + DQ_M, DQ_N), cdiv(T, DQ_N));
    const float scale = 1.0f / sqrtf((float)HD), scale_log2 = scale * LOG2E;

    tile_load_async<DQ_M, HD>(sQ, qb + q0 * ld, ld, min(DQ_M, T - q0));
    tile_load_async<DQ_M, HD>(sdO, gob + (int64_t)q0 * d, d, min(DQ_M, T - q0));
    tile_load_async<DQ_N, HD>(sK, kb, ld, min(DQ_N, T));
    tile_load_async<DQ_N, HD>(sV, vb, ld, min(DQ_N, T));
    cp_async_commit();
    tiles_land_rotated<DQ_M, DQ_N, HD>(sQ, q0, sK, 0, T, cos_t, sin_t);

    // D = rowsum(dO * O) of this thread's rows (the quad adds its columns),
    // for this pass and, through global memory, the dK dV pass. Padding rows:
    // D = 0 and lse = 0, finite, never written.
    float Dr[2], lse2[2];
    UNROLL
    for (int r = 0; r < 2; r++) {
        int row = r_lo + 8 * r;
        float acc = 0.0f;
        if (row < T) {
            UNROLL
            for (int c = 2 * t; c < HD; c += 8)
                UNROLL
                for (int j = 0; j < 2; j++)
                    acc += to_f(lds(sdO + Tile<HD>::at(row - q0, c + j))) * to_f(ob[(int64_t)row * d + c + j]);
        }
        Dr[r] = quad_sum(acc);
        if (t == 0 && row < T) D[(int64_t)bh * T + row] = Dr[r];
        lse2[r] = row < T ? lse[(int64_t)bh * T + row] * LOG2E : 0.0f;
    }

    FragC dq[HD / 8]; // (16, HD) gradient of the warp's rotated queries
    frag_zero(dq, HD / 8);
    for (int j = 0; j < n_steps; j++) {
        const int k0 = j * DQ_N;
        FragC s[DQ_N / 8], dp[DQ_N / 8]; // (16, DQ_N) scores, then dS; gradient of P
        warp_gemm_abt<DQ_N, HD, HD, HD>(s, sQ, 16 * warp, sK);
        warp_gemm_abt<DQ_N, HD, HD, HD>(dp, sdO, 16 * warp, sV);
        UNROLL
        for (int n = 0; n < DQ_N / 8; n++)
            UNROLL
            for (int i = 0; i < 4; i++) {
                int key = k0 + 8 * n + 2 * t + (i & 1), row = r_lo + 8 * (i >> 1);
                float p = key > row ? 0.0f : exp2f(s[n].x[i] * scale_log2 - lse2[i >> 1]);
                s[n].x[i] = p * (dp[n].x[i] - Dr[i >> 1]) * scale;
            }
        warp_gemm_cb<HD, DQ_N, HD>(dq, s, sK);
        if (j + 1 < n_steps) {
            __syncthreads(); // every warp is done with K_j, V_j
            tile_load_async<DQ_N, HD>(sK, kb + (k0 + DQ_N) * ld, ld, min(DQ_N, T - k0 - DQ_N));
            tile_load_async<DQ_N, HD>(sV, vb + (k0 + DQ_N) * ld, ld, min(DQ_N, T - k0 - DQ_N));
            cp_async_commit();
            tiles_land_rotated<DQ_N, DQ_N, HD>(sK, k0 + DQ_N, NULL, 0, T, cos_t, sin_t);
        }
    }
    rope_backward_frags<HD>(dq, r_lo, T, cos_t, sin_t);
    const float one[2] = {1.0f, 1.0f};
    frags_store<HD>(dqkv + (int64_t)b * T * ld + h * HD, ld, dq, r_lo, T, one);
}

// ----------------------------------------------------------------------------
// Backward: dK and dV

// Grid (T / DKV_N, B * H), DKV_N / 16 warps; a block walks the query tiles
// from the one holding its first key on. Computed transposed, so that each
// warp's accumulators are its own 16 keys: S^T = K Q^T, P^T = exp(S^T scale
// - lse), dP^T = V dO^T, dS^T = P^T (dP^T - D) scale, dV += P^T dO,
// dK += dS^T Q; the query index is the column, so lse and D are per column.
template <int HD>
__global__ void __launch_bounds__(DKV_N * 2)
    attention_backward_dkdv_kernel(floatX *dqkv, const floatX *dout, const floatX *qkv, const float *lse,
                                   const float *D, const float *cos_t, const float *sin_t, int T, int d, int H) {
    extern __shared__ uint4 att_dkv_smem[];
    floatX *sK = (floatX *)att_dkv_smem; // (DKV_N, HD) rotated keys
    floatX *sV = sK + DKV_N * HD;        // (DKV_N, HD) values
    floatX *sQ = sV + DKV_N * HD;        // (DKV_M, HD) rotated queries of the step
    floatX *sdO = sQ + DKV_M * HD;       // (DKV_M, HD) output gradients of the step
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, k0 = blockIdx.x * DKV_N;
    const int64_t ld = 3 * (int64_t)d;
    const floatX *qb = qkv + (int64_t)b * T * ld + h * HD, *kb = qb + d, *vb = qb + 2 * d;
    const floatX *gob = dout + (int64_t)b * T * d + h * HD;
    const float *lse_bh = lse + (int64_t)bh * T, *D_bh = D + (int64_t)bh * T;
    const int kr_lo = k0 + 16 * warp + g; // this thread's keys: kr_lo, kr_lo + 8
    const int first = k0 / DKV_M, n_tiles = cdiv(T, DKV_M); // query tiles holding a query >= k0
    const float scale = 1.0f / sqrtf((float)HD), scale_log2 = scale * LOG2E;

    tile_load_async<DKV_N, HD>(sK, kb + k0 * ld, ld, min(DKV_N, T - k0));
    tile_load_async<DKV_N, HD>(sV, vb + k0 * ld, ld, min(DKV_N, T - k0));
    tile_load_async<DKV_M, HD>(sQ, qb + first * DKV_M * ld, ld, min(DKV_M, T - first * DKV_M));
    tile_load_async<DKV_M, HD>(sdO, gob + (int64_t)first * DKV_M * d, d, min(DKV_M, T - first * DKV_M));
    cp_async_commit();
    tiles_land_rotated<DKV_N, DKV_M, HD>(sK, k0, sQ, first * DKV_M, T, cos_t, sin_t);

    FragC dk[HD / 8], dv[HD / 8]; // (16, HD) gradients of the warp's rotated keys and values
    frag_zero(dk, HD / 8);
    frag_zero(dv, HD / 8);
    for (int qt = first; qt < n_tiles; qt++) {
        const int qq0 = qt * DKV_M;
        FragC st[DKV_M / 8], dst[DKV_M / 8]; // (16 keys, DKV_M queries) P^T; dP^T, then dS^T
        warp_gemm_abt<DKV_M, HD, HD, HD>(st, sK, 16 * warp, sQ);
        warp_gemm_abt<DKV_M, HD, HD, HD>(dst, sV, 16 * warp, sdO);
        UNROLL
        for (int n = 0; n < DKV_M / 8; n++)
            UNROLL
            for (int j = 0; j < 2; j++) {
                // Query q = column; padding queries (q >= T) get lse = +inf: P = 0.
                int q = qq0 + 8 * n + 2 * t + j;
                float l2 = q < T ? lse_bh[q] * LOG2E : INFINITY, Dq = q < T ? D_bh[q] : 0.0f;
                UNROLL
                for (int r = 0; r < 2; r++) {
                    int i = 2 * r + j, key = kr_lo + 8 * r;
                    float p = q < key ? 0.0f : exp2f(st[n].x[i] * scale_log2 - l2);
                    st[n].x[i] = p;
                    dst[n].x[i] = p * (dst[n].x[i] - Dq) * scale;
                }
            }
        warp_gemm_cb<HD, DKV_M, HD>(dv, st, sdO);
        warp_gemm_cb<HD, DKV_M, HD>(dk, dst, sQ);
        if (qt + 1 < n_tiles) {
            __syncthreads(); // every warp is done with Q, dO of this step
            tile_load_async<DKV_M, HD>(sQ, qb + (qq0 + DKV_M) * ld, ld, min(DKV_M, T - qq0 - DKV_M));
            tile_load_async<DKV_M, HD>(sdO, gob + (int64_t)(qq0 + DKV_M) * d, d, min(DKV_M, T - qq0 - DKV_M));
            cp_async_commit();
            tiles_land_rotated<DKV_M, DKV_M, HD>(sQ, qq0 + DKV_M, NULL, 0, T, cos_t, sin_t);
        }
    }
    rope_backward_frags<HD>(dk, kr_lo, T, cos_t, sin_t);
    const float one[2] = {1.0f, 1.0f};
    floatX *dkb = dqkv + (int64_t)b * T * ld + d + h * HD;
    frags_store<HD>(dkb, ld, dk, kr_lo, T, one);
    frags_store<HD>(dkb + d, ld, dv, kr_lo, T, one);
}

// ----------------------------------------------------------------------------
// Launches

template <int HD>
static void forward_launch(floatX *out, float *lse, const floatX *qkv, const float *cos_t, const float *sin_t, int B,
                           int T, int d, int H, cudaStream_t stream) {
    dim3 grid(cdiv(T, FWD_M), B * H);
    size_t smem = (size_t)(FWD_M + 2 * FWD_N) * HD * sizeof(floatX);
    attention_forward_kernel<HD><<<grid, FWD_M * 2, smem, stream>>>(out, lse, qkv, cos_t, sin_t, T, d, H);
    KERNEL_CHECK();
}

// The dQ pass first: it writes D, which the dK dV pass reads.
template <int HD>
static void backward_launch(floatX *dqkv, float *D, const floatX *dout, const floatX *qkv, const floatX *out,
                            const float *lse, const float *cos_t, const float *sin_t, int B, int T, int d, int H,
                            cudaStream_t stream) {
    dim3 grid_q(cdiv(T, DQ_M), B * H), grid_kv(cdiv(T, DKV_N), B * H);
    size_t smem_q = (size_t)(2 * DQ_M + 2 * DQ_N) * HD * sizeof(floatX);
    size_t smem_kv = (size_t)(2 * DKV_N + 2 * DKV_M) * HD * sizeof(floatX);
    attention_backward_dq_kernel<HD><<<grid_q, DQ_M * 2, smem_q, stream>>>(dqkv, D, dout, out, qkv, lse, cos_t, sin_t, T, d, H);
    KERNEL_CHECK();
    attention_backward_dkdv_kernel<HD><<<grid_kv, DKV_N * 2, smem_kv, stream>>>(dqkv, dout, qkv, lse, D, cos_t, sin_t, T, d, H);
    KERNEL_CHECK();
}

void attention_forward(floatX *out, float *lse, const floatX *qkv, const float *cos_t, const float *sin_t, int B,
                       int T, int d, int H, cudaStream_t stream) {
    switch (d / H) {
#define ATT_CASE(n)                                                                                                 \
    case n: forward_launch<n>(out, lse, qkv, cos_t, sin_t, B, T, d, H, stream); return;
        ATT_FOR_HEAD_DIMS(ATT_CASE)
#undef ATT_CASE
    }
    char err[256];
    attention_supported(d / H, err, sizeof err);
    FATAL("%s", err);
}

void attention_backward(floatX *dqkv, float *D, const floatX *dout, const floatX *qkv, const floatX *out,
                        const float *lse, const float *cos_t, const float *sin_t, int B, int T, int d, int H,
                        cudaStream_t stream) {
    switch (d / H) {
#define ATT_CASE(n)                                                                                                 \
    case n: backward_launch<n>(dqkv, D, dout, qkv, out, lse, cos_t, sin_t, B, T, d, H, stream); return;
        ATT_FOR_HEAD_DIMS(ATT_CASE)
#undef ATT_CASE
    }
    char err[256];
    attention_supported(d / H, err, sizeof err);
    FATAL("%s", err);
}
