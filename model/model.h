// model.h: the Mixtral-style MoE decoder: parameters, run state and its lifecycle.
//
// Defines Model (config, backend, parameter and gradient slabs with a view per tensor,
// the tape and its activation arenas for one batch shape), the per-MoE-layer routing
// state the logs and tests read, and the forward/backward entry points.
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "../kernels/kernels.h"
#include "../base/rng.h"
#include "config.h"
#include "layout.h"
#include "tape.h"

// What the router did in one MoE layer on the last forward pass.
typedef struct {
    int layer;
    Tensor eps;        // (N, E) Shazeer noise draws; data NULL unless noise = shazeer
    Tensor jitter;     // (N, C) jitter factors; data NULL unless noise = jitter
    Tensor idx;        // (N, slots) int32 selected experts, best first
    Tensor gates;      // (N, slots) their gate weights
    Tensor keep;       // (N, slots) int32 1 kept, 0 dropped by capacity / not chosen
    Tensor counts;     // (G, E) int32 assignments per expert before capacity (lb groups)
    Tensor offsets;    // (E+1) int32 kept rows per expert, prefix sums
    size_t slots;      // assignment slots per token: top_k, or E under expert choice
    Tensor bias;       // (E) DeepSeek-V3 expert bias (state, not a parameter)
    Tensor probs;      // (N, E) router probabilities the lb loss uses; NULL without lb
    Tensor lse;        // (N) router logsumexp per token; NULL under hash routing
    Tensor pmean;      // (G, E) mean router probability per lb group (the lb loss's P)
    Tensor lb, z;      // (1) unscaled load-balancing and z losses
    Tensor importance, load;   // (1) Shazeer CV^2 losses; data NULL unless shazeer
    Tensor imp, load_sums;     // (E) Shazeer importance and load per expert
    // Statistics pooled over an optimizer batch's micro-batches (model/pool.h) and the
    // tape ops whose backward uses them.
    Tensor pooled_counts, pooled_imp, pooled_load;   // (E) each
    size_t lb_op, importance_op, load_op;
    size_t experts_op;   // the routed experts' op (expert parallelism replaces its compute)
} MoeLayerState;

// Losses of the last forward pass. Aux losses are unscaled means over MoE layers;
// total = ce + aux_coef*lb + z_coef*z + noise_coef*(importance + load).
typedef struct {
    double total, ce, lb, z, importance, load;
} ModelLosses;

typedef struct {
    ModelConfig cfg;
    const Backend *be;
    Layout layout;
    Tensor params;     // (layout.total) every weight
    Tensor grads;      // (layout.total) their gradients, same layout
    size_t B, T, N;    // batch shape the tape was planned for, N = B*T
    Tape tape;
    Arena acts;        // activations
    Arena dacts;       // activation gradients (zeroed each backward)
    Tensor tokens;     // (N) int32 inputs
    Tensor targets;    // (N) int32 next tokens
    Buf logits;        // (N, V)
    Tensor ce;         // (1)
    MoeLayerState *moe;
    int n_moe;
    size_t *block_op;  // (layers) tape index of each decoder layer's first op
    ModelLosses losses;
    uint8_t *trainable;      // (layout.n_params) 1 trains, 0 frozen; NULL: all train
    uint8_t *expert_train;   // (n_moe, E) the same flags per routed expert, for the experts op
    Tensor expert_bias;      // (n_moe, E) DeepSeek-V3 selection bias, zero at init
    // Generation (model_init_decode); cache_len 0 on a training model.
    size_t cache_len;        // L positions kept per sequence
    Tensor kv_cache;         // (layers, 2, B, L, KV*D) keys, then values, after QK-norm and RoPE;
                             // MLA: (layers, B*L*(R + Dr)) latents (B, L, R), then rotated
                             // k_pe (B, L, Dr)
    Tensor positions;        // (B) int32 the position of each row's token
} Model;

// Plans the tape and allocates everything for batches of B sequences of T tokens.
void model_init(Model *m, const ModelConfig *cfg, const Backend *be, size_t B, size_t T);
// A shard of the model (expert parallelism): the same, holding only routed experts
// [expert_lo, expert_hi) of every MoE layer (layout_init_experts). Its routed experts op
// cannot run alone: a shard op (kernels/expert_shard.h) must compute it.
void model_init_experts(Model *m, const ModelConfig *cfg, const Backend *be, size_t B,
                        size_t T, int expert_lo, int expert_hi);
