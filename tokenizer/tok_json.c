// A minimal recursive-descent JSON parser for tokenizer.json files (see
// tok_json.h). Strict: rejects trailing commas, comments, leading zeros,
// unescaped control characters, lone surrogates and trailing garbage.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe_internal.h"
#include "tok_json.h"

#define MAX_DEPTH 256  // deeper nesting is rejected rather than risking the stack

typedef struct {
    const char *s;
    size_t len, pos;
    char *err;
    size_t errlen;
    int failed;
} Parser;

static void fail(Parser *p, const char *what) {
    if (p->failed) return;  // keep the first, most precise message
    p->failed = 1;
    size_t line = 1, col = 1;
    for (size_t i = 0; i < p->pos && i < p->len; i++) {
        if (p->s[i] == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    if (p->err && p->errlen) snprintf(p->err, p->errlen, "line %zu, column %zu: %s", line, col, what);
}

static void skip_ws(Parser *p) {
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int peek(Parser *p) { return p->pos < p->len ? (unsigned char)p->s[p->pos] : -1; }

static int parse_value(Parser *p, TokJson *out, int depth);

static void free_members(TokJson *v) {
    if (!v) return;
    free(v->str);
    for (size_t i = 0; (v->type == TOK_JSON_ARRAY || v->type == TOK_JSON_OBJECT) && i < v->len; i++) {
        free_members(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->key_lens);
    memset(v, 0, sizeof *v);
}

void tok_json_free(TokJson *v) {
    free_members(v);
    free(v);
}

// ---- strings -------------------------------------------------------------

typedef struct {
    char *b;
    size_t n, cap;
} Buf;

static int buf_put(Buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 32;
        while (cap < b->n + n + 1) cap *= 2;
        char *q = realloc(b->b, cap);
        if (!q) return -1;
        b->b = q;
        b->cap = cap;
    }
    memcpy(b->b + b->n, s, n);
    b->n += n;
    b->b[b->n] = 0;
    return 0;
}

static int put_utf8(Buf *b, uint32_t cp) {
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | cp >> 6);
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | cp >> 12);
        u[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | cp >> 18);
        u[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        u[2] = (char)(0x80 | (cp >> 6 & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return buf_put(b, u, n);
}

// Reads the 4 hex digits of a \u escape (p->pos at the first digit).
static int hex4(Parser *p, uint32_t *v) {
    if (p->len - p->pos < 4) {
        fail(p, "truncated \\u escape");
        return -1;
    }
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos++];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) {
            p->pos--;
            fail(p, "bad hex digit in \\u escape");
            return -1;
        }
        *v = *v << 4 | (uint32_t)d;
    }
    return 0;
}

// After "\u": one code point, joining a surrogate pair written as two escapes.
static int unicode_escape(Parser *p, Buf *b) {
    uint32_t cp;
    if (hex4(p, &cp) != 0) return -1;
    if (cp >= 0xDC00 && cp <= 0xDFFF) {
        fail(p, "lone low surrogate in \\u escape");
        return -1;
    }
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        uint32_t lo;
        if (p->len - p->pos < 2 || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
            fail(p, "high surrogate not followed by a \\u low surrogate");
            return -1;
        }
        p->pos += 2;
        if (hex4(p, &lo) != 0) return -1;
        if (lo < 0xDC00 || lo > 0xDFFF) {
            fail(p, "high surrogate followed by a non-low-surrogate");
            return -1;
        }
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    }
    if (put_utf8(b, cp) != 0) {
        fail(p, "out of memory");
        return -1;
    }
    return 0;
}

