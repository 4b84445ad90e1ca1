#include "grad_sync.h"

#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../dist/dist.h"

void grad_sync_init(GradSync *g, const Model *m) {
    memset(g, 0, sizeof *g);
    g->layers = m->cfg.layers;
    g->lo = CALLOC((size_t)g->layers + 1, sizeof *g->lo);
    for (int l = 0; l <= g->layers; l++) g->lo[l] = m->layout.total;
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
        if (p->layer >= 0 && p->offset < g->lo[p->layer]) g->lo[p->layer] = p->offset;
    }
    for (int l = 0; l < g->layers; l++)
        CHECK(g->lo[l] < g->lo[l + 1], "grad_sync: layer %d's tensors at %zu, not before "
              "layer %d's at %zu", l, g->lo[l], l + 1, g->lo[l + 1]);
    grad_ranges_init(&g->runs, &m->layout, m->trainable);
}

void grad_sync_free(GradSync *g) {
    free(g->lo);
    grad_ranges_free(&g->runs);
    memset(g, 0, sizeof *g);
}

// The trainable runs' parts within slab values [lo, hi).
static void start_span(GradSync *g, Model *m, size_t lo, size_t hi) {
    const GradRanges *r = &g->runs;
    for (size_t i = 0; i < r->n; i++) {
        size_t a = r->offset[i] > lo ? r->offset[i] : lo;
        size_t b = r->offset[i] + r->numel[i] < hi ? r->offset[i] + r->numel[i] : hi;
        if (a < b)
            dist_sum_start(r->experts[i] ? DIST_EXPERT_REPLICAS : DIST_ALL, m->be, m->grads, a,
                           b - a);
    }
}

// Layer l's bucket: up to the next layer's tensors, the last layer's to the slab's end.
static void start_layer(GradSync *g, Model *m, int l) {
    start_span(g, m, g->lo[l], g->lo[l + 1]);
}

static void after_op(void *ctx, size_t op) {
    GradSync *g = ctx;
    Model *m = g->armed;
    while (g->next >= 0 && op <= m->block_op[g->next]) start_layer(g, m, g->next--);
    dist_progress();
}

void grad_sync_arm(GradSync *g, Model *m) {
    if (!dist_sums(m->be)) return;
    g->armed = m;
    g->next = g->layers - 1;
    m->tape.after_backward = after_op;
    m->tape.after_ctx = g;
}

void grad_sync_finish(GradSync *g, Model *m) {
    if (!dist_sums(m->be)) return;
    if (!g->armed) g->next = g->layers - 1;
    while (g->next >= 0) start_layer(g, m, g->next--);
    start_span(g, m, 0, g->lo[0]);
    dist_sum_wait();
    if (g->armed) g->armed->tape.after_backward = NULL;
    g->armed = NULL;
}
