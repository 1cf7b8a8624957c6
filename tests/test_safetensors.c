// Tests of the safetensors reader and writer (train/safetensors.c):
//  - a file written by the Python safetensors library (0.8.0) is read with the
//    values that library stored (F32, BF16, F16, a zero-size tensor, metadata);
//  - fp32 -> bf16 rounding against a brute-force nearest-even search, and
//    every one of the 65536 halves widened against its definition;
//  - write -> read round trips (shapes, dtypes, bytes, 8-byte aligned data);
//  - malformed files are rejected with a message naming the file: every
//    truncation, bad header lengths, non-JSON headers, unknown dtypes, bad
//    shapes and offsets, overlaps, gaps, extra bytes, duplicate names;
//  - the writer refuses bad specs and short data and leaves an existing file as it was.
// Prints one line per check; exits 1 on any failure.
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L  // mkdtemp
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "../train/safetensors.h"

static char tmpdir[] = "/tmp/test_safetensors.XXXXXX";

static void test_path(char *out, size_t n, const char *name) { snprintf(out, n, "%s/%s", tmpdir, name); }

// Writes raw bytes to a file.
static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

// A file of: 8-byte length (header_len, or strlen(header)), header, data.
static void write_st(const char *path, const char *header, uint64_t header_len, const void *data, size_t n) {
    size_t hl = strlen(header);
    unsigned char *buf = malloc(8 + hl + n + 1);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(header_len >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (n) memcpy(buf + 8 + hl, data, n);
    write_bytes(path, buf, 8 + hl + n);
    free(buf);
}

// ---------------------------------------------------------------- a file from the Python library

// safetensors.torch.save({"a": [[1, 2], [3, -4.5]] f32, "b.bf": [1.5, -2, 0.1] bf16,
// "c": [0.5, 6e-5, -65504] f16, "z": zeros(0, 3) f32}, metadata={"format": "pt"}),
// safetensors 0.8.0: its header (with its own padding) and data, byte for byte.
static const char py_header[] =
    "{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
    "\"z\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[16,16]},\"b.bf\":{\"dtype\":\"BF16\",\"shape\":[3],"
    "\"data_offsets\":[16,22]},\"c\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[22,28]}}     ";
static const unsigned char py_data[28] = {
    0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x90, 0xc0,
    0xc0, 0x3f, 0x00, 0xc0, 0xcd, 0x3d, 0x00, 0x38, 0xef, 0x03, 0xff, 0xfb,
};

static void test_python_file(void) {
    char path[256], err[512] = "";
    test_path(path, sizeof path, "py.safetensors");
    check(strlen(py_header) == 0x108, "fixture header is the library's 264 bytes (got %zu)", strlen(py_header));
    write_st(path, py_header, strlen(py_header), py_data, sizeof py_data);
    StFile *f = st_open(path, err, sizeof err);
    check(f != NULL, "file written by the Python library opens: %s", f ? "yes" : err);
    if (!f) return;
    const char *fmt = st_metadata(f, "format");
    check(st_count(f) == 4 && fmt && strcmp(fmt, "pt") == 0, "4 tensors, metadata format=pt (got %d, %s)",
          st_count(f), fmt ? fmt : "none");
    const StTensor *a = st_find(f, "a"), *b = st_find(f, "b.bf"), *c = st_find(f, "c"), *z = st_find(f, "z");
    check(a && b && c && z, "tensors a, b.bf, c, z found by name");
    if (!a || !b || !c || !z) return;
    check(a->dtype == ST_F32 && a->ndim == 2 && a->shape[0] == 2 && a->shape[1] == 2 && b->dtype == ST_BF16 &&
              c->dtype == ST_F16 && z->ndim == 2 && z->shape[0] == 0 && z->shape[1] == 3 && z->numel == 0,
          "dtypes and shapes as the header says");
    float va[4], vb[3], vc[3], vz[1];
    int rc = st_read_f32(f, a, va, err, sizeof err) | st_read_f32(f, b, vb, err, sizeof err) |
             st_read_f32(f, c, vc, err, sizeof err) | st_read_f32(f, z, vz, err, sizeof err);
    check(rc == 0, "every tensor reads: %s", rc ? err : "ok");
    // The values torch holds for these tensors (bf16(0.1) and f16(6e-5) printed by torch after .float()).
    check(va[0] == 1 && va[1] == 2 && va[2] == 3 && va[3] == -4.5f, "F32 values 1 2 3 -4.5");
    check(vb[0] == 1.5f && vb[1] == -2 && vb[2] == 0.10009765625f, "BF16 values 1.5 -2 0.10009765625 (%.12g)",
          vb[2]);
    check(vc[0] == 0.5f && vc[1] == 6.002187728881836e-05f && vc[2] == -65504, "F16 values 0.5 6.0021877e-05 "
          "(subnormal) -65504 (%.10g %.10g)", vc[1], vc[2]);
    st_close(f);
}

// ---------------------------------------------------------------- conversions

static float bits_f32(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static void test_bf16(void) {
    // Nearest bf16 by search: the two bf16 values around x, the closer one,
    // the even one on a tie. Above the largest finite bf16 the next value is
    // inf, which IEEE rounding treats as 2^128 (so half-way and beyond round to inf).
    uint64_t s = 12345;
    int bad = 0, n = 0;
    for (int i = 0; i < 2000000; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        uint32_t u = (uint32_t)(s >> 32);
        if (i < 16) u = (uint32_t[]){ 0, 0x80000000u, 0x3F808000u, 0x3F818000u, 0x3F80FFFFu, 0x7F7FFFFFu,
                                      0x7F7F7FFFu, 0x7F7F8000u, 0x00008000u, 0x00018000u, 0xFF800000u,
                                      0x7F800000u, 0x3F800001u, 0xBF807FFFu, 0x0000FFFFu, 0x00000001u }[i];
        float x = bits_f32(u);
        if (isnan(x)) continue;
        uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
        double vh = (hi & 0x7F80) == 0x7F80 ? copysign(ldexp(1, 128), x) : st_bf16_to_f32(hi);
        double dl = fabs((double)x - st_bf16_to_f32(lo)), dh = fabs((double)x - vh);
        uint16_t want = (u & 0xFFFF) == 0 ? lo : dl < dh ? lo : dh < dl ? hi : (lo & 1) ? hi : lo;
        if (isinf(x)) want = lo;
        n++;
        if (st_f32_to_bf16(x) != want) bad++;
    }
    check(bad == 0, "fp32 -> bf16 equals the nearest-even search on %d values (incl. ties, overflow to inf, "
          "subnormals): %d differ", n, bad);
    uint16_t qn = st_f32_to_bf16(bits_f32(0x7FC00001u)), sn = st_f32_to_bf16(bits_f32(0x7F800001u));
    check(isnan(st_bf16_to_f32(qn)) && isnan(st_bf16_to_f32(sn)), "NaNs stay NaN (0x%04x 0x%04x)", qn, sn);
    int rt = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float x = st_bf16_to_f32((uint16_t)h);
        if (!isnan(x) && st_f32_to_bf16(x) != h) rt++;
    }
    check(rt == 0, "bf16 -> fp32 -> bf16 is the identity on every non-NaN bf16 (%d differ)", rt);
}

// F16 through the reader (a file of all 65536 halves) against the definition.
static void test_f16(void) {
    char path[256], err[512] = "";
    test_path(path, sizeof path, "f16.safetensors");
    const char *header = "{\"h\":{\"dtype\":\"F16\",\"shape\":[65536],\"data_offsets\":[0,131072]}}";
    unsigned char *data = malloc(131072);
    for (int h = 0; h < 65536; h++) {
        data[2 * h] = (unsigned char)h;
        data[2 * h + 1] = (unsigned char)(h >> 8);
    }
    write_st(path, header, strlen(header), data, 131072);
    free(data);
    StFile *f = st_open(path, err, sizeof err);
    float *v = malloc(sizeof(float) * 65536);
    int rc = f ? st_read_f32(f, st_find(f, "h"), v, err, sizeof err) : -1;
    int bad = 0;
    for (int h = 0; rc == 0 && h < 65536; h++) {
        int sign = h >> 15, e = h >> 10 & 31, m = h & 1023;
        double want = e == 31 ? (m ? NAN : INFINITY) : e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
        if (sign) want = -want;
        if (isnan(want) ? !isnan(v[h]) : (double)v[h] != want || !!signbit(v[h]) != sign) bad++;
    }
    check(rc == 0 && bad == 0, "all 65536 F16 values widen to their definition (-1)^s 2^(e-15) (1 + m/1024), "
          "subnormals, inf, NaN: %d differ %s", bad, rc ? err : "");
    free(v);
    st_close(f);
}

// ---------------------------------------------------------------- writer round trip

static void test_round_trip(void) {
    char path[256], err[512] = "";
    test_path(path, sizeof path, "rt.safetensors");
    float a[6] = { 1, -2, 3.25f, 1e-30f, -0.0f, 65536 };
    uint16_t b[5];
    for (int i = 0; i < 5; i++) b[i] = st_f32_to_bf16((float)i / 3);
    int32_t c[2] = { -7, 123456789 };
    StSpec specs[4] = {
        { "model.layers.0.w\"odd\\name\x01\n", ST_F32, 2, { 2, 3 } },
        { "empty", ST_F32, 2, { 0, 4 } },
        { "b", ST_BF16, 1, { 5 } },
        { "c", ST_I32, 3, { 1, 2, 1 } },
    };
    const char *meta[] = { "format", "pt", "note", "caf\xc3\xa9" };
    StWriter *w = st_writer_open(path, specs, 4, meta, 2, err, sizeof err);
    int rc = w ? 0 : -1;
    if (w) {
        rc |= st_writer_append(w, a, 10);  // pieces need not follow tensor boundaries
        rc |= st_writer_append(w, (char *)a + 10, sizeof a - 10);
        rc |= st_writer_append(w, b, sizeof b);
        rc |= st_writer_append(w, c, sizeof c);
        rc |= st_writer_commit(w, err, sizeof err);
    }
    check(rc == 0, "writer: 4 tensors (one empty, a name with quote, backslash, control bytes, UTF-8 metadata): %s",
          rc ? err : "ok");
    FILE *fp = fopen(path, "rb");
    unsigned char len8[8] = { 0 };
    long size = 0;
    if (fp) {
        if (fread(len8, 1, 8, fp) != 8) len8[0] = 0xFF;
        fseek(fp, 0, SEEK_END);
        size = ftell(fp);
        fclose(fp);
    }
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | len8[i];
    check(hl % 8 == 0 && (uint64_t)size == 8 + hl + sizeof a + sizeof b + sizeof c,
          "header length %llu is a multiple of 8; file = 8 + header + %zu data bytes", (unsigned long long)hl,
          sizeof a + sizeof b + sizeof c);
    StFile *f = st_open(path, err, sizeof err);
    check(f != NULL, "written file opens: %s", f ? "ok" : err);
    if (!f) return;
    const StTensor *t0 = st_tensor(f, 0), *tc = st_find(f, "c");
    float va[6], vb[5], ve[1];
    rc = st_read_f32(f, t0, va, err, sizeof err) | st_read_f32(f, st_find(f, "b"), vb, err, sizeof err) |
         st_read_f32(f, st_find(f, "empty"), ve, err, sizeof err);
    int same = rc == 0 && memcmp(va, a, sizeof a) == 0;
    for (int i = 0; i < 5; i++) same &= vb[i] == st_bf16_to_f32(b[i]);
    check(same && strcmp(t0->name, specs[0].name) == 0 && st_count(f) == 4,
          "names, order and values read back exactly (F32 bit for bit, BF16 widened)");
    const char *note = st_metadata(f, "note");
    check(note && strcmp(note, "caf\xc3\xa9") == 0, "metadata read back");
    check(tc && tc->dtype == ST_I32 && tc->ndim == 3 && tc->shape[1] == 2 &&
              st_read_f32(f, tc, va, err, sizeof err) != 0 && strstr(err, "'c'") && strstr(err, "I32"),
          "an I32 tensor is listed but not read as floats: %s", err);
    st_close(f);

    // Refusals that leave the existing file untouched.
    StSpec dup[2] = { { "x", ST_F32, 1, { 1 } }, { "x", ST_F32, 1, { 1 } } };
    w = st_writer_open(path, dup, 2, NULL, 0, err, sizeof err);
    check(!w && strstr(err, "'x'") && strstr(err, "twice"), "writer refuses a duplicate name: %s", err);
    StSpec inval[1] = { { "bad\xff", ST_F32, 1, { 1 } } };
    w = st_writer_open(path, inval, 1, NULL, 0, err, sizeof err);
    check(!w && strstr(err, "UTF-8"), "writer refuses a name that is not UTF-8 (JSON cannot hold it): %s", err);
    StSpec neg[1] = { { "y", ST_F32, 2, { 2, -1 } } };
    w = st_writer_open(path, neg, 1, NULL, 0, err, sizeof err);
    check(!w && strstr(err, "shape"), "writer refuses a negative size: %s", err);
    StSpec one[1] = { { "x", ST_F32, 1, { 4 } } };
    w = st_writer_open(path, one, 1, NULL, 0, err, sizeof err);
    rc = w ? st_writer_append(w, a, 8) : -1;
    rc = w ? st_writer_commit(w, err, sizeof err) : -1;
    f = st_open(path, err + 256, 256);
    check(rc != 0 && strstr(err, "fewer") && f && st_count(f) == 4,
          "commit with 8 of 16 bytes fails and the earlier file is intact: %s", err);
    st_close(f);
    w = st_writer_open(path, one, 1, NULL, 0, err, sizeof err);
    rc = w ? st_writer_append(w, a, 20) : 0;
    check(rc != 0, "appending more bytes than declared fails");
    if (w) st_writer_abort(w);
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    check(access(tmp, F_OK) != 0, "no .tmp file left behind");
}

// ---------------------------------------------------------------- malformed files

// Expects st_open to fail with a message containing the path and `want`.
static void expect_reject(const char *what, const char *path, const char *want) {
    char err[512] = "";
    StFile *f = st_open(path, err, sizeof err);
    check(!f && strstr(err, path) && strstr(err, want), "rejects %s: %s", what, f ? "(opened!)" : err);
    st_close(f);
}

static void test_malformed(void) {
    char path[256];
    test_path(path, sizeof path, "bad.safetensors");
    unsigned char d16[16] = { 0 };
    const char *ok = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}";
    struct { const char *what, *header; size_t ndata; const char *want; } cases[] = {
        { "a header that is not JSON", "{\"a\":{\"dtype\":\"F32\",", 16, "not valid JSON" },
        { "a header that is a JSON array", "[1, 2]", 0, "not a JSON object" },
        { "an unknown dtype", "{\"a\":{\"dtype\":\"F33\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "dtype 'F33'" },
        { "a negative size", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-4],\"data_offsets\":[0,16]}}", 16, "shape[0]" },
        { "a fractional size", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,16]}}", 16, "shape[0]" },
        { "offsets that disagree with the shape",
          "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", 16, "do not hold" },
        { "end before begin", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[16,8]}}", 16, "do not hold" },
        { "missing data_offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4]}}", 16, "data_offsets" },
        { "overlapping tensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
          "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlaps" },
        { "a gap between tensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
          "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]}}", 16, "belong to no tensor" },
        { "data past the end of the file", ok, 12, "truncated" },
        { "bytes after the last tensor", ok, 16 + 4, "after the last tensor" },
        { "a duplicate name", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
          "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "appears twice" },
        { "metadata that is not strings", "{\"__metadata__\":{\"format\":1}}", 0, "__metadata__" },
        { "an entry that is not an object", "{\"a\":[1]}", 0, "not an object" },
    };
    unsigned char data[32] = { 0 };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_st(path, cases[i].header, strlen(cases[i].header), data, cases[i].ndata);
        expect_reject(cases[i].what, path, cases[i].want);
    }
    write_st(path, ok, strlen(ok) + 100, d16, 16);
    expect_reject("a header length past the end of the file", path, "truncated");
    write_st(path, ok, (uint64_t)1 << 40, d16, 16);
    expect_reject("a header length of 2^40", path, "exceeds");
    write_bytes(path, "\x10\0\0", 3);
    expect_reject("a 3-byte file", path, "truncated");
    char missing[300];
    test_path(missing, sizeof missing, "does-not-exist.safetensors");
    expect_reject("a missing file", missing, "cannot open");

    // Every truncation of a valid file (the Python library's) is rejected.
    size_t hl = strlen(py_header), full = 8 + hl + sizeof py_data;
    unsigned char *buf = malloc(full);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, py_header, hl);
    memcpy(buf + 8 + hl, py_data, sizeof py_data);
    int opened = 0;
    for (size_t n = 0; n < full; n++) {
        char err[512];
        write_bytes(path, buf, n);
        StFile *f = st_open(path, err, sizeof err);
        if (f || !strstr(err, path)) opened++;
        st_close(f);
    }
    check(opened == 0, "every one of the %zu truncations of a valid file is rejected with the file named "
          "(%d were not)", full, opened);
    free(buf);
}

int main(void) {
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_python_file();
    test_bf16();
    test_f16();
    test_round_trip();
    test_malformed();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", tmpdir);
    return check_summary("test_safetensors");
}
