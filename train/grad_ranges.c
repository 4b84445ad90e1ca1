#include "grad_ranges.h"

#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

void grad_ranges_init(GradRanges *g, const Layout *lay, const uint8_t *trainable) {
    memset(g, 0, sizeof *g);
    g->offset = CALLOC(lay->n_params ? lay->n_params : 1, sizeof *g->offset);
    g->numel = CALLOC(lay->n_params ? lay->n_params : 1, sizeof *g->numel);
    g->experts = CALLOC(lay->n_params ? lay->n_params : 1, 1);
    for (size_t i = 0; i < lay->n_params; i++) {
        const ParamInfo *p = &lay->params[i];
        if ((trainable && !trainable[i]) || p->numel == 0) continue;
        uint8_t expert = p->kind == PARAM_EXPERT;
        g->values += p->numel;
        if (g->n && g->offset[g->n - 1] + g->numel[g->n - 1] == p->offset &&
            g->experts[g->n - 1] == expert) {
            g->numel[g->n - 1] += p->numel;
            continue;
        }
        g->offset[g->n] = p->offset;
        g->experts[g->n] = expert;
        g->numel[g->n++] = p->numel;
    }
}

void grad_ranges_free(GradRanges *g) {
    free(g->offset);
    free(g->numel);
    free(g->experts);
    memset(g, 0, sizeof *g);
}
