// moe_ckpt: inspect checkpoint files.
//   moe_ckpt info FILE...   verify every checksum and list the sections
//                           (name, type, bytes, XXH64), then the model config
//   moe_ckpt diff A B       per f32 section present in both: the largest
//                           absolute difference, and relative to max |A|
// Exit status 0 when every file is intact, 1 otherwise.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt.h"

static const char *dtype_name(CkptDtype d) {
    static const char *names[] = { "bytes", "text", "f32", "i32", "i64", "u64" };
    return d < CKPT_NDTYPES ? names[d] : "?";
}

static int info(const char *path) {
    char err[1024];
    Ckpt *ck = ckpt_open(path, err, sizeof err);
    if (!ck || ckpt_verify(ck, err, sizeof err) != 0) {
        fprintf(stderr, "moe_ckpt: %s\n", err);
        if (ck) ckpt_close(ck);
        return 1;
    }
    printf("%s: intact, %d sections\n", path, ckpt_num_sections(ck));
    for (int i = 0; i < ckpt_num_sections(ck); i++) {
        const CkptSection *s = ckpt_section_at(ck, i);
        printf("  %-14s %-5s %14llu bytes  xxh64 %016llx\n", s->name, dtype_name(s->dtype),
               (unsigned long long)s->nbytes, (unsigned long long)s->hash);
    }
    uint64_t n;
    char *cfg = ckpt_read_alloc(ck, "model_config", CKPT_TEXT, &n, err, sizeof err);
    if (cfg) {
        printf("  model_config:\n");
        for (char *line = strtok(cfg, "\n"); line; line = strtok(NULL, "\n")) printf("    %s\n", line);
        free(cfg);
    }
    ckpt_close(ck);
    return 0;
}

static int diff(const char *pa, const char *pb) {
    char err[1024];
    Ckpt *a = ckpt_open(pa, err, sizeof err), *b = a ? ckpt_open(pb, err, sizeof err) : NULL;
    if (!a || !b) {
        fprintf(stderr, "moe_ckpt: %s\n", err);
        if (a) ckpt_close(a);
        return 1;
    }
    int rc = 0;
    for (int i = 0; i < ckpt_num_sections(a) && rc == 0; i++) {
        const CkptSection *sa = ckpt_section_at(a, i), *sb = ckpt_find(b, sa->name);
        if (sa->dtype != CKPT_F32 || !sb) continue;
        if (sb->dtype != CKPT_F32 || sb->nbytes != sa->nbytes) {
            printf("%-14s differs in size (%llu vs %llu bytes)\n", sa->name, (unsigned long long)sa->nbytes,
                   (unsigned long long)sb->nbytes);
            continue;
        }
        uint64_t n;
        float *x = ckpt_read_alloc(a, sa->name, CKPT_F32, &n, err, sizeof err);
        float *y = x ? ckpt_read_alloc(b, sa->name, CKPT_F32, &n, err, sizeof err) : NULL;
        if (!x || !y) {
            fprintf(stderr, "moe_ckpt: %s\n", err);
            rc = 1;
        } else {
            double dmax = 0, amax = 0;
            for (uint64_t j = 0; j < n / sizeof(float); j++) {
                double d = fabs((double)x[j] - y[j]);
                dmax = d > dmax ? d : dmax;
                amax = fabs(x[j]) > amax ? fabs(x[j]) : amax;
            }
            printf("%-14s max_abs_diff %.3e  max_rel_diff %.3e\n", sa->name, dmax, amax > 0 ? dmax / amax : dmax);
        }
        free(x);
        free(y);
    }
    ckpt_close(a);
    ckpt_close(b);
    return rc;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "diff") == 0) return diff(argv[2], argv[3]);
    if (argc < 3 || strcmp(argv[1], "info") != 0) {
        fprintf(stderr, "usage: moe_ckpt info FILE...   verify each checkpoint and list its sections\n"
                        "       moe_ckpt diff A B       largest differences of the f32 sections\n");
        return argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) ? 0 : 2;
    }
    int rc = 0;
    for (int i = 2; i < argc; i++) rc |= info(argv[i]);
    return rc;
}
