// Tests of the byte-level BPE tokenizer (tokenizer/). Each check prints one
// line with what it measured; the exit status is the number of failures
// (capped at 1), so any failure fails the build.
//
// Usage: test_tokenizer [path/to/tests/fixtures/hf_tiny/tokenizer.json]
//
// The expected values are hand-computed (the derivations are in the comments)
// or come from independent oracles written here: a naive O(n^2) BPE encoder,
// a separate bytes_to_unicode table, a bitwise CRC-32.
#define _POSIX_C_SOURCE 200809L

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "check.h"
#include "../tokenizer/bpe.h"
#include "../tokenizer/bpe_internal.h"  // tok_crc32, tok_read_file: checked against oracles below
#include "../tokenizer/tok_json.h"

static char g_tmpdir[256];  // scratch directory for files written by the tests


static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {  // xorshift64*: fixed seed, so every run tests the same strings
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1Dull;
}

static void tmp_path(char *out, size_t n, const char *name) { snprintf(out, n, "%s/%s", g_tmpdir, name); }

// Encodes s, compares with the expected ids, prints one line.
static void check_ids(const Tokenizer *t, const char *label, const char *s, size_t len, int allow_special,
                      const uint32_t *want, size_t n_want) {
    TokEncodeOptions o = {allow_special, 0, 0};
    uint32_t *ids;
    size_t n = tok_encode_ex(t, s, len, &o, &ids);
    int ok = n == n_want && memcmp(ids, want, n * sizeof *ids) == 0;
    char got[256] = "";
    for (size_t i = 0; i < n && strlen(got) < 200; i++)
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s%u", i ? " " : "", ids[i]);
    check(ok, "%s: encode -> [%s] (%zu ids, expected %zu)", label, got, n, n_want);
    free(ids);
}

// ---- pre-tokenisation ----------------------------------------------------

static void test_chunks(void) {
    // Expected splits, checked against GPT-2's regex with the byte classes of
    // pretok.c ("|" separates chunks; the inputs contain no "|").
    static const struct { const char *text, *split; } cases[] = {
        {"Hello world", "Hello| world"},
        {"  word", " | word"},               // the last space joins the word
        {"\n word", "\n| word"},
        {"\nword", "\n|word"},               // a single whitespace byte stands alone
        {"it's 42 cats!!", "it|'s| 42| cats|!!"},
        {"end   ", "end|   "},               // trailing whitespace stays together
        {"a\t,b", "a|\t|,|b"},
        {"caf\xc3\xa9 au", "caf\xc3\xa9| au"},  // UTF-8 bytes count as letters
        {"don't", "don|'t"},
        {".'s", ".'|s"},                     // a punctuation run swallows the apostrophe
        {"'re'll", "'re|'ll"},
        {"a  \n  b", "a|  \n | b"},
        {" ,x", " ,|x"},
        {"I'M", "I|'|M"},                    // contractions are lower case only
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const char *s = cases[c].text;
        size_t len = strlen(s);
        char got[128] = "";
        for (size_t i = 0, o = 0; i < len;) {
            size_t e = tok_chunk_end(s, len, i);
            if (i) got[o++] = '|';
            memcpy(got + o, s + i, e - i);
            o += e - i;
            got[o] = 0;
            i = e;
        }
        char q[128];
        tok_quote((const unsigned char *)s, len, q, sizeof q);
        check(strcmp(got, cases[c].split) == 0, "chunks of %s", q);
    }
    const char nul[] = {'x', 0, 'y'};
    size_t e1 = tok_chunk_end(nul, 3, 0), e2 = tok_chunk_end(nul, 3, 1);
    check(e1 == 1 && e2 == 2, "chunks of \"x\\0y\": ends %zu, %zu (expected 1, 2)", e1, e2);
}

// ---- merges applied in rank order ----------------------------------------

