#include "param_groups.h"

#include "../base/util.h"

static uint8_t tensor_decays(const ParamGroupRules *r, const ParamInfo *p) {
    if (p->cols == 0) return r->decay_norms != 0;
    if (p->kind == PARAM_EMBED) return r->decay_embeddings != 0;
    if (p->kind == PARAM_ROUTER) return r->decay_router != 0;
    return 1;
}

static double tensor_lr_mult(const ParamGroupRules *r, const ParamInfo *p) {
    return p->kind == PARAM_ROUTER ? r->router_lr_mult : 1.0;
}

ParamGroup *param_groups_build(const Layout *lay, const uint8_t *trainable,
                               const ParamGroupRules *rules) {
    ParamGroup *g = CALLOC(lay->n_params ? lay->n_params : 1, sizeof *g);
    for (size_t i = 0; i < lay->n_params; i++) {
        const ParamInfo *p = &lay->params[i];
        g[i] = (ParamGroup){p->offset, p->numel, tensor_lr_mult(rules, p),
                            tensor_decays(rules, p), !trainable || trainable[i]};
    }
    return g;
}
