#include "tokenizer.h"

void tokenizer_encode(const unsigned char *bytes, size_t n, int32_t *ids) {
    for (size_t i = 0; i < n; i++) ids[i] = bytes[i];
}

void tokenizer_decode(const int32_t *ids, size_t n, char *out) {
    for (size_t i = 0; i < n; i++)
        out[i] = (ids[i] >= 0 && ids[i] < TOKENIZER_VOCAB) ? (char)ids[i] : '?';
}
