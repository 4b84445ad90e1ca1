// Fuzz target: a CSV text source (data/csvtext.c over libcsv), column "text".
#include "../../data/sources.h"
#include "fuzzlib.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    TokenStream s = {0};
    char err[1024];
    if (source_read_csv(fuzz_write_file(data, size), "text", &s, err, sizeof err) != 0)
        fuzz_check_error(err);
    token_stream_free(&s);
    return 0;
}
