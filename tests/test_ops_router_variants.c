// test_ops_router_variants.c: expert bias, hash routing, expert choice, the per-sequence
// load-balancing loss and DeepSeek's group-limited routing with scaled gates (fp64 build),
// against naive references and finite differences.
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

// ---- group-limited routing (DeepSeek-V2 group_limited_greedy, V3 noaux_tc) ------------

// Naive group-limited top-k of one row of selection values v (E): group scores by a full
// sort of each group, groups ranked by repeated arg-max (ties to the lower group), then
// experts by repeated arg-max over the kept groups (ties to the lower expert).
static void ref_group_topk(int32_t *top, const real *v, size_t E, size_t k, size_t G, size_t TG,
                           GroupScore how) {
    size_t gs = E / G;
    double gv[64];
    int kept[64] = {0}, taken[256] = {0};
    for (size_t g = 0; g < G; g++) {
        double a = -INFINITY, b = -INFINITY;   // the best two of the group
        for (size_t e = g * gs; e < (g + 1) * gs; e++) {
            if (v[e] > a) b = a, a = v[e];
            else if (v[e] > b) b = v[e];
        }
        gv[g] = how == GROUP_SCORE_TOP2 ? (real)(a + b) : a;
    }
    for (size_t t = 0; t < TG; t++) {
        size_t best = G;
        for (size_t g = 0; g < G; g++)
            if (!kept[g] && (best == G || gv[g] > gv[best])) best = g;
        kept[best] = 1;
    }
    for (size_t j = 0; j < k; j++) {
        size_t best = E;
        for (size_t e = 0; e < E; e++)
            if (kept[e / gs] && !taken[e] && (best == E || v[e] > v[best])) best = e;
        taken[best] = 1;
        top[j] = (int32_t)best;
    }
}

typedef struct {
    size_t N, E, k;
    RouteSpec spec;
    real *logits, *bias, *scores, *gates, *R; // (N, E), (E) or NULL, (N, E), (N, k), (N, k)
    int32_t *idx;                             // (N, k)
} GroupCase;

static void group_forward(GroupCase *c) {
    size_t NE = c->N * c->E, Nk = c->N * c->k;
    bk()->route_topk_forward(test_tensor(c->scores, NE), test_itensor(c->idx, Nk),
                             test_tensor(c->gates, Nk), tensor_none(), test_tensor(c->logits, NE),
                             tensor_none(), tensor_none(),
                             c->bias ? test_tensor(c->bias, c->E) : tensor_none(), c->N, c->E,
                             c->k, c->spec);
}

static double group_loss(void *ctx) {
    GroupCase *c = ctx;
    group_forward(c);
    return test_dot(c->gates, c->R, c->N * c->k);
}

// The specs: V2 (softmax, max, no renorm, scaled), V3 (sigmoid, top2, bias, renorm,
// scaled), and mixtures; groups == topk_groups is plain top-k.
static const struct {
    size_t E, k, G, TG;
    ScoreFunc func;
    GroupScore how;
    int renorm, bias;
    double scale;
} group_specs[] = {
    {16, 6, 8, 3, SCORE_SOFTMAX, GROUP_SCORE_MAX, 0, 0, 16.0},
    {16, 4, 4, 2, SCORE_SIGMOID, GROUP_SCORE_TOP2, 1, 1, 2.5},
    {12, 3, 4, 1, SCORE_SIGMOID, GROUP_SCORE_MAX, 1, 0, 1.0},
    {12, 2, 6, 2, SCORE_SOFTMAX, GROUP_SCORE_TOP2, 1, 1, 0.5},
    {8, 2, 2, 2, SCORE_SIGMOID, GROUP_SCORE_TOP2, 0, 1, 3.0},
};

static GroupCase group_case(Rng *r, size_t t, int with_ties) {
    GroupCase c = {23, group_specs[t].E, group_specs[t].k, {0}, NULL, NULL, NULL, NULL, NULL, NULL};
    c.spec = (RouteSpec){group_specs[t].func, group_specs[t].renorm, group_specs[t].G,
                         group_specs[t].TG, group_specs[t].how, group_specs[t].scale};
    size_t NE = c.N * c.E, Nk = c.N * c.k;
    c.logits = test_rand(r, NE, 2.0);
    if (with_ties)   // few distinct values: ties inside and between groups
        for (size_t i = 0; i < NE; i++) c.logits[i] = floor(c.logits[i] * 1.5) / 1.5;
    c.bias = group_specs[t].bias ? test_rand(r, c.E, 0.3) : NULL;
    c.scores = test_zeros(NE), c.gates = test_zeros(Nk), c.R = test_rand(r, Nk, 1.0);
    c.idx = calloc(Nk, sizeof *c.idx);
    return c;
}

static void group_case_free(GroupCase *c) {
    free(c->logits), free(c->bias), free(c->scores), free(c->gates), free(c->R), free(c->idx);
}

