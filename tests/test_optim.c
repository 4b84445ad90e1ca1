// test_optim.c: the optimizer room (fp64 build): the learning rate schedule against its
// closed form, the backend's AdamW update and sum of squares against scalar loops
// written here from the textbook equations, and AdamW's bookkeeping: clipping, frozen
// tensors, and the weight-decay groups and router learning rate that the model's param
// groups (model/param_groups.h) hand it. The comparison with torch.optim.AdamW itself is
// tests/reference/test_adamw_torch.py.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../model/layout.h"
#include "../model/param_groups.h"
#include "../optim/adamw.h"
#include "../optim/config.h"
#include "../optim/schedule.h"
#include "testlib.h"

// Same equations, different association and rounding: only the last bits may differ.
#define REF_RTOL 1e-12
#define REF_ATOL 1e-15

static const Backend *ops(void) { return backend_cpu(); }

// ---- schedule -------------------------------------------------------------------------

static void assert_lr(const OptimConfig *c, long step, long total, double want) {
    double got = optim_lr_at(c, step, total);
    if (fabs(got - want) > 1e-15 * fabs(want))
        fail_msg("lr at step %ld of %ld: %.17g, want %.17g", step, total, got, want);
}

static void test_schedule_warmup_cosine(void **state) {
    (void)state;
    OptimConfig c;
    optim_config_defaults(&c);
    c.lr = 2e-3;
    c.min_lr_ratio = 0.1;
    c.warmup_steps = 10;
    const long total = 110; // cosine over steps 10..110, 100 steps long
    const double lo = 2e-4, hi = 2e-3;
    assert_lr(&c, 0, total, hi / 10); // warmup start: the first step already moves
    assert_lr(&c, 4, total, hi * 5 / 10);
    assert_lr(&c, 9, total, hi);  // warmup end: full lr
    assert_lr(&c, 10, total, hi); // cosine start
    assert_lr(&c, 35, total, lo + (hi - lo) * (1 + cos(M_PI / 4)) / 2);
    assert_lr(&c, 60, total, (hi + lo) / 2); // mid-cosine
    assert_lr(&c, 109, total, lo + (hi - lo) * (1 + cos(M_PI * 99 / 100)) / 2);
    assert_lr(&c, 110, total, lo);  // end
    assert_lr(&c, 1000, total, lo); // after the end
}

static void test_schedule_no_warmup(void **state) {
    (void)state;
    OptimConfig c;
    optim_config_defaults(&c);
    c.lr = 1e-3;
    c.min_lr_ratio = 0.0;
    c.warmup_steps = 0;
    assert_lr(&c, 0, 4, 1e-3);
    assert_lr(&c, 2, 4, 0.5e-3);
    assert_lr(&c, 4, 4, 0.0);
}

// ---- config ---------------------------------------------------------------------------

static void test_config_defaults_and_checks(void **state) {
    (void)state;
    OptimConfig c;
    optim_config_defaults(&c);
    char err[256];
    assert_int_equal(optim_config_validate(&c, err, sizeof err), 0);
    assert_true(c.lr == 3e-3 && c.beta2 == 0.95 && c.grad_clip == 1.0 && !c.decay_norms);
    KeySection s = optim_config_section(&c);
    assert_int_equal(keys_parse(&s, "min_lr_ratio", "1.5", err, sizeof err), -1);
    assert_non_null(strstr(err, "optim.min_lr_ratio"));
    assert_int_equal(keys_parse(&s, "router_lr_mult", "0.5", err, sizeof err), 0);
    assert_true(c.router_lr_mult == 0.5);
    c.beta2 = 1.0;
    assert_int_equal(optim_config_validate(&c, err, sizeof err), -1);
    assert_non_null(strstr(err, "optim.beta2"));
}

// ---- backend ops ----------------------------------------------------------------------

