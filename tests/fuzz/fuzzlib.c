#include "fuzzlib.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../base/util.h"

jmp_buf fuzz_fail_jump;
static char dir[64];
static char file[128];

static void fuzz_remove_dir(void) {
    char path[256];
    snprintf(path, sizeof path, "rm -rf '%s'", dir);
    if (system(path) != 0) fprintf(stderr, "fuzz: cannot remove %s\n", dir);
}

static const char *fuzz_dir(void) {
    if (!dir[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(dir, sizeof dir, "%s/moe-fuzz-XXXXXX", tmp ? tmp : "/tmp");
        if (!mkdtemp(dir)) {
            perror("fuzz: mkdtemp");
            abort();
        }
        atexit(fuzz_remove_dir);
    }
    return dir;
}

const char *fuzz_write_in_dir(const char *name, const uint8_t *data, size_t size) {
    snprintf(file, sizeof file, "%s/%s", fuzz_dir(), name);
    FILE *f = fopen(file, "wb");
    if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) {
        perror(file);
        abort();
    }
    return file;
}

const char *fuzz_write_file(const uint8_t *data, size_t size) {
    return fuzz_write_in_dir("input", data, size);
}

// The message as moe prints it (util_print_message) must be one line, or one line and a
// HINT line.
void fuzz_check_error(const char *err) {
    char *printed = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&printed, &len);
    util_print_message(f, err);
    fclose(f);
    const char *nl = strchr(printed, '\n');
    int one_line = !nl || (strncmp(nl + 1, "HINT: ", 6) == 0 && !strchr(nl + 1, '\n'));
    if (!err[0] || !one_line) {
        fprintf(stderr, "fuzz: the reader refused the input with %s error: '%s'\n",
                err[0] ? "a multi-line" : "an empty", printed);
        abort();
    }
    free(printed);
}

static void fuzz_on_fail(const char *message) {
    fuzz_check_error(message);
    longjmp(fuzz_fail_jump, 1);
}

void fuzz_catch_fail(void) { util_set_fail_hook(fuzz_on_fail); }
