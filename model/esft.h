// esft.h: which experts serve a domain (Expert-Specialised Fine-Tuning, Wang et al. 2024).
//
// From routing statistics accumulated over a sample of the domain's data (routing.h),
// per MoE layer and expert i, with k = top_k:
//   token score r_i = routed_i / (tokens * k)   the mean over tokens of 1(i selected) / k
//   gate score  g_i = gate_sum_i / tokens        the mean gate given to i (0 when not chosen)
// Routed counts are taken before capacity: ESFT asks what the router prefers, not what
// capacity let through. Each layer's scores are divided by that layer's sum (the public
// ESFT script normalises across layers, ESFT issue #17; we do not), sorted descending
// (ties: lower expert index first), and the layer keeps the shortest prefix whose
// cumulative score reaches p (>= p - 1e-12, so 0.5 + 0.3 reaches 0.8 despite rounding).
// Every layer keeps at least one expert; a layer with no score at all (no gate mass)
// keeps every expert, since nothing says which to drop. The selected experts are then
// the only ones to train (model/trainable.h).
#ifndef MOE_ESFT_H
#define MOE_ESFT_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "routing_stats.h"

typedef enum { ESFT_TOKEN = 0, ESFT_GATE = 1 } EsftScore;

typedef struct {
    int n_layers, experts; // MoE layers (not model layers), experts per layer
    double *score;         // (n_layers, experts) normalised scores of the chosen kind:
                           // points at token or gate, not allocated on its own
    double *token, *gate;  // (n_layers, experts) both normalised scores, for the CSV
    uint8_t *selected;     // (n_layers, experts)
} EsftResult;

// Scores and selects from rs (which must have seen at least one token) with threshold
// p in (0, 1]. Free with esft_free.
void esft_select(EsftResult *out, const RoutingStats *rs, EsftScore kind, double p);
void esft_free(EsftResult *r);

// The selection as a trainable.h expression, "layers.<L>.experts.<J>, ...", in layer then
// expert order, with L the model layer of each MoE layer (MoE layer m is model layer
// model_config_moe_layer). Dies rather than truncate when it does not fit in n bytes:
// a cut expression would train the wrong experts. About 24 bytes per selected expert.
void esft_to_expr(const EsftResult *r, const ModelConfig *cfg, char *out, size_t n);

#endif
