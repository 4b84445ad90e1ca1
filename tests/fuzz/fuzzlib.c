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

// The message as moe prints it (util_print_message, with the hint at offset hint or none)
// must not be empty, and must be one line, or one line and a HINT line.
static void check_printed(const char *err, long hint) {
    char *printed = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&printed, &len);
    util_print_message(f, err, hint);
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

// A reader's error buffer reaches the user through FAIL("%s", err): no hint of its own.
void fuzz_check_error(const char *err) { check_printed(err, -1); }

static void fuzz_on_fail(const char *message, long hint) {
    check_printed(message, hint);
    longjmp(fuzz_fail_jump, 1);
}

void fuzz_catch_fail(void) { util_set_fail_hook(fuzz_on_fail); }

void fuzz_tiny_model(ModelConfig *c) {
    c->layers = 1;
    c->d_model = 4;
    c->heads = 1;
    c->kv_heads = 1;
    c->experts = 2;
    c->top_k = 1;
    c->expert_ffn_dim = 2;
}