static void test_rank_order(void) {
    // Merges (rank: pair -> id): 0: b c -> 256, 1: a b -> 257, 2: a 256 -> 258
    // ("abc"), 3: c d -> 259, 4: a a -> 260.
    const uint32_t merges[] = {'b', 'c', 'a', 'b', 'a', 256, 'c', 'd', 'a', 'a'};
    const char *specials[] = {TOK_EOT_STRING};
    char err[256];
    Tokenizer *t = tok_create(merges, 5, specials, 1, err, sizeof err);
    check(t != NULL, "tok_create with 5 merges: %s", t ? "built" : err);
    if (!t) return;
    check(tok_vocab_size(t) == 262 && tok_eot_id(t) == 261, "vocab %d (expected 262), eot %d (expected 261)",
          tok_vocab_size(t), tok_eot_id(t));
    // "abc": (b,c) has rank 0 < rank 1 of (a,b), so bc forms first, then a+bc.
    // Left-to-right merging would give [ab, c] = [257, 99] instead.
    check_ids(t, "\"abc\" (rank order, not left to right)", "abc", 3, 0, (uint32_t[]){258}, 1);
    check_ids(t, "\"abcd\" (cd has rank 3, after bc)", "abcd", 4, 0, (uint32_t[]){258, 'd'}, 2);
    check_ids(t, "\"bcd\"", "bcd", 3, 0, (uint32_t[]){256, 'd'}, 2);
    check_ids(t, "\"ab\"", "ab", 2, 0, (uint32_t[]){257}, 1);
    check_ids(t, "\"cd\"", "cd", 2, 0, (uint32_t[]){259}, 1);
    // Equal ranks merge leftmost first: aaa -> [aa, a].
    check_ids(t, "\"aaa\"", "aaa", 3, 0, (uint32_t[]){260, 'a'}, 2);
    check_ids(t, "\"aaaaa\"", "aaaaa", 5, 0, (uint32_t[]){260, 260, 'a'}, 3);
    // Merges stop at chunk boundaries: "ab ab" is "ab" + " ab" and (' ', a) has no merge.
    check_ids(t, "\"ab ab\"", "ab ab", 5, 0, (uint32_t[]){257, ' ', 257}, 3);
    // Special strings are plain text unless allowed.
    check_ids(t, "\"a<|endoftext|>\" allowed", "a<|endoftext|>", 14, 1, (uint32_t[]){'a', 261}, 2);
    uint32_t *ids;
    size_t n = tok_encode(t, "a<|endoftext|>", 14, &ids);
    check(n == 14 && ids[1] == '<', "\"a<|endoftext|>\" by default: %zu ids, second %u (expected 14 byte ids, '<' = 60)",
          n, n > 1 ? ids[1] : 0);
    free(ids);
    n = tok_encode(t, "", 0, &ids);
    check(n == 0 && ids != NULL, "empty input: %zu ids", n);
    free(ids);
    char *text;
    size_t len = tok_decode(t, NULL, 0, &text);
    check(len == 0 && text && text[0] == 0, "decode of 0 ids: %zu bytes", len);
    free(text);
    uint32_t bad = 262;
    check(tok_decode(t, &bad, 1, &text) == TOK_ERROR, "decode of id 262 (= vocab size) is an error");
    // A merge that uses an id not defined yet is rejected.
    const uint32_t bad_merges[] = {'a', 'b', 300, 'c'};
    Tokenizer *b = tok_create(bad_merges, 2, NULL, 0, err, sizeof err);
    check(b == NULL, "tok_create rejects merge (300, 'c'): %s", err);
    tok_free(b);
    tok_free(t);
}

// ---- training ------------------------------------------------------------

static void test_train_small(void) {
    // Chunks: "hug" x1, " hug" x2, " pug", " pun", " bun", " hugs" (x1 each).
    // Pair counts: (u,g) 5, (h,u) 4, (' ',h) 3, (' ',p) 2, (p,u) 2, (u,n) 2, ...
    //  0: u+g -> 256 (5)      1: h+ug -> 257 (4)      2: ' '+hug -> 258 (3)
    //  3: ' '+p -> 259 (2; ties with (u,n) = (117,110), (32,112) is smaller)
    //  4: u+n -> 260 (2)      5: ' '+b -> 261 (1; smallest of the count-1 pairs)
    //  6: " hug"+s (258,115)  7: " p"+ug (259,256)   8: " p"+un (259,260)
    //  9: " b"+un (261,260)   then no pair is left.
    const char *text = "hug hug hug pug pun bun hugs";
    const uint32_t want[][2] = {{'u', 'g'}, {'h', 256}, {' ', 257}, {' ', 'p'}, {'u', 'n'},
                                {' ', 'b'}, {258, 's'}, {259, 256}, {259, 260}, {261, 260}};
    Tokenizer *t = tok_train(text, strlen(text), 300, 0);
    check(t != NULL, "train on \"%s\"", text);
    if (!t) return;
    size_t m = tok_n_merges(t);
    check(m == 10, "training stops when no pair is left: %zu merges (expected 10)", m);
    for (size_t r = 0; r < m && r < 10; r++) {
        uint32_t a, b, z;
        tok_merge(t, r, &a, &b, &z);
        check(a == want[r][0] && b == want[r][1] && z == 256 + r, "merge %zu: (%u, %u) -> %u (expected (%u, %u) -> %zu)",
              r, a, b, z, want[r][0], want[r][1], 256 + r);
    }
    check(tok_eot_id(t) == 266 && tok_vocab_size(t) == 267, "eot %d, vocab %d (expected 266, 267)",
          tok_eot_id(t), tok_vocab_size(t));
    check_ids(t, "trained: \"hug hugs bun\"", "hug hugs bun", 12, 0, (uint32_t[]){257, 262, 265}, 3);
    tok_free(t);
    // A vocab size that stops training early: 260 = 256 + 3 merges + eot.
    t = tok_train(text, strlen(text), 260, 0);
    check(t && tok_n_merges(t) == 3 && tok_eot_id(t) == 259, "vocab 260: %zu merges, eot %d (expected 3, 259)",
          t ? tok_n_merges(t) : 0, t ? tok_eot_id(t) : -1);
    tok_free(t);
    // Training is deterministic: two runs give the same merges.
    Tokenizer *a = tok_train(text, strlen(text), 300, 0), *b = tok_train(text, strlen(text), 300, 0);
    int same = a && b && tok_n_merges(a) == tok_n_merges(b);
    for (size_t r = 0; same && r < tok_n_merges(a); r++) {
        uint32_t x[3], y[3];
        tok_merge(a, r, &x[0], &x[1], &x[2]);
        tok_merge(b, r, &y[0], &y[1], &y[2]);
        same = memcmp(x, y, sizeof x) == 0;
    }
    check(same, "two training runs give identical merges");
    tok_free(a);
    tok_free(b);
}

