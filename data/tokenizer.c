#include "tokenizer.h"

#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "bpe.h"
#include "spm.h"

struct Tokenizer {
    int kind;   // TokenizerKind
    Bpe *bpe;
    SpmModel *spm;
};

void tokenizer_encode_bytes(const unsigned char *bytes, size_t n, int32_t *ids) {
    for (size_t i = 0; i < n; i++) ids[i] = bytes[i];
}

void tokenizer_decode_bytes(const int32_t *ids, size_t n, char *out) {
    for (size_t i = 0; i < n; i++)
        out[i] = (ids[i] >= 0 && ids[i] < TOKENIZER_BYTES_VOCAB) ? (char)ids[i] : '?';
}

Tokenizer *tokenizer_open(int kind, const char *path, char *err, size_t n) {
    Tokenizer *t = CALLOC(1, sizeof *t);
    t->kind = kind;
    if (kind == TOKENIZER_HF_BPE) t->bpe = bpe_open(path, err, n);
    if (kind == TOKENIZER_SENTENCEPIECE) t->spm = spm_open(path, err, n);
    if ((kind == TOKENIZER_HF_BPE && !t->bpe) || (kind == TOKENIZER_SENTENCEPIECE && !t->spm)) {
        free(t);
        return NULL;
    }
    CHECK(kind >= TOKENIZER_BYTES && kind <= TOKENIZER_SENTENCEPIECE, "tokenizer kind %d", kind);
    return t;
}

void tokenizer_free(Tokenizer *t) {
    if (!t) return;
    bpe_free(t->bpe);
    if (t->spm) spm_free(t->spm);
    free(t);
}

int tokenizer_kind(const Tokenizer *t) { return t->kind; }

int tokenizer_vocab(const Tokenizer *t) {
    if (t->bpe) return bpe_vocab(t->bpe);
    if (t->spm) return spm_vocab(t->spm);
    return TOKENIZER_BYTES_VOCAB;
}

static void reserve(int32_t **ids, size_t *n_ids, size_t *cap, size_t extra) {
    if (*n_ids + extra <= *cap) return;
    size_t grown = 2 * *cap > *n_ids + extra ? 2 * *cap : *n_ids + extra;
    int32_t *g = realloc(*ids, grown * sizeof *g);
    CHECK(g, "out of memory growing a token stream to %zu ids", grown);
    *ids = g;
    *cap = grown;
}

int tokenizer_encode(Tokenizer *t, const char *text, size_t len, int32_t **ids,
                     size_t *n_ids, size_t *cap, char *err, size_t n) {
    if (len == 0) return 0;
    if (t->bpe) return bpe_encode(t->bpe, text, len, ids, n_ids, cap, err, n);
    if (t->kind == TOKENIZER_BYTES) {
        reserve(ids, n_ids, cap, len);
        tokenizer_encode_bytes((const unsigned char *)text, len, *ids + *n_ids);
        *n_ids += len;
        return 0;
    }
    size_t got = 0;
    int32_t *out = spm_encode(t->spm, text, len, &got, err, n);
    if (!out) return -1;
    reserve(ids, n_ids, cap, got);
    memcpy(*ids + *n_ids, out, got * sizeof *out);
    *n_ids += got;
    free(out);
    return 0;
}

char *tokenizer_decode(const Tokenizer *t, const int32_t *ids, size_t n, size_t *len) {
    if (t->bpe) return bpe_decode(t->bpe, ids, n, len);
    if (t->spm) {
        char *s = spm_decode(t->spm, ids, n, len);
        CHECK(s, "out of memory decoding %zu tokens", n);
        return s;
    }
    char *s = CALLOC(n + 1, 1);
    tokenizer_decode_bytes(ids, n, s);
    *len = n;
    return s;
}
