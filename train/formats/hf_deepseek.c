// hf_deepseek.c: DeepSeek-V2 / -V3 config.json keys to and from [model] and [router], and
// the RoPE row order of their files (hf_deepseek.h).
#include "hf_deepseek.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/util.h"

static const cJSON *item(const cJSON *j, const char *key) {
    return cJSON_GetObjectItemCaseSensitive(j, key);
}

static int present(const cJSON *j, const char *key) {
    const cJSON *v = item(j, key);
    return v && !cJSON_IsNull(v);
}

static void set_word(RunConfig *rc, const char *path, const char *hf, const char *moe,
                     const char *value) {
    char word[256], err[1024];
    snprintf(word, sizeof word, "%s=%s", moe, value);
    if (run_config_override(rc, word, err, sizeof err) != 0)
        FAIL("%s: %s = %s: %s", path, hf, value, err);
}

static void set_number(RunConfig *rc, const char *path, const char *hf, const char *moe,
                       double v) {
    char value[64];
    snprintf(value, sizeof value, "%.17g", v);
    set_word(rc, path, hf, moe, value);
}

// An integer key (>= 0); null (or absent when `fallback` >= 0) gives the fallback.
static int int_key(const cJSON *j, const char *key, int fallback, const char *path) {
    const cJSON *v = item(j, key);
    if ((!v || cJSON_IsNull(v)) && fallback >= 0) return fallback;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 ||
        v->valuedouble > 1e9)
        FAIL("%s: %s is %s", path, key, v ? "not an integer >= 0" : "missing");
    return (int)v->valuedouble;
}

static const char *string_key(const cJSON *j, const char *key, const char *fallback,
                              const char *path) {
    const cJSON *v = item(j, key);
    if (!v || cJSON_IsNull(v)) return fallback;
    if (!cJSON_IsString(v)) FAIL("%s: %s is not a string", path, key);
    return v->valuestring;
}

// rope_parameters (transformers 5) or rope_scaling (DeepSeek's own files, transformers 4):
// the scaling dict, or NULL.
static const cJSON *rope_dict(const cJSON *j) {
    const cJSON *p = item(j, "rope_parameters");
    if (p && !cJSON_IsNull(p)) return p;
    p = item(j, "rope_scaling");
    return p && !cJSON_IsNull(p) ? p : NULL;
}

static const char *rope_type(const cJSON *d, const char *path) {
    const cJSON *t = item(d, "rope_type");
    if (!t) t = item(d, "type");
    if (!t || cJSON_IsNull(t)) return "default";
    if (!cJSON_IsString(t)) FAIL("%s: rope_scaling's type is not a string", path);
    return t->valuestring;
}

static int number_in(const cJSON *d, const char *key, double *out, const char *path) {
    const cJSON *v = item(d, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v)) FAIL("%s: rope_scaling.%s is not a number", path, key);
    *out = v->valuedouble;
    return 1;
}

// transformers' YaRN takes attention_factor = mscale(factor, mscale) /
// mscale(factor, mscale_all_dim) only when both are set and non-zero, else
// mscale(factor, 1); DeepSeek's code always takes the ratio (mscale 1, mscale_all_dim 0 by
// default). moe.c's is DeepSeek's: refused where the two disagree.
static void check_yarn(const cJSON *d, const char *path) {
    double v, mscale = 1, all_dim = 0;
    int has_mscale = number_in(d, "mscale", &mscale, path);
    number_in(d, "mscale_all_dim", &all_dim, path);
    if (number_in(d, "attention_factor", &v, path))
        FAIL("%s: rope_scaling.attention_factor is set: moe.c's YaRN derives it from "
             "factor, mscale and mscale_all_dim",
             path);
    if (all_dim != 0 && (!has_mscale || mscale == 0))
        FAIL("%s: rope_scaling.mscale_all_dim = %g with mscale %s: transformers and "
             "DeepSeek's code compute YaRN's attention factor differently there",
             path, all_dim, has_mscale ? "= 0" : "missing");
    const cJSON *t = item(d, "truncate");
    if (cJSON_IsFalse(t))
        FAIL("%s: rope_scaling.truncate is false: moe.c's YaRN rounds the correction range "
             "as DeepSeek does",
             path);
    if (!number_in(d, "factor", &v, path)) FAIL("%s: rope_scaling (yarn) has no factor", path);
}

