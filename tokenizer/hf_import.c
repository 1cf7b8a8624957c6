// Import of a Hugging Face tokenizer.json holding a byte-level BPE (GPT-2,
// DeepSeek and many others ship one). What is read:
//   model.type "BPE", model.vocab {token: id}, model.merges ["a b", ...] or
//   [["a", "b"], ...] in rank order, added_tokens [{id, content, special}].
// Vocabulary strings are written in GPT-2's bytes_to_unicode alphabet (every
// byte is one printable character: printable bytes stand for themselves, the
// other 68 map to U+0100.. in byte order); they are converted back to bytes.
// Token ids are kept, so ids match the original tokenizer. Options that change
// the BPE model itself (dropout, subword prefixes, byte fallback, ignore_merges,
// normalizers, prefix spaces) are rejected with a message naming them.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe_internal.h"
#include "tok_json.h"

#define MAX_IMPORT_ID (1u << 30)
#define N_ALPHABET 324  // code points U+0000..U+0143 cover the byte-level alphabet

// cp_to_byte[cp]: the byte that code point cp stands for, -1 if none.
static void byte_level_alphabet(int cp_to_byte[N_ALPHABET]) {
    for (int i = 0; i < N_ALPHABET; i++) cp_to_byte[i] = -1;
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        cp_to_byte[printable ? b : 256 + extra++] = b;
    }
}

// Decodes one UTF-8 code point from s[*i..n) and advances *i; -1 on invalid
// UTF-8 (bad lead or continuation byte, truncation, overlong form).
static long utf8_next(const unsigned char *s, size_t n, size_t *i) {
    static const long min_cp[4] = {0, 0x80, 0x800, 0x10000};  // smallest code point per length
    unsigned char c = s[*i];
    int extra;
    long cp;
    if (c < 0x80) {
        extra = 0;
        cp = c;
    } else if ((c & 0xE0) == 0xC0) {
        extra = 1;
        cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
        extra = 2;
        cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
        extra = 3;
        cp = c & 0x07;
    } else {
        return -1;
    }
    if ((size_t)extra >= n - *i) return -1;
    for (int k = 1; k <= extra; k++) {
        unsigned char d = s[*i + (size_t)k];
        if ((d & 0xC0) != 0x80) return -1;
        cp = cp << 6 | (d & 0x3F);
    }
    if (cp < min_cp[extra]) return -1;
    *i += (size_t)extra + 1;
    return cp;
}

// Converts a vocabulary string to raw bytes (at most as many as it has).
// Returns the byte count, or -1 if it holds a character outside the alphabet.
static long byte_level_decode(const int cp_to_byte[N_ALPHABET], const char *str, size_t len, unsigned char *out) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, o = 0;
    while (i < len) {
        long cp = utf8_next(s, len, &i);
        if (cp < 0 || cp >= N_ALPHABET || cp_to_byte[cp] < 0) return -1;
        out[o++] = (unsigned char)cp_to_byte[cp];
    }
    return (long)o;
}

// ---- checks on the parts of the file that are not the vocabulary ---------

static int absent_or_null(const TokJson *v) { return !v || v->type == TOK_JSON_NULL; }

static int is_string(const TokJson *v, const char *s) {
    return v && v->type == TOK_JSON_STRING && v->len == strlen(s) && memcmp(v->str, s, v->len) == 0;
}

static const char *type_of(const TokJson *obj) {
    const TokJson *t = tok_json_get(obj, "type");
    return t && t->type == TOK_JSON_STRING ? t->str : "(no type)";
}

static int check_model(const TokJson *model, const char *path, char *err, size_t errlen) {
    if (!model || model->type != TOK_JSON_OBJECT)
        return tok_fail(err, errlen, "%s: no \"model\" object", path);
    if (!is_string(tok_json_get(model, "type"), "BPE"))
        return tok_fail(err, errlen, "%s: unsupported tokenizer: model.type is %s, only \"BPE\" is supported",
                        path, type_of(model));
    if (!absent_or_null(tok_json_get(model, "dropout")))
        return tok_fail(err, errlen, "%s: unsupported tokenizer: BPE dropout is set", path);
    const char *affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const TokJson *a = tok_json_get(model, affixes[i]);
        if (!absent_or_null(a) && !is_string(a, ""))
            return tok_fail(err, errlen, "%s: unsupported tokenizer: model.%s is set", path, affixes[i]);
    }
    const char *flags[] = {"byte_fallback", "ignore_merges"};
    for (int i = 0; i < 2; i++) {
        const TokJson *f = tok_json_get(model, flags[i]);
        if (f && f->type == TOK_JSON_TRUE)
            return tok_fail(err, errlen, "%s: unsupported tokenizer: model.%s is true", path, flags[i]);
    }
    return 0;
}

