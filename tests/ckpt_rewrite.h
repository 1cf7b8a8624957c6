// For tests: a checkpoint held in memory section by section, so that a test
// can change what a section holds and write a file whose checksums are all
// valid again (through the real writer, train/ckpt.c). This makes the
// checkpoints that only content checks can reject: the container's
// checksums prove nothing about them.
#ifndef MOE_TEST_CKPT_REWRITE_H
#define MOE_TEST_CKPT_REWRITE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/config.h"
#include "../train/ckpt.h"

// A model with every kind of layer, small enough (1512 parameters) that a
// checkpoint of it is written in no time.
static inline MoeConfig ckpt_test_model(void) {
    MoeConfig c;
    config_preset(&c, "tiny");
    c.vocab_size = 16; c.d_model = 8; c.n_layers = 2; c.n_heads = 2; c.seq_len = 8; c.d_ff = 8;
    c.n_shared = 1; c.n_routed = 4; c.d_expert = 4; c.top_k = 2;
    return c;
}

typedef struct {
    int n;
    CkptSection sec[32];  // name and dtype (offsets and hashes are the writer's business)
    uint8_t *data[32];    // (sec[i].nbytes) payloads, each with one extra NUL byte
} CkptImage;

// Reads every section of path. 0, or -1 with a message in err.
static inline int ckpt_image_read(CkptImage *im, const char *path, char *err, size_t errlen) {
    memset(im, 0, sizeof *im);
    Ckpt *ck = ckpt_open(path, err, errlen);
    if (!ck) return -1;
    int rc = 0;
    for (int i = 0; i < ckpt_num_sections(ck) && i < 32 && rc == 0; i++) {
        im->sec[i] = *ckpt_section_at(ck, i);
        im->data[i] = ckpt_read_alloc(ck, im->sec[i].name, im->sec[i].dtype, NULL, err, errlen);
        if (!im->data[i]) rc = -1;
        im->n = i + 1;
    }
    ckpt_close(ck);
    return rc;
}

// The index of section name, or -1.
static inline int ckpt_image_find(const CkptImage *im, const char *name) {
    for (int i = 0; i < im->n; i++)
        if (strcmp(im->sec[i].name, name) == 0) return i;
    return -1;
}

// Replaces the payload of section i by nbytes of data.
static inline void ckpt_image_set(CkptImage *im, int i, const void *data, uint64_t nbytes) {
    uint8_t *p = malloc((size_t)nbytes + 1);
    if (!p) abort();
    memcpy(p, data, (size_t)nbytes);
    p[nbytes] = 0;
    free(im->data[i]);
    im->data[i] = p;
    im->sec[i].nbytes = nbytes;
}

// Removes section i.
static inline void ckpt_image_drop(CkptImage *im, int i) {
    free(im->data[i]);
    for (int j = i; j + 1 < im->n; j++) {
        im->sec[j] = im->sec[j + 1];
        im->data[j] = im->data[j + 1];
    }
    im->n--;
}

// Writes the image to path with fresh checksums. 0, or -1 with a message.
static inline int ckpt_image_write(const CkptImage *im, const char *path, char *err, size_t errlen) {
    CkptWriter *w = ckpt_writer_open(path, err, errlen);
    if (!w) return -1;
    for (int i = 0; i < im->n; i++)
        if (ckpt_write_section(w, im->sec[i].name, im->sec[i].dtype, im->data[i], im->sec[i].nbytes) != 0) {
            snprintf(err, errlen, "%s", ckpt_writer_error(w));
            ckpt_writer_abort(w);
            return -1;
        }
    return ckpt_writer_commit(w, err, errlen);
}

static inline void ckpt_image_free(CkptImage *im) {
    for (int i = 0; i < im->n; i++) free(im->data[i]);
    memset(im, 0, sizeof *im);
}

#endif
