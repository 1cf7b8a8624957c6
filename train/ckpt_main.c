// moe_ckpt: inspect checkpoint files, and move models to and from Hugging Face.
//   moe_ckpt info FILE...   verify every checksum and list the sections
//                           (name, type, bytes, XXH64), then the model config
//   moe_ckpt diff A B       per f32 section present in both: the largest
//                           absolute difference, and relative to max |A|;
//                           every other difference by section (missing, dtype,
//                           size, contents)
//   moe_ckpt export CKPT OUTDIR [--dtype fp32|bf16] [--tokenizer TOK] [--max-shard-size SIZE]
//                           a transformers model directory (docs/hf.md)
//   moe_ckpt import DIR OUT_CKPT
//                           such a directory back as a checkpoint
// Exit status: info 0 when every file is intact (and its model_config, when
// present, a valid model), 1 otherwise; diff 0 for the same values, 1 when
// they differ, 2 when a file is unreadable or damaged (diff(1)'s convention);
// export and import 0 on success, 1 for a damaged file or a refused model;
// 2 for a bad command line.
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/config.h"
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
    int rc = 0;
    char *cfg = ckpt_read_alloc(ck, ckpt_sections[SEC_MODEL_CONFIG].name, CKPT_TEXT, &n, err, sizeof err);
    if (cfg) {
        // The trainers' own check: a complete config that can build a model.
        MoeConfig c;
        char where[1100];
        snprintf(where, sizeof where, "%s: section 'model_config'", path);
        if (config_parse_text(&c, cfg, (size_t)n, where, err, sizeof err) != 0) {
            fprintf(stderr, "moe_ckpt: %s\n", err);
            rc = 1;
        }
        printf("  model_config:\n");
        for (char *line = strtok(cfg, "\n"); line; line = strtok(NULL, "\n")) printf("    %s\n", line);
        free(cfg);
    }
    ckpt_close(ck);
    return rc;
}

// Elements x of A and y of B hold the same value: the same bits (so NaN
// payloads and -0.0 compare as written), equal numbers, or both NaN.
static int same_f32(float x, float y) {
    return memcmp(&x, &y, sizeof x) == 0 || x == y || (isnan(x) && isnan(y));
}

// Compares one f32 section present in both files with the same size: prints
// the largest absolute difference over the elements that are finite in both,
// relative to max |A|, and how many elements are NaN or infinite in only one
// of them (for those the largest difference is reported as nan). Returns 1
// when any element differs, 0 when none does, 2 on a read error.
static int diff_f32(Ckpt *a, Ckpt *b, const char *name) {
    char err[1024];
    uint64_t n;
    float *x = ckpt_read_alloc(a, name, CKPT_F32, &n, err, sizeof err);
    float *y = x ? ckpt_read_alloc(b, name, CKPT_F32, &n, err, sizeof err) : NULL;
    int rc = 0;
    if (!x || !y) {
        fprintf(stderr, "moe_ckpt: %s\n", err);
        rc = 2;
    } else {
        double dmax = 0, amax = 0;
        uint64_t differ = 0, nonfinite = 0;
        for (uint64_t j = 0; j < n / sizeof(float); j++) {
            if (isfinite(x[j])) amax = fabs(x[j]) > amax ? fabs(x[j]) : amax;
            if (same_f32(x[j], y[j])) continue;
            differ++;
            if (!isfinite(x[j]) || !isfinite(y[j])) nonfinite++;
            else dmax = fmax(dmax, fabs((double)x[j] - y[j]));
        }
        if (nonfinite) dmax = NAN;
        printf("%-14s max_abs_diff %.3e  max_rel_diff %.3e", name, dmax, amax > 0 ? dmax / amax : dmax);
        if (nonfinite) printf("  (%llu elements NaN or infinite in one file only)", (unsigned long long)nonfinite);
        printf("\n");
        rc = differ > 0;
    }
    free(x);
    free(y);
    return rc;
}

// Prints why sa (of A) and sb (of B, NULL when absent) differ, for every
// section that is not two f32 payloads of the same size. Returns 1 when they
// differ, 0 when not, 2 on a read error.
static int diff_other(Ckpt *a, Ckpt *b, const CkptSection *sa, const CkptSection *sb, const char *name) {
    if (!sa || !sb) {
        printf("%-14s only in %s\n", name, sa ? "A" : "B");
        return 1;
    }
    if (sa->dtype != sb->dtype) {
        printf("%-14s dtype differs (%s vs %s)\n", name, dtype_name(sa->dtype), dtype_name(sb->dtype));
        return 1;
    }
    if (sa->nbytes != sb->nbytes) {
        printf("%-14s size differs (%llu vs %llu bytes)\n", name, (unsigned long long)sa->nbytes,
               (unsigned long long)sb->nbytes);
        return 1;
    }
    if (sa->hash == sb->hash) return 0; // both payloads verified: equal checksums, equal bytes
    // A few integers (step, loader, rng) are worth showing.
    if ((sa->dtype == CKPT_I64 || sa->dtype == CKPT_U64) && sa->nbytes <= 32) {
        char err[1024];
        uint64_t n;
        uint64_t *x = ckpt_read_alloc(a, name, sa->dtype, &n, err, sizeof err);
        uint64_t *y = x ? ckpt_read_alloc(b, name, sb->dtype, &n, err, sizeof err) : NULL;
        if (!x || !y) {
            fprintf(stderr, "moe_ckpt: %s\n", err);
            free(x);
            return 2;
        }
        printf("%-14s differs:", name);
        for (uint64_t j = 0; j < n / 8; j++)
            if (sa->dtype == CKPT_I64) printf(" %lld vs %lld", (long long)x[j], (long long)y[j]);
            else printf(" %llu vs %llu", (unsigned long long)x[j], (unsigned long long)y[j]);
        printf("\n");
        free(x);
        free(y);
        return 1;
    }
    printf("%-14s differs (%s, %llu bytes)\n", name, dtype_name(sa->dtype), (unsigned long long)sa->nbytes);
    return 1;
}

// diff(1)'s convention: 0 when every section holds the same values, 1 when
// anything differs (a value, a NaN, a section in one file only, a dtype or a
// size), 2 when a file cannot be read or is damaged.
static int diff(const char *pa, const char *pb) {
    char err[1024];
    Ckpt *a = ckpt_open(pa, err, sizeof err), *b = a ? ckpt_open(pb, err, sizeof err) : NULL;
    if (!a || !b || ckpt_verify(a, err, sizeof err) != 0 || ckpt_verify(b, err, sizeof err) != 0) {
        fprintf(stderr, "moe_ckpt: %s\n", err);
        ckpt_close(a);
        ckpt_close(b);
        return 2;
    }
    int rc = 0;
    // A's sections in its order, then those only in B.
    for (int pass = 0; pass < 2 && rc < 2; pass++) {
        Ckpt *first = pass == 0 ? a : b, *other = pass == 0 ? b : a;
        for (int i = 0; i < ckpt_num_sections(first) && rc < 2; i++) {
            const CkptSection *s = ckpt_section_at(first, i), *t = ckpt_find(other, s->name);
            if (pass == 1 && t) continue;
            const CkptSection *sa = pass == 0 ? s : NULL, *sb = pass == 0 ? t : s;
            int d = sa && sb && sa->dtype == CKPT_F32 && sb->dtype == CKPT_F32 && sa->nbytes == sb->nbytes
                        ? diff_f32(a, b, s->name)
                        : diff_other(a, b, sa, sb, s->name);
            rc = d > rc ? d : rc;
        }
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
