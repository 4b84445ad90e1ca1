// build_aux_losses.c: the auxiliary losses as tape ops: load balancing, z-loss, Shazeer's
// importance and load losses (docs/routing.md, "Auxiliary losses").
#include "build_ops.h"

static void op_lb_loss(Builder *b, Buf probs, MoeLayerState *st, double coef) {
    const ModelConfig *c = &b->m->cfg;
    size_t E = (size_t)c->experts, G = c->lb_type == LB_SEQ ? b->m->B : 1;
    st->probs = probs.v;
    st->lb_op = b->m->tape.n;
    TapeOp *lb = tape_push(&b->m->tape, OP_LB_LOSS);
    st->lb = lb->lb.loss = build_take(b, 1, DTYPE_REAL);
    st->counts = lb->lb.counts = lb->lb.counts_used = build_take(b, G * E, DTYPE_I32); // (G, E)
    st->pmean = lb->lb.pmean = build_take(b, G * E, DTYPE_REAL);                       // (G, E)
    st->pooled_counts = build_take(b, E, DTYPE_I32);
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
    st->z = z->zloss.loss = build_take(b, 1, DTYPE_REAL);
    st->lse = z->zloss.lse = build_take(b, b->N, DTYPE_REAL); // (N)
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
    st->importance = imp->importance.loss = build_take(b, 1, DTYPE_REAL);
    st->imp = imp->importance.imp = imp->importance.imp_used = build_take(b, E, DTYPE_REAL);
    st->pooled_imp = build_take(b, E, DTYPE_REAL);
    imp->importance.idx = st->idx;
    imp->importance.gates = r->gates;
    imp->importance.N = N;
    imp->importance.E = E;
    imp->importance.k = k;
    imp->importance.coef = imp->importance.coef_used = coef;

    st->load_op = b->m->tape.n;
    TapeOp *ld = tape_push(&b->m->tape, OP_LOAD_LOSS);
    st->load = ld->load.loss = build_take(b, 1, DTYPE_REAL);
    st->load_sums = ld->load.load = ld->load.load_used = build_take(b, E, DTYPE_REAL);
    st->pooled_load = build_take(b, E, DTYPE_REAL);
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
void build_aux_losses(Builder *b, const RouterBufs *r, MoeLayerState *st) {
    const ModelConfig *c = &b->m->cfg;
    double per_layer = 1.0 / (double)b->m->n_moe;
    if (c->select == SELECT_HASH) return;
    if (c->select == SELECT_TOPK) {
        Buf probs = r->scores;
        if (c->score == SCORE_SIGMOID) {
            TapeOp *op = tape_push(&b->m->tape, OP_NORMALIZE);
            op->normalize.p = build_take_buf(b, b->N * (size_t)c->experts);
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
