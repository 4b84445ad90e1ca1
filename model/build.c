// build.c: the decoder's data flow as tape ops (DESIGN.md, "Data flow of one step").
#include "build.h"

#include <math.h>
#include <stdlib.h>
#include <stdio.h>

#include "../base/util.h"

typedef struct {
    Model *m;
    size_t N, C;
} Builder;

// A differentiable activation: value in the activation arena, gradient in its twin.
static Buf take_buf(Builder *b, size_t numel) {
    Buf x = {arena_take(&b->m->acts, numel, DTYPE_REAL),
             arena_take(&b->m->dacts, numel, DTYPE_REAL)};
    return x;
}

static Tensor take(Builder *b, size_t numel, DType dt) {
    return arena_take(&b->m->acts, numel, dt);
}

static int measuring(const Builder *b) { return b->m->acts.base == NULL; }

static int is_trainable(const Model *m, const ParamInfo *p) {
    return !m->trainable || m->trainable[p - m->layout.params];
}

static const ParamInfo *param_find(const Model *m, const char *fmt, int i, int j) {
    char name[128];
    snprintf(name, sizeof name, fmt, i, j);
    const ParamInfo *p = layout_find(&m->layout, name);
    CHECK(p, "internal: parameter %s missing from the layout", name);
    return p;
}

// numel values from p's offset, with a gradient view only when it trains.
static Buf param_view(const Model *m, const ParamInfo *p, size_t numel, int trains) {
    Buf w = {tensor_slice(m->params, p->offset, numel),
             trains ? tensor_slice(m->grads, p->offset, numel) : tensor_none()};
    return w;
}

// A parameter, or a run of consecutive parameters starting at `name` that one op
// computes with (all trainable or all frozen), and its gradient.
static Buf param_buf(Builder *b, size_t numel, const char *fmt, int i, int j) {
    const Layout *lay = &b->m->layout;
    const ParamInfo *p = param_find(b->m, fmt, i, j);
    int trains = is_trainable(b->m, p);
    for (const ParamInfo *q = p; q < lay->params + lay->n_params && q->offset < p->offset + numel;
         q++)
        CHECK(is_trainable(b->m, q) == trains,
              "%s and %s are computed by one op and must be frozen together", p->name, q->name);
    return param_view(b->m, p, numel, trains);
}

// A layer's routed experts: per-expert flags for the experts op (an expert's w1, w3, w2
// freeze together); no gradient view at all when every expert is frozen.
static Buf expert_weights(Builder *b, int l, size_t numel, MoeLayerState *st) {
    Model *m = b->m;
    size_t E = (size_t)m->cfg.experts;
    uint8_t *flags = m->expert_train + (size_t)(st - m->moe) * E;
    int any = 0;
    for (size_t e = 0; e < E; e++) {
        const ParamInfo *p =
            param_find(m, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l, (int)e);
        flags[e] = (uint8_t)is_trainable(m, p);
        for (int k = 1; k < 3; k++)
            CHECK(is_trainable(m, p + k) == flags[e],
                  "%s and %s belong to one expert and must be frozen together", p->name,
                  p[k].name);
        any |= flags[e];
    }
    return param_view(m, param_find(m, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight",
                                    l, 0),
                      numel, any);
}

static Buf op_rmsnorm(Builder *b, Buf x, Buf w) {
    TapeOp *op = tape_push(&b->m->tape, OP_RMSNORM);
    op->rmsnorm.out = take_buf(b, b->N * b->C);   // (N, C)
    op->rmsnorm.rstd = take(b, b->N, DTYPE_REAL); // (N)
    op->rmsnorm.x = x;
    op->rmsnorm.w = w;
    op->rmsnorm.N = b->N;
    op->rmsnorm.C = b->C;
    op->rmsnorm.eps = b->m->cfg.norm_eps;
    return op->rmsnorm.out;
}

static Buf op_matmul(Builder *b, Buf x, Buf w, size_t rows, size_t in, size_t out) {
    TapeOp *op = tape_push(&b->m->tape, OP_MATMUL);
    op->matmul.out = take_buf(b, rows * out);   // (rows, out)
    op->matmul.x = x;
    op->matmul.w = w;
    op->matmul.N = rows;
    op->matmul.K = in;
    op->matmul.M = out;
    return op->matmul.out;
}