// ---- synthetic text for the larger tests ---------------------------------

// Words of several scripts, digits, punctuation, odd whitespace, and now and
// then raw random bytes (NUL and invalid UTF-8 included).
static char *synthetic_text(size_t len) {
    static const char *words[] = {"the", "of", "and", "tokenizer", "merge", "Gr\xc3\xbc\xc3\x9f\x65",
                                  "\xe4\xb8\x96\xe7\x95\x8c", "\xd0\xbc\xd0\xb8\xd1\x80", "\xf0\x9f\x99\x82",
                                  "don't", "it's", "2024", "3.14", "x", "--", "!!", "(a)", "caf\xc3\xa9",
                                  "hello", "world", "HELLO", "Wor1d"};
    static const char *seps[] = {" ", " ", " ", " ", "  ", "\n", "\n\n", "\t", ", ", ". ", " \n "};
    char *s = malloc(len + 1);
    if (!s) return NULL;
    size_t o = 0;
    while (o < len) {
        char piece[64];
        size_t n;
        if (rnd() % 50 == 0) {  // a few random bytes
            n = 1 + rnd() % 8;
            for (size_t i = 0; i < n; i++) piece[i] = (char)(rnd() & 0xff);
        } else {
            const char *w = words[rnd() % (sizeof words / sizeof words[0])];
            const char *sep = seps[rnd() % (sizeof seps / sizeof seps[0])];
            n = (size_t)snprintf(piece, sizeof piece, "%s%s", w, sep);
        }
        if (n > len - o) n = len - o;
        memcpy(s + o, piece, n);
        o += n;
    }
    s[len] = 0;
    return s;
}

// ---- the naive oracle encoder --------------------------------------------

// rank[a * V + b]: the rank of merge (a, b), or UINT32_MAX. Dense: V is small here.
static uint32_t *rank_table(const Tokenizer *t) {
    size_t V = (size_t)tok_vocab_size(t);
    uint32_t *rank = malloc(V * V * sizeof *rank);
    if (!rank) return NULL;
    memset(rank, 0xff, V * V * sizeof *rank);
    for (size_t r = 0; r < tok_n_merges(t); r++) {
        uint32_t a, b, z;
        tok_merge(t, r, &a, &b, &z);
        rank[a * V + b] = (uint32_t)r;
    }
    return rank;
}

// The textbook algorithm: per chunk, find the lowest-ranked adjacent pair
// (leftmost on ties), merge it, repeat. O(n^2) per chunk.
static size_t naive_encode(const Tokenizer *t, const uint32_t *rank, const char *s, size_t len, uint32_t *out) {
    size_t V = (size_t)tok_vocab_size(t), n_out = 0;
    uint32_t *sym = malloc((len ? len : 1) * sizeof *sym);
    for (size_t i = 0; i < len;) {
        size_t e = tok_chunk_end(s, len, i), n = e - i;
        for (size_t k = 0; k < n; k++) sym[k] = tok_byte_id(t, (unsigned char)s[i + k]);
        for (;;) {
            size_t best = n;
            uint32_t best_rank = UINT32_MAX;
            for (size_t k = 0; k + 1 < n; k++) {
                uint32_t r = rank[sym[k] * V + sym[k + 1]];
                if (r < best_rank) {
                    best_rank = r;
                    best = k;
                }
            }
            if (best == n) break;
            uint32_t a, b, z;
            tok_merge(t, best_rank, &a, &b, &z);
            sym[best] = z;
            memmove(sym + best + 1, sym + best + 2, (n - best - 2) * sizeof *sym);
            n--;
        }
        memcpy(out + n_out, sym, n * sizeof *sym);
        n_out += n;
        i = e;
    }
    free(sym);
    return n_out;
}

// Every merge's result must be its two parts' bytes joined (checked here
// independently of the library's own validation).
static int merges_consistent(const Tokenizer *t) {
    for (size_t r = 0; r < tok_n_merges(t); r++) {
        uint32_t a, b, z;
        size_t la, lb, lz;
        tok_merge(t, r, &a, &b, &z);
        const char *sa = tok_token_bytes(t, a, &la), *sb = tok_token_bytes(t, b, &lb), *sz = tok_token_bytes(t, z, &lz);
        if (lz != la + lb || memcmp(sz, sa, la) != 0 || memcmp(sz + la, sb, lb) != 0) return 0;
    }
    return 1;
}

