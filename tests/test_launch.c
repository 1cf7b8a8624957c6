// CPU tests of parallel/launch.c, the multi-GPU trainer's start without MPI: rank
// discovery from launcher environments, and the file and TCP rendezvous with
// several processes (fork), including late ranks, missing ranks (timeouts),
// stale files and cleanup. No GPU, no NCCL. One line per check; exit 1 on
// any failure.
//
//   build/test_launch
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../parallel/launch.h"

static int failures;

static void check(int ok, const char *what, const char *detail) {
    printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail && detail[0] ? ": " : "", detail ? detail : "");
    failures += !ok;
}

static void clear_env(void) {
    const char *vars[] = { "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                           "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "SLURM_PROCID",
                           "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID",
                           "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "MOE_NCCL_RUN_ID", "MOE_NCCL_INIT", "MOE_NCCL_ADDR",
                           "MOE_NCCL_PORT", "MASTER_ADDR", "MASTER_PORT", "MOE_NCCL_TIMEOUT" };
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) unsetenv(vars[i]);
}

static void sleep_ms(int ms) {
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

// ----------------------------------------------------------------------------
// Environment

static void test_env(void) {
    LaunchInfo li;
    char err[512] = "";
    clear_env();
    int rc = launch_from_env(&li, err, sizeof err);
    check(rc == 0 && li.rank == 0 && li.world == 1 && li.local_rank == -1, "no launcher: rank 0 of 1", li.source);

    setenv("RANK", "3", 1);
    setenv("WORLD_SIZE", "8", 1);
    setenv("LOCAL_RANK", "1", 1);
    setenv("SLURM_PROCID", "5", 1); // torchrun inside srun: RANK wins
    setenv("SLURM_NTASKS", "2", 1);
    setenv("SLURM_STEP_ID", "0", 1);
    rc = launch_from_env(&li, err, sizeof err);
    check(rc == 0 && li.rank == 3 && li.world == 8 && li.local_rank == 1 && strcmp(li.source, "RANK/WORLD_SIZE") == 0,
          "RANK/WORLD_SIZE/LOCAL_RANK (over SLURM)", li.source);

    clear_env();
    setenv("SLURM_PROCID", "2", 1);
    setenv("SLURM_NTASKS", "4", 1);
    setenv("SLURM_LOCALID", "2", 1);
    rc = launch_from_env(&li, err, sizeof err);
    check(rc == 0 && li.world == 1 && li.rank == 0, "SLURM variables outside a job step are ignored (batch script)",
          li.source);
    setenv("SLURM_STEP_ID", "7", 1);
    rc = launch_from_env(&li, err, sizeof err);
    check(rc == 0 && li.rank == 2 && li.world == 4 && li.local_rank == 2, "srun: SLURM_PROCID / SLURM_NTASKS",
          li.source);
    setenv("SLURM_STEP_NUM_TASKS", "3", 1);
    rc = launch_from_env(&li, err, sizeof err);
    check(rc == 0 && li.world == 3, "srun: SLURM_STEP_NUM_TASKS over SLURM_NTASKS", "");

    clear_env();
    setenv("OMPI_COMM_WORLD_RANK", "1", 1);
    setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
    rc = launch_from_env(&li, err, sizeof err);
    check(rc == 0 && li.rank == 1 && li.world == 2 && li.local_rank == 1, "Open MPI's mpirun variables", li.source);

    clear_env();
    setenv("RANK", "4", 1);
    setenv("WORLD_SIZE", "4", 1);
    rc = launch_from_env(&li, err, sizeof err);
    check(rc == -1 && strstr(err, "not below"), "RANK >= WORLD_SIZE rejected", err);
    setenv("RANK", "x1", 1);
    rc = launch_from_env(&li, err, sizeof err);
    check(rc == -1 && strstr(err, "RANK"), "malformed RANK rejected", err);
    unsetenv("RANK");
    rc = launch_from_env(&li, err, sizeof err);
    check(rc == -1 && strstr(err, "RANK"), "WORLD_SIZE without RANK rejected", err);

    LaunchRendezvous rv;
    clear_env();
    setenv("MOE_NCCL_INIT", "/shared/x", 1);
    setenv("SLURM_JOB_ID", "1234", 1);
    setenv("SLURM_STEP_ID", "2", 1);
    setenv("MASTER_ADDR", "node7", 1);
    setenv("MASTER_PORT", "29500", 1);
    rc = launch_rendezvous_from_env(&rv, err, sizeof err);
    char detail[5000];
    snprintf(detail, sizeof detail, "dir %s tag %s addr %s port %d timeout %g", rv.dir, rv.tag, rv.addr, rv.port,
             rv.timeout_s);
    check(rc == 0 && strcmp(rv.dir, "/shared/x") == 0 && strcmp(rv.tag, "1234.2") == 0 &&
              strcmp(rv.addr, "node7") == 0 && rv.port == 29501 && rv.timeout_s == 300,
          "rendezvous from the environment (tag from SLURM, MASTER_PORT + 1)", detail);
    setenv("MOE_NCCL_RUN_ID", "my run/1", 1);
    setenv("MOE_NCCL_ADDR", "10.0.0.1", 1);
    setenv("MOE_NCCL_PORT", "4000", 1);
    setenv("MOE_NCCL_TIMEOUT", "2.5", 1);
    rc = launch_rendezvous_from_env(&rv, err, sizeof err);
    snprintf(detail, sizeof detail, "tag %s addr %s port %d timeout %g", rv.tag, rv.addr, rv.port, rv.timeout_s);
    check(rc == 0 && strcmp(rv.tag, "my_run_1") == 0 && strcmp(rv.addr, "10.0.0.1") == 0 && rv.port == 4000 &&
              rv.timeout_s == 2.5,
          "MOE_NCCL_RUN_ID / MOE_NCCL_ADDR / MOE_NCCL_PORT / MOE_NCCL_TIMEOUT", detail);
    setenv("MOE_NCCL_TIMEOUT", "soon", 1);
    rc = launch_rendezvous_from_env(&rv, err, sizeof err);
    check(rc == -1, "a malformed MOE_NCCL_TIMEOUT is rejected", err);
    clear_env();

    LaunchInfo two = { 1, 2, -1, "test" };
    memset(&rv, 0, sizeof rv);
    rv.timeout_s = 1;
    unsigned char blob[8] = { 0 };
    rc = launch_share(&two, &rv, blob, sizeof blob, err, sizeof err);
    check(rc == -1 && strstr(err, "--nccl-init"), "two ranks and no rendezvous method: a clear error", err);
    LaunchInfo one = { 0, 1, -1, "test" };
    check(launch_share(&one, &rv, blob, sizeof blob, err, sizeof err) == 0, "one rank needs no rendezvous", "");
}

// ----------------------------------------------------------------------------
// Multi-process rendezvous

enum { M_FILE, M_TCP };

typedef struct {
    int method, world;
    int started[64];   // 1: this rank runs
    int delay_ms[64];  // before it starts
    size_t bytes;
    double timeout_s;
    const char *dir, *tag;
    int port;
} Job;

static unsigned char pattern(size_t i) { return (unsigned char)(i * 131 + 17); }

// Runs the job: one process per started rank. Returns the number of ranks
// whose result differs from want[rank] (1: success with the right data,
// 0: failure); the children's messages go to stderr.
static int run_job(const Job *j, const int *want) {
    pid_t pid[64];
    for (int r = 0; r < j->world; r++) {
        pid[r] = -1;
        if (!j->started[r]) continue;
        pid[r] = fork();
        if (pid[r] == 0) {
            sleep_ms(j->delay_ms[r]);
            unsigned char *data = calloc(j->bytes, 1);
            if (r == 0)
                for (size_t i = 0; i < j->bytes; i++) data[i] = pattern(i);
            char err[2048] = "";
            int rc = j->method == M_FILE ? launch_share_file(j->dir, j->tag, r, j->world, data, j->bytes,
                                                             j->timeout_s, err, sizeof err)
                                         : launch_share_tcp("127.0.0.1", j->port, r, j->world, data, j->bytes,
                                                            j->timeout_s, err, sizeof err);
            int same = 1;
            for (size_t i = 0; i < j->bytes; i++) same &= data[i] == pattern(i);
            if (rc != 0) fprintf(stderr, "    [rank %d] %s\n", r, err);
            _exit(rc == 0 && same ? 0 : 1);
        }
    }
    int wrong = 0;
    for (int r = 0; r < j->world; r++) {
        if (pid[r] <= 0) continue;
        int status = 0;
        waitpid(pid[r], &status, 0);
        int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        wrong += ok != want[r];
    }
    return wrong;
}

static int dir_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

// A TCP port that was free a moment ago.
static int free_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof sa;
    int port = 0;
    if (s >= 0 && bind(s, (struct sockaddr *)&sa, sizeof sa) == 0 && getsockname(s, (struct sockaddr *)&sa, &len) == 0)
        port = ntohs(sa.sin_port);
    if (s >= 0) close(s);
    return port;
}

