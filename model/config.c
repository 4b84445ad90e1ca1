#include "config.h"

#include <math.h>
#include <stdio.h>

#include "../kernels/rope_math.h"
#include "../kernels/router_math.h"

#define MK(field) offsetof(ModelConfig, field)

static const ConfigKey model_keys[] = {
    {"layers", KEY_INT, MK(layers), "2", 1, 256, NULL, "transformer blocks"},
    {"d_model", KEY_INT, MK(d_model), "64", 2, 65536, NULL, "residual stream width C"},
    {"heads", KEY_INT, MK(heads), "4", 1, 1024, NULL,
     "query heads (must divide d_model under attention = gqa)"},
    {"kv_heads", KEY_INT, MK(kv_heads), "4", 1, 1024, NULL,
     "key/value heads, grouped-query attention when < heads (must divide heads)"},
    {"vocab", KEY_INT, MK(vocab), "256", 2, 1 << 24, NULL, "vocabulary size (256: bytes)"},
    {"seq_len", KEY_INT, MK(seq_len), "64", 1, 1 << 20, NULL, "context length T"},
    {"ffn_dim", KEY_INT, MK(ffn_dim), "128", 1, 1 << 20, NULL,
     "hidden width of dense SwiGLU layers (those that are not MoE)"},
    {"moe_every", KEY_INT, MK(moe_every), "1", 1, 256, NULL,
     "layer i is MoE when (i+1) % moe_every == 0 (1: all, 2: every other)"},
    {"first_dense_layers", KEY_INT, MK(first_dense_layers), "0", 0, 256, NULL,
     "layers below this index are dense SwiGLU whatever moe_every says (DeepSeek's "
     "first_k_dense_replace)"},
    {"experts", KEY_INT, MK(experts), "4", 1, 4096, NULL, "routed experts per MoE layer E"},
    {"expert_ffn_dim", KEY_INT, MK(expert_ffn_dim), "64", 1, 1 << 20, NULL,
     "hidden width F of each routed expert"},
    {"shared_experts", KEY_INT, MK(shared_experts), "0", 0, 64, NULL,
     "always-on experts added to every token (DeepSeekMoE)"},
    {"shared_ffn_dim", KEY_INT, MK(shared_ffn_dim), "64", 1, 1 << 20, NULL,
     "hidden width of each shared expert"},
    {"tie_embeddings", KEY_BOOL, MK(tie_embeddings), "true", 0, 1, NULL,
     "lm_head reuses embed_tokens"},
    {"rope_theta", KEY_DOUBLE, MK(rope_theta), "10000", 1, 1e12, NULL, "RoPE base"},
    {"norm_eps", KEY_DOUBLE, MK(norm_eps), "1e-5", 0, 1, NULL, "RMSNorm epsilon"},
    {"init_std", KEY_DOUBLE, MK(init_std), "0.02", 0, 10, NULL,
     "std of the normal weight init (output projections scaled by 1/sqrt(2*layers))"},
    {"attention", KEY_ENUM, MK(attention), "gqa", 0, 0, "gqa|mla",
     "grouped-query attention, or DeepSeek-V2's multi-head latent attention (keys and values "
     "from a kv_lora_rank latent; kv_heads unused)"},
    {"q_lora_rank", KEY_INT, MK(q_lora_rank), "0", 0, 1 << 20, NULL,
     "mla: width of the compressed query (q_a_proj, q_a_layernorm, q_b_proj); 0: one q_proj"},
    {"kv_lora_rank", KEY_INT, MK(kv_lora_rank), "0", 0, 1 << 20, NULL,
     "mla: width of the key/value latent (kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj)"},
    {"qk_nope_dim", KEY_INT, MK(qk_nope_dim), "0", 0, 1 << 16, NULL,
     "mla: query/key values per head without RoPE (qk_nope_head_dim)"},
    {"qk_rope_dim", KEY_INT, MK(qk_rope_dim), "0", 0, 1 << 16, NULL,
     "mla: query/key values per head with RoPE, the key's shared by all heads "
     "(qk_rope_head_dim, even)"},
    {"v_head_dim", KEY_INT, MK(v_head_dim), "0", 0, 1 << 16, NULL, "mla: value width per head"},
    {"rope_scaling", KEY_ENUM, MK(rope_scaling), "none", 0, 0, "none|yarn",
     "RoPE frequency scaling: none, or YaRN (DeepSeek-V2/V3; attention = mla only)"},
    {"rope_factor", KEY_DOUBLE, MK(rope_factor), "1", 1, 1e6, NULL,
     "yarn: context extension factor (rope_scaling.factor)"},
    {"rope_orig_max_pos", KEY_INT, MK(rope_orig_max_pos), "4096", 1, 1 << 30, NULL,
     "yarn: the pre-training context (original_max_position_embeddings)"},
    {"rope_beta_fast", KEY_DOUBLE, MK(rope_beta_fast), "32", 1e-6, 1e6, NULL,
     "yarn: rotations below which a frequency is extrapolated (beta_fast)"},
    {"rope_beta_slow", KEY_DOUBLE, MK(rope_beta_slow), "1", 1e-6, 1e6, NULL,
     "yarn: rotations above which a frequency is interpolated (beta_slow)"},
    {"rope_mscale", KEY_DOUBLE, MK(rope_mscale), "1", 0, 1e3, NULL,
     "yarn: mscale; cos and sin are scaled by get_mscale(factor, mscale) / "
     "get_mscale(factor, mscale_all_dim) when both are non-zero, else get_mscale(factor)"},
    {"rope_mscale_all_dim", KEY_DOUBLE, MK(rope_mscale_all_dim), "0", 0, 1e3, NULL,
     "yarn: mscale_all_dim; the softmax scale is multiplied by "
     "get_mscale(factor, mscale_all_dim)^2"},
    {"qk_norm", KEY_ENUM, MK(qk_norm), "none", 0, 0, "none|head|full",
     "RMSNorm on queries and keys before RoPE: per head (Qwen3-MoE) or over each whole "
     "projection (OLMoE)"},
    {"qkv_bias", KEY_BOOL, MK(qkv_bias), "false", 0, 1, NULL,
     "biases on the q, k and v projections (Qwen2-MoE)"},
    {"shared_gate", KEY_BOOL, MK(shared_gate), "false", 0, 1, NULL,
     "scale the shared experts' sum by sigmoid(x . w) per token (Qwen2-MoE)"},
};

