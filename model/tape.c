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

static void op_forward(const TapeOp *op, const Backend *be) {
    switch (op->kind) {
    case OP_EMBED: {
        const __typeof__(op->embed) *a = &op->embed;
        be->embedding_forward(a->out.v, a->tokens, a->table.v, a->N, a->C);
    } break;
    case OP_RMSNORM: {
        const __typeof__(op->rmsnorm) *a = &op->rmsnorm;
        be->rmsnorm_forward(a->out.v, a->rstd, a->x.v, a->w.v, a->N, a->C, a->eps);
    } break;
    case OP_MATMUL: {
        const __typeof__(op->matmul) *a = &op->matmul;
        be->matmul_forward(a->out.v, a->x.v, a->w.v, a->N, a->K, a->M);
    } break;
    case OP_ROPE: {
        const __typeof__(op->rope) *a = &op->rope;
        be->rope_forward(a->qkv.v, a->B, a->T, a->H, a->KV, a->D, a->theta);
    } break;
    case OP_ATTENTION: {
        const __typeof__(op->attention) *a = &op->attention;
        be->attention_forward(a->out.v, a->att, a->qkv.v, a->B, a->T, a->H, a->KV, a->D);
    } break;
    case OP_ADD: be->add_forward(op->add.out.v, op->add.a.v, op->add.b.v, op->add.n); break;
    case OP_MUL: be->mul_forward(op->mul.out.v, op->mul.x.v, op->mul.u, op->mul.n); break;
    case OP_EXPERTS: {
        const __typeof__(op->experts) *a = &op->experts;
        be->experts_forward(a->yp.v, a->h13, a->act, a->xp.v, a->w.v, a->offsets, a->E, a->C,
                            a->F);
    } break;
    case OP_SCORES: {
        const __typeof__(op->scores) *a = &op->scores;
        be->router_scores_forward(a->scores.v, a->logits.v, a->N, a->E, a->func);
    } break;
    case OP_NOISY: {
        const __typeof__(op->noisy) *a = &op->noisy;
        be->noisy_logits_forward(a->h.v, a->clean.v, a->raw.v, a->eps, a->n);
    } break;
    case OP_ROUTE: {
        const __typeof__(op->route) *a = &op->route;
        be->route_topk_forward(a->scores.v, a->idx, a->gates.v, a->h.v, a->logits.v, a->raw.v,
                               a->eps, a->bias, a->N, a->E, a->k, a->func, a->renorm);
    } break;
    case OP_GATES: {
        const __typeof__(op->gates) *a = &op->gates;
        be->gates_forward(a->gates.v, a->scores.v, a->idx, a->N, a->E, a->k, a->renorm);
    } break;
    case OP_CAPACITY: {
        const __typeof__(op->capacity) *a = &op->capacity;
        be->capacity_forward(a->keep, a->idx, a->gates, a->N, a->E, a->k, a->capacity,
                             a->policy);
    } break;
    case OP_DISPATCH: {
        const __typeof__(op->dispatch) *a = &op->dispatch;
        be->dispatch_plan(a->offsets, a->rows, a->slot, a->idx, a->keep, a->N, a->E, a->k);
    } break;
    case OP_GATHER: {
        const __typeof__(op->gather) *a = &op->gather;
        be->gather_rows_forward(a->xp.v, a->x.v, a->rows, a->offsets, a->E, a->C);
    } break;
    case OP_COMBINE: {
        const __typeof__(op->combine) *a = &op->combine;
        be->combine_forward(a->y.v, a->yp.v, a->gates.v, a->slot, a->N, a->k, a->C);
    } break;
    case OP_NORMALIZE: {
        const __typeof__(op->normalize) *a = &op->normalize;
        be->normalize_rows_forward(a->p.v, a->s.v, a->N, a->E);
    } break;
    case OP_LB_LOSS: {
        const __typeof__(op->lb) *a = &op->lb;
        be->lb_loss_forward(a->loss, a->counts, a->pmean, a->probs.v, a->idx, a->N, a->E, a->k,
                            a->G);
    } break;
    case OP_Z_LOSS: {
        const __typeof__(op->zloss) *a = &op->zloss;
        be->zloss_forward(a->loss, a->lse, a->logits.v, a->N, a->E);
    } break;
    case OP_IMPORTANCE_LOSS: {
        const __typeof__(op->importance) *a = &op->importance;
        be->importance_loss_forward(a->loss, a->imp, a->gates.v, a->idx, a->N, a->E, a->k);
    } break;
    case OP_LOAD_LOSS: {
        const __typeof__(op->load) *a = &op->load;
        be->load_loss_forward(a->loss, a->load, a->clean.v, a->h.v, a->raw.v, a->idx, a->N,
                              a->E, a->k);
    } break;
    case OP_HASH_ROUTE: {
        const __typeof__(op->hash) *a = &op->hash;
        be->hash_route_forward(a->idx, a->tokens, a->N, a->E, a->k);
    } break;
    case OP_EXPERT_CHOICE: {
        const __typeof__(op->expert_choice) *a = &op->expert_choice;
        be->expert_choice_forward(a->keep, a->scores, a->N, a->E, a->capacity);
    } break;
    case OP_CROSSENTROPY: {
        const __typeof__(op->ce) *a = &op->ce;
        be->crossentropy_forward(a->loss, a->lse, a->logits.v, a->targets, a->N, a->V);
    } break;
    }
}

