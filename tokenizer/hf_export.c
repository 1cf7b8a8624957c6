// Export of a tokenizer as a Hugging Face tokenizer.json + tokenizer_config.json
// (the reverse of hf_import.c; docs/hf.md). The BPE model is written as is:
// vocabulary strings in GPT-2's byte-level alphabet, merges in rank order,
// special tokens as added tokens. The pre-tokenisation rule of this project
// (docs/tokenizer.md) differs from GPT-2's regex on non-ASCII text, so it is
// written as a Split with the same rule over Unicode characters, followed by
// a ByteLevel step that only maps bytes to the alphabet: a multi-byte
// character is all bytes >= 0x80, i.e. all "letter" bytes here, so classifying
// characters gives the same chunks as classifying bytes.
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L  // open_memstream
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe.h"
#include "bpe_internal.h"
#include "tok_json.h"

// The chunking rule of pretok.c as a regular expression over characters: L
// is ASCII letters and every non-ASCII character, N the digits, whitespace
// exactly space \t \n \v \f \r, punctuation every other ASCII character.
#define TOK_WS "\\t\\n\\x0B\\f\\r "
#define TOK_L "A-Za-z\\x{80}-\\x{10FFFF}"
static const char tok_split_regex[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?[" TOK_L "]+| ?[0-9]+| ?[^" TOK_WS TOK_L "0-9]+"
    "|[" TOK_WS "]+(?![^" TOK_WS "])|[" TOK_WS "]+";

// Writes bytes as a JSON string in the byte-level alphabet: printable bytes
// ('!'..'~', 0xA1..0xAC, 0xAE..0xFF) stand for themselves, the other 68 map in
// byte order to U+0100 onwards.
static void put_byte_level(FILE *f, const unsigned char *s, size_t n) {
    static int cp_of[256];
    if (!cp_of['!']) {
        int next = 256;
        for (int b = 0; b < 256; b++) {
            int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
            cp_of[b] = printable ? b : next++;
        }
    }
    char buf[2 * 64];
    size_t k = 0;
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        int cp = cp_of[s[i]];
        if (cp == '"' || cp == '\\') buf[k++] = '\\';
        if (cp < 0x80) {
            buf[k++] = (char)cp;
        } else {  // every code point of the alphabet is below U+0800: two bytes
            buf[k++] = (char)(0xC0 | cp >> 6);
            buf[k++] = (char)(0x80 | (cp & 0x3F));
        }
        if (k + 4 > sizeof buf) {
            fwrite(buf, 1, k, f);
            k = 0;
        }
    }
    fwrite(buf, 1, k, f);
    fputc('"', f);
}

static void put_token(FILE *f, const Tokenizer *t, uint32_t id) {
    size_t len;
    const char *b = tok_token_bytes(t, id, &len);
    put_byte_level(f, (const unsigned char *)b, len);
}