void model_free(Model *m);

// A model for generation: B sequences of one new token each per forward, attending to
// up to L earlier positions kept in a KV cache. Every op of the training tape runs on
// the B rows but attention, which becomes attention_decode (RoPE at each row's position,
// append to the cache, attend). Routing is dropless whatever router.capacity_factor says
// (docs/routing.md, "Routing at inference"); router noise is off. Refuses
// router.select = expert_choice, which one token at a time does not define. Copy the
// weights (and expert_bias) in; forward only.
void model_init_decode(Model *m, const ModelConfig *cfg, const Backend *be, size_t B,
                       size_t L);
// The position of each row's token in its sequence (B), each < L; set with the batch.
void model_set_positions(Model *m, const int32_t *pos);

// A second set of activations for m's parameters, so that several micro-batches' forward
// passes can wait for their backward passes (router.aux_scope = batch pools routing
// statistics over all of them first) without running forward twice. Shares m's
// parameters, gradients, expert bias, layout and activation-gradient arena (backward
// passes run one at a time); has its own tape, activations and routing state, with m's
// trainable flags and precision as they are now. Free it with model_free_replica, before m.
void model_init_replica(Model *r, const Model *m);
void model_free_replica(Model *r);

// Scaled-normal init (see README): N(0, init_std), output projections (o_proj, w2,
// down_proj) N(0, init_std / sqrt(2 * layers)), norms 1. Router gate N(0, init_std);
// with Shazeer noise the gate and noise weights start at zero as in the paper.
void model_init_weights(Model *m, uint64_t seed);

// Test weights: every matrix N(0, 1/fan_in), norms 1 + N(0, 0.1^2), expert biases
// N(0, 0.2^2) when bias balancing is on, so that routing is spread and every gradient is
// informative (the gradient tests and `moe dump` use it).
void model_randomize_weights(Model *m, uint64_t seed);

// Freezes every tensor whose flag is 0 (one flag per layout tensor; NULL: all train):
// frozen tensors get no weight-gradient computation (input gradients still flow) and
// their entries in m->grads stay zero. A fused op's tensors (q|k|v, one SwiGLU's w1|w3|w2)
// must agree; violating that is a caller bug and dies.
void model_set_trainable(Model *m, const uint8_t *trainable);

// bf16 != 0: matrix products (but the router's) round their operands to bfloat16 and
// accumulate in fp32 (Backend.set_gemm_bf16); the backend may then run a fused bf16
// attention (Backend.attention_plan), keep the experts' intermediates in bf16
// (Backend.experts_state_dtype) and keep a bf16 copy of the weights for its products
// (Backend.set_bf16_weights: the fp32 weights become master weights). Weights,
// gradients, optimizer state and the other activations stay fp32. A change plans the
// activations again: call it before model_init_replica and before holding views into
// them. Returns -1 with a reason when the backend has no bf16 products.
int model_set_precision(Model *m, int bf16, char *err, size_t n);

// The view of one parameter tensor and of its gradient.
Tensor model_param(const Model *m, const ParamInfo *p);
Tensor model_grad(const Model *m, const ParamInfo *p);

// Training noise for the next forward: Shazeer eps ~ N(0,1), jitter u ~ U[1-e, 1+e].
void model_draw_noise(Model *m, Rng *rng);
// No noise (evaluation): eps = 0, u = 1.
void model_clear_noise(Model *m);

// Copies a batch of N token ids and N targets into the model's input buffers.
void model_set_batch(Model *m, const int32_t *tokens, const int32_t *targets);
ModelLosses model_forward(Model *m);
void model_zero_grad(Model *m);
// Accumulates d(total loss)/d(params) into m->grads.
void model_backward(Model *m);

// What model_init(cfg, be, B, T) and model_set_trainable(trainable; NULL: all) would
// allocate, in bytes, measured by the tape's planning pass without allocating any of it
// (moe plan): parameters (gradients are as large), activations and their gradients, the
// expert bias; and the trainable parameter count (AdamW keeps two values for each).
typedef struct {
    size_t params, acts, dacts, expert_bias;
    size_t trainable;
} ModelPlan;
void model_plan(const ModelConfig *cfg, const Backend *be, size_t B, size_t T,
                const uint8_t *trainable, ModelPlan *out);

#endif
