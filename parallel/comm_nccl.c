// NCCL communicators and collectives of the GPU trainer (see comm_nccl.h).
// Compiled with -DCOMM_NCCL_HOST it also implements parallel/comm.h (the build
// without MPI); otherwise parallel/comm.c (MPI) provides parallel/comm.h and this file
// only bootstraps NCCL from it.
//
// Every NCCL and CUDA call is checked; a failure prints the file, line, call
// and NCCL's message, then exits. (The other ranks may then wait in a
// collective: launchers stop the whole job when one rank fails, see
// docs/gpu.md.)
#include "comm_nccl.h"

#include <nccl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "launch.h"
#include "../util/cuda_check.h"

#if !defined(NCCL_VERSION_CODE) || NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
#error "parallel/comm_nccl.c needs NCCL >= 2.18 (ncclCommSplit); set NCCL_HOME in gpu.mk to a newer NCCL"
#endif

typedef struct {
    ncclComm_t comm[3];   // indexed by CommGroup; NULL until created
    int split_ep;         // the ep comm[COMM_EP] / comm[COMM_EDP] were split for (0: not yet)
    int ep;               // EP group size, for the all-to-alls
    int device;           // this rank's CUDA device (-1: not chosen here)
    // host-buffer collectives (build without MPI)
    cudaStream_t stream;
    void *staging;        // device buffer
    size_t staging_bytes; // its size
    size_t chunk_limit;   // bytes per step of the host collectives (the self-test lowers it)
} NcclState;

static NcclState ns = { .device = -1 };

static void nccl_fail(ncclResult_t r, const char *call, const char *file, int line) {
    const char *last = ncclGetLastError(NULL);
    fprintf(stderr, "%s:%d: NCCL error %s%s%s\n  in: %s\n", file, line, ncclGetErrorString(r),
            last && last[0] ? ": " : "", last ? last : "", call);
    exit(1);
}
#define NCCL_CHECK(call)                                          \
    do {                                                          \
        ncclResult_t nccl_r_ = (call);                            \
        if (nccl_r_ != ncclSuccess) nccl_fail(nccl_r_, #call, __FILE__, __LINE__); \
    } while (0)


// The communicator of group g. Before the split (ep = 1 so far) EDP is WORLD.
static ncclComm_t group_comm(CommGroup g) {
    if (g != COMM_WORLD && !ns.split_ep) {
        if (g == COMM_EDP) return ns.comm[COMM_WORLD];
        ASSERT(0, "the NCCL EP communicator is used before comm_set_ep / comm_nccl_open");
    }
    return ns.comm[g];
}

// Takes the GPU of this rank: the only one visible (a launcher that sets
// CUDA_VISIBLE_DEVICES per rank), else the one of index local_rank.
static int nccl_set_device(int rank, int local_rank, char *err, size_t errlen) {
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev == 0) {
        snprintf(err, errlen, "rank %d: no CUDA device (%s)", rank, e != cudaSuccess ? cudaGetErrorString(e) : "none");
        return -1;
    }
    int dev = ndev == 1 ? 0 : local_rank;
    if (dev < 0 || dev >= ndev) {
        char host[256] = "?";
        gethostname(host, sizeof host - 1);
        if (local_rank < 0)
            snprintf(err, errlen, "rank %d on %s: %d GPUs are visible and the launcher did not say which one is this "
                     "rank's (set LOCAL_RANK, or CUDA_VISIBLE_DEVICES per rank)", rank, host, ndev);
        else
            snprintf(err, errlen, "rank %d on %s is local rank %d but only %d GPUs are visible (one rank per GPU)",
                     rank, host, local_rank, ndev);
        return -1;
    }
    e = cudaSetDevice(dev);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "rank %d: cudaSetDevice(%d): %s", rank, dev, cudaGetErrorString(e));
        return -1;
    }
    ns.device = dev;
    return 0;
}

// EP groups: consecutive ranks (color rank / ep); EDP groups: rank % ep. Collective over WORLD.
static void nccl_split(const Comm *c) {
    if (ns.split_ep == c->ep) return;
    ASSERT(!ns.split_ep, "NCCL groups split for --ep %d, now asked for %d", ns.split_ep, c->ep);
    NCCL_CHECK(ncclCommSplit(ns.comm[COMM_WORLD], c->rank / c->ep, c->rank, &ns.comm[COMM_EP], NULL));
    NCCL_CHECK(ncclCommSplit(ns.comm[COMM_WORLD], c->rank % c->ep, c->rank, &ns.comm[COMM_EDP], NULL));
    ns.split_ep = c->ep;
    ns.ep = c->ep;
}