// The router's products stay fp32 under bf16 products: top-k compares logits that bf16
// rounding (8 significant bits) would tie or reorder.
static Buf op_matmul_fp32(Builder *b, Buf x, Buf w, size_t rows, size_t in, size_t out) {
    Buf y = op_matmul(b, x, w, rows, in, out);
    b->m->tape.ops[b->m->tape.n - 1].matmul.fp32 = 1;
    return y;
}

static Buf op_add(Builder *b, Buf x, Buf y, size_t n) {
    TapeOp *op = tape_push(&b->m->tape, OP_ADD);
    op->add.out = take_buf(b, n);
    op->add.a = x;
    op->add.b = y;
    op->add.n = n;
    return op->add.out;
}

// E SwiGLU experts over contiguous row groups given by `offsets` (E+1).
static Buf op_experts(Builder *b, Buf xp, Buf w, Tensor offsets, size_t rows, size_t E,
                      size_t F) {
    TapeOp *op = tape_push(&b->m->tape, OP_EXPERTS);
    const Backend *be = b->m->be;
    DType state = be->experts_state_dtype ? be->experts_state_dtype(b->m->tape.bf16) : DTYPE_REAL;
    op->experts.yp = take_buf(b, rows * b->C);      // (rows, C)
    op->experts.h13 = take(b, rows * 2 * F, state);   // (rows, 2F)
    op->experts.act = take(b, rows * F, state);       // (rows, F)
    op->experts.dh13 = arena_take(&b->m->dacts, rows * 2 * F, DTYPE_REAL);
    op->experts.dact = arena_take(&b->m->dacts, rows * F, DTYPE_REAL);
    op->experts.xp = xp;
    op->experts.w = w;
    op->experts.offsets = offsets;
    op->experts.E = E;
    op->experts.C = b->C;
    op->experts.F = F;
    return op->experts.yp;
}

// A SwiGLU applied to every row: one expert whose group is all N rows.
static Buf op_swiglu_all(Builder *b, Buf x, Buf w, size_t F) {
    Tensor offsets = take(b, 2, DTYPE_I32);   // (2) {0, N}
    if (!measuring(b)) {
        int32_t host[2] = {0, (int32_t)b->N};
        b->m->be->upload(offsets, host, sizeof host);
    }
    return op_experts(b, x, w, offsets, b->N, 1, F);
}

static Buf build_attention(Builder *b, Buf xn, int l) {
    const ModelConfig *c = &b->m->cfg;
    size_t H = (size_t)c->heads, KV = (size_t)c->kv_heads, D = b->C / H;
    size_t QKV = (H + 2 * KV) * D;
    Buf wqkv = param_buf(b, QKV * b->C, "model.layers.%d.self_attn.q_proj.weight", l, 0);
    Buf wo = param_buf(b, b->C * H * D, "model.layers.%d.self_attn.o_proj.weight", l, 0);
    Buf qkv = op_matmul(b, xn, wqkv, b->N, b->C, QKV);   // (N, (H+2KV)D)

    TapeOp *rope = tape_push(&b->m->tape, OP_ROPE);
    rope->rope.qkv = qkv;
    rope->rope.B = b->m->B;
    rope->rope.T = b->m->T;
    rope->rope.H = H;
    rope->rope.KV = KV;
    rope->rope.D = D;
    rope->rope.theta = c->rope_theta;

    TapeOp *op = tape_push(&b->m->tape, OP_ATTENTION);
    size_t B = b->m->B, T = b->m->T, att = B * H * T * T, datt = att;   // (B, H, T, T)
    const Backend *be = b->m->be;
    if (be->attention_plan) be->attention_plan(&att, &datt, B, T, H, KV, D, b->m->tape.bf16);
    op->attention.out = take_buf(b, b->N * H * D);   // (N, H*D)
    op->attention.att = take(b, att, DTYPE_REAL);
    op->attention.datt = arena_take(&b->m->dacts, datt, DTYPE_REAL);
    op->attention.qkv = qkv;
    op->attention.B = b->m->B;
    op->attention.T = b->m->T;
    op->attention.H = H;
    op->attention.KV = KV;
    op->attention.D = D;
    return op_matmul(b, op->attention.out, wo, b->N, H * D, b->C);
}