static void op_backward(const TapeOp *op, const Backend *be) {
    switch (op->kind) {
    case OP_EMBED: {
        const __typeof__(op->embed) *a = &op->embed;
        if (a->table.g.data) be->embedding_backward(a->table.g, a->out.g, a->tokens, a->N, a->C);
    } break;
    case OP_RMSNORM: {
        const __typeof__(op->rmsnorm) *a = &op->rmsnorm;
        be->rmsnorm_backward(a->x.g, a->w.g, a->out.g, a->x.v, a->w.v, a->rstd, a->N, a->C);
    } break;
    case OP_MATMUL: {
        const __typeof__(op->matmul) *a = &op->matmul;
        be->matmul_backward(a->x.g, a->w.g, a->out.g, a->x.v, a->w.v, a->N, a->K, a->M);
    } break;
    case OP_ROPE: {
        const __typeof__(op->rope) *a = &op->rope;
        be->rope_backward(a->qkv.g, a->B, a->T, a->H, a->KV, a->D, a->theta);
    } break;
    case OP_ATTENTION: {
        const __typeof__(op->attention) *a = &op->attention;
        be->attention_backward(a->qkv.g, a->datt, a->out.g, a->out.v, a->qkv.v, a->att, a->B,
                               a->T, a->H, a->KV, a->D);
    } break;
    case OP_ADD: be->add_backward(op->add.a.g, op->add.b.g, op->add.out.g, op->add.n); break;
    case OP_MUL: be->mul_backward(op->mul.x.g, op->mul.out.g, op->mul.u, op->mul.n); break;
    case OP_EXPERTS: {
        const __typeof__(op->experts) *a = &op->experts;
        be->experts_backward(a->xp.g, a->w.g, a->train, a->yp.g, a->dh13, a->dact, a->h13,
                             a->act, a->xp.v, a->w.v, a->offsets, a->E, a->C, a->F);
    } break;
    case OP_SCORES: {
        const __typeof__(op->scores) *a = &op->scores;
        be->router_scores_backward(a->logits.g, a->scores.g, a->scores.v, a->N, a->E, a->func);
    } break;
    case OP_NOISY: {
        const __typeof__(op->noisy) *a = &op->noisy;
        be->noisy_logits_backward(a->clean.g, a->raw.g, a->h.g, a->raw.v, a->eps, a->n);
    } break;
    case OP_ROUTE: {
        const __typeof__(op->route) *a = &op->route;
        int noisy = a->raw.v.data != NULL;
        be->gates_backward(a->scores.g, a->gates.g, a->scores.v, a->idx, a->N, a->E, a->k,
                           a->renorm);
        be->router_scores_backward(noisy ? a->h.g : a->logits.g, a->scores.g, a->scores.v, a->N,
                                   a->E, a->func);
        if (noisy)
            be->noisy_logits_backward(a->logits.g, a->raw.g, a->h.g, a->raw.v, a->eps,
                                      a->N * a->E);
    } break;
    case OP_CAPACITY:
    case OP_DISPATCH:
    case OP_HASH_ROUTE:
    case OP_EXPERT_CHOICE: break;   // selection is constant in backward
    case OP_GATES: {
        const __typeof__(op->gates) *a = &op->gates;
        be->gates_backward(a->scores.g, a->gates.g, a->scores.v, a->idx, a->N, a->E, a->k,
                           a->renorm);
    } break;
    case OP_GATHER: {
        const __typeof__(op->gather) *a = &op->gather;
        be->gather_rows_backward(a->x.g, a->xp.g, a->rows, a->offsets, a->E, a->C);
    } break;
    case OP_COMBINE: {
        const __typeof__(op->combine) *a = &op->combine;
        be->combine_backward(a->yp.g, a->gates.g, a->y.g, a->yp.v, a->gates.v, a->slot, a->N,
                             a->k, a->C);
    } break;
    case OP_NORMALIZE: {
        const __typeof__(op->normalize) *a = &op->normalize;
        be->normalize_rows_backward(a->s.g, a->p.g, a->s.v, a->N, a->E);
    } break;
    case OP_LB_LOSS: {
        const __typeof__(op->lb) *a = &op->lb;
        if (a->coef_used != 0)
            be->lb_loss_backward(a->probs.g, a->counts_used, a->coef_used, a->N, a->E, a->k,
                                 a->G);
    } break;
    case OP_Z_LOSS: {
        const __typeof__(op->zloss) *a = &op->zloss;
        if (a->coef != 0)
            be->zloss_backward(a->logits.g, a->logits.v, a->lse, a->coef, a->N, a->E);
    } break;
    case OP_IMPORTANCE_LOSS: {
        const __typeof__(op->importance) *a = &op->importance;
        if (a->coef_used != 0)
            be->importance_loss_backward(a->gates.g, a->imp_used, a->idx, a->coef_used, a->N, a->E,
                                         a->k);
    } break;
    case OP_LOAD_LOSS: {
        const __typeof__(op->load) *a = &op->load;
        if (a->coef_used != 0)
            be->load_loss_backward(a->clean.g, a->h.g, a->raw.g, a->load_used, a->clean.v, a->h.v,
                                   a->raw.v, a->idx, a->coef_used, a->N, a->E, a->k);
    } break;
    case OP_CROSSENTROPY: {
        const __typeof__(op->ce) *a = &op->ce;
        be->crossentropy_backward(a->logits.g, a->logits.v, a->lse, a->targets, a->coef, a->N,
                                  a->V);
    } break;
    }
}

// Before an op with products: the precision its products run in. Set every time, not
// only under bf16: the backend's mode is shared by every model on it (a sampling model
// next to a bf16 training one runs fp32). Attention's products follow the tape too (its
// state was planned for that mode: Backend.attention_plan).
static void set_precision(const Tape *t, const TapeOp *op, const Backend *be) {
    if (!be->set_gemm_bf16) return;
    if (op->kind == OP_MATMUL) be->set_gemm_bf16(t->bf16 && !op->matmul.fp32);
    else if (op->kind == OP_EXPERTS || op->kind == OP_ATTENTION) be->set_gemm_bf16(t->bf16);
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
        op_forward(&t->ops[i], be);
        if (t->op_seconds) t->op_seconds[i] += op_clock(t, be) - t0;
    }
}

void tape_backward(const Tape *t, const Backend *be) {
    for (size_t i = t->n; i-- > 0;) {
        double t0 = op_clock(t, be);
        set_precision(t, &t->ops[i], be);
        op_backward(&t->ops[i], be);
        if (t->op_seconds) t->op_seconds[i] += op_clock(t, be) - t0;
    }
}
