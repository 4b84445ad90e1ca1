#include "schedule.h"

#include <math.h>

double optim_lr_at(const OptimConfig *c, long step, long total_steps) {
    if (step < c->warmup_steps) return c->lr * (double)(step + 1) / (double)c->warmup_steps;
    double min_lr = c->lr * c->min_lr_ratio;
    if (step >= total_steps) return min_lr;
    double progress =
        (double)(step - c->warmup_steps) / (double)(total_steps - c->warmup_steps); // in [0, 1)
    return min_lr + (c->lr - min_lr) * 0.5 * (1.0 + cos(M_PI * progress));
}
