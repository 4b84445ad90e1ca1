// loader.h: training batches drawn across weighted domains, and validation batches.
//
// Training: each of the B rows of a batch picks a domain with probability proportional
// to its weight, then a uniformly random window of T+1 tokens of that domain's train
// stream: tokens = window[0..T), targets = window[1..T]. Batch k is drawn from an RNG
// seeded by (seed, k) alone, so the sequence of batches is a pure function of the seed
// and the number drawn so far: resuming needs only the cursor, and seeking is O(1).
//
// Validation: per domain, consecutive windows from the start of its val stream, window
// i covering tokens [i*T, i*T + T], using at most val_tokens tokens, grouped into batches
// of up to B rows; the last batch may be short (callers weight by rows).
#ifndef MOE_DATA_LOADER_H
#define MOE_DATA_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "tokenizer.h"

typedef struct DataLoader DataLoader;

// Loads every domain of cfg (all of its files, into memory; text and CSV through tok,
// NULL: bytes) and checks that each token id is below vocab and each stream holds at
// least T+1 tokens. A domain with no val source holds out the last data.val_fraction of
// its train tokens (and prints how many). Returns 0, or -1 with a one-line error naming
// the domain and the file.
int data_loader_open(DataLoader **out, const DataConfig *cfg, int vocab, Tokenizer *tok,
                     size_t B, size_t T, uint64_t seed, char *err, size_t n);
void data_loader_close(DataLoader *dl);

// The next training batch: tokens (B, T), targets (B, T), row_domain (B) or NULL.
void data_loader_next(DataLoader *dl, int32_t *tokens, int32_t *targets, int32_t *row_domain);

int data_loader_domains(const DataLoader *dl);
const char *data_loader_domain_name(const DataLoader *dl, int d);
size_t data_loader_train_tokens(const DataLoader *dl, int d);

size_t data_loader_val_batches(const DataLoader *dl, int d);
// Fills batch i of domain d: tokens (rows, T), targets (rows, T). Returns rows (<= B).
size_t data_loader_val_batch(const DataLoader *dl, int d, size_t i, int32_t *tokens,
                             int32_t *targets);

// Batches drawn so far: all the state a checkpoint needs to resume the data order.
uint64_t data_loader_cursor(const DataLoader *dl);
// Makes the next batch the one a fresh loader would draw after `batches_drawn`.
void data_loader_seek(DataLoader *dl, uint64_t batches_drawn);

#endif
