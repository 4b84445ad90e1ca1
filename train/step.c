#include "step.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../dist/dist.h"

void step_runner_init(StepRunner *s, Model *m, int accum, int aux_scope_batch,
                      int keep_activations) {
    memset(s, 0, sizeof *s);
    s->model = m;
    CHECK(accum % dist_size() == 0, "grad_accum %d over %d ranks", accum, dist_size());
    s->total = accum;
    s->accum = accum / dist_size();
    s->first = s->accum * dist_rank();
    s->sum_grads = 1;
    grad_ranges_init(&s->reduce, &m->layout, m->trainable);
    s->pooled = accum > 1 && aux_scope_batch;
    routing_pool_init(&s->pool, m);
    if (!s->pooled || !keep_activations) return;
    s->replicas = CALLOC((size_t)s->accum - 1, sizeof *s->replicas);
    for (int a = 0; a < s->accum - 1; a++)
        model_init_replica(&s->replicas[a], m);
}

void step_runner_free(StepRunner *s) {
    for (int a = 0; s->replicas && a < s->accum - 1; a++)
        model_free_replica(&s->replicas[a]);
    free(s->replicas);
    routing_pool_free(&s->pool);
    grad_ranges_free(&s->reduce);
    memset(s, 0, sizeof *s);
}

Model *step_runner_model(StepRunner *s, int a) {
    return a == 0 || !s->replicas ? s->model : &s->replicas[a - 1];
}

int step_runner_sets(const StepRunner *s) { return s->replicas ? s->accum : 1; }

static ModelLosses forward_micro(StepRunner *s, const int32_t *batch, int a, Rng *noise) {
    Model *m = step_runner_model(s, a);
    const int32_t *tokens = batch + 2 * m->N * (size_t)(s->first + a);
    model_set_batch(m, tokens, tokens + m->N);
    model_draw_noise(m, noise);
    return model_forward(m);
}

double step_clock(const Model *m) {
    if (m->be->synchronize) m->be->synchronize();
    return omp_get_wtime();
}

// The pooled statistics of every rank's micro-batches.
static void sum_pool(RoutingPool *p) {
    if (dist_size() == 1) return;
    size_t n = (size_t)p->n_layers * (size_t)p->experts;
    dist_sum_i32(p->counts, n);
    dist_sum_doubles(p->pmean, n);
    dist_sum_doubles(p->imp, n);
    dist_sum_doubles(p->load, n);
    double scalars[4] = {p->ce, p->z, p->lb, p->micro};
    dist_sum_doubles(scalars, 4);
    p->ce = scalars[0];
    p->z = scalars[1];
    p->lb = scalars[2];
    p->micro = (int)scalars[3];
}

// The noise generator as it stands before this rank's first micro-batch: the draws of the
// micro-batches before it are made and discarded.
static void skip_noise(StepRunner *s, Rng *noise) {
    for (int a = 0; a < s->first; a++) model_draw_noise(s->model, noise);
}

// The trainable runs of the gradient slab summed over every rank, the routed experts'
// over the ranks holding the same experts (frozen tensors' zeros stay home).
static void sum_gradients(StepRunner *s) {
    const GradRanges *g = &s->reduce;
    for (size_t i = 0; i < g->n; i++)
        dist_sum_tensor_in(g->experts[i] ? DIST_EXPERT_REPLICAS : DIST_ALL, s->model->be,
                           tensor_slice(s->model->grads, g->offset[i], g->numel[i]),
                           g->numel[i]);
}

// Every rank's gradient sum, and the noise generator where the last rank left it.
static void finish_step(StepRunner *s, Rng *noise) {
    if (dist_size() == 1) return;
    if (s->sum_grads) sum_gradients(s);
    dist_broadcast(noise, sizeof *noise, dist_size() - 1);
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
    sum_pool(&s->pool);
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
    sum_pool(&s->pool);
    model_zero_grad(s->model);
    for (int a = 0; a < s->accum; a++) {
        Model *m = step_runner_model(s, a);
        model_use_pool(m, &s->pool);
        model_backward(m);
        model_use_pool(m, NULL);
        if (after) after(ctx, m);
    }
    finish_step(s, noise);
    return routing_pool_losses(&s->pool, s->model);
}

// Every rank's share of the mean over micro-batches.
static void sum_losses(ModelLosses *l) {
    double x[6] = {l->total, l->ce, l->lb, l->z, l->importance, l->load};
    dist_sum_doubles(x, 6);
    *l = (ModelLosses){x[0], x[1], x[2], x[3], x[4], x[5]};
}

ModelLosses step_runner_run(StepRunner *s, const int32_t *batch, Rng *noise, StepMicroFn after,
                            void *ctx) {
    s->pool_seconds = 0.0;
    skip_noise(s, noise);
    if (s->replicas) return run_kept(s, batch, noise, after, ctx);
    if (s->pooled) pool_pass(s, batch, noise);
    Model *m = s->model;
    model_zero_grad(m);
    ModelLosses mean = {0};
    for (int a = 0; a < s->accum; a++) {
        ModelLosses l = forward_micro(s, batch, a, noise);
        model_backward(m);
        if (after) after(ctx, m);
        mean.total += l.total / s->total;
        mean.ce += l.ce / s->total;
        mean.lb += l.lb / s->total;
        mean.z += l.z / s->total;
        mean.importance += l.importance / s->total;
        mean.load += l.load / s->total;
    }
    finish_step(s, noise);
    if (!s->pooled) {
        if (dist_size() > 1) sum_losses(&mean);
        return mean;
    }
    model_use_pool(m, NULL);
    return routing_pool_losses(&s->pool, m);
}
