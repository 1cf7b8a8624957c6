// CUDA emulation on the CPU: NCCL (tests/emu; see emu_memory.cc).
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "emu_internal.h"
#include "nccl.h"

using namespace emu;

// ----------------------------------------------------------------------------
// NCCL
//
// One rank: collectives copy. Several ranks are several processes (each its
// own emulated GPU); a communicator is a POSIX shared-memory segment: a
// header (a barrier, the split table, the point-to-point table) and one
// staging slot per rank. A collective puts each rank's data in its slot,
// waits at the barrier, and every rank computes the result from all slots in
// rank order -- the same bits on every rank, like NCCL's deterministic
// algorithms with a fixed topology. A rank that does not arrive within
// EMU_NCCL_TIMEOUT seconds (default 300) stops every waiting rank.
//
// On a stream that captures (emu_graph.cc), a collective (or a group's sends
// and receives, at ncclGroupEnd) is checked and recorded; each replay runs
// it, so every rank must replay its graph as it would have run the calls.

static const uint32_t SHM_MAGIC = 0x4e43434cu; // "NCCL"
static const int SHM_MAX_RANKS = 64, SHM_MAX_MSGS = 16;

// Point-to-point traffic from one rank to another: a mailbox holding one
// group's messages at a time (the region of the sender's slot reserved for
// that receiver), with counters of batches posted and consumed.
struct ShmMailbox {
    int posted, consumed; // atomics
    int n;
    size_t bytes[SHM_MAX_MSGS];
};

struct ShmHeader {
    uint32_t magic;    // written last by the creator
    int nranks;
    size_t slot_bytes;
    int count, generation; // the barrier (atomics)
    int aborted;           // set by a rank that stops: the others stop too instead of waiting
    int split_color[SHM_MAX_RANKS], split_key[SHM_MAX_RANKS];
    ShmMailbox box[SHM_MAX_RANKS][SHM_MAX_RANKS]; // [sender][receiver]
};

struct EmuNcclComm {
    int nranks, rank;
    char name[96];       // the shared-memory segment (several ranks)
    ShmHeader *shm;      // NULL with one rank
    size_t map_bytes;
    char *slots;         // nranks * slot_bytes after the header
    int n_splits;        // how many splits of this communicator so far (the same on every rank)
};

struct PendingP2P {
    ncclComm_t comm;
    cudaStream_t stream;
    int peer;
    const void *send;
    void *recv;
    size_t bytes;
};
static thread_local int t_group_depth;
static thread_local std::vector<PendingP2P> t_sends, t_recvs;
static thread_local char t_nccl_error[256];

static size_t nccl_type_bytes(ncclDataType_t t) {
    switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    }
    return 0;
}

static ncclResult_t nccl_error(ncclResult_t r, const char *msg) {
    snprintf(t_nccl_error, sizeof t_nccl_error, "%s", msg);
    return r;
}

static double nccl_timeout_s() {
    const char *t = getenv("EMU_NCCL_TIMEOUT");
    return t ? atof(t) : 300.0;
}

static double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// The communicators of several ranks this process has attached.
static std::mutex g_comms_mutex;
static std::vector<EmuNcclComm *> g_comms;

void emu::nccl_mark_aborted() {
    for (EmuNcclComm *c : g_comms) // (no lock: the process is about to stop)
        if (c->shm) __atomic_store_n(&c->shm->aborted, 1, __ATOMIC_RELEASE);
}

static void check_aborted(EmuNcclComm *c, const char *what) {
    if (__atomic_load_n(&c->shm->aborted, __ATOMIC_ACQUIRE))
        emu_fail("%s: rank %d of %d: another rank of this communicator stopped", what, c->rank, c->nranks);
}