static const ConfigKey router_keys[] = {
    {"top_k", KEY_INT, MK(top_k), "2", 1, MOE_TOPK_MAX, NULL, "experts per token k"},
    {"score", KEY_ENUM, MK(score), "softmax", 0, 0, "softmax|sigmoid",
     "router score function"},
    {"renorm", KEY_BOOL, MK(renorm), "true", 0, 1, NULL,
     "renormalise the k selected scores to sum to 1 (Mixtral)"},
    {"noise", KEY_ENUM, MK(noise), "none", 0, 0, "none|jitter|shazeer",
     "training-time router noise: Switch jitter or Shazeer's learned softplus noise"},
    {"jitter_eps", KEY_DOUBLE, MK(jitter_eps), "0.01", 0, 1, NULL,
     "jitter: router input times U[1-eps, 1+eps]"},
    {"capacity_factor", KEY_DOUBLE, MK(capacity_factor), "0", -1, 1000, NULL,
     "capacity ceil(k*N*cf/E) per expert; <= 0 is dropless"},
    {"drop_policy", KEY_ENUM, MK(drop_policy), "position", 0, 0, "position|probs",
     "which assignments a full expert keeps: earlier choice/token, or highest gate"},
    {"aux_coef", KEY_DOUBLE, MK(aux_coef), "0.01", 0, 1e3, NULL,
     "load-balancing loss coefficient (loss is 1.0 when balanced)"},
    {"z_coef", KEY_DOUBLE, MK(z_coef), "0.001", 0, 1e3, NULL, "router z-loss coefficient"},
    {"noise_coef", KEY_DOUBLE, MK(noise_coef), "0.01", 0, 1e3, NULL,
     "Shazeer importance and load (CV^2) loss coefficient"},
    {"select", KEY_ENUM, MK(select), "topk", 0, 0, "topk|expert_choice|hash",
     "token choice top-k; expert choice (each expert takes its top-C tokens, Zhou et al. "
     "2022); or hash routing (fixed hash of the token id, no learned router)"},
    {"bias_gamma", KEY_DOUBLE, MK(bias_gamma), "0", 0, 1, NULL,
     "DeepSeek-V3 expert-bias balancing step (0: off; 0.001 in the paper): select on "
     "score + bias, b_i += gamma * sign(mean load - load_i) after each step"},
    {"lb_type", KEY_ENUM, MK(lb_type), "batch", 0, 0, "batch|seq",
     "load-balancing loss over the whole batch, or per sequence then averaged (DeepSeek)"},
    {"aux_scope", KEY_ENUM, MK(aux_scope), "batch", 0, 0, "batch|micro",
     "aux-loss statistics over the optimizer batch (exact under grad_accum; one extra "
     "forward per micro-batch) or each micro-batch"},
    {"groups", KEY_INT, MK(groups), "1", 1, MOE_GROUPS_MAX, NULL,
     "expert groups of E/groups consecutive experts (DeepSeek n_group; 1: ungrouped)"},
    {"topk_groups", KEY_INT, MK(topk_groups), "0", 0, MOE_GROUPS_MAX, NULL,
     "only the experts of this many best groups compete for the top-k (DeepSeek "
     "topk_group; 0: all groups)"},
    {"group_score", KEY_ENUM, MK(group_score), "max", 0, 0, "max|top2",
     "a group's score: its best selection score (DeepSeek-V2 group_limited_greedy) or the "
     "sum of its two best (V3 noaux_tc)"},
    {"gate_scale", KEY_DOUBLE, MK(gate_scale), "1", 1e-6, 1e6, NULL,
     "the gates times this, after renorm (DeepSeek routed_scaling_factor)"},
    {"expert_bias", KEY_BOOL, MK(expert_bias), "false", 0, 1, NULL,
     "select on score + per-expert bias (DeepSeek-V3 e_score_correction_bias) even with "
     "bias_gamma = 0 (an imported or frozen bias); bias_gamma > 0 also turns it on"},
};

