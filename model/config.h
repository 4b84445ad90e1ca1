// config.h: the model's configuration ([model] and [router] INI sections).
//
// Defines ModelConfig, its key tables (defaults, ranges, meanings) and the checks that
// span several keys (heads dividing d_model, top_k <= experts, ...).
#ifndef MOE_MODEL_CONFIG_H
#define MOE_MODEL_CONFIG_H

#include <stddef.h>

#include "../kernels/kernels.h"
#include "../base/keys.h"

typedef enum { NOISE_NONE = 0, NOISE_JITTER = 1, NOISE_SHAZEER = 2 } NoiseKind;

typedef struct {
    // [model]
    int layers;
    int d_model;
    int heads;
    int kv_heads;
    int vocab;
    int seq_len;
    int ffn_dim;          // hidden width of dense (non-MoE) SwiGLU layers
    int moe_every;        // layer i is MoE when (i + 1) % moe_every == 0
    int first_dense_layers;  // layers below this are dense (DeepSeek's first_k_dense_replace)
    int experts;
    int expert_ffn_dim;
    int shared_experts;
    int shared_ffn_dim;
    int tie_embeddings;
    double rope_theta;
    double norm_eps;
    double init_std;
    int qk_norm;          // QkNorm
    int qkv_bias;
    int shared_gate;      // sigmoid gate on the shared experts' sum
    // multi-head latent attention (DeepSeek-V2) and YaRN RoPE
    int attention;        // AttentionKind
    int q_lora_rank;      // 0: one q_proj
    int kv_lora_rank;
    int qk_nope_dim;
    int qk_rope_dim;
    int v_head_dim;
    int rope_scaling;     // RopeScalingKind
    double rope_factor;
    int rope_orig_max_pos;
    double rope_beta_fast;
    double rope_beta_slow;
    double rope_mscale;
    double rope_mscale_all_dim;
    // [router]
    int top_k;
    int score;            // ScoreFunc
    int renorm;
    int noise;            // NoiseKind
    double jitter_eps;
    double capacity_factor;  // <= 0: dropless
    int drop_policy;      // DropPolicy
    double aux_coef;
    double z_coef;
    double noise_coef;
    int aux_scope;        // AuxScope
    int select;           // RouterSelect
    double bias_gamma;    // DeepSeek-V3 expert-bias step (0: off)
    int lb_type;          // LbType
    int groups;           // expert groups (DeepSeek n_group); 1: ungrouped
    int topk_groups;      // groups competing per token (topk_group); 0: all
    int group_score;      // GroupScore
    double gate_scale;    // gates times this (routed_scaling_factor)
    int expert_bias;      // select on score + expert bias even when bias_gamma = 0
} ModelConfig;

typedef enum { ATTENTION_GQA = 0, ATTENTION_MLA = 1 } AttentionKind;
typedef enum { ROPE_SCALING_NONE = 0, ROPE_SCALING_YARN = 1 } RopeScalingKind;
typedef enum { QK_NORM_NONE = 0, QK_NORM_HEAD = 1, QK_NORM_FULL = 2 } QkNorm;
typedef enum { SELECT_TOPK = 0, SELECT_EXPERT_CHOICE = 1, SELECT_HASH = 2 } RouterSelect;
typedef enum { LB_BATCH = 0, LB_SEQ = 1 } LbType;

// Which tokens the aux losses' statistics cover under gradient accumulation.
typedef enum { AUX_SCOPE_BATCH = 0, AUX_SCOPE_MICRO = 1 } AuxScope;

// Sections bound to `cfg`: [0] = model, [1] = router.
#define MODEL_CONFIG_SECTIONS 2
void model_config_sections(ModelConfig *cfg, KeySection out[MODEL_CONFIG_SECTIONS]);
void model_config_defaults(ModelConfig *cfg);
// Cross-key checks. Returns 0, or -1 with a one-line reason naming the keys in err.
int model_config_validate(const ModelConfig *cfg, char *err, size_t err_len);

// Layer l is MoE when l >= first_dense_layers and (l + 1) % moe_every == 0.
int model_config_is_moe_layer(const ModelConfig *cfg, int layer);
int model_config_moe_layers(const ModelConfig *cfg);
// The layer index of the m-th MoE layer (0-based), or -1 past the last.
int model_config_moe_layer(const ModelConfig *cfg, int m);
// Whether selection adds the per-expert bias: router.expert_bias, or bias_gamma > 0
// (balancing updates it). The bias is then model state saved with checkpoints.
int model_config_has_bias(const ModelConfig *cfg);
// The route op's selection and gate settings (topk_groups 0 resolved to groups).
RouteSpec model_config_route_spec(const ModelConfig *cfg);
// Parameters the layout will hold (a double: every key at its maximum overflows nothing).
double model_config_params(const ModelConfig *cfg);
// More parameters than this is refused before anything is allocated (Mixtral 8x22B has
// 1.4e11); the memory a smaller model needs is checked against the machine by model_init.
#define MODEL_MAX_PARAMS 1e12
// The keys that set a model's size, for messages: printf(MODEL_SIZE_KEYS,
// MODEL_SIZE_VALUES(cfg)).
#define MODEL_SIZE_KEYS                                                                     \
    "model.layers = %d, model.d_model = %d, model.experts = %d, model.expert_ffn_dim = %d, " \
    "model.vocab = %d"
#define MODEL_SIZE_VALUES(c) \
    (c)->layers, (c)->d_model, (c)->experts, (c)->expert_ffn_dim, (c)->vocab
// The RoPE of the MLA ops: rope_theta and, under rope_scaling = yarn, YaRN's keys.
RopeSpec model_config_rope(const ModelConfig *cfg);
// MLA's softmax scale: 1/sqrt(qk_nope_dim + qk_rope_dim), times YaRN's
// get_mscale(rope_factor, rope_mscale_all_dim)^2 under rope_scaling = yarn.
double model_config_mla_scale(const ModelConfig *cfg);
// Values the KV cache keeps per layer and position: keys and values (2 KV D), or under
// MLA the latent and the rotated k_pe (kv_lora_rank + qk_rope_dim).
size_t model_config_cache_width(const ModelConfig *cfg);
// Per-expert capacity for N tokens: ceil(k N cf / E); 0 means dropless. Expert choice:
// each expert's C = ceil(N cf / E), cf = capacity_factor, or top_k when that is <= 0.
size_t model_config_capacity(const ModelConfig *cfg, size_t n_tokens);
// Assignment slots per token: top_k, or E under expert choice (a token may get 0..E).
size_t model_config_slots(const ModelConfig *cfg);
// Most routed rows the experts can receive for N tokens.
size_t model_config_max_rows(const ModelConfig *cfg, size_t n_tokens);

#endif