// tokenizer.json into f. -1 (message in err) when a special token is not UTF-8.
static int write_tokenizer_json(FILE *f, const Tokenizer *t, char *err, size_t errlen) {
    fputs("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n  \"added_tokens\": [", f);
    for (size_t i = 0; i < tok_n_special(t); i++) {
        uint32_t id = tok_special_id(t, i);
        size_t len;
        const char *b = tok_token_bytes(t, id, &len);
        fprintf(f, "%s\n    {\"id\": %u, \"content\": ", i ? "," : "", id);
        if (tok_json_put_string(f, b, len) != 0)
            return tok_fail(err, errlen, "special token %u is not valid UTF-8: a tokenizer.json cannot hold it", id);
        fputs(", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, "
              "\"special\": true}", f);
    }
    fputs("\n  ],\n  \"normalizer\": null,\n  \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [\n"
          "    {\"type\": \"Split\", \"pattern\": {\"Regex\": ", f);
    tok_json_put_string(f, tok_split_regex, strlen(tok_split_regex));
    fputs("}, \"behavior\": \"Isolated\", \"invert\": false},\n"
          "    {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": false, \"use_regex\": false}\n"
          "  ]},\n  \"post_processor\": null,\n"
          "  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": false, "
          "\"use_regex\": false},\n"
          "  \"model\": {\n    \"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, \"continuing_subword_prefix\": "
          "null, \"end_of_word_suffix\": null,\n    \"fuse_unk\": false, \"byte_fallback\": false, \"ignore_merges\": "
          "false,\n    \"vocab\": {", f);
    int first = 1;
    for (uint32_t id = 0; id < (uint32_t)tok_vocab_size(t); id++) {
        size_t len;
        // Specials are added tokens; an id no token uses stays out.
        if (tok_is_special(t, id) || !tok_token_bytes(t, id, &len) || len == 0) continue;
        fprintf(f, "%s\n      ", first ? "" : ",");
        put_token(f, t, id);
        fprintf(f, ": %u", id);
        first = 0;
    }
    fputs("\n    },\n    \"merges\": [", f);
    for (size_t r = 0; r < tok_n_merges(t); r++) {
        uint32_t a, b, c;
        tok_merge(t, r, &a, &b, &c);
        fprintf(f, "%s\n      [", r ? "," : "");
        put_token(f, t, a);
        fputs(", ", f);
        put_token(f, t, b);
        fputc(']', f);
    }
    fputs("\n    ]\n  }\n}\n", f);
    return 0;
}

// Builds a document with fn into a memory buffer and writes it to dir/name.
static int write_doc(const char *dir, const char *name, int (*fn)(FILE *, const Tokenizer *, int, char *, size_t),
                     const Tokenizer *t, int arg, char *err, size_t errlen) {
    char *text = NULL, path[4096];
    size_t len = 0;
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
        return tok_fail(err, errlen, "%s: path too long", dir);
    FILE *m = open_memstream(&text, &len);
    if (!m) return tok_fail(err, errlen, "%s: out of memory", path);
    char why[512] = "";
    int rc = fn(m, t, arg, why, sizeof why);
    fclose(m);
    if (rc != 0) tok_fail(err, errlen, "%s: %s", path, why);
    else rc = tok_json_write_file(path, text, len, err, errlen);
    free(text);
    return rc;
}

static int tokenizer_json(FILE *f, const Tokenizer *t, int unused, char *err, size_t errlen) {
    (void)unused;
    return write_tokenizer_json(f, t, err, errlen);
}

// tokenizer_config.json: the fast tokenizer class (tokenizer.json is the
// whole definition), the end-of-text token as eos, no BOS, no clean-up of
// spaces (decoding must give the bytes back).
static int tokenizer_config(FILE *f, const Tokenizer *t, int model_max_length, char *err, size_t errlen) {
    (void)err;
    (void)errlen;
    fprintf(f, "{\n  \"tokenizer_class\": \"PreTrainedTokenizerFast\",\n  \"model_max_length\": %d,\n"
               "  \"clean_up_tokenization_spaces\": false,\n  \"bos_token\": null,\n  \"eos_token\": ",
            model_max_length);
    size_t len;
    const char *eot = tok_eot_id(t) >= 0 ? tok_token_bytes(t, (uint32_t)tok_eot_id(t), &len) : NULL;
    if (eot) tok_json_put_string(f, eot, len);  // a special: checked to be UTF-8 by tokenizer.json already
    else fputs("null", f);
    fputs(",\n  \"unk_token\": null,\n  \"pad_token\": null\n}\n", f);
    return 0;
}

int tok_export_hf(const Tokenizer *t, const char *dir, int model_max_length, char *err, size_t errlen) {
    if (write_doc(dir, "tokenizer.json", tokenizer_json, t, 0, err, errlen) != 0) return -1;
    return write_doc(dir, "tokenizer_config.json", tokenizer_config, t, model_max_length, err, errlen);
}