void model_config_sections(ModelConfig *cfg, KeySection out[MODEL_CONFIG_SECTIONS]) {
    out[0] = (KeySection){"model", model_keys, sizeof model_keys / sizeof *model_keys, cfg};
    out[1] = (KeySection){"router", router_keys, sizeof router_keys / sizeof *router_keys, cfg};
}

void model_config_defaults(ModelConfig *cfg) {
    KeySection s[MODEL_CONFIG_SECTIONS];
    model_config_sections(cfg, s);
    for (int i = 0; i < MODEL_CONFIG_SECTIONS; i++) keys_set_defaults(&s[i]);
}

// Group-limited routing (DeepSeek-V2/V3): groups of equal size, enough experts in the
// kept groups for k, and only where selection is token-choice top-k on learned scores
// (Shazeer's load loss is written for plain top-k).
static int validate_groups(const ModelConfig *c, char *err, size_t n) {
    int G = c->groups, TG = c->topk_groups ? c->topk_groups : c->groups;
    if (c->experts % G)
        return snprintf(err, n, "router.groups = %d must divide model.experts = %d", G,
                        c->experts), -1;
    if (TG > G)
        return snprintf(err, n, "router.topk_groups = %d exceeds router.groups = %d", TG, G), -1;
    if (c->top_k > TG * (c->experts / G))
        return snprintf(err, n, "router.top_k = %d exceeds the %d experts of router.topk_groups "
                        "= %d groups of %d", c->top_k, TG * (c->experts / G), TG,
                        c->experts / G), -1;
    if (TG == G) return 0;
    if (c->group_score == GROUP_SCORE_TOP2 && c->experts / G < 2)
        return snprintf(err, n, "router.group_score = top2 needs at least 2 experts per group "
                        "(model.experts / router.groups = %d)", c->experts / G), -1;
    if (c->select != SELECT_TOPK)
        return snprintf(err, n, "router.topk_groups = %d < router.groups = %d needs "
                        "router.select = topk (groups limit token-choice top-k)", TG, G), -1;
    if (c->noise == NOISE_SHAZEER)
        return snprintf(err, n, "router.topk_groups = %d < router.groups = %d and router.noise = "
                        "shazeer do not combine: the load loss assumes plain top-k", TG, G), -1;
    return 0;
}

// The MLA keys that must be set, and what MLA does not combine with.
static int validate_mla(const ModelConfig *c, char *err, size_t n) {
    const struct { const char *key; int v; } need[] = {
        {"kv_lora_rank", c->kv_lora_rank}, {"qk_nope_dim", c->qk_nope_dim},
        {"qk_rope_dim", c->qk_rope_dim}, {"v_head_dim", c->v_head_dim}};
    for (size_t i = 0; i < sizeof need / sizeof *need; i++)
        if (need[i].v <= 0)
            return snprintf(err, n, "model.attention = mla needs model.%s > 0", need[i].key), -1;
    if (c->qk_rope_dim % 2)
        return snprintf(err, n, "model.qk_rope_dim = %d must be even for RoPE", c->qk_rope_dim),
               -1;
    if (c->qk_norm != QK_NORM_NONE || c->qkv_bias)
        return snprintf(err, n, "model.attention = mla has no q/k/v projections for "
                                "model.qk_norm or model.qkv_bias; set them to none/false"), -1;
    return 0;
}

