// build_dispatch.c: which assignments survive (capacity, or expert choice) and the
// routed experts as tape ops: dispatch plan, gather, experts, weighted combine.
#include "build_ops.h"

// Which assignments survive: capacity (token choice) or each expert's top-C (expert choice).
static void build_keep(Builder *b, const RouterBufs *r, MoeLayerState *st, size_t slots) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, N = b->N;
    st->keep = build_take(b, N * slots, DTYPE_I32); // (N, slots)
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
Buf build_routed_experts(Builder *b, Buf xn, const RouterBufs *r, int l, MoeLayerState *st) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, N = b->N, slots = model_config_slots(c);
    size_t F = (size_t)c->expert_ffn_dim;
    size_t M = model_config_max_rows(c, N); // most rows the experts can receive
    st->slots = slots;
    build_keep(b, r, st, slots);

    // Tensors are kept in locals: a push may move the tape's ops.
    TapeOp *dp = tape_push(&b->m->tape, OP_DISPATCH);
    st->offsets = dp->dispatch.offsets = build_take(b, E + 1, DTYPE_I32);
    Tensor rows = build_take(b, N * slots, DTYPE_I32); // (<= N*slots) permuted row -> token
    Tensor slot = build_take(b, N * slots, DTYPE_I32); // (N, slots) -> permuted row or -1
    dp->dispatch.rows = rows;
    dp->dispatch.slot = slot;
    dp->dispatch.idx = st->idx;
    dp->dispatch.keep = st->keep;
    dp->dispatch.N = N;
    dp->dispatch.E = E;
    dp->dispatch.k = slots;

    // The dispatch is fused into the experts (docs/architecture.md, "The MoE layer"): they
    // read xn's rows and the gates times y's gradient in place of gathered copies, and
    // take the gates' gradient, so the gather runs its backward only and the combine its
    // forward only.
    Buf xp = build_take_buf(b, M * b->C); // (M, C): for a backend that gathers (CUDA, EP)
    TapeOp *ga = tape_push(&b->m->tape, OP_GATHER);
    ga->gather.xp = xp;
    ga->gather.x = xn;
    ga->gather.rows = rows;
    ga->gather.offsets = st->offsets;
    ga->gather.E = E;
    ga->gather.C = b->C;
    ga->gather.fused = 1;

    size_t held = (size_t)(b->m->layout.expert_hi - b->m->layout.expert_lo);
    Buf w = build_expert_weights(b, l, held * 3 * F * b->C, st); // (held, 3, F, C)
    Buf yp = build_experts(b, xp, w, st->offsets, M, E, F);
    size_t ex = b->m->tape.n - 1;
    st->experts_op = ex;

    Buf y = build_take_buf(b, N * b->C); // (N, C)
    TapeOp *co = tape_push(&b->m->tape, OP_COMBINE);
    co->combine.y = y;
    co->combine.yp = yp;
    co->combine.gates = r->gates;
    co->combine.slot = slot;
    co->combine.N = N;
    co->combine.k = slots;
    co->combine.C = b->C;
    co->combine.fused = 1;

    TapeOp *eo = &b->m->tape.ops[ex];
    eo->experts.train = b->m->expert_train + (size_t)(st - b->m->moe) * E;
    eo->experts.route =
        (ExpertRoute){xn.v, rows, y.g, r->gates.v, slot, slots, yp.v, r->gates.g};
    return y;
}