// Textbook AdamW (Loshchilov & Hutter, with torch's eps placement), one element.
static void scalar_adamw(double *p, double g, double *m, double *v, double lr, double b1,
                         double b2, double eps, double wd, int t, double scale) {
    g *= scale;
    *p -= lr * wd * *p;
    *m = b1 * *m + (1 - b1) * g;
    *v = b2 * *v + (1 - b2) * g * g;
    double m_hat = *m / (1 - pow(b1, t)), v_hat = *v / (1 - pow(b2, t));
    *p -= lr * m_hat / (sqrt(v_hat) + eps);
}

static void test_adamw_update_matches_scalar(void **state) {
    (void)state;
    Rng rng;
    rng_init(&rng, 3);
    const size_t n = 10007; // odd, and large enough to split over threads
    real *p = test_rand(&rng, n, 1.0), *m = test_zeros(n), *v = test_zeros(n);
    double *rp = malloc(n * sizeof *rp), *rm = calloc(n, sizeof *rm),
           *rv = calloc(n, sizeof *rv);
    for (size_t i = 0; i < n; i++)
        rp[i] = p[i];
    const double b1 = 0.9, b2 = 0.95, eps = 1e-8;
    for (int t = 1; t <= 5; t++) {
        real *g = test_rand(&rng, n, 0.1 * t);
        double lr = 1e-2 / t, wd = 0.1 * (t % 2), scale = 0.5 + 0.25 * t;
        ops()->adamw_update(test_tensor(p, n), test_tensor(g, n), test_tensor(m, n),
                            test_tensor(v, n), n, lr, b1, b2, eps, wd, 1 - pow(b1, t),
                            1 - pow(b2, t), scale);
        for (size_t i = 0; i < n; i++)
            scalar_adamw(&rp[i], g[i], &rm[i], &rv[i], lr, b1, b2, eps, wd, t, scale);
        free(g);
    }
    real *want = test_zeros(n);
    for (size_t i = 0; i < n; i++)
        want[i] = (real)rp[i];
    test_assert_close(p, want, n, REF_RTOL, REF_ATOL, "adamw params");
    for (size_t i = 0; i < n; i++)
        want[i] = (real)rm[i];
    test_assert_close(m, want, n, REF_RTOL, REF_ATOL, "adamw m");
    for (size_t i = 0; i < n; i++)
        want[i] = (real)rv[i];
    test_assert_close(v, want, n, REF_RTOL, REF_ATOL, "adamw v");
    free(want);
    free(p), free(m), free(v), free(rp), free(rm), free(rv);
}

static void test_sum_squares(void **state) {
    (void)state;
    Rng rng;
    rng_init(&rng, 5);
    const size_t n = 100003;
    real *x = test_rand(&rng, n, 3.0);
    double want = 0.0;
    for (size_t i = 0; i < n; i++)
        want += (double)x[i] * x[i];
    double got = ops()->sum_squares(test_tensor(x, n), n);
    assert_true(fabs(got - want) <= 1e-13 * want);
    assert_true(got == ops()->sum_squares(test_tensor(x, n), n)); // bitwise repeatable
    assert_true(ops()->sum_squares(test_tensor(x, 0), 0) == 0.0);
    free(x);
}

// ---- AdamW ------------------------------------------------------------------------------

typedef struct {
    ParamKind kind;
    size_t rows, cols; // cols 0: a vector
} TensorSpec;

// A layout of the given tensors back to back (freed with layout_free).
static Layout spec_layout(const TensorSpec *s, size_t n) {
    Layout lay = {.params = CALLOC(n, sizeof(ParamInfo)), .n_params = n};
    for (size_t i = 0; i < n; i++) {
        ParamInfo *p = &lay.params[i];
        snprintf(p->name, sizeof p->name, "tensor.%zu", i);
        p->kind = s[i].kind;
        p->layer = p->expert = -1;
        p->rows = s[i].rows;
        p->cols = s[i].cols;
        p->numel = s[i].rows * (s[i].cols ? s[i].cols : 1);
        p->offset = lay.total;
        lay.total += p->numel;
    }
    return lay;
}

