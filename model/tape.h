// tape.h: autograd-lite. The op list built once from the config, run forward in order
// and replayed backward in reverse.
//
// Defines Buf (a value and its gradient), Arena (the planned activation memory), TapeOp
// (one op kind with its named operands) and Tape. Every op reaches compute only through
// the Backend table, so the tape is backend-agnostic.
#ifndef MOE_TAPE_H
#define MOE_TAPE_H

#include <stddef.h>
#include <stdint.h>

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
    size_t used;   // bytes
    size_t size;   // bytes
    Device device;
} Arena;

Tensor arena_take(Arena *a, size_t numel, DType dtype);

typedef enum {
    OP_EMBED,
    OP_RMSNORM,
    OP_MATMUL,
    OP_ROPE,
    OP_ATTENTION,
    OP_ADD,
    OP_MUL,
    OP_EXPERTS,
    OP_SCORES,
    OP_NOISY,
    OP_ROUTE,
    OP_GATES,
    OP_CAPACITY,
    OP_DISPATCH,
    OP_GATHER,
    OP_COMBINE,
    OP_NORMALIZE,
    OP_LB_LOSS,
    OP_Z_LOSS,
    OP_IMPORTANCE_LOSS,
    OP_LOAD_LOSS,
    OP_CROSSENTROPY,
    OP_HASH_ROUTE,
    OP_EXPERT_CHOICE,
} OpKind;

typedef struct {
    OpKind kind;
    union {
        struct { Buf out, table; Tensor tokens; size_t N, C; } embed;
        struct { Buf out, x, w; Tensor rstd; size_t N, C; double eps; } rmsnorm;
        // fp32: always full precision, whatever the tape's bf16 (the router's logits).
        struct { Buf out, x, w; size_t N, K, M; int fp32; } matmul;
        struct { Buf qkv; size_t B, T, H, KV, D; double theta; } rope;
        struct { Buf out, qkv; Tensor att, datt; size_t B, T, H, KV, D; } attention;
        struct { Buf out, a, b; size_t n; } add;
        struct { Buf out, x; Tensor u; size_t n; } mul;
        struct {
            Buf yp, xp, w;
            Tensor h13, act, dh13, dact, offsets;
            const uint8_t *train;   // per-expert trainable mask, NULL: all
            size_t E, C, F;
        } experts;
        struct { Buf scores, logits; size_t N, E; ScoreFunc func; } scores;
        struct { Buf h, clean, raw; Tensor eps; size_t n; } noisy;
        // Noisy logits h (when raw.v.data: Shazeer), scores, top-k (on scores + bias when
        // bias.data) and gates in one op.
        struct {
            Buf scores, gates, h, logits, raw;
            Tensor idx, eps, bias;
            size_t N, E, k;
            ScoreFunc func;
            int renorm;
        } route;
        struct { Buf gates, scores; Tensor idx; size_t N, E, k; int renorm; } gates;
        struct {
            Tensor keep, idx, gates;
            size_t N, E, k, capacity;
            DropPolicy policy;
        } capacity;
        struct { Tensor offsets, rows, slot, idx, keep; size_t N, E, k; } dispatch;
        struct { Buf xp, x; Tensor rows, offsets; size_t E, C; } gather;
        struct { Buf y, yp, gates; Tensor slot; size_t N, k, C; } combine;
        struct { Buf p, s; size_t N, E; } normalize;
        // Loss ops write an unscaled scalar; backward seeds it with `coef`.
        // Loss ops' backward weights by `*_used` statistics and `coef_used`: by default
        // this micro-batch's own and coef; model_use_pool swaps in statistics pooled over
        // the optimizer batch (model/pool.h).
        struct {
            Tensor loss, counts, pmean, idx, counts_used;
            Buf probs;
            size_t N, E, k, G;   // G groups: 1 (batch) or B (per sequence)
            double coef, coef_used;
        } lb;
        struct { Tensor loss, lse; Buf logits; size_t N, E; double coef; } zloss;
        struct {
            Tensor loss, imp, idx, imp_used;
            Buf gates;
            size_t N, E, k;
            double coef, coef_used;
        } importance;
        struct {
            Tensor loss, load, idx, load_used;
            Buf clean, h, raw;
            size_t N, E, k;
            double coef, coef_used;
        } load;
        struct { Tensor loss, lse, targets; Buf logits; size_t N, V; double coef; } ce;
        struct { Tensor idx, tokens; size_t N, E, k; } hash;
        struct { Tensor keep, scores; size_t N, E, capacity; } expert_choice;
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
} Tape;

void tape_init(Tape *t);
void tape_free(Tape *t);
void tape_clear(Tape *t);
TapeOp *tape_push(Tape *t, OpKind kind);
void tape_forward(const Tape *t, const Backend *be);
void tape_backward(const Tape *t, const Backend *be);

#endif
