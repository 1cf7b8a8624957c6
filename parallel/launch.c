// Rank discovery and the rank-0-to-all rendezvous without MPI (see launch.h).
#include "launch.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// Environment

// Parses an environment variable as an int >= min. Returns 1 when set and
// valid, 0 when unset, -1 when malformed (with a message).
static int env_int(const char *name, int min, int *out, char *err, size_t errlen) {
    const char *v = getenv(name);
    if (!v || !v[0]) return 0;
    char *end = NULL;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (end == v || *end || errno || x < min || x > INT_MAX) {
        snprintf(err, errlen, "environment variable %s='%s' is not an integer >= %d", name, v, min);
        return -1;
    }
    *out = (int)x;
    return 1;
}

int launch_from_env(LaunchInfo *li, char *err, size_t errlen) {
    // Each source: rank, world, local rank variables, and whether it needs a SLURM job step.
    static const struct {
        const char *source, *rank, *world, *world2, *local;
        int slurm;
    } src[] = {
        { "RANK/WORLD_SIZE", "RANK", "WORLD_SIZE", NULL, "LOCAL_RANK", 0 },
        { "OMPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", NULL, "OMPI_COMM_WORLD_LOCAL_RANK", 0 },
        { "PMI", "PMI_RANK", "PMI_SIZE", NULL, "MPI_LOCALRANKID", 0 },
        { "SLURM", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_LOCALID", 1 },
    };
    li->rank = 0;
    li->world = 1;
    li->local_rank = -1;
    li->source = "none";
    for (size_t i = 0; i < sizeof src / sizeof src[0]; i++) {
        if (src[i].slurm && !getenv("SLURM_STEP_ID") && !getenv("SLURM_STEPID")) continue;
        int rank = 0, world = 1, local = -1;
        int hr = env_int(src[i].rank, 0, &rank, err, errlen);
        int hw = env_int(src[i].world, 1, &world, err, errlen);
        if (hw == 0 && src[i].world2) hw = env_int(src[i].world2, 1, &world, err, errlen);
        if (hr < 0 || hw < 0) return -1;
        if (hr == 0 && hw == 0) continue;
        if (hr == 0 || hw == 0) {
            snprintf(err, errlen, "%s is set but %s is not", hr ? src[i].rank : src[i].world,
                     hr ? src[i].world : src[i].rank);
            return -1;
        }
        if (env_int(src[i].local, 0, &local, err, errlen) < 0) return -1;
        if (rank >= world) {
            snprintf(err, errlen, "%s=%d is not below the world size %d", src[i].rank, rank, world);
            return -1;
        }
        li->rank = rank;
        li->world = world;
        li->local_rank = local;
        li->source = src[i].source;
        return 0;
    }
    return 0;
}

int launch_rendezvous_from_env(LaunchRendezvous *rv, char *err, size_t errlen) {
    memset(rv, 0, sizeof *rv);
    rv->timeout_s = 300;
    const char *dir = getenv("MOE_NCCL_INIT");
    if (dir && dir[0]) {
        if (strlen(dir) >= sizeof rv->dir - 64) {
            snprintf(err, errlen, "MOE_NCCL_INIT directory name is too long");
            return -1;
        }
        snprintf(rv->dir, sizeof rv->dir, "%s", dir);
    }
    const char *run = getenv("MOE_NCCL_RUN_ID"), *job = getenv("SLURM_JOB_ID"), *te = getenv("TORCHELASTIC_RUN_ID");
    const char *step = getenv("SLURM_STEP_ID") ? getenv("SLURM_STEP_ID") : getenv("SLURM_STEPID");
    if (run && run[0]) snprintf(rv->tag, sizeof rv->tag, "%s", run);
    else if (job && job[0]) snprintf(rv->tag, sizeof rv->tag, "%s.%s", job, step ? step : "x");
    else if (te && te[0]) snprintf(rv->tag, sizeof rv->tag, "%s", te);
    for (char *p = rv->tag; *p; p++) // a file name component
        if (*p == '/' || *p == ' ') *p = '_';

    const char *addr = getenv("MOE_NCCL_ADDR");
    int port = 0, has_port;
    if (addr && addr[0]) {
        has_port = env_int("MOE_NCCL_PORT", 1, &port, err, errlen);
        if (has_port < 0) return -1;
        if (has_port == 0) {
            snprintf(err, errlen, "MOE_NCCL_ADDR is set but MOE_NCCL_PORT is not");
            return -1;
        }
    } else {
        addr = getenv("MASTER_ADDR");
        has_port = env_int("MASTER_PORT", 1, &port, err, errlen);
        if (has_port < 0) return -1;
        if (addr && addr[0] && has_port == 0) {
            snprintf(err, errlen, "MASTER_ADDR is set but MASTER_PORT is not");
            return -1;
        }
        port += 1; // torchrun's store listens on MASTER_PORT itself
    }
    if (addr && addr[0]) {
        if (port > 65535) {
            snprintf(err, errlen, "rendezvous port %d is not a TCP port", port);
            return -1;
        }
        snprintf(rv->addr, sizeof rv->addr, "%s", addr);
        rv->port = port;
    }
    const char *t = getenv("MOE_NCCL_TIMEOUT");
    if (t && t[0]) {
        char *end = NULL;
        double x = strtod(t, &end);
        if (end == t || *end || !(x > 0)) {
            snprintf(err, errlen, "MOE_NCCL_TIMEOUT='%s' is not a positive number of seconds", t);
            return -1;
        }
        rv->timeout_s = x;
    }
    return 0;
}

int launch_share(const LaunchInfo *li, const LaunchRendezvous *rv, void *data, size_t bytes, char *err,
                 size_t errlen) {
    if (li->world == 1) return 0;
    if (rv->dir[0])
        return launch_share_file(rv->dir, rv->tag, li->rank, li->world, data, bytes, rv->timeout_s, err, errlen);
    if (rv->addr[0] && rv->port > 0)
        return launch_share_tcp(rv->addr, rv->port, li->rank, li->world, data, bytes, rv->timeout_s, err, errlen);
    snprintf(err, errlen, "%d ranks (from %s) but no rendezvous: give --nccl-init DIR (a directory every rank can "
             "read) or set MASTER_ADDR and MASTER_PORT, or start the job with mpirun", li->world, li->source);
    return -1;
}

// ----------------------------------------------------------------------------
// Helpers

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void sleep_s(double s) {
    struct timespec ts = { (time_t)s, (long)((s - (double)(time_t)s) * 1e9) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

// The header before the blob, in the file and in the TCP reply.
#define LAUNCH_MAGIC "MOENCCL1"
enum { LAUNCH_VERSION = 1, LAUNCH_HEADER = 24 };
enum { LAUNCH_OK = 0, LAUNCH_BAD_WORLD = 1, LAUNCH_BAD_RANK = 2 };

static void put_header(unsigned char *h, uint32_t status, uint32_t world, uint64_t bytes) {
    memcpy(h, LAUNCH_MAGIC, 8);
    uint32_t v = LAUNCH_VERSION | status << 16;
    memcpy(h + 8, &v, 4);
    memcpy(h + 12, &world, 4);
    memcpy(h + 16, &bytes, 8);
}

// Returns 0 when h is a header of this version; fills status, world, bytes.
static int get_header(const unsigned char *h, uint32_t *status, uint32_t *world, uint64_t *bytes) {
    uint32_t v;
    if (memcmp(h, LAUNCH_MAGIC, 8) != 0) return -1;
    memcpy(&v, h + 8, 4);
    if ((v & 0xffff) != LAUNCH_VERSION) return -1;
    *status = v >> 16;
    memcpy(world, h + 12, 4);
    memcpy(bytes, h + 16, 8);
    return 0;
}

// ----------------------------------------------------------------------------
// File rendezvous

static int write_file_atomic(const char *path, const void *a, size_t na, const void *b, size_t nb, char *err,
                             size_t errlen) {
    char tmp[4600];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create %s: %s", tmp, strerror(errno));
        return -1;
    }
    const void *parts[2] = { a, b };
    size_t sizes[2] = { na, nb };
    for (int i = 0; i < 2; i++) {
        const char *p = parts[i];
        size_t left = sizes[i];
        while (left > 0) {
            ssize_t w = write(fd, p, left);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) {
                snprintf(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
                close(fd);
                unlink(tmp);
                return -1;
            }
            p += w;
            left -= (size_t)w;
        }
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        snprintf(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
        unlink(tmp);
        return -1;
    }
    if (rename(tmp, path) != 0) {
        snprintf(err, errlen, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

// Reads the whole id file. Returns 1 when read (*why unchanged), 0 when not
// (yet) usable, with *why saying what was found; -1 on a hard error.
static int read_id_file(const char *path, int world, void *data, size_t bytes, char *why, size_t whylen) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        if (errno == ENOENT) return 0;
        snprintf(why, whylen, "cannot open %s: %s", path, strerror(errno));
        return 0;
    }
    unsigned char h[LAUNCH_HEADER];
    size_t got = 0;
    int rc = 0;
    while (got < sizeof h) {
        ssize_t r = read(fd, h + got, sizeof h - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    uint32_t status, w;
    uint64_t n;
    if (got < sizeof h || get_header(h, &status, &w, &n) != 0) {
        snprintf(why, whylen, "%s is not a rendezvous file of this program", path);
    } else if (w != (uint32_t)world || n != bytes) {
        snprintf(why, whylen, "%s is for %u ranks and %llu bytes, not %d ranks and %zu bytes (a stale file of "
                 "another run?)", path, w, (unsigned long long)n, world, bytes);
    } else {
        got = 0;
        while (got < bytes) {
            ssize_t r = read(fd, (char *)data + got, bytes - got);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += (size_t)r;
        }
        if (got == bytes) rc = 1;
        else snprintf(why, whylen, "%s is truncated", path);
    }
    close(fd);
    return rc;
}

int launch_share_file(const char *dir, const char *tag, int rank, int world, void *data, size_t bytes,
                      double timeout_s, char *err, size_t errlen) {
    if (world <= 1) return 0;
    char base[4400], ack[4500];
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "rank %d: the rendezvous directory %s does not exist (--nccl-init / MOE_NCCL_INIT must "
                 "name a directory every rank can read)", rank, dir);
        return -1;
    }
    snprintf(base, sizeof base, "%s/moe_nccl_id%s%s", dir, tag && tag[0] ? "." : "", tag ? tag : "");
    double deadline = now_s() + timeout_s, pause = 0.01;
    if (rank == 0) {
        if (unlink(base) == 0)
            fprintf(stderr, "warning: removed a stale rendezvous file %s (a fresh directory per run is safer)\n",
                    base);
        for (int r = 1; r < world; r++) {
            snprintf(ack, sizeof ack, "%s.ack.%d", base, r);
            unlink(ack);
        }
        unsigned char h[LAUNCH_HEADER];
        put_header(h, LAUNCH_OK, (uint32_t)world, (uint64_t)bytes);
        if (write_file_atomic(base, h, sizeof h, data, bytes, err, errlen) != 0) return -1;
        // Wait for every acknowledgement, then remove the files.
        char *acked = calloc((size_t)world, 1);
        if (!acked) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        int n = 1;
        while (n < world) {
            for (int r = 1; r < world; r++) {
                if (acked[r]) continue;
                snprintf(ack, sizeof ack, "%s.ack.%d", base, r);
                if (access(ack, F_OK) == 0) {
                    acked[r] = 1;
                    n++;
                }
            }
            if (n == world) break;
            if (now_s() > deadline) {
                int len = snprintf(err, errlen, "rank 0: after %.0f s, %d of %d ranks have not read %s:", timeout_s,
                                   world - n, world - 1, base);
                for (int r = 1, k = 0; r < world && len > 0 && (size_t)len < errlen; r++) {
                    if (acked[r]) continue;
                    if (k++ == 8) {
                        len += snprintf(err + len, errlen - len, " ...");
                        break;
                    }
                    len += snprintf(err + len, errlen - len, " %d", r);
                }
                if (len > 0 && (size_t)len < errlen)
                    snprintf(err + len, errlen - len, " (were they started, with the same --nccl-init directory "
                             "and world size?)");
                for (int r = 1; r < world; r++) {
                    snprintf(ack, sizeof ack, "%s.ack.%d", base, r);
                    unlink(ack);
                }
                unlink(base);
                free(acked);
                return -1;
            }
            sleep_s(pause);
            pause = pause < 0.2 ? pause * 2 : 0.2;
        }
        for (int r = 1; r < world; r++) {
            snprintf(ack, sizeof ack, "%s.ack.%d", base, r);
            unlink(ack);
        }
        unlink(base);
        free(acked);
        return 0;
    }
    char why[4700] = "";
    for (;;) {
        int rc = read_id_file(base, world, data, bytes, why, sizeof why);
        if (rc == 1) break;
        if (now_s() > deadline) {
            snprintf(err, errlen, "rank %d: no usable rendezvous file %s after %.0f s%s%s (is rank 0 running, with "
                     "the same --nccl-init directory?)", rank, base, timeout_s, why[0] ? ": " : "", why);
            return -1;
        }
        sleep_s(pause);
        pause = pause < 0.2 ? pause * 2 : 0.2;
    }
    char txt[32];
    int len = snprintf(txt, sizeof txt, "%d\n", rank);
    snprintf(ack, sizeof ack, "%s.ack.%d", base, rank);
    return write_file_atomic(ack, txt, (size_t)len, "", 0, err, errlen);
}

// ----------------------------------------------------------------------------
// TCP rendezvous

static int send_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int recv_all(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n > 0) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void set_timeouts(int fd, double s) {
    if (s < 0.05) s = 0.05;
    struct timeval tv = { (time_t)s, (suseconds_t)((s - (double)(time_t)s) * 1e6) };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

// The hello a client sends: magic, rank, world.
#define LAUNCH_HELLO "MOEHELO1"
enum { LAUNCH_HELLO_BYTES = 16 };

static int tcp_serve(int port, int world, const void *data, size_t bytes, double timeout_s, char *err,
                     size_t errlen) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0) {
        snprintf(err, errlen, "rank 0: socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    sa.sin_port = htons((uint16_t)port);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(ls, world < 128 ? world : 128) != 0) {
        snprintf(err, errlen, "rank 0: cannot listen on TCP port %d: %s (set MOE_NCCL_PORT to a free port)", port,
                 strerror(errno));
        close(ls);
        return -1;
    }
    char *served = calloc((size_t)world, 1);
    if (!served) {
        close(ls);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int n = 1, rc = 0;
    double deadline = now_s() + timeout_s;
    while (n < world) {
        double left = deadline - now_s();
        if (left <= 0) {
            snprintf(err, errlen, "rank 0: after %.0f s only %d of %d ranks connected to TCP port %d (were they "
                     "started, with the same MASTER_ADDR / MOE_NCCL_ADDR and port?)", timeout_s, n - 1, world - 1,
                     port);
            rc = -1;
            break;
        }
        struct pollfd pfd = { ls, POLLIN, 0 };
        int pr = poll(&pfd, 1, (int)(left * 1000) + 1);
        if (pr < 0 && errno != EINTR) {
            snprintf(err, errlen, "rank 0: poll: %s", strerror(errno));
            rc = -1;
            break;
        }
        if (pr <= 0) continue;
        int s = accept(ls, NULL, NULL);
        if (s < 0) continue;
        set_timeouts(s, 10.0);
        unsigned char hello[LAUNCH_HELLO_BYTES], h[LAUNCH_HEADER];
        int32_t r = -1, w = -1;
        if (recv_all(s, hello, sizeof hello) == 0 && memcmp(hello, LAUNCH_HELLO, 8) == 0) {
            memcpy(&r, hello + 8, 4);
            memcpy(&w, hello + 12, 4);
            uint32_t status = w != world ? LAUNCH_BAD_WORLD : (r < 1 || r >= world || served[r]) ? LAUNCH_BAD_RANK
                                                                                                  : LAUNCH_OK;
            put_header(h, status, (uint32_t)world, (uint64_t)bytes);
            if (send_all(s, h, sizeof h) == 0 && status == LAUNCH_OK && send_all(s, data, bytes) == 0) {
                // Wait for the client's one-byte acknowledgement: it has everything.
                char okb;
                if (recv_all(s, &okb, 1) == 0) {
                    served[r] = 1;
                    n++;
                }
            }
        }
        close(s); // anything else (a port scanner, a bad client) is ignored
    }
    free(served);
    close(ls);
    return rc;
}

static int tcp_fetch(const char *addr, int port, int rank, int world, void *data, size_t bytes, double timeout_s,
                     char *err, size_t errlen) {
    char ports[16], last[512] = "no attempt";
    snprintf(ports, sizeof ports, "%d", port);
    double deadline = now_s() + timeout_s;
    for (;;) {
        struct addrinfo hints, *res = NULL;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_INET;
        hints.ai_socktype = SOCK_STREAM;
        int gr = getaddrinfo(addr, ports, &hints, &res);
        if (gr != 0) {
            snprintf(last, sizeof last, "cannot resolve %s: %s", addr, gai_strerror(gr));
        } else {
            for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
                int s = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
                if (s < 0) continue;
                double left = deadline - now_s();
                set_timeouts(s, left < 5 ? left : 5); // Linux applies the send timeout to connect()
                if (connect(s, ai->ai_addr, ai->ai_addrlen) != 0) {
                    snprintf(last, sizeof last, "connect to %s:%d: %s", addr, port, strerror(errno));
                    close(s);
                    continue;
                }
                set_timeouts(s, left > 1 ? left : 1);
                unsigned char hello[LAUNCH_HELLO_BYTES], h[LAUNCH_HEADER];
                int32_t r = rank, w = world;
                memcpy(hello, LAUNCH_HELLO, 8);
                memcpy(hello + 8, &r, 4);
                memcpy(hello + 12, &w, 4);
                uint32_t status, hw;
                uint64_t n;
                if (send_all(s, hello, sizeof hello) != 0 || recv_all(s, h, sizeof h) != 0 ||
                    get_header(h, &status, &hw, &n) != 0) {
                    snprintf(last, sizeof last, "%s:%d did not answer as rank 0 of this program", addr, port);
                    close(s);
                    continue;
                }
                if (status != LAUNCH_OK || n != bytes) {
                    snprintf(err, errlen, "rank %d: rank 0 at %s:%d refused: %s", rank, addr, port,
                             status == LAUNCH_BAD_WORLD ? "it runs a different number of ranks"
                             : status == LAUNCH_BAD_RANK ? "this rank number is out of range or taken twice"
                                                         : "different blob size");
                    close(s);
                    freeaddrinfo(res);
                    return -1;
                }
                char okb = 1;
                int got = recv_all(s, data, bytes) == 0 && send_all(s, &okb, 1) == 0;
                close(s);
                if (got) {
                    freeaddrinfo(res);
                    return 0;
                }
                snprintf(last, sizeof last, "connection to %s:%d closed early", addr, port);
            }
            freeaddrinfo(res);
        }
        if (now_s() > deadline) {
            snprintf(err, errlen, "rank %d: no rendezvous with rank 0 at %s:%d after %.0f s: %s", rank, addr, port,
                     timeout_s, last);
            return -1;
        }
        sleep_s(0.1);
    }
}

int launch_share_tcp(const char *addr, int port, int rank, int world, void *data, size_t bytes, double timeout_s,
                     char *err, size_t errlen) {
    if (world <= 1) return 0;
    if (rank == 0) return tcp_serve(port, world, data, bytes, timeout_s, err, errlen);
    return tcp_fetch(addr, port, rank, world, data, bytes, timeout_s, err, errlen);
}
