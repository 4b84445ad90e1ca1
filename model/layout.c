#include "layout.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

typedef struct {
    Layout *lay;
    size_t cap;
} Builder;

static void add_param(Builder *b, ParamKind kind, int layer, int expert, size_t rows,
                      size_t cols, const char *fmt, ...) __attribute__((format(printf, 7, 8)));

static void add_param(Builder *b, ParamKind kind, int layer, int expert, size_t rows,
                      size_t cols, const char *fmt, ...) {
    Layout *lay = b->lay;
    if (lay->n_params == b->cap) {
        b->cap = b->cap ? 2 * b->cap : 64;
        lay->params = realloc(lay->params, b->cap * sizeof *lay->params);
        CHECK(lay->params, "out of memory growing the parameter layout");
    }
    ParamInfo *p = &lay->params[lay->n_params++];
    memset(p, 0, sizeof *p);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->name, sizeof p->name, fmt, ap);
    va_end(ap);
    p->kind = kind;
    p->layer = layer;
    p->expert = expert;
    p->rows = rows;
    p->cols = cols;
    p->numel = rows * (cols ? cols : 1);
    p->offset = lay->total;
    lay->total += p->numel;
}

static void add_swiglu(Builder *b, ParamKind kind, int layer, int expert, size_t F, size_t C,
                       const char *prefix, const char *n1, const char *n3, const char *n2) {
    add_param(b, kind, layer, expert, F, C, "%s.%s.weight", prefix, n1);
    add_param(b, kind, layer, expert, F, C, "%s.%s.weight", prefix, n3);
    add_param(b, kind, layer, expert, C, F, "%s.%s.weight", prefix, n2);
}

static void add_moe(Builder *b, const ModelConfig *cfg, int l, int lo, int hi) {
    size_t C = (size_t)cfg->d_model, E = (size_t)cfg->experts;
    char prefix[96];
    if (cfg->select != SELECT_HASH)   // hash routing has no learned router
        add_param(b, PARAM_ROUTER, l, -1, E, C, "model.layers.%d.block_sparse_moe.gate.weight",
                  l);
    if (cfg->noise == NOISE_SHAZEER)
        add_param(b, PARAM_ROUTER, l, -1, E, C,
                  "model.layers.%d.block_sparse_moe.noise.weight", l);
    for (int e = lo; e < hi; e++) {
        snprintf(prefix, sizeof prefix, "model.layers.%d.block_sparse_moe.experts.%d", l, e);
        add_swiglu(b, PARAM_EXPERT, l, e, (size_t)cfg->expert_ffn_dim, C, prefix, "w1", "w3",
                   "w2");
    }
    if (cfg->shared_gate)   // a one-output sigmoid router for the shared experts
        add_param(b, PARAM_ROUTER, l, -1, 1, C,
                  "model.layers.%d.block_sparse_moe.shared_expert_gate.weight", l);
    for (int s = 0; s < cfg->shared_experts; s++) {
        snprintf(prefix, sizeof prefix, "model.layers.%d.block_sparse_moe.shared_experts.%d", l,
                 s);
        add_swiglu(b, PARAM_SHARED, l, s, (size_t)cfg->shared_ffn_dim, C, prefix, "w1", "w3",
                   "w2");
    }
}

static void add_ffn(Builder *b, const ModelConfig *cfg, int l, int lo, int hi) {
    if (model_config_is_moe_layer(cfg, l)) {
        add_moe(b, cfg, l, lo, hi);
    } else {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "model.layers.%d.mlp", l);
        add_swiglu(b, PARAM_DENSE, l, -1, (size_t)cfg->ffn_dim, (size_t)cfg->d_model, prefix,
                   "gate_proj", "up_proj", "down_proj");
    }
}

// Multi-head latent attention's tensors under DeepSeek's names (row order HF's: per head
// nope then rope rows of q, k_nope then v rows of kv_b_proj; kv_a latent then k_pe rows).
static void add_mla(Builder *b, const ModelConfig *cfg, int l) {
    size_t C = (size_t)cfg->d_model, H = (size_t)cfg->heads, Rq = (size_t)cfg->q_lora_rank;
    size_t R = (size_t)cfg->kv_lora_rank, Dn = (size_t)cfg->qk_nope_dim;
    size_t Dr = (size_t)cfg->qk_rope_dim, Dv = (size_t)cfg->v_head_dim, Dq = Dn + Dr;
    if (Rq) {
        add_param(b, PARAM_ATTN, l, -1, Rq, C, "model.layers.%d.self_attn.q_a_proj.weight", l);
        add_param(b, PARAM_NORM, l, -1, Rq, 0, "model.layers.%d.self_attn.q_a_layernorm.weight",
                  l);
        add_param(b, PARAM_ATTN, l, -1, H * Dq, Rq, "model.layers.%d.self_attn.q_b_proj.weight",
                  l);
    } else {
        add_param(b, PARAM_ATTN, l, -1, H * Dq, C, "model.layers.%d.self_attn.q_proj.weight", l);
    }
    add_param(b, PARAM_ATTN, l, -1, R + Dr, C,
              "model.layers.%d.self_attn.kv_a_proj_with_mqa.weight", l);
    add_param(b, PARAM_NORM, l, -1, R, 0, "model.layers.%d.self_attn.kv_a_layernorm.weight", l);
    add_param(b, PARAM_ATTN, l, -1, H * (Dn + Dv), R,
              "model.layers.%d.self_attn.kv_b_proj.weight", l);
    add_param(b, PARAM_ATTN, l, -1, C, H * Dv, "model.layers.%d.self_attn.o_proj.weight", l);
}

