// tokenizer.h: the byte-level tokenizer (vocabulary 256: token id = byte value).
//
// No merges and no special tokens: every byte string encodes, and every id below 256
// decodes back to the byte it came from.
#ifndef MOE_DATA_TOKENIZER_H
#define MOE_DATA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#define TOKENIZER_VOCAB 256

// ids (n) = bytes (n).
void tokenizer_encode(const unsigned char *bytes, size_t n, int32_t *ids);
// out (n) = ids (n) as bytes; an id outside the vocabulary (a model with vocab > 256)
// prints as '?'. out is not NUL-terminated.
void tokenizer_decode(const int32_t *ids, size_t n, char *out);

#endif
