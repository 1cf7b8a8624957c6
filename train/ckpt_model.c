// The model inside a checkpoint file (see ckpt_model.h).
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L  // open_memstream
#endif

#include "ckpt_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/balance.h"
#include "../util/util.h"
#include "ckpt.h"
#include "ckpt_sections.h"

// The model_config section: key=value lines over the `tiny` preset (as the
// trainer reads it), then validated.
static int ckpt_model_config(Ckpt *ck, const char *path, MoeConfig *c, char *err, size_t errlen) {
    uint64_t len;
    char *text = ckpt_read_alloc(ck, ckpt_sections[SEC_MODEL_CONFIG].name, CKPT_TEXT, &len, err, errlen);
    if (!text) return -1;
    config_preset(c, "tiny");
    int rc = 0;
    for (char *line = strtok(text, "\n"); line && rc == 0; line = strtok(NULL, "\n")) {
        char *eq = strchr(line, '=');
        if (eq) *eq = '\0';
        if (!eq || config_set(c, line, eq + 1) != 0) {
            util_set_err(err, errlen, "%s: bad model_config line '%s'", path, line);
            rc = -1;
        }
    }
    free(text);
    char why[256];
    if (rc == 0 && config_validate(c, why, sizeof why) != 0) {
        util_set_err(err, errlen, "%s: invalid model_config: %s", path, why);
        rc = -1;
    }
    return rc;
}

// The routing rule from the options section ("key = value" lines, as the
// trainer writes them): the balancing options decide s * b or s + b.
static int ckpt_model_rule(Ckpt *ck, const char *path, int *bias_mult, int *bias_logits, char *err, size_t errlen) {
    BalanceConfig bal;
    balance_config_default(&bal);
    *bias_mult = *bias_logits = 0;
    if (!ckpt_find(ck, ckpt_sections[SEC_OPTIONS].name)) return 0;
    uint64_t len;
    char *text = ckpt_read_alloc(ck, ckpt_sections[SEC_OPTIONS].name, CKPT_TEXT, &len, err, errlen);
    if (!text) return -1;
    int rc = 0;
    for (char *line = strtok(text, "\n"); line && rc == 0; line = strtok(NULL, "\n")) {
        char *eq = strstr(line, " = ");
        if (!eq) continue;
        *eq = '\0';
        char why[256];
        if (balance_has_option(line) && balance_set_option(&bal, line, eq + 3, why, sizeof why) != 0) {
            util_set_err(err, errlen, "%s: options section: %s", path, why);
            rc = -1;
        }
    }
    free(text);
    *bias_mult = balance_bias_is_multiplicative(&bal);
    *bias_logits = balance_bias_on_logits(&bal);
    return rc;
}

void ckpt_model_alloc(CkptModel *m, const MoeConfig *cfg) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    layout_build(&m->lay, cfg);
    m->params = xcalloc((size_t)m->lay.total, sizeof(float));
    m->bias = xcalloc((size_t)config_n_moe(cfg) * cfg->n_routed + 1, sizeof(float));
}

void ckpt_model_free(CkptModel *m) {
    if (m->lay.t) layout_free(&m->lay);
    free(m->params);
    free(m->bias);
    memset(m, 0, sizeof *m);
}

int ckpt_model_load(const char *path, CkptModel *m, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    Ckpt *ck = ckpt_open(path, err, errlen);
    if (!ck) return -1;
    MoeConfig cfg;
    int bias_mult = 0, bias_logits = 0;
    int rc = ckpt_model_config(ck, path, &cfg, err, errlen);
    if (rc == 0) rc = ckpt_model_rule(ck, path, &bias_mult, &bias_logits, err, errlen);
    if (rc == 0) {
        ckpt_model_alloc(m, &cfg);
        m->bias_mult = bias_mult;
        m->bias_logits = bias_logits;
        size_t nb = (size_t)config_n_moe(&cfg) * cfg.n_routed;
        rc = ckpt_read(ck, ckpt_sections[SEC_PARAMS].name, CKPT_F32, m->params, (uint64_t)m->lay.total * sizeof(float), err, errlen);
        if (rc == 0) rc = ckpt_read(ck, ckpt_sections[SEC_BIAS].name, CKPT_F32, m->bias, nb * sizeof(float), err, errlen);
    }
    ckpt_close(ck);
    if (rc != 0) ckpt_model_free(m);
    return rc;
}

int ckpt_model_save(const char *path, const CkptModel *m, const char *options_text, char *err, size_t errlen) {
    char *cfg_text = NULL;
    size_t cfg_len = 0;
    FILE *mem = open_memstream(&cfg_text, &cfg_len);
    if (!mem) FATAL("out of memory writing %s", path);
    config_write(&m->cfg, mem);
    fclose(mem);
    size_t nb = (size_t)config_n_moe(&m->cfg) * m->cfg.n_routed;
    CkptWriter *w = ckpt_writer_open(path, err, errlen);
    int rc = w ? 0 : -1;
    if (w) {
        rc |= ckpt_write_section(w, ckpt_sections[SEC_MODEL_CONFIG].name, CKPT_TEXT, cfg_text, cfg_len);
        rc |= ckpt_write_section(w, ckpt_sections[SEC_OPTIONS].name, CKPT_TEXT, options_text, strlen(options_text));
        rc |= ckpt_write_section(w, ckpt_sections[SEC_PARAMS].name, CKPT_F32, m->params, (uint64_t)m->lay.total * sizeof(float));
        rc |= ckpt_write_section(w, ckpt_sections[SEC_BIAS].name, CKPT_F32, m->bias, nb * sizeof(float));
        if (rc != 0) {
            util_set_err(err, errlen, "%s", ckpt_writer_error(w));
            ckpt_writer_abort(w);
        } else {
            rc = ckpt_writer_commit(w, err, errlen);
        }
    }
    free(cfg_text);
    return rc;
}
