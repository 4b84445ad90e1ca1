// Fuzz target: a Hugging Face tokenizer.json (data/bpe.c), opened as `moe tokenize` and a
// run open it. A refusal must be one line; a tokenizer that loads then encodes a fixed
// text and the input itself, and decodes what it encoded.
#include <stdlib.h>
#include <string.h>

#include "../../data/tokenizer.h"
#include "fuzzlib.h"

static void encode_decode(Tokenizer *t, const char *text, size_t len) {
    int32_t *ids = NULL;
    size_t n = 0, cap = 0, out_len;
    char err[512];
    if (tokenizer_encode(t, text, len, &ids, &n, &cap, err, sizeof err) != 0)
        fuzz_check_error(err);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= tokenizer_vocab(t)) abort();   // a finding: a wild id
    free(tokenizer_decode(t, ids, n, &out_len));
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[1024];
    Tokenizer *t = tokenizer_open(TOKENIZER_HF_BPE, fuzz_write_file(data, size), err, sizeof err);
    if (!t) {
        fuzz_check_error(err);
        return 0;
    }
    static const char text[] = "Hello  world!\n\n  caf\xc3\xa9 \xf0\x9f\x99\x82 <|endoftext|>12345 \xff";
    encode_decode(t, text, sizeof text - 1);
    encode_decode(t, (const char *)data, size);
    tokenizer_free(t);
    return 0;
}
