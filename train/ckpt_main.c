// moe_ckpt: inspect checkpoint files.
//   moe_ckpt info FILE...   verify every checksum and list the sections
//                           (name, type, bytes, XXH64), then the model config
// Exit status 0 when every file is intact, 1 otherwise.
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

int main(int argc, char **argv) {
    if (argc < 3 || strcmp(argv[1], "info") != 0) {
        fprintf(stderr, "usage: moe_ckpt info FILE...\n"
                        "  verifies every checksum of each checkpoint and lists its sections\n");
        return argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) ? 0 : 2;
    }
    int rc = 0;
    for (int i = 2; i < argc; i++) rc |= info(argv[i]);
    return rc;
}
