// MoE routing kernels (see routing.cuh).
#include "routing.cuh"

#include <float.h>
#include <limits.h>

// Warps per block for the per-token kernels: 4, fewer when a warp's shared
// memory (bytes_per_warp) would not fit the default 48 KiB.
static int routing_warps(size_t bytes_per_warp, const char *what, int E) {
    const size_t limit = 48 * 1024;
    for (int w = 4; w >= 1; w /= 2)
        if ((size_t)w * bytes_per_warp <= limit) return w;
    fprintf(stderr, "error: %s: n_routed = %d experts need %zu bytes of shared memory per token (> %zu)\n", what, E,
            bytes_per_warp, limit);
    exit(1);
}

// ----------------------------------------------------------------------------
// Forward: affinities, TopK, gates, counts

// K rounds of arg-max over score (E) of the experts not taken yet, ordered by
// (score desc, index asc): the j-th round finds the j-th of route_topk's list.
// taken (E) must be zero; it ends marking the K chosen. out (K) is written by
// lane 0 (NULL: not written); every lane returns with the warp synchronised.
static __device__ void route_warp_topk(const float *score, unsigned char *taken, int E, int K, int lane, int *out,
                                       int *counts) {
    for (int j = 0; j < K; j++) {
        float best = -INFINITY;
        int bi = INT_MAX;
        for (int e = lane; e < E; e += 32) {
            if (taken[e]) continue;
            float sc = score[e];
            if (bi == INT_MAX || sc > best) { // e increases, so an equal score keeps the lower index
                best = sc;
                bi = e;
            }
        }
        for (int off = 16; off > 0; off >>= 1) {
            float ob = __shfl_xor_sync(0xffffffffu, best, off);
            int oi = __shfl_xor_sync(0xffffffffu, bi, off);
            if (oi != INT_MAX && (bi == INT_MAX || ob > best || (ob == best && oi < bi))) {
                best = ob;
                bi = oi;
            }
        }
        // K <= E, so some expert is always left and bi is valid in every lane.
        if (lane == bi % 32) taken[bi] = 1; // only lane bi % 32 ever reads taken[bi]
        if (lane == 0) {
            if (out) out[j] = bi;
            atomicAdd(&counts[bi], 1);
        }
        __syncwarp();
    }
}