void hf_deepseek_check(const cJSON *j, HfFamily f, const char *path) {
    const char *name = hf_family_name(f);
    if (cJSON_IsTrue(item(j, "mlp_bias")))
        FAIL("%s: mlp_bias is true: moe.c's SwiGLU layers have no biases", path);
    if (present(j, "moe_layer_freq") && int_key(j, "moe_layer_freq", -1, path) != 1)
        FAIL("%s: moe_layer_freq is not 1: moe.c's DeepSeek layers are MoE from "
             "first_k_dense_replace on",
             path);
    const char *score = string_key(j, "scoring_func", NULL, path);
    const char *want = f == HF_DEEPSEEK_V3 ? "sigmoid" : "softmax";
    if (score && strcmp(score, want))
        FAIL("%s: scoring_func = %s: %s scores experts with a %s", path, score, name, want);
    const char *method = string_key(j, "topk_method", NULL, path);
    if (method && f == HF_DEEPSEEK_V2 && strcmp(method, "greedy") &&
        strcmp(method, "group_limited_greedy"))
        FAIL("%s: topk_method = %s: moe.c's DeepSeek-V2 routes by greedy or "
             "group_limited_greedy",
             path, method);
    if (method && f == HF_DEEPSEEK_V3 && strcmp(method, "noaux_tc"))
        FAIL("%s: topk_method = %s: DeepSeek-V3 routes by noaux_tc", path, method);
    if (f == HF_DEEPSEEK_V2 && cJSON_IsTrue(item(j, "norm_topk_prob")))
        FAIL("%s: norm_topk_prob is true: transformers' DeepseekV2 ignores it and "
             "DeepSeek's code renormalises, so moe.c reads neither",
             path);
    if (present(j, "num_nextn_predict_layers"))
        int_key(j, "num_nextn_predict_layers", -1, path);
    const cJSON *d = rope_dict(j);
    const char *type = d ? rope_type(d, path) : "default";
    if (!strcmp(type, "yarn"))
        check_yarn(d, path);
    else if (strcmp(type, "default"))
        FAIL("%s: rope_scaling type %s: moe.c's RoPE scales by yarn only", path, type);
    double eps =
        cJSON_IsNumber(item(j, "rms_norm_eps")) ? item(j, "rms_norm_eps")->valuedouble : 1e-6;
    if (eps != 1e-6)
        FAIL("%s: rms_norm_eps = %g: %s's q_a_layernorm and kv_a_layernorm use 1e-6 whatever "
             "it says, moe.c's every norm model.norm_eps",
             path, eps, name);
}

static void rope_config(const cJSON *j, const char *path, RunConfig *rc) {
    const cJSON *d = rope_dict(j);
    double v;
    if (!cJSON_IsNumber(item(j, "rope_theta")) && d && number_in(d, "rope_theta", &v, path))
        set_number(rc, path, "rope_parameters.rope_theta", "model.rope_theta", v);
    if (!d || strcmp(rope_type(d, path), "yarn")) {
        set_word(rc, path, "rope_scaling", "model.rope_scaling", "none");
        return;
    }
    static const struct {
        const char *hf, *moe;
    } YARN[] = {
        {"factor", "model.rope_factor"},
        {"original_max_position_embeddings", "model.rope_orig_max_pos"},
        {"beta_fast", "model.rope_beta_fast"},
        {"beta_slow", "model.rope_beta_slow"},
        {"mscale", "model.rope_mscale"},
        {"mscale_all_dim", "model.rope_mscale_all_dim"},
    };
    set_word(rc, path, "rope_scaling", "model.rope_scaling", "yarn");
    // transformers' fallback: the pre-training length is max_position_embeddings.
    set_number(rc, path, "max_position_embeddings", "model.rope_orig_max_pos",
               int_key(j, "max_position_embeddings", -1, path));
    for (size_t i = 0; i < sizeof YARN / sizeof *YARN; i++)
        if (number_in(d, YARN[i].hf, &v, path))
            set_number(rc, path, YARN[i].hf, YARN[i].moe, v);
}

