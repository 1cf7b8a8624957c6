// moe_ckpt export: a checkpoint as a transformers model directory (hf.h, docs/hf.md).
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L  // open_memstream, mkdir, opendir
#endif

#include "hf.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../tokenizer/bpe.h"
#include "../util/util.h"
#include "ckpt_model.h"
#include "safetensors.h"

// dir/name into out; -1 when it does not fit.
static int hf_join(char *out, size_t n, const char *dir, const char *name) {
    return snprintf(out, n, "%s/%s", dir, name) < (int)n ? 0 : -1;
}

// Writes the JSON document text to dir/name atomically.
static int hf_write_text(const char *dir, const char *name, const char *text, size_t len, char *err, size_t errlen) {
    char path[4096];
    if (hf_join(path, sizeof path, dir, name) != 0) {
        util_set_err(err, errlen, "%s: path too long", dir);
        return -1;
    }
    return tok_json_write_file(path, text, len, err, errlen);
}

// Scratch for one tensor's bytes: its rows in file order, and their bf16 form.
typedef struct {
    float *f32;    // (numel of the largest tensor)
    uint16_t *b16; // (same)
} HfBuf;

// The bytes of tensor t as the file stores them: fp32, or bf16 unless
// keep_fp32, q/k rows in Ernie's pair order. Returns a pointer into buf.
static const void *hf_tensor_bytes(const HfTensor *t, int bf16, int hd, HfBuf *buf, size_t *nbytes) {
    int64_t rows = t->shape[0], cols = t->ndim == 2 ? t->shape[1] : 1;
    *nbytes = 0;
    if (!t->data) return buf->f32;
    for (int64_t r = 0; r < rows; r++) {
        int64_t src = t->rope_pairs ? hf_rope_row(r, hd) : r;
        memcpy(buf->f32 + r * cols, t->data + src * cols, sizeof(float) * (size_t)cols);
    }
    if (!bf16 || t->keep_fp32) {
        *nbytes = sizeof(float) * (size_t)(rows * cols);
        return buf->f32;
    }
    for (int64_t i = 0; i < rows * cols; i++) buf->b16[i] = st_f32_to_bf16(buf->f32[i]);
    *nbytes = sizeof(uint16_t) * (size_t)(rows * cols);
    return buf->b16;
}

static StSpec hf_spec(const HfTensor *t, int bf16) {
    StSpec s = { t->name, bf16 && !t->keep_fp32 ? ST_BF16 : ST_F32, t->ndim, { t->shape[0], t->shape[1] } };
    return s;
}

// Writes tensors [first, last) as one safetensors file.
static int hf_write_shard(const char *path, const HfTensor *t, int first, int last, int bf16, int hd, HfBuf *buf,
                          char *err, size_t errlen) {
    StSpec *specs = xcalloc((size_t)(last - first) + 1, sizeof *specs);
    for (int i = first; i < last; i++) specs[i - first] = hf_spec(&t[i], bf16);
    const char *meta[] = { "format", "pt" }; // as transformers' save_pretrained writes it; some readers check it
    StWriter *w = st_writer_open(path, specs, last - first, meta, 1, err, errlen);
    free(specs);
    if (!w) return -1;
    for (int i = first; i < last; i++) {
        size_t n;
        const void *bytes = hf_tensor_bytes(&t[i], bf16, hd, buf, &n);
        if (st_writer_append(w, bytes, n) != 0) break;
    }
    return st_writer_commit(w, err, errlen);
}

// Shard file names as transformers writes them.
static void hf_shard_name(char *out, size_t n, int k, int n_shards) {
    if (n_shards == 1) snprintf(out, n, "model.safetensors");
    else snprintf(out, n, "model-%05d-of-%05d.safetensors", k + 1, n_shards);
}

// Removes weight files of an earlier export (model.safetensors, its index,
// model-*-of-*.safetensors) that this one did not write.
static void hf_remove_stale(const char *dir, int n_shards) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        int a, b;
        char tail[32] = "", mine[64], path[4096];
        int is_shard = sscanf(e->d_name, "model-%5d-of-%5d%31s", &a, &b, tail) == 3 &&
                       strcmp(tail, ".safetensors") == 0;
        int is_weights = is_shard || strcmp(e->d_name, "model.safetensors") == 0 ||
                         strcmp(e->d_name, "model.safetensors.index.json") == 0;
        if (!is_weights) continue;
        int keep = n_shards > 1 && strcmp(e->d_name, "model.safetensors.index.json") == 0;
        for (int k = 0; k < n_shards && !keep; k++) {
            hf_shard_name(mine, sizeof mine, k, n_shards);
            keep = strcmp(e->d_name, mine) == 0;
        }
        if (!keep && hf_join(path, sizeof path, dir, e->d_name) == 0 && unlink(path) == 0)
            fprintf(stderr, "moe_ckpt: removed %s (left by an earlier export with another sharding)\n", path);
    }
    closedir(d);
}

// model.safetensors.index.json: total tensor bytes and the shard of each tensor.
static int hf_write_index(const char *dir, const HfTensor *t, int n, const int *shard_of, int n_shards,
                          uint64_t total, char *err, size_t errlen) {
    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    if (!m) FATAL("out of memory");
    fprintf(m, "{\n  \"metadata\": {\"total_size\": %llu},\n  \"weight_map\": {", (unsigned long long)total);
    for (int i = 0; i < n; i++) {
        char name[64];
        hf_shard_name(name, sizeof name, shard_of[i], n_shards);
        fprintf(m, "%s\n    ", i ? "," : "");
        tok_json_put_string(m, t[i].name, strlen(t[i].name));
        fprintf(m, ": \"%s\"", name);
    }
    fprintf(m, "\n  }\n}\n");
    fclose(m);
    int rc = hf_write_text(dir, "model.safetensors.index.json", text, len, err, errlen);
    free(text);
    return rc;
}

