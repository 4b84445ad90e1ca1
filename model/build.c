// build.c: the decoder's data flow as tape ops (docs/architecture.md, "The data flow of
// one step"): embedding, blocks (attention, then a dense or MoE feed-forward), final
// norm, head and cross-entropy.
#include "build.h"

#include "build_ops.h"

// qkv (N, QKV) + the q|k|v biases (QKV), one contiguous run in the slab.
static Buf build_qkv_bias(Builder *b, Buf qkv, int l, size_t QKV) {
    TapeOp *op = tape_push(&b->m->tape, OP_BIAS_ADD);
    op->bias_add.out = build_take_buf(b, b->N * QKV); // (N, QKV)
    op->bias_add.x = qkv;
    op->bias_add.b = build_param(b, QKV, "model.layers.%d.self_attn.q_proj.bias", l, 0);
    op->bias_add.N = b->N;
    op->bias_add.M = QKV;
    return op->bias_add.out;
}

// QK-norm of qkv (N, (H+2KV)D): per head, or over each whole projection.
static Buf build_qk_norm(Builder *b, Buf qkv, int l, size_t H, size_t KV, size_t D) {
    const ModelConfig *c = &b->m->cfg;
    int head = c->qk_norm == QK_NORM_HEAD;
    TapeOp *op = tape_push(&b->m->tape, OP_QK_NORM);
    op->qk_norm.out = build_take_buf(b, b->N * (H + 2 * KV) * D);          // (N, (H+2KV)D)
    op->qk_norm.rstd = build_take(b, b->N * (head ? H + KV : 2), DTYPE_REAL); // (N, G)
    op->qk_norm.qkv = qkv;
    op->qk_norm.wq = build_param(b, head ? D : H * D, "model.layers.%d.self_attn.q_norm.weight",
                                 l, 0);
    op->qk_norm.wk = build_param(b, head ? D : KV * D,
                                 "model.layers.%d.self_attn.k_norm.weight", l, 0);
    op->qk_norm.N = b->N;
    op->qk_norm.H = H;
    op->qk_norm.KV = KV;
    op->qk_norm.D = D;
    op->qk_norm.per_head = head;
    op->qk_norm.eps = c->norm_eps;
    return op->qk_norm.out;
}

// Generation: qkv (B, (H+2KV)D) one row per sequence; layer l's keys and values go into
// its part of the KV cache (2, B, L, KV*D).
static Buf build_attention_decode(Builder *b, Buf qkv, int l) {
    Model *m = b->m;
    const ModelConfig *c = &m->cfg;
    size_t H = (size_t)c->heads, KV = (size_t)c->kv_heads, D = b->C / H;
    size_t part = m->B * m->cache_len * KV * D; // (B, L, KV*D)
    TapeOp *op = tape_push(&m->tape, OP_ATTENTION_DECODE);
    op->attention_decode.out = build_take_buf(b, b->N * H * D); // (B, H*D)
    op->attention_decode.qkv = qkv;
    op->attention_decode.kcache = tensor_slice(m->kv_cache, (size_t)(2 * l) * part, part);
    op->attention_decode.vcache = tensor_slice(m->kv_cache, (size_t)(2 * l + 1) * part, part);
    op->attention_decode.pos = m->positions;
    op->attention_decode.B = m->B;
    op->attention_decode.L = m->cache_len;
    op->attention_decode.H = H;
    op->attention_decode.KV = KV;
    op->attention_decode.D = D;
    op->attention_decode.theta = c->rope_theta;
    return op->attention_decode.out;
}

static Buf build_attention(Builder *b, Buf xn, int l) {
    const ModelConfig *c = &b->m->cfg;
    size_t H = (size_t)c->heads, KV = (size_t)c->kv_heads, D = b->C / H;
    size_t QKV = (H + 2 * KV) * D;
    Buf wqkv = build_param(b, QKV * b->C, "model.layers.%d.self_attn.q_proj.weight", l, 0);
    Buf wo = build_param(b, b->C * H * D, "model.layers.%d.self_attn.o_proj.weight", l, 0);
    Buf qkv = build_matmul(b, xn, wqkv, b->N, b->C, QKV); // (N, (H+2KV)D)
    if (c->qkv_bias) qkv = build_qkv_bias(b, qkv, l, QKV);
    if (c->qk_norm != QK_NORM_NONE) qkv = build_qk_norm(b, qkv, l, H, KV, D);

    if (b->m->cache_len) return build_matmul(b, build_attention_decode(b, qkv, l), wo, b->N,
                                             H * D, b->C);
    TapeOp *rope = tape_push(&b->m->tape, OP_ROPE);
    rope->rope.qkv = qkv;
    rope->rope.B = b->m->B;
    rope->rope.T = b->m->T;
    rope->rope.H = H;
    rope->rope.KV = KV;
    rope->rope.D = D;
    rope->rope.theta = c->rope_theta;

    TapeOp *op = tape_push(&b->m->tape, OP_ATTENTION);
    size_t B = b->m->B, T = b->m->T, att = B * H * T * T, datt = att; // (B, H, T, T)
    const Backend *be = b->m->be;
    if (be->attention_plan) be->attention_plan(&att, &datt, B, T, H, KV, D, b->m->tape.bf16);
    op->attention.out = build_take_buf(b, b->N * H * D); // (N, H*D)
    op->attention.att = build_take(b, att, DTYPE_REAL);
    op->attention.datt = arena_take(&b->m->dacts, datt, DTYPE_REAL);
    op->attention.qkv = qkv;
    op->attention.B = b->m->B;
    op->attention.T = b->m->T;
    op->attention.H = H;
    op->attention.KV = KV;
    op->attention.D = D;
    return build_matmul(b, op->attention.out, wo, b->N, H * D, b->C);
}