static void test_file(const char *dir) {
    int want[64];
    char detail[256];
    Job j;
    memset(&j, 0, sizeof j);
    j.method = M_FILE;
    j.dir = dir;
    j.tag = "";
    j.timeout_s = 20;

    // 6 ranks, NCCL-id-sized blob, rank 0 last to start.
    j.world = 6;
    j.bytes = 128;
    for (int r = 0; r < j.world; r++) {
        j.started[r] = 1;
        j.delay_ms[r] = r == 0 ? 300 : 10 * r;
        want[r] = 1;
    }
    int wrong = run_job(&j, want);
    snprintf(detail, sizeof detail, "%d ranks wrong, %d files left", wrong, dir_entries(dir));
    check(wrong == 0 && dir_entries(dir) == 0, "file: 6 ranks, rank 0 starts last, all get the id, no files left",
          detail);

    // A large blob and a tag; rank 0 first.
    j.world = 3;
    j.bytes = 1 << 20;
    j.tag = "job42.0";
    for (int r = 0; r < j.world; r++) j.delay_ms[r] = 50 * r;
    wrong = run_job(&j, want);
    snprintf(detail, sizeof detail, "%d ranks wrong, %d files left", wrong, dir_entries(dir));
    check(wrong == 0 && dir_entries(dir) == 0, "file: 1 MiB blob, tagged name, rank 0 first", detail);

    // A stale file of another run (other world size) is skipped by the readers
    // and replaced by rank 0.
    char stale[4200];
    snprintf(stale, sizeof stale, "%s/moe_nccl_id", dir);
    FILE *f = fopen(stale, "wb");
    unsigned char hdr[24] = "MOENCCL1";
    unsigned int v = 1, w = 2;
    unsigned long long n = 128;
    memcpy(hdr + 8, &v, 4);
    memcpy(hdr + 12, &w, 4);
    memcpy(hdr + 16, &n, 8);
    unsigned char junk[128] = { 0 };
    if (f) {
        fwrite(hdr, 1, sizeof hdr, f);
        fwrite(junk, 1, sizeof junk, f);
        fclose(f);
    }
    j.world = 4;
    j.bytes = 128;
    j.tag = "";
    for (int r = 0; r < j.world; r++) j.delay_ms[r] = r == 0 ? 400 : 0;
    wrong = run_job(&j, want);
    snprintf(detail, sizeof detail, "%d ranks wrong, %d files left", wrong, dir_entries(dir));
    check(f && wrong == 0 && dir_entries(dir) == 0, "file: a stale file of a 2-rank run is ignored and replaced",
          detail);

    // A missing rank: rank 0 times out naming it, the started reader succeeds,
    // nothing is left behind.
    j.world = 3;
    j.timeout_s = 1.0;
    j.started[2] = 0;
    for (int r = 0; r < j.world; r++) j.delay_ms[r] = 0;
    want[0] = 0;
    want[1] = 1;
    fprintf(stderr, "  (the next check expects a timeout message from rank 0)\n");
    wrong = run_job(&j, want);
    snprintf(detail, sizeof detail, "%d ranks not as expected, %d files left", wrong, dir_entries(dir));
    check(wrong == 0 && dir_entries(dir) == 0, "file: rank 2 never starts: rank 0 fails after the timeout", detail);

    // No rank 0: the readers time out.
    j.started[0] = 0;
    j.started[2] = 1;
    want[1] = want[2] = 0;
    fprintf(stderr, "  (the next check expects timeout messages from ranks 1 and 2)\n");
    wrong = run_job(&j, want);
    check(wrong == 0, "file: no rank 0: the others fail after the timeout", "");

    // A directory that does not exist.
    char err[1024];
    unsigned char blob[16];
    int rc = launch_share_file("/nonexistent/moe-test-dir", "", 1, 2, blob, sizeof blob, 1.0, err, sizeof err);
    check(rc == -1 && strstr(err, "does not exist"), "file: a missing directory is reported", err);
}

