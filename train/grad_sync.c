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
}

void grad_sync_free(GradSync *g) {
    free(g->lo);
    memset(g, 0, sizeof *g);
}

// Layer l's bucket: up to the next layer's tensors, the last layer's to the slab's end.
static void start_layer(GradSync *g, Model *m, int l) {
    dist_sum_start(m->be, m->grads, g->lo[l], g->lo[l + 1] - g->lo[l]);
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
    dist_sum_start(m->be, m->grads, 0, g->lo[0]);
    dist_sum_wait();
    if (g->armed) g->armed->tape.after_backward = NULL;
    g->armed = NULL;
}
