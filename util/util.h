// The small helpers every program of the project shares, header-only so that
// C, C++ and CUDA files include it alike:
//
//   xmalloc / xcalloc / xrealloc   allocation that cannot return NULL: out of
//                                  memory prints the size, file and line, exits 1
//   FATAL(fmt, ...)                an error the program cannot continue from
//                                  (a failed CUDA call, a lost rank): message
//                                  with file and line, exit 1
//   ASSERT(cond, fmt, ...)         an invariant of the code itself; when it does
//                                  not hold that is a bug, reported as
//                                  "internal error" with file and line, abort()
//   util_set_err(err, len, ...)    an error message for the caller to print,
//                                  into its buffer (the loaders' convention:
//                                  return -1 and a message naming the file)
//
// Errors a user can cause (a bad option, a corrupt file) are never ASSERTs:
// they are reported with a message naming the option or file.
#ifndef MOE_UTIL_H
#define MOE_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(__GNUC__)
#define UTIL_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define UTIL_NORETURN __attribute__((noreturn))
#else
#define UTIL_PRINTF(f, a)
#define UTIL_NORETURN
#endif

static inline void util_set_err(char *err, size_t errlen, const char *fmt, ...) UTIL_PRINTF(3, 4);
static inline void util_set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

// "error: <message> (file:line)", then exit(1).
static inline UTIL_NORETURN void util_fatal(const char *file, int line, const char *fmt, ...) UTIL_PRINTF(3, 4);
static inline UTIL_NORETURN void util_fatal(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fflush(stdout);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (%s:%d)\n", file, line);
    va_end(ap);
    exit(1);
}

// "internal error at file:line: <message>", then abort() (a core dump or a
// debugger stop shows where).
static inline UTIL_NORETURN void util_internal_error(const char *file, int line, const char *fmt, ...)
    UTIL_PRINTF(3, 4);
static inline UTIL_NORETURN void util_internal_error(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fflush(stdout);
    fprintf(stderr, "internal error at %s:%d: ", file, line);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    abort();
}

#define FATAL(...) util_fatal(__FILE__, __LINE__, __VA_ARGS__)
#define ASSERT(cond, ...)                                                      \
    do {                                                                       \
        if (!(cond)) util_internal_error(__FILE__, __LINE__, __VA_ARGS__);     \
    } while (0)

static inline void *util_xmalloc(size_t bytes, const char *file, int line) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) util_fatal(file, line, "out of memory allocating %zu bytes", bytes);
    return p;
}

static inline void *util_xcalloc(size_t n, size_t size, const char *file, int line) {
    if (size && n > (size_t)-1 / size) util_fatal(file, line, "allocation of %zu x %zu bytes overflows", n, size);
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) util_fatal(file, line, "out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

static inline void *util_xrealloc(void *old, size_t bytes, const char *file, int line) {
    void *p = realloc(old, bytes ? bytes : 1);
    if (!p) util_fatal(file, line, "out of memory growing a buffer to %zu bytes", bytes);
    return p;
}

#define xmalloc(bytes) util_xmalloc((bytes), __FILE__, __LINE__)
#define xcalloc(n, size) util_xcalloc((n), (size), __FILE__, __LINE__)
#define xrealloc(p, bytes) util_xrealloc((p), (bytes), __FILE__, __LINE__)

#endif