// A ByteLevel pre-tokenizer (alone or inside a Sequence) is required; it must
// not add a prefix space. *differs: the splitting is not exactly GPT-2's regex.
static int check_pre_tokenizer(const TokJson *pre, const char *path, int *differs, char *err, size_t errlen) {
    const TokJson *bl = NULL;
    *differs = 1;
    if (pre && is_string(tok_json_get(pre, "type"), "ByteLevel")) {
        bl = pre;
        const TokJson *re = tok_json_get(pre, "use_regex");
        *differs = re && re->type == TOK_JSON_FALSE;
    } else if (pre && is_string(tok_json_get(pre, "type"), "Sequence")) {
        const TokJson *seq = tok_json_get(pre, "pretokenizers");
        for (size_t i = 0; seq && seq->type == TOK_JSON_ARRAY && i < seq->len; i++)
            if (is_string(tok_json_get(&seq->items[i], "type"), "ByteLevel")) bl = &seq->items[i];
    }
    if (!bl)
        return tok_fail(err, errlen, "%s: unsupported tokenizer: pre_tokenizer %s is not byte-level",
                        path, pre ? type_of(pre) : "(none)");
    const TokJson *aps = tok_json_get(bl, "add_prefix_space");
    if (aps && aps->type == TOK_JSON_TRUE)
        return tok_fail(err, errlen, "%s: unsupported tokenizer: ByteLevel add_prefix_space is true", path);
    return 0;
}

static int check_supported(const TokJson *root, const char *path, int *differs, char *err, size_t errlen) {
    if (root->type != TOK_JSON_OBJECT) return tok_fail(err, errlen, "%s: the top level is not a JSON object", path);
    if (check_model(tok_json_get(root, "model"), path, err, errlen) != 0) return -1;
    const TokJson *norm = tok_json_get(root, "normalizer");
    if (!absent_or_null(norm)) {
        const TokJson *list = tok_json_get(norm, "normalizers");
        if (!(is_string(tok_json_get(norm, "type"), "Sequence") && list && list->type == TOK_JSON_ARRAY && list->len == 0))
            return tok_fail(err, errlen, "%s: unsupported tokenizer: normalizer %s", path, type_of(norm));
    }
    const TokJson *pre = tok_json_get(root, "pre_tokenizer");
    if (check_pre_tokenizer(absent_or_null(pre) ? NULL : pre, path, differs, err, errlen) != 0) return -1;
    const TokJson *dec = tok_json_get(root, "decoder");
    if (!absent_or_null(dec) && !is_string(tok_json_get(dec, "type"), "ByteLevel"))
        return tok_fail(err, errlen, "%s: unsupported tokenizer: decoder %s is not ByteLevel", path, type_of(dec));
    return 0;
}

// ---- the vocabulary ------------------------------------------------------

// The token table being assembled, in the shape tok_build takes.
typedef struct {
    uint32_t V;
    uint64_t *off;        // [V]
    uint32_t *len;        // [V]
    uint8_t *special;     // [V]
    uint8_t *from_vocab;  // [V] 1: defined by model.vocab
    const TokJson **added_at;  // [V] the added_tokens entry with that id, or NULL
    unsigned char *bytes; // all token bytes
    size_t n_bytes, cap_bytes;
} Table;

static int json_id(const TokJson *v, uint32_t *id) {
    if (!v || v->type != TOK_JSON_NUMBER || v->num < 0 || v->num >= MAX_IMPORT_ID || v->num != (double)(uint32_t)v->num)
        return -1;
    *id = (uint32_t)v->num;
    return 0;
}

