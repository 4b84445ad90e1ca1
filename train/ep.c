#include "ep.h"

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
    int32_t *loff;      // (P, E+1) rank q's block: rows per expert, prefix sums
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
        int32_t *lo = L->loff + (size_t)q * (E + 1), pos = 0;
        for (size_t e = 0; e <= E; e++) {
            lo[e] = pos;
            if (e < E && e / Eq == (size_t)me) pos += L->recv_cnt[(size_t)q * Eq + e % Eq];
        }
        L->rdispl[q] = rdispl;
        L->rcount[q] = (size_t)pos * C;
        rdispl += (size_t)pos * C;
    }
    CHECK(rdispl / C <= L->cap, "ep: %zu rows for rank %d's experts, buffers for %zu",
          rdispl / C, me, L->cap);
}

// Views of rank q's block: rows from r0 (rows before it), n rows.
#define BLOCK(p, width) host_tensor((p) + r0 * (width), DTYPE_REAL, n * (width))

static void ep_forward(void *ctx, const Backend *be, Tensor yp, Tensor xp, Tensor w,
                       Tensor offsets, size_t E, size_t C, size_t F) {
    EpLayer *L = ctx;
    exchange_counts(L, offsets.data);
    dist_alltoallv_reals(xp.data, L->scount, L->sdispl, L->x, L->rcount, L->rdispl);
    for (int q = 0; q < dist_ep_size(); q++) {
        size_t r0 = L->rdispl[q] / C, n = L->rcount[q] / C;
        Tensor lo = host_tensor(L->loff + (size_t)q * (E + 1), DTYPE_I32, E + 1);
        be->experts_forward(BLOCK(L->y, C), BLOCK(L->h13, 2 * F), BLOCK(L->act, F),
                            BLOCK(L->x, C), w, lo, E, C, F);
    }
    dist_alltoallv_reals(L->y, L->rcount, L->rdispl, yp.data, L->scount, L->sdispl);
}

// The counts are the forward's (kept in L): each backward follows its own forward.
static void ep_backward(void *ctx, const Backend *be, Tensor dxp, Tensor dw,
                        const uint8_t *train, Tensor dyp, Tensor xp, Tensor w, Tensor offsets,
                        size_t E, size_t C, size_t F) {
    EpLayer *L = ctx;
    (void)xp;
    size_t M = (size_t)((const int32_t *)offsets.data)[E];
    dist_alltoallv_reals(dyp.data, L->scount, L->sdispl, L->y, L->rcount, L->rdispl);
    for (int q = 0; q < dist_ep_size(); q++) {
        size_t r0 = L->rdispl[q] / C, n = L->rcount[q] / C;
        Tensor lo = host_tensor(L->loff + (size_t)q * (E + 1), DTYPE_I32, E + 1);
        memset(L->dx + r0 * C, 0, n * C * sizeof *L->dx);
        be->experts_backward(BLOCK(L->dx, C), dw, train, BLOCK(L->y, C), BLOCK(L->dh13, 2 * F),
                             BLOCK(L->dact, F), BLOCK(L->h13, 2 * F), BLOCK(L->act, F),
                             BLOCK(L->x, C), w, lo, E, C, F);
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
    L->loff = CALLOC((size_t)P * (L->E + 1), sizeof *L->loff);
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

void ep_init(Ep *ep, Model **models, int n_models) {
    memset(ep, 0, sizeof *ep);
    const Model *m0 = models[0];
    if (m0->be->device != DEVICE_CPU)
        FAIL("dist.expert_parallel > 1 runs on the CPU only (train.device = %s)", m0->be->name);
    if (m0->cfg.experts % dist_ep_size() != 0)
        FAIL("dist.expert_parallel = %d: model.experts = %d must be a multiple of it",
             dist_ep_size(), m0->cfg.experts);
    ep->n_models = n_models;
    ep->n_moe = m0->n_moe;
    ep->models = CALLOC((size_t)n_models, sizeof *ep->models);
    ep->layers = CALLOC((size_t)n_models * (size_t)m0->n_moe, sizeof *ep->layers);
    for (int i = 0; i < n_models; i++) {
        ep->models[i] = models[i];
        for (int l = 0; l < models[i]->n_moe; l++)
            layer_init(&ep->layers[(size_t)i * m0->n_moe + l], models[i],
                       models[i]->moe[l].experts_op);
    }
    ep_attach(ep, 1);
}

void ep_attach(Ep *ep, int on) {
    for (int i = 0; i < ep->n_models; i++) {
        Model *m = ep->models[i];
        for (int l = 0; l < ep->n_moe; l++) {
            EpLayer *L = &ep->layers[(size_t)i * ep->n_moe + l];
            m->tape.ops[L->op].experts.shard = on ? &L->shard : NULL;
        }
    }
}

void ep_free(Ep *ep) {
    if (!ep->models) return;
    for (size_t i = 0; i < (size_t)ep->n_models * (size_t)ep->n_moe; i++)
        layer_free(&ep->layers[i]);
    free(ep->layers);
    free(ep->models);
    memset(ep, 0, sizeof *ep);
}