// p->pos at the opening quote. Sets *out (malloc'ed, NUL-terminated) and *n.
static int parse_string(Parser *p, char **out, size_t *n) {
    Buf b = {NULL, 0, 0};
    p->pos++;
    if (buf_put(&b, "", 0) != 0) goto oom;
    for (;;) {
        // Copy the run of plain characters in one go.
        size_t start = p->pos;
        while (p->pos < p->len && p->s[p->pos] != '"' && p->s[p->pos] != '\\' &&
               (unsigned char)p->s[p->pos] >= 0x20)
            p->pos++;
        if (buf_put(&b, p->s + start, p->pos - start) != 0) goto oom;
        if (p->pos >= p->len) {
            fail(p, "unterminated string");
            goto bad;
        }
        char c = p->s[p->pos];
        if (c == '"') {
            p->pos++;
            *out = b.b;
            *n = b.n;
            return 0;
        }
        if (c != '\\') {
            fail(p, "control character inside a string (must be escaped)");
            goto bad;
        }
        if (++p->pos >= p->len) {
            fail(p, "unterminated escape");
            goto bad;
        }
        char e = p->s[p->pos++];
        const char *simple = NULL;
        switch (e) {
        case '"': simple = "\""; break;
        case '\\': simple = "\\"; break;
        case '/': simple = "/"; break;
        case 'b': simple = "\b"; break;
        case 'f': simple = "\f"; break;
        case 'n': simple = "\n"; break;
        case 'r': simple = "\r"; break;
        case 't': simple = "\t"; break;
        case 'u':
            if (unicode_escape(p, &b) != 0) goto bad;
            continue;
        default:
            p->pos--;
            fail(p, "unknown escape in string");
            goto bad;
        }
        if (buf_put(&b, simple, 1) != 0) goto oom;
    }
oom:
    fail(p, "out of memory");
bad:
    free(b.b);
    return -1;
}

// ---- numbers, literals, containers ---------------------------------------

static int parse_number(Parser *p, TokJson *out) {
    size_t start = p->pos;
    const char *s = p->s;
    if (peek(p) == '-') p->pos++;
    if (peek(p) == '0') {
        p->pos++;
    } else if (peek(p) >= '1' && peek(p) <= '9') {
        while (peek(p) >= '0' && peek(p) <= '9') p->pos++;
    } else {
        fail(p, "bad number");
        return -1;
    }
    if (peek(p) == '.') {
        p->pos++;
        if (!(peek(p) >= '0' && peek(p) <= '9')) {
            fail(p, "bad number: digit expected after '.'");
            return -1;
        }
        while (peek(p) >= '0' && peek(p) <= '9') p->pos++;
    }
    if (peek(p) == 'e' || peek(p) == 'E') {
        p->pos++;
        if (peek(p) == '+' || peek(p) == '-') p->pos++;
        if (!(peek(p) >= '0' && peek(p) <= '9')) {
            fail(p, "bad number: digit expected in exponent");
            return -1;
        }
        while (peek(p) >= '0' && peek(p) <= '9') p->pos++;
    }
    char tmp[64];  // a copy, because the text is not NUL-terminated after the number
    size_t n = p->pos - start;
    if (n >= sizeof tmp) {
        fail(p, "number too long");
        return -1;
    }
    memcpy(tmp, s + start, n);
    tmp[n] = 0;
    out->type = TOK_JSON_NUMBER;
    out->num = strtod(tmp, NULL);
    return 0;
}

static int parse_literal(Parser *p, TokJson *out) {
    static const struct { const char *word; TokJsonType type; } lits[] = {
        {"true", TOK_JSON_TRUE}, {"false", TOK_JSON_FALSE}, {"null", TOK_JSON_NULL}};
    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(lits[i].word);
        if (p->len - p->pos >= n && memcmp(p->s + p->pos, lits[i].word, n) == 0) {
            p->pos += n;
            out->type = lits[i].type;
            return 0;
        }
    }
    fail(p, "unexpected character (expected a value)");
    return -1;
}

// Grows the item (and, for objects, key) arrays of v to hold one more.
static int reserve_item(TokJson *v, size_t *cap) {
    if (v->len < *cap) return 0;
    size_t c = *cap ? *cap * 2 : 8;
    TokJson *items = realloc(v->items, c * sizeof *items);
    if (!items) return -1;
    v->items = items;
    if (v->type == TOK_JSON_OBJECT) {
        char **keys = realloc(v->keys, c * sizeof *keys);
        if (!keys) return -1;
        v->keys = keys;
        size_t *kl = realloc(v->key_lens, c * sizeof *kl);
        if (!kl) return -1;
        v->key_lens = kl;
    }
    *cap = c;
    return 0;
}

