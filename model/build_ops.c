// build_ops.c: the builders' primitives (activations, parameter views) and the ops
// every stage of the decoder uses.
#include "build_ops.h"

#include <stdio.h>

#include "../base/util.h"

// A differentiable activation: value in the activation arena, gradient in its twin.
Buf build_take_buf(Builder *b, size_t numel) {
    Buf x = {arena_take(&b->m->acts, numel, DTYPE_REAL),
             arena_take(&b->m->dacts, numel, DTYPE_REAL)};
    return x;
}

Tensor build_take(Builder *b, size_t numel, DType dt) {
    return arena_take(&b->m->acts, numel, dt);
}

int build_is_measuring(const Builder *b) { return b->m->acts.base == NULL; }

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
Buf build_param(Builder *b, size_t numel, const char *fmt, int i, int j) {
    const Layout *lay = &b->m->layout;
    const ParamInfo *p = param_find(b->m, fmt, i, j);
    int trains = is_trainable(b->m, p);
    for (const ParamInfo *q = p;
         q < lay->params + lay->n_params && q->offset < p->offset + numel; q++)
        CHECK(is_trainable(b->m, q) == trains,
              "%s and %s are computed by one op and must be frozen together", p->name, q->name);
    return param_view(b->m, p, numel, trains);
}

// A layer's routed experts: per-expert flags for the experts op (an expert's w1, w3, w2
// freeze together); no gradient view at all when every expert is frozen.
Buf build_expert_weights(Builder *b, int l, size_t numel, MoeLayerState *st) {
    Model *m = b->m;
    size_t E = (size_t)m->cfg.experts;
    uint8_t *flags = m->expert_train + (size_t)(st - m->moe) * E;
    int any = 0;
    for (size_t e = (size_t)m->layout.expert_lo; e < (size_t)m->layout.expert_hi; e++) {
        const ParamInfo *p =
            param_find(m, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l, (int)e);
        flags[e] = (uint8_t)is_trainable(m, p);
        for (int k = 1; k < 3; k++)
            CHECK(is_trainable(m, p + k) == flags[e],
                  "%s and %s belong to one expert and must be frozen together", p->name,
                  p[k].name);
        any |= flags[e];
    }
    return param_view(m,
                      param_find(m, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l,
                                 m->layout.expert_lo),
                      numel, any);
}

Buf build_rmsnorm(Builder *b, Buf x, Buf w) { return build_rmsnorm_width(b, x, w, b->C); }

Buf build_rmsnorm_width(Builder *b, Buf x, Buf w, size_t width) {
    TapeOp *op = tape_push(&b->m->tape, OP_RMSNORM);
    op->rmsnorm.out = build_take_buf(b, b->N * width);  // (N, width)
    op->rmsnorm.rstd = build_take(b, b->N, DTYPE_REAL); // (N)
    op->rmsnorm.x = x;
    op->rmsnorm.w = w;
    op->rmsnorm.N = b->N;
    op->rmsnorm.C = width;
    op->rmsnorm.eps = b->m->cfg.norm_eps;
    return op->rmsnorm.out;
}

Buf build_slice(Buf x, size_t offset, size_t numel) {
    Buf y = {tensor_slice(x.v, offset, numel), tensor_slice(x.g, offset, numel)};
    return y;
}

Buf build_matmul(Builder *b, Buf x, Buf w, size_t rows, size_t in, size_t out) {
    TapeOp *op = tape_push(&b->m->tape, OP_MATMUL);
    op->matmul.out = build_take_buf(b, rows * out); // (rows, out)
    op->matmul.x = x;
    op->matmul.w = w;
    op->matmul.N = rows;
    op->matmul.K = in;
    op->matmul.M = out;
    return op->matmul.out;
}

// The router's products stay fp32 under bf16 products: top-k compares logits that bf16
// rounding (8 significant bits) would tie or reorder.
Buf build_matmul_fp32(Builder *b, Buf x, Buf w, size_t rows, size_t in, size_t out) {
    Buf y = build_matmul(b, x, w, rows, in, out);
    b->m->tape.ops[b->m->tape.n - 1].matmul.fp32 = 1;
    return y;
}

Buf build_add(Builder *b, Buf x, Buf y, size_t n) {
    TapeOp *op = tape_push(&b->m->tape, OP_ADD);
    op->add.out = build_take_buf(b, n);
    op->add.a = x;
    op->add.b = y;
    op->add.n = n;
    return op->add.out;
}

// E SwiGLU experts over contiguous row groups given by `offsets` (E+1).
Buf build_experts(Builder *b, Buf xp, Buf w, Tensor offsets, size_t rows, size_t E, size_t F) {
    TapeOp *op = tape_push(&b->m->tape, OP_EXPERTS);
    const Backend *be = b->m->be;
    DType state =
        be->experts_state_dtype ? be->experts_state_dtype(b->m->tape.bf16) : DTYPE_REAL;
    op->experts.yp = build_take_buf(b, rows * b->C);      // (rows, C)
    op->experts.h13 = build_take(b, rows * 2 * F, state); // (rows, 2F)
    op->experts.act = build_take(b, rows * F, state);     // (rows, F)
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
Buf build_swiglu_all(Builder *b, Buf x, Buf w, size_t F) {
    Tensor offsets = build_take(b, 2, DTYPE_I32); // (2) {0, N}
    if (!build_is_measuring(b)) {
        int32_t host[2] = {0, (int32_t)b->N};
        b->m->be->upload(offsets, host, sizeof host);
    }
    return build_experts(b, x, w, offsets, b->N, 1, F);
}
