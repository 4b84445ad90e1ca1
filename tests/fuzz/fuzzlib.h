// fuzzlib.h: what the libFuzzer targets of tests/fuzz/ share (`make fuzz`, README "Fuzzing
// and sanitizers").
//
// Each target feeds its input to one reader of outside input. A reader may answer with a
// one-line error (returned in a buffer, or through FAIL, which the fuzz build turns into
// a longjmp here); anything else it does wrong (a crash, a sanitizer report, a leak, a
// hang, exit through DIE, an error of several lines) is a finding.
#ifndef MOE_FUZZLIB_H
#define MOE_FUZZLIB_H

#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>

#include "../../model/config.h"

// The input as a file the reader can open: one path per process, rewritten per input.
const char *fuzz_write_file(const uint8_t *data, size_t size);
// A directory of its own (removed at exit) holding the input under `name`.
const char *fuzz_write_in_dir(const char *name, const uint8_t *data, size_t size);

// Aborts (a finding) unless err holds a one-line message: a refusal must say why.
void fuzz_check_error(const char *err);

// FAIL inside FUZZ_CATCH's body jumps back with the message checked by fuzz_check_error;
// the body's allocations are then lost, as they would be at exit, so targets that use it
// run with leak detection off (Makefile, FUZZ_NO_LEAKS).
extern jmp_buf fuzz_fail_jump;
void fuzz_catch_fail(void);

// As small as a model gets: one layer of width 4, one head, two experts of width 2, top-1.
// The other keys keep their defaults; a target sets what it needs on top.
void fuzz_tiny_model(ModelConfig *c);
#define FUZZ_CATCH(body) \
    do {                 \
        fuzz_catch_fail(); \
        if (!setjmp(fuzz_fail_jump)) { body; } \
    } while (0)

#endif
