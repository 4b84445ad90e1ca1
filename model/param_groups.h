// param_groups.h: how each parameter tensor trains, as the optimizer's ParamGroup list.
//
// Defines ParamGroupRules (the [optim] settings the rules read) and the builder of one
// ParamGroup (kernels/param_group.h) per layout tensor. The rules:
// - weight decay: 2-D tensors decay, except PARAM_EMBED (embed_tokens, and so a tied
//   lm_head) unless decay_embeddings and PARAM_ROUTER (gate, noise) unless decay_router;
//   1-D tensors (RMSNorm weights) decay only with decay_norms. An untied lm_head decays.
// - learning rate: PARAM_ROUTER tensors train at lr * router_lr_mult, the rest at lr.
#ifndef MOE_PARAM_GROUPS_H
#define MOE_PARAM_GROUPS_H

#include <stdint.h>

#include "../kernels/param_group.h"
#include "layout.h"

// The optimizer keys of the same names (optim.decay_norms, ...), copied by the caller:
// the model does not read the optimizer's configuration.
typedef struct {
    int decay_norms;       // also decay 1-D norm weights
    int decay_embeddings;  // also decay embed_tokens (and so a tied lm_head)
    int decay_router;      // also decay router gate (and noise) weights
    double router_lr_mult; // router tensors train at lr * router_lr_mult
} ParamGroupRules;

// (lay->n_params) groups in layout order, allocated; the caller frees them. trainable is
// one flag per layout tensor (NULL: all trainable).
ParamGroup *param_groups_build(const Layout *lay, const uint8_t *trainable,
                               const ParamGroupRules *rules);

#endif
