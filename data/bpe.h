// bpe.h: Hugging Face tokenizer.json byte-level BPE (GPT-2, Llama-3, Qwen, OLMoE style).
//
// What is read, and refused otherwise (naming the JSON key and value):
//   normalizer      null or NFC (libunistring)
//   pre_tokenizer   ByteLevel (its GPT-2 regex when use_regex, add_prefix_space), or a
//                   Sequence of Split {Regex, behavior Isolated, invert false} then ByteLevel
//   model           BPE: vocab, merges ("a b" or ["a", "b"]), ignore_merges; no
//                   byte_fallback, no subword prefix or suffix
//   decoder         ByteLevel (or null)
//   added_tokens    matched first, leftmost-longest, in the raw text (special or not)
// The post_processor (BOS/EOS templates) is not applied: text encodes to its tokens only.
// Regexes run through PCRE2 (UTF, Unicode properties, JIT where available); bytes that
// are not valid UTF-8 match no class and are encoded as their byte-level symbols.
#ifndef MOE_DATA_BPE_H
#define MOE_DATA_BPE_H

#include <stddef.h>
#include <stdint.h>

typedef struct Bpe Bpe;

// Loads path. Returns NULL with err set (naming the file and what is wrong).
Bpe *bpe_open(const char *path, char *err, size_t n);
void bpe_free(Bpe *b);
// One above the largest id (vocab and added tokens).
int bpe_vocab(const Bpe *b);
// Appends the ids of text (len bytes) to *ids (capacity *cap, count *n_ids; realloc'ed).
// Returns 0, or -1 with err set (an input NFC cannot normalise).
int bpe_encode(Bpe *b, const char *text, size_t len, int32_t **ids, size_t *n_ids,
               size_t *cap, char *err, size_t n);
// The text of ids, malloc'ed (NUL-terminated, *len bytes before it); an id with no token
// decodes as U+FFFD.
char *bpe_decode(const Bpe *b, const int32_t *ids, size_t n, size_t *len);

#endif
