// A training checkpoint's content, written and read back with every value
// checked (see ckpt_state.h; sections in ckpt_sections.h, format in
// docs/checkpoint.md).
#include "ckpt_state.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/layout.h"
#include "../util/util.h"
#include "ckpt_sections.h"

// The size in bytes section id must have for the model cfg of n params.
static uint64_t ckst_section_bytes(const MoeConfig *cfg, int64_t n, CkptSectionId id) {
    switch (id) {
    case SEC_STEP: case SEC_RNG: return 8;
    case SEC_LOADER: return 3 * 8;
    case SEC_BIAS: return (uint64_t)config_n_moe(cfg) * (uint64_t)cfg->n_routed * sizeof(float);
    case SEC_PARAMS: case SEC_ADAM_M: case SEC_ADAM_V: return (uint64_t)n * sizeof(float);
    default: return 0; // text: any size
    }
}

// Describes where flat element i of section id lies, for messages.
static void ckst_locate(const CkptState *st, CkptSectionId id, uint64_t i, char *out, size_t outlen) {
    if (id == SEC_BIAS) {
        snprintf(out, outlen, " (MoE layer %llu, expert %llu)", (unsigned long long)(i / st->cfg.n_routed),
                 (unsigned long long)(i % st->cfg.n_routed));
        return;
    }
    out[0] = '\0';
    if (id != SEC_PARAMS && id != SEC_ADAM_M && id != SEC_ADAM_V) return;
    ParamLayout lay;
    layout_build(&lay, &st->cfg);
    for (int t = 0; t < lay.n; t++)
        if ((int64_t)i >= lay.t[t].offset && (int64_t)i < lay.t[t].offset + lay.t[t].numel) {
            snprintf(out, outlen, " (tensor %s, element %lld)", lay.t[t].name, (long long)(i - lay.t[t].offset));
            break;
        }
    layout_free(&lay);
}

// Checks the values of a section read into data against its rule in ckpt_sections.
static int ckst_check_values(const CkptState *st, CkptSectionId id, const void *data, uint64_t nbytes, char *err,
                             size_t errlen) {
    const CkptSectionDef *def = &ckpt_sections[id];
    char where[160];
    if (def->values == VAL_NONNEG) { // i64
        const int64_t *x = data;
        for (uint64_t i = 0; i < nbytes / 8; i++)
            if (x[i] < 0) {
                util_set_err(err, errlen, "%s: section '%s': value %lld is negative", st->path, def->name,
                             (long long)x[i]);
                return -1;
            }
    }
    if (def->values == VAL_FINITE || def->values == VAL_FINITE_NONNEG) { // f32
        const float *x = data;
        int nonneg = def->values == VAL_FINITE_NONNEG;
        for (uint64_t i = 0; i < nbytes / sizeof(float); i++)
            if (!isfinite(x[i]) || (nonneg && x[i] < 0)) {
                ckst_locate(st, id, i, where, sizeof where);
                util_set_err(err, errlen, "%s: section '%s': element %llu%s is %g, not %s", st->path, def->name,
                             (unsigned long long)i, where, x[i], nonneg ? "a finite number >= 0" : "finite");
                return -1;
            }
    }
    return 0;
}

// Reads section id into dst (nbytes, which the caller derived from the
// config) and checks its values.
static int ckst_read(CkptState *st, CkptSectionId id, void *dst, uint64_t nbytes, char *err, size_t errlen) {
    const CkptSectionDef *def = &ckpt_sections[id];
    if (ckpt_read(st->ck, def->name, def->dtype, dst, nbytes, err, errlen) != 0) return -1;
    return ckst_check_values(st, id, dst, nbytes, err, errlen);
}

// A new buffer for section id, once the file's table shows that the section
// has the size the config implies: a corrupt config cannot make us allocate
// more than the file holds.
static float *ckst_alloc(CkptState *st, CkptSectionId id, char *err, size_t errlen) {
    const CkptSectionDef *def = &ckpt_sections[id];
    const CkptSection *s = ckpt_find(st->ck, def->name);
    uint64_t want = ckst_section_bytes(&st->cfg, st->n_params, id);
    if (!s) {
        util_set_err(err, errlen, "%s: no section '%s'", st->path, def->name);
        return NULL;
    }
    if (s->nbytes != want) {
        util_set_err(err, errlen, "%s: section '%s' has %llu bytes; its model_config implies %llu", st->path,
                     def->name, (unsigned long long)s->nbytes, (unsigned long long)want);
        return NULL;
    }
    return xmalloc((size_t)want);
}