// One warp per token. Shared memory per warp: score (E) fp32, u (E) fp32
// (with dual: the unbiased scores), taken (E) and taken0 (E) bytes.
static __global__ void moe_route_kernel(float *s, double *zsum, int *sel, float *gates, int *counts,
                                        const float *bias, int N, RouteParams rp, RouteDualOut dual, int with_dual) {
    extern __shared__ float route_smem[];
    const int E = rp.n_experts, K = rp.top_k;
    int nwarps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int nf = with_dual ? 2 : 1; // fp32 arrays per warp
    float *score = route_smem + (size_t)warp * nf * E;                                      // (E)
    float *u = score + E;                                                                   // (E), with_dual
    unsigned char *taken = (unsigned char *)(route_smem + (size_t)nwarps * nf * E) + (size_t)warp * 2 * E; // (E)
    unsigned char *taken0 = taken + E;                                                     // (E)
    int t = blockIdx.x * nwarps + warp;
    if (t >= N) return; // the whole warp leaves together
    float *row = s + (int64_t)t * E;

    // With the bias on the logits: the selection scores (and u) before the
    // gate overwrites the logits (a NaN would break the ordering; it ranks last).
    if (rp.bias_logits) {
        for (int e = lane; e < E; e += 32) {
            float sc = ROUTE_SCORE(row[e], bias[e], rp.bias_mult);
            score[e] = sc != sc ? -INFINITY : sc;
            if (with_dual) u[e] = row[e];
            if (dual.kept) dual.kept[(int64_t)t * E + e] = row[e];
        }
    }

    // Affinities, in place over the logits.
    if (rp.gate == GATE_SIGMOID) {
        for (int e = lane; e < E; e += 32) row[e] = 1.0f / (1.0f + expf(-row[e]));
    } else {
        float mx = -INFINITY;
        for (int e = lane; e < E; e += 32) mx = fmaxf(mx, row[e]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int e = lane; e < E; e += 32) {
            float x = expf(row[e] - mx);
            row[e] = x;
            sum += x;
        }
        sum = warp_sum(sum);
        for (int e = lane; e < E; e += 32) row[e] = row[e] / sum;
    }
    double z = 0.0;
    for (int e = lane; e < E; e += 32) z += (double)row[e];
    z = warp_sum_d(z);
    if (lane == 0) zsum[t] = z;

    // Selection scores on the affinities.
    for (int e = lane; e < E; e += 32) {
        if (!rp.bias_logits) {
            float sc = ROUTE_SCORE(row[e], bias[e], rp.bias_mult);
            score[e] = sc != sc ? -INFINITY : sc;
            if (with_dual) u[e] = row[e];
            if (dual.kept) dual.kept[(int64_t)t * E + e] = row[e];
        }
        taken[e] = 0;
        taken0[e] = 0;
    }
    __syncwarp();
    route_warp_topk(score, taken, E, K, lane, sel + (int64_t)t * K, counts);

    // Gate values from the unbiased affinities, in selection order (as the CPU).
    if (lane == 0) {
        const int *st = sel + (int64_t)t * K;
        float zk = 0.0f;
        for (int j = 0; j < K; j++) zk += row[st[j]];
        for (int j = 0; j < K; j++) {
            float sj = row[st[j]];
            gates[(int64_t)t * K + j] = (rp.norm_topk ? sj / zk : sj) * rp.route_scale;
        }
    }
    if (!with_dual) return;

    // The primal-dual parts (model/moe.c's moe_select, model/dual.c): the
    // selection on u alone (bias 0, or 1 for mult: u itself), the primal part
    // of the biased selection, and the slots the bias moved.
    for (int e = lane; e < E; e += 32) score[e] = u[e] != u[e] ? -INFINITY : u[e];
    __syncwarp();
    route_warp_topk(score, taken0, E, K, lane, NULL, dual.cnt);
    if (lane == 0) {
        const int *st = sel + (int64_t)t * K;
        double p = 0.0;
        for (int j = 0; j < K; j++) {
            float v = u[st[j]];
            p += rp.bias_mult ? (double)logf(v > FLT_MIN ? v : FLT_MIN) : (double)v; // dual_log_score
        }
        dual.primal[t] = p;
    }
    // Lane e % 32 set taken[e] and taken0[e]: each lane reads only its own.
    for (int e = lane; e < E; e += 32) {
        if (taken0[e] && !taken[e]) atomicAdd(&dual.cnt[E + e], 1);     // lost
        if (taken[e] && !taken0[e]) atomicAdd(&dual.cnt[2 * E + e], 1); // gained
    }
}

void moe_route(float *s, double *zsum, int *sel, float *gates, int *counts, const float *bias, int N,
               const RouteParams *rp, const RouteDualOut *dual, cudaStream_t stream) {
    RouteDualOut d = { NULL, NULL, NULL };
    if (dual) d = *dual;
    int with_dual = d.primal != NULL && d.cnt != NULL;
    size_t per_warp = (size_t)rp->n_experts * ((with_dual ? 2 : 1) * sizeof(float) + 2);
    int warps = routing_warps(per_warp, "moe_route", rp->n_experts);
    size_t smem = (size_t)warps * per_warp;
    moe_route_kernel<<<cdiv_u(N, warps), warps * 32, smem, stream>>>(s, zsum, sel, gates, counts, bias, N, *rp, d,
                                                                      with_dual);
    KERNEL_CHECK();
}

// ----------------------------------------------------------------------------
// Auxiliary losses

// The statistics are summed in two passes so that the whole grid works on
// them: (1) one block per slice of AUX_SLICE tokens of a group and 32
// experts writes partial sums; (2) one block adds each (group, expert)'s
// partials in slice order and reduces the loss terms. Fixed orders in both,
// so the loss has the same bits every run.
enum { AUX_ROWS = 8, AUX_REDUCE_THREADS = 256 };

size_t moe_aux_scratch_doubles(int B, int T, int E) {
    size_t partials = (size_t)B + cdiv_u((int64_t)B * T, AUX_SLICE); // >= groups x slices for every aux kind
    return 2 * partials * (size_t)E;
}