int model_config_validate(const ModelConfig *c, char *err, size_t n) {
    if (c->attention == ATTENTION_MLA) {
        if (validate_mla(c, err, n)) return -1;
    } else if (c->rope_scaling != ROPE_SCALING_NONE) {
        return snprintf(err, n, "model.rope_scaling = yarn needs model.attention = mla (the "
                                "grouped-query attention has plain RoPE only)"), -1;
    } else if (c->q_lora_rank || c->kv_lora_rank) {
        return snprintf(err, n, "model.q_lora_rank / model.kv_lora_rank need model.attention "
                                "= mla"), -1;
    }
    if (c->attention == ATTENTION_GQA && c->d_model % c->heads)
        return snprintf(err, n, "model.heads = %d must divide model.d_model = %d", c->heads,
                        c->d_model), -1;
    if (c->attention == ATTENTION_GQA && (c->d_model / c->heads) % 2)
        return snprintf(err, n, "model.d_model / model.heads = %d must be even for RoPE",
                        c->d_model / c->heads), -1;
    if (c->attention == ATTENTION_GQA && c->heads % c->kv_heads)
        return snprintf(err, n, "model.kv_heads = %d must divide model.heads = %d",
                        c->kv_heads, c->heads), -1;
    if (c->top_k > c->experts)
        return snprintf(err, n, "router.top_k = %d exceeds model.experts = %d", c->top_k,
                        c->experts), -1;
    if (c->noise == NOISE_SHAZEER && c->top_k >= c->experts)
        return snprintf(err, n,
                        "router.noise = shazeer needs router.top_k (%d) < model.experts (%d): "
                        "its load loss compares against the (k+1)-th expert",
                        c->top_k, c->experts), -1;
    if (c->select != SELECT_TOPK && c->noise == NOISE_SHAZEER)
        return snprintf(err, n, "router.noise = shazeer needs router.select = topk (its load "
                                "loss is defined for token-choice top-k)"), -1;
    if (c->select == SELECT_HASH && c->noise != NOISE_NONE)
        return snprintf(err, n, "router.select = hash has no router to add noise to; set "
                                "router.noise = none"), -1;
    if (c->noise == NOISE_SHAZEER && model_config_has_bias(c))
        return snprintf(err, n, "router.noise = shazeer and an expert bias (router.bias_gamma > 0 "
                                "or router.expert_bias = true) do not combine: the load loss "
                                "assumes selection on the noisy scores alone"), -1;
    if (c->select != SELECT_TOPK && model_config_has_bias(c))
        return snprintf(err, n, "an expert bias (router.bias_gamma > 0 or router.expert_bias = "
                                "true) needs router.select = topk (the bias shifts top-k "
                                "selection)"), -1;
    if (validate_groups(c, err, n)) return -1;
    if (c->shared_gate && c->shared_experts == 0)
        return snprintf(err, n, "model.shared_gate = true needs model.shared_experts >= 1 (it "
                                "gates their output)"), -1;
    if (model_config_moe_layers(c) == 0)
        return snprintf(err, n, "model.moe_every = %d with model.first_dense_layers = %d leaves "
                        "no MoE layer among model.layers = %d", c->moe_every,
                        c->first_dense_layers, c->layers), -1;
    double params = model_config_params(c);
    if (params > MODEL_MAX_PARAMS)
        return snprintf(err, n, MODEL_SIZE_KEYS ": %.3g parameters, more than %.0e",
                        MODEL_SIZE_VALUES(c), params, MODEL_MAX_PARAMS), -1;
    return 0;
}

// One MLA layer's attention weights and its two norms (input, post-attention).
static double mla_params(const ModelConfig *c) {
    double C = c->d_model, H = c->heads, Dq = c->qk_nope_dim + c->qk_rope_dim;
    double Rq = c->q_lora_rank, Rkv = c->kv_lora_rank;
    double q = Rq ? Rq * C + Rq + H * Dq * Rq : H * Dq * C;
    double kv = (Rkv + c->qk_rope_dim) * C + Rkv + H * (c->qk_nope_dim + c->v_head_dim) * Rkv;
    return q + kv + C * H * c->v_head_dim + 2 * C;
}