static void add_block(Builder *b, const ModelConfig *cfg, int l, int lo, int hi) {
    size_t C = (size_t)cfg->d_model, D = C / (size_t)cfg->heads;
    size_t HD = (size_t)cfg->heads * D, KD = (size_t)cfg->kv_heads * D;
    add_param(b, PARAM_NORM, l, -1, C, 0, "model.layers.%d.input_layernorm.weight", l);
    if (cfg->attention == ATTENTION_MLA) {
        add_mla(b, cfg, l);
        add_param(b, PARAM_NORM, l, -1, C, 0, "model.layers.%d.post_attention_layernorm.weight",
                  l);
        add_ffn(b, cfg, l, lo, hi);
        return;
    }
    add_param(b, PARAM_ATTN, l, -1, HD, C, "model.layers.%d.self_attn.q_proj.weight", l);
    add_param(b, PARAM_ATTN, l, -1, KD, C, "model.layers.%d.self_attn.k_proj.weight", l);
    add_param(b, PARAM_ATTN, l, -1, KD, C, "model.layers.%d.self_attn.v_proj.weight", l);
    if (cfg->qkv_bias) {   // contiguous like the weights: one bias of (H+2KV)D
        add_param(b, PARAM_ATTN, l, -1, HD, 0, "model.layers.%d.self_attn.q_proj.bias", l);
        add_param(b, PARAM_ATTN, l, -1, KD, 0, "model.layers.%d.self_attn.k_proj.bias", l);
        add_param(b, PARAM_ATTN, l, -1, KD, 0, "model.layers.%d.self_attn.v_proj.bias", l);
    }
    add_param(b, PARAM_ATTN, l, -1, C, HD, "model.layers.%d.self_attn.o_proj.weight", l);
    if (cfg->qk_norm != QK_NORM_NONE) {
        int head = cfg->qk_norm == QK_NORM_HEAD;
        add_param(b, PARAM_NORM, l, -1, head ? D : HD, 0,
                  "model.layers.%d.self_attn.q_norm.weight", l);
        add_param(b, PARAM_NORM, l, -1, head ? D : KD, 0,
                  "model.layers.%d.self_attn.k_norm.weight", l);
    }
    add_param(b, PARAM_NORM, l, -1, C, 0, "model.layers.%d.post_attention_layernorm.weight", l);
    add_ffn(b, cfg, l, lo, hi);
}

// FNV-1a over the name's bytes.
static size_t name_hash(const char *name) {
    uint64_t h = 1469598103934665603ull;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        h = (h ^ *p) * 1099511628211ull;
    return (size_t)h;
}

static void build_index(Layout *lay) {
    size_t cap = 16;
    while (cap < 2 * lay->n_params) cap *= 2;
    lay->index = CALLOC(cap, sizeof *lay->index);
    lay->index_cap = cap;
    for (size_t i = 0; i < lay->n_params; i++) {
        size_t slot = name_hash(lay->params[i].name) & (cap - 1);
        while (lay->index[slot]) slot = (slot + 1) & (cap - 1);
        lay->index[slot] = i + 1;
    }
}

void layout_init(Layout *lay, const ModelConfig *cfg) {
    layout_init_experts(lay, cfg, 0, cfg->experts);
}

void layout_init_experts(Layout *lay, const ModelConfig *cfg, int expert_lo, int expert_hi) {
    CHECK(0 <= expert_lo && expert_lo < expert_hi && expert_hi <= cfg->experts,
          "layout: experts [%d, %d) of %d", expert_lo, expert_hi, cfg->experts);
    memset(lay, 0, sizeof *lay);
    lay->expert_lo = expert_lo;
    lay->expert_hi = expert_hi;
    Builder b = {lay, 0};
    size_t C = (size_t)cfg->d_model, V = (size_t)cfg->vocab;
    add_param(&b, PARAM_EMBED, -1, -1, V, C, "model.embed_tokens.weight");
    for (int l = 0; l < cfg->layers; l++) add_block(&b, cfg, l, expert_lo, expert_hi);
    add_param(&b, PARAM_NORM, -1, -1, C, 0, "model.norm.weight");
    if (!cfg->tie_embeddings) add_param(&b, PARAM_HEAD, -1, -1, V, C, "lm_head.weight");
    build_index(lay);
}

void layout_free(Layout *lay) {
    free(lay->params);
    free(lay->index);
    memset(lay, 0, sizeof *lay);
}

const ParamInfo *layout_find(const Layout *lay, const char *name) {
    if (!lay->index_cap) return NULL;
    size_t mask = lay->index_cap - 1;
    for (size_t slot = name_hash(name) & mask; lay->index[slot]; slot = (slot + 1) & mask) {
        const ParamInfo *p = &lay->params[lay->index[slot] - 1];
        if (!strcmp(p->name, name)) return p;
    }
    return NULL;
}