// AdamW over the tensors of lay, grouped by the model's rules with c's settings, as the
// trainer sets it up. train: one flag per tensor, NULL: all trainable.
static void init_on_layout(AdamW *opt, const OptimConfig *c, const Layout *lay,
                           const uint8_t *train) {
    ParamGroupRules rules = {c->decay_norms, c->decay_embeddings, c->decay_router,
                             c->router_lr_mult};
    ParamGroup *groups = param_groups_build(lay, train, &rules);
    adamw_init(opt, c, groups, lay->n_params, ops());
    free(groups);
}

static OptimConfig plain_config(void) {
    OptimConfig c;
    optim_config_defaults(&c);
    c.weight_decay = 0.0;
    c.grad_clip = 0.0;
    return c;
}

static double norm_of(const real *x, size_t n, double scale) {
    return sqrt(test_dot(x, x, n)) * scale;
}

// beta1 = 0.5 makes the first step's m exactly half the (scaled, clipped) gradient, so
// the gradient the update saw can be read back from the state.
static real *step_and_recover_grad(const OptimConfig *c, const Layout *lay, real *grads,
                                   double grad_scale, double *norm) {
    AdamW opt;
    init_on_layout(&opt, c, lay, NULL);
    real *params = test_zeros(lay->total);
    *norm = adamw_step(&opt, test_tensor(params, lay->total), test_tensor(grads, lay->total),
                       1e-3, 0, grad_scale);
    real *seen = test_copy(TENSOR_R(opt.m), lay->total);
    for (size_t i = 0; i < lay->total; i++)
        seen[i] /= (real)(1 - c->beta1);
    free(params);
    adamw_free(&opt);
    return seen;
}

static const TensorSpec mixed[] = {
    {PARAM_EMBED, 7, 5},  {PARAM_NORM, 5, 0},   {PARAM_ATTN, 5, 5},
    {PARAM_ROUTER, 3, 5}, {PARAM_EXPERT, 4, 5}, {PARAM_HEAD, 7, 5},
};
#define N_MIXED (sizeof mixed / sizeof *mixed)

static void test_clip_scales_to_exactly_clip(void **state) {
    (void)state;
    Layout lay = spec_layout(mixed, N_MIXED);
    Rng rng;
    rng_init(&rng, 9);
    real *g = test_rand(&rng, lay.total, 2.0);
    OptimConfig c = plain_config();
    c.beta1 = 0.5;
    c.grad_clip = 1.0;
    double scaled_norm = norm_of(g, lay.total, 0.5);
    assert_true(scaled_norm > 2.0); // well above the clip
    double norm;
    real *seen = step_and_recover_grad(&c, &lay, g, 0.5, &norm);
    assert_true(fabs(norm - scaled_norm) <= 1e-13 * scaled_norm); // pre-clip, after scale
    assert_true(fabs(norm_of(seen, lay.total, 1.0) - 1.0) <= 1e-13);
    free(seen);
    free(g);
    layout_free(&lay);
}

static void test_clip_leaves_small_norms(void **state) {
    (void)state;
    Layout lay = spec_layout(mixed, N_MIXED);
    Rng rng;
    rng_init(&rng, 10);
    real *g = test_rand(&rng, lay.total, 0.01);
    OptimConfig c = plain_config();
    c.beta1 = 0.5;
    c.grad_clip = 1.0;
    double norm;
    real *seen = step_and_recover_grad(&c, &lay, g, 1.0, &norm);
    assert_true(norm < 1.0);
    test_assert_close(seen, g, lay.total, 1e-15, 0, "unclipped gradient");
    free(seen);
    // grad_clip 0 is off, whatever the norm.
    c.grad_clip = 0.0;
    for (size_t i = 0; i < lay.total; i++)
        g[i] *= 1000;
    seen = step_and_recover_grad(&c, &lay, g, 1.0, &norm);
    assert_true(norm > 1.0);
    test_assert_close(seen, g, lay.total, 1e-15, 0, "gradient with clipping off");
    free(seen);
    free(g);
    layout_free(&lay);
}