// Routing: V2's greedy or group_limited_greedy over softmax scores, V3's noaux_tc.
static void router_config(const cJSON *j, HfFamily f, const char *path, RunConfig *rc) {
    const char *method =
        string_key(j, "topk_method", f == HF_DEEPSEEK_V3 ? "noaux_tc" : "greedy", path);
    if (!strcmp(method, "greedy")) {
        set_word(rc, path, "topk_method", "router.groups", "1");
        set_word(rc, path, "topk_method", "router.topk_groups", "0");
    } else {
        set_number(rc, path, "n_group", "router.groups", int_key(j, "n_group", -1, path));
        set_number(rc, path, "topk_group", "router.topk_groups",
                   int_key(j, "topk_group", -1, path));
    }
    if (cJSON_IsTrue(item(j, "seq_aux")))
        set_word(rc, path, "seq_aux", "router.lb_type", "seq");
}

void hf_deepseek_config(const cJSON *j, HfFamily f, const char *path, RunConfig *rc) {
    // Keys whose null means none: absent, the config classes would take 1536 and 2.
    if (!item(j, "q_lora_rank") || !item(j, "n_shared_experts"))
        FAIL("%s: no %s (every %s config.json has it; null: none)", path,
             item(j, "q_lora_rank") ? "n_shared_experts" : "q_lora_rank", hf_family_name(f));
    set_number(rc, path, "q_lora_rank", "model.q_lora_rank",
               int_key(j, "q_lora_rank", 0, path));
    // Under MLA every query head has its own key: kv_heads plays no part.
    set_number(rc, path, "num_attention_heads", "model.kv_heads",
               int_key(j, "num_attention_heads", -1, path));
    int shared = int_key(j, "n_shared_experts", 0, path);
    int width = int_key(j, "moe_intermediate_size", -1, path);
    set_number(rc, path, "n_shared_experts", "model.shared_experts", shared > 0);
    if (shared > 0)
        set_number(rc, path, "n_shared_experts", "model.shared_ffn_dim",
                   (double)shared * width);
    rope_config(j, path, rc);
    router_config(j, f, path, rc);
}

int hf_deepseek_mtp_layers(const cJSON *j) {
    const cJSON *v = item(j, "num_nextn_predict_layers");
    return cJSON_IsNumber(v) && v->valuedouble > 0 ? (int)v->valuedouble : 0;
}

int hf_deepseek_interleaved(const cJSON *j, HfFamily f) {
    if (f == HF_DEEPSEEK_V2) return 1;
    const cJSON *v = item(j, "rope_interleave");
    return !v || cJSON_IsNull(v) || cJSON_IsTrue(v); // V3's config class: true
}

// ---- export ------------------------------------------------------------------------------

// What neither DeepSeek family has.
static int check_common(const ModelConfig *c, const char *fam, char *why, size_t n) {
    if (c->shared_experts > 1)
        snprintf(why, n,
                 "model.shared_experts = %d: %s's shared experts are one SwiGLU of "
                 "n_shared_experts * moe_intermediate_size (model.shared_experts = 1 with "
                 "shared_ffn_dim the sum)",
                 c->shared_experts, fam);
    else if (c->shared_experts == 1 && c->shared_ffn_dim % c->expert_ffn_dim)
        snprintf(why, n,
                 "model.shared_ffn_dim = %d: %s's shared width is a multiple of "
                 "model.expert_ffn_dim = %d",
                 c->shared_ffn_dim, fam, c->expert_ffn_dim);
    else if (c->shared_gate)
        snprintf(why, n, "model.shared_gate = true: %s's shared experts have no gate", fam);
    else if (c->qkv_bias)
        snprintf(why, n, "model.qkv_bias = true: %s's projections have no biases", fam);
    else if (c->qk_norm != QK_NORM_NONE)
        snprintf(why, n, "model.qk_norm: %s has no QK-norm", fam);
    else if (c->moe_every != 1)
        snprintf(why, n,
                 "model.moe_every = %d: %s's layers are MoE from "
                 "first_k_dense_replace on (model.first_dense_layers)",
                 c->moe_every, fam);
    else if (c->norm_eps != 1e-6)
        snprintf(why, n,
                 "model.norm_eps = %g: %s's q_a_layernorm and kv_a_layernorm use "
                 "1e-6 whatever rms_norm_eps says",
                 c->norm_eps, fam);
    else if (c->noise != NOISE_NONE)
        snprintf(why, n, "router.noise: %s's router has no noise", fam);
    else if (c->select != SELECT_TOPK)
        snprintf(why, n, "router.select: %s routes by token-choice top-k", fam);
    else
        return 0;
    return -1;
}

