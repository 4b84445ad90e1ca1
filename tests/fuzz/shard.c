// Fuzz target: an llm.c token shard (data/shards.c): header checks, then the tokens.
#include "../../data/sources.h"
#include "fuzzlib.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    TokenStream s = {0};
    char err[1024];
    if (source_read_shard(fuzz_write_file(data, size), &s, err, sizeof err) != 0)
        fuzz_check_error(err);
    token_stream_free(&s);
    return 0;
}
