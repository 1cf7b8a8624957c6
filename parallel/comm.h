// The communicator of the CPU trainer: MPI when the build has it (USE_MPI),
// otherwise a single process. Ranks form expert-parallel (EP) groups of `ep`
// consecutive ranks; the ranks holding the same experts (the same position in
// their EP group) form an expert-data-parallel (EDP) group of world/ep ranks.
//
//   world 4, ep 2:  EP groups {0,1} {2,3};  EDP groups {0,2} {1,3}
//
// Replicated parameters are averaged over WORLD, expert parameters over EDP,
// and tokens travel to their experts inside the EP group.
#ifndef MOE_COMM_H
#define MOE_COMM_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum { COMM_WORLD = 0, COMM_EP = 1, COMM_EDP = 2 } CommGroup;

typedef struct {
    int rank, world;     // this process among all
    int ep, ep_rank;     // EP group size and this rank's position in it
    int edp, edp_rank;   // EDP group size (world / ep) and position
    void *impl;          // the backend's handles (MPI communicators), private to comm.c
} Comm;

// Starts MPI (if built with it) and fills rank/world, with ep = 1. Returns 0,
// or -1 with a message printed.
int comm_init(Comm *c, int *argc, char ***argv);
// Forms the EP and EDP groups. ep must divide world. Collective.
int comm_set_ep(Comm *c, int ep, char *err, size_t errlen);

// The group layout, the one definition every communicator uses: EP groups
// are consecutive ranks (color rank / ep, position rank % ep), EDP groups the
// ranks of equal rank % ep (position rank / ep). Sets c's ep and edp fields;
// -1 with a message when ep does not divide the world.
static inline int comm_layout_ep(Comm *c, int ep, char *err, size_t errlen) {
    if (ep < 1 || c->world % ep != 0) {
        snprintf(err, errlen, "--ep %d must divide the number of ranks (%d)", ep, c->world);
        return -1;
    }
    c->ep = ep;
    c->ep_rank = c->rank % ep;
    c->edp = c->world / ep;
    c->edp_rank = c->rank / ep;
    return 0;
}
void comm_finalize(Comm *c);
// 1 when this build can run more than one process.
int comm_has_mpi(void);

// In-place sums over a group (exact for int64).
void comm_allreduce_f32(const Comm *c, CommGroup g, float *buf, size_t n);
void comm_allreduce_f64(const Comm *c, CommGroup g, double *buf, size_t n);
void comm_allreduce_i64(const Comm *c, CommGroup g, int64_t *buf, size_t n);
// In-place maximum over a group.
void comm_allreduce_max_i64(const Comm *c, CommGroup g, int64_t *buf, size_t n);
// recv (P n) = block p of send (P n) goes to rank p of group g.
void comm_alltoall_int(const Comm *c, CommGroup g, const int *send, int *recv, int n);
// Rows of `width` floats: send_rows[p] rows to rank p (contiguous, in rank
// order), recv_rows[q] rows from rank q.
void comm_alltoallv_rows(const Comm *c, CommGroup g, const float *send, const int *send_rows, float *recv,
                         const int *recv_rows, int width);
void comm_bcast(const Comm *c, void *buf, size_t bytes, int root);
void comm_barrier(const Comm *c);

#endif
