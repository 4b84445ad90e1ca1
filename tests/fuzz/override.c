// Fuzz target: command-line override words (`section.key=value`, train/config.c and
// base/keys.c), one per input line, as `moe train config.ini WORD...` applies them.
#include <stdlib.h>
#include <string.h>

#include "../../train/config.h"
#include "fuzzlib.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static RunConfig rc;
    char err[1024];
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = '\0';
    run_config_defaults(&rc);
    for (char *word = text, *next; word; word = next) {
        next = strchr(word, '\n');
        if (next) *next++ = '\0';
        if (run_config_override(&rc, word, err, sizeof err) != 0) fuzz_check_error(err);
    }
    if (run_config_validate(&rc, err, sizeof err) != 0) fuzz_check_error(err);
    free(text);
    return 0;
}
