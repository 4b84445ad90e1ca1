#include "pool.h"

#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

void routing_pool_init(RoutingPool *p, const Model *m) {
    memset(p, 0, sizeof *p);
    p->n_layers = m->n_moe;
    p->experts = m->cfg.experts;
    size_t n = (size_t)p->n_layers * (size_t)p->experts;
    p->counts = CALLOC(n, sizeof *p->counts);
    p->pmean = CALLOC(n, sizeof *p->pmean);
    p->imp = CALLOC(n, sizeof *p->imp);
    p->load = CALLOC(n, sizeof *p->load);
}

void routing_pool_free(RoutingPool *p) {
    free(p->counts);
    free(p->pmean);
    free(p->imp);
    free(p->load);
    memset(p, 0, sizeof *p);
}

void routing_pool_reset(RoutingPool *p) {
    size_t n = (size_t)p->n_layers * (size_t)p->experts;
    memset(p->counts, 0, n * sizeof *p->counts);
    memset(p->pmean, 0, n * sizeof *p->pmean);
    memset(p->imp, 0, n * sizeof *p->imp);
    memset(p->load, 0, n * sizeof *p->load);
    p->micro = 0;
    p->ce = p->z = p->lb = 0.0;
}

// Adds an (E) tensor of the model to an (E) host sum.
static void add_reals(double *sum, const Model *m, Tensor t, size_t E) {
    if (!t.data) return;
    real *host = CALLOC(E, sizeof *host);
    m->be->download(host, t, E * sizeof *host);
    for (size_t e = 0; e < E; e++) sum[e] += (double)host[e];
    free(host);
}

// Only the batch-wide top-k lb needs pooling: per-sequence lb is a mean over sequences,
// and hash routing and expert choice have no lb.
static int pooled_lb(const Model *m) {
    return m->cfg.select == SELECT_TOPK && m->cfg.lb_type == LB_BATCH;
}

void routing_pool_add(RoutingPool *p, const Model *m) {
    size_t E = (size_t)p->experts;
    int32_t *counts = CALLOC(E, sizeof *counts);
    for (int l = 0; l < p->n_layers; l++) {
        const MoeLayerState *st = &m->moe[l];
        if (pooled_lb(m)) {
            m->be->download(counts, st->counts, E * sizeof *counts);
            for (size_t e = 0; e < E; e++) p->counts[l * E + e] += counts[e];
            add_reals(p->pmean + l * E, m, st->pmean, E);
        }
        add_reals(p->imp + l * E, m, st->imp, E);
        add_reals(p->load + l * E, m, st->load_sums, E);
    }
    free(counts);
    p->ce += m->losses.ce;
    p->z += m->losses.z;
    p->lb += m->losses.lb;
    p->micro++;
}

// Population variance over mean^2, as the importance and load ops define it.
static double cv2(const double *x, size_t n) {
    double mean = 0.0, var = 0.0;
    for (size_t i = 0; i < n; i++) mean += x[i] / (double)n;
    for (size_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean) / (double)n;
    return var / (mean * mean + 1e-10);
}

ModelLosses routing_pool_losses(const RoutingPool *p, const Model *m) {
    const ModelConfig *c = &m->cfg;
    size_t E = (size_t)p->experts;
    double tokens = (double)m->N * p->micro, k = c->top_k;
    ModelLosses l = {0};
    l.ce = p->ce / p->micro;
    l.z = p->z / p->micro;
    if (!pooled_lb(m)) l.lb = p->lb / p->micro;
    for (int i = 0; i < p->n_layers && pooled_lb(m); i++) {
        double sum = 0.0;
        for (size_t e = 0; e < E; e++)
            sum += p->counts[i * E + e] * (p->pmean[i * E + e] / p->micro);
        l.lb += (double)E / (k * tokens) * sum / p->n_layers;
    }
    for (int i = 0; i < p->n_layers && c->noise == NOISE_SHAZEER; i++) {
        l.importance += cv2(p->imp + i * E, E) / p->n_layers;
        l.load += cv2(p->load + i * E, E) / p->n_layers;
    }
    l.total = l.ce + c->aux_coef * l.lb + c->z_coef * l.z;
    if (c->noise == NOISE_SHAZEER) l.total += c->noise_coef * (l.importance + l.load);
    return l;
}

static void upload_reals(const Model *m, Tensor t, const double *x, size_t E) {
    real *host = CALLOC(E, sizeof *host);
    for (size_t e = 0; e < E; e++) host[e] = (real)x[e];
    m->be->upload(t, host, E * sizeof *host);
    free(host);
}

// The optimizer averages the A micro-batches' gradients. Over the pooled batch of A*N
// tokens, d lb / d p[n,i] = E c_i / (k (A N)^2) with c the pooled counts; a micro-batch
// backward computes E c_i / (k N^2) * coef, so coef / A makes the average right. The CV^2
// losses are taken of the pooled sums: their gradient needs the pooled sums and coef * A
// (the average divides by A again).
void model_use_pool(Model *m, const RoutingPool *p) {
    size_t E = (size_t)m->cfg.experts;
    for (int l = 0; l < m->n_moe; l++) {
        MoeLayerState *st = &m->moe[l];
        if (pooled_lb(m)) {
            __typeof__(m->tape.ops[0].lb) *lb = &m->tape.ops[st->lb_op].lb;
            lb->counts_used = p ? st->pooled_counts : lb->counts;
            lb->coef_used = p ? lb->coef / p->micro : lb->coef;
            if (p) m->be->upload(st->pooled_counts, p->counts + l * E, E * sizeof(int32_t));
        }
        if (!st->imp.data) continue;
        __typeof__(m->tape.ops[0].importance) *imp = &m->tape.ops[st->importance_op].importance;
        __typeof__(m->tape.ops[0].load) *ld = &m->tape.ops[st->load_op].load;
        imp->imp_used = p ? st->pooled_imp : imp->imp;
        ld->load_used = p ? st->pooled_load : ld->load;
        imp->coef_used = p ? imp->coef * p->micro : imp->coef;
        ld->coef_used = p ? ld->coef * p->micro : ld->coef;
        if (p) {
            upload_reals(m, st->pooled_imp, p->imp + l * E, E);
            upload_reals(m, st->pooled_load, p->load + l * E, E);
        }
    }
}
