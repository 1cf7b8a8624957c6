// moe_ckpt import: a transformers model directory (Glm4Moe or Ernie4_5_Moe
// holding this model) back as a checkpoint (hf.h, docs/hf.md).
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include "hf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../util/util.h"
#include "ckpt_model.h"
#include "safetensors.h"

// Every tensor of every weight file, sorted by name for lookup.
typedef struct {
    const char *name;
    StFile *file;
    const StTensor *t;
    int used;
} HfEntry;

typedef struct {
    StFile **files;
    int n_files;
    HfEntry *e;
    int n;
} HfWeights;

static int hf_cmp_entry(const void *a, const void *b) {
    return strcmp(((const HfEntry *)a)->name, ((const HfEntry *)b)->name);
}

static HfEntry *hf_find(HfWeights *w, const char *name) {
    HfEntry key = { .name = name };
    return bsearch(&key, w->e, (size_t)w->n, sizeof key, hf_cmp_entry);
}

static void hf_weights_free(HfWeights *w) {
    for (int i = 0; i < w->n_files; i++) st_close(w->files[i]);
    free(w->files);
    free(w->e);
    memset(w, 0, sizeof *w);
}

// Opens dir/name (a plain file name, never a path out of dir) as file n_files.
static int hf_open_file(HfWeights *w, const char *dir, const char *name, char *err, size_t errlen) {
    if (!name[0] || strchr(name, '/') || name[0] == '.') {
        util_set_err(err, errlen, "%s: weight file name '%s' is not a plain file name", dir, name);
        return -1;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    for (int i = 0; i < w->n_files; i++)
        if (strcmp(st_path(w->files[i]), path) == 0) return 0;
    StFile *f = st_open(path, err, errlen);
    if (!f) return -1;
    w->files = xrealloc(w->files, sizeof *w->files * (size_t)(w->n_files + 1));
    w->files[w->n_files++] = f;
    return 0;
}

// The index's weight_map: every file it names, and each name in its file.
static int hf_open_index(HfWeights *w, const char *dir, const char *index, TokJson **map_out, char *err,
                         size_t errlen) {
    TokJson *j = tok_json_parse_file(index, err, errlen);
    if (!j) return -1;
    const TokJson *map = tok_json_get(j, "weight_map");
    int rc = 0;
    if (!map || map->type != TOK_JSON_OBJECT) {
        util_set_err(err, errlen, "%s: weight_map is missing or not an object", index);
        rc = -1;
    }
    for (size_t i = 0; rc == 0 && i < map->len; i++) {
        if (map->items[i].type != TOK_JSON_STRING) {
            util_set_err(err, errlen, "%s: weight_map[\"%s\"] is not a file name", index, map->keys[i]);
            rc = -1;
        } else {
            rc = hf_open_file(w, dir, map->items[i].str, err, errlen);
        }
    }
    if (rc != 0) tok_json_free(j);
    else *map_out = j;
    return rc;
}

// Opens the weights as transformers would: model.safetensors, else the
// shards model.safetensors.index.json names, which must agree with it.
static int hf_open_weights(HfWeights *w, const char *dir, char *err, size_t errlen) {
    char single[4096], index[4096];
    snprintf(single, sizeof single, "%s/model.safetensors", dir);
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
    TokJson *j = NULL;
    int rc;
    if (access(single, F_OK) == 0 || access(index, F_OK) != 0) rc = hf_open_file(w, dir, "model.safetensors", err, errlen);
    else rc = hf_open_index(w, dir, index, &j, err, errlen);
    if (rc != 0) return -1;
    int total = 0;
    for (int i = 0; i < w->n_files; i++) total += st_count(w->files[i]);
    w->e = xcalloc((size_t)total + 1, sizeof *w->e);
    for (int i = 0; i < w->n_files; i++)
        for (int k = 0; k < st_count(w->files[i]); k++) {
            const StTensor *t = st_tensor(w->files[i], k);
            w->e[w->n++] = (HfEntry){ t->name, w->files[i], t, 0 };
        }
    qsort(w->e, (size_t)w->n, sizeof *w->e, hf_cmp_entry);
    for (int i = 1; i < w->n && rc == 0; i++)
        if (strcmp(w->e[i - 1].name, w->e[i].name) == 0) {
            util_set_err(err, errlen, "tensor '%s' is in both %s and %s", w->e[i].name, st_path(w->e[i - 1].file),
                         st_path(w->e[i].file));
            rc = -1;
        }
    // With an index: each tensor where the index says, and nothing unlisted.
    const TokJson *map = j ? tok_json_get(j, "weight_map") : NULL;
    for (size_t i = 0; map && rc == 0 && i < map->len; i++) {
        HfEntry *e = hf_find(w, map->keys[i]);
        char where[4096];
        snprintf(where, sizeof where, "%s/%s", dir, map->items[i].str);
        if (!e || strcmp(st_path(e->file), where) != 0) {
            util_set_err(err, errlen, "%s: lists '%s' in %s, which does not hold it", index, map->keys[i], where);
            rc = -1;
        }
    }
    if (map && rc == 0 && (size_t)w->n != map->len) {
        util_set_err(err, errlen, "%s: the shards hold %d tensors, the weight_map lists %zu", index, w->n, map->len);
        rc = -1;
    }
    tok_json_free(j);
    return rc;
}

// "[a, b]" for messages.
static void hf_shape_str(char *out, size_t n, int ndim, const int64_t *shape) {
    int k = snprintf(out, n, "[");
    for (int i = 0; i < ndim && k < (int)n; i++) k += snprintf(out + k, n - (size_t)k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < (int)n) snprintf(out + k, n - (size_t)k, "]");
}

// Reads tensor t of the model from the weights into its place.
static int hf_read_tensor(HfWeights *w, const HfTensor *t, const char *dir, HfArch arch, int hd, char *err,
                          size_t errlen) {
    HfEntry *e = hf_find(w, t->name);
    if (!e) {
        util_set_err(err, errlen, "%s: tensor '%s' is missing (a %s of this config has it)", dir, t->name,
                     hf_arch_name(arch));
        return -1;
    }
    e->used = 1;
    const StTensor *st = e->t;
    int same = st->ndim == t->ndim;
    for (int k = 0; same && k < t->ndim; k++) same = st->shape[k] == t->shape[k];
    if (!same) {
        char have[64], want[64];
        hf_shape_str(have, sizeof have, st->ndim, st->shape);
        hf_shape_str(want, sizeof want, t->ndim, t->shape);
        util_set_err(err, errlen, "%s: tensor '%s' has shape %s, the config implies %s", st_path(e->file), t->name,
                     have, want);
        return -1;
    }
    if (!t->data) return 0;
    if (!t->rope_pairs) return st_read_f32(e->file, st, t->data, err, errlen);
    // Ernie's q/k rows are in interleaved pair order: put each back in rotate-half order.
    int64_t rows = t->shape[0], cols = t->shape[1];
    float *tmp = xmalloc(sizeof(float) * (size_t)(rows * cols));
    int rc = st_read_f32(e->file, st, tmp, err, errlen);
    for (int64_t r = 0; rc == 0 && r < rows; r++)
        memcpy(t->data + hf_rope_row(r, hd) * cols, tmp + r * cols, sizeof(float) * (size_t)cols);
    free(tmp);
    return rc;
}

int hf_import(const char *dir, const char *out_ckpt, HfArch *arch_out, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    TokJson *j = tok_json_parse_file(path, err, errlen);
    if (!j) return -1;
    MoeConfig cfg;
    HfArch arch;
    int rc = hf_config_read(j, path, &cfg, &arch, err, errlen);
    tok_json_free(j);
    if (rc != 0) return -1;
    HfWeights w = { 0 };
    if (hf_open_weights(&w, dir, err, errlen) != 0) {
        hf_weights_free(&w);
        return -1;
    }
    CkptModel m;
    ckpt_model_alloc(&m, &cfg);
    int n;
    HfTensor *t = hf_tensors(&cfg, arch, &m.lay, m.params, m.bias, &n);
    for (int i = 0; i < n && rc == 0; i++) rc = hf_read_tensor(&w, &t[i], dir, arch, config_head_dim(&cfg), err, errlen);
    for (int i = 0; i < w.n && rc == 0; i++)
        if (!w.e[i].used) {
            util_set_err(err, errlen, "%s: unexpected tensor '%s' (not part of a %s of this config)",
                         st_path(w.e[i].file), w.e[i].name, hf_arch_name(arch));
            rc = -1;
        }
    // The routing the model uses, for `train_moe sample` and for export.
    const char *options = "# written by moe_ckpt import: experts are selected on s + b (an additive bias)\n"
                          "balance = alf\ngamma-rule = sign\n";
    if (rc == 0) rc = ckpt_model_save(out_ckpt, &m, options, err, errlen);
    if (rc == 0 && arch_out) *arch_out = arch;
    free(t);
    ckpt_model_free(&m);
    hf_weights_free(&w);
    return rc;
}