// Router input after jitter (Switch: only the router sees the jittered input).
static Buf build_router_input(Builder *b, Buf xn, MoeLayerState *st) {
    if (b->m->cfg.noise != NOISE_JITTER) return xn;
    TapeOp *op = tape_push(&b->m->tape, OP_MUL);
    st->jitter = take(b, b->N * b->C, DTYPE_REAL);   // (N, C)
    op->mul.out = take_buf(b, b->N * b->C);
    op->mul.x = xn;
    op->mul.u = st->jitter;
    op->mul.n = b->N * b->C;
    return op->mul.out;
}

typedef struct {
    Buf clean, raw, logits, scores, gates;   // (N, E) x4, (N, slots)
} RouterBufs;

static Buf op_scores(Builder *b, Buf logits) {
    const ModelConfig *c = &b->m->cfg;
    TapeOp *sc = tape_push(&b->m->tape, OP_SCORES);
    sc->scores.scores = take_buf(b, b->N * (size_t)c->experts);
    sc->scores.logits = logits;
    sc->scores.N = b->N;
    sc->scores.E = (size_t)c->experts;
    sc->scores.func = (ScoreFunc)c->score;
    return sc->scores.scores;
}

static Buf op_gates(Builder *b, Buf scores, Tensor idx, size_t slots, int renorm) {
    TapeOp *g = tape_push(&b->m->tape, OP_GATES);
    g->gates.gates = take_buf(b, b->N * slots);   // (N, slots)
    g->gates.scores = scores;
    g->gates.idx = idx;
    g->gates.N = b->N;
    g->gates.E = (size_t)b->m->cfg.experts;
    g->gates.k = slots;
    g->gates.renorm = renorm;
    return g->gates.gates;
}

// Scores (of the noisy logits under Shazeer noise), top-k on the scores or on scores +
// expert bias (DeepSeek-V3: the bias picks, the scores weigh), and gates: one op
// (Backend.route_topk_forward).
static void op_route(Builder *b, RouterBufs *r, MoeLayerState *st) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, N = b->N, k = (size_t)c->top_k;
    TapeOp *op = tape_push(&b->m->tape, OP_ROUTE);
    r->scores = op->route.scores = take_buf(b, N * E);   // (N, E)
    r->gates = op->route.gates = take_buf(b, N * k);     // (N, k)
    st->idx = op->route.idx = take(b, N * k, DTYPE_I32); // (N, k)
    st->gates = r->gates.v;
    Buf none = {tensor_none(), tensor_none()};
    int noisy = c->noise == NOISE_SHAZEER;
    op->route.logits = noisy ? r->clean : r->logits;
    op->route.h = noisy ? r->logits : none;
    op->route.raw = noisy ? r->raw : none;
    op->route.eps = noisy ? st->eps : tensor_none();
    op->route.bias = c->bias_gamma > 0 ? st->bias : tensor_none();
    op->route.N = N;
    op->route.E = E;
    op->route.k = k;
    op->route.func = (ScoreFunc)c->score;
    op->route.renorm = c->renorm;
}

// Hash routing: fixed experts from the token id, equal gates 1/k, no learned router.
static RouterBufs build_hash_router(Builder *b, MoeLayerState *st) {
    size_t k = (size_t)b->m->cfg.top_k, N = b->N;
    RouterBufs r = {0};
    TapeOp *h = tape_push(&b->m->tape, OP_HASH_ROUTE);
    st->idx = h->hash.idx = take(b, N * k, DTYPE_I32);   // (N, k)
    h->hash.tokens = b->m->tokens;
    h->hash.N = N;
    h->hash.E = (size_t)b->m->cfg.experts;
    h->hash.k = k;
    r.gates.v = take(b, N * k, DTYPE_REAL);   // (N, k) constant
    r.gates.g = tensor_none();
    if (!measuring(b)) {
        real *g = CALLOC(N * k, sizeof *g);
        for (size_t i = 0; i < N * k; i++) g[i] = (real)(1.0 / (double)k);
        b->m->be->upload(r.gates.v, g, N * k * sizeof *g);
        free(g);
    }
    st->gates = r.gates.v;
    return r;
}

