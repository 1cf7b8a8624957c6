// NCCL for the GPU trainer (train_moe.cu): communicators for the WORLD, EP and
// EDP groups of a Comm (parallel/comm.h), and the device-side collectives the GPU
// backend calls on its stream, behind a small table (GpuComm) so the tests can
// put a simulation of several ranks in its place (tests/test_gpu_dist.cu).
//
// parallel/comm_nccl.c is built in one of two ways:
//  - with MPI (gpu.mk, when mpicc exists): parallel/comm.c provides the host
//    collectives of parallel/comm.h over MPI, and comm_nccl_open() bootstraps NCCL
//    from them: every rank learns its local rank from the host names (an
//    all-reduce), takes the GPU of that index, and rank 0's ncclUniqueId
//    reaches the others by comm_bcast;
//  - without MPI (-DCOMM_NCCL_HOST): this file implements parallel/comm.h itself.
//    comm_init reads rank / world / local rank from the launcher's environment
//    and hands rank 0's ncclUniqueId to the others through parallel/launch.c (a
//    file in --nccl-init DIR, or TCP); the host collectives of the training
//    loop (counts, losses, stop flag, checksums) copy the host buffer into a
//    small device staging buffer, run NCCL there, and copy back.
// In both, EP groups are `ep` consecutive ranks and EDP groups the ranks at
// the same position of every EP group (parallel/comm.h), made by ncclCommSplit
// of the world communicator.
#ifndef MOE_COMM_NCCL_H
#define MOE_COMM_NCCL_H

#include <cuda_runtime_api.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "comm.h"

// The GPU backend's view of the ranks, and its collectives. Every call is
// collective over its group, enqueued on `stream` (asynchronous with
// respect to the host), on device buffers. Ranks are numbered as in Comm.
typedef struct GpuComm {
    int world, rank;     // all ranks
    int ep, ep_rank;     // expert-parallel group: ep consecutive ranks
    int edp, edp_rank;   // expert-data-parallel group: world / ep ranks, same ep_rank
    void *ctx;           // the implementation's state
    // In-place sums over group g of buf (n values).
    void (*allreduce_f32)(void *ctx, CommGroup g, float *buf, size_t n, cudaStream_t stream);
    void (*allreduce_f64)(void *ctx, CommGroup g, double *buf, size_t n, cudaStream_t stream);
    // Over the EP group: recv (P n) block q = block `ep_rank` of rank q's send (P n).
    void (*alltoall_i32)(void *ctx, const int *send, int *recv, int n, cudaStream_t stream);
    // Over the EP group, rows of row_bytes: send holds send_rows[p] rows for
    // each rank p in rank order; recv receives recv_rows[q] rows from each
    // rank q in rank order. send_rows and recv_rows (P) are HOST arrays and
    // must agree across ranks (recv_rows[q] here = send_rows[ep_rank] on q).
    void (*alltoallv)(void *ctx, const void *send, const int *send_rows, void *recv, const int *recv_rows,
                      size_t row_bytes, cudaStream_t stream);
} GpuComm;

// Fills *gc with the NCCL collectives over c's groups, creating the NCCL
// communicators on the first call (collective over all ranks: call it on
// every rank, after comm_set_ep; later calls return the same ones). With MPI
// it also selects this rank's GPU. Works for a world of one rank too (the
// communicators then have one rank each). Returns 0, or -1 with a message
// in err (on every rank when any rank fails).
int comm_nccl_open(const Comm *c, GpuComm *gc, char *err, size_t errlen);

// Destroys the NCCL communicators (idempotent). comm_finalize calls it in the
// build without MPI; with MPI, main() calls it after trainer_main.
void comm_nccl_close(void);

// Build without MPI only: runs every host collective of parallel/comm.h through
// its staging path (also with one rank, where they otherwise return at once),
// with a tiny staging chunk so that the chunk loops run, and checks the
// results. Collective. Returns 0, or -1 with a message.
int comm_nccl_selftest(const Comm *c, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
