// The C tests' assertion: one line per check, "ok" or "FAIL" and what was
// checked (with the measured numbers), and a count for the final summary.
#ifndef MOE_TEST_CHECK_H
#define MOE_TEST_CHECK_H

#include <stdarg.h>
#include <stdio.h>

static int check_count, check_failures;

static void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "ok  " : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    check_count++;
    if (!ok) check_failures++;
}

// Prints "NAME: N checks, F failures" and returns the exit status.
static int check_summary(const char *name) {
    printf("%s: %d checks, %d failures\n", name, check_count, check_failures);
    return check_failures ? 1 : 0;
}

#endif
