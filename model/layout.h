// layout.h: where every parameter lives in the one parameter slab.
//
// Defines ParamInfo (a tensor's Hugging Face Mixtral name, shape, kind and offset) and
// the layout computed from a ModelConfig. Order in the slab: embed_tokens, then per
// layer input_layernorm, q|k|v (contiguous: one fused projection), o_proj,
// post_attention_layernorm, then either the MoE block (router gate, [noise], experts
// 0..E-1 (a shard's: its range only), shared experts 0..S-1) or a dense SwiGLU; then norm
// and lm_head (untied only).
// Every SwiGLU (routed expert, shared expert, dense MLP) is w1 (F, C), w3 (F, C),
// w2 (C, F) back to back, so each expert is one contiguous block of 3FC values that can
// be read, frozen or replaced alone.
#ifndef MOE_LAYOUT_H
#define MOE_LAYOUT_H

#include <stddef.h>

#include "config.h"

typedef enum {
    PARAM_EMBED,
    PARAM_NORM,
    PARAM_ATTN,
    PARAM_ROUTER,
    PARAM_EXPERT,
    PARAM_SHARED,
    PARAM_DENSE,
    PARAM_HEAD,
} ParamKind;

typedef struct {
    char name[96];       // e.g. model.layers.0.block_sparse_moe.experts.3.w1.weight
    ParamKind kind;
    int layer;           // -1 outside blocks
    int expert;          // routed/shared expert index, else -1
    size_t rows, cols;   // shape [rows, cols]; cols == 0 for vectors
    size_t offset;       // into the slab, in elements
    size_t numel;
} ParamInfo;

typedef struct {
    ParamInfo *params;
    size_t n_params;     // tensors
    size_t total;        // elements in the slab
    size_t *index;       // open-addressing hash of the names: param index + 1, 0 empty
    size_t index_cap;    // a power of two, at least twice n_params
    int expert_lo, expert_hi;   // the routed experts held: [lo, hi) of every MoE layer
} Layout;

void layout_init(Layout *lay, const ModelConfig *cfg);
// The layout of a shard holding routed experts [expert_lo, expert_hi) of every MoE layer
// only (expert parallelism): the same order, names and global expert indices, without
// the other experts' tensors (the offsets close up).
void layout_init_experts(Layout *lay, const ModelConfig *cfg, int expert_lo, int expert_hi);
void layout_free(Layout *lay);
// The tensor named `name`, or NULL (a hash lookup: a model may have millions of tensors).
const ParamInfo *layout_find(const Layout *lay, const char *name);

#endif
