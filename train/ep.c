#include "ep.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../dist/dist.h"

// One routed experts op's exchange. The owner receives the rows rank by rank, each rank's
// block sorted by expert as its gather left it, and runs its experts over each rank's
// block in turn, in rank order: the weight gradients then add up micro-batch by
// micro-batch as in one process. The rows and the experts' state live where the backend
// computes (device buffers on a GPU, exchanged through NCCL); the counts, worked out on
// the host, are in values (rows x C) as the all-to-alls take them.
struct EpLayer {
    ExpertShard shard;
    const Backend *be;
    size_t op;          // index of the experts op in its model's tape
    size_t cap;         // rows the owner's buffers hold: every rank's worst case
    size_t local;       // rows this rank's own buffers (xp, yp) hold
    size_t rows;        // this rank's routed rows in the last forward (offsets[E])
    size_t C, F, E, Eq;
    int32_t *off;       // (E+1) host: this rank's offsets of the last forward
    int32_t *send_cnt;  // (P, Eq) rows this rank sends for each of rank q's experts
    int32_t *recv_cnt;  // (P, Eq) rows rank q sends for each of this rank's experts
    int32_t *loff;      // (P, Eq+1) rank q's block: rows per own expert, prefix sums
    size_t *scount, *sdispl, *rcount, *rdispl;   // (P) each, in values
    Tensor loff_dev;    // (P, Eq+1) int32 loff where the experts op reads it
    Tensor x, y, dx;    // (cap, C) received rows, their outputs, their input gradients
    Tensor h13, act;    // (cap, 2F), (cap, F) the experts' state between passes (its dtype)
    Tensor dh13, dact;  // (cap, 2F), (cap, F) scratch of the backward
    Tensor back;        // (local, C) this rank's input gradients coming back
};

// Counts per destination from this rank's offsets (copied to the host), exchanged; each
// block's offsets, on the host and where the experts op reads them.
static void exchange_counts(EpLayer *L, Tensor offsets) {
    const int P = dist_ep_size(), me = dist_ep_rank();
    const size_t Eq = L->Eq, C = L->C, E = L->E;
    const int32_t *off = L->off;
    L->be->download(L->off, offsets, (E + 1) * sizeof *L->off);
    L->rows = (size_t)off[E];
    for (size_t e = 0; e < E; e++) L->send_cnt[e] = off[e + 1] - off[e];
    dist_alltoall_i32(L->send_cnt, L->recv_cnt, Eq);
    size_t rdispl = 0;
    for (int q = 0; q < P; q++) {
        L->sdispl[q] = (size_t)off[(size_t)q * Eq] * C;
        L->scount[q] = (size_t)(off[(size_t)(q + 1) * Eq] - off[(size_t)q * Eq]) * C;
        int32_t *lo = L->loff + (size_t)q * (Eq + 1), pos = 0;
        for (size_t j = 0; j <= Eq; j++) {
            lo[j] = pos;
            if (j < Eq) pos += L->recv_cnt[(size_t)q * Eq + j];
        }
        L->rdispl[q] = rdispl;
        L->rcount[q] = (size_t)pos * C;
        rdispl += (size_t)pos * C;
    }
    CHECK(rdispl / C <= L->cap, "ep: %zu rows for EP rank %d's experts, buffers for %zu",
          rdispl / C, me, L->cap);
    L->be->upload(L->loff_dev, L->loff, (size_t)P * (Eq + 1) * sizeof *L->loff);
}

// Views of rank q's block: rows from r0 (rows before it), n rows.
#define BLOCK(t, width) tensor_slice((t), r0 * (width), n * (width))

// w holds this rank's experts only (the model is a shard: model_init_experts).
static void ep_forward(void *ctx, const Backend *be, Tensor yp, Tensor xp, Tensor w,
                       Tensor offsets, size_t E, size_t C, size_t F) {
    EpLayer *L = ctx;
    const size_t Eq = L->Eq;
    (void)E;
    exchange_counts(L, offsets);
    dist_alltoallv_tensor(be, xp, L->scount, L->sdispl, L->x, L->rcount, L->rdispl);
    for (int q = 0; q < dist_ep_size(); q++) {
        size_t r0 = L->rdispl[q] / C, n = L->rcount[q] / C;
        Tensor lo = tensor_slice(L->loff_dev, (size_t)q * (Eq + 1), Eq + 1);
        be->experts_forward(BLOCK(L->y, C), BLOCK(L->h13, 2 * F), BLOCK(L->act, F),
                            BLOCK(L->x, C), (ExpertRoute){0}, w, lo, Eq, C, F);
    }
    dist_alltoallv_tensor(be, L->y, L->rcount, L->rdispl, yp, L->scount, L->sdispl);
}

