// Fuzz target: the byte-level tokenizer (data/tokenizer.c). Every byte string encodes and
// decodes back to itself; any int32 ids decode to bytes ('?' outside the vocabulary).
#include <stdlib.h>
#include <string.h>

#include "../../data/tokenizer.h"
#include "fuzzlib.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int32_t *ids = malloc((size ? size : 1) * sizeof *ids);
    char *text = malloc(size ? size : 1);
    tokenizer_encode_bytes(data, size, ids);
    tokenizer_decode_bytes(ids, size, text);
    if (memcmp(text, data, size)) abort();   // a finding: the round trip lost a byte
    size_t n = size / sizeof *ids;
    memcpy(ids, data, n * sizeof *ids);
    tokenizer_decode_bytes(ids, n, text);
    for (size_t i = 0; i < n; i++) {
        int in_vocab = ids[i] >= 0 && ids[i] < TOKENIZER_BYTES_VOCAB;
        if (text[i] != (in_vocab ? (char)ids[i] : '?')) abort();   // a finding: a wrong byte
    }
    free(text);
    free(ids);
    return 0;
}