void comm_nccl_close(void) {
    for (int g = 2; g >= 0; g--) {
        if (ns.comm[g]) NCCL_CHECK(ncclCommDestroy(ns.comm[g]));
        ns.comm[g] = NULL;
    }
    ns.split_ep = 0;
    if (ns.staging) CUDA_CHECK(cudaFree(ns.staging));
    if (ns.stream) CUDA_CHECK(cudaStreamDestroy(ns.stream));
    ns.staging = NULL;
    ns.stream = NULL;
    ns.staging_bytes = 0;
}

// ----------------------------------------------------------------------------
// Device-side collectives (GpuComm)

static void gc_allreduce_f32(void *ctx, CommGroup g, float *buf, size_t n, cudaStream_t stream) {
    (void)ctx;
    if (n == 0) return;
    NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, group_comm(g), stream));
}

static void gc_allreduce_f64(void *ctx, CommGroup g, double *buf, size_t n, cudaStream_t stream) {
    (void)ctx;
    if (n == 0) return;
    NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat64, ncclSum, group_comm(g), stream));
}

static void gc_alltoall_i32(void *ctx, const int *send, int *recv, int n, cudaStream_t stream) {
    (void)ctx;
    ncclComm_t comm = group_comm(COMM_EP);
    NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < ns.ep; p++) {
        NCCL_CHECK(ncclSend(send + (size_t)p * n, (size_t)n, ncclInt32, p, comm, stream));
        NCCL_CHECK(ncclRecv(recv + (size_t)p * n, (size_t)n, ncclInt32, p, comm, stream));
    }
    NCCL_CHECK(ncclGroupEnd());
}

// Empty blocks are skipped on both sides (the counts agree across ranks).
static void gc_alltoallv(void *ctx, const void *send, const int *send_rows, void *recv, const int *recv_rows,
                         size_t row_bytes, cudaStream_t stream) {
    (void)ctx;
    ncclComm_t comm = group_comm(COMM_EP);
    size_t so = 0, ro = 0;
    NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < ns.ep; p++) {
        if (send_rows[p] > 0)
            NCCL_CHECK(ncclSend((const char *)send + so * row_bytes, (size_t)send_rows[p] * row_bytes, ncclUint8, p,
                                comm, stream));
        if (recv_rows[p] > 0)
            NCCL_CHECK(ncclRecv((char *)recv + ro * row_bytes, (size_t)recv_rows[p] * row_bytes, ncclUint8, p, comm,
                                stream));
        so += (size_t)send_rows[p];
        ro += (size_t)recv_rows[p];
    }
    NCCL_CHECK(ncclGroupEnd());
}

static void nccl_fill(const Comm *c, GpuComm *gc) {
    memset(gc, 0, sizeof *gc);
    gc->world = c->world;
    gc->rank = c->rank;
    gc->ep = c->ep;
    gc->ep_rank = c->ep_rank;
    gc->edp = c->edp;
    gc->edp_rank = c->edp_rank;
    gc->ctx = &ns;
    gc->allreduce_f32 = gc_allreduce_f32;
    gc->allreduce_f64 = gc_allreduce_f64;
    gc->alltoall_i32 = gc_alltoall_i32;
    gc->alltoallv = gc_alltoallv;
}

// ----------------------------------------------------------------------------
// Bootstrap