// The counts are the forward's (kept in L): each backward follows its own forward.
static void ep_backward(void *ctx, const Backend *be, Tensor dxp, Tensor dw,
                        const uint8_t *train, Tensor dyp, Tensor xp, Tensor w, Tensor offsets,
                        size_t E, size_t C, size_t F) {
    EpLayer *L = ctx;
    const size_t Eq = L->Eq;
    const uint8_t *mine = train ? train + (size_t)dist_ep_rank() * Eq : NULL;   // (Eq)
    (void)xp;
    (void)offsets;
    (void)E;
    dist_alltoallv_tensor(be, dyp, L->scount, L->sdispl, L->y, L->rcount, L->rdispl);
    for (int q = 0; q < dist_ep_size(); q++) {
        size_t r0 = L->rdispl[q] / C, n = L->rcount[q] / C;
        Tensor lo = tensor_slice(L->loff_dev, (size_t)q * (Eq + 1), Eq + 1);
        be->zero(BLOCK(L->dx, C), n * C);
        be->experts_backward(BLOCK(L->dx, C), dw, mine, BLOCK(L->y, C), BLOCK(L->dh13, 2 * F),
                             BLOCK(L->dact, F), BLOCK(L->h13, 2 * F), BLOCK(L->act, F),
                             BLOCK(L->x, C), (ExpertRoute){0}, w, lo, Eq, C, F);
    }
    dist_alltoallv_tensor(be, L->dx, L->rcount, L->rdispl, L->back, L->scount, L->sdispl);
    // Nothing below wants dxp when it is absent; the exchange was still everyone's.
    if (dxp.data) be->add_backward(dxp, tensor_none(), L->back, L->rows * C);
}

// A zeroed buffer of numel values of dtype on the backend's device.
static Tensor take(const Backend *be, size_t numel, DType dtype) {
    size_t bytes = (numel ? numel : 1) * dtype_size(dtype);
    void *p = be->alloc(bytes);
    CHECK(p, "ep: out of %s memory for %zu bytes of exchange buffers", be->name, bytes);
    return (Tensor){p, dtype, be->device, numel};
}

static void layer_init(EpLayer *L, Model *m, size_t op_index) {
    const TapeOp *op = &m->tape.ops[op_index];
    const Backend *be = m->be;
    const int P = dist_ep_size();
    memset(L, 0, sizeof *L);
    L->be = be;
    L->op = op_index;
    L->E = op->experts.E;
    L->C = op->experts.C;
    L->F = op->experts.F;
    L->Eq = L->E / (size_t)P;
    L->local = op->experts.yp.v.numel / L->C;   // this rank's worst case
    L->cap = L->local * (size_t)P;
    L->off = CALLOC(L->E + 1, sizeof *L->off);
    L->send_cnt = CALLOC(L->E, sizeof *L->send_cnt);
    L->recv_cnt = CALLOC(L->E, sizeof *L->recv_cnt);
    L->scount = CALLOC((size_t)P, sizeof(size_t));
    L->sdispl = CALLOC((size_t)P, sizeof(size_t));
    L->rcount = CALLOC((size_t)P, sizeof(size_t));
    L->rdispl = CALLOC((size_t)P, sizeof(size_t));
    L->loff = CALLOC((size_t)P * (L->Eq + 1), sizeof *L->loff);
    DType state = op->experts.h13.dtype;   // the experts op's own (bf16 under bf16 products)
    size_t cap = L->cap, C = L->C, F = L->F;
    L->loff_dev = take(be, (size_t)P * (L->Eq + 1), DTYPE_I32);
    L->x = take(be, cap * C, DTYPE_REAL);
    L->y = take(be, cap * C, DTYPE_REAL);
    L->dx = take(be, cap * C, DTYPE_REAL);
    L->h13 = take(be, cap * 2 * F, state);
    L->act = take(be, cap * F, state);
    L->dh13 = take(be, cap * 2 * F, DTYPE_REAL);
    L->dact = take(be, cap * F, DTYPE_REAL);
    L->back = take(be, L->local * C, DTYPE_REAL);
    L->shard = (ExpertShard){L, ep_forward, ep_backward};
}

