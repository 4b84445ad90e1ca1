// util.h: error-check macros and small helpers shared by every room.
//
// Every fatal error is one line naming the source location and what went wrong,
// optionally followed by a HINT line saying what to do about it.
#ifndef MOE_UTIL_H
#define MOE_UTIL_H

#include <stdio.h>
#include <stdlib.h>

_Noreturn void util_die(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

// Writes msg as an error prints it: on one line, whatever a user's value in it holds
// (control characters as \n, \r, \xNN escapes), but for the newline at offset hint that
// starts the HINT line its format wrote (-1: none).
void util_print_message(FILE *f, const char *msg, long hint);

// A user's mistake (bad config, bad file): the message alone, no source location.
_Noreturn void util_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// The fuzz targets (tests/fuzz/) run readers that FAIL on bad input many times in one
// process, where exit would end the fuzzer: a hook set there receives the message (and its
// hint's offset, as util_print_message takes it) instead, and must not return (it longjmps back to the target). NULL, the default
// everywhere else: print the message and exit. DIE stays fatal: an internal check that a
// file's bytes can reach is a finding, not an answer.
typedef void (*util_fail_hook)(const char *message, long hint);
void util_set_fail_hook(util_fail_hook hook);

// A distributed run (dist/) ends the whole job on any rank's error and says which rank
// failed: the prefix follows "moe: " on every error line ("rank 1: "; empty by default),
// and the exit hook, when set, replaces exit() after FAIL and DIE have printed (it must
// not return: MPI_Abort).
void util_set_error_prefix(const char *prefix);
typedef void (*util_exit_hook)(int code);
void util_set_exit_hook(util_exit_hook hook);

#define FAIL(...) util_fail(__VA_ARGS__)
#define DIE(...) util_die(__FILE__, __LINE__, __VA_ARGS__)
#define CHECK(cond, ...) \
    do {                 \
        if (!(cond)) DIE(__VA_ARGS__); \
    } while (0)

// malloc/calloc that die with file and line instead of returning NULL.
void *util_calloc(size_t n, size_t size, const char *file, int line);
#define CALLOC(n, size) util_calloc((n), (size), __FILE__, __LINE__)

size_t util_ceil_div(size_t a, size_t b);

// All of `text` as a finite number, an integer (base 10) when `integer`. Returns 0, or -1
// for empty text, trailing characters, nan, inf or a value out of double's or long long's
// range; strtod alone accepts "nan" and "inf", which pass every range comparison.
int util_parse_number(const char *text, int integer, double *out);
// A command-line flag's number in [lo, hi]; dies with one line naming the flag and value.
double util_arg_number(const char *flag, const char *value, double lo, double hi,
                       int integer);

#endif
