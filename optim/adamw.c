#include "adamw.h"

#include <math.h>
#include <string.h>

#include "../base/util.h"

// Extends the last span with group g when it continues it in the slab and in its lr
// multiplier and decay; otherwise starts a new span. opt->spans has room for one span per
// group.
static void span_add(AdamW *opt, const ParamGroup *g, size_t state_offset) {
    if (opt->n_spans > 0) {
        AdamWSpan *last = &opt->spans[opt->n_spans - 1];
        if (last->offset + last->numel == g->offset &&
            last->state_offset + last->numel == state_offset && last->lr_mult == g->lr_mult &&
            last->decay == g->decay) {
            last->numel += g->numel;
            return;
        }
    }
    opt->spans[opt->n_spans++] =
        (AdamWSpan){g->offset, state_offset, g->numel, g->lr_mult, g->decay};
}

static Tensor state_alloc(const Backend *be, size_t n) {
    Tensor t = {NULL, DTYPE_REAL, be->device, n};
    if (n == 0) return t;
    t.data = be->alloc(n * dtype_size(DTYPE_REAL));
    CHECK(t.data, "out of memory allocating %zu optimizer state values on %s", n, be->name);
    return t;
}

void adamw_init(AdamW *opt, const OptimConfig *cfg, const ParamGroup *groups, size_t n_groups,
                const Backend *be) {
    memset(opt, 0, sizeof *opt);
    opt->cfg = *cfg;
    opt->be = be;
    opt->n_tensors = n_groups;
    opt->state_offset = CALLOC(n_groups ? n_groups : 1, sizeof(size_t));
    opt->numel = CALLOC(n_groups ? n_groups : 1, sizeof(size_t));
    opt->spans = CALLOC(n_groups ? n_groups : 1, sizeof(AdamWSpan));
    for (size_t i = 0; i < n_groups; i++) {
        const ParamGroup *g = &groups[i];
        opt->numel[i] = g->numel;
        if (g->offset + g->numel > opt->slab_numel) opt->slab_numel = g->offset + g->numel;
        if (!g->trainable) {
            opt->state_offset[i] = ADAMW_FROZEN;
            continue;
        }
        opt->state_offset[i] = opt->n_trainable;
        span_add(opt, g, opt->n_trainable);
        opt->n_trainable += g->numel;
    }
    opt->m = state_alloc(be, opt->n_trainable);
    opt->v = state_alloc(be, opt->n_trainable);
}

void adamw_free(AdamW *opt) {
    if (opt->m.data) opt->be->release(opt->m.data);
    if (opt->v.data) opt->be->release(opt->v.data);
    free(opt->state_offset);
    free(opt->numel);
    free(opt->spans);
    memset(opt, 0, sizeof *opt);
}

size_t adamw_state_bytes(const AdamW *opt) {
    return 2 * opt->n_trainable * dtype_size(DTYPE_REAL);
}

size_t adamw_trainable_params(const AdamW *opt) { return opt->n_trainable; }

static void check_slab(const AdamW *opt, Tensor t, const char *what) {
    CHECK(t.data && t.numel >= opt->slab_numel,
          "adamw: %s slab holds %zu elements, the groups need %zu", what, t.numel,
          opt->slab_numel);
}

double adamw_grad_norm(const AdamW *opt, Tensor grads, double grad_scale) {
    check_slab(opt, grads, "gradient");
    double sum = 0.0;
    for (size_t s = 0; s < opt->n_spans; s++) {
        const AdamWSpan *sp = &opt->spans[s];
        sum += opt->be->sum_squares(tensor_slice(grads, sp->offset, sp->numel), sp->numel);
    }
    return sqrt(sum) * fabs(grad_scale);
}

double adamw_step(AdamW *opt, Tensor params, Tensor grads, double lr_now, long step,
                  double grad_scale) {
    double norm = adamw_grad_norm(opt, grads, grad_scale);
    if (isfinite(norm)) adamw_apply(opt, params, grads, lr_now, step, grad_scale, norm);
    return norm;
}

void adamw_apply(AdamW *opt, Tensor params, Tensor grads, double lr_now, long step,
                 double grad_scale, double norm) {
    check_slab(opt, params, "parameter");
    const OptimConfig *c = &opt->cfg;
    double clip = (c->grad_clip > 0 && norm > c->grad_clip) ? c->grad_clip / norm : 1.0;
    double t = (double)step + 1.0;
    double bias_c1 = 1.0 - pow(c->beta1, t), bias_c2 = 1.0 - pow(c->beta2, t);
    for (size_t s = 0; s < opt->n_spans; s++) {
        const AdamWSpan *sp = &opt->spans[s];
        opt->be->adamw_update(tensor_slice(params, sp->offset, sp->numel),
                              tensor_slice(grads, sp->offset, sp->numel),
                              tensor_slice(opt->m, sp->state_offset, sp->numel),
                              tensor_slice(opt->v, sp->state_offset, sp->numel), sp->numel,
                              lr_now * sp->lr_mult, c->beta1, c->beta2, c->eps,
                              sp->decay ? c->weight_decay : 0.0, bias_c1, bias_c2,
                              grad_scale * clip);
    }
}

static Tensor state_view(const AdamW *opt, Tensor state, size_t i) {
    CHECK(i < opt->n_tensors, "adamw: tensor %zu outside %zu groups", i, opt->n_tensors);
    if (opt->state_offset[i] == ADAMW_FROZEN) return tensor_none();
    return tensor_slice(state, opt->state_offset[i], opt->numel[i]);
}

Tensor adamw_state_m(const AdamW *opt, size_t i) { return state_view(opt, opt->m, i); }

Tensor adamw_state_v(const AdamW *opt, size_t i) { return state_view(opt, opt->v, i); }