static void test_group_route_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 11);
    for (size_t t = 0; t < sizeof group_specs / sizeof *group_specs; t++) {
        for (int with_ties = 0; with_ties < 2; with_ties++) {
            GroupCase c = group_case(&r, t, with_ties);
            group_forward(&c);
            size_t E = c.E, k = c.k;
            for (size_t n = 0; n < c.N; n++) {
                real s[16], v[16];
                int32_t want[8];
                for (size_t e = 0; e < E; e++) {
                    double x = c.logits[n * E + e];
                    s[e] = c.spec.func == SCORE_SIGMOID ? 1.0 / (1.0 + exp(-x)) : 0.0;
                    if (c.spec.func == SCORE_SOFTMAX) {
                        double z = 0.0;
                        for (size_t f = 0; f < E; f++) z += exp(c.logits[n * E + f] - x);
                        s[e] = 1.0 / z;
                    }
                    assert_true(fabs(s[e] - c.scores[n * E + e]) < 1e-12);
                    // selection on the op's own scores + bias, rounded as it rounds them
                    v[e] = c.bias ? c.scores[n * E + e] + c.bias[e] : c.scores[n * E + e];
                }
                ref_group_topk(want, v, E, k, c.spec.groups, c.spec.topk_groups,
                               c.spec.group_score);
                assert_memory_equal(c.idx + n * k, want, k * sizeof *want);
                double sum = 0.0;
                for (size_t j = 0; j < k; j++) sum += c.scores[n * E + want[j]];
                for (size_t j = 0; j < k; j++) {
                    double g = c.spec.scale * c.scores[n * E + want[j]] /
                               (c.spec.renorm ? sum + 1e-20 : 1.0);
                    assert_true(fabs(g - c.gates[n * k + j]) < 1e-12 * (1.0 + fabs(g)));
                }
            }
            group_case_free(&c);
        }
    }
}

// A row where group-limited and plain top-k disagree, worked by hand: 8 experts in 4
// groups of 2, selection values (scores, no bias; the logits' sigmoid keeps their order)
//   group 0: 0.9, 0.1   group 1: 0.8, 0.7   group 2: 0.85, 0.05   group 3: 0.3, 0.2
// max scores 0.9, 0.8, 0.85, 0.3: the best 2 groups are 0 and 2, so top-2 = {0, 4};
// top2 sums 1.0, 1.5, 0.9, 0.5: groups 1 and 0, so top-2 = {0, 2}; plain top-2 = {0, 4}
// and top-3 = {0, 4, 2}; with 1 group kept under top2 only group 1: {2, 3}.
static void test_group_route_by_hand(void **state) {
    (void)state;
    const double p[8] = {0.9, 0.1, 0.8, 0.7, 0.85, 0.05, 0.3, 0.2};
    real logits[8], scores[8], gates[3];
    int32_t idx[3];
    for (size_t e = 0; e < 8; e++) logits[e] = log(p[e] / (1.0 - p[e]));
    const struct {
        size_t k, TG;
        GroupScore how;
        int32_t want[3];
    } cases[] = {
        {2, 2, GROUP_SCORE_MAX, {0, 4}}, {2, 2, GROUP_SCORE_TOP2, {0, 2}},
        {3, 4, GROUP_SCORE_MAX, {0, 4, 2}}, {2, 1, GROUP_SCORE_TOP2, {2, 3}},
        {3, 2, GROUP_SCORE_TOP2, {0, 2, 3}},
    };
    for (size_t t = 0; t < sizeof cases / sizeof *cases; t++) {
        RouteSpec spec = {SCORE_SIGMOID, 0, 4, cases[t].TG, cases[t].how, 2.0};
        bk()->route_topk_forward(test_tensor(scores, 8), test_itensor(idx, cases[t].k),
                                 test_tensor(gates, cases[t].k), tensor_none(),
                                 test_tensor(logits, 8), tensor_none(), tensor_none(),
                                 tensor_none(), 1, 8, cases[t].k, spec);
        assert_memory_equal(idx, cases[t].want, cases[t].k * sizeof *idx);
        for (size_t j = 0; j < cases[t].k; j++)
            assert_true(fabs(gates[j] - 2.0 * p[cases[t].want[j]]) < 1e-12);
    }
}

// Backward: gradients reach the logits through the selected scores only, scaled; finite
// differences of R . gates (the selection does not move under the small steps), and the
// backward accumulates.
static void test_group_route_backward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 12);
    for (size_t t = 0; t < sizeof group_specs / sizeof *group_specs; t++) {
        GroupCase c = group_case(&r, t, 0);
        size_t NE = c.N * c.E, Nk = c.N * c.k;
        group_forward(&c);
        real *ds = test_zeros(NE), *dx = test_rand(&r, NE, 1.0), *dx0 = test_copy(dx, NE);
        bk()->gates_backward(test_tensor(ds, NE), test_tensor(c.R, Nk), test_tensor(c.scores, NE),
                             test_itensor(c.idx, Nk), c.N, c.E, c.k, c.spec.renorm,
                             c.spec.scale);
        bk()->router_scores_backward(test_tensor(dx, NE), test_tensor(ds, NE),
                                     test_tensor(c.scores, NE), c.N, c.E, c.spec.func);
        for (size_t i = 0; i < NE; i++) dx[i] -= dx0[i];   // what the backward added
        test_fd_check(c.logits, NE, dx, group_loss, &c, 0, &r, 1e-6, 1e-9, "group route");
        free(ds), free(dx), free(dx0);
        group_case_free(&c);
    }
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_add_bias),
    cmocka_unit_test(test_hash_route),
    cmocka_unit_test(test_expert_choice),
    cmocka_unit_test(test_grouped_lb_loss),
    cmocka_unit_test(test_group_route_forward),
    cmocka_unit_test(test_group_route_by_hand),
    cmocka_unit_test(test_group_route_backward),
};

TEST_MAIN(tests)
