// Starting several processes without MPI: where this process stands in the
// job (rank, world size, local rank, from the launcher's environment), and a
// one-time rendezvous that hands a small blob from rank 0 to every rank (the
// GPU trainer's NCCL unique id, see parallel/comm_nccl.c). Plain POSIX C: no CUDA,
// no NCCL, so the CPU tests (tests/test_launch.c) exercise all of it.
//
// Rank, world size and local rank are read from the first complete set of:
//   RANK, WORLD_SIZE, LOCAL_RANK                          torchrun, or set by hand
//   OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK              Open MPI's mpirun
//   PMI_RANK, PMI_SIZE, MPI_LOCALRANKID                   MPICH / Intel MPI (hydra)
//   SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_LOCALID
//                                                         srun (only inside a job step, i.e. with
//                                                         SLURM_STEP_ID set: a batch script itself
//                                                         is one process, whatever --ntasks says)
// and otherwise the process is rank 0 of 1. LOCAL_RANK-style values are
// optional (-1 when absent).
//
// The rendezvous, tried in this order:
//   file  MOE_NCCL_INIT=DIR (train_moecu --nccl-init DIR): a directory every
//         rank can read (a shared filesystem across nodes). Rank 0 writes
//         DIR/moe_nccl_id[.TAG] through a temporary file and an atomic rename;
//         the others poll for it, check it, and acknowledge with
//         DIR/moe_nccl_id[.TAG].ack.RANK; rank 0 waits for every
//         acknowledgement, then removes all the files. TAG is MOE_NCCL_RUN_ID,
//         else SLURM_JOB_ID.SLURM_STEP_ID, else TORCHELASTIC_RUN_ID, else
//         empty: two runs sharing DIR at the same time need different TAGs,
//         and a run killed during the rendezvous may leave a file behind
//         (rank 0 removes it at its next start; a fresh DIR per run is safest).
//   tcp   MOE_NCCL_ADDR and MOE_NCCL_PORT, else MASTER_ADDR and MASTER_PORT + 1
//         (torchrun's own store already listens on MASTER_PORT): rank 0
//         listens on that port (IPv4, all interfaces), the others connect
//         (retrying until it is up) and receive the blob.
// Every wait gives up after MOE_NCCL_TIMEOUT seconds (default 300) with a
// message naming what was missing.
#ifndef MOE_LAUNCH_H
#define MOE_LAUNCH_H

#include <stddef.h>

typedef struct {
    int rank, world;
    int local_rank;     // -1 when the launcher does not say
    const char *source; // which variables gave them ("RANK/WORLD_SIZE", "SLURM", ..., "none")
} LaunchInfo;

typedef struct {
    char dir[4096];     // file rendezvous directory, or ""
    char tag[256];      // file name suffix, or ""
    char addr[256];     // tcp: rank 0's host name or IPv4 address, or ""
    int port;           // tcp port (0: none)
    double timeout_s;   // every wait
} LaunchRendezvous;

// Fills *li from the environment. Returns 0, or -1 with a message in err
// (a malformed or inconsistent value: rank outside [0, world), ...).
int launch_from_env(LaunchInfo *li, char *err, size_t errlen);

// Fills *rv from the environment (MOE_NCCL_INIT, MOE_NCCL_RUN_ID, ...). A
// method is available when dir[0] or (addr[0] and port). Returns 0, or -1
// with a message (a malformed port or timeout).
int launch_rendezvous_from_env(LaunchRendezvous *rv, char *err, size_t errlen);

// Collective over the li->world ranks: rank 0's `bytes` of `data` are copied
// into every other rank's `data`, through the file method when rv->dir is
// set, else over TCP. Returns 0, or -1 with a message in err.
int launch_share(const LaunchInfo *li, const LaunchRendezvous *rv, void *data, size_t bytes, char *err,
                 size_t errlen);

// The two methods on their own (used by launch_share, and by the tests).
int launch_share_file(const char *dir, const char *tag, int rank, int world, void *data, size_t bytes,
                      double timeout_s, char *err, size_t errlen);
int launch_share_tcp(const char *addr, int port, int rank, int world, void *data, size_t bytes, double timeout_s,
                     char *err, size_t errlen);

#endif
