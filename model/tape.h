// tape.h: autograd-lite. The op list built once from the config, run forward in order
// and replayed backward in reverse.
//
// Defines Buf (a value and its gradient), Arena (the planned activation memory), TapeOp
// (one op kind with its named operands, from the tape's op list tape_ops.def) and Tape.
// Every op reaches compute only through the Backend table, so the tape is
// backend-agnostic.
#ifndef MOE_TAPE_H
#define MOE_TAPE_H

#include <stddef.h>
#include <stdint.h>

#include "../kernels/expert_shard.h"
#include "../kernels/kernels.h"

// A value and its gradient (g.data NULL: no gradient wanted or needed).
typedef struct {
    Tensor v;
    Tensor g;
} Buf;

// Bump allocator over one backend allocation, planned in two passes: a measuring pass
// (base NULL) sizes it, then the real pass hands out views into it.
typedef struct {
    char *base;
    size_t used; // bytes
    size_t size; // bytes
    Device device;
} Arena;

Tensor arena_take(Arena *a, size_t numel, DType dtype);

// TAPE_OP's operand list `(fields)` without its parentheses.
#define TAPE_FIELDS(...) __VA_ARGS__

// OP_<KIND> for every entry of the tape's op list (tape_ops.def).
typedef enum {
#define TAPE_OP(kind, member, fields, forward, backward) OP_##kind,
#include "tape_ops.def"
#undef TAPE_OP
    OP_COUNT
} OpKind;

// One op: its kind and its operands, the union member the op list names.
typedef struct {
    OpKind kind;
    union {
#define TAPE_OP(kind, member, fields, forward, backward)                                       \
    struct {                                                                                   \
        TAPE_FIELDS fields                                                                     \
    } member;
#include "tape_ops.def"
#undef TAPE_OP
    };
} TapeOp;

typedef struct {
    TapeOp *ops;
    size_t n, cap;
    // (n) when non-NULL, tape_forward and tape_backward add each op's wall time in
    // seconds at its index (make bench splits a step into phases with it).
    double *op_seconds;
    // Products in bf16 (Backend.set_gemm_bf16) for every matmul not marked fp32 and for
    // the experts; 0: fp32 throughout. Set through model_set_precision.
    int bf16;
    // When non-NULL, tape_backward calls it after each op's backward with the op's index
    // (the trainer starts summing a layer's gradients over the ranks from it as soon as
    // the layer is done).
    void (*after_backward)(void *ctx, size_t op);
    void *after_ctx;
} Tape;

void tape_init(Tape *t);
void tape_free(Tape *t);
void tape_clear(Tape *t);
TapeOp *tape_push(Tape *t, OpKind kind);
void tape_forward(const Tape *t, const Backend *be);
void tape_backward(const Tape *t, const Backend *be);

#endif
