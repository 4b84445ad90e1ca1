// adamw.h: AdamW with global-norm clipping, per-tensor weight decay and learning rate,
// and no state for frozen tensors.
//
// Defines the AdamW optimizer state and its steps. The optimizer sees tensors and flags,
// not a model: one ParamGroup (kernels/param_group.h) per tensor says where it lies in
// the parameter and gradient slabs, whether it trains, whether it decays and its lr
// multiplier (the model derives them from its layout: model/param_groups.h). It updates
// trainable tensors only, through the backend's adamw_update op, so it runs wherever the
// slabs live. Consecutive trainable tensors with the same decay and lr multiplier are
// updated in one call (a span).
#ifndef MOE_OPTIM_ADAMW_H
#define MOE_OPTIM_ADAMW_H

#include <stddef.h>
#include <stdint.h>

#include "../kernels/kernels.h"
#include "../kernels/param_group.h"
#include "config.h"

// state_offset of a frozen tensor.
#define ADAMW_FROZEN ((size_t)-1)

// Consecutive trainable tensors, contiguous in the slabs, with one lr multiplier and one
// decay setting: one adamw_update call.
typedef struct {
    size_t offset;       // into the parameter and gradient slabs, in elements
    size_t state_offset; // into m and v
    size_t numel;
    double lr_mult;
    int decay;
} AdamWSpan;

typedef struct {
    OptimConfig cfg;
    const Backend *be;
    size_t n_tensors;     // groups given to adamw_init, one per tensor
    size_t *state_offset; // (n_tensors) into m and v, or ADAMW_FROZEN
    size_t *numel;        // (n_tensors) elements of each tensor
    AdamWSpan *spans;
    size_t n_spans;
    size_t slab_numel;  // elements the parameter and gradient slabs must hold
    size_t n_trainable; // elements with optimizer state
    Tensor m, v;        // (n_trainable) moments, trainable tensors back to back
} AdamW;

// Allocates m and v (zeroed, on the backend) for the trainable groups only, back to back
// in group order: a frozen tensor holds no optimizer state. groups: (n_groups), one per
// tensor. Copies what it needs from cfg and groups.
void adamw_init(AdamW *opt, const OptimConfig *cfg, const ParamGroup *groups, size_t n_groups,
                const Backend *be);
void adamw_free(AdamW *opt);

// Optimizer memory in bytes (m and v), for the start-up line.
size_t adamw_state_bytes(const AdamW *opt);
// Elements of the trainable tensors.
size_t adamw_trainable_params(const AdamW *opt);

// Global L2 norm of the gradients of the trainable tensors, times |grad_scale|. grads is
// the gradient slab the groups' offsets point into. The same for the same input and
// thread count.
double adamw_grad_norm(const AdamW *opt, Tensor grads, double grad_scale);

// One step on the trainable tensors. grad_scale multiplies the gradients first (e.g.
// 1 / accumulation steps); then, with grad_clip > 0 and the scaled global norm above it,
// they are scaled by grad_clip / norm so that their norm is exactly grad_clip. Then
// AdamW (kernels.h, adamw_update) at lr_now * the group's lr_mult, with weight_decay
// where the group decays. `step` counts completed steps: bias correction uses
// t = step + 1. Returns the pre-clip norm. A non-finite norm (overflow, NaN loss) updates
// nothing, params and state alike, and is returned for the caller to report.
double adamw_step(AdamW *opt, Tensor params, Tensor grads, double lr_now, long step,
                  double grad_scale);

// adamw_step's update with the global norm given (finite): for an optimizer that holds a
// shard of the tensors and takes the norm over every shard (ZeRO-1, train/zero.h).
void adamw_apply(AdamW *opt, Tensor params, Tensor grads, double lr_now, long step,
                 double grad_scale, double norm);

// The state of the tensor of group param_index (its numel elements), for checkpoints;
// data is NULL for a frozen tensor.
Tensor adamw_state_m(const AdamW *opt, size_t param_index);
Tensor adamw_state_v(const AdamW *opt, size_t param_index);

#endif