// Sense-reversing barrier over the processes of a communicator.
static void shm_barrier(EmuNcclComm *c, const char *what) {
    ShmHeader *h = c->shm;
    int gen = __atomic_load_n(&h->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&h->count, 1, __ATOMIC_ACQ_REL) == h->nranks) {
        __atomic_store_n(&h->count, 0, __ATOMIC_RELAXED);
        __atomic_add_fetch(&h->generation, 1, __ATOMIC_RELEASE);
        return;
    }
    double t0 = now_s(), limit = nccl_timeout_s();
    for (long spin = 0; __atomic_load_n(&h->generation, __ATOMIC_ACQUIRE) == gen; spin++) {
        if (spin < 1000) continue;
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
        if ((spin & 1023) == 0) check_aborted(c, what);
        if ((spin & 1023) == 0 && now_s() - t0 > limit)
            emu_fail("%s: rank %d of %d waited %.0f s for the other ranks (%s); a rank failed or called another "
                     "collective", what, c->rank, c->nranks, limit, c->name);
    }
}

// Waits until *counter reaches want (another process advances it).
static void wait_until(int *counter, int want, EmuNcclComm *c, const char *what) {
    double t0 = now_s(), limit = nccl_timeout_s();
    for (long spin = 0; __atomic_load_n(counter, __ATOMIC_ACQUIRE) < want; spin++) {
        if (spin < 1000) continue;
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
        if ((spin & 1023) == 0) check_aborted(c, what);
        if ((spin & 1023) == 0 && now_s() - t0 > limit)
            emu_fail("%s: rank %d of %d waited %.0f s for its peer (%s)", what, c->rank, c->nranks, limit, c->name);
    }
}

static size_t shm_slot_bytes() {
    const char *m = getenv("EMU_NCCL_SLOT_MB");
    return (size_t)(m ? atof(m) : 16.0) * 1048576;
}

// Creates (rank 0) or opens the segment of a communicator of n ranks.
static ncclResult_t shm_attach(EmuNcclComm *c, const char *name, int n, int rank) {
    if (n > SHM_MAX_RANKS) return nccl_error(ncclInvalidArgument, "the emulator's NCCL has at most 64 ranks");
    snprintf(c->name, sizeof c->name, "%s", name);
    c->nranks = n;
    c->rank = rank;
    size_t slot = shm_slot_bytes();
    c->map_bytes = round_up(sizeof(ShmHeader), 4096) + (size_t)n * slot;
    int fd = -1;
    if (rank == 0) {
        fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0 || ftruncate(fd, (off_t)c->map_bytes) != 0)
            return nccl_error(ncclSystemError, "cannot create the emulator's shared-memory communicator");
    } else {
        double t0 = now_s();
        while ((fd = shm_open(name, O_RDWR, 0600)) < 0) {
            if (now_s() - t0 > nccl_timeout_s())
                return nccl_error(ncclSystemError, "timed out waiting for rank 0's shared-memory communicator");
            usleep(1000);
        }
    }
    void *m = MAP_FAILED;
    for (double t0 = now_s(); m == MAP_FAILED; usleep(1000)) {
        struct stat st;
        if (fstat(fd, &st) == 0 && (size_t)st.st_size >= c->map_bytes)
            m = mmap(NULL, c->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED && now_s() - t0 > nccl_timeout_s()) {
            close(fd);
            return nccl_error(ncclSystemError, "cannot map the emulator's shared-memory communicator");
        }
    }
    close(fd);
    c->shm = (ShmHeader *)m;
    c->slots = (char *)m + round_up(sizeof(ShmHeader), 4096);
    if (rank == 0) {
        c->shm->nranks = n;
        c->shm->slot_bytes = slot;
        __atomic_store_n(&c->shm->magic, SHM_MAGIC, __ATOMIC_RELEASE);
    } else {
        for (double t0 = now_s(); __atomic_load_n(&c->shm->magic, __ATOMIC_ACQUIRE) != SHM_MAGIC; usleep(1000))
            if (now_s() - t0 > nccl_timeout_s())
                return nccl_error(ncclSystemError, "rank 0 never initialised the shared-memory communicator");
        if (c->shm->nranks != n || c->shm->slot_bytes != slot)
            return nccl_error(ncclInvalidUsage, "ranks disagree on the communicator size or EMU_NCCL_SLOT_MB");
    }
    {
        std::lock_guard<std::mutex> lock(g_comms_mutex);
        g_comms.push_back(c);
    }
    // Everyone has it open: its name can go (nothing is left behind if a rank dies later).
    shm_barrier(c, "ncclCommInitRank");
    if (rank == 0) shm_unlink(name);
    return ncclSuccess;
}

