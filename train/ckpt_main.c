// moe_ckpt: inspect checkpoint files, and move models to and from Hugging Face.
//   moe_ckpt info FILE...   verify every checksum and list the sections
//                           (name, type, bytes, XXH64), then the model config
//   moe_ckpt diff A B       per f32 section present in both: the largest
//                           absolute difference, and relative to max |A|
//   moe_ckpt export CKPT OUTDIR [--dtype fp32|bf16] [--tokenizer TOK] [--max-shard-size SIZE]
//                           a transformers model directory (docs/hf.md)
//   moe_ckpt import DIR OUT_CKPT
//                           such a directory back as a checkpoint
// Exit status 0 on success, 1 for a damaged file or a refused model, 2 for a
// bad command line.
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt.h"
#include "ckpt_sections.h"
#include "hf.h"

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
    char *cfg = ckpt_read_alloc(ck, ckpt_sections[SEC_MODEL_CONFIG].name, CKPT_TEXT, &n, err, sizeof err);
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

// SIZE: bytes, or with a suffix KB, MB, GB (powers of 1000, as transformers'
// max_shard_size) or KiB, MiB, GiB (powers of 1024). 0 for anything else.
static uint64_t parse_size(const char *s) {
    static const struct { const char *suffix; uint64_t mult; } units[] = {
        { "", 1 }, { "KB", 1000 }, { "MB", 1000000 }, { "GB", 1000000000 },
        { "KiB", 1024 }, { "MiB", 1 << 20 }, { "GiB", 1 << 30 },
    };
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || errno || s[0] == '-') return 0;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (strcmp(end, units[i].suffix) == 0) return v > UINT64_MAX / units[i].mult ? 0 : v * units[i].mult;
    return 0;
}

static int export_cmd(int argc, char **argv) {
    HfExportOptions o = { .bf16 = 0, .max_shard_bytes = 5000000000ULL, .tokenizer = NULL };
    for (int i = 4; i < argc; i++) {
        const char *opt = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!val) {
            fprintf(stderr, "moe_ckpt export: option %s needs a value\n", opt);
            return 2;
        }
        i++;
        if (strcmp(opt, "--dtype") == 0 && (strcmp(val, "fp32") == 0 || strcmp(val, "bf16") == 0)) {
            o.bf16 = val[0] == 'b';
        } else if (strcmp(opt, "--tokenizer") == 0) {
            o.tokenizer = val;
        } else if (strcmp(opt, "--max-shard-size") == 0 && parse_size(val) > 0) {
            o.max_shard_bytes = parse_size(val);
        } else {
            fprintf(stderr, "moe_ckpt export: %s %s: %s\n", opt, val,
                    strcmp(opt, "--dtype") == 0 ? "the dtype is fp32 or bf16"
                    : strcmp(opt, "--max-shard-size") == 0 ? "expected a size > 0 in bytes, e.g. 5GB or 500MiB"
                                                          : "unknown option");
            return 2;
        }
    }
    char err[1024];
    HfExportInfo info;
    if (hf_export(argv[2], argv[3], &o, &info, err, sizeof err) != 0) {
        fprintf(stderr, "moe_ckpt export: %s\n", err);
        return 1;
    }
    printf("%s: %s, %d tensors (%s), %.1f MB in %d safetensors file%s%s\n", argv[3], hf_arch_name(info.arch),
           info.n_tensors, o.bf16 ? "bf16; router weights and biases fp32" : "fp32", info.bytes / 1e6,
           info.n_shards, info.n_shards > 1 ? "s" : "", o.tokenizer ? ", tokenizer.json" : "");
    return 0;
}

static int import_cmd(const char *dir, const char *out) {
    char err[1024];
    HfArch arch;
    if (hf_import(dir, out, &arch, err, sizeof err) != 0) {
        fprintf(stderr, "moe_ckpt import: %s\n", err);
        return 1;
    }
    printf("%s: %s from %s\n", out, hf_arch_name(arch), dir);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "diff") == 0) return diff(argv[2], argv[3]);
    if (argc >= 4 && strcmp(argv[1], "export") == 0 && argv[2][0] != '-' && argv[3][0] != '-')
        return export_cmd(argc, argv);
    if (argc == 4 && strcmp(argv[1], "import") == 0) return import_cmd(argv[2], argv[3]);
    if (argc < 3 || strcmp(argv[1], "info") != 0) {
        fprintf(stderr,
                "usage: moe_ckpt info FILE...   verify each checkpoint and list its sections\n"
                "       moe_ckpt diff A B       largest differences of the f32 sections\n"
                "       moe_ckpt export CKPT OUTDIR [--dtype fp32|bf16] [--tokenizer TOK] [--max-shard-size SIZE]\n"
                "                               a Hugging Face transformers model directory (docs/hf.md)\n"
                "       moe_ckpt import DIR OUT_CKPT\n"
                "                               such a directory back as a checkpoint\n");
        return argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) ? 0 : 2;
    }
    int rc = 0;
    for (int i = 2; i < argc; i++) rc |= info(argv[i]);
    return rc;
}