// V = 1 + the largest id in model.vocab and added_tokens.
static int count_ids(const TokJson *vocab, const TokJson *added, const char *path, uint32_t *V, char *err, size_t errlen) {
    uint32_t max = 0, id;
    for (size_t i = 0; i < vocab->len; i++) {
        if (json_id(&vocab->items[i], &id) != 0)
            return tok_fail(err, errlen, "%s: model.vocab[\"%s\"] is not an integer id in [0, 2^30)", path, vocab->keys[i]);
        if (id > max) max = id;
    }
    for (size_t i = 0; added && i < added->len; i++) {
        if (json_id(tok_json_get(&added->items[i], "id"), &id) != 0)
            return tok_fail(err, errlen, "%s: added_tokens[%zu].id is not an integer id in [0, 2^30)", path, i);
        if (id > max) max = id;
    }
    *V = max + 1;
    return 0;
}

static int table_put(Table *t, uint32_t id, const unsigned char *s, size_t n) {
    if (t->n_bytes + n > t->cap_bytes) {
        size_t cap = t->cap_bytes ? t->cap_bytes : 4096;
        while (cap < t->n_bytes + n) cap *= 2;
        unsigned char *b = realloc(t->bytes, cap);
        if (!b) return -1;
        t->bytes = b;
        t->cap_bytes = cap;
    }
    memcpy(t->bytes + t->n_bytes, s, n);
    t->off[id] = t->n_bytes;
    t->len[id] = (uint32_t)n;
    t->n_bytes += n;
    return 0;
}

// Indexes added_tokens by id and checks each has an id and a content string.
static int index_added(Table *t, const TokJson *added, const char *path, char *err, size_t errlen) {
    for (size_t i = 0; added && i < added->len; i++) {
        const TokJson *a = &added->items[i];
        const TokJson *content = tok_json_get(a, "content");
        uint32_t id = 0;
        if (json_id(tok_json_get(a, "id"), &id) != 0) return tok_fail(err, errlen, "%s: added_tokens[%zu]: bad id", path, i);
        if (!content || content->type != TOK_JSON_STRING || content->len == 0)
            return tok_fail(err, errlen, "%s: added_tokens[%zu] has no content string", path, i);
        if (t->added_at[id]) return tok_fail(err, errlen, "%s: added_tokens uses id %u twice", path, id);
        t->added_at[id] = a;
    }
    return 0;
}

// True when vocab string key is, verbatim, the content of the added token
// with the same id (DeepSeek lists its specials, such as <｜end▁of▁sentence｜>,
// in model.vocab in plain UTF-8 rather than in the byte-level alphabet).
static int is_added_verbatim(const Table *t, uint32_t id, const char *key, size_t klen) {
    const TokJson *content = t->added_at[id] ? tok_json_get(t->added_at[id], "content") : NULL;
    return content && content->len == klen && memcmp(content->str, key, klen) == 0;
}

// Fills the table from model.vocab; names maps each vocab string (as written
// in the file) to its id, for resolving the merges.
static int read_vocab(Table *t, const TokJson *vocab, TokByteMap *names, const char *path, char *err, size_t errlen) {
    int cp_to_byte[N_ALPHABET];
    byte_level_alphabet(cp_to_byte);
    for (size_t i = 0; i < vocab->len; i++) {
        const char *key = vocab->keys[i];
        size_t klen = vocab->key_lens[i];
        uint32_t id = 0;
        if (json_id(&vocab->items[i], &id) != 0) return tok_fail(err, errlen, "%s: bad id for \"%s\"", path, key);
        if (klen == 0) return tok_fail(err, errlen, "%s: model.vocab has an empty token (id %u)", path, id);
        if (t->from_vocab[id]) return tok_fail(err, errlen, "%s: model.vocab uses id %u twice", path, id);
        unsigned char *raw = malloc(klen);  // decoding never lengthens a string
        if (!raw) return tok_fail(err, errlen, "%s: out of memory", path);
        long n = byte_level_decode(cp_to_byte, key, klen, raw);
        int rc = 0;
        if (n < 0 && is_added_verbatim(t, id, key, klen)) {
            rc = table_put(t, id, (const unsigned char *)key, klen);
            if (rc != 0) rc = tok_fail(err, errlen, "%s: out of memory", path);
            t->special[id] = 1;
        } else if (n < 0)
            rc = tok_fail(err, errlen, "%s: unsupported tokenizer: token \"%s\" (id %u) has a character outside "
                          "the byte-level alphabet (not a byte-level BPE)", path, key, id);
        else if (table_put(t, id, raw, (size_t)n) != 0)
            rc = tok_fail(err, errlen, "%s: out of memory", path);
        free(raw);
        if (rc != 0) return rc;
        t->from_vocab[id] = 1;
        int created;
        uint64_t *v = tok_bytemap_insert(names, key, klen, tok_hash_bytes(key, klen), &created);
        if (!v) return tok_fail(err, errlen, "%s: out of memory", path);
        if (!created) return tok_fail(err, errlen, "%s: model.vocab lists \"%s\" twice", path, key);
        *v = id;
    }
    return 0;
}

