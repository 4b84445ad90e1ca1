// step.h: the forward and backward passes of one optimizer step over its micro-batches,
// shared by the trainer (train.c) and `make bench`, so the benchmark times the trainer's
// own code path.
//
// With router.aux_scope = batch and several micro-batches the aux losses pool routing
// statistics over all of them (model/pool.h) before any backward: either every
// micro-batch keeps its own activations (train.keep_activations: one model replica per
// extra micro-batch) and runs forward once, or each runs forward twice, the first pass
// only to pool. Both give the same bits.
//
// Data parallel (dist/, P ranks): the step's grad_accum micro-batches are split into P
// consecutive blocks, rank r running block r; pooled statistics, losses and gradients are
// summed over the ranks and the router-noise generator continues from the last block, so
// every rank ends the step with the values one process running every micro-batch would
// have (to the order of the floating-point sums). The gradient sum runs layer by layer
// during the last backward (grad_sync.h).
#ifndef MOE_TRAIN_STEP_H
#define MOE_TRAIN_STEP_H

#include "../base/rng.h"
#include "../model/model.h"
#include "../model/pool.h"
#include "grad_sync.h"

typedef struct {
    Model *model;
    Model *replicas; // (accum - 1) activation sets of micro-batches 1..; or NULL
    int accum;       // micro-batches per step this rank runs
    int first;       // the step's micro-batch this rank starts at
    int total;       // micro-batches per step over every rank
    int sum_grads;   // 1: the gradient slab is all-reduced (0: the caller reduces, ZeRO-1)
    int pooled;      // aux statistics pooled over the step's micro-batches
    RoutingPool pool;
    GradSync sync;   // the gradient sum (trainable tensors only), overlapped with the last
                     // backward (sum_grads)
    double pool_seconds; // the last step's pooling forward pass (0 when activations are kept)
} StepRunner;

// For m as it is now (trainable flags and precision set: replicas copy them). accum is the
// step's micro-batches over every rank, a multiple of dist_size() (the caller checks).
void step_runner_init(StepRunner *s, Model *m, int accum, int aux_scope_batch,
                      int keep_activations);
void step_runner_free(StepRunner *s);
// The model micro-batch a runs in: m itself, or its replica when activations are kept.
Model *step_runner_model(StepRunner *s, int a);
// Activation sets held (1, or accum with kept activations).
int step_runner_sets(const StepRunner *s);

// Wall time in seconds once m's device has finished what was issued (timing an
// asynchronous device; plain wall time on the CPU).
double step_clock(const Model *m);

// Called after micro-batch a's backward, while its routing state is still in m.
typedef void (*StepMicroFn)(void *ctx, const Model *m);

// Zeroes the gradients, then runs this rank's micro-batches of batch ((accum, 2, N) int32:
// tokens then targets each, the whole step's) forward and backward, drawing router noise
// from noise in micro-batch order; m's gradients hold the sum over every micro-batch of
// every rank. Returns the step's losses: the mean over micro-batches, or the pooled
// batch's when pooled.
ModelLosses step_runner_run(StepRunner *s, const int32_t *batch, Rng *noise, StepMicroFn after,
                            void *ctx);

#endif