static char *slot_of(EmuNcclComm *c, int r) { return c->slots + (size_t)r * c->shm->slot_bytes; }

extern "C" ncclResult_t ncclGetVersion(int *version) {
    *version = NCCL_VERSION_CODE;
    return ncclSuccess;
}
extern "C" ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId) {
    static int counter;
    memset(uniqueId, 0, sizeof *uniqueId);
    snprintf(uniqueId->internal, sizeof uniqueId->internal, "/moe-emu-nccl-%d-%d-%lx", (int)getpid(), counter++,
             (unsigned long)(now_s() * 1e6));
    return ncclSuccess;
}
extern "C" ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank) {
    if (nranks < 1 || rank < 0 || rank >= nranks) return nccl_error(ncclInvalidArgument, "bad nranks or rank");
    EmuNcclComm *c = new EmuNcclComm();
    c->nranks = nranks;
    c->rank = rank;
    if (nranks > 1) {
        char name[96];
        memcpy(name, commId.internal, sizeof name - 1);
        name[sizeof name - 1] = 0;
        ncclResult_t r = shm_attach(c, name, nranks, rank);
        if (r != ncclSuccess) {
            delete c;
            return r;
        }
    }
    *comm = c;
    return ncclSuccess;
}

// Collective over comm: ranks of the same color form a communicator, ordered
// by (key, rank); its first member creates the segment.
extern "C" ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm, ncclConfig_t *config) {
    (void)config;
    if (!comm) return nccl_error(ncclInvalidArgument, "ncclCommSplit of a NULL communicator");
    if (comm->nranks == 1) {
        *newcomm = color == NCCL_SPLIT_NOCOLOR ? NULL : new EmuNcclComm{1, 0, "", NULL, 0, NULL, 0};
        return ncclSuccess;
    }
    ShmHeader *h = comm->shm;
    h->split_color[comm->rank] = color;
    h->split_key[comm->rank] = key;
    shm_barrier(comm, "ncclCommSplit");
    int n = 0, me = 0;
    for (int r = 0; r < comm->nranks; r++) {
        if (h->split_color[r] != color) continue;
        if (h->split_key[r] < key || (h->split_key[r] == key && r < comm->rank)) me++;
        n++;
    }
    int split = comm->n_splits++;
    shm_barrier(comm, "ncclCommSplit"); // the table is read by all before the next split writes it
    if (color == NCCL_SPLIT_NOCOLOR) {
        *newcomm = NULL;
        return ncclSuccess;
    }
    EmuNcclComm *c = new EmuNcclComm();
    c->nranks = n;
    c->rank = me;
    if (n > 1) {
        char name[96];
        snprintf(name, sizeof name, "%.60s-s%d-c%d", comm->name, split, color);
        ncclResult_t r = shm_attach(c, name, n, me);
        if (r != ncclSuccess) {
            delete c;
            return r;
        }
    }
    *newcomm = c;
    return ncclSuccess;
}

extern "C" ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (comm && comm->shm) {
        std::lock_guard<std::mutex> lock(g_comms_mutex);
        g_comms.erase(std::remove(g_comms.begin(), g_comms.end(), comm), g_comms.end());
        munmap(comm->shm, comm->map_bytes);
    }
    delete comm;
    return ncclSuccess;
}
extern "C" const char *ncclGetErrorString(ncclResult_t result) {
    switch (result) {
    case ncclSuccess: return "no error";
    case ncclSystemError: return "unhandled system error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    default: return "NCCL error (emulator)";
    }
}
extern "C" const char *ncclGetLastError(ncclComm_t comm) {
    (void)comm;
    return t_nccl_error;
}