// Thousands of random strings: decode(encode(x)) == x, streaming decode
// equals decode, and the ids equal the naive encoder's.
static void test_random_round_trips(const Tokenizer *t, const char *label) {
    uint32_t *rank = rank_table(t);
    int n_strings = 3000, rt_fail = 0, oracle_fail = 0, stream_fail = 0;
    size_t total_bytes = 0, total_ids = 0;
    char buf[512];
    uint32_t oracle[512];
    for (int k = 0; k < n_strings && rank; k++) {
        size_t len = rnd() % 300;
        int mode = k % 3;  // uniform random bytes; bytes from a small alphabet (long merges); ASCII-ish text
        for (size_t i = 0; i < len; i++) {
            uint64_t r = rnd();
            if (mode == 0) buf[i] = (char)(r & 0xff);
            else if (mode == 1) buf[i] = "ab \n\x00\xc3\xa9\xff'"[r % 9];
            else buf[i] = (char)(r % 8 == 0 ? ' ' : 'a' + (char)(r % 26));
        }
        uint32_t *ids;
        size_t n = tok_encode(t, buf, len, &ids);
        char *back;
        size_t bl = tok_decode(t, ids, n, &back);
        if (bl != len || memcmp(back, buf, len) != 0) rt_fail++;
        size_t no = naive_encode(t, rank, buf, len, oracle);
        if (no != n || memcmp(oracle, ids, n * sizeof *ids) != 0) oracle_fail++;
        size_t o = 0;
        for (size_t i = 0; i < n; i++) {
            size_t l;
            const char *p = tok_token_bytes(t, ids[i], &l);
            if (o + l > len || memcmp(p, buf + o, l) != 0) {
                stream_fail++;
                break;
            }
            o += l;
        }
        total_bytes += len;
        total_ids += n;
        free(ids);
        free(back);
    }
    check(rank && rt_fail == 0, "%s: %d random strings (%zu bytes, NUL and invalid UTF-8 included) round-trip; %d failures",
          label, n_strings, total_bytes, rt_fail);
    check(rank && oracle_fail == 0, "%s: ids equal the naive O(n^2) encoder's on all %d strings (%zu ids); %d differ",
          label, n_strings, total_ids, oracle_fail);
    check(rank && stream_fail == 0, "%s: token-by-token output equals the text; %d failures", label, stream_fail);
    free(rank);
}

static void test_unicode(const Tokenizer *t) {
    const char *text = "Gr\xc3\xbc\xc3\x9f" "e, \xe4\xb8\x96\xe7\x95\x8c! \xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82 "
                       "\xf0\x9f\x99\x82 \xce\xb1\xce\xb2\xce\xb3 \xd8\xb9\xd8\xb1\xd8\xa8\xd9\x8a "
                       "\xe0\xa4\xb9\xe0\xa4\xbf\xe0\xa4\x82\xe0\xa4\xa6\xe0\xa5\x80\n";
    uint32_t *ids;
    size_t n = tok_encode(t, text, strlen(text), &ids);
    char *back;
    size_t bl = tok_decode(t, ids, n, &back);
    check(bl == strlen(text) && memcmp(back, text, bl) == 0, "unicode text (%zu bytes, 7 scripts) round-trips via %zu ids",
          strlen(text), n);
    free(ids);
    free(back);
}

// ---- save / load ---------------------------------------------------------

static uint32_t crc32_bitwise(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
    }
    return ~c;
}

static int write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int ok = fwrite(p, 1, n, f) == n;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

static int same_tokenizer(const Tokenizer *a, const Tokenizer *b) {
    if (tok_vocab_size(a) != tok_vocab_size(b) || tok_n_merges(a) != tok_n_merges(b) ||
        tok_eot_id(a) != tok_eot_id(b) || tok_n_special(a) != tok_n_special(b))
        return 0;
    for (uint32_t id = 0; id < (uint32_t)tok_vocab_size(a); id++) {
        size_t la, lb;
        const char *sa = tok_token_bytes(a, id, &la), *sb = tok_token_bytes(b, id, &lb);
        if (la != lb || memcmp(sa, sb, la) != 0 || tok_is_special(a, id) != tok_is_special(b, id)) return 0;
    }
    for (size_t r = 0; r < tok_n_merges(a); r++) {
        uint32_t x[3], y[3];
        tok_merge(a, r, &x[0], &x[1], &x[2]);
        tok_merge(b, r, &y[0], &y[1], &y[2]);
        if (memcmp(x, y, sizeof x) != 0) return 0;
    }
    return 1;
}

// Rewrites a u32 of the file image and fixes the checksum, so that only the
// loader's semantic checks can catch the change.
static void patch_u32(unsigned char *img, size_t len, size_t off, uint32_t v) {
    for (int k = 0; k < 4; k++) img[off + (size_t)k] = (unsigned char)(v >> (8 * k));
    uint32_t c = crc32_bitwise(img, len - 4);
    for (int k = 0; k < 4; k++) img[len - 4 + (size_t)k] = (unsigned char)(c >> (8 * k));
}

static void on_hang(int sig) {
    (void)sig;
    static const char msg[] = "FAIL a reader blocked on a FIFO (alarm)\n";
    if (write(1, msg, sizeof msg - 1) < 0) {}
    _exit(1);
}

