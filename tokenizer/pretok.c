// Pre-tokenisation: the rule that cuts text into chunks before BPE runs, so
// that merges never join, say, a word with the punctuation after it.
//
// It is GPT-2's regular expression
//   's|'t|'re|'ve|'m|'ll|'d| ?L+| ?N+| ?[^\sLN]+|\s+(?!\S)|\s+
// evaluated on bytes, with these byte classes:
//   L (letter):     A-Z a-z and every byte >= 0x80 (so UTF-8 words stay whole)
//   N (digit):      0-9
//   \s (space):     space \t \n \v \f \r
//   punctuation:    every other byte, NUL and control bytes included
// At each position the alternatives are tried in order and the first that
// matches wins, exactly as the regex engine does (docs/tokenizer.md has
// examples). Every byte belongs to exactly one chunk, so decoding the chunks'
// tokens gives the text back.
#include "bpe.h"

enum { CL_LETTER, CL_DIGIT, CL_SPACE, CL_PUNCT };

static inline int byte_class(unsigned char c) {
    if (c >= 0x80 || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return CL_LETTER;
    if (c >= '0' && c <= '9') return CL_DIGIT;
    if (c == ' ' || (c >= '\t' && c <= '\r')) return CL_SPACE;  // \t \n \v \f \r are 9..13
    return CL_PUNCT;
}

// Length of the contraction ('s 't 'm 'd 're 've 'll) at s[i], or 0.
static size_t contraction(const unsigned char *s, size_t len, size_t i) {
    if (s[i] != '\'' || i + 1 >= len) return 0;
    unsigned char a = s[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 >= len) return 0;
    unsigned char b = s[i + 2];
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

size_t tok_chunk_end(const char *text, size_t len, size_t pos) {
    const unsigned char *s = (const unsigned char *)text;
    size_t i = pos;
    size_t c = contraction(s, len, i);
    if (c) return i + c;
    // " ?L+", " ?N+", " ?[^\sLN]+": an optional leading space, then a run of
    // one class. The space is taken only when the run follows it.
    size_t j = i;
    if (s[j] == ' ' && j + 1 < len && byte_class(s[j + 1]) != CL_SPACE) j++;
    int cl = byte_class(s[j]);
    if (cl != CL_SPACE) {
        j++;
        while (j < len && byte_class(s[j]) == cl) j++;
        return j;
    }
    // A whitespace run. "\s+(?!\S)": the run minus its last byte when a
    // non-space follows, so that byte can lead the next word (" word");
    // the whole run at the end of the text. Otherwise "\s+" takes the single
    // whitespace byte before the non-space.
    size_t k = i + 1;
    while (k < len && byte_class(s[k]) == CL_SPACE) k++;
    if (k == len) return k;
    if (k - i >= 2) return k - 1;
    return k;
}