// acc[i] = acc[i] op x[i] for n elements of type T.
template <class T> static void reduce_into(T *acc, const T *x, size_t n, ncclRedOp_t op) {
    for (size_t i = 0; i < n; i++) {
        switch (op) {
        case ncclSum: case ncclAvg: acc[i] = acc[i] + x[i]; break;
        case ncclProd: acc[i] = acc[i] * x[i]; break;
        case ncclMax: acc[i] = x[i] > acc[i] ? x[i] : acc[i]; break;
        case ncclMin: acc[i] = x[i] < acc[i] ? x[i] : acc[i]; break;
        }
    }
}

static void reduce_typed(void *acc, const void *x, size_t n, ncclDataType_t t, ncclRedOp_t op) {
    switch (t) {
    case ncclInt8: reduce_into((int8_t *)acc, (const int8_t *)x, n, op); break;
    case ncclUint8: reduce_into((uint8_t *)acc, (const uint8_t *)x, n, op); break;
    case ncclInt32: reduce_into((int32_t *)acc, (const int32_t *)x, n, op); break;
    case ncclUint32: reduce_into((uint32_t *)acc, (const uint32_t *)x, n, op); break;
    case ncclInt64: reduce_into((int64_t *)acc, (const int64_t *)x, n, op); break;
    case ncclUint64: reduce_into((uint64_t *)acc, (const uint64_t *)x, n, op); break;
    case ncclFloat32: reduce_into((float *)acc, (const float *)x, n, op); break;
    case ncclFloat64: reduce_into((double *)acc, (const double *)x, n, op); break;
    default: emu_fail("the emulator's NCCL does not reduce 16-bit types");
    }
}

// A collective's work: run now, or checked (already) and recorded when its
// stream captures. A stream it may not use now (the legacy stream during a
// blocking capture, an invalidated capture) fails its kernel launch, which
// NCCL reports as ncclUnhandledCudaError.
static ncclResult_t nccl_enqueue(cudaStream_t stream, const char *who, Work work) {
    bool record;
    cudaError_t e = capture_check(stream, who, &record);
    if (e != cudaSuccess) return nccl_error(ncclUnhandledCudaError, cudaGetErrorString(e));
    if (record)
        capture_record(stream, who, work);
    else
        work(stream);
    return ncclSuccess;
}

static void allreduce_run(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op,
                          ncclComm_t comm) {
    prof_count(PROF_NCCL_ALLREDUCE);
    size_t es = nccl_type_bytes(datatype), bytes = count * es;
    need_device(sendbuff, bytes, "ncclAllReduce send buffer");
    need_device(recvbuff, bytes, "ncclAllReduce receive buffer");
    enter_device();
    if (comm->nranks == 1) {
        if (sendbuff != recvbuff) memmove(recvbuff, sendbuff, bytes);
    } else {
        size_t chunk = comm->shm->slot_bytes / es * es;
        std::vector<char> acc(chunk);
        for (size_t off = 0; off < bytes; off += chunk) {
            size_t k = bytes - off < chunk ? bytes - off : chunk;
            memcpy(slot_of(comm, comm->rank), (const char *)sendbuff + off, k);
            shm_barrier(comm, "ncclAllReduce");
            memcpy(acc.data(), slot_of(comm, 0), k); // rank order: the same bits on every rank
            for (int r = 1; r < comm->nranks; r++) reduce_typed(acc.data(), slot_of(comm, r), k / es, datatype, op);
            shm_barrier(comm, "ncclAllReduce");
            memcpy((char *)recvbuff + off, acc.data(), k);
        }
    }
    exit_device();
}

extern "C" ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                                      ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    if (!comm) return nccl_error(ncclInvalidArgument, "NULL communicator");
    size_t bytes = count * nccl_type_bytes(datatype);
    need_device(sendbuff, bytes, "ncclAllReduce send buffer");
    need_device(recvbuff, bytes, "ncclAllReduce receive buffer");
    if (op == ncclAvg) return nccl_error(ncclInvalidArgument, "ncclAvg is not emulated");
    return nccl_enqueue(stream, "ncclAllReduce",
                        [=](cudaStream_t) { allreduce_run(sendbuff, recvbuff, count, datatype, op, comm); });
}

