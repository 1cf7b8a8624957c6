// Checkpoint files: a container of named, checksummed sections (model config
// text, fp32 parameters, balancing biases, AdamW moments, step, RNG and
// data-loader state, options text: the trainer decides what to store), written
// atomically, plus the directory conventions (ckpt_<step>.bin, latest, prune).
// The byte layout and the guarantees are in docs/checkpoint.md.
//
// Sizes and offsets are 64-bit: a 1B-parameter model with AdamW state is ~12 GB.
// Every error message starts with the path of the file it is about.
#ifndef MOE_CKPT_H
#define MOE_CKPT_H

#include <stddef.h>
#include <stdint.h>

enum { CKPT_VERSION = 1 };
enum { CKPT_NAME_MAX = 64 };  // bytes of a section name, including the NUL

// What a section holds; the reader checks it matches what the caller expects.
// Numbers are stored in the writer's byte order (little-endian on every
// machine the trainers support).
typedef enum {
    CKPT_BYTES = 0,  // opaque bytes
    CKPT_TEXT = 1,   // UTF-8 text, no terminating NUL stored
    CKPT_F32 = 2,
    CKPT_I32 = 3,
    CKPT_I64 = 4,
    CKPT_U64 = 5,
    CKPT_NDTYPES
} CkptDtype;

typedef struct {
    char name[CKPT_NAME_MAX];
    CkptDtype dtype;
    uint64_t offset;  // of the payload, in bytes from the start of the file
    uint64_t nbytes;
    uint64_t hash;    // XXH64 (seed 0) of the payload
} CkptSection;

// XXH64 with seed 0 of n bytes: the checksum of every part of the file.
uint64_t ckpt_hash(const void *data, uint64_t n);

// ---------------------------------------------------------------- writing
//
// The file is written as final_path.tmp and renamed over final_path only by a
// successful commit, so final_path is either the old file or the complete new
// one, never a mix. After the first error every call returns -1 and the commit
// fails; the message is kept in the writer (ckpt_writer_error).

typedef struct CkptWriter CkptWriter;

// Creates (or truncates a stale) final_path.tmp. NULL on error (message in err).
CkptWriter *ckpt_writer_open(const char *final_path, char *err, size_t errlen);
// A whole section from one buffer.
int ckpt_write_section(CkptWriter *w, const char *name, CkptDtype dtype, const void *data,
                       uint64_t nbytes);
// A section streamed in pieces (e.g. parameters copied off a GPU chunk by
// chunk): begin declares the size, appends must add up to it exactly, end
// closes it. Names are 1..CKPT_NAME_MAX-1 printable characters, unique per file.
int ckpt_section_begin(CkptWriter *w, const char *name, CkptDtype dtype, uint64_t nbytes);
int ckpt_section_append(CkptWriter *w, const void *data, uint64_t nbytes);
int ckpt_section_end(CkptWriter *w);
// The first error, or "" if none.
const char *ckpt_writer_error(const CkptWriter *w);
// Writes the section table and header, flushes and fsyncs the file, renames it
// over final_path and fsyncs the directory. Frees w whatever happens. Returns 0,
// or -1 (message in err) having removed the .tmp file and left final_path as it was.
int ckpt_writer_commit(CkptWriter *w, char *err, size_t errlen);
// Gives up: removes the .tmp file, leaves final_path as it was, frees w.
void ckpt_writer_abort(CkptWriter *w);

// ---------------------------------------------------------------- reading

typedef struct Ckpt Ckpt;

// Opens and checks the structure: magic, version, header checksum, file size,
// every table entry's checksum, sections tiling the file. Payloads are checked
// when read (ckpt_read) or all at once (ckpt_verify). NULL on error (message in err).
Ckpt *ckpt_open(const char *path, char *err, size_t errlen);
void ckpt_close(Ckpt *ck);
int ckpt_num_sections(const Ckpt *ck);
const CkptSection *ckpt_section_at(const Ckpt *ck, int i);
// The section with this name, or NULL.
const CkptSection *ckpt_find(const Ckpt *ck, const char *name);
// Reads section `name` into buf and verifies its checksum. Its dtype and size
// must be exactly dtype and nbytes. Returns 0 or -1 (message in err; buf's
// contents are then unspecified).
int ckpt_read(Ckpt *ck, const char *name, CkptDtype dtype, void *buf, uint64_t nbytes, char *err,
              size_t errlen);
// Reads a section of any size into a new buffer with one extra NUL byte (so a
// CKPT_TEXT section is a C string). *nbytes gets the payload size. NULL on error.
void *ckpt_read_alloc(Ckpt *ck, const char *name, CkptDtype dtype, uint64_t *nbytes, char *err,
                      size_t errlen);
// Reads every payload and checks its checksum. Returns 0 or -1 (message in err).
int ckpt_verify(Ckpt *ck, char *err, size_t errlen);

// ---------------------------------------------------------------- directories
//
// A checkpoint directory holds ckpt_<step>.bin files, step zero-padded to 8
// digits (more when larger): ckpt_00001234.bin. Other names, including the
// .tmp files of unfinished writes, are ignored.

// Writes dir/ckpt_<step>.bin into out. Returns 0, or -1 if it does not fit.
int ckpt_path(char *out, size_t outlen, const char *dir, int64_t step);
// The steps of the checkpoints in dir, ascending, in a new array (*steps, free
// it; NULL when *n is 0). A directory that does not exist holds none.
// Returns 0 or -1 (message in err).
int ckpt_list(const char *dir, int64_t **steps, int *n, char *err, size_t errlen);
// Finds the newest checkpoint and checks it completely (ckpt_open + ckpt_verify).
// If it is damaged: with fallback == 0, fails naming the file and the damage
// (an older checkpoint is never used silently); with fallback != 0, warns on
// stderr and tries the next older one. Returns 0 with the path in out (and the
// step in *step when step is not NULL), 1 when dir holds no checkpoint, -1 on
// error (message in err).
int ckpt_latest(const char *dir, int fallback, char *out, size_t outlen, int64_t *step, char *err,
                size_t errlen);
// Deletes all but the newest keep_last checkpoints of dir, never the one of
// protect_step (pass the step just written; -1 for none). keep_last <= 0
// deletes nothing. .tmp files and other names are not touched. Returns the
// number deleted, or -1 (message in err).
int ckpt_prune(const char *dir, int keep_last, int64_t protect_step, char *err, size_t errlen);

// The lock file a trainer holds in its checkpoint directory, so that a second
// trainer on the same directory stops at start instead of silently racing the
// first for every checkpoint name. It is never deleted (an flock, unlike the
// file's existence, dies with its process, so a crash leaves no stale lock).
#define CKPT_LOCK_NAME "trainer.lock"

// Creates dir (and missing parents) if needed, and takes an exclusive flock(2)
// on dir/CKPT_LOCK_NAME without waiting. Returns the lock's descriptor, or -1
// with a message in err: dir is not a directory, cannot be created or written,
// or another process holds the lock. A file system without flock gets a
// warning on stderr, and the descriptor (unlocked).
int ckpt_dir_lock(const char *dir, char *err, size_t errlen);
// Releases the lock (closes the descriptor; a negative fd is ignored).
void ckpt_dir_unlock(int fd);

#endif
