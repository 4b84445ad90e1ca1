// hf_family.c: the Hugging Face MoE families moe.c reads and writes, and how their tensor
// names map to the layout's (Mixtral's) names.
#include <stdio.h>
#include <string.h>

#include "hf.h"

static const struct {
    const char *name, *model_type, *architecture;
} FAMILIES[HF_N_FAMILIES] = {
    [HF_MIXTRAL] = {"Mixtral", "mixtral", "MixtralForCausalLM"},
    [HF_OLMOE] = {"OLMoE", "olmoe", "OlmoeForCausalLM"},
    [HF_QWEN2_MOE] = {"Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM"},
    [HF_QWEN3_MOE] = {"Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM"},
    [HF_DEEPSEEK_V2] = {"DeepSeek-V2", "deepseek_v2", "DeepseekV2ForCausalLM"},
    [HF_DEEPSEEK_V3] = {"DeepSeek-V3", "deepseek_v3", "DeepseekV3ForCausalLM"},
};

const char *hf_family_name(HfFamily f) { return FAMILIES[f].name; }
const char *hf_family_type(HfFamily f) { return FAMILIES[f].model_type; }
const char *hf_family_class(HfFamily f) { return FAMILIES[f].architecture; }

int hf_family_from_type(const char *model_type) {
    for (int f = 0; f < HF_N_FAMILIES; f++)
        if (!strcmp(model_type, FAMILIES[f].model_type)) return f;
    return -1;
}

HfFamily hf_family_of(const ModelConfig *c) {
    if (c->attention == ATTENTION_MLA)
        return c->score == SCORE_SIGMOID ? HF_DEEPSEEK_V3 : HF_DEEPSEEK_V2;
    if (c->qkv_bias || c->shared_gate || c->shared_experts > 0) return HF_QWEN2_MOE;
    if (c->qk_norm == QK_NORM_HEAD) return HF_QWEN3_MOE;
    if (c->qk_norm == QK_NORM_FULL) return HF_OLMOE;
    return HF_MIXTRAL;
}

// The layout's SwiGLU names (Mixtral's) and the other families' (Llama's MLP).
static const char *const SWIGLU[3][2] = {
    {"w1", "gate_proj"}, {"w3", "up_proj"}, {"w2", "down_proj"}};

static const char *swiglu_name(const char *from, int to_llama) {
    for (int i = 0; i < 3; i++)
        if (!strcmp(from, SWIGLU[i][!to_llama])) return SWIGLU[i][to_llama];
    return NULL;
}

#define MOE_BLOCK "block_sparse_moe."
#define BIAS_NAME "model.layers.%d.mlp.gate.e_score_correction_bias"

void hf_bias_name(int layer, char *out, size_t n) { snprintf(out, n, BIAS_NAME, layer); }

int hf_bias_layer(const char *hf) {
    int layer, end = 0;
    char back[128];
    if (sscanf(hf, "model.layers.%d.mlp.gate.e_score_correction_bias%n", &layer, &end) != 1 ||
        hf[end] || layer < 0)
        return -1;
    hf_bias_name(layer, back, sizeof back);   // no "01", no "+1"
    return strcmp(back, hf) ? -1 : layer;
}

// Qwen2-MoE's one shared expert is mlp.shared_expert, DeepSeek's mlp.shared_experts.
static const char *shared_name(HfFamily f) {
    return f == HF_DEEPSEEK_V2 || f == HF_DEEPSEEK_V3 ? "shared_experts" : "shared_expert";
}

void hf_name_export(HfFamily f, const char *name, char *out, size_t n) {
    const char *block = strstr(name, MOE_BLOCK);
    if (f == HF_MIXTRAL || !block) {
        snprintf(out, n, "%s", name);
        return;
    }
    int layer_len = (int)(block - name), e;
    const char *rest = block + strlen(MOE_BLOCK);
    char w[8];
    if (sscanf(rest, "experts.%d.%2[w0-9].weight", &e, w) == 2 && swiglu_name(w, 1))
        snprintf(out, n, "%.*smlp.experts.%d.%s.weight", layer_len, name, e, swiglu_name(w, 1));
    else if (sscanf(rest, "shared_experts.%d.%2[w0-9].weight", &e, w) == 2 && swiglu_name(w, 1))
        snprintf(out, n, "%.*smlp.%s.%s.weight", layer_len, name, shared_name(f),
                 swiglu_name(w, 1));
    else
        snprintf(out, n, "%.*smlp.%s", layer_len, name, rest);
}

int hf_name_import(HfFamily f, const char *hf, char *out, size_t n) {
    const char *mlp = strstr(hf, ".mlp.");
    if (f == HF_MIXTRAL || !mlp) {
        snprintf(out, n, "%s", hf);
        return f == HF_MIXTRAL || !strstr(hf, MOE_BLOCK) ? 0 : -1;
    }
    int layer_len = (int)(mlp - hf) + 1, e;
    const char *rest = mlp + strlen(".mlp.");
    char w[16], shared[32];
    snprintf(shared, sizeof shared, "%s.%%15[a-z_].weight", shared_name(f));
    if (sscanf(rest, "experts.%d.%15[a-z_].weight", &e, w) == 2 && swiglu_name(w, 0))
        snprintf(out, n, "%.*s" MOE_BLOCK "experts.%d.%s.weight", layer_len, hf, e,
                 swiglu_name(w, 0));
    else if (sscanf(rest, shared, w) == 1 && swiglu_name(w, 0))
        snprintf(out, n, "%.*s" MOE_BLOCK "shared_experts.0.%s.weight", layer_len, hf,
                 swiglu_name(w, 0));
    else if (!strcmp(rest, "gate.weight") || !strcmp(rest, "shared_expert_gate.weight"))
        snprintf(out, n, "%.*s" MOE_BLOCK "%s", layer_len, hf, rest);
    else
        snprintf(out, n, "%s", hf);   // a dense layer's MLP: the same name
    // Only a name that maps back exactly is the family's (no "experts.01", no suffixes).
    char back[256];
    hf_name_export(f, out, back, sizeof back);
    return strcmp(back, hf) ? -1 : 0;
}