static void broadcast_run(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype, int root,
                          ncclComm_t comm) {
    prof_count(PROF_NCCL_BCAST);
    size_t bytes = count * nccl_type_bytes(datatype);
    if (comm->rank == root) need_device(sendbuff, bytes, "ncclBroadcast send buffer");
    need_device(recvbuff, bytes, "ncclBroadcast receive buffer");
    enter_device();
    if (comm->nranks == 1) {
        if (sendbuff != recvbuff) memmove(recvbuff, sendbuff, bytes);
    } else {
        size_t chunk = comm->shm->slot_bytes;
        for (size_t off = 0; off < bytes; off += chunk) {
            size_t k = bytes - off < chunk ? bytes - off : chunk;
            if (comm->rank == root) memcpy(slot_of(comm, root), (const char *)sendbuff + off, k);
            shm_barrier(comm, "ncclBroadcast");
            if (comm->rank != root || sendbuff != recvbuff) memcpy((char *)recvbuff + off, slot_of(comm, root), k);
            shm_barrier(comm, "ncclBroadcast");
        }
    }
    exit_device();
}

extern "C" ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                                      int root, ncclComm_t comm, cudaStream_t stream) {
    if (!comm) return nccl_error(ncclInvalidArgument, "NULL communicator");
    if (root < 0 || root >= comm->nranks) return nccl_error(ncclInvalidArgument, "ncclBroadcast root outside the communicator");
    size_t bytes = count * nccl_type_bytes(datatype);
    if (comm->rank == root) need_device(sendbuff, bytes, "ncclBroadcast send buffer");
    need_device(recvbuff, bytes, "ncclBroadcast receive buffer");
    return nccl_enqueue(stream, "ncclBroadcast",
                        [=](cudaStream_t) { broadcast_run(sendbuff, recvbuff, count, datatype, root, comm); });
}

static ncclResult_t p2p(const char *who, const void *send, void *recv, size_t count, ncclDataType_t t, int peer,
                        ncclComm_t comm, cudaStream_t stream) {
    if (!comm) return nccl_error(ncclInvalidArgument, "NULL communicator");
    if (peer < 0 || peer >= comm->nranks) return nccl_error(ncclInvalidArgument, "peer outside the communicator");
    size_t bytes = count * nccl_type_bytes(t);
    need_device(send ? send : recv, bytes, who);
    if (t_group_depth == 0) emu_fail("%s outside ncclGroupStart/End: the emulator pairs sends and receives there", who);
    (send ? t_sends : t_recvs).push_back(PendingP2P{comm, stream, peer, send, recv, bytes});
    return ncclSuccess;
}

extern "C" ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer,
                                 ncclComm_t comm, cudaStream_t stream) {
    return p2p("ncclSend", sendbuff, NULL, count, datatype, peer, comm, stream);
}
extern "C" ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                                 cudaStream_t stream) {
    return p2p("ncclRecv", NULL, recvbuff, count, datatype, peer, comm, stream);
}

extern "C" ncclResult_t ncclGroupStart(void) {
    t_group_depth++;
    return ncclSuccess;
}