// (1) grid (groups x slices, ceil(E / 32)), block (32, AUX_ROWS): lane x owns
// expert e = blockIdx.y * 32 + x, row y takes the tokens y, y + AUX_ROWS, ...
// of the slice; the AUX_ROWS partial sums are then added in row order into
// part_p (partials, E), the affinity sums, and part_f (partials, E), the
// selections (as doubles: exact far beyond any token count).
static __global__ void moe_aux_stats_kernel(double *part_p, double *part_f, const float *s, const double *zsum,
                                            const int *sel, int len, int slices, int E, int K, int seqwise) {
    __shared__ double sp[AUX_ROWS][32];
    __shared__ int sf[AUX_ROWS][32];
    int g = blockIdx.x, q = g / slices, z = g % slices, x = threadIdx.x, y = threadIdx.y;
    int e = blockIdx.y * 32 + x;
    int64_t lo = (int64_t)q * len + (int64_t)z * AUX_SLICE;
    int64_t hi = lo + AUX_SLICE < (int64_t)(q + 1) * len ? lo + AUX_SLICE : (int64_t)(q + 1) * len;
    double p = 0.0;
    int cnt = 0;
    if (e < E) {
        for (int64_t t = lo + y; t < hi; t += AUX_ROWS) {
            double zt = seqwise ? zsum[t] : 1.0;
            p += (double)s[t * E + e] / zt;
            for (int j = 0; j < K; j++) cnt += sel[t * K + j] == e;
        }
    }
    sp[y][x] = p;
    sf[y][x] = cnt;
    __syncthreads();
    if (y == 0 && e < E) {
        double pg = 0.0;
        int fg = 0;
        for (int r = 0; r < AUX_ROWS; r++) {
            pg += sp[r][x];
            fg += sf[r][x];
        }
        part_p[(int64_t)g * E + e] = pg;
        part_f[(int64_t)g * E + e] = fg;
    }
}

// (2) one block of AUX_REDUCE_THREADS: f (groups, E) = the selections per
// group and expert, and aux = aux_alpha / groups * the sum over groups and
// experts of (E / (K len) f_e) (P_e / len), model/moe.c's terms.
static __global__ void moe_aux_reduce_kernel(double *aux, int *f, const double *part_p, const double *part_f,
                                             int groups, int slices, int len, int E, int K, float aux_alpha) {
    __shared__ double shm[32];
    double terms = 0.0;
    for (int i = threadIdx.x; i < groups * E; i += blockDim.x) {
        int q = i / E, e = i % E;
        double p = 0.0, fq = 0.0;
        for (int z = 0; z < slices; z++) {
            p += part_p[((int64_t)q * slices + z) * E + e];
            fq += part_f[((int64_t)q * slices + z) * E + e];
        }
        f[i] = (int)fq;
        terms += ((double)E / ((double)K * len) * fq) * (p / len);
    }
    double total = block_sum_d(terms, shm);
    if (threadIdx.x == 0) aux[0] = aux_alpha * total / groups;
}

void moe_aux_forward(double *aux, int *f, double *scratch, const float *s, const double *zsum, const int *sel, int B,
                     int T, const RouteParams *rp, cudaStream_t stream) {
    if (rp->aux_kind == AUX_NONE) {
        CUDA_CHECK(cudaMemsetAsync(aux, 0, sizeof(double), stream));
        return;
    }
    int E = rp->n_experts, K = rp->top_k;
    int groups = route_aux_groups(rp->aux_kind, B), len = B * T / groups;
    int slices = (int)cdiv_u(len, AUX_SLICE);
    size_t part = (size_t)groups * slices * E; // <= moe_aux_scratch_doubles(B, T, E) / 2
    double *part_p = scratch, *part_f = scratch + part;
    dim3 grid(groups * slices, cdiv_u(E, 32)), block(32, AUX_ROWS);
    moe_aux_stats_kernel<<<grid, block, 0, stream>>>(part_p, part_f, s, zsum, sel, len, slices, E, K,
                                                     rp->aux_kind == AUX_SEQ);
    KERNEL_CHECK();
    moe_aux_reduce_kernel<<<1, AUX_REDUCE_THREADS, 0, stream>>>(aux, f, part_p, part_f, groups, slices, len, E, K,
                                                                rp->aux_alpha);
    KERNEL_CHECK();
}