static void expect_reject(const char *path, const void *img, size_t len, const char *what, const char *needle) {
    char err[512] = "";
    write_bytes(path, img, len);
    Tokenizer *t = tok_load(path, err, sizeof err);
    int ok = t == NULL && strstr(err, path) != NULL && strstr(err, needle) != NULL;
    check(ok, "load rejects %s: \"%s\"", what, err);
    tok_free(t);
}

static void test_save_load(const Tokenizer *t) {
    check(tok_crc32("123456789", 9) == 0xCBF43926u, "CRC-32 of \"123456789\" is 0x%08x (standard check value 0xcbf43926)",
          tok_crc32("123456789", 9));
    char path[512], bad[512], err[512];
    tmp_path(path, sizeof path, "t.tok");
    tmp_path(bad, sizeof bad, "bad.tok");
    int rc = tok_save(t, path, err, sizeof err);
    check(rc == 0, "save to a temporary file: %s", rc ? err : "ok");
    Tokenizer *u = tok_load(path, err, sizeof err);
    check(u && same_tokenizer(t, u), "load gives back the same vocab, merges and specials (%d ids, %zu merges)",
          tok_vocab_size(t), tok_n_merges(t));
    tok_free(u);
    size_t len;
    unsigned char *img = (unsigned char *)tok_read_file(path, &len, err, sizeof err);
    if (!img) return;
    // The header is 8 u32; the first token record follows it.
    uint32_t magic = (uint32_t)img[0] | (uint32_t)img[1] << 8 | (uint32_t)img[2] << 16 | (uint32_t)img[3] << 24;
    check(memcmp(img, "MTOK", 4) == 0 && magic == 0x4B4F544Du, "file starts with the magic \"MTOK\" (0x%08x)", magic);
    // Every truncation is rejected.
    int trunc_ok = 1;
    char first_msg[512] = "";
    for (size_t cut = 0; cut < len; cut += (cut < 64 ? 1 : 1 + len / 200)) {
        write_bytes(bad, img, cut);
        Tokenizer *v = tok_load(bad, err, sizeof err);
        if (v || !strstr(err, bad)) trunc_ok = 0;
        if (cut == len / 2) snprintf(first_msg, sizeof first_msg, "%s", err);
        tok_free(v);
    }
    write_bytes(bad, img, len - 1);
    Tokenizer *v = tok_load(bad, err, sizeof err);
    check(trunc_ok && !v, "every truncation of the %zu-byte file is rejected, e.g. \"%s\"", len, err);
    tok_free(v);
    // Flipping any single byte is caught (by a field check or the checksum).
    int flip_ok = 1;
    size_t flips = 0;
    for (size_t i = 0; i < len; i += 1 + len / 300, flips++) {
        img[i] ^= 0x40;
        write_bytes(bad, img, len);
        v = tok_load(bad, err, sizeof err);
        if (v) flip_ok = 0;
        tok_free(v);
        img[i] ^= 0x40;
    }
    check(flip_ok, "%zu single-byte corruptions are all rejected", flips);
    unsigned char *copy = malloc(len);
    memcpy(copy, img, len);
    copy[0] = 'X';
    expect_reject(bad, copy, len, "a bad magic", "magic");
    memcpy(copy, img, len);
    patch_u32(copy, len, 4, 2);
    expect_reject(bad, copy, len, "version 2", "version");
    memcpy(copy, img, len);
    copy[len - 4 - 4 * tok_n_special(t) - 2] ^= 1;  // in the last merge's right id
    expect_reject(bad, copy, len, "a flipped bit in a merge", "checksum");
    // Semantic errors behind a valid checksum: a merge naming an id out of
    // range (merge 0's left id sits right after the V token records).
    size_t off = 32;
    for (int id = 0; id < tok_vocab_size(t); id++) off += 4 + (size_t)(img[off] | img[off + 1] << 8);
    memcpy(copy, img, len);
    patch_u32(copy, len, off, 99999);
    expect_reject(bad, copy, len, "a merge id out of range", "merge 0");
    memcpy(copy, img, len);
    patch_u32(copy, len, 20, 5);  // eot_id: id 5 is the byte 0x05, not a special
    expect_reject(bad, copy, len, "an end-of-text id that is not special", "end-of-text");
    memcpy(copy, img, len);
    patch_u32(copy, len, 12, (uint32_t)tok_n_merges(t) + 1000);
    expect_reject(bad, copy, len, "a merge count larger than the file", "truncated");
    free(copy);
    free(img);
    check(tok_load("no/such/dir/x.tok", err, sizeof err) == NULL && strstr(err, "no/such/dir/x.tok"),
          "a missing file: \"%s\"", err);
    // Only regular files: /dev/zero would be read until memory runs out, a
    // FIFO would block until a writer came (the alarm ends the test then).
    check(tok_load("/dev/zero", err, sizeof err) == NULL && strstr(err, "/dev/zero: a character device"),
          "/dev/zero refused: \"%s\"", err);
    remove(bad);
    if (mkfifo(bad, 0600) == 0) {
        signal(SIGALRM, on_hang);
        alarm(20);
        Tokenizer *f = tok_load(bad, err, sizeof err);
        alarm(0);
        check(f == NULL && strstr(err, bad) && strstr(err, "a FIFO, not a regular file"), "a FIFO refused: \"%s\"", err);
        tok_free(f);
    } else {
        check(0, "mkfifo %s failed", bad);
    }
    remove(path);
    remove(bad);
}