#ifndef COMM_NCCL_HOST
// With MPI: this rank's index among the ranks on its host. The launcher's
// variable when it has one for this world (OMPI_COMM_WORLD_LOCAL_RANK,
// SLURM_LOCALID, ...: main() may already have selected that GPU, before
// MPI_Init), else from a 64-bit hash of every rank's host name (gathered by a
// sum over WORLD of one-hot rows).
static int mpi_local_rank(const Comm *c) {
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    uint64_t h = 1469598103934665603ULL; // FNV-1a
    for (const char *p = host; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    int64_t mine = (int64_t)(h >> 2) + 1; // positive, nonzero
    int64_t *all = calloc((size_t)c->world, sizeof(int64_t));
    if (!all) {
        fprintf(stderr, "error: out of memory\n");
        exit(1);
    }
    all[c->rank] = mine;
    comm_allreduce_i64(c, COMM_WORLD, all, (size_t)c->world);
    int local = 0;
    for (int q = 0; q < c->rank; q++) local += all[q] == mine;
    free(all);
    // (The all-reduce above runs on every rank whatever the launcher says.)
    LaunchInfo li;
    char err[256];
    if (launch_from_env(&li, err, sizeof err) == 0 && li.world == c->world && li.rank == c->rank &&
        li.local_rank >= 0)
        return li.local_rank;
    return local;
}
#endif

int comm_nccl_open(const Comm *c, GpuComm *gc, char *err, size_t errlen) {
    if (!ns.comm[COMM_WORLD]) {
        ncclUniqueId id;
        memset(&id, 0, sizeof id);
#ifdef COMM_NCCL_HOST
        // comm_init made the world communicator of several ranks; one rank makes its own.
        if (c->world != 1) {
            snprintf(err, errlen, "internal error: no NCCL communicator for %d ranks", c->world);
            return -1;
        }
        NCCL_CHECK(ncclGetUniqueId(&id));
#else
        int rc = 0;
        if (c->world > 1) rc = nccl_set_device(c->rank, mpi_local_rank(c), err, errlen);
        // Every rank fails together (the others would wait in the broadcast).
        int64_t bad = rc != 0;
        comm_allreduce_max_i64(c, COMM_WORLD, &bad, 1);
        if (bad) {
            if (rc == 0) snprintf(err, errlen, "rank %d: another rank could not choose its GPU", c->rank);
            return -1;
        }
        if (c->rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
        comm_bcast(c, &id, sizeof id, 0);
#endif
        NCCL_CHECK(ncclCommInitRank(&ns.comm[COMM_WORLD], c->world, id, c->rank));
        if (c->rank == 0) {
            int v = 0;
            ncclGetVersion(&v);
            printf("NCCL %d.%d.%d: %d rank(s), expert-parallel groups of %d\n", v / 10000, v / 100 % 100, v % 100,
                   c->world, c->ep);
        }
    }
    nccl_split(c);
    nccl_fill(c, gc);
    return 0;
}

// ----------------------------------------------------------------------------
// parallel/comm.h without MPI

#ifdef COMM_NCCL_HOST

int comm_has_mpi(void) { return 0; }

static int group_size(const Comm *c, CommGroup g) { return g == COMM_WORLD ? c->world : g == COMM_EP ? c->ep : c->edp; }

int comm_init(Comm *c, int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    memset(c, 0, sizeof *c);
    c->world = c->ep = c->edp = 1;
    c->impl = &ns;
    char err[4096];
    LaunchInfo li;
    if (launch_from_env(&li, err, sizeof err) != 0) {
        fprintf(stderr, "error: %s\n", err);
        return -1;
    }
    c->rank = c->edp_rank = li.rank;
    c->world = c->edp = li.world;
    // One process that the launcher did not place: no CUDA call here, so
    // that --help, --print-config and argument errors work without a GPU.
    if (li.world == 1 && li.local_rank < 0) return 0;
    if (nccl_set_device(li.rank, li.local_rank, err, sizeof err) != 0) {
        fprintf(stderr, "error: %s\n", err);
        return -1;
    }
    if (li.world == 1) return 0;
    LaunchRendezvous rv;
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (launch_rendezvous_from_env(&rv, err, sizeof err) != 0) {
        fprintf(stderr, "error: rank %d: %s\n", li.rank, err);
        return -1;
    }
    if (li.rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    if (launch_share(&li, &rv, &id, sizeof id, err, sizeof err) != 0) {
        fprintf(stderr, "error: %s\n", err);
        return -1;
    }
    NCCL_CHECK(ncclCommInitRank(&ns.comm[COMM_WORLD], li.world, id, li.rank));
    if (li.rank == 0) {
        int v = 0;
        ncclGetVersion(&v);
        printf("NCCL %d.%d.%d: %d ranks (from %s), rendezvous %s %s\n", v / 10000, v / 100 % 100, v % 100, li.world,
               li.source, rv.dir[0] ? "in" : "at", rv.dir[0] ? rv.dir : rv.addr);
    }
    return 0;
}

int comm_set_ep(Comm *c, int ep, char *err, size_t errlen) {
    if (comm_layout_ep(c, ep, err, errlen) != 0) return -1;
    if (ns.comm[COMM_WORLD]) nccl_split(c);
    return 0;
}

void comm_finalize(Comm *c) {
    if (ns.stream) CUDA_CHECK(cudaStreamSynchronize(ns.stream));
    comm_nccl_close();
    c->impl = NULL;
}

// The staging buffer and stream of the host collectives.
static void host_ready(void) {
    if (ns.staging) return;
    ns.staging_bytes = (size_t)64 << 20;
    CUDA_CHECK(cudaStreamCreateWithFlags(&ns.stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaMalloc(&ns.staging, ns.staging_bytes));
    if (!ns.chunk_limit) ns.chunk_limit = ns.staging_bytes;
}

// In-place reduction of a host buffer through the staging buffer, in chunks.
// force: also with one rank (the self-test).
static void host_allreduce(const Comm *c, CommGroup g, void *buf, size_t n, size_t elem, ncclDataType_t type,
                           ncclRedOp_t op, int force) {
    if (group_size(c, g) == 1 && !force) return;
    if (n == 0) return;
    host_ready();
    size_t chunk = ns.chunk_limit / elem;
    for (size_t off = 0; off < n; off += chunk) {
        size_t k = n - off < chunk ? n - off : chunk;
        char *p = (char *)buf + off * elem;
        CUDA_CHECK(cudaMemcpyAsync(ns.staging, p, k * elem, cudaMemcpyHostToDevice, ns.stream));
        NCCL_CHECK(ncclAllReduce(ns.staging, ns.staging, k, type, op, group_comm(g), ns.stream));
        CUDA_CHECK(cudaMemcpyAsync(p, ns.staging, k * elem, cudaMemcpyDeviceToHost, ns.stream));
        CUDA_CHECK(cudaStreamSynchronize(ns.stream));
    }
}

void comm_allreduce_f32(const Comm *c, CommGroup g, float *buf, size_t n) {
    host_allreduce(c, g, buf, n, sizeof(float), ncclFloat32, ncclSum, 0);
}
void comm_allreduce_f64(const Comm *c, CommGroup g, double *buf, size_t n) {
    host_allreduce(c, g, buf, n, sizeof(double), ncclFloat64, ncclSum, 0);
}
void comm_allreduce_i64(const Comm *c, CommGroup g, int64_t *buf, size_t n) {
    host_allreduce(c, g, buf, n, sizeof(int64_t), ncclInt64, ncclSum, 0);
}
void comm_allreduce_max_i64(const Comm *c, CommGroup g, int64_t *buf, size_t n) {
    host_allreduce(c, g, buf, n, sizeof(int64_t), ncclInt64, ncclMax, 0);
}

static void host_bcast(const Comm *c, void *buf, size_t bytes, int root, int force) {
    if (c->world == 1 && !force) return;
    host_ready();
    for (size_t off = 0; off < bytes; off += ns.chunk_limit) {
        size_t k = bytes - off < ns.chunk_limit ? bytes - off : ns.chunk_limit;
        char *p = (char *)buf + off;
        if (c->rank == root) CUDA_CHECK(cudaMemcpyAsync(ns.staging, p, k, cudaMemcpyHostToDevice, ns.stream));
        NCCL_CHECK(ncclBroadcast(ns.staging, ns.staging, k, ncclUint8, root, ns.comm[COMM_WORLD], ns.stream));
        if (c->rank != root) CUDA_CHECK(cudaMemcpyAsync(p, ns.staging, k, cudaMemcpyDeviceToHost, ns.stream));
        CUDA_CHECK(cudaStreamSynchronize(ns.stream));
    }
}

void comm_bcast(const Comm *c, void *buf, size_t bytes, int root) { host_bcast(c, buf, bytes, root, 0); }

void comm_barrier(const Comm *c) {
    int one = 1;
    host_allreduce(c, COMM_WORLD, &one, 1, sizeof(int), ncclInt32, ncclSum, 0);
}

// Host all-to-alls through temporary device buffers (not on the training
// path: the GPU backend exchanges device buffers with GpuComm).
static void host_alltoallv_bytes(const Comm *c, CommGroup g, const void *send, const size_t *send_bytes, void *recv,
                                 const size_t *recv_bytes) {
    int P = group_size(c, g);
    size_t ns_tot = 0, nr_tot = 0;
    for (int p = 0; p < P; p++) {
        ns_tot += send_bytes[p];
        nr_tot += recv_bytes[p];
    }
    host_ready();
    char *ds = NULL, *dr = NULL;
    CUDA_CHECK(cudaMalloc((void **)&ds, ns_tot ? ns_tot : 1));
    CUDA_CHECK(cudaMalloc((void **)&dr, nr_tot ? nr_tot : 1));
    if (ns_tot) CUDA_CHECK(cudaMemcpyAsync(ds, send, ns_tot, cudaMemcpyHostToDevice, ns.stream));
    ncclComm_t comm = g == COMM_WORLD ? ns.comm[COMM_WORLD] : group_comm(g);
    size_t so = 0, ro = 0;
    NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < P; p++) {
        if (send_bytes[p]) NCCL_CHECK(ncclSend(ds + so, send_bytes[p], ncclUint8, p, comm, ns.stream));
        if (recv_bytes[p]) NCCL_CHECK(ncclRecv(dr + ro, recv_bytes[p], ncclUint8, p, comm, ns.stream));
        so += send_bytes[p];
        ro += recv_bytes[p];
    }
    NCCL_CHECK(ncclGroupEnd());
    if (nr_tot) CUDA_CHECK(cudaMemcpyAsync(recv, dr, nr_tot, cudaMemcpyDeviceToHost, ns.stream));
    CUDA_CHECK(cudaStreamSynchronize(ns.stream));
    CUDA_CHECK(cudaFree(ds));
    CUDA_CHECK(cudaFree(dr));
}

static void host_alltoall_int(const Comm *c, CommGroup g, const int *send, int *recv, int n, int force) {
    int P = group_size(c, g);
    if (P == 1 && !force) {
        memcpy(recv, send, sizeof(int) * (size_t)n);
        return;
    }
    size_t *b = malloc(sizeof(size_t) * (size_t)P);
    if (!b) exit(1);
    for (int p = 0; p < P; p++) b[p] = sizeof(int) * (size_t)n;
    host_alltoallv_bytes(c, g, send, b, recv, b);
    free(b);
}

void comm_alltoall_int(const Comm *c, CommGroup g, const int *send, int *recv, int n) {
    host_alltoall_int(c, g, send, recv, n, 0);
}

static void host_alltoallv_rows(const Comm *c, CommGroup g, const float *send, const int *send_rows, float *recv,
                                const int *recv_rows, int width, int force) {
    int P = group_size(c, g);
    if (P == 1 && !force) {
        memcpy(recv, send, sizeof(float) * (size_t)send_rows[0] * width);
        return;
    }
    size_t *sb = malloc(sizeof(size_t) * 2 * (size_t)P), *rb = sb + P;
    if (!sb) exit(1);
    for (int p = 0; p < P; p++) {
        sb[p] = sizeof(float) * (size_t)send_rows[p] * width;
        rb[p] = sizeof(float) * (size_t)recv_rows[p] * width;
    }
    host_alltoallv_bytes(c, g, send, sb, recv, rb);
    free(sb);
}

void comm_alltoallv_rows(const Comm *c, CommGroup g, const float *send, const int *send_rows, float *recv,
                         const int *recv_rows, int width) {
    host_alltoallv_rows(c, g, send, send_rows, recv, recv_rows, width, 0);
}

// ----------------------------------------------------------------------------
// Self-test of the host collectives

int comm_nccl_selftest(const Comm *c, char *err, size_t errlen) {
    GpuComm gc;
    if (comm_nccl_open(c, &gc, err, errlen) != 0) return -1;
    host_ready();
    size_t saved = ns.chunk_limit;
    ns.chunk_limit = 40; // 10 floats, 5 doubles or int64s, 40 bytes per step: the chunk loops run
    int W = c->world, r = c->rank, bad = 0;
    const char *what = "";
    enum { N = 23 };
    float f[N];
    double d[N];
    int64_t s[N], m[N];
    for (int i = 0; i < N; i++) {
        f[i] = (float)((r + 1) * i);
        d[i] = 0.5 * (r + 1) * i;
        s[i] = ((int64_t)1 << 40) + (int64_t)(r + 1) * i;
        m[i] = (int64_t)((i * 7 + r * 3) % 11);
    }
    host_allreduce(c, COMM_WORLD, f, N, sizeof(float), ncclFloat32, ncclSum, 1);
    host_allreduce(c, COMM_WORLD, d, N, sizeof(double), ncclFloat64, ncclSum, 1);
    host_allreduce(c, COMM_WORLD, s, N, sizeof(int64_t), ncclInt64, ncclSum, 1);
    host_allreduce(c, COMM_WORLD, m, N, sizeof(int64_t), ncclInt64, ncclMax, 1);
    int64_t tri = (int64_t)W * (W + 1) / 2; // sum over ranks of (r + 1)
    for (int i = 0; i < N && !bad; i++) {
        int64_t mx = 0;
        for (int q = 0; q < W; q++) mx = (i * 7 + q * 3) % 11 > mx ? (i * 7 + q * 3) % 11 : mx;
        if (f[i] != (float)(tri * i)) bad = 1, what = "allreduce f32";
        else if (d[i] != 0.5 * (double)(tri * i)) bad = 1, what = "allreduce f64";
        else if (s[i] != ((int64_t)W << 40) + tri * i) bad = 1, what = "allreduce i64";
        else if (m[i] != mx) bad = 1, what = "allreduce max i64";
    }
    unsigned char b[N * 3];
    for (int i = 0; i < N * 3; i++) b[i] = r == 0 ? (unsigned char)(i * 5 + 1) : 0;
    host_bcast(c, b, sizeof b, 0, 1);
    for (int i = 0; i < N * 3 && !bad; i++)
        if (b[i] != (unsigned char)(i * 5 + 1)) bad = 1, what = "bcast";
    // all-to-all over WORLD: block p of rank r is r * 1000 + p * 10 + j.
    int *sa = malloc(sizeof(int) * 3 * (size_t)W), *ra = malloc(sizeof(int) * 3 * (size_t)W);
    int *rows = calloc((size_t)W, sizeof(int));
    float *sf = malloc(sizeof(float) * 2 * (size_t)W * W + 1), *rf = malloc(sizeof(float) * 2 * (size_t)W * W + 1);
    if (!sa || !ra || !rows || !sf || !rf) exit(1);
    for (int p = 0; p < W; p++)
        for (int j = 0; j < 3; j++) sa[p * 3 + j] = r * 1000 + p * 10 + j;
    host_alltoall_int(c, COMM_WORLD, sa, ra, 3, 1);
    for (int q = 0; q < W && !bad; q++)
        for (int j = 0; j < 3; j++)
            if (ra[q * 3 + j] != q * 1000 + r * 10 + j) bad = 1, what = "alltoall int";
    // all-to-all-v: rank r sends p rows (width 2) to rank p: row k = (r, k).
    int nsend = 0;
    for (int p = 0; p < W; p++) {
        rows[p] = p;
        for (int k = 0; k < p; k++, nsend++) {
            sf[nsend * 2] = (float)r;
            sf[nsend * 2 + 1] = (float)k;
        }
    }
    int *rrows = calloc((size_t)W, sizeof(int));
    if (!rrows) exit(1);
    for (int q = 0; q < W; q++) rrows[q] = r; // everyone sends r rows to rank r
    host_alltoallv_rows(c, COMM_WORLD, sf, rows, rf, rrows, 2, 1);
    for (int q = 0, row = 0; q < W && !bad; q++)
        for (int k = 0; k < r; k++, row++)
            if (rf[row * 2] != (float)q || rf[row * 2 + 1] != (float)k) bad = 1, what = "alltoallv rows";
    free(sa);
    free(ra);
    free(rows);
    free(rrows);
    free(sf);
    free(rf);
    ns.chunk_limit = saved;
    int64_t any = bad;
    host_allreduce(c, COMM_WORLD, &any, 1, sizeof(int64_t), ncclInt64, ncclMax, 1);
    if (any) {
        snprintf(err, errlen, "rank %d: host collective self-test failed%s%s", r, bad ? ": " : " on another rank",
                 what);
        return -1;
    }
    return 0;
}

#else

int comm_nccl_selftest(const Comm *c, char *err, size_t errlen) {
    (void)c;
    snprintf(err, errlen, "the host collectives of this build are MPI's (parallel/comm.c)");
    return -1;
}

#endif
