#include "ep.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../dist/dist.h"

// One routed experts op's exchange. The owner receives the rows rank by rank, each rank's
// block sorted by expert as its gather left it, and runs its experts over each rank's
// block in turn, in rank order: the weight gradients then add up micro-batch by
// micro-batch as in one process. Counts in MPI calls are in values (rows x C).
struct EpLayer {
    ExpertShard shard;
    size_t op;          // index of the experts op in its model's tape
    size_t cap;         // rows the owner's buffers hold: every rank's worst case
    size_t C, F, E, Eq;
    int32_t *send_cnt;  // (P, Eq) rows this rank sends for each of rank q's experts
    int32_t *recv_cnt;  // (P, Eq) rows rank q sends for each of this rank's experts
    int32_t *loff;      // (P, Eq+1) rank q's block: rows per own expert, prefix sums
    size_t *scount, *sdispl, *rcount, *rdispl;   // (P) each, in values
    real *x, *y, *dx;   // (cap, C) received rows, their outputs, their input gradients
    real *h13, *act;    // (cap, 2F), (cap, F) the experts' state between passes
    real *dh13, *dact;  // scratch of the backward
    real *back;         // (local rows, C) this rank's input gradients coming back
};

static Tensor host_tensor(void *data, DType dtype, size_t numel) {
    return (Tensor){data, dtype, DEVICE_CPU, numel};
}

// Counts per destination from this rank's offsets, exchanged; each block's offsets.
static void exchange_counts(EpLayer *L, const int32_t *off) {
    const int P = dist_ep_size(), me = dist_ep_rank();
    const size_t Eq = L->Eq, C = L->C, E = L->E;
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
}

// Views of rank q's block: rows from r0 (rows before it), n rows.
#define BLOCK(p, width) host_tensor((p) + r0 * (width), DTYPE_REAL, n * (width))

// w holds this rank's experts only (the model is a shard: model_init_experts).
static void ep_forward(void *ctx, const Backend *be, Tensor yp, Tensor xp, Tensor w,
                       Tensor offsets, size_t E, size_t C, size_t F) {
    EpLayer *L = ctx;
    const size_t Eq = L->Eq;
    (void)E;
    exchange_counts(L, offsets.data);
    dist_alltoallv_reals(xp.data, L->scount, L->sdispl, L->x, L->rcount, L->rdispl);
    for (int q = 0; q < dist_ep_size(); q++) {
        size_t r0 = L->rdispl[q] / C, n = L->rcount[q] / C;
        Tensor lo = host_tensor(L->loff + (size_t)q * (Eq + 1), DTYPE_I32, Eq + 1);
        be->experts_forward(BLOCK(L->y, C), BLOCK(L->h13, 2 * F), BLOCK(L->act, F),
                            BLOCK(L->x, C), (ExpertRoute){0}, w, lo, Eq, C, F);
    }
    dist_alltoallv_reals(L->y, L->rcount, L->rdispl, yp.data, L->scount, L->sdispl);
}

// The counts are the forward's (kept in L): each backward follows its own forward.
static void ep_backward(void *ctx, const Backend *be, Tensor dxp, Tensor dw,
                        const uint8_t *train, Tensor dyp, Tensor xp, Tensor w, Tensor offsets,
                        size_t E, size_t C, size_t F) {
    EpLayer *L = ctx;
    const size_t Eq = L->Eq;
    const uint8_t *mine = train ? train + (size_t)dist_ep_rank() * Eq : NULL;   // (Eq)
    (void)xp;
    size_t M = (size_t)((const int32_t *)offsets.data)[E];
    dist_alltoallv_reals(dyp.data, L->scount, L->sdispl, L->y, L->rcount, L->rdispl);
    for (int q = 0; q < dist_ep_size(); q++) {
        size_t r0 = L->rdispl[q] / C, n = L->rcount[q] / C;
        Tensor lo = host_tensor(L->loff + (size_t)q * (Eq + 1), DTYPE_I32, Eq + 1);
        memset(L->dx + r0 * C, 0, n * C * sizeof *L->dx);
        be->experts_backward(BLOCK(L->dx, C), dw, mine, BLOCK(L->y, C), BLOCK(L->dh13, 2 * F),
                             BLOCK(L->dact, F), BLOCK(L->h13, 2 * F), BLOCK(L->act, F),
                             BLOCK(L->x, C), (ExpertRoute){0}, w, lo, Eq, C, F);
    }
    dist_alltoallv_reals(L->dx, L->rcount, L->rdispl, L->back, L->scount, L->sdispl);
    if (!dxp.data) return;   // nothing below wants it; the exchange was still everyone's
    real *g = dxp.data;
    for (size_t i = 0; i < M * C; i++) g[i] += L->back[i];
}

static void layer_init(EpLayer *L, Model *m, size_t op_index) {
    const TapeOp *op = &m->tape.ops[op_index];
    const int P = dist_ep_size();
    memset(L, 0, sizeof *L);
    L->op = op_index;
    L->E = op->experts.E;
    L->C = op->experts.C;
    L->F = op->experts.F;
    L->Eq = L->E / (size_t)P;
    size_t local = op->experts.yp.v.numel / L->C;   // this rank's worst case
    L->cap = local * (size_t)P;
    L->send_cnt = CALLOC(L->E, sizeof *L->send_cnt);
    L->recv_cnt = CALLOC(L->E, sizeof *L->recv_cnt);
    L->scount = CALLOC((size_t)P, sizeof(size_t));
    L->sdispl = CALLOC((size_t)P, sizeof(size_t));
    L->rcount = CALLOC((size_t)P, sizeof(size_t));
    L->rdispl = CALLOC((size_t)P, sizeof(size_t));
    L->loff = CALLOC((size_t)P * (L->Eq + 1), sizeof *L->loff);
    L->x = CALLOC(L->cap * L->C, sizeof(real));
    L->y = CALLOC(L->cap * L->C, sizeof(real));
    L->dx = CALLOC(L->cap * L->C, sizeof(real));
    L->h13 = CALLOC(L->cap * 2 * L->F, sizeof(real));
    L->dh13 = CALLOC(L->cap * 2 * L->F, sizeof(real));
    L->act = CALLOC(L->cap * L->F, sizeof(real));
    L->dact = CALLOC(L->cap * L->F, sizeof(real));
    L->back = CALLOC(local * L->C, sizeof(real));
    L->shard = (ExpertShard){L, ep_forward, ep_backward};
}

static void layer_free(EpLayer *L) {
    void *bufs[] = {L->send_cnt, L->recv_cnt, L->scount, L->sdispl, L->rcount, L->rdispl,
                    L->loff, L->x, L->y, L->dx, L->h13, L->dh13, L->act, L->dact,
                    L->back};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
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
    if (m0->be->device != DEVICE_CPU)
        FAIL("dist.expert_parallel > 1 runs on the CPU only (train.device = %s)", m0->be->name);
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
