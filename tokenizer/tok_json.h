// A minimal JSON parser (RFC 8259), enough to read a Hugging Face
// tokenizer.json, config.json or safetensors header: objects, arrays, strings
// with every escape (\uXXXX and surrogate pairs included), numbers, true,
// false, null. The whole document becomes a tree of TokJson values. Also the
// one string writer the JSON files this project writes share.
#ifndef MOE_TOK_JSON_H
#define MOE_TOK_JSON_H

#include <stddef.h>
#include <stdio.h>

typedef enum { TOK_JSON_NULL, TOK_JSON_FALSE, TOK_JSON_TRUE, TOK_JSON_NUMBER,
               TOK_JSON_STRING, TOK_JSON_ARRAY, TOK_JSON_OBJECT } TokJsonType;

typedef struct TokJson TokJson;
struct TokJson {
    TokJsonType type;
    double num;        // NUMBER
    char *str;         // STRING: decoded UTF-8, NUL-terminated (may also contain NUL: use len)
    size_t len;        // STRING: bytes in str; ARRAY, OBJECT: number of items
    TokJson *items;    // ARRAY, OBJECT: [len] the elements / the member values
    char **keys;       // OBJECT: [len] member names, decoded, NUL-terminated
    size_t *key_lens;  // OBJECT: [len] byte length of each name
};

// Parses text[0..len). On error returns NULL and writes "line L, column C:
// what is wrong" into err. Nesting deeper than 256 levels is rejected.
TokJson *tok_json_parse(const char *text, size_t len, char *err, size_t errlen);
// Reads and parses a whole file. On error returns NULL and writes "PATH: what
// is wrong" (with line and column for bad JSON) into err.
TokJson *tok_json_parse_file(const char *path, char *err, size_t errlen);
void tok_json_free(TokJson *v);
// The value of member key in object obj (the first, if repeated), or NULL
// when obj is not an object or has no such member.
const TokJson *tok_json_get(const TokJson *obj, const char *key);
// Writes s[0..n) to f as a JSON string literal: quotes, and escapes for '"',
// '\\' and the control characters below 0x20. Returns 0, or -1 (nothing
// written) when s is not valid UTF-8, which JSON text cannot hold.
int tok_json_put_string(FILE *f, const char *s, size_t n);
// Writes a JSON document to path atomically (path.tmp.<pid>, fsync, rename),
// after checking that it parses. Returns 0, or -1 with a message naming path.
int tok_json_write_file(const char *path, const char *text, size_t len, char *err, size_t errlen);
// Short name of a type for messages ("string", "object", ...).
const char *tok_json_type_name(TokJsonType t);

#endif
