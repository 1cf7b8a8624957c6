// Reading the files a user names (shards, checkpoints, tokenizers, model and
// options files) without trusting what the name points at, header-only like
// util.h:
//
//   util_open_regular(path, max_bytes, ...)   open(2) for reading, only a regular
//                                             file of at most max_bytes: a FIFO
//                                             (which would block the open until a
//                                             writer comes), a device such as
//                                             /dev/zero (endless) or a directory
//                                             is refused with a message
//   util_fopen_regular(path, max_bytes, ...)  the same as a FILE *
//   util_kv_next(...)                         the next `key = value` line of a
//                                             text file, rejecting a line longer
//                                             than the buffer (rather than reading
//                                             its tail as another line) or holding
//                                             a NUL byte, with the line number
//
// Every message starts with the path.
#ifndef MOE_UTIL_FILE_H
#define MOE_UTIL_FILE_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

// What a non-regular file is, for messages.
static inline const char *util_file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a regular file";
}

// Opens path read-only if it is a regular file of at most max_bytes bytes
// (0: any size). Returns the descriptor (blocking, close-on-exec) with the
// size in *size (when not NULL), or -1 with a message naming the file in err.
static inline int util_open_regular(const char *path, uint64_t max_bytes, uint64_t *size, char *err,
                                    size_t errlen) {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
    // before fstat could tell what it is. It means nothing for a regular file.
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        util_set_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        util_set_err(err, errlen, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        util_set_err(err, errlen, "%s: %s, not a regular file", path, util_file_kind(st.st_mode));
        close(fd);
        return -1;
    }
    if (max_bytes > 0 && (uint64_t)st.st_size > max_bytes) {
        util_set_err(err, errlen, "%s: %llu bytes, more than the %llu this kind of file may have", path,
                     (unsigned long long)st.st_size, (unsigned long long)max_bytes);
        close(fd);
        return -1;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
        util_set_err(err, errlen, "%s: fcntl: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (size) *size = (uint64_t)st.st_size;
    return fd;
}

// util_open_regular as a stdio stream opened with mode ("r", "rb").
static inline FILE *util_fopen_regular(const char *path, const char *mode, uint64_t max_bytes, char *err,
                                       size_t errlen) {
    int fd = util_open_regular(path, max_bytes, NULL, err, errlen);
    if (fd < 0) return NULL;
    FILE *f = fdopen(fd, mode);
    if (!f) {
        util_set_err(err, errlen, "%s: fdopen: %s", path, strerror(errno));
        close(fd);
    }
    return f;
}

// Strips blanks (and a line end) from both ends of s, in place.
static inline char *util_trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = '\0';
    return s;
}

// Reads the next `key = value` line of f into buf (cap bytes), skipping blank
// lines and, with comments != 0, everything from a '#' on. *lineno counts the
// lines read (start it at 0; on an error it is the failing line's number). Returns 1 with *key and *value (trimmed, inside
// buf), 0 at the end of the file, or -1 with a message "where:LINE: ..." in
// err for a line of more than cap - 1 characters, a NUL byte, a line without
// '=', or a read error.
static inline int util_kv_next(FILE *f, const char *where, int comments, char *buf, size_t cap, int *lineno,
                               char **key, char **value, char *err, size_t errlen) {
    for (;;) {
        size_t n = 0;
        int c;
        while ((c = getc(f)) != EOF && c != '\n') {
            if (c == '\0') {
                util_set_err(err, errlen, "%s:%d: a NUL byte in a text line", where, ++*lineno);
                return -1;
            }
            if (n + 1 >= cap) { // no room for this character and the NUL
                util_set_err(err, errlen, "%s:%d: line longer than %zu characters", where, ++*lineno, cap - 1);
                return -1;
            }
            buf[n++] = (char)c;
        }
        if (c == EOF && ferror(f)) {
            util_set_err(err, errlen, "%s: read error: %s", where, strerror(errno));
            return -1;
        }
        if (c == EOF && n == 0) return 0;
        buf[n] = '\0';
        (*lineno)++;
        if (comments) {
            char *hash = strchr(buf, '#');
            if (hash) *hash = '\0';
        }
        char *s = util_trim(buf);
        if (*s == '\0') {
            if (c == EOF) return 0;
            continue;
        }
        char *eq = strchr(s, '=');
        if (!eq) {
            util_set_err(err, errlen, "%s:%d: expected key = value, got '%.80s'", where, *lineno, s);
            return -1;
        }
        *eq = '\0';
        *key = util_trim(s);
        *value = util_trim(eq + 1);
        return 1;
    }
}

#endif
