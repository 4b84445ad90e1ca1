#include "step.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

void step_runner_init(StepRunner *s, Model *m, int accum, int aux_scope_batch,
                      int keep_activations) {
    memset(s, 0, sizeof *s);
    s->model = m;
    s->accum = accum;
    s->pooled = accum > 1 && aux_scope_batch;
    routing_pool_init(&s->pool, m);
    if (!s->pooled || !keep_activations) return;
    s->replicas = CALLOC((size_t)accum - 1, sizeof *s->replicas);
    for (int a = 0; a < accum - 1; a++)
        model_init_replica(&s->replicas[a], m);
}

void step_runner_free(StepRunner *s) {
    for (int a = 0; s->replicas && a < s->accum - 1; a++)
        model_free_replica(&s->replicas[a]);
    free(s->replicas);
    routing_pool_free(&s->pool);
    memset(s, 0, sizeof *s);
}

Model *step_runner_model(StepRunner *s, int a) {
    return a == 0 || !s->replicas ? s->model : &s->replicas[a - 1];
}

int step_runner_sets(const StepRunner *s) { return s->replicas ? s->accum : 1; }

static ModelLosses forward_micro(StepRunner *s, const int32_t *batch, int a, Rng *noise) {
    Model *m = step_runner_model(s, a);
    const int32_t *tokens = batch + 2 * m->N * (size_t)a;
    model_set_batch(m, tokens, tokens + m->N);
    model_draw_noise(m, noise);
    return model_forward(m);
}

double step_clock(const Model *m) {
    if (m->be->synchronize) m->be->synchronize();
    return omp_get_wtime();
}

// Without kept activations: every micro-batch forward once only to pool its statistics,
// with the noise the training passes will draw again. Timed as a whole, outside the op
// timer (make bench reports it as its own phase).
static void pool_pass(StepRunner *s, const int32_t *batch, Rng *noise) {
    Model *m = s->model;
    double *timer = m->tape.op_seconds, t0 = step_clock(m);
    m->tape.op_seconds = NULL;
    Rng again = *noise;
    routing_pool_reset(&s->pool);
    for (int a = 0; a < s->accum; a++) {
        forward_micro(s, batch, a, noise);
        routing_pool_add(&s->pool, m);
    }
    *noise = again;
    model_use_pool(m, &s->pool);
    m->tape.op_seconds = timer;
    s->pool_seconds = step_clock(m) - t0;
}

// With kept activations: each micro-batch forward once into its own activation set, then
// each backward with the pooled statistics, in the order and with the noise of the
// pool_pass path, so the results are the same bits.
static ModelLosses run_kept(StepRunner *s, const int32_t *batch, Rng *noise, StepMicroFn after,
                            void *ctx) {
    routing_pool_reset(&s->pool);
    for (int a = 0; a < s->accum; a++) {
        forward_micro(s, batch, a, noise);
        routing_pool_add(&s->pool, step_runner_model(s, a));
    }
    model_zero_grad(s->model);
    for (int a = 0; a < s->accum; a++) {
        Model *m = step_runner_model(s, a);
        model_use_pool(m, &s->pool);
        model_backward(m);
        model_use_pool(m, NULL);
        if (after) after(ctx, m);
    }
    return routing_pool_losses(&s->pool, s->model);
}

ModelLosses step_runner_run(StepRunner *s, const int32_t *batch, Rng *noise, StepMicroFn after,
                            void *ctx) {
    s->pool_seconds = 0.0;
    if (s->replicas) return run_kept(s, batch, noise, after, ctx);
    if (s->pooled) pool_pass(s, batch, noise);
    Model *m = s->model;
    model_zero_grad(m);
    ModelLosses mean = {0};
    for (int a = 0; a < s->accum; a++) {
        ModelLosses l = forward_micro(s, batch, a, noise);
        model_backward(m);
        if (after) after(ctx, m);
        mean.total += l.total / s->accum;
        mean.ce += l.ce / s->accum;
        mean.lb += l.lb / s->accum;
        mean.z += l.z / s->accum;
        mean.importance += l.importance / s->accum;
        mean.load += l.load / s->accum;
    }
    if (!s->pooled) return mean;
    model_use_pool(m, NULL);
    return routing_pool_losses(&s->pool, m);
}