int hf_deepseek_export_check(const ModelConfig *c, HfFamily f, char *why, size_t n) {
    const char *fam = hf_family_name(f);
    if (check_common(c, fam, why, n)) return -1;
    int groups = c->groups > 1;
    if (f == HF_DEEPSEEK_V2 && c->renorm)
        snprintf(why, n,
                 "router.renorm = true: transformers' DeepseekV2 never renormalises "
                 "the top-k weights (DeepSeek-V3 does, with router.score = sigmoid)");
    else if (f == HF_DEEPSEEK_V2 && groups && c->group_score != GROUP_SCORE_MAX)
        snprintf(why, n,
                 "router.group_score = top2: DeepSeek-V2 scores a group by its best "
                 "expert (router.score = sigmoid makes it DeepSeek-V3)");
    else if (f == HF_DEEPSEEK_V2 && (c->expert_bias || c->bias_gamma > 0))
        snprintf(why, n,
                 "router.expert_bias: DeepSeek-V2 has no expert-selection bias "
                 "(router.score = sigmoid makes it DeepSeek-V3)");
    else if (f == HF_DEEPSEEK_V3 && groups && c->group_score != GROUP_SCORE_TOP2)
        snprintf(why, n,
                 "router.group_score = max: DeepSeek-V3 scores a group by the sum of "
                 "its two best experts");
    else if (f == HF_DEEPSEEK_V3 && c->experts / (groups ? c->groups : 1) < 2)
        snprintf(why, n,
                 "router.groups = %d: DeepSeek-V3 needs two experts or more per "
                 "group",
                 c->groups);
    else
        return 0;
    return -1;
}

static void rope_out(cJSON *j, const ModelConfig *c) {
    if (c->rope_scaling != ROPE_SCALING_YARN) {
        cJSON_AddNullToObject(j, "rope_scaling");
        return;
    }
    cJSON *d = cJSON_AddObjectToObject(j, "rope_scaling");
    cJSON_AddStringToObject(d, "type", "yarn");
    hf_json_add_float(d, "factor", c->rope_factor);
    cJSON_AddNumberToObject(d, "original_max_position_embeddings", c->rope_orig_max_pos);
    hf_json_add_float(d, "beta_fast", c->rope_beta_fast);
    hf_json_add_float(d, "beta_slow", c->rope_beta_slow);
    hf_json_add_float(d, "mscale", c->rope_mscale);
    hf_json_add_float(d, "mscale_all_dim", c->rope_mscale_all_dim);
}

