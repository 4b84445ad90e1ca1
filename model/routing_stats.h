// routing_stats.h: what the router did, accumulated over forward passes.
//
// Defines RoutingStats: per MoE layer and expert, assignments routed (before capacity),
// assignments dropped by capacity and the sum of their gates, over however many forward
// passes were accumulated (micro-batches of a step, or an evaluation). The logs, the
// metrics files and the end-of-run usage table all read it.
#ifndef MOE_ROUTING_STATS_H
#define MOE_ROUTING_STATS_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

typedef struct {
    int n_layers;        // MoE layers
    int experts;
    int top_k;
    uint64_t tokens;     // tokens seen (per layer)
    uint64_t *routed;    // (n_layers, E) assignments before capacity
    uint64_t *dropped;   // (n_layers, E) assignments dropped by capacity
    double *gate_sum;    // (n_layers, E) sum of gates of routed assignments
    double *entropy_sum; // (n_layers) sum over tokens of the router distribution's entropy
    double *lse_sum;     // (n_layers) sum over tokens of logsumexp(router logits)
} RoutingStats;

void routing_stats_init(RoutingStats *rs, const ModelConfig *cfg);
void routing_stats_free(RoutingStats *rs);
void routing_stats_reset(RoutingStats *rs);
// Adds the last forward pass of m, counting only its first `rows` sequences.
void routing_stats_add(RoutingStats *rs, const Model *m, size_t rows);
// dst += src (same model shape): e.g. steps into an evaluation window.
void routing_stats_merge(RoutingStats *dst, const RoutingStats *src);

// DeepSeek-V3 expert-bias balancing after an optimizer step: per MoE layer,
// b_i += gamma * sign(mean load - load_i) with loads = rs's routed counts (the whole
// step). Skipped for layers whose router is frozen.
void routing_update_expert_bias(Model *m, const RoutingStats *rs, double gamma);

// Per MoE layer l (0..n_layers-1): dropped assignments / routed; MaxVio =
// (max_i load_i - mean load) / mean load; mean router entropy (nats; the scores made a
// distribution per token) and mean router logsumexp over tokens (0 without a learned
// router); experts that received no assignment.
double routing_layer_dropped(const RoutingStats *rs, int l);
double routing_layer_maxvio(const RoutingStats *rs, int l);
double routing_layer_entropy(const RoutingStats *rs, int l);
double routing_layer_lse(const RoutingStats *rs, int l);
int routing_layer_dead(const RoutingStats *rs, int l);

// Dropped assignments / all assignments, over every layer.
double routing_dropped_fraction(const RoutingStats *rs);
// The per-layer measures averaged over MoE layers (dead: summed).
double routing_maxvio(const RoutingStats *rs);
double routing_entropy(const RoutingStats *rs);
double routing_lse(const RoutingStats *rs);
int routing_dead(const RoutingStats *rs);

#endif