// Expert choice: every (token, expert) pair is a slot (idx (N, E) = 0..E-1 per row), the
// gate is the score itself; which slots are kept is the experts' choice (capacity stage).
static void build_expert_choice_slots(Builder *b, RouterBufs *r, MoeLayerState *st) {
    size_t E = (size_t)b->m->cfg.experts, N = b->N;
    st->idx = take(b, N * E, DTYPE_I32);   // (N, E) constant
    if (!measuring(b)) {
        int32_t *idx = CALLOC(N * E, sizeof *idx);
        for (size_t i = 0; i < N * E; i++) idx[i] = (int32_t)(i % E);
        b->m->be->upload(st->idx, idx, N * E * sizeof *idx);
        free(idx);
    }
    r->gates = op_gates(b, r->scores, st->idx, E, 0);
    st->gates = r->gates.v;
    st->probs = r->scores.v;   // router health: entropy of the scores
}

// Shazeer's noisy logits as their own op (top-k routing computes them in its fused op).
static void op_noisy(Builder *b, const RouterBufs *r, const MoeLayerState *st) {
    TapeOp *op = tape_push(&b->m->tape, OP_NOISY);
    op->noisy.h = r->logits;
    op->noisy.clean = r->clean;
    op->noisy.raw = r->raw;
    op->noisy.eps = st->eps;
    op->noisy.n = b->N * (size_t)b->m->cfg.experts;
}

// Router logits, optional Shazeer noise, scores, selection and gates.
static RouterBufs build_router(Builder *b, Buf xr, int l, MoeLayerState *st) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, N = b->N;
    if (c->select == SELECT_HASH) return build_hash_router(b, st);
    RouterBufs r = {0};
    Buf wg = param_buf(b, E * b->C, "model.layers.%d.block_sparse_moe.gate.weight", l, 0);
    r.clean = op_matmul_fp32(b, xr, wg, N, b->C, E);
    r.logits = r.clean;
    if (c->noise == NOISE_SHAZEER) {
        Buf wn = param_buf(b, E * b->C, "model.layers.%d.block_sparse_moe.noise.weight", l, 0);
        r.raw = op_matmul_fp32(b, xr, wn, N, b->C, E);
        st->eps = take(b, N * E, DTYPE_REAL);   // (N, E)
        r.logits = take_buf(b, N * E);          // (N, E) h = clean + eps * softplus(raw)
    }
    if (c->select == SELECT_EXPERT_CHOICE) {
        if (c->noise == NOISE_SHAZEER) op_noisy(b, &r, st);
        r.scores = op_scores(b, r.logits);
        build_expert_choice_slots(b, &r, st);
        return r;
    }
    op_route(b, &r, st);
    return r;
}

static void op_lb_loss(Builder *b, Buf probs, MoeLayerState *st, double coef) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, G = c->lb_type == LB_SEQ ? b->m->B : 1;
    st->probs = probs.v;
    st->lb_op = b->m->tape.n;
    TapeOp *lb = tape_push(&b->m->tape, OP_LB_LOSS);
    st->lb = lb->lb.loss = take(b, 1, DTYPE_REAL);
    st->counts = lb->lb.counts = lb->lb.counts_used = take(b, G * E, DTYPE_I32);   // (G, E)
    st->pmean = lb->lb.pmean = take(b, G * E, DTYPE_REAL);                          // (G, E)
    st->pooled_counts = take(b, E, DTYPE_I32);
    lb->lb.idx = st->idx;
    lb->lb.probs = probs;
    lb->lb.N = b->N;
    lb->lb.E = E;
    lb->lb.k = (size_t)c->top_k;
    lb->lb.G = G;
    lb->lb.coef = lb->lb.coef_used = coef;
}

static void op_z_loss(Builder *b, Buf logits, MoeLayerState *st, double coef) {
    TapeOp *z = tape_push(&b->m->tape, OP_Z_LOSS);
    st->z = z->zloss.loss = take(b, 1, DTYPE_REAL);
    st->lse = z->zloss.lse = take(b, b->N, DTYPE_REAL);   // (N)
    z->zloss.logits = logits;
    z->zloss.N = b->N;
    z->zloss.E = (size_t)b->m->cfg.experts;
    z->zloss.coef = coef;
}

