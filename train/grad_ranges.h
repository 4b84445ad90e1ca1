// grad_ranges.h: what the data-parallel gradient sum sends: the parameter slab's
// trainable tensors as maximal runs of consecutive elements.
//
// A frozen tensor's gradient is zero on every rank (per-expert freezing, ESFT), so
// summing it would only move zeros; the runs leave it out. A run holds routed experts'
// tensors only or none: under expert parallelism those are summed over the ranks that
// hold the same experts (DIST_EXPERT_REPLICAS), the others over every rank. GradRanges is
// built once from the layout and the trainable flags, in slab order.
#ifndef MOE_TRAIN_GRAD_RANGES_H
#define MOE_TRAIN_GRAD_RANGES_H

#include <stddef.h>
#include <stdint.h>

#include "../model/layout.h"

typedef struct {
    size_t *offset;   // (n) first element of each run, in the slab
    size_t *numel;    // (n) elements of each run
    uint8_t *experts; // (n) 1: a run of routed experts' tensors
    size_t n;         // runs
    size_t values;    // elements over all runs: the values one sum sends
} GradRanges;

// trainable: one flag per layout tensor, or NULL (every tensor trains: one run).
void grad_ranges_init(GradRanges *g, const Layout *lay, const uint8_t *trainable);
void grad_ranges_free(GradRanges *g);

#endif
