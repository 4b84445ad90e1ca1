#include "util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

void util_print_message(FILE *f, const char *msg, long hint) {
    for (const unsigned char *c = (const unsigned char *)msg; *c; c++) {
        if ((long)((const char *)c - msg) == hint) fputc('\n', f);
        else if (*c == '\n') fputs("\\n", f);
        else if (*c == '\r') fputs("\\r", f);
        else if ((*c < 0x20 && *c != '\t') || *c == 0x7f) fprintf(f, "\\x%02x", *c);
        else fputc(*c, f);
    }
}

// The formatted message, and where the format's own "\nHINT: " landed in it (-1: none).
// Found by formatting the part of fmt before the hint: a user's value that holds the same
// text never starts a line.
typedef struct {
    char text[4096];
    long hint;
} Message;

static void message_format(Message *m, const char *fmt, va_list ap) {
    va_list before;
    va_copy(before, ap);
    vsnprintf(m->text, sizeof m->text, fmt, ap);
    m->hint = -1;
    const char *mark = strstr(fmt, "\nHINT: ");
    char head[1024];   // fmt up to the hint
    size_t n = mark ? (size_t)(mark - fmt) : 0;
    if (mark && n < sizeof head) {
        memcpy(head, fmt, n);
        head[n] = '\0';
        int len = vsnprintf(NULL, 0, head, before);
        if (len >= 0 && (size_t)len < strlen(m->text) && m->text[len] == '\n') m->hint = len;
    }
    va_end(before);
}

static char error_prefix[64];
static util_exit_hook exit_hook;

void util_set_error_prefix(const char *prefix) {
    snprintf(error_prefix, sizeof error_prefix, "%s", prefix);
}

void util_set_exit_hook(util_exit_hook hook) { exit_hook = hook; }

static _Noreturn void end_process(int code) {
    fflush(stderr);
    if (exit_hook) exit_hook(code);
    exit(code);
}

static void print_error(const char *fmt, va_list ap) {
    Message m;
    message_format(&m, fmt, ap);
    fflush(stdout);
    fprintf(stderr, "moe: %serror: ", error_prefix);
    util_print_message(stderr, m.text, m.hint);
}

_Noreturn void util_die(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    print_error(fmt, ap);
    va_end(ap);
    fprintf(stderr, " (%s:%d)\n", file, line);
    end_process(EXIT_FAILURE);
}

static util_fail_hook fail_hook;

void util_set_fail_hook(util_fail_hook hook) { fail_hook = hook; }

_Noreturn void util_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (fail_hook) {
        Message m;
        message_format(&m, fmt, ap);
        va_end(ap);
        fail_hook(m.text, m.hint);
        abort();   // a hook that returns has broken its contract
    }
    print_error(fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    end_process(EXIT_FAILURE);
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