static void op_shazeer_losses(Builder *b, const RouterBufs *r, MoeLayerState *st, double coef) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, k = (size_t)c->top_k, N = b->N;
    st->importance_op = b->m->tape.n;
    TapeOp *imp = tape_push(&b->m->tape, OP_IMPORTANCE_LOSS);
    st->importance = imp->importance.loss = take(b, 1, DTYPE_REAL);
    st->imp = imp->importance.imp = imp->importance.imp_used = take(b, E, DTYPE_REAL);
    st->pooled_imp = take(b, E, DTYPE_REAL);
    imp->importance.idx = st->idx;
    imp->importance.gates = r->gates;
    imp->importance.N = N;
    imp->importance.E = E;
    imp->importance.k = k;
    imp->importance.coef = imp->importance.coef_used = coef;

    st->load_op = b->m->tape.n;
    TapeOp *ld = tape_push(&b->m->tape, OP_LOAD_LOSS);
    st->load = ld->load.loss = take(b, 1, DTYPE_REAL);
    st->load_sums = ld->load.load = ld->load.load_used = take(b, E, DTYPE_REAL);
    st->pooled_load = take(b, E, DTYPE_REAL);
    ld->load.idx = st->idx;
    ld->load.clean = r->clean;
    ld->load.h = r->logits;
    ld->load.raw = r->raw;
    ld->load.N = N;
    ld->load.E = E;
    ld->load.k = k;
    ld->load.coef = ld->load.coef_used = coef;
}

// Aux losses, each averaged over MoE layers: backward seeds carry coef / n_moe. Hash
// routing has no router to balance; expert choice is balanced by construction (z-loss
// only).
static void build_aux_losses(Builder *b, const RouterBufs *r, MoeLayerState *st) {
    const ModelConfig *c = &b->m->cfg;
    double per_layer = 1.0 / (double)b->m->n_moe;
    if (c->select == SELECT_HASH) return;
    if (c->select == SELECT_TOPK) {
        Buf probs = r->scores;
        if (c->score == SCORE_SIGMOID) {
            TapeOp *op = tape_push(&b->m->tape, OP_NORMALIZE);
            op->normalize.p = take_buf(b, b->N * (size_t)c->experts);
            op->normalize.s = r->scores;
            op->normalize.N = b->N;
            op->normalize.E = (size_t)c->experts;
            probs = op->normalize.p;
        }
        op_lb_loss(b, probs, st, c->aux_coef * per_layer);
    }
    op_z_loss(b, r->logits, st, c->z_coef * per_layer);
    if (c->noise == NOISE_SHAZEER) op_shazeer_losses(b, r, st, c->noise_coef * per_layer);
}

// Which assignments survive: capacity (token choice) or each expert's top-C (expert choice).
static void build_keep(Builder *b, const RouterBufs *r, MoeLayerState *st, size_t slots) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, N = b->N;
    st->keep = take(b, N * slots, DTYPE_I32);   // (N, slots)
    if (c->select == SELECT_EXPERT_CHOICE) {
        TapeOp *ec = tape_push(&b->m->tape, OP_EXPERT_CHOICE);
        ec->expert_choice.keep = st->keep;
        ec->expert_choice.scores = r->scores.v;
        ec->expert_choice.N = N;
        ec->expert_choice.E = E;
        ec->expert_choice.capacity = model_config_capacity(c, N);
        return;
    }
    TapeOp *cap = tape_push(&b->m->tape, OP_CAPACITY);
    cap->capacity.keep = st->keep;
    cap->capacity.idx = st->idx;
    cap->capacity.gates = r->gates.v;
    cap->capacity.N = N;
    cap->capacity.E = E;
    cap->capacity.k = slots;
    cap->capacity.capacity = model_config_capacity(c, N);
    cap->capacity.policy = (DropPolicy)c->drop_policy;
}