// added_tokens: an entry whose id model.vocab also defines must have the same
// bytes; it becomes special when marked "special". An id only added_tokens
// defines is always special here (it can only come from matching its string).
static int read_added(Table *t, const TokJson *added, const char *path, char *err, size_t errlen) {
    for (size_t i = 0; added && i < added->len; i++) {
        const TokJson *a = &added->items[i];
        const TokJson *content = tok_json_get(a, "content");
        const TokJson *special = tok_json_get(a, "special");
        uint32_t id = 0;
        json_id(tok_json_get(a, "id"), &id);  // checked by index_added
        if (t->from_vocab[id]) {
            if (t->len[id] != content->len || memcmp(t->bytes + t->off[id], content->str, content->len) != 0)
                return tok_fail(err, errlen, "%s: added token \"%s\" has id %u, which model.vocab gives to another string",
                                path, content->str, id);
            if (special && special->type == TOK_JSON_TRUE) t->special[id] = 1;
            continue;
        }
        if (table_put(t, id, (const unsigned char *)content->str, content->len) != 0)
            return tok_fail(err, errlen, "%s: out of memory", path);
        t->special[id] = 1;
    }
    return 0;
}

// One merge, "a b" or ["a", "b"], resolved to ids through the vocab names.
static int read_merge(const TokJson *m, size_t r, const TokByteMap *names, uint32_t out[2],
                      const char *path, char *err, size_t errlen) {
    const char *part[2];
    size_t plen[2];
    if (m->type == TOK_JSON_STRING) {
        const char *sp = memchr(m->str, ' ', m->len);
        // Byte-level tokens never contain a raw space (it is written U+0120), so exactly one space separates the two.
        if (!sp || memchr(sp + 1, ' ', m->len - (size_t)(sp + 1 - m->str)))
            return tok_fail(err, errlen, "%s: merge %zu \"%s\" is not two tokens separated by one space", path, r, m->str);
        part[0] = m->str;
        plen[0] = (size_t)(sp - m->str);
        part[1] = sp + 1;
        plen[1] = m->len - plen[0] - 1;
    } else if (m->type == TOK_JSON_ARRAY && m->len == 2 && m->items[0].type == TOK_JSON_STRING &&
               m->items[1].type == TOK_JSON_STRING) {
        for (int k = 0; k < 2; k++) {
            part[k] = m->items[k].str;
            plen[k] = m->items[k].len;
        }
    } else {
        return tok_fail(err, errlen, "%s: merge %zu is neither \"a b\" nor [\"a\", \"b\"]", path, r);
    }
    for (int k = 0; k < 2; k++) {
        const uint64_t *id = plen[k] ? tok_bytemap_find(names, part[k], plen[k], tok_hash_bytes(part[k], plen[k])) : NULL;
        if (!id)
            return tok_fail(err, errlen, "%s: merge %zu: token \"%.*s\" is not in model.vocab", path, r, (int)plen[k], part[k]);
        out[k] = (uint32_t)*id;
    }
    return 0;
}

static uint32_t find_special(const Table *t, const char *s) {
    size_t n = strlen(s);
    for (uint32_t id = 0; id < t->V; id++)
        if (t->special[id] && t->len[id] == n && memcmp(t->bytes + t->off[id], s, n) == 0) return id;
    return TOK_NO_ID;
}