double model_config_params(const ModelConfig *c) {
    double C = c->d_model, V = c->vocab, E = c->experts, D = C / c->heads;
    double attn = 2 * C * C + 2 * c->kv_heads * D * C + 2 * C;   // q, o, k, v, two norms
    attn += c->qkv_bias * (C + 2 * c->kv_heads * D);
    attn += c->qk_norm == QK_NORM_HEAD   ? 2 * D
            : c->qk_norm == QK_NORM_FULL ? C + c->kv_heads * D
                                         : 0;
    if (c->attention == ATTENTION_MLA) attn = mla_params(c);
    double router = (c->select != SELECT_HASH) + (c->noise == NOISE_SHAZEER);
    double moe = router * E * C + E * 3.0 * c->expert_ffn_dim * C +
                 c->shared_experts * 3.0 * c->shared_ffn_dim * C + c->shared_gate * C;
    double dense = 3.0 * c->ffn_dim * C;
    int n_moe = model_config_moe_layers(c);
    return V * C * (c->tie_embeddings ? 1 : 2) + C + c->layers * attn + n_moe * moe +
           (c->layers - n_moe) * dense;
}

RopeSpec model_config_rope(const ModelConfig *c) {
    RopeSpec r = {c->rope_theta, c->rope_scaling == ROPE_SCALING_YARN, c->rope_factor,
                  (double)c->rope_orig_max_pos, c->rope_beta_fast, c->rope_beta_slow,
                  c->rope_mscale, c->rope_mscale_all_dim};
    return r;
}

double model_config_mla_scale(const ModelConfig *c) {
    double s = 1.0 / sqrt((double)(c->qk_nope_dim + c->qk_rope_dim));
    if (c->rope_scaling == ROPE_SCALING_YARN) {
        double m = rope_get_mscale(c->rope_factor, c->rope_mscale_all_dim);
        s *= m * m;
    }
    return s;
}

size_t model_config_cache_width(const ModelConfig *c) {
    if (c->attention == ATTENTION_MLA) return (size_t)(c->kv_lora_rank + c->qk_rope_dim);
    return 2 * (size_t)c->kv_heads * (size_t)(c->d_model / c->heads);
}

int model_config_is_moe_layer(const ModelConfig *cfg, int layer) {
    return layer >= cfg->first_dense_layers && (layer + 1) % cfg->moe_every == 0;
}

int model_config_moe_layers(const ModelConfig *cfg) {
    int n = 0;
    for (int l = 0; l < cfg->layers; l++)
        n += model_config_is_moe_layer(cfg, l);
    return n;
}

int model_config_moe_layer(const ModelConfig *cfg, int m) {
    for (int l = 0; l < cfg->layers; l++)
        if (model_config_is_moe_layer(cfg, l) && m-- == 0) return l;
    return -1;
}

int model_config_has_bias(const ModelConfig *cfg) {
    return cfg->expert_bias || cfg->bias_gamma > 0;
}

RouteSpec model_config_route_spec(const ModelConfig *cfg) {
    RouteSpec s;
    s.func = (ScoreFunc)cfg->score;
    s.renorm = cfg->renorm;
    s.groups = (size_t)cfg->groups;
    s.topk_groups = (size_t)(cfg->topk_groups ? cfg->topk_groups : cfg->groups);
    s.group_score = (GroupScore)cfg->group_score;
    s.scale = cfg->gate_scale;
    return s;
}

size_t model_config_capacity(const ModelConfig *cfg, size_t n_tokens) {
    if (cfg->select == SELECT_EXPERT_CHOICE) {
        double cf = cfg->capacity_factor > 0 ? cfg->capacity_factor : (double)cfg->top_k;
        double c = ceil((double)n_tokens * cf / (double)cfg->experts);
        return c < 1 ? 1 : c > (double)n_tokens ? n_tokens : (size_t)c;
    }
    if (cfg->capacity_factor <= 0) return 0;
    double c = ceil((double)cfg->top_k * (double)n_tokens * cfg->capacity_factor /
                    (double)cfg->experts);
    return c < 1 ? 1 : (size_t)c;
}

size_t model_config_slots(const ModelConfig *cfg) {
    return cfg->select == SELECT_EXPERT_CHOICE ? (size_t)cfg->experts : (size_t)cfg->top_k;
}

size_t model_config_max_rows(const ModelConfig *cfg, size_t n_tokens) {
    size_t rows = n_tokens * model_config_slots(cfg), cap = model_config_capacity(cfg, n_tokens);
    size_t capped = cap * (size_t)cfg->experts;
    return cap && capped < rows ? capped : rows;
}
