// Fuzz target: a Hugging Face config.json (train/formats/hf_import.c), read the way
// `moe import` reads it. The importer FAILs on a bad file, caught here (fuzzlib.h).
#include <libgen.h>
#include <string.h>

#include "../../train/formats/hf.h"
#include "fuzzlib.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static RunConfig rc;
    char dir[256];
    snprintf(dir, sizeof dir, "%s", fuzz_write_in_dir(HF_CONFIG, data, size));
    FUZZ_CATCH(hf_import_config(dirname(dir), 0, &rc));
    return 0;
}
