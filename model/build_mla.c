// build_mla.c: multi-head latent attention (DeepSeek-V2) as tape ops (docs/architecture.md,
// "MLA"): the query path (q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj), the compressed
// key/value path (kv_a_proj_with_mqa -> latent | k_pe, kv_a_layernorm, kv_b_proj), RoPE
// (YaRN) on the queries' and the shared key's rope parts, attention with q/k heads
// qk_nope_dim + qk_rope_dim wide and value heads v_head_dim wide, o_proj. Under a KV cache
// the cache keeps the latent and the rotated k_pe per position, not expanded keys/values.
#include "build_ops.h"

typedef struct {
    size_t H, Rq, R, Dn, Dr, Dv, Dq;
} MlaDims;

static MlaDims mla_dims(const ModelConfig *c) {
    MlaDims d = {(size_t)c->heads,
                 (size_t)c->q_lora_rank,
                 (size_t)c->kv_lora_rank,
                 (size_t)c->qk_nope_dim,
                 (size_t)c->qk_rope_dim,
                 (size_t)c->v_head_dim,
                 0};
    d.Dq = d.Dn + d.Dr;
    return d;
}

// q (N, H*Dq), per head [q_nope | q_pe] before RoPE.
static Buf build_mla_query(Builder *b, Buf xn, int l, const MlaDims *d) {
    size_t N = b->N, C = b->C, HQ = d->H * d->Dq;
    if (!d->Rq)
        return build_matmul(
            b, xn, build_param(b, HQ * C, "model.layers.%d.self_attn.q_proj.weight", l, 0), N,
            C, HQ);
    Buf wa = build_param(b, d->Rq * C, "model.layers.%d.self_attn.q_a_proj.weight", l, 0);
    Buf ln = build_param(b, d->Rq, "model.layers.%d.self_attn.q_a_layernorm.weight", l, 0);
    Buf wb = build_param(b, HQ * d->Rq, "model.layers.%d.self_attn.q_b_proj.weight", l, 0);
    Buf qa = build_matmul(b, xn, wa, N, C, d->Rq); // (N, Rq)
    return build_matmul(b, build_rmsnorm_width(b, qa, ln, d->Rq), wb, N, d->Rq, HQ);
}

// Training: keys and values expanded through kv_b_proj, then attention. (N, H*Dv)
static Buf build_mla_train(Builder *b, Buf q, Buf latn, Buf kpe, Buf wkvb, const MlaDims *d) {
    Model *m = b->m;
    size_t N = b->N, H = d->H;
    Buf kv = build_matmul(b, latn, wkvb, N, d->R, H * (d->Dn + d->Dv)); // (N, H*(Dn+Dv))
    TapeOp *qo = tape_push(&m->tape, OP_MLA_QKV);
    qo->mla_qkv.qkv = build_take_buf(b, N * (2 * H * d->Dq + H * d->Dv)); // (N, 2H*Dq + H*Dv)
    qo->mla_qkv.q = q;
    qo->mla_qkv.kv = kv;
    qo->mla_qkv.kpe = kpe;
    qo->mla_qkv.B = m->B;
    qo->mla_qkv.T = m->T;
    qo->mla_qkv.H = H;
    qo->mla_qkv.Dn = d->Dn;
    qo->mla_qkv.Dr = d->Dr;
    qo->mla_qkv.Dv = d->Dv;
    qo->mla_qkv.rope = model_config_rope(&m->cfg);

    TapeOp *op = tape_push(&m->tape, OP_ATTENTION_MLA);
    size_t B = m->B, T = m->T, att = B * H * T * T, datt = att; // (B, H, T, T)
    // Planned as for fp32 products: CUDA runs MLA's attention in its plain kernels.
    if (m->be->attention_plan) m->be->attention_plan(&att, &datt, B, T, H, H, d->Dq, 0);
    op->attention_mla.out = build_take_buf(b, N * H * d->Dv); // (N, H*Dv)
    op->attention_mla.att = build_take(b, att, DTYPE_REAL);
    op->attention_mla.datt = arena_take(&m->dacts, datt, DTYPE_REAL);
    op->attention_mla.qkv = qo->mla_qkv.qkv;
    op->attention_mla.B = B;
    op->attention_mla.T = T;
    op->attention_mla.H = H;
    op->attention_mla.KV = H;
    op->attention_mla.Dk = d->Dq;
    op->attention_mla.Dv = d->Dv;
    op->attention_mla.scale = model_config_mla_scale(&m->cfg);
    return op->attention_mla.out;
}

// Generation: layer l's part of the cache (B, L, R) latents then (B, L, Dr) rotated k_pe.
static Buf build_mla_decode(Builder *b, Buf q, Buf latn, Buf kpe, Buf wkvb, int l,
                            const MlaDims *d) {
    Model *m = b->m;
    size_t BL = m->B * m->cache_len, part = BL * (d->R + d->Dr);
    TapeOp *op = tape_push(&m->tape, OP_MLA_DECODE);
    op->mla_decode.out = build_take_buf(b, b->N * d->H * d->Dv); // (B, H*Dv)
    op->mla_decode.q = q;
    op->mla_decode.latent = latn;
    op->mla_decode.kpe = kpe;
    op->mla_decode.wkvb = wkvb;
    op->mla_decode.ccache = tensor_slice(m->kv_cache, (size_t)l * part, BL * d->R);
    op->mla_decode.kcache = tensor_slice(m->kv_cache, (size_t)l * part + BL * d->R, BL * d->Dr);
    op->mla_decode.pos = m->positions;
    op->mla_decode.B = m->B;
    op->mla_decode.L = m->cache_len;
    op->mla_decode.H = d->H;
    op->mla_decode.Dn = d->Dn;
    op->mla_decode.Dr = d->Dr;
    op->mla_decode.Dv = d->Dv;
    op->mla_decode.R = d->R;
    op->mla_decode.rope = model_config_rope(&m->cfg);
    op->mla_decode.scale = model_config_mla_scale(&m->cfg);
    return op->mla_decode.out;
}

Buf build_mla_attention(Builder *b, Buf xn, int l) {
    MlaDims d = mla_dims(&b->m->cfg);
    size_t N = b->N, C = b->C;
    Buf q = build_mla_query(b, xn, l, &d);
    // kv_a_proj_with_mqa's latent rows and k_pe rows as two products: the latent alone
    // goes through kv_a_layernorm.
    Buf wkva = build_param(b, (d.R + d.Dr) * C,
                           "model.layers.%d.self_attn.kv_a_proj_with_mqa.weight", l, 0);
    Buf lat = build_matmul(b, xn, build_slice(wkva, 0, d.R * C), N, C, d.R);         // (N, R)
    Buf kpe = build_matmul(b, xn, build_slice(wkva, d.R * C, d.Dr * C), N, C, d.Dr); // (N, Dr)
    Buf ln = build_param(b, d.R, "model.layers.%d.self_attn.kv_a_layernorm.weight", l, 0);
    Buf latn = build_rmsnorm_width(b, lat, ln, d.R);
    Buf wkvb = build_param(b, d.H * (d.Dn + d.Dv) * d.R,
                           "model.layers.%d.self_attn.kv_b_proj.weight", l, 0);
    Buf wo = build_param(b, C * d.H * d.Dv, "model.layers.%d.self_attn.o_proj.weight", l, 0);
    Buf att = b->m->cache_len ? build_mla_decode(b, q, latn, kpe, wkvb, l, &d)
                              : build_mla_train(b, q, latn, kpe, wkvb, &d);
    return build_matmul(b, att, wo, N, d.H * d.Dv, C);
}
