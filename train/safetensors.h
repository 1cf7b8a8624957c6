// safetensors files: the tensor container of Hugging Face checkpoints.
//
// Layout (all integers little-endian):
//   8 bytes      N, the length of the header
//   N bytes      a JSON object: for each tensor, "name": {"dtype": "F32",
//                "shape": [rows, cols], "data_offsets": [begin, end]}, and an
//                optional "__metadata__" object of strings; may end in spaces
//   the rest     the tensors' raw little-endian bytes; offsets are relative
//                to the start of this area, and the tensors tile it exactly
//
// The reader checks every field before any data is read and rejects, with a
// message naming the file: a file shorter than its header, a header that is not
// a JSON object, an unknown dtype, a shape or offsets that are not
// non-negative integers, a byte range that disagrees with dtype x shape,
// tensors that overlap or leave gaps, data running past the end of the file (or
// bytes after it), and a name used twice. The writer streams the data after a
// header computed up front and publishes the file atomically (path.tmp, fsync,
// rename). See docs/hf.md.
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    ST_F64, ST_F32, ST_F16, ST_BF16, ST_I64, ST_I32, ST_I16, ST_I8, ST_U64, ST_U32, ST_U16, ST_U8, ST_BOOL,
    ST_NDTYPES
} StDtype;

enum { ST_MAX_DIMS = 8 };
// Headers larger than this are refused unread (the format's own limit: 100 MB).
#define ST_MAX_HEADER ((uint64_t)100000000)

// The name of a dtype as the format spells it ("BF16"), and its element size.
const char *st_dtype_name(StDtype d);
size_t st_dtype_size(StDtype d);

// fp32 <-> bf16: round to nearest even (NaN stays NaN), and the exact widening.
uint16_t st_f32_to_bf16(float x);
float st_bf16_to_f32(uint16_t h);

// ---------------------------------------------------------------- reading

typedef struct {
    char *name;
    StDtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;       // product of the shape (1 for a scalar)
    uint64_t begin, end; // byte range in the data area
} StTensor;

typedef struct StFile StFile;

// Opens path and validates its header and size. NULL on error (message in err).
StFile *st_open(const char *path, char *err, size_t errlen);
void st_close(StFile *f);
const char *st_path(const StFile *f);
int st_count(const StFile *f);
// The i-th tensor, in header order.
const StTensor *st_tensor(const StFile *f, int i);
// The tensor with this name, or NULL.
const StTensor *st_find(const StFile *f, const char *name);
// A "__metadata__" value, or NULL.
const char *st_metadata(const StFile *f, const char *key);
// Reads tensor t widened to fp32 into out (numel floats). F32, BF16 and F16
// are accepted; other dtypes fail with a message naming the tensor.
int st_read_f32(StFile *f, const StTensor *t, float *out, char *err, size_t errlen);

// ---------------------------------------------------------------- writing

typedef struct {
    const char *name;
    StDtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
} StSpec;

typedef struct StWriter StWriter;

// Creates path.tmp and writes the header for n tensors, in the order given,
// with the metadata pairs meta[0..2 n_meta) ({key, value, key, value, ...}).
// The header is padded with spaces to a multiple of 8 bytes so the data start
// aligned. NULL on error (message in err).
StWriter *st_writer_open(const char *path, const StSpec *specs, int n, const char *const *meta, int n_meta,
                         char *err, size_t errlen);
// Appends raw tensor bytes, in spec order; pieces may split tensors anywhere.
int st_writer_append(StWriter *w, const void *data, size_t nbytes);
// Checks that exactly the declared bytes were appended, fsyncs and renames
// path.tmp over path. Frees w. 0, or -1 (message in err; path untouched).
int st_writer_commit(StWriter *w, char *err, size_t errlen);
// Gives up: removes path.tmp, frees w.
void st_writer_abort(StWriter *w);
// Bytes of tensor data a spec declares (dtype size x numel).
uint64_t st_spec_bytes(const StSpec *s);

#endif