static void test_tcp(void) {
    int want[64];
    char detail[128];
    Job j;
    memset(&j, 0, sizeof j);
    j.method = M_TCP;
    j.timeout_s = 20;
    j.world = 5;
    j.bytes = 128;
    j.port = free_port();
    for (int r = 0; r < j.world; r++) {
        j.started[r] = 1;
        j.delay_ms[r] = r == 0 ? 300 : 0; // the clients retry until rank 0 listens
        want[r] = 1;
    }
    int wrong = run_job(&j, want);
    snprintf(detail, sizeof detail, "port %d, %d ranks wrong", j.port, wrong);
    check(j.port > 0 && wrong == 0, "tcp: 5 ranks, clients before the server, all get the id", detail);

    j.world = 3;
    j.bytes = 1 << 20;
    j.port = free_port();
    for (int r = 0; r < j.world; r++) j.delay_ms[r] = 30 * r;
    wrong = run_job(&j, want);
    check(wrong == 0, "tcp: 1 MiB blob", "");

    j.world = 3;
    j.bytes = 128;
    j.timeout_s = 1.0;
    j.port = free_port();
    j.started[2] = 0;
    want[0] = 0;
    want[1] = 1;
    fprintf(stderr, "  (the next check expects a timeout message from rank 0)\n");
    wrong = run_job(&j, want);
    check(wrong == 0, "tcp: rank 2 never connects: rank 0 fails after the timeout", "");

    j.started[0] = 0;
    j.started[2] = 1;
    want[1] = want[2] = 0;
    j.port = free_port();
    fprintf(stderr, "  (the next check expects timeout messages from ranks 1 and 2)\n");
    wrong = run_job(&j, want);
    check(wrong == 0, "tcp: no rank 0: the clients fail after the timeout", "");
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0); // children fork with no buffered output
    test_env();
    char dir[] = "/tmp/moe_launch_test_XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_file(dir);
    rmdir(dir);
    test_tcp();
    printf("test_launch: %s (%d failures)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
