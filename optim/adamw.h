// adamw.h: AdamW with global-norm clipping, per-group weight decay and learning rate,
// and no state for frozen tensors.
//
// The optimizer walks the model's parameter and gradient slabs (layout order) and updates
// trainable tensors only, through the backend's adamw_update op, so it runs wherever the
// slabs live. Groups, by ParamInfo:
// - weight decay: 2-D tensors decay, except PARAM_EMBED (embed_tokens, and so a tied
//   lm_head) unless decay_embeddings and PARAM_ROUTER (gate, noise) unless decay_router;
//   1-D tensors (RMSNorm weights) decay only with decay_norms. An untied lm_head decays.
// - learning rate: PARAM_ROUTER tensors train at lr * router_lr_mult, the rest at lr.
// Consecutive trainable tensors of the same group are updated in one call (a span).
#ifndef MOE_OPTIM_ADAMW_H
#define MOE_OPTIM_ADAMW_H

#include <stddef.h>
#include <stdint.h>

#include "../kernels/kernels.h"
#include "../model/layout.h"
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
    size_t n_tensors;     // layout tensors
    size_t *state_offset; // (n_tensors) into m and v, or ADAMW_FROZEN
    size_t *numel;        // (n_tensors) elements of each tensor
    AdamWSpan *spans;
    size_t n_spans;
    size_t slab_numel;  // elements the parameter and gradient slabs must hold
    size_t n_trainable; // elements with optimizer state
    Tensor m, v;        // (n_trainable) moments, trainable tensors back to back
} AdamW;

// Allocates m and v (zeroed, on the backend) for the TRAINABLE tensors only: `trainable`
// is one flag per layout tensor (NULL: all trainable). A frozen tensor holds no optimizer
// state. Copies what it needs from cfg and lay.
void adamw_init(AdamW *opt, const OptimConfig *cfg, const Layout *lay, const uint8_t *trainable,
                const Backend *be);
void adamw_free(AdamW *opt);

// Optimizer memory in bytes (m and v), for the start-up line.
size_t adamw_state_bytes(const AdamW *opt);
// Elements of the trainable tensors.
size_t adamw_trainable_params(const AdamW *opt);

// Global L2 norm of the gradients of the trainable tensors, times |grad_scale|. grads is
// the gradient slab in layout order. The same for the same input and thread count.
double adamw_grad_norm(const AdamW *opt, Tensor grads, double grad_scale);

// One step on the trainable tensors. grad_scale multiplies the gradients first (e.g.
// 1 / accumulation steps); then, with grad_clip > 0 and the scaled global norm above it,
// they are scaled by grad_clip / norm so that their norm is exactly grad_clip. Then
// AdamW (kernels.h, adamw_update) with the group's lr and decay (see the top of this
// file). `step` counts completed steps: bias correction uses t = step + 1. Returns the
// pre-clip norm. A non-finite norm (overflow, NaN loss) updates nothing, params and
// state alike, and is returned for the caller to report.
double adamw_step(AdamW *opt, Tensor params, Tensor grads, double lr_now, long step,
                  double grad_scale);

// The state of layout tensor param_index (its numel elements), for checkpoints; data is
// NULL for a frozen tensor.
Tensor adamw_state_m(const AdamW *opt, size_t param_index);
Tensor adamw_state_v(const AdamW *opt, size_t param_index);

#endif