// y + sigmoid(xn w_g^T) * shared, one gate logit (N, 1) per token (Qwen2-MoE).
static Buf build_gated_shared(Builder *b, Buf xn, Buf y, Buf shared, int l) {
    Buf wg = build_param(b, b->C, "model.layers.%d.block_sparse_moe.shared_expert_gate.weight",
                         l, 0);
    Buf g = build_matmul(b, xn, wg, b->N, b->C, 1); // (N, 1)
    TapeOp *op = tape_push(&b->m->tape, OP_GATED_ADD);
    op->gated_add.out = build_take_buf(b, b->N * b->C); // (N, C)
    op->gated_add.a = y;
    op->gated_add.s = shared;
    op->gated_add.g = g;
    op->gated_add.N = b->N;
    op->gated_add.C = b->C;
    return op->gated_add.out;
}

static Buf build_moe(Builder *b, Buf xn, int l, MoeLayerState *st) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts;
    st->layer = l;
    st->bias = tensor_slice(b->m->expert_bias, (size_t)(st - b->m->moe) * E, E);
    Buf xr = build_router_input(b, xn, st);
    RouterBufs r = build_router(b, xr, l, st);
    build_aux_losses(b, &r, st);
    Buf y = build_routed_experts(b, xn, &r, l, st);
    size_t Fs = (size_t)c->shared_ffn_dim;
    Buf shared = y;   // ungated: the shared experts add to y one by one
    for (int s = 0; s < c->shared_experts; s++) {
        Buf w =
            build_param(b, 3 * Fs * b->C,
                        "model.layers.%d.block_sparse_moe.shared_experts.%d.w1.weight", l, s);
        Buf out = build_swiglu_all(b, xn, w, Fs);
        shared = c->shared_gate && s == 0 ? out : build_add(b, shared, out, b->N * b->C);
    }
    return c->shared_gate ? build_gated_shared(b, xn, y, shared, l) : shared;
}

static Buf build_block(Builder *b, Buf x, int l, int *moe_i) {
    const ModelConfig *c = &b->m->cfg;
    Buf ln1 = build_param(b, b->C, "model.layers.%d.input_layernorm.weight", l, 0);
    Buf ln2 = build_param(b, b->C, "model.layers.%d.post_attention_layernorm.weight", l, 0);
    Buf xn = build_rmsnorm(b, x, ln1);
    Buf att = c->attention == ATTENTION_MLA ? build_mla_attention(b, xn, l)
                                            : build_attention(b, xn, l);
    Buf h = build_add(b, x, att, b->N * b->C);
    Buf hn = build_rmsnorm(b, h, ln2);
    Buf ffn;
    if (model_config_is_moe_layer(c, l)) {
        ffn = build_moe(b, hn, l, &b->m->moe[(*moe_i)++]);
    } else {
        Buf w = build_param(b, 3 * (size_t)c->ffn_dim * b->C,
                            "model.layers.%d.mlp.gate_proj.weight", l, 0);
        ffn = build_swiglu_all(b, hn, w, (size_t)c->ffn_dim);
    }
    return build_add(b, h, ffn, b->N * b->C);
}

void build_tape(Model *m) {
    const ModelConfig *c = &m->cfg;
    Builder b = {m, m->N, (size_t)c->d_model};
    size_t V = (size_t)c->vocab;
    tape_clear(&m->tape);
    m->acts.used = m->dacts.used = 0;
    m->tokens = build_take(&b, m->N, DTYPE_I32);
    m->targets = build_take(&b, m->N, DTYPE_I32);
    if (m->cache_len) m->positions = build_take(&b, m->B, DTYPE_I32);

    TapeOp *emb = tape_push(&m->tape, OP_EMBED);
    Buf table = build_param(&b, V * b.C, "model.embed_tokens.weight", 0, 0);
    emb->embed.out = build_take_buf(&b, m->N * b.C); // (N, C)
    emb->embed.table = table;
    emb->embed.tokens = m->tokens;
    emb->embed.N = m->N;
    emb->embed.C = b.C;

    Buf x = emb->embed.out;
    int moe_i = 0;
    for (int l = 0; l < c->layers; l++) {
        m->block_op[l] = m->tape.n;
        x = build_block(&b, x, l, &moe_i);
    }
    Buf xf = build_rmsnorm(&b, x, build_param(&b, b.C, "model.norm.weight", 0, 0));
    Buf head = c->tie_embeddings ? table : build_param(&b, V * b.C, "lm_head.weight", 0, 0);
    m->logits = build_matmul(&b, xf, head, m->N, b.C, V); // (N, V)

    TapeOp *ce = tape_push(&m->tape, OP_CROSSENTROPY);
    m->ce = ce->ce.loss = build_take(&b, 1, DTYPE_REAL);
    ce->ce.lse = build_take(&b, m->N, DTYPE_REAL);
    ce->ce.targets = m->targets;
    ce->ce.logits = m->logits;
    ce->ce.N = m->N;
    ce->ce.V = V;
    ce->ce.coef = 1.0;
}
