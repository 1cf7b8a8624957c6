// The CPU communicator (see comm.h). Every MPI call is checked: the
// communicators return errors instead of aborting, and a failure prints the
// file, line and MPI's message, then aborts the whole job (a collective that
// failed on one rank leaves the others waiting forever otherwise).
#include "comm.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef USE_MPI
#include <mpi.h>

typedef struct {
    MPI_Comm comm[3]; // indexed by CommGroup
    int split;        // 1: comm[COMM_EP] and comm[COMM_EDP] were created by comm_set_ep
} CommMpi;

static MPI_Comm comm_of(const Comm *c, CommGroup g) { return ((const CommMpi *)c->impl)->comm[g]; }

static void comm_check(int rc, const char *what, const char *file, int line) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    fprintf(stderr, "%s:%d: MPI error in %s: %s\n", file, line, what, msg);
    MPI_Abort(MPI_COMM_WORLD, 1);
}
#define MPI_CHECK(call) comm_check((call), #call, __FILE__, __LINE__)
#endif

int comm_has_mpi(void) {
#ifdef USE_MPI
    return 1;
#else
    return 0;
#endif
}

int comm_init(Comm *c, int *argc, char ***argv) {
    memset(c, 0, sizeof *c);
    c->world = c->ep = c->edp = 1;
#ifdef USE_MPI
    int provided;
    // Only the main thread calls MPI (OpenMP regions never do).
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "error: MPI_Init failed\n");
        return -1;
    }
    MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &c->rank));
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &c->world));
    c->edp = c->world;
    c->edp_rank = c->rank;
    CommMpi *m = calloc(1, sizeof *m);
    if (!m) {
        fprintf(stderr, "error: out of memory\n");
        return -1;
    }
    m->comm[COMM_WORLD] = m->comm[COMM_EDP] = MPI_COMM_WORLD;
    m->comm[COMM_EP] = MPI_COMM_SELF;
    c->impl = m;
#else
    (void)argc;
    (void)argv;
#endif
    return 0;
}

int comm_set_ep(Comm *c, int ep, char *err, size_t errlen) {
    if (comm_layout_ep(c, ep, err, errlen) != 0) return -1;
#ifdef USE_MPI
    // EP groups: consecutive ranks (same rank / ep); EDP groups: same rank % ep.
    CommMpi *m = c->impl;
    MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, c->rank / ep, c->rank, &m->comm[COMM_EP]));
    MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, c->rank % ep, c->rank, &m->comm[COMM_EDP]));
    MPI_CHECK(MPI_Comm_set_errhandler(m->comm[COMM_EP], MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_set_errhandler(m->comm[COMM_EDP], MPI_ERRORS_RETURN));
    m->split = 1;
#endif
    return 0;
}

void comm_finalize(Comm *c) {
#ifdef USE_MPI
    CommMpi *m = c->impl;
    if (m && m->split) {
        MPI_Comm_free(&m->comm[COMM_EP]);
        MPI_Comm_free(&m->comm[COMM_EDP]);
    }
    free(m);
    c->impl = NULL;
    MPI_Finalize();
#else
    (void)c;
#endif
}

static int comm_size(const Comm *c, CommGroup g) {
    return g == COMM_WORLD ? c->world : g == COMM_EP ? c->ep : c->edp;
}

#ifdef USE_MPI
// MPI counts are int: large buffers go in chunks.
static void comm_allreduce(const Comm *c, CommGroup g, void *buf, size_t n, MPI_Datatype type, size_t size,
                           MPI_Op op) {
    const size_t chunk = (size_t)1 << 28;
    for (size_t off = 0; off < n; off += chunk) {
        size_t k = n - off < chunk ? n - off : chunk;
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, (char *)buf + off * size, (int)k, type, op, comm_of(c, g)));
    }
}
#endif

void comm_allreduce_f32(const Comm *c, CommGroup g, float *buf, size_t n) {
    if (comm_size(c, g) == 1) return;
#ifdef USE_MPI
    comm_allreduce(c, g, buf, n, MPI_FLOAT, sizeof(float), MPI_SUM);
#else
    (void)buf;
    (void)n;
#endif
}

void comm_allreduce_f64(const Comm *c, CommGroup g, double *buf, size_t n) {
    if (comm_size(c, g) == 1) return;
#ifdef USE_MPI
    comm_allreduce(c, g, buf, n, MPI_DOUBLE, sizeof(double), MPI_SUM);
#else
    (void)buf;
    (void)n;
#endif
}

void comm_allreduce_i64(const Comm *c, CommGroup g, int64_t *buf, size_t n) {
    if (comm_size(c, g) == 1) return;
#ifdef USE_MPI
    comm_allreduce(c, g, buf, n, MPI_INT64_T, sizeof(int64_t), MPI_SUM);
#else
    (void)buf;
    (void)n;
#endif
}

void comm_allreduce_max_i64(const Comm *c, CommGroup g, int64_t *buf, size_t n) {
    if (comm_size(c, g) == 1) return;
#ifdef USE_MPI
    comm_allreduce(c, g, buf, n, MPI_INT64_T, sizeof(int64_t), MPI_MAX);
#else
    (void)buf;
    (void)n;
#endif
}

void comm_alltoall_int(const Comm *c, CommGroup g, const int *send, int *recv, int n) {
    int P = comm_size(c, g);
    if (P == 1) {
        memcpy(recv, send, sizeof(int) * n);
        return;
    }
#ifdef USE_MPI
    MPI_CHECK(MPI_Alltoall(send, n, MPI_INT, recv, n, MPI_INT, comm_of(c, g)));
#endif
}

void comm_alltoallv_rows(const Comm *c, CommGroup g, const float *send, const int *send_rows, float *recv,
                         const int *recv_rows, int width) {
    int P = comm_size(c, g);
    if (P == 1) {
        (void)recv_rows; // with one rank, what is sent is what is received
        memcpy(recv, send, sizeof(float) * (size_t)send_rows[0] * width);
        return;
    }
#ifdef USE_MPI
    // One row is one element of a contiguous type, so counts stay small ints.
    MPI_Datatype row;
    MPI_CHECK(MPI_Type_contiguous(width, MPI_FLOAT, &row));
    MPI_CHECK(MPI_Type_commit(&row));
    int *sd = malloc(sizeof(int) * P * 2), *rd = sd + P;
    if (!sd) {
        fprintf(stderr, "error: out of memory in all-to-all\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    for (int p = 0, s = 0, r = 0; p < P; s += send_rows[p], r += recv_rows[p], p++) {
        sd[p] = s;
        rd[p] = r;
    }
    MPI_CHECK(MPI_Alltoallv(send, send_rows, sd, row, recv, recv_rows, rd, row, comm_of(c, g)));
    MPI_CHECK(MPI_Type_free(&row));
    free(sd);
#endif
}

void comm_bcast(const Comm *c, void *buf, size_t bytes, int root) {
    if (c->world == 1) return;
#ifdef USE_MPI
    if (bytes > INT_MAX) {
        fprintf(stderr, "error: broadcast of %zu bytes is too large\n", bytes);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_CHECK(MPI_Bcast(buf, (int)bytes, MPI_BYTE, root, MPI_COMM_WORLD));
#else
    (void)buf;
    (void)bytes;
    (void)root;
#endif
}

void comm_barrier(const Comm *c) {
    if (c->world == 1) return;
#ifdef USE_MPI
    MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
#endif
}
