// build_router.c: the router as tape ops: jitter, logits, Shazeer noise, scores, top-k
// (or hash routing, or expert choice's slots) and gates (docs/routing.md).
#include "build_ops.h"

#include <stdlib.h>

#include "../base/util.h"

// Router input after jitter (Switch: only the router sees the jittered input).
Buf build_router_input(Builder *b, Buf xn, MoeLayerState *st) {
    if (b->m->cfg.noise != NOISE_JITTER) return xn;
    TapeOp *op = tape_push(&b->m->tape, OP_MUL);
    st->jitter = build_take(b, b->N * b->C, DTYPE_REAL); // (N, C)
    op->mul.out = build_take_buf(b, b->N * b->C);
    op->mul.x = xn;
    op->mul.u = st->jitter;
    op->mul.n = b->N * b->C;
    return op->mul.out;
}

static Buf op_scores(Builder *b, Buf logits) {
    const ModelConfig *c = &b->m->cfg;
    TapeOp *sc = tape_push(&b->m->tape, OP_SCORES);
    sc->scores.scores = build_take_buf(b, b->N * (size_t)c->experts);
    sc->scores.logits = logits;
    sc->scores.N = b->N;
    sc->scores.E = (size_t)c->experts;
    sc->scores.func = (ScoreFunc)c->score;
    return sc->scores.scores;
}

static Buf op_gates(Builder *b, Buf scores, Tensor idx, size_t slots, int renorm) {
    TapeOp *g = tape_push(&b->m->tape, OP_GATES);
    g->gates.gates = build_take_buf(b, b->N * slots); // (N, slots)
    g->gates.scores = scores;
    g->gates.idx = idx;
    g->gates.N = b->N;
    g->gates.E = (size_t)b->m->cfg.experts;
    g->gates.k = slots;
    g->gates.renorm = renorm;
    return g->gates.gates;
}

// Scores (of the noisy logits under Shazeer noise), top-k on the scores or on scores +
// expert bias (DeepSeek-V3: the bias picks, the scores weigh), limited to the best expert
// groups (DeepSeek-V2/V3), and gates times gate_scale: one op
// (Backend.route_topk_forward).
static void op_route(Builder *b, RouterBufs *r, MoeLayerState *st) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, N = b->N, k = (size_t)c->top_k;
    TapeOp *op = tape_push(&b->m->tape, OP_ROUTE);
    r->scores = op->route.scores = build_take_buf(b, N * E);   // (N, E)
    r->gates = op->route.gates = build_take_buf(b, N * k);     // (N, k)
    st->idx = op->route.idx = build_take(b, N * k, DTYPE_I32); // (N, k)
    st->gates = r->gates.v;
    Buf none = {tensor_none(), tensor_none()};
    int noisy = c->noise == NOISE_SHAZEER;
    op->route.logits = noisy ? r->clean : r->logits;
    op->route.h = noisy ? r->logits : none;
    op->route.raw = noisy ? r->raw : none;
    op->route.eps = noisy ? st->eps : tensor_none();
    op->route.bias = model_config_has_bias(c) ? st->bias : tensor_none();
    op->route.N = N;
    op->route.E = E;
    op->route.k = k;
    op->route.spec = model_config_route_spec(c);
}

// Hash routing: fixed experts from the token id, equal gates 1/k, no learned router.
static RouterBufs build_hash_router(Builder *b, MoeLayerState *st) {
    size_t k = (size_t)b->m->cfg.top_k, N = b->N;
    RouterBufs r = {0};
    TapeOp *h = tape_push(&b->m->tape, OP_HASH_ROUTE);
    st->idx = h->hash.idx = build_take(b, N * k, DTYPE_I32); // (N, k)
    h->hash.tokens = b->m->tokens;
    h->hash.N = N;
    h->hash.E = (size_t)b->m->cfg.experts;
    h->hash.k = k;
    r.gates.v = build_take(b, N * k, DTYPE_REAL); // (N, k) constant
    r.gates.g = tensor_none();
    if (!build_is_measuring(b)) {
        real *g = CALLOC(N * k, sizeof *g);
        for (size_t i = 0; i < N * k; i++)
            g[i] = (real)(1.0 / (double)k);
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
    st->idx = build_take(b, N * E, DTYPE_I32); // (N, E) constant
    if (!build_is_measuring(b)) {
        int32_t *idx = CALLOC(N * E, sizeof *idx);
        for (size_t i = 0; i < N * E; i++)
            idx[i] = (int32_t)(i % E);
        b->m->be->upload(st->idx, idx, N * E * sizeof *idx);
        free(idx);
    }
    r->gates = op_gates(b, r->scores, st->idx, E, 0);
    st->gates = r->gates.v;
    st->probs = r->scores.v; // router health: entropy of the scores
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
RouterBufs build_router(Builder *b, Buf xr, int l, MoeLayerState *st) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, N = b->N;
    if (c->select == SELECT_HASH) return build_hash_router(b, st);
    RouterBufs r = {0};
    Buf wg = build_param(b, E * b->C, "model.layers.%d.block_sparse_moe.gate.weight", l, 0);
    r.clean = build_matmul_fp32(b, xr, wg, N, b->C, E);
    r.logits = r.clean;
    if (c->noise == NOISE_SHAZEER) {
        Buf wn =
            build_param(b, E * b->C, "model.layers.%d.block_sparse_moe.noise.weight", l, 0);
        r.raw = build_matmul_fp32(b, xr, wn, N, b->C, E);
        st->eps = build_take(b, N * E, DTYPE_REAL); // (N, E)
        r.logits = build_take_buf(b, N * E);        // (N, E) h = clean + eps * softplus(raw)
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
