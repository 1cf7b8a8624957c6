// Byte-level BPE tokenizer: the public interface of tokenizer/.
//
// A Tokenizer turns any byte string into token ids and back without loss.
// The base vocabulary is the 256 byte values; merges learned from text (or
// imported from a Hugging Face tokenizer.json) join adjacent tokens into longer
// ones; special tokens such as <|endoftext|> get ids of their own. The byte
// layout of the .tok file and the pre-tokenisation rule are documented in
// docs/tokenizer.md.
//
// Every function that can fail returns NULL, -1 or TOK_ERROR; those that take
// (err, errlen) write a one-line message there naming the file and the problem.
#ifndef MOE_BPE_H
#define MOE_BPE_H

#include <stddef.h>
#include <stdint.h>

typedef struct Tokenizer Tokenizer;
typedef struct TokTrainer TokTrainer;

#define TOK_ERROR ((size_t)-1)          // returned by tok_encode*/tok_decode on failure
#define TOK_NO_ID UINT32_MAX            // "no such token"
#define TOK_EOT_STRING "<|endoftext|>"  // the special token every trained tokenizer has

// ---- files ---------------------------------------------------------------

// Reads a .tok file, validating every field (see docs/tokenizer.md).
Tokenizer *tok_load(const char *path, char *err, size_t errlen);
// Writes a .tok file: to path.tmp.<pid>, fflush + fsync, then rename.
int tok_save(const Tokenizer *t, const char *path, char *err, size_t errlen);
// Imports a Hugging Face byte-level BPE tokenizer.json, keeping its token ids.
// eot: the special-token string to report as tok_eot_id (NULL: the first of
// <|endoftext|>, <｜end▁of▁sentence｜>, </s> that exists). If pretok_differs is
// not NULL it is set to 1 when the file's pre-tokenizer is not GPT-2's, i.e.
// when encodings may differ from the original's (the ids always agree).
Tokenizer *tok_import_hf(const char *path, const char *eot, int *pretok_differs,
                         char *err, size_t errlen);

// Writes dir/tokenizer.json and dir/tokenizer_config.json (written atomically)
// so that transformers' AutoTokenizer gives the same ids and bytes as
// tok_encode and tok_decode (docs/hf.md): the end-of-text token is the eos,
// model_max_length the model's sequence length. Fails for a special token
// that is not valid UTF-8.
int tok_export_hf(const Tokenizer *t, const char *dir, int model_max_length, char *err, size_t errlen);

// ---- construction and training -------------------------------------------

// A tokenizer in the standard layout: ids 0..255 are the bytes, merge r
// (merges[2r], merges[2r+1]) makes id 256+r, then specials[i] gets id
// 256+n_merges+i. The first special equal to TOK_EOT_STRING becomes the EOT.
Tokenizer *tok_create(const uint32_t *merges, size_t n_merges,
                      const char *const *specials, size_t n_specials,
                      char *err, size_t errlen);

// Training in two stages so that many files can be fed one at a time:
// tok_trainer_add pre-tokenises text and counts its chunks (words);
// tok_trainer_finish learns merges until the vocabulary (bytes + merged tokens
// + <|endoftext|>) has vocab_size ids. verbose: progress lines on stderr.
TokTrainer *tok_trainer_new(void);
int tok_trainer_add(TokTrainer *tr, const char *text, size_t len);     // 0 or -1 (out of memory)
uint64_t tok_trainer_bytes(const TokTrainer *tr);                      // bytes added so far
Tokenizer *tok_trainer_finish(TokTrainer *tr, int vocab_size, int verbose,
                              char *err, size_t errlen);
void tok_trainer_free(TokTrainer *tr);
// One-call training on a single text; NULL on failure (message on stderr).
Tokenizer *tok_train(const char *text, size_t len, int vocab_size, int verbose);

// ---- encoding ------------------------------------------------------------

typedef struct {
    int allow_special;  // 1: special-token strings in the text become their ids (default 0: plain text)
    int serial;         // 1: one thread, one pass over the whole text (the reference path)
    size_t part_bytes;  // text per parallel work item; 0: 1 MiB
} TokEncodeOptions;

// Encodes len bytes of text. Returns the number of ids and sets *ids_out to a
// malloc'ed array (free it), or returns TOK_ERROR when out of memory. The
// result does not depend on the number of threads.
size_t tok_encode(const Tokenizer *t, const char *text, size_t len, uint32_t **ids_out);
size_t tok_encode_ex(const Tokenizer *t, const char *text, size_t len,
                     const TokEncodeOptions *opt, uint32_t **ids_out);
// A reusable single-threaded encoder that keeps its cache of encoded chunks
// between calls: for encoding many small documents (one encoder per thread;
// the Tokenizer itself is read-only and shared). Same ids as tok_encode_ex.
typedef struct TokEncoder TokEncoder;
TokEncoder *tok_encoder_new(const Tokenizer *t);
size_t tok_encoder_encode(TokEncoder *e, const char *text, size_t len, int allow_special, uint32_t **ids_out);
void tok_encoder_free(TokEncoder *e);
// The pre-tokenisation rule: the end of the chunk that starts at pos (< len).
// Chunks partition the text; BPE merges never cross them.
size_t tok_chunk_end(const char *text, size_t len, size_t pos);

// ---- decoding ------------------------------------------------------------

// Concatenates the bytes of ids[0..n). Returns the byte count and sets
// *text_out to a malloc'ed, NUL-terminated buffer; TOK_ERROR for an id
// outside the vocabulary or when out of memory.
size_t tok_decode(const Tokenizer *t, const uint32_t *ids, size_t n, char **text_out);
// The bytes of one token (for streaming output of samples): a pointer into the
// tokenizer, not NUL-terminated, *len bytes long; NULL for an id out of range.
// A token may end inside a UTF-8 character; print the bytes as they come.
const char *tok_token_bytes(const Tokenizer *t, uint32_t id, size_t *len);

// ---- queries -------------------------------------------------------------

int tok_vocab_size(const Tokenizer *t);          // V: ids are 0..V-1
int tok_eot_id(const Tokenizer *t);              // -1 when the tokenizer has none
size_t tok_n_merges(const Tokenizer *t);
// The merge of rank r: (left, right) -> result. Returns -1 if r is out of range.
int tok_merge(const Tokenizer *t, size_t r, uint32_t *left, uint32_t *right, uint32_t *result);
size_t tok_n_special(const Tokenizer *t);
uint32_t tok_special_id(const Tokenizer *t, size_t i);  // i-th special in id order
int tok_is_special(const Tokenizer *t, uint32_t id);
uint32_t tok_byte_id(const Tokenizer *t, unsigned char byte);  // id of a one-byte token
void tok_free(Tokenizer *t);

#endif