static int hf_write_configs(const char *dir, const MoeConfig *c, HfArch arch, int bf16, int eos, char *err,
                            size_t errlen) {
    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    if (!m) FATAL("out of memory");
    hf_config_write(m, c, arch, bf16, eos);
    fclose(m);
    int rc = hf_write_text(dir, "config.json", text, len, err, errlen);
    free(text);
    if (rc != 0) return rc;
    // Generation stops at the end-of-text token; everything else is transformers' default.
    char gen[256];
    char eos_s[16] = "null";
    if (eos >= 0) snprintf(eos_s, sizeof eos_s, "%d", eos);
    int n = snprintf(gen, sizeof gen, "{\n  \"bos_token_id\": null,\n  \"eos_token_id\": %s,\n  \"pad_token_id\": null\n}\n",
                     eos_s);
    return hf_write_text(dir, "generation_config.json", gen, (size_t)n, err, errlen);
}

// Assigns the tensors, in model order, to shards: a new shard when the next
// tensor would overflow a non-empty one (a tensor larger than the limit gets
// its own). Returns the number of shards; *total gets the bytes of all
// tensors, *largest the most elements of one.
static int hf_plan_shards(const HfTensor *t, int n, const HfExportOptions *o, int *shard_of, uint64_t *total,
                          int64_t *largest) {
    int n_shards = 1;
    uint64_t in_shard = 0;
    *total = 0;
    *largest = 1;
    for (int i = 0; i < n; i++) {
        StSpec s = hf_spec(&t[i], o->bf16);
        uint64_t b = st_spec_bytes(&s);
        if (in_shard > 0 && in_shard + b > o->max_shard_bytes) {
            n_shards++;
            in_shard = 0;
        }
        shard_of[i] = n_shards - 1;
        in_shard += b;
        *total += b;
        int64_t numel = t[i].shape[0] * (t[i].ndim == 2 ? t[i].shape[1] : 1);
        *largest = numel > *largest ? numel : *largest;
    }
    return n_shards;
}

int hf_export(const char *ckpt, const char *outdir, const HfExportOptions *o, HfExportInfo *info, char *err,
              size_t errlen) {
    CkptModel m;
    if (ckpt_model_load(ckpt, &m, err, errlen) != 0) return -1;
    const MoeConfig *c = &m.cfg;
    HfArch arch;
    Tokenizer *tok = NULL;
    HfTensor *t = NULL;
    int *shard_of = NULL, rc = -1;
    HfBuf buf = { NULL, NULL };
    char why[512];
    if (hf_arch_for(c, m.bias_mult, m.bias_logits, &arch, why, sizeof why) != 0) {
        util_set_err(err, errlen, "%s cannot be exported: %s", ckpt, why);
        goto done;
    }
    if (o->tokenizer) {
        tok = tok_load(o->tokenizer, err, errlen);
        if (!tok) goto done;
        if (tok_vocab_size(tok) > c->vocab_size) {
            util_set_err(err, errlen, "%s has %d tokens but the model's vocab_size is %d", o->tokenizer,
                         tok_vocab_size(tok), c->vocab_size);
            goto done;
        }
    }
    if (mkdir(outdir, 0777) != 0 && errno != EEXIST) {
        util_set_err(err, errlen, "%s: cannot create: %s", outdir, strerror(errno));
        goto done;
    }
    struct stat st;
    if (stat(outdir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        util_set_err(err, errlen, "%s: not a directory", outdir);
        goto done;
    }

    // The tokenizer first: a special token that JSON cannot hold is refused before any weights are written.
    if (tok && tok_export_hf(tok, outdir, c->seq_len, err, errlen) != 0) goto done;

    int n;
    t = hf_tensors(c, arch, &m.lay, m.params, m.bias, &n);
    shard_of = xcalloc((size_t)n + 1, sizeof *shard_of);
    uint64_t total;
    int64_t largest;
    int n_shards = hf_plan_shards(t, n, o, shard_of, &total, &largest);
    buf.f32 = xmalloc(sizeof(float) * (size_t)largest);
    buf.b16 = xmalloc(sizeof(uint16_t) * (size_t)largest);
    for (int k = 0, first = 0; k < n_shards; k++) {
        int last = first;
        while (last < n && shard_of[last] == k) last++;
        char name[64], path[4096];
        hf_shard_name(name, sizeof name, k, n_shards);
        if (hf_join(path, sizeof path, outdir, name) != 0) {
            util_set_err(err, errlen, "%s: path too long", outdir);
            goto done;
        }
        if (hf_write_shard(path, t, first, last, o->bf16, config_head_dim(c), &buf, err, errlen) != 0) goto done;
        first = last;
    }
    if (n_shards > 1 && hf_write_index(outdir, t, n, shard_of, n_shards, total, err, errlen) != 0) goto done;
    if (hf_write_configs(outdir, c, arch, o->bf16, tok ? tok_eot_id(tok) : -1, err, errlen) != 0) goto done;
    hf_remove_stale(outdir, n_shards);
    if (info) *info = (HfExportInfo){ arch, n, n_shards, total };
    rc = 0;
done:
    free(t);
    free(shard_of);
    free(buf.f32);
    free(buf.b16);
    if (tok) tok_free(tok);
    ckpt_model_free(&m);
    return rc;
}