// ---- JSON parser ---------------------------------------------------------

static void test_json(void) {
    char err[256];
    const char *doc = "{\"a\": [1, -2.5e1, true, false, null], \"s\": \"x\\n\\t\\\"\\\\\\/\\u00e9\\ud83d\\ude00\", \"o\": {}}";
    TokJson *j = tok_json_parse(doc, strlen(doc), err, sizeof err);
    const TokJson *a = tok_json_get(j, "a"), *s = tok_json_get(j, "s");
    int ok = j && a && a->type == TOK_JSON_ARRAY && a->len == 5 && a->items[0].num == 1 && a->items[1].num == -25 &&
             a->items[2].type == TOK_JSON_TRUE && a->items[4].type == TOK_JSON_NULL;
    check(ok, "JSON: array of numbers and literals parsed");
    const char want[] = "x\n\t\"\\/\xc3\xa9\xf0\x9f\x98\x80";
    check(s && s->len == sizeof want - 1 && memcmp(s->str, want, s->len) == 0,
          "JSON: string escapes, \\u00e9 -> C3 A9, surrogate pair -> F0 9F 98 80 (%zu bytes)", s ? s->len : 0);
    tok_json_free(j);
    static const char *bad[] = {"[1,]", "{\"a\" 1}", "\"\\ud800\"", "\"a\nb\"", "01", "[1", "{\"a\":1} x", "\"\\q\"", "nul"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        j = tok_json_parse(bad[i], strlen(bad[i]), err, sizeof err);
        char q[64];
        tok_quote((const unsigned char *)bad[i], strlen(bad[i]), q, sizeof q);
        check(j == NULL && strstr(err, "line 1"), "JSON: %s rejected: %s", q, err);
        tok_json_free(j);
    }
}

// ---- Hugging Face import -------------------------------------------------

static void test_hf_fixture(const char *path) {
    char err[512];
    int differs = -1;
    Tokenizer *t = tok_import_hf(path, NULL, &differs, err, sizeof err);
    check(t != NULL, "import %s: %s", path, t ? "ok" : err);
    if (!t) return;
    check(tok_vocab_size(t) == 271 && tok_n_merges(t) == 12 && tok_n_special(t) == 3 && tok_eot_id(t) == 268 && differs == 0,
          "fixture: vocab %d, %zu merges, %zu specials, eot %d, pre-tokenizer differs %d (expected 271, 12, 3, 268, 0)",
          tok_vocab_size(t), tok_n_merges(t), tok_n_special(t), tok_eot_id(t), differs);
    // Byte ids follow GPT-2's order: '!'..'~' are 0..93 (id = byte - 33), the
    // 68 non-printable bytes come after 187 in byte order: 0x00 -> 188,
    // '\n' -> 198, ' ' -> 220. Merged tokens have the ids the file gives.
    check(tok_byte_id(t, 'a') == 64 && tok_byte_id(t, ' ') == 220 && tok_byte_id(t, '\n') == 198 &&
          tok_byte_id(t, 0) == 188 && tok_byte_id(t, 0xAD) == 255 && tok_byte_id(t, 0xFF) == 187,
          "fixture: byte ids a=%u ' '=%u '\\n'=%u 0x00=%u 0xAD=%u 0xFF=%u (expected 64 220 198 188 255 187)",
          tok_byte_id(t, 'a'), tok_byte_id(t, ' '), tok_byte_id(t, '\n'), tok_byte_id(t, 0), tok_byte_id(t, 0xAD),
          tok_byte_id(t, 0xFF));
    // Merges: 0 b c, 1 a b, 2 a bc, 3 h e, 4 Ġ t, 5 Ġt he, 6 l l, 7 e ll,
    // 8 h ell, 9 hell o, 10 Ã © (= é), 11 Ċ Ċ (= "\n\n").
    check_ids(t, "fixture \"abc\" (bc first: rank 0)", "abc", 3, 0, (uint32_t[]){256}, 1);
    check_ids(t, "fixture \"ab\"", "ab", 2, 0, (uint32_t[]){267}, 1);
    check_ids(t, "fixture \" the\" (he, then Ġt, then Ġthe)", " the", 4, 0, (uint32_t[]){259}, 1);
    // "hello": he (rank 3) forms before ll (6), so "hell"/"hello" never do.
    check_ids(t, "fixture \"hello\"", "hello", 5, 0, (uint32_t[]){257, 262, 78}, 3);
    check_ids(t, "fixture \"bell\"", "bell", 4, 0, (uint32_t[]){65, 261}, 2);
    check_ids(t, "fixture \"caf\\xc3\\xa9\"", "caf\xc3\xa9", 5, 0, (uint32_t[]){66, 64, 69, 264}, 4);
    check_ids(t, "fixture \"\\n\\n\\nx\"", "\n\n\nx", 4, 0, (uint32_t[]){265, 198, 87}, 3);
    check_ids(t, "fixture \"a<|endoftext|>b\" with specials", "a<|endoftext|>b", 15, 1, (uint32_t[]){64, 268, 65}, 3);
    check_ids(t, "fixture \"x<pad>y\" with specials", "x<pad>y", 7, 1, (uint32_t[]){87, 269, 88}, 3);
    // The third added token's content is written with a surrogate pair.
    check_ids(t, "fixture \"<U+1F600>\" with specials", "<\xf0\x9f\x98\x80>", 6, 1, (uint32_t[]){270}, 1);
    check(merges_consistent(t), "fixture: every merge result is its parts' bytes joined");
    test_random_round_trips(t, "fixture");
    tok_free(t);
}

