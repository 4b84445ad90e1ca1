// Fuzz target: an INI config file (train/config.c over libinih, base/keys.c), then the
// validation and the resolved config a run writes.
#include <stdio.h>

#include "../../train/config.h"
#include "fuzzlib.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static RunConfig rc;
    char err[1024];
    run_config_defaults(&rc);
    const char *path = fuzz_write_file(data, size);
    if (run_config_load_ini(&rc, path, err, sizeof err) != 0) return fuzz_check_error(err), 0;
    if (run_config_validate(&rc, err, sizeof err) != 0) return fuzz_check_error(err), 0;
    FILE *out = fopen("/dev/null", "w");
    run_config_write_ini(out, &rc);
    fclose(out);
    return 0;
}