// The point-to-point operations of one communicator in a group: every rank
// posts its sends in its slot, then takes, for its i-th receive from peer p,
// p's i-th send to it.
static void p2p_exchange(ncclComm_t comm, const std::vector<PendingP2P> &sends, const std::vector<PendingP2P> &recvs) {
    enter_device();
    if (comm->nranks == 1) {
        if (sends.size() != recvs.size())
            emu_fail("ncclGroupEnd: %zu sends to self but %zu receives: NCCL would wait forever", sends.size(),
                     recvs.size());
        for (size_t i = 0; i < sends.size(); i++) {
            if (sends[i].bytes != recvs[i].bytes)
                emu_fail("ncclGroupEnd: send %zu has %zu bytes, its receive %zu", i, sends[i].bytes, recvs[i].bytes);
            memmove(recvs[i].recv, sends[i].send, sends[i].bytes);
        }
        exit_device();
        return;
    }
    // Only the ranks that exchange something take part (as with NCCL): no
    // barrier over the communicator. First post, per receiver, this group's
    // messages to it (once it has taken the previous group's); then take,
    // per sender, its batch to this rank.
    ShmHeader *h = comm->shm;
    int P = comm->nranks, me = comm->rank;
    size_t region = h->slot_bytes / (size_t)P;
    for (int q = 0; q < P; q++) {
        ShmMailbox *b = &h->box[me][q];
        int n = 0;
        size_t off = 0;
        for (auto &x : sends) n += x.peer == q;
        if (n == 0) continue;
        if (n > SHM_MAX_MSGS) emu_fail("ncclGroupEnd: more than %d sends to one peer in a group", SHM_MAX_MSGS);
        wait_until(&b->consumed, __atomic_load_n(&b->posted, __ATOMIC_ACQUIRE), comm, "ncclSend");
        char *dst = slot_of(comm, me) + (size_t)q * region;
        b->n = 0;
        for (auto &x : sends) {
            if (x.peer != q) continue;
            if (off + x.bytes > region)
                emu_fail("ncclGroupEnd: %zu bytes from rank %d to rank %d in one group exceed the emulator's %zu "
                         "(EMU_NCCL_SLOT_MB / ranks)", off + x.bytes, me, q, region);
            memcpy(dst + off, x.send, x.bytes);
            b->bytes[b->n++] = x.bytes;
            off += x.bytes;
        }
        __atomic_add_fetch(&b->posted, 1, __ATOMIC_RELEASE);
    }
    for (int p = 0; p < P; p++) {
        ShmMailbox *b = &h->box[p][me];
        int n = 0;
        for (auto &x : recvs) n += x.peer == p;
        if (n == 0) continue;
        wait_until(&b->posted, __atomic_load_n(&b->consumed, __ATOMIC_ACQUIRE) + 1, comm, "ncclRecv");
        if (b->n != n)
            emu_fail("ncclGroupEnd: rank %d posts %d receives from rank %d, which sent %d messages", me, n, p, b->n);
        const char *src = slot_of(comm, p) + (size_t)me * region;
        size_t off = 0;
        int i = 0;
        for (auto &x : recvs) {
            if (x.peer != p) continue;
            if (b->bytes[i] != x.bytes)
                emu_fail("ncclGroupEnd: rank %d receives %zu bytes from rank %d, which sent %zu", me, x.bytes, p,
                         b->bytes[i]);
            memcpy(x.recv, src + off, x.bytes);
            off += x.bytes;
            i++;
        }
        __atomic_add_fetch(&b->consumed, 1, __ATOMIC_RELEASE);
    }
    exit_device();
}

extern "C" ncclResult_t ncclGroupEnd(void) {
    if (t_group_depth == 0) return nccl_error(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--t_group_depth > 0) return ncclSuccess;
    std::vector<PendingP2P> sends, recvs;
    sends.swap(t_sends);
    recvs.swap(t_recvs);
    if (sends.empty() && recvs.empty()) return ncclSuccess;
    // The group is one piece of work on one stream; on several, it may not
    // involve a capture (the emulator does not join streams).
    cudaStream_t stream = (sends.empty() ? recvs : sends)[0].stream;
    for (auto *v : {&sends, &recvs})
        for (auto &x : *v) {
            bool record;
            if (x.stream != stream && (capture_check(x.stream, "ncclGroupEnd", &record) != cudaSuccess || record ||
                                       capture_check(stream, "ncclGroupEnd", &record) != cudaSuccess || record))
                emu_fail("ncclGroupEnd: a group on several streams, one of which captures: not emulated");
        }
    return nccl_enqueue(stream, "ncclGroupEnd", [sends, recvs](cudaStream_t) {
        std::vector<ncclComm_t> comms; // in order of first use
        for (auto *v : {&sends, &recvs})
            for (auto &x : *v)
                if (std::find(comms.begin(), comms.end(), x.comm) == comms.end()) comms.push_back(x.comm);
        for (ncclComm_t c : comms) {
            std::vector<PendingP2P> cs, cr;
            for (auto &x : sends)
                if (x.comm == c) cs.push_back(x);
            for (auto &x : recvs)
                if (x.comm == c) cr.push_back(x);
            p2p_exchange(c, cs, cr);
        }
        prof_count(PROF_NCCL_GROUP);
    });
}

