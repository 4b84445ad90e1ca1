// tokenizer.h: text <-> token ids, one interface over three tokenizers (data.tokenizer):
//   bytes          vocabulary 256, token id = byte value: every byte string encodes and
//                  every id below 256 decodes to its byte. The default; no file.
//   hf-bpe         a Hugging Face tokenizer.json, byte-level BPE (bpe.h)
//   sentencepiece  a SentencePiece .model (spm.h, libsentencepiece)
#ifndef MOE_DATA_TOKENIZER_H
#define MOE_DATA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#define TOKENIZER_BYTES_VOCAB 256

typedef enum {
    TOKENIZER_BYTES = 0,
    TOKENIZER_HF_BPE = 1,
    TOKENIZER_SENTENCEPIECE = 2
} TokenizerKind;

// "bytes|hf-bpe|sentencepiece", in TokenizerKind order (a config key's allowed values).
#define TOKENIZER_KIND_NAMES "bytes|hf-bpe|sentencepiece"

typedef struct Tokenizer Tokenizer;

// Opens a tokenizer of `kind` (TokenizerKind) from path (ignored for bytes). Returns
// NULL with err set, naming the file and what is wrong.
Tokenizer *tokenizer_open(int kind, const char *path, char *err, size_t n);
void tokenizer_free(Tokenizer *t);
int tokenizer_kind(const Tokenizer *t);
// One above the largest id the tokenizer produces.
int tokenizer_vocab(const Tokenizer *t);
// Appends the ids of text (len bytes) to *ids (count *n_ids, capacity *cap; grown with
// realloc). Returns 0, or -1 with err set.
int tokenizer_encode(Tokenizer *t, const char *text, size_t len, int32_t **ids,
                     size_t *n_ids, size_t *cap, char *err, size_t n);
// The text of ids, malloc'ed, NUL-terminated, *len bytes before the NUL. An id the
// tokenizer lacks decodes as '?' (bytes) or U+FFFD.
char *tokenizer_decode(const Tokenizer *t, const int32_t *ids, size_t n, size_t *len);

// The byte-level tokenizer without an object: ids (n) = bytes (n); out (n) = ids as
// bytes, '?' for an id outside [0, 256). out is not NUL-terminated.
void tokenizer_encode_bytes(const unsigned char *bytes, size_t n, int32_t *ids);
void tokenizer_decode_bytes(const int32_t *ids, size_t n, char *out);

#endif
