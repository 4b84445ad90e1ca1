// grad_sync.h: the data-parallel gradient sum overlapped with the backward pass.
//
// The gradient slab is cut into one bucket per decoder layer (layer l's tensors; the
// last layer's bucket also holds the final norm and the untied head) and the embedding's
// (model/layout.h: that is slab order). Backward runs the tape from the end, so layer l's
// gradients are final once its first op's backward has run: from then on its bucket is
// summed over the ranks (dist_sum_start) while backward goes on below it, with
// dist_progress after every op to move the started sums along. The embedding (tied to
// the head or not) is final only at the end of backward: its bucket starts last, then
// the step waits for every bucket. Only the step's last backward on this rank starts
// sums: earlier micro-batches still add into the slab. A bucket sends only its trainable
// runs (grad_ranges.h): frozen tensors' zeros stay home, and routed experts' runs are
// summed over the ranks that hold the same experts.
#ifndef MOE_TRAIN_GRAD_SYNC_H
#define MOE_TRAIN_GRAD_SYNC_H

#include <stddef.h>

#include "../model/model.h"
#include "grad_ranges.h"

typedef struct {
    size_t *lo;    // (layers + 1) slab offset of layer l's first tensor; lo[layers] = total
    int layers;
    int next;      // the next layer whose bucket starts (they start from the last down)
    Model *armed;  // the model whose next backward starts buckets, or NULL
    GradRanges runs; // what the sums send: the trainable tensors' runs of the slab
} GradSync;

// m's layout and trainable flags, as they are now, decide the buckets and runs.
void grad_sync_init(GradSync *g, const Model *m);
void grad_sync_free(GradSync *g);
// m's next backward (m, or a replica sharing its gradients) starts the layer buckets.
void grad_sync_arm(GradSync *g, Model *m);
// Starts the buckets not yet started (the embedding's; every one if nothing was armed),
// waits for all and disarms: the slab then holds the sum over every rank.
void grad_sync_finish(GradSync *g, Model *m);

#endif