static void layer_free(EpLayer *L) {
    void *host[] = {L->off, L->send_cnt, L->recv_cnt, L->scount, L->sdispl, L->rcount,
                    L->rdispl, L->loff};
    for (size_t i = 0; i < sizeof host / sizeof *host; i++) free(host[i]);
    Tensor dev[] = {L->loff_dev, L->x, L->y, L->dx, L->h13, L->act, L->dh13, L->dact,
                    L->back};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++) L->be->release(dev[i].data);
}

void ep_expert_range(const ModelConfig *cfg, int *lo, int *hi) {
    if (cfg->experts % dist_ep_size() != 0)
        FAIL("dist.expert_parallel = %d: model.experts = %d must be a multiple of it",
             dist_ep_size(), cfg->experts);
    int Eq = cfg->experts / dist_ep_size();
    *lo = dist_ep_rank() * Eq;
    *hi = *lo + Eq;
}

void ep_init(Ep *ep, Model **models, int n_models) {
    memset(ep, 0, sizeof *ep);
    const Model *m0 = models[0];
    if (m0->be->device != DEVICE_CPU && !dist_has_nccl())
        FAIL("dist.expert_parallel = %d with train.device = %s: this build has no NCCL to "
             "exchange device rows (dist/nccl.c comes with the CUDA backend)", dist_ep_size(),
             m0->be->name);
    int lo, hi;
    ep_expert_range(&m0->cfg, &lo, &hi);
    CHECK(m0->layout.expert_lo == lo && m0->layout.expert_hi == hi, "ep: the model holds "
          "experts [%d, %d), EP rank %d owns [%d, %d)", m0->layout.expert_lo,
          m0->layout.expert_hi, dist_ep_rank(), lo, hi);
    ep->n_models = n_models;
    ep->n_moe = m0->n_moe;
    ep->models = CALLOC((size_t)n_models, sizeof *ep->models);
    ep->layers = CALLOC((size_t)n_models * (size_t)m0->n_moe, sizeof *ep->layers);
    for (int i = 0; i < n_models; i++) {
        ep->models[i] = models[i];
        for (int l = 0; l < models[i]->n_moe; l++) {
            EpLayer *L = &ep->layers[(size_t)i * m0->n_moe + l];
            layer_init(L, models[i], models[i]->moe[l].experts_op);
            models[i]->tape.ops[L->op].experts.shard = &L->shard;
        }
    }
}

double ep_step(const Ep *ep, AdamW *opt, Tensor params, Tensor grads, double lr_now, long step,
               double grad_scale) {
    const Model *m = ep->models[0];
    double sq[2] = {0.0, 0.0};   // dense tensors, this rank's routed experts
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
        if (m->trainable && !m->trainable[i]) continue;
        sq[p->kind == PARAM_EXPERT] +=
            m->be->sum_squares(tensor_slice(grads, p->offset, p->numel), p->numel);
    }
    dist_sum_doubles_in(DIST_EXPERT_GROUP, &sq[1], 1);
    double norm = sqrt(sq[0] + sq[1]) * fabs(grad_scale);
    if (isfinite(norm)) adamw_apply(opt, params, grads, lr_now, step, grad_scale, norm);
    return norm;
}

void ep_free(Ep *ep) {
    if (!ep->models) return;
    for (size_t i = 0; i < (size_t)ep->n_models * (size_t)ep->n_moe; i++) {
        EpLayer *L = &ep->layers[i];
        ep->models[i / (size_t)ep->n_moe]->tape.ops[L->op].experts.shard = NULL;
        layer_free(L);
    }
    free(ep->layers);
    free(ep->models);
    memset(ep, 0, sizeof *ep);
}