// bytes_to_unicode written out independently of hf_import.c: the code point
// that stands for byte b.
static unsigned byte_char(int b) {
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return (unsigned)b;
    unsigned n = 0;  // rank of b among the non-printable bytes
    for (int c = 0; c < b; c++)
        if (!((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF))) n++;
    return 256 + n;
}

// A tokenizer.json with the 256 byte tokens at ids = byte value (minus the
// ones in skip), extra vocab entries, the given merges list and model type.
static char *make_json(const char *model_type, const char *extra_vocab, const char *merges, const char *extra_top, int skip) {
    size_t cap = 16384, o = 0;
    char *s = malloc(cap);
    // extra_top comes first so that it can override the default pre-tokenizer.
    o += (size_t)snprintf(s + o, cap - o,
                          "{%s \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false}, "
                          "\"model\": {\"type\": \"%s\", \"vocab\": {", extra_top, model_type);
    for (int b = 0; b < 256; b++) {
        if (b == skip) continue;
        o += (size_t)snprintf(s + o, cap - o, "\"\\u%04x\": %d, ", byte_char(b), b);
    }
    snprintf(s + o, cap - o, "%s}, \"merges\": %s}}", extra_vocab, merges);
    return s;
}

static void import_json_text(const char *json, const char *label, const char *needle) {
    char path[512], err[512] = "";
    tmp_path(path, sizeof path, "tokenizer.json");
    write_bytes(path, json, strlen(json));
    Tokenizer *t = tok_import_hf(path, NULL, NULL, err, sizeof err);
    if (!needle) {
        check(t != NULL, "%s: %s", label, t ? "imported" : err);
        if (t) {
            // Vocab: ids 0..255 are the bytes; "ab" is 256, "abc" 257.
            check_ids(t, "array-form merges: \"abc ab\"", "abc ab", 6, 0, (uint32_t[]){257, ' ', 256}, 3);
        }
    } else {
        check(t == NULL && strstr(err, path) && strstr(err, needle), "%s rejected: \"%s\"", label, err);
    }
    tok_free(t);
    remove(path);
}

// DeepSeek writes its special tokens into model.vocab verbatim in UTF-8 (outside
// the byte-level alphabet) and lists them in added_tokens too.
static void test_hf_deepseek_style(void) {
    const char *eos = "<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>";
    char vocab[256], top[512], path[512], err[512] = "";
    snprintf(vocab, sizeof vocab, "\"ab\": 256, \"abc\": 257, \"%s\": 258", eos);
    snprintf(top, sizeof top, "\"added_tokens\": [{\"id\": 258, \"content\": \"%s\", \"special\": true}],", eos);
    char *j = make_json("BPE", vocab, "[\"a b\", \"ab c\"]", top, -1);
    tmp_path(path, sizeof path, "deepseek.json");
    write_bytes(path, j, strlen(j));
    free(j);
    Tokenizer *t = tok_import_hf(path, NULL, NULL, err, sizeof err);
    size_t len = 0;
    const char *s = t ? tok_token_bytes(t, 258, &len) : NULL;
    check(t && tok_eot_id(t) == 258 && tok_is_special(t, 258) && s && len == strlen(eos) && memcmp(s, eos, len) == 0,
          "DeepSeek-style special in model.vocab: imported, end-of-text id %d (expected 258) %s", t ? tok_eot_id(t) : -1,
          t ? "" : err);
    if (t) check_ids(t, "DeepSeek-style: \"abc<eos>\" with specials", "abc" "<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>",
                     3 + strlen(eos), 1, (uint32_t[]){257, 258}, 2);
    tok_free(t);
    remove(path);
}