void hf_deepseek_config_out(cJSON *j, const ModelConfig *c, HfFamily f) {
    cJSON_AddNumberToObject(j, "num_key_value_heads", c->heads);
    cJSON_AddNumberToObject(j, "intermediate_size", c->ffn_dim);
    cJSON_AddNumberToObject(j, "moe_intermediate_size", c->expert_ffn_dim);
    cJSON_AddNumberToObject(j, "n_routed_experts", c->experts);
    cJSON_AddNumberToObject(j, "n_shared_experts",
                            c->shared_experts ? c->shared_ffn_dim / c->expert_ffn_dim : 0);
    cJSON_AddNumberToObject(j, "first_k_dense_replace", c->first_dense_layers);
    cJSON_AddNumberToObject(j, "moe_layer_freq", 1);
    if (c->q_lora_rank > 0)
        cJSON_AddNumberToObject(j, "q_lora_rank", c->q_lora_rank);
    else
        cJSON_AddNullToObject(j, "q_lora_rank");
    cJSON_AddNumberToObject(j, "kv_lora_rank", c->kv_lora_rank);
    cJSON_AddNumberToObject(j, "qk_nope_head_dim", c->qk_nope_dim);
    cJSON_AddNumberToObject(j, "qk_rope_head_dim", c->qk_rope_dim);
    cJSON_AddNumberToObject(j, "v_head_dim", c->v_head_dim);
    rope_out(j, c);
    int groups = c->groups > 1 ? c->groups : 1;
    int topk_groups = c->groups > 1 && c->topk_groups > 0 ? c->topk_groups : groups;
    cJSON_AddStringToObject(j, "topk_method",
                            f == HF_DEEPSEEK_V3 ? "noaux_tc"
                            : groups > 1        ? "group_limited_greedy"
                                                : "greedy");
    cJSON_AddNumberToObject(j, "n_group", groups);
    cJSON_AddNumberToObject(j, "topk_group", topk_groups);
    cJSON_AddStringToObject(j, "scoring_func", f == HF_DEEPSEEK_V3 ? "sigmoid" : "softmax");
    cJSON_AddBoolToObject(j, "norm_topk_prob", c->renorm);
    hf_json_add_float(j, "routed_scaling_factor", c->gate_scale);
    hf_json_add_float(j, "aux_loss_alpha", c->aux_coef);
    cJSON_AddBoolToObject(j, "seq_aux", c->lb_type == LB_SEQ);
    cJSON_AddBoolToObject(j, "attention_bias", 0);
    cJSON_AddBoolToObject(j, "mlp_bias", 0);
    if (f == HF_DEEPSEEK_V3) {
        cJSON_AddBoolToObject(j, "rope_interleave", 1);
        cJSON_AddNumberToObject(j, "num_nextn_predict_layers", 0);
    }
}

// ---- RoPE rows ---------------------------------------------------------------------------

static int ends_with(const char *s, const char *tail) {
    size_t a = strlen(s), b = strlen(tail);
    return a >= b && !strcmp(s + a - b, tail);
}

// Rows [first, first + r) of a (., cols) matrix: file row 2i <-> moe.c row i, file row
// 2i + 1 <-> moe.c row r/2 + i.
static void permute(float *w, size_t cols, size_t first, size_t r, int to_file, float *tmp) {
    float *base = w + first * cols;
    memcpy(tmp, base, r * cols * sizeof *tmp);
    for (size_t i = 0; i < r / 2; i++)
        for (int odd = 0; odd < 2; odd++) {
            size_t file = 2 * i + (size_t)odd, ours = (size_t)odd * (r / 2) + i;
            memcpy(base + (to_file ? file : ours) * cols, tmp + (to_file ? ours : file) * cols,
                   cols * sizeof *tmp);
        }
}

void hf_deepseek_rope_rows(const ModelConfig *c, const char *name, size_t cols, float *w,
                           int to_file) {
    if (c->attention != ATTENTION_MLA) return;
    size_t r = (size_t)c->qk_rope_dim, nope = (size_t)c->qk_nope_dim;
    float *tmp = CALLOC(r * cols, sizeof *tmp);
    if (ends_with(name, ".self_attn.kv_a_proj_with_mqa.weight")) {
        permute(w, cols, (size_t)c->kv_lora_rank, r, to_file, tmp);
    } else if (ends_with(name, ".self_attn.q_proj.weight") ||
               ends_with(name, ".self_attn.q_b_proj.weight")) {
        for (size_t h = 0; h < (size_t)c->heads; h++) // per head: nope rows, then rope rows
            permute(w, cols, h * (nope + r) + nope, r, to_file, tmp);
    }
    free(tmp);
}
