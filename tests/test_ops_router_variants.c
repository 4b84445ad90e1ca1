// test_ops_router_variants.c: expert bias, hash routing, expert choice and the
// per-sequence load-balancing loss (fp64 build), against naive references and finite
// differences.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "testlib.h"

static const Backend *bk(void) { return backend_cpu(); }

static void test_add_bias(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 1);
    size_t N = 7, E = 5;
    real *s = test_rand(&r, N * E, 1.0), *b = test_rand(&r, E, 1.0), *out = test_zeros(N * E);
    bk()->add_bias_forward(test_tensor(out, N * E), test_tensor(s, N * E), test_tensor(b, E), N, E);
    for (size_t n = 0; n < N; n++)
        for (size_t e = 0; e < E; e++) assert_true(out[n * E + e] == s[n * E + e] + b[e]);
    free(s), free(b), free(out);
}

static void test_hash_route(void **state) {
    (void)state;
    size_t N = 40, E = 6, k = 3;
    int32_t tok[40], idx[120], again[120];
    for (size_t n = 0; n < N; n++) tok[n] = (int32_t)(n % 13);
    bk()->hash_route_forward(test_itensor(idx, N * k), test_itensor(tok, N), N, E, k);
    bk()->hash_route_forward(test_itensor(again, N * k), test_itensor(tok, N), N, E, k);
    assert_memory_equal(idx, again, sizeof idx);
    int used[6] = {0};
    for (size_t n = 0; n < N; n++) {
        for (size_t j = 0; j < k; j++) {
            int32_t e = idx[n * k + j];
            assert_true(e >= 0 && e < (int32_t)E);
            assert_int_equal(e, (idx[n * k] + (int32_t)j) % (int32_t)E);   // distinct, consecutive
            used[e] = 1;
            if (n >= 13) assert_int_equal(e, idx[(n - 13) * k + j]);       // same token, same experts
        }
    }
    int distinct = 0;
    for (size_t e = 0; e < E; e++) distinct += used[e];
    assert_true(distinct == (int)E);   // 13 token ids spread over all experts
}

// Reference: for each expert, the capacity highest scores, ties to the lower token.
static void ref_expert_choice(int32_t *keep, const real *s, size_t N, size_t E, size_t C) {
    memset(keep, 0, N * E * sizeof *keep);
    for (size_t e = 0; e < E; e++) {
        for (size_t c = 0; c < C && c < N; c++) {
            size_t best = N;
            for (size_t n = 0; n < N; n++) {
                if (keep[n * E + e]) continue;
                if (best == N || s[n * E + e] > s[best * E + e]) best = n;
            }
            keep[best * E + e] = 1;
        }
    }
}

static void test_expert_choice(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 3);
    size_t N = 11, E = 4;
    size_t caps[] = {1, 3, 11, 20};
    for (size_t t = 0; t < 4; t++) {
        real *s = test_rand(&r, N * E, 1.0);
        s[2 * E + 1] = s[5 * E + 1] = s[7 * E + 1] = 2.0;   // a three-way tie for expert 1
        int32_t keep[44], want[44];
        bk()->expert_choice_forward(test_itensor(keep, N * E), test_tensor(s, N * E), N, E, caps[t]);
        ref_expert_choice(want, s, N, E, caps[t]);
        assert_memory_equal(keep, want, sizeof keep);
        for (size_t e = 0; e < E; e++) {
            size_t taken = 0;
            for (size_t n = 0; n < N; n++) taken += (size_t)keep[n * E + e];
            assert_int_equal(taken, caps[t] < N ? caps[t] : N);
        }
        free(s);
    }
}

typedef struct {
    real *probs;
    int32_t *idx, *counts;
    size_t N, E, k, G;
} LbCase;

static double lb_value(void *ctx) {
    LbCase *c = ctx;
    real loss;
    bk()->lb_loss_forward(test_tensor(&loss, 1), test_itensor(c->counts, c->G * c->E),
                          tensor_none(), test_tensor(c->probs, c->N * c->E),
                          test_itensor(c->idx, c->N * c->k), c->N, c->E, c->k, c->G);
    return loss;
}

// Per-sequence lb = mean over groups of the batch formula applied to each group alone.
static void test_grouped_lb_loss(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 5);
    LbCase c = {NULL, NULL, NULL, 12, 5, 2, 3};
    c.probs = test_rand(&r, c.N * c.E, 1.0);
    for (size_t i = 0; i < c.N * c.E; i++) c.probs[i] = fabs(c.probs[i]);
    c.idx = calloc(c.N * c.k, sizeof *c.idx);
    c.counts = calloc(c.G * c.E, sizeof *c.counts);
    test_rand_ints(&r, c.idx, c.N * c.k, c.E);
    double got = lb_value(&c), want = 0.0;
    size_t n = c.N / c.G;
    for (size_t g = 0; g < c.G; g++) {
        int32_t counts[5];
        real pmean[5], loss;
        bk()->lb_loss_forward(test_tensor(&loss, 1), test_itensor(counts, c.E), test_tensor(pmean, c.E),
                              test_tensor(c.probs + g * n * c.E, n * c.E),
                              test_itensor(c.idx + g * n * c.k, n * c.k), n, c.E, c.k, 1);
        want += loss / (double)c.G;
        assert_memory_equal(counts, c.counts + g * c.E, sizeof counts);
    }
    assert_true(fabs(got - want) < 1e-12);
    real *grad = test_zeros(c.N * c.E);
    bk()->lb_loss_backward(test_tensor(grad, c.N * c.E), test_itensor(c.counts, c.G * c.E), 1.0,
                           c.N, c.E, c.k, c.G);
    test_fd_check(c.probs, c.N * c.E, grad, lb_value, &c, 0, &r, 1e-6, 1e-9, "grouped lb");
    free(grad), free(c.probs), free(c.idx), free(c.counts);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_add_bias),
    cmocka_unit_test(test_hash_route),
    cmocka_unit_test(test_expert_choice),
    cmocka_unit_test(test_grouped_lb_loss),
};

TEST_MAIN(tests)
