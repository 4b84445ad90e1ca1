// spm.h: SentencePiece models (.model files) through Debian's libsentencepiece, whose
// API is C++: data/spm.cpp wraps what moe.c uses in these C functions.
#ifndef MOE_DATA_SPM_H
#define MOE_DATA_SPM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct SpmModel SpmModel;

// Loads a .model file. Returns NULL with err set (naming the file).
SpmModel *spm_open(const char *path, char *err, size_t n);
void spm_free(SpmModel *m);
// The number of pieces (ids are below it).
int spm_vocab(const SpmModel *m);
// The ids of text (len bytes), malloc'ed, *n_ids of them. Returns NULL with err set.
int32_t *spm_encode(const SpmModel *m, const char *text, size_t len, size_t *n_ids, char *err,
                    size_t n);
// The text of ids, malloc'ed and NUL-terminated (*len bytes); ids outside the vocabulary
// decode as U+FFFD.
char *spm_decode(const SpmModel *m, const int32_t *ids, size_t n_ids, size_t *len);
// Trains a BPE model of vocab_size pieces on the files inputs (n_inputs) into
// <prefix>.model and <prefix>.vocab. Returns 0, or -1 with err set.
int spm_train_bpe(const char *const *inputs, size_t n_inputs, int vocab_size,
                  const char *prefix, char *err, size_t n);

#ifdef __cplusplus
}
#endif

#endif