// The end-of-text token: the one named, or the first default that exists.
static int choose_eot(const Table *t, const char *eot, const char *path, uint32_t *id, char *err, size_t errlen) {
    static const char *defaults[] = {
        "<|endoftext|>",
        "<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>",  // DeepSeek's, in UTF-8
        "</s>",
    };
    if (eot) {
        *id = find_special(t, eot);
        if (*id == TOK_NO_ID) return tok_fail(err, errlen, "%s: no special token \"%s\" to use as end-of-text", path, eot);
        return 0;
    }
    *id = TOK_NO_ID;
    for (size_t i = 0; i < sizeof defaults / sizeof defaults[0] && *id == TOK_NO_ID; i++) *id = find_special(t, defaults[i]);
    return 0;
}

static Tokenizer *import_tree(const TokJson *root, const char *path, const char *eot, int *differs,
                              char *err, size_t errlen) {
    if (check_supported(root, path, differs, err, errlen) != 0) return NULL;
    const TokJson *model = tok_json_get(root, "model");
    const TokJson *vocab = tok_json_get(model, "vocab");
    const TokJson *merges = tok_json_get(model, "merges");
    const TokJson *added = tok_json_get(root, "added_tokens");
    if (!vocab || vocab->type != TOK_JSON_OBJECT) {
        tok_fail(err, errlen, "%s: model.vocab is missing or not an object", path);
        return NULL;
    }
    if (!merges || merges->type != TOK_JSON_ARRAY) {
        tok_fail(err, errlen, "%s: model.merges is missing or not an array", path);
        return NULL;
    }
    if (absent_or_null(added)) added = NULL;
    else if (added->type != TOK_JSON_ARRAY) {
        tok_fail(err, errlen, "%s: added_tokens is not an array", path);
        return NULL;
    }
    Table t = {0};
    TokByteMap names = {0};
    uint32_t *pairs = NULL;  // [2 * merges] (left, right) in rank order
    Tokenizer *tok = NULL;
    if (count_ids(vocab, added, path, &t.V, err, errlen) != 0) return NULL;
    t.off = calloc(t.V, sizeof *t.off);
    t.len = calloc(t.V, sizeof *t.len);
    t.special = calloc(t.V, 1);
    t.from_vocab = calloc(t.V, 1);
    t.added_at = calloc(t.V, sizeof *t.added_at);
    pairs = malloc((merges->len ? 2 * merges->len : 1) * sizeof *pairs);
    if (!t.off || !t.len || !t.special || !t.from_vocab || !t.added_at || !pairs ||
        tok_bytemap_init(&names, vocab->len) != 0) {
        tok_fail(err, errlen, "%s: out of memory", path);
        goto done;
    }
    if (index_added(&t, added, path, err, errlen) != 0) goto done;
    if (read_vocab(&t, vocab, &names, path, err, errlen) != 0) goto done;
    if (read_added(&t, added, path, err, errlen) != 0) goto done;
    for (size_t r = 0; r < merges->len; r++)
        if (read_merge(&merges->items[r], r, &names, pairs + 2 * r, path, err, errlen) != 0) goto done;
    uint32_t eot_id;
    if (choose_eot(&t, eot, path, &eot_id, err, errlen) != 0) goto done;
    TokSpec spec = {t.V, t.off, t.len, t.bytes ? t.bytes : (const unsigned char *)"", t.special,
                    pairs, (uint32_t)merges->len, eot_id};
    tok = tok_build(&spec, path, err, errlen);
done:
    free(t.off);
    free(t.len);
    free(t.special);
    free(t.from_vocab);
    free(t.added_at);
    free(t.bytes);
    free(pairs);
    tok_bytemap_free(&names);
    return tok;
}

Tokenizer *tok_import_hf(const char *path, const char *eot, int *pretok_differs, char *err, size_t errlen) {
    TokJson *root = tok_json_parse_file(path, err, errlen);
    if (!root) return NULL;
    int differs = 1;
    Tokenizer *t = import_tree(root, path, eot, &differs, err, errlen);
    tok_json_free(root);
    if (t && pretok_differs) *pretok_differs = differs;
    return t;
}