// ----------------------------------------------------------------------------
// Backward

// One warp per token; shared memory per warp: ds (E) fp32, the gradient of
// the affinities. coef = grad_scale * aux_alpha / groups / len (as model/moe.c).
static __global__ void moe_route_backward_kernel(floatX *dlogits, const float *s, const double *zsum, const int *sel,
                                                 const float *dgates, const int *f, int N, RouteParams rp,
                                                 double coef, int len) {
    extern __shared__ float ds_smem[];
    const int E = rp.n_experts, K = rp.top_k;
    int nwarps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *ds = ds_smem + (size_t)warp * E; // (E)
    int t = blockIdx.x * nwarps + warp;
    if (t >= N) return;
    const float *st = s + (int64_t)t * E;
    for (int e = lane; e < E; e += 32) ds[e] = 0.0f;
    __syncwarp();

    // Gate values -> affinities. With norm_topk, g_j = r s_j / z, z = sum_i s_i:
    // ds_j = r (dg_j / z - sum_i dg_i s_i / z^2). Serial over the K selected, as the CPU.
    if (lane == 0) {
        const int *sl = sel + (int64_t)t * K;
        const float *dg = dgates + (int64_t)t * K;
        if (rp.norm_topk) {
            float z = 0.0f, dot = 0.0f;
            for (int j = 0; j < K; j++) {
                z += st[sl[j]];
                dot += dg[j] * st[sl[j]];
            }
            for (int j = 0; j < K; j++) ds[sl[j]] += rp.route_scale * (dg[j] / z - dot / (z * z));
        } else {
            for (int j = 0; j < K; j++) ds[sl[j]] += rp.route_scale * dg[j];
        }
    }
    __syncwarp();

    // Auxiliary loss: dL/dP_e = coef * E / (K len) * f_e, per group.
    if (rp.aux_kind != AUX_NONE) {
        const int *fq = f + (int64_t)(t / len) * E;
        if (rp.aux_kind == AUX_EXPERT) {
            for (int e = lane; e < E; e += 32) ds[e] += (float)(coef * (double)E / ((double)K * len) * fq[e]);
        } else {
            // s' = s / z: ds_e += (fe_e - sum_i fe_i s'_i) / z.
            double z = zsum[t], gs = 0.0;
            for (int e = lane; e < E; e += 32) gs += coef * (double)E / ((double)K * len) * fq[e] * st[e] / z;
            gs = warp_sum_d(gs);
            for (int e = lane; e < E; e += 32) {
                double fe = coef * (double)E / ((double)K * len) * fq[e];
                ds[e] += (float)((fe - gs) / z);
            }
        }
    }
    __syncwarp();

    // Affinities -> logits.
    floatX *out = dlogits + (int64_t)t * E;
    if (rp.gate == GATE_SIGMOID) {
        for (int e = lane; e < E; e += 32) out[e] = to_x(ds[e] * (st[e] * (1.0f - st[e])));
    } else {
        float dot = 0.0f;
        for (int e = lane; e < E; e += 32) dot += ds[e] * st[e];
        dot = warp_sum(dot);
        for (int e = lane; e < E; e += 32) out[e] = to_x(st[e] * (ds[e] - dot));
    }
}

void moe_route_backward(floatX *dlogits, const float *s, const double *zsum, const int *sel, const float *dgates,
                        const int *f, int B, int T, const RouteParams *rp, float grad_scale, cudaStream_t stream) {
    int N = B * T, groups = route_aux_groups(rp->aux_kind, B), len = N / groups;
    double coef = (double)grad_scale * rp->aux_alpha / groups / len;
    size_t per_warp = (size_t)rp->n_experts * sizeof(float);
    int warps = routing_warps(per_warp, "moe_route_backward", rp->n_experts);
    moe_route_backward_kernel<<<cdiv_u(N, warps), warps * 32, warps * per_warp, stream>>>(dlogits, s, zsum, sel,
                                                                                          dgates, f, N, *rp, coef, len);
    KERNEL_CHECK();
}
