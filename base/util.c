#include "util.h"

#include <stdarg.h>

static void print_error(const char *fmt, va_list ap) {
    fflush(stdout);
    fprintf(stderr, "moe: error: ");
    vfprintf(stderr, fmt, ap);
}

_Noreturn void util_die(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    print_error(fmt, ap);
    va_end(ap);
    fprintf(stderr, " (%s:%d)\n", file, line);
    exit(EXIT_FAILURE);
}

_Noreturn void util_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    print_error(fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(EXIT_FAILURE);
}

void *util_calloc(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) util_die(file, line, "out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

size_t util_ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }
