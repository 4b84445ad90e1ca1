// schedule.h: the learning rate at each step (linear warmup, cosine decay).
//
// Steps count from 0 (the first optimizer step is step 0). With lr, W = warmup_steps,
// S = total_steps and min_lr = lr * min_lr_ratio:
//   step < W:       lr * (step + 1) / W          (the first step already moves; step W-1
//                                                 trains at the full lr)
//   W <= step < S:  min_lr + (lr - min_lr) * (1 + cos(pi * (step - W) / (S - W))) / 2
//   step >= S:      min_lr                       (continuous with the cosine at S)
// When S <= W there is no cosine phase: warmup ends directly on min_lr.
#ifndef MOE_OPTIM_SCHEDULE_H
#define MOE_OPTIM_SCHEDULE_H

#include "config.h"

double optim_lr_at(const OptimConfig *cfg, long step, long total_steps);

#endif
