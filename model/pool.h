// pool.h: auxiliary-loss statistics pooled over the micro-batches of one optimizer step.
//
// The load-balancing, importance and load losses are not means over tokens: they
// multiply or divide sums over the whole batch. So that gradient accumulation gives the
// same losses and gradients as one large batch (README, "Optimizer"), a step first runs
// every micro-batch forward and pools its routing statistics here; then each micro-batch's
// forward/backward weights its aux-loss gradients by the pooled statistics
// (model_use_pool). Cross-entropy and z-loss are means over tokens and need nothing.
#ifndef MOE_POOL_H
#define MOE_POOL_H

#include <stdint.h>

#include "model.h"

typedef struct {
    int n_layers, experts, micro;   // MoE layers, E, micro-batches added
    int32_t *counts;   // (n_layers, E) assignments before capacity, summed
    double *pmean;     // (n_layers, E) per-micro-batch mean router probability, summed
    double *imp;       // (n_layers, E) Shazeer importance, summed
    double *load;      // (n_layers, E) Shazeer load, summed
    double ce, z;      // per-micro-batch loss means, summed
    double lb;         // per-micro-batch lb, summed (per-sequence lb is a mean already)
} RoutingPool;

void routing_pool_init(RoutingPool *p, const Model *m);
void routing_pool_free(RoutingPool *p);
void routing_pool_reset(RoutingPool *p);
// Adds m's last forward pass (one micro-batch).
void routing_pool_add(RoutingPool *p, const Model *m);
// The losses of the pooled batch as one batch: the values a single forward over every
// micro-batch at once would report.
ModelLosses routing_pool_losses(const RoutingPool *p, const Model *m);
// Makes m's backward use p's statistics (NULL: each micro-batch's own again). Valid for
// micro-batches of equal size, the only kind the trainer makes.
void model_use_pool(Model *m, const RoutingPool *p);

#endif