static void test_hf_variants(void) {
    const char *vocab = "\"ab\": 256, \"abc\": 257";
    char *j;
    j = make_json("BPE", vocab, "[[\"a\", \"b\"], [\"ab\", \"c\"]]", "", -1);
    import_json_text(j, "merges as [a, b] arrays", NULL);
    free(j);
    j = make_json("WordPiece", vocab, "[]", "", -1);
    import_json_text(j, "model.type WordPiece", "BPE");
    free(j);
    j = make_json("BPE", vocab, "[\"a b\", \"ab zz\"]", "", -1);
    import_json_text(j, "a merge of a token not in the vocab", "not in model.vocab");
    free(j);
    j = make_json("BPE", vocab, "[\"a c\"]", "", -1);
    import_json_text(j, "a merge whose result is not in the vocab", "not a token");
    free(j);
    j = make_json("BPE", vocab, "[\"a b\"]", "", 'q');
    import_json_text(j, "a vocab without byte 'q'", "no token for byte 0x71");
    free(j);
    j = make_json("BPE", vocab, "[\"a b\"]", "\"normalizer\": {\"type\": \"NFC\"},", -1);
    import_json_text(j, "an NFC normalizer", "normalizer");
    free(j);
    j = make_json("BPE", "\"\\u2581the\": 256", "[]", "", -1);
    import_json_text(j, "a SentencePiece-style token (U+2581)", "byte-level");
    free(j);
    j = make_json("BPE", vocab, "[\"a b\"]", "\"pre_tokenizer\": {\"type\": \"Metaspace\"},", -1);
    import_json_text(j, "a Metaspace pre-tokenizer", "not byte-level");
    free(j);
    import_json_text("{\"model\": {\"type\": \"BPE\",}}", "invalid JSON", "line 1");
}

// ---- parallel == serial --------------------------------------------------

static void test_parallel(const Tokenizer *t) {
    size_t len = 3u << 20;
    char *text = synthetic_text(len);
    // Sprinkle end-of-text markers so the special-token path is split too.
    for (size_t p = 1000; p + 20 < len; p += 100000) memcpy(text + p, TOK_EOT_STRING, strlen(TOK_EOT_STRING));
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    for (int special = 0; special < 2; special++) {
        TokEncodeOptions serial = {special, 1, 0};
        uint32_t *ref;
        size_t n_ref = tok_encode_ex(t, text, len, &serial, &ref);
        size_t parts[] = {0, 4096, 65536};  // 0: the default 1 MiB
        for (int k = 0; k < 3; k++) {
            TokEncodeOptions par = {special, 0, parts[k]};
            uint32_t *ids;
            size_t n = tok_encode_ex(t, text, len, &par, &ids);
            check(n == n_ref && memcmp(ids, ref, n * sizeof *ids) == 0,
                  "parallel encode (%d threads, parts of %zu bytes, specials %s) of %zu bytes equals serial: %zu vs %zu ids",
                  threads, parts[k] ? parts[k] : (size_t)1 << 20, special ? "on" : "off", len, n, n_ref);
            free(ids);
        }
        char *back;
        size_t bl = tok_decode(t, ref, n_ref, &back);
        check(bl == len && memcmp(back, text, len) == 0, "%zu-byte synthetic text round-trips (specials %s)", len,
              special ? "on" : "off");
        free(back);
        free(ref);
    }
    // The reusable encoder, fed documents of random sizes one after another
    // (its cache carries over), gives each document the same ids as tok_encode_ex.
    TokEncoder *enc = tok_encoder_new(t);
    size_t docs = 0, differ = 0, total = 0;
    for (size_t p = 0; enc && p < len; docs++) {
        size_t l = 1 + rnd() % 20000;
        if (l > len - p) l = len - p;
        int special = (int)(docs % 2);
        TokEncodeOptions o = {special, 0, 0};
        uint32_t *a, *b;
        size_t na = tok_encoder_encode(enc, text + p, l, special, &a);
        size_t nb = tok_encode_ex(t, text + p, l, &o, &b);
        if (na != nb || memcmp(a, b, na * sizeof *a) != 0) differ++;
        total += na;
        free(a);
        free(b);
        p += l;
    }
    check(enc && differ == 0, "reusable encoder on %zu documents (%zu ids) equals tok_encode_ex; %zu differ", docs, total, differ);
    tok_encoder_free(enc);
    free(text);
}

int main(int argc, char **argv) {
    const char *fixture = argc > 1 ? argv[1] : "tests/fixtures/hf_tiny/tokenizer.json";
    const char *tmp = getenv("TMPDIR");
    snprintf(g_tmpdir, sizeof g_tmpdir, "%s/tok_test_XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(g_tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_chunks();
    test_rank_order();
    test_train_small();
    // A tokenizer with many merges for the larger tests: trained on synthetic
    // text mixing scripts, digits, punctuation and random bytes.
    char *corpus = synthetic_text(200000);
    Tokenizer *t = corpus ? tok_train(corpus, 200000, 1000, 0) : NULL;
    free(corpus);
    check(t && tok_vocab_size(t) == 1000 && merges_consistent(t),
          "train vocab 1000 on 200 kB of synthetic text: %d ids, merges consistent", t ? tok_vocab_size(t) : 0);
    if (t) {
        test_random_round_trips(t, "trained");
        test_unicode(t);
        test_save_load(t);
        test_parallel(t);
    }
    tok_free(t);
    test_json();
    test_hf_fixture(fixture);
    test_hf_variants();
    test_hf_deepseek_style();
    rmdir(g_tmpdir);
    return check_summary("test_tokenizer");
}
