// tape.c: the arena, the op list's dispatch table, and the forward and backward replays.
#include "tape.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

Tensor arena_take(Arena *a, size_t numel, DType dtype) {
    size_t bytes = (numel * dtype_size(dtype) + 63) / 64 * 64;
    Tensor t = {NULL, dtype, a->device, numel};
    if (a->base) {
        CHECK(a->used + bytes <= a->size, "activation arena overflow: plan and build disagree");
        t.data = a->base + a->used;
    }
    a->used += bytes;
    return t;
}

void tape_init(Tape *t) { memset(t, 0, sizeof *t); }

void tape_free(Tape *t) {
    free(t->ops);
    memset(t, 0, sizeof *t);
}

void tape_clear(Tape *t) { t->n = 0; }

TapeOp *tape_push(Tape *t, OpKind kind) {
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 128;
        t->ops = realloc(t->ops, t->cap * sizeof *t->ops);
        CHECK(t->ops, "out of memory growing the tape");
    }
    TapeOp *op = &t->ops[t->n++];
    memset(op, 0, sizeof *op);
    op->kind = kind;
    return op;
}

typedef void (*TapeOpRun)(const TapeOp *op, const Backend *be);

// tape_<member>_forward and tape_<member>_backward for every entry of the op list, each
// running that entry's statements with `a` at the op's operands.
#define TAPE_OP(kind, member, fields, forward, backward)                                       \
    static void tape_##member##_forward(const TapeOp *op, const Backend *be) {                 \
        const __typeof__(op->member) *a = &op->member;                                         \
        forward;                                                                               \
    }                                                                                          \
    static void tape_##member##_backward(const TapeOp *op, const Backend *be) {                \
        const __typeof__(op->member) *a = &op->member;                                         \
        (void)a;                                                                               \
        (void)be;                                                                              \
        backward;                                                                              \
    }
#include "tape_ops.def"
#undef TAPE_OP

// The dispatch table, indexed by OpKind.
static const struct {
    TapeOpRun forward, backward;
} tape_op_table[OP_COUNT] = {
#define TAPE_OP(kind, member, fields, forward, backward)                                       \
    [OP_##kind] = {tape_##member##_forward, tape_##member##_backward},
#include "tape_ops.def"
#undef TAPE_OP
};

// Before an op with products: the precision its products run in. Set every time, not
// only under bf16: the backend's mode is shared by every model on it (a sampling model
// next to a bf16 training one runs fp32). Attention's products follow the tape too (its
// state was planned for that mode: Backend.attention_plan).
static void set_precision(const Tape *t, const TapeOp *op, const Backend *be) {
    if (!be->set_gemm_bf16) return;
    if (op->kind == OP_MATMUL)
        be->set_gemm_bf16(t->bf16 && !op->matmul.fp32);
    else if (op->kind == OP_EXPERTS || op->kind == OP_ATTENTION)
        be->set_gemm_bf16(t->bf16);
}

// The op timer's clock: on an asynchronous device, after everything issued has finished.
static double op_clock(const Tape *t, const Backend *be) {
    if (!t->op_seconds) return 0.0;
    if (be->synchronize) be->synchronize();
    return omp_get_wtime();
}

void tape_forward(const Tape *t, const Backend *be) {
    for (size_t i = 0; i < t->n; i++) {
        double t0 = op_clock(t, be);
        set_precision(t, &t->ops[i], be);
        tape_op_table[t->ops[i].kind].forward(&t->ops[i], be);
        if (t->op_seconds) t->op_seconds[i] += op_clock(t, be) - t0;
    }
}

void tape_backward(const Tape *t, const Backend *be) {
    for (size_t i = t->n; i-- > 0;) {
        double t0 = op_clock(t, be);
        set_precision(t, &t->ops[i], be);
        tape_op_table[t->ops[i].kind].backward(&t->ops[i], be);
        if (t->op_seconds) t->op_seconds[i] += op_clock(t, be) - t0;
        if (t->after_backward) t->after_backward(t->after_ctx, i);
    }
}
