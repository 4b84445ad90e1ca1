#include "config.h"

#include <stdio.h>

#define OC(field) offsetof(OptimConfig, field)

// Defaults suit the CPU demo (a byte-level MoE of ~1M parameters, a few thousand steps):
// small models tolerate a larger lr than GPT-scale 3e-4, and the rest is the usual LLM
// recipe (GPT-3, Llama): beta2 0.95, decay 0.1, clip 1.0, cosine down to 10%.
static const ConfigKey optim_keys[] = {
    {"lr", KEY_DOUBLE, OC(lr), "3e-3", 0, 10, NULL,
     "peak learning rate, reached at the end of warmup"},
    {"min_lr_ratio", KEY_DOUBLE, OC(min_lr_ratio), "0.1", 0, 1, NULL,
     "final learning rate as a fraction of lr (cosine decay ends there)"},
    {"warmup_steps", KEY_INT, OC(warmup_steps), "50", 0, 1000000000, NULL,
     "linear warmup steps: step s < warmup trains at lr*(s+1)/warmup"},
    {"beta1", KEY_DOUBLE, OC(beta1), "0.9", 0, 1, NULL, "AdamW first-moment decay (< 1)"},
    {"beta2", KEY_DOUBLE, OC(beta2), "0.95", 0, 1, NULL, "AdamW second-moment decay (< 1)"},
    {"eps", KEY_DOUBLE, OC(eps), "1e-8", 1e-30, 1, NULL,
     "AdamW denominator epsilon (> 0: zero gradients must not divide 0 by 0)"},
    {"weight_decay", KEY_DOUBLE, OC(weight_decay), "0.1", 0, 10, NULL,
     "decoupled weight decay on matrices (not norms, embeddings, router unless enabled)"},
    {"grad_clip", KEY_DOUBLE, OC(grad_clip), "1.0", 0, 1e9, NULL,
     "clip the global gradient L2 norm to this; 0 = off"},
    {"decay_norms", KEY_BOOL, OC(decay_norms), "false", 0, 1, NULL,
     "also weight-decay the 1-D RMSNorm weights"},
    {"decay_embeddings", KEY_BOOL, OC(decay_embeddings), "false", 0, 1, NULL,
     "also weight-decay embed_tokens (a tied lm_head with it)"},
    {"decay_router", KEY_BOOL, OC(decay_router), "false", 0, 1, NULL,
     "also weight-decay the router gate and noise weights"},
    {"router_lr_mult", KEY_DOUBLE, OC(router_lr_mult), "1.0", 0, 1e3, NULL,
     "router tensors train at lr * router_lr_mult"},
};

KeySection optim_config_section(OptimConfig *cfg) {
    return (KeySection){"optim", optim_keys, sizeof optim_keys / sizeof *optim_keys, cfg};
}

void optim_config_defaults(OptimConfig *cfg) {
    KeySection s = optim_config_section(cfg);
    keys_set_defaults(&s);
}

int optim_config_validate(const OptimConfig *c, char *err, size_t n) {
    // Bias correction divides by 1 - beta^t, which is 0 for beta = 1.
    if (c->beta1 >= 1.0)
        return snprintf(err, n, "optim.beta1 = %g must be below 1", c->beta1), -1;
    if (c->beta2 >= 1.0)
        return snprintf(err, n, "optim.beta2 = %g must be below 1", c->beta2), -1;
    // Decay multiplies weights by 1 - lr*weight_decay each step: at or past 1 it zeroes
    // or flips them.
    if (c->lr * c->weight_decay >= 1.0)
        return snprintf(err, n, "optim.lr * optim.weight_decay = %g must be below 1",
                        c->lr * c->weight_decay), -1;
    if (c->lr * c->router_lr_mult * c->weight_decay >= 1.0 && c->decay_router)
        return snprintf(err, n,
                        "optim.lr * optim.router_lr_mult * optim.weight_decay = %g must be "
                        "below 1 with optim.decay_router",
                        c->lr * c->router_lr_mult * c->weight_decay), -1;
    return 0;
}