int ckpt_state_open(CkptState *st, const char *path, char *err, size_t errlen) {
    memset(st, 0, sizeof *st);
    st->path = xmalloc(strlen(path) + 1);
    strcpy(st->path, path);
    st->ck = ckpt_open(path, err, errlen);
    if (!st->ck) goto fail;
    uint64_t len;
    const CkptSectionDef *cfg = &ckpt_sections[SEC_MODEL_CONFIG], *opt = &ckpt_sections[SEC_OPTIONS];
    char *text = ckpt_read_alloc(st->ck, cfg->name, cfg->dtype, &len, err, errlen);
    if (!text) goto fail;
    char where[4200];
    snprintf(where, sizeof where, "%s: section '%s'", path, cfg->name);
    int rc = config_parse_text(&st->cfg, text, (size_t)len, where, err, errlen);
    free(text);
    if (rc != 0) goto fail;
    st->n_params = config_total_params(&st->cfg);
    st->options = ckpt_read_alloc(st->ck, opt->name, opt->dtype, &len, err, errlen);
    if (!st->options) goto fail;
    if (strlen(st->options) != len) {
        util_set_err(err, errlen, "%s: section '%s' holds a NUL byte: not options text", path, opt->name);
        goto fail;
    }
    return 0;
fail:
    ckpt_state_close(st);
    return -1;
}

int ckpt_state_load(CkptState *st, int full, char *err, size_t errlen) {
    uint64_t nb = ckst_section_bytes(&st->cfg, st->n_params, SEC_BIAS);
    uint64_t np = ckst_section_bytes(&st->cfg, st->n_params, SEC_PARAMS);
    if (!(st->bias = ckst_alloc(st, SEC_BIAS, err, errlen)) || ckst_read(st, SEC_BIAS, st->bias, nb, err, errlen))
        return -1;
    if (!(st->params = ckst_alloc(st, SEC_PARAMS, err, errlen)) ||
        ckst_read(st, SEC_PARAMS, st->params, np, err, errlen))
        return -1;
    if (!full) return 0;
    if (!(st->adam_m = ckst_alloc(st, SEC_ADAM_M, err, errlen)) ||
        ckst_read(st, SEC_ADAM_M, st->adam_m, np, err, errlen))
        return -1;
    if (!(st->adam_v = ckst_alloc(st, SEC_ADAM_V, err, errlen)) ||
        ckst_read(st, SEC_ADAM_V, st->adam_v, np, err, errlen))
        return -1;
    if (ckst_read(st, SEC_STEP, &st->step, sizeof st->step, err, errlen) ||
        ckst_read(st, SEC_LOADER, st->loader, sizeof st->loader, err, errlen) ||
        ckst_read(st, SEC_RNG, &st->rng, sizeof st->rng, err, errlen))
        return -1;
    return 0;
}

void ckpt_state_close(CkptState *st) {
    ckpt_close(st->ck);
    free(st->options);
    free(st->bias);
    free(st->params);
    free(st->adam_m);
    free(st->adam_v);
    free(st->path);
    memset(st, 0, sizeof *st);
}

int ckpt_state_write(const CkptState *st, const char *path, char *err, size_t errlen) {
    char *cfg_text = NULL;
    size_t cfg_len = 0;
    FILE *m = open_memstream(&cfg_text, &cfg_len);
    if (!m) FATAL("out of memory writing a checkpoint");
    config_write(&st->cfg, m);
    fclose(m);
    CkptWriter *w = ckpt_writer_open(path, err, errlen);
    if (!w) {
        free(cfg_text);
        return -1;
    }
    // Every section of train/ckpt_sections.h, in its order.
    const void *data[SEC_COUNT] = { cfg_text, st->options, &st->step, st->loader, &st->rng,
                                    st->bias, st->params, st->adam_m, st->adam_v };
    uint64_t bytes[SEC_COUNT] = { cfg_len, strlen(st->options) };
    for (int i = SEC_STEP; i < SEC_COUNT; i++) bytes[i] = ckst_section_bytes(&st->cfg, st->n_params, i);
    int rc = 0;
    for (int i = 0; i < SEC_COUNT && rc == 0; i++)
        rc = ckpt_write_section(w, ckpt_sections[i].name, ckpt_sections[i].dtype, data[i], bytes[i]);
    free(cfg_text);
    if (rc != 0) {
        util_set_err(err, errlen, "%s", ckpt_writer_error(w));
        ckpt_writer_abort(w);
        return -1;
    }
    return ckpt_writer_commit(w, err, errlen);
}
