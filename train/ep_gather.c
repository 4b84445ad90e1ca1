#include "ep_gather.h"

#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../dist/dist.h"

// The EP rank (= world rank in group 0) holding whole-layout tensor p.
static int owner_of(const ParamInfo *p, int experts_per_rank) {
    return p->kind == PARAM_EXPERT ? p->expert / experts_per_rank : 0;
}

// Rank 0: tensor t's values of the shard into dst (host).
static void copy_local(const Model *shard, Tensor t, real *dst, size_t n) {
    shard->be->download(dst, t, n * sizeof *dst);
}

// On the owner (not rank 0): its tensor i (whole index) and moments to rank 0.
static void send_tensor(const Model *shard, const AdamW *opt, const ParamInfo *p, int trains,
                        real *scratch) {
    const ParamInfo *held = layout_find(&shard->layout, p->name);
    CHECK(held, "ep: %s missing from this rank's shard", p->name);
    size_t i = (size_t)(held - shard->layout.params);
    copy_local(shard, model_param(shard, held), scratch, p->numel);
    dist_send_reals(scratch, p->numel, 0);
    if (!opt || !trains) return;
    copy_local(shard, adamw_state_m(opt, i), scratch, p->numel);
    dist_send_reals(scratch, p->numel, 0);
    copy_local(shard, adamw_state_v(opt, i), scratch, p->numel);
    dist_send_reals(scratch, p->numel, 0);
}

// On rank 0: whole tensor i from its owner (itself or another rank).
static void take_tensor(EpWhole *w, const Model *shard, const AdamW *opt, size_t i, int from,
                        int trains) {
    const ParamInfo *p = &w->model.layout.params[i];
    real *dst = (real *)w->model.params.data + p->offset;
    real *m = NULL, *v = NULL;
    if (w->has_opt && trains) {
        m = adamw_state_m(&w->opt, i).data;
        v = adamw_state_v(&w->opt, i).data;
    }
    if (from != 0) {
        dist_recv_reals(dst, p->numel, from);
        if (m) dist_recv_reals(m, p->numel, from);
        if (v) dist_recv_reals(v, p->numel, from);
        return;
    }
    const ParamInfo *held = layout_find(&shard->layout, p->name);
    CHECK(held, "ep: %s missing from rank 0's shard", p->name);
    size_t h = (size_t)(held - shard->layout.params);
    copy_local(shard, model_param(shard, held), dst, p->numel);
    if (m) copy_local(shard, adamw_state_m(opt, h), m, p->numel);
    if (v) copy_local(shard, adamw_state_v(opt, h), v, p->numel);
}

// The expert biases (the same on every rank) copied to the host, and the MoE layers' states
// with them: a checkpoint reads the layer numbers and the biases of these only.
static void whole_bias(Model *m, const Model *shard) {
    size_t nb = shard->expert_bias.numel, E = (size_t)shard->cfg.experts;
    m->expert_bias = (Tensor){CALLOC(nb ? nb : 1, sizeof(real)), DTYPE_REAL, DEVICE_CPU, nb};
    shard->be->download(m->expert_bias.data, shard->expert_bias, nb * sizeof(real));
    m->moe = CALLOC(m->n_moe ? (size_t)m->n_moe : 1, sizeof *m->moe);   // (n_moe)
    for (int l = 0; l < m->n_moe; l++) {
        m->moe[l] = shard->moe[l];
        m->moe[l].bias = tensor_slice(m->expert_bias, (size_t)l * E, E);
    }
}

// In host memory, whatever device the shard computes on: the CPU backend reads it.
static void whole_init(EpWhole *w, const Model *shard, const AdamW *opt,
                       const ParamGroup *groups, const OptimConfig *ocfg) {
    Model *m = &w->model;
    m->cfg = shard->cfg;
    m->be = backend_cpu();
    layout_init(&m->layout, &shard->cfg);
    m->params = (Tensor){CALLOC(m->layout.total, sizeof(real)), DTYPE_REAL, DEVICE_CPU,
                         m->layout.total};   // (whole layout.total)
    m->n_moe = shard->n_moe;
    whole_bias(m, shard);
    m->trainable = NULL;
    w->has_opt = opt != NULL;
    if (opt) adamw_init(&w->opt, ocfg, groups, m->layout.n_params, backend_cpu());
}

void ep_gather(EpWhole *w, const Model *shard, const AdamW *opt, const ParamGroup *groups,
               const OptimConfig *ocfg) {
    memset(w, 0, sizeof *w);
    const int me = dist_rank(), EP = dist_ep_size();
    if (me >= EP) return;   // group 0 holds every expert
    int per = shard->layout.expert_hi - shard->layout.expert_lo;
    Layout whole;
    layout_init(&whole, &shard->cfg);
    if (me == 0) whole_init(w, shard, opt, groups, ocfg);
    size_t largest = 0;
    for (size_t i = 0; i < whole.n_params; i++)
        if (whole.params[i].numel > largest) largest = whole.params[i].numel;
    real *scratch = me ? CALLOC(largest ? largest : 1, sizeof *scratch) : NULL;   // (largest)
    for (size_t i = 0; i < whole.n_params; i++) {
        const ParamInfo *p = &whole.params[i];
        int from = owner_of(p, per), trains = !groups || groups[i].trainable;
        if (me == 0) take_tensor(w, shard, opt, i, from, trains);
        else if (from == me) send_tensor(shard, opt, p, trains, scratch);
    }
    free(scratch);
    layout_free(&whole);
}

void ep_whole_free(EpWhole *w) {
    if (w->has_opt) adamw_free(&w->opt);
    free(w->model.params.data);
    free(w->model.expert_bias.data);
    free(w->model.moe);
    layout_free(&w->model.layout);
    memset(w, 0, sizeof *w);
}
