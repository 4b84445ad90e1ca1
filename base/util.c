#include "util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

void util_print_message(FILE *f, const char *msg) {
    for (const unsigned char *c = (const unsigned char *)msg; *c; c++) {
        if (*c == '\n' && !strncmp((const char *)c + 1, "HINT: ", 6)) fputc('\n', f);
        else if (*c == '\n') fputs("\\n", f);
        else if (*c == '\r') fputs("\\r", f);
        else if ((*c < 0x20 && *c != '\t') || *c == 0x7f) fprintf(f, "\\x%02x", *c);
        else fputc(*c, f);
    }
}

static void print_error(const char *fmt, va_list ap) {
    char msg[4096];
    vsnprintf(msg, sizeof msg, fmt, ap);
    fflush(stdout);
    fprintf(stderr, "moe: error: ");
    util_print_message(stderr, msg);
}

_Noreturn void util_die(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    print_error(fmt, ap);
    va_end(ap);
    fprintf(stderr, " (%s:%d)\n", file, line);
    exit(EXIT_FAILURE);
}

static util_fail_hook fail_hook;

void util_set_fail_hook(util_fail_hook hook) { fail_hook = hook; }

_Noreturn void util_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (fail_hook) {
        char message[4096];
        vsnprintf(message, sizeof message, fmt, ap);
        va_end(ap);
        fail_hook(message);
        abort();   // a hook that returns has broken its contract
    }
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

int util_parse_number(const char *text, int integer, double *out) {
    char *end = NULL;
    errno = 0;
    double v = integer ? (double)strtoll(text, &end, 10) : strtod(text, &end);
    if (errno || end == text || *end != '\0' || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

double util_arg_number(const char *flag, const char *value, double lo, double hi,
                       int integer) {
    double v;
    if (util_parse_number(value, integer, &v) != 0 || v < lo || v > hi)
        FAIL("%s %s: expected %s from %.10g to %.10g", flag, value,
             integer ? "an integer" : "a number", lo, hi);
    return v;
}
