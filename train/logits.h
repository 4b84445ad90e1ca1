// logits.h: `moe eval --dump-logits FILE`: the model's logits on real data, for checks
// against other implementations (tests/reference/mixtral_numpy.py reads an export).
#ifndef MOE_LOGITS_H
#define MOE_LOGITS_H

#include "../data/loader.h"
#include "../model/model.h"

// Runs m without router noise on the first validation batch of dl's first domain and
// writes an HDF5 file: /tokens (rows, T) int32, /targets (rows, T) int32 and
// /logits (rows*T, V) float32, rows <= B being the batch's real rows.
void logits_dump(const char *path, Model *m, const DataLoader *dl);

#endif