// The fine-tuning shape: the default model with only layer 0's expert 1 and the final
// norm trainable.
static void test_frozen_tensors_hold_no_state(void **state) {
    (void)state;
    ModelConfig mc;
    model_config_defaults(&mc);
    Layout lay;
    layout_init(&lay, &mc);
    uint8_t *train = calloc(lay.n_params, 1);
    size_t n_train = 0;
    for (size_t i = 0; i < lay.n_params; i++) {
        const ParamInfo *p = &lay.params[i];
        train[i] = (p->kind == PARAM_EXPERT && p->layer == 0 && p->expert == 1) ||
                   !strcmp(p->name, "model.norm.weight");
        if (train[i]) n_train += p->numel;
    }
    assert_true(n_train > 0 && n_train < lay.total / 10);
    OptimConfig c;
    optim_config_defaults(&c);
    AdamW opt;
    init_on_layout(&opt, &c, &lay, train);
    assert_int_equal(adamw_trainable_params(&opt), n_train);
    assert_int_equal(adamw_state_bytes(&opt), 2 * sizeof(real) * n_train);
    for (size_t i = 0; i < lay.n_params; i++) {
        Tensor m = adamw_state_m(&opt, i), v = adamw_state_v(&opt, i);
        assert_true((m.data != NULL) == train[i] && (v.data != NULL) == train[i]);
        if (train[i]) assert_int_equal(m.numel, lay.params[i].numel);
    }
    Rng rng;
    rng_init(&rng, 12);
    real *params = test_rand(&rng, lay.total, 1.0), *before = test_copy(params, lay.total);
    real *grads = test_rand(&rng, lay.total, 1.0); // frozen tensors' gradients are noise
    double want_sq = 0.0;
    for (size_t i = 0; i < lay.n_params; i++)
        if (train[i]) {
            const real *gp = grads + lay.params[i].offset;
            want_sq += test_dot(gp, gp, lay.params[i].numel);
        }
    double norm = adamw_grad_norm(&opt, test_tensor(grads, lay.total), 1.0);
    assert_true(fabs(norm - sqrt(want_sq)) <= 1e-13 * norm);
    for (long s = 0; s < 3; s++)
        adamw_step(&opt, test_tensor(params, lay.total), test_tensor(grads, lay.total),
                   optim_lr_at(&c, s, 10), s, 1.0);
    for (size_t i = 0; i < lay.n_params; i++) {
        const ParamInfo *p = &lay.params[i];
        int same = !memcmp(params + p->offset, before + p->offset, p->numel * sizeof(real));
        if (same == train[i])
            fail_msg("%s: trainable %d but %s", p->name, train[i],
                     same ? "unchanged" : "changed");
    }
    adamw_free(&opt);
    free(params), free(before), free(grads), free(train);
    layout_free(&lay);
}

// Zero gradients leave Adam's step at 0, so a tensor moves only by its weight decay.
static void check_decay(const OptimConfig *c, const int want_decay[N_MIXED]) {
    Layout lay = spec_layout(mixed, N_MIXED);
    Rng rng;
    rng_init(&rng, 14);
    real *params = test_rand(&rng, lay.total, 1.0), *before = test_copy(params, lay.total);
    real *grads = test_zeros(lay.total);
    AdamW opt;
    init_on_layout(&opt, c, &lay, NULL);
    const double lr = 0.01;
    adamw_step(&opt, test_tensor(params, lay.total), test_tensor(grads, lay.total), lr, 0, 1.0);
    for (size_t i = 0; i < N_MIXED; i++) {
        const ParamInfo *p = &lay.params[i];
        real *want = test_copy(before + p->offset, p->numel);
        double mult = (p->kind == PARAM_ROUTER) ? c->router_lr_mult : 1.0;
        if (want_decay[i])
            for (size_t j = 0; j < p->numel; j++)
                want[j] *= (real)(1 - lr * mult * c->weight_decay);
        test_assert_close(params + p->offset, want, p->numel, 1e-15, 0, p->name);
        if (!want_decay[i])
            assert_memory_equal(params + p->offset, want, p->numel * sizeof(real));
        free(want);
    }
    adamw_free(&opt);
    free(params), free(before), free(grads);
    layout_free(&lay);
}

