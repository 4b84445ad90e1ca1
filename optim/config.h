// config.h: the optimizer's configuration (the [optim] INI section).
//
// Defines OptimConfig, its key table (defaults, ranges, meanings) and the checks that
// span several keys. The learning rate schedule it drives is in schedule.h. Which tensors
// decay and which get router_lr_mult is the model's rule (model/param_groups.h), which
// the caller hands the decay_* keys and router_lr_mult; AdamW (adamw.h) applies its
// answer per tensor.
#ifndef MOE_OPTIM_CONFIG_H
#define MOE_OPTIM_CONFIG_H

#include <stddef.h>

#include "../base/keys.h"

typedef struct {
    double lr;           // peak learning rate, reached at the end of warmup
    double min_lr_ratio; // final learning rate as a fraction of lr
    int warmup_steps;
    double beta1, beta2, eps;
    double weight_decay;   // decoupled (AdamW), on the tensors whose group decays
    double grad_clip;      // global L2 norm bound; 0 = no clipping
    int decay_norms;       // also decay 1-D norm weights
    int decay_embeddings;  // also decay embed_tokens (and so a tied lm_head)
    int decay_router;      // also decay router gate (and noise) weights
    double router_lr_mult; // router tensors train at lr * router_lr_mult
} OptimConfig;

void optim_config_defaults(OptimConfig *cfg);
// The [optim] section bound to `cfg`.
KeySection optim_config_section(OptimConfig *cfg);
// Cross-key checks. Returns 0, or -1 with a one-line reason naming the keys in err.
int optim_config_validate(const OptimConfig *cfg, char *err, size_t err_len);

#endif