// Arrays and objects share the loop: '[' value (',' value)* ']' and
// '{' string ':' value (',' ...)* '}'.
static int parse_container(Parser *p, TokJson *out, int depth) {
    int is_obj = p->s[p->pos] == '{';
    char close = is_obj ? '}' : ']';
    out->type = is_obj ? TOK_JSON_OBJECT : TOK_JSON_ARRAY;
    size_t cap = 0;
    p->pos++;
    skip_ws(p);
    if (peek(p) == close) {
        p->pos++;
        return 0;
    }
    for (;;) {
        if (reserve_item(out, &cap) != 0) {
            fail(p, "out of memory");
            return -1;
        }
        TokJson *item = &out->items[out->len];
        memset(item, 0, sizeof *item);
        if (is_obj) {
            skip_ws(p);
            if (peek(p) != '"') {
                fail(p, "expected a member name in quotes");
                return -1;
            }
            if (parse_string(p, &out->keys[out->len], &out->key_lens[out->len]) != 0) return -1;
            skip_ws(p);
            if (peek(p) != ':') {
                free(out->keys[out->len]);
                fail(p, "expected ':' after a member name");
                return -1;
            }
            p->pos++;
        }
        if (parse_value(p, item, depth + 1) != 0) {
            if (is_obj) free(out->keys[out->len]);
            free_members(item);
            return -1;
        }
        out->len++;
        skip_ws(p);
        int c = peek(p);
        p->pos++;
        if (c == close) return 0;
        if (c != ',') {
            p->pos--;
            fail(p, is_obj ? "expected ',' or '}' in object" : "expected ',' or ']' in array");
            return -1;
        }
    }
}

static int parse_value(Parser *p, TokJson *out, int depth) {
    if (depth > MAX_DEPTH) {
        fail(p, "nesting too deep");
        return -1;
    }
    skip_ws(p);
    int c = peek(p);
    if (c < 0) {
        fail(p, "unexpected end of input");
        return -1;
    }
    if (c == '{' || c == '[') return parse_container(p, out, depth);
    if (c == '"') {
        out->type = TOK_JSON_STRING;
        return parse_string(p, &out->str, &out->len);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(p, out);
    return parse_literal(p, out);
}

TokJson *tok_json_parse(const char *text, size_t len, char *err, size_t errlen) {
    Parser p = {text, len, 0, err, errlen, 0};
    TokJson *root = calloc(1, sizeof *root);
    if (!root) {
        if (err && errlen) snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (parse_value(&p, root, 0) == 0) {
        skip_ws(&p);
        if (p.pos == p.len) return root;
        fail(&p, "unexpected text after the JSON value");
    }
    tok_json_free(root);
    return NULL;
}

TokJson *tok_json_parse_file(const char *path, char *err, size_t errlen) {
    size_t len;
    char *text = tok_read_file(path, &len, err, errlen);
    if (!text) return NULL;
    char jerr[200];
    TokJson *root = tok_json_parse(text, len, jerr, sizeof jerr);
    free(text);
    if (!root) tok_fail(err, errlen, "%s: invalid JSON: %s", path, jerr);
    return root;
}

// ---- writing -------------------------------------------------------------

// Length of the UTF-8 character at s[0..n), 0 if it is not one (a bad lead or
// continuation byte, a truncated, overlong or surrogate form, or > U+10FFFF).
static size_t utf8_char_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t k = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (k == 0 || k > n) return 0;
    uint32_t cp = k == 1 ? c : c & (0x7F >> k);
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[k] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k;
}

int tok_json_put_string(FILE *f, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0, k; i < n; i += k)
        if ((k = utf8_char_len(u + i, n - i)) == 0) return -1;
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        if (u[i] == '"' || u[i] == '\\') fprintf(f, "\\%c", u[i]);
        else if (u[i] == '\n') fputs("\\n", f);
        else if (u[i] < 0x20) fprintf(f, "\\u%04x", u[i]);
        else fputc(u[i], f);
    }
    fputc('"', f);
    return 0;
}

int tok_json_write_file(const char *path, const char *text, size_t len, char *err, size_t errlen) {
    char jerr[200];
    TokJson *check = tok_json_parse(text, len, jerr, sizeof jerr);
    if (!check) return tok_fail(err, errlen, "%s: internal error: the text to write is not JSON: %s", path, jerr);
    tok_json_free(check);
    return tok_write_file_atomic(path, text, len, err, errlen);
}

const TokJson *tok_json_get(const TokJson *obj, const char *key) {
    if (!obj || obj->type != TOK_JSON_OBJECT) return NULL;
    size_t n = strlen(key);
    for (size_t i = 0; i < obj->len; i++)
        if (obj->key_lens[i] == n && memcmp(obj->keys[i], key, n) == 0) return &obj->items[i];
    return NULL;
}

const char *tok_json_type_name(TokJsonType t) {
    static const char *names[] = {"null", "false", "true", "number", "string", "array", "object"};
    return (unsigned)t < 7 ? names[t] : "?";
}