static void test_weight_decay_groups(void **state) {
    (void)state;
    OptimConfig c = plain_config();
    c.weight_decay = 0.1;
    c.router_lr_mult = 2.0;
    // mixed: embed, norm, attn, router, expert, head (untied)
    const int by_default[N_MIXED] = {0, 0, 1, 0, 1, 1};
    check_decay(&c, by_default);
    c.decay_norms = c.decay_embeddings = c.decay_router = 1;
    const int all[N_MIXED] = {1, 1, 1, 1, 1, 1};
    check_decay(&c, all);
}

static void test_router_lr_mult(void **state) {
    (void)state;
    const TensorSpec spec[] = {{PARAM_ATTN, 4, 6}, {PARAM_ROUTER, 4, 6}, {PARAM_EXPERT, 4, 6}};
    Layout lay = spec_layout(spec, 3);
    const size_t n = 24;
    Rng rng;
    rng_init(&rng, 15);
    real *p0 = test_rand(&rng, n, 1.0);
    real *params = test_zeros(3 * n);
    for (int t = 0; t < 3; t++)
        memcpy(params + t * n, p0, n * sizeof(real));
    OptimConfig c = plain_config();
    c.router_lr_mult = 0.25;
    AdamW opt;
    init_on_layout(&opt, &c, &lay, NULL);
    for (long s = 0; s < 4; s++) {
        real *g = test_rand(&rng, n, 1.0), *grads = test_zeros(3 * n);
        for (int t = 0; t < 3; t++)
            memcpy(grads + t * n, g, n * sizeof(real));
        adamw_step(&opt, test_tensor(params, 3 * n), test_tensor(grads, 3 * n), 1e-2, s, 1.0);
        free(g), free(grads);
    }
    real *moved = test_zeros(n), *want = test_zeros(n);
    for (size_t j = 0; j < n; j++) {
        moved[j] = params[n + j] - p0[j];
        want[j] = (real)(0.25 * (params[j] - p0[j]));
    }
    test_assert_close(moved, want, n, 1e-10, 1e-15, "router update vs 0.25 * attention");
    assert_memory_equal(params, params + 2 * n, n * sizeof(real)); // expert: plain lr
    adamw_free(&opt);
    free(p0), free(params), free(moved), free(want);
    layout_free(&lay);
}

static void test_nonfinite_norm_skips_step(void **state) {
    (void)state;
    Layout lay = spec_layout(mixed, N_MIXED);
    Rng rng;
    rng_init(&rng, 16);
    real *params = test_rand(&rng, lay.total, 1.0), *before = test_copy(params, lay.total);
    real *grads = test_rand(&rng, lay.total, 1.0);
    grads[3] = (real)NAN;
    OptimConfig c;
    optim_config_defaults(&c);
    AdamW opt;
    init_on_layout(&opt, &c, &lay, NULL);
    double norm = adamw_step(&opt, test_tensor(params, lay.total),
                             test_tensor(grads, lay.total), 1e-3, 0, 1.0);
    assert_true(isnan(norm));
    assert_memory_equal(params, before, lay.total * sizeof(real));
    for (size_t i = 0; i < lay.total; i++)
        assert_true(TENSOR_R(opt.m)[i] == 0 && TENSOR_R(opt.v)[i] == 0);
    adamw_free(&opt);
    free(params), free(before), free(grads);
    layout_free(&lay);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_schedule_warmup_cosine),
    cmocka_unit_test(test_schedule_no_warmup),
    cmocka_unit_test(test_config_defaults_and_checks),
    cmocka_unit_test(test_adamw_update_matches_scalar),
    cmocka_unit_test(test_sum_squares),
    cmocka_unit_test(test_clip_scales_to_exactly_clip),
    cmocka_unit_test(test_clip_leaves_small_norms),
    cmocka_unit_test(test_frozen_tensors_hold_no_state),
    cmocka_unit_test(test_weight_decay_groups),
    cmocka_unit_test(test_router_lr_mult),
    cmocka_unit_test(test_nonfinite_norm_skips_step),
};

TEST_MAIN(tests)