// Keep, dispatch, experts, combine. Returns y (N, C) before shared experts.
static Buf build_routed_experts(Builder *b, Buf xn, const RouterBufs *r, int l,
                                MoeLayerState *st) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, N = b->N, slots = model_config_slots(c);
    size_t F = (size_t)c->expert_ffn_dim;
    size_t M = model_config_max_rows(c, N);   // most rows the experts can receive
    st->slots = slots;
    build_keep(b, r, st, slots);

    TapeOp *dp = tape_push(&b->m->tape, OP_DISPATCH);
    st->offsets = dp->dispatch.offsets = take(b, E + 1, DTYPE_I32);
    dp->dispatch.rows = take(b, N * slots, DTYPE_I32);   // (<= N*slots) permuted row -> token
    dp->dispatch.slot = take(b, N * slots, DTYPE_I32);   // (N, slots) -> permuted row or -1
    dp->dispatch.idx = st->idx;
    dp->dispatch.keep = st->keep;
    dp->dispatch.N = N;
    dp->dispatch.E = E;
    dp->dispatch.k = slots;

    TapeOp *ga = tape_push(&b->m->tape, OP_GATHER);
    ga->gather.xp = take_buf(b, M * b->C);   // (M, C)
    ga->gather.x = xn;
    ga->gather.rows = dp->dispatch.rows;
    ga->gather.offsets = st->offsets;
    ga->gather.E = E;
    ga->gather.C = b->C;

    Buf w = expert_weights(b, l, E * 3 * F * b->C, st);
    Buf yp = op_experts(b, ga->gather.xp, w, st->offsets, M, E, F);
    b->m->tape.ops[b->m->tape.n - 1].experts.train =
        b->m->expert_train + (size_t)(st - b->m->moe) * E;

    TapeOp *co = tape_push(&b->m->tape, OP_COMBINE);
    co->combine.y = take_buf(b, N * b->C);   // (N, C)
    co->combine.yp = yp;
    co->combine.gates = r->gates;
    co->combine.slot = dp->dispatch.slot;
    co->combine.N = N;
    co->combine.k = slots;
    co->combine.C = b->C;
    return co->combine.y;
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
    for (int s = 0; s < c->shared_experts; s++) {
        Buf w = param_buf(b, 3 * Fs * b->C,
                          "model.layers.%d.block_sparse_moe.shared_experts.%d.w1.weight", l, s);
        y = op_add(b, y, op_swiglu_all(b, xn, w, Fs), b->N * b->C);
    }
    return y;
}

static Buf build_block(Builder *b, Buf x, int l, int *moe_i) {
    const ModelConfig *c = &b->m->cfg;
    Buf ln1 = param_buf(b, b->C, "model.layers.%d.input_layernorm.weight", l, 0);
    Buf ln2 = param_buf(b, b->C, "model.layers.%d.post_attention_layernorm.weight", l, 0);
    Buf h = op_add(b, x, build_attention(b, op_rmsnorm(b, x, ln1), l), b->N * b->C);
    Buf hn = op_rmsnorm(b, h, ln2);
    Buf ffn;
    if (model_config_is_moe_layer(c, l)) {
        ffn = build_moe(b, hn, l, &b->m->moe[(*moe_i)++]);
    } else {
        Buf w = param_buf(b, 3 * (size_t)c->ffn_dim * b->C, "model.layers.%d.mlp.gate_proj.weight",
                          l, 0);
        ffn = op_swiglu_all(b, hn, w, (size_t)c->ffn_dim);
    }
    return op_add(b, h, ffn, b->N * b->C);
}

void build_tape(Model *m) {
    const ModelConfig *c = &m->cfg;
    Builder b = {m, m->N, (size_t)c->d_model};
    size_t V = (size_t)c->vocab;
    tape_clear(&m->tape);
    m->acts.used = m->dacts.used = 0;
    m->tokens = take(&b, m->N, DTYPE_I32);
    m->targets = take(&b, m->N, DTYPE_I32);

    TapeOp *emb = tape_push(&m->tape, OP_EMBED);
    Buf table = param_buf(&b, V * b.C, "model.embed_tokens.weight", 0, 0);
    emb->embed.out = take_buf(&b, m->N * b.C);   // (N, C)
    emb->embed.table = table;
    emb->embed.tokens = m->tokens;
    emb->embed.N = m->N;
    emb->embed.C = b.C;

    Buf x = emb->embed.out;
    int moe_i = 0;
    for (int l = 0; l < c->layers; l++) x = build_block(&b, x, l, &moe_i);
    Buf xf = op_rmsnorm(&b, x, param_buf(&b, b.C, "model.norm.weight", 0, 0));
    Buf head = c->tie_embeddings ? table : param_buf(&b, V * b.C, "lm_head.weight", 0, 0);
    m->logits = op_matmul(&b, xf, head, m->N, b.C, V);   // (N, V)

    TapeOp *ce = tape_push(&m->tape, OP_CROSSENTROPY);
    m->ce = ce->ce.loss = take(&b, 1, DTYPE_REAL);
    ce->ce.lse = take(&b, m->N, DTYPE_REAL);
    ce->ce.targets = m->targets;
    ce->ce.logits = m->logits;
    ce->ce.N = m->N;
    ce->ce.V = V;
    ce->ce.coef = 1.0;
}
