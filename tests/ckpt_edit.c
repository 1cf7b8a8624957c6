// ckpt_edit: writes a copy of a checkpoint with one thing changed and every
// checksum valid, for the tests of what the trainers accept (tests/test_inputs.sh).
//
//   ckpt_edit IN OUT text SECTION TEXT         the section's payload becomes TEXT
//   ckpt_edit IN OUT line SECTION KEY VALUE    in a text section, the line KEY=... or
//                                              KEY = ... gets VALUE ("-": the line goes)
//   ckpt_edit IN OUT i64 SECTION VALUE         the first element of an i64 section
//   ckpt_edit IN OUT f32 SECTION INDEX VALUE   one element of an f32 section (nan, inf, -1, ...)
//   ckpt_edit IN OUT drop SECTION              the section goes
//   ckpt_edit IN OUT dtype SECTION D           the section's dtype becomes D (0..5)
//   ckpt_edit IN OUT reserved BYTE             header byte BYTE (32..55, reserved) becomes 1,
//                                              the header checksum recomputed
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt_rewrite.h"

static int fail(const char *msg) {
    fprintf(stderr, "ckpt_edit: %s\n", msg);
    return 1;
}

// Copies IN to OUT with header byte `at` set to 1 and the header checksum
// (XXH64 of bytes 0..55, at 56) recomputed: docs/checkpoint.md.
static int edit_reserved(const char *in, const char *out, int at) {
    FILE *f = fopen(in, "rb");
    if (!f) return fail("cannot open input");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    uint8_t *buf = malloc((size_t)n);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n || n < 64 || at < 32 || at >= 56) {
        fclose(f);
        return fail("cannot read input, or BYTE not in 32..55");
    }
    fclose(f);
    buf[at] = 1;
    uint64_t h = ckpt_hash(buf, 56);
    for (int i = 0; i < 8; i++) buf[56 + i] = (uint8_t)(h >> (8 * i));
    FILE *g = fopen(out, "wb");
    int rc = !g || fwrite(buf, 1, (size_t)n, g) != (size_t)n;
    if (g && fclose(g) != 0) rc = 1;
    free(buf);
    return rc ? fail("cannot write output") : 0;
}

// The text section with line KEY=... (or KEY = ...) replaced by KEY<sep>VALUE, or removed.
static char *edit_line(const char *text, const char *key, const char *value) {
    size_t cap = strlen(text) + strlen(key) + strlen(value) + 8, used = 0, klen = strlen(key);
    char *out = calloc(cap, 1);
    if (!out) abort();
    for (const char *line = text; *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) + 1 : strlen(line);
        const char *rest = line + klen;
        int match = strncmp(line, key, klen) == 0 && (rest[0] == '=' || strncmp(rest, " = ", 3) == 0);
        if (!match) {
            memcpy(out + used, line, len);
            used += len;
        } else if (strcmp(value, "-") != 0) {
            used += (size_t)sprintf(out + used, "%s%s%s\n", key, rest[0] == '=' ? "=" : " = ", value);
        }
        line += len;
    }
    return out;
}

int main(int argc, char **argv) {
    if (argc < 5) return fail("usage: ckpt_edit IN OUT OP SECTION|BYTE [ARGS] (see the source)");
    const char *in = argv[1], *out = argv[2], *op = argv[3], *name = argv[4];
    if (strcmp(op, "reserved") == 0) return edit_reserved(in, out, atoi(name));
    char err[1024];
    CkptImage im;
    if (ckpt_image_read(&im, in, err, sizeof err) != 0) return fail(err);
    int i = ckpt_image_find(&im, name);
    if (i < 0) return fail("no such section");
    if (strcmp(op, "text") == 0 && argc == 6) {
        ckpt_image_set(&im, i, argv[5], strlen(argv[5]));
    } else if (strcmp(op, "line") == 0 && argc == 7) {
        char *t = edit_line((const char *)im.data[i], argv[5], argv[6]);
        ckpt_image_set(&im, i, t, strlen(t));
        free(t);
    } else if (strcmp(op, "i64") == 0 && argc == 6 && im.sec[i].nbytes >= 8) {
        int64_t v = strtoll(argv[5], NULL, 10);
        memcpy(im.data[i], &v, 8);
    } else if (strcmp(op, "f32") == 0 && argc == 7) {
        uint64_t at = strtoull(argv[5], NULL, 10);
        float v = strtof(argv[6], NULL);
        if (at >= im.sec[i].nbytes / 4) return fail("index out of range");
        memcpy(im.data[i] + 4 * at, &v, 4);
    } else if (strcmp(op, "drop") == 0 && argc == 5) {
        ckpt_image_drop(&im, i);
    } else if (strcmp(op, "dtype") == 0 && argc == 6) {
        im.sec[i].dtype = (CkptDtype)atoi(argv[5]);
    } else {
        return fail("unknown operation or wrong arguments");
    }
    int rc = ckpt_image_write(&im, out, err, sizeof err);
    ckpt_image_free(&im);
    return rc ? fail(err) : 0;
}
