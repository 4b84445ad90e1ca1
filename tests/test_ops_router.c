// test_ops_router.c: the router ops of the CPU backend (reached through its Backend
// table) against naive references written here, against central finite differences,
// and against the properties the routing definitions promise (docs/routing.md).
//
// The references are deliberately different algorithms from the kernels: top-k by a full
// stable sort, capacity by sorting an explicit list of assignments, dispatch by brute
// force over experts. Gradients are checked with the selection (idx, keep, slot) held
// fixed, as the model treats it.
#include "testlib.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define RTOL 1e-6
#define ATOL 1e-9
#define EXACT 1e-12

static const Backend *bk(void) { return backend_cpu(); }

static Tensor T(real *x, size_t n) { return test_tensor(x, n); }
static Tensor I(int32_t *x, size_t n) { return test_itensor(x, n); }
static Tensor none(void) { return tensor_none(); }

static int32_t *izeros(size_t n) { return calloc(n ? n : 1, sizeof(int32_t)); }

typedef struct {
    size_t N, E, k;
} Shape;

// Small odd sizes; the last has k = E - 1, the most the load loss allows.
static const Shape shapes[] = {{7, 4, 1}, {9, 5, 2}, {13, 6, 3}, {11, 4, 3}};
#define N_SHAPES (sizeof(shapes) / sizeof(shapes[0]))

static void assert_ints_equal(const int32_t *a, const int32_t *b, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) fail_msg("%s: element %zu: %d vs expected %d", what, i, a[i], b[i]);
}

// k distinct random experts per token (a partial Fisher-Yates shuffle per row).
static void rand_choices(Rng *r, int32_t *idx, size_t N, size_t E, size_t k) {
    int32_t *perm = izeros(E); // (E)
    for (size_t n = 0; n < N; n++) {
        for (size_t e = 0; e < E; e++) perm[e] = (int32_t)e;
        for (size_t j = 0; j < k; j++) {
            size_t pick = j + (size_t)(rng_next(r) % (E - j));
            int32_t t = perm[j];
            perm[j] = perm[pick];
            perm[pick] = t;
            idx[n * k + j] = perm[j];
        }
    }
    free(perm);
}

// Positive values in [lo, lo + width).
static real *rand_positive(Rng *r, size_t n, double lo, double width) {
    real *x = test_rand(r, n, 0.5 * width);
    for (size_t i = 0; i < n; i++) x[i] += (real)(lo + 0.5 * width);
    return x;
}

// ---- naive references -------------------------------------------------------------

// Top-k by a full insertion sort (stable) of experts by value descending: equal values
// keep ascending expert order.
static void ref_topk(int32_t *idx, const real *v, size_t N, size_t E, size_t k) {
    int32_t *order = izeros(E); // (E)
    for (size_t n = 0; n < N; n++) {
        const real *row = v + n * E;
        for (size_t e = 0; e < E; e++) {
            size_t p = e;
            while (p > 0 && row[order[p - 1]] < row[e]) {
                order[p] = order[p - 1];
                p--;
            }
            order[p] = (int32_t)e;
        }
        memcpy(idx + n * k, order, k * sizeof(int32_t));
    }
    free(order);
}

static void ref_softmax(real *p, const real *x, size_t N, size_t E) {
    for (size_t n = 0; n < N; n++) {
        double sum = 0.0;
        for (size_t e = 0; e < E; e++) sum += exp(x[n * E + e]);
        for (size_t e = 0; e < E; e++) p[n * E + e] = exp(x[n * E + e]) / sum;
    }
}

typedef struct {
    size_t n, j;
    double gate;
} RefClaim;

// The explicit list of assignments in position order (j outer, n inner), stably sorted
// by gate descending for DROP_PROBS, then filled greedily into the experts.
static void ref_capacity(int32_t *keep, const int32_t *idx, const real *g, size_t N, size_t E,
                         size_t k, size_t cap, DropPolicy policy) {
    RefClaim *list = calloc(N * k, sizeof(RefClaim)); // (N * k)
    size_t len = 0;
    for (size_t j = 0; j < k; j++)
        for (size_t n = 0; n < N; n++) list[len++] = (RefClaim){n, j, g[n * k + j]};
    if (policy == DROP_PROBS)
        for (size_t a = 1; a < len; a++) {
            RefClaim c = list[a];
            size_t p = a;
            for (; p > 0 && list[p - 1].gate < c.gate; p--) list[p] = list[p - 1];
            list[p] = c;
        }
    size_t *used = calloc(E, sizeof(size_t)); // (E)
    for (size_t a = 0; a < len; a++) {
        size_t slot = list[a].n * k + list[a].j;
        int32_t e = idx[slot];
        keep[slot] = cap == 0 || used[e] < cap;
        used[e] += (size_t)keep[slot];
    }
    free(used);
    free(list);
}

// For each expert in turn, every kept assignment routed to it, tokens in order.
static void ref_dispatch(int32_t *off, int32_t *rows, int32_t *slot, const int32_t *idx,
                         const int32_t *keep, size_t N, size_t E, size_t k) {
    int32_t m = 0;
    for (size_t a = 0; a < N * k; a++) slot[a] = -1;
    for (size_t e = 0; e < E; e++) {
        off[e] = m;
        for (size_t n = 0; n < N; n++)
            for (size_t j = 0; j < k; j++)
                if (keep[n * k + j] && idx[n * k + j] == (int32_t)e) {
                    rows[m] = (int32_t)n;
                    slot[n * k + j] = m++;
                }
    }
    off[E] = m;
}

static double ref_cv2(const double *v, size_t E) {
    double mean = 0.0, var = 0.0;
    for (size_t i = 0; i < E; i++) mean += v[i] / (double)E;
    for (size_t i = 0; i < E; i++) var += (v[i] - mean) * (v[i] - mean) / (double)E;
    return var / (mean * mean + 1e-10);
}

// The k-th largest of h[n, :] without expert i, by sorting the others.
static double ref_kth_excluding(const real *h, size_t E, size_t k, size_t i) {
    double *others = calloc(E, sizeof(double)); // (E - 1)
    size_t len = 0;
    for (size_t e = 0; e < E; e++) {
        if (e == i) continue;
        size_t p = len++;
        for (; p > 0 && others[p - 1] < h[e]; p--) others[p] = others[p - 1];
        others[p] = h[e];
    }
    double kth = others[k - 1];
    free(others);
    return kth;
}

// ---- forward: selection -------------------------------------------------------------

static void check_topk(const real *v, size_t N, size_t E, size_t k, const char *what) {
    int32_t *got = izeros(N * k), *want = izeros(N * k); // (N, k)
    bk()->topk_forward(I(got, N * k), T((real *)v, N * E), N, E, k);
    ref_topk(want, v, N, E, k);
    assert_ints_equal(got, want, N * k, what);
    free(got);
    free(want);
}

static void test_topk_matches_stable_sort(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 1);
    for (size_t s = 0; s < N_SHAPES; s++) {
        size_t N = shapes[s].N, E = shapes[s].E;
        real *v = test_rand(&r, N * E, 2.0); // (N, E)
        check_topk(v, N, E, shapes[s].k, "topk random");
        check_topk(v, N, E, E, "topk k = E");
        free(v);
    }
}

static void test_topk_ties_prefer_lower_index(void **state) {
    (void)state;
    // Hand-checked: the three 2s are experts 1, 2, 4 in that order.
    real row[5] = {1, 2, 2, 0, 2};
    int32_t got[3];
    bk()->topk_forward(I(got, 3), T(row, 5), 1, 5, 3);
    assert_ints_equal(got, (int32_t[]){1, 2, 4}, 3, "topk hand tie");
    real flat[6] = {0.5, 0.5, 0.5, 0.5, 0.5, 0.5};
    bk()->topk_forward(I(got, 3), T(flat, 6), 1, 6, 3);
    assert_ints_equal(got, (int32_t[]){0, 1, 2}, 3, "topk all equal");
    // Values from three levels: most rows hold ties, some across the k-th place.
    Rng r;
    rng_init(&r, 2);
    for (size_t s = 0; s < N_SHAPES; s++) {
        size_t N = shapes[s].N, E = shapes[s].E;
        real *v = test_zeros(N * E); // (N, E)
        for (size_t i = 0; i < N * E; i++) v[i] = (real)(rng_next(&r) % 3);
        for (size_t k = 1; k <= 3 && k <= E; k++) check_topk(v, N, E, k, "topk ties");
        free(v);
    }
}

static void test_scores_softmax_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 3);
    size_t N = 11, E = 5;
    real *x = test_rand(&r, N * E, 3.0); // (N, E)
    real *got = test_zeros(N * E), *want = test_zeros(N * E);
    bk()->router_scores_forward(T(got, N * E), T(x, N * E), N, E, SCORE_SOFTMAX);
    ref_softmax(want, x, N, E);
    test_assert_close(got, want, N * E, EXACT, 0.0, "softmax scores");
    free(x);
    free(got);
    free(want);
}

static void test_scores_sigmoid_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 4);
    size_t N = 9, E = 6;
    real *x = test_rand(&r, N * E, 4.0); // (N, E)
    real *got = test_zeros(N * E), *want = test_zeros(N * E);
    bk()->router_scores_forward(T(got, N * E), T(x, N * E), N, E, SCORE_SIGMOID);
    for (size_t i = 0; i < N * E; i++) want[i] = 1.0 / (1.0 + exp(-x[i]));
    test_assert_close(got, want, N * E, EXACT, 0.0, "sigmoid scores");
    free(x);
    free(got);
    free(want);
}

static void test_scores_extreme_logits_stay_finite(void **state) {
    (void)state;
    real x[4] = {1000, 999, -1000, 0}, got[4];
    bk()->router_scores_forward(T(got, 4), T(x, 4), 1, 4, SCORE_SOFTMAX);
    double e1 = exp(-1.0);
    real want_soft[4] = {1.0 / (1.0 + e1), e1 / (1.0 + e1), 0.0, exp(-1000.0)};
    test_assert_finite(got, 4, "softmax of huge logits");
    test_assert_close(got, want_soft, 4, EXACT, 0.0, "softmax of huge logits");
    real y[4] = {1000, -1000, 40, -40};
    bk()->router_scores_forward(T(got, 4), T(y, 4), 1, 4, SCORE_SIGMOID);
    real want_sig[4] = {1.0, 0.0, 1.0 / (1.0 + exp(-40.0)), exp(-40.0) / (1.0 + exp(-40.0))};
    test_assert_finite(got, 4, "sigmoid of huge logits");
    test_assert_close(got, want_sig, 4, EXACT, 0.0, "sigmoid of huge logits");
}

static void test_noisy_logits_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 5);
    size_t n = 35;
    real *clean = test_rand(&r, n, 2.0), *raw = test_rand(&r, n, 3.0),
         *eps = test_rand(&r, n, 1.5);
    real *got = test_zeros(n), *want = test_zeros(n);
    bk()->noisy_logits_forward(T(got, n), T(clean, n), T(raw, n), T(eps, n), n);
    for (size_t i = 0; i < n; i++) want[i] = clean[i] + eps[i] * log(1.0 + exp(raw[i]));
    test_assert_close(got, want, n, EXACT, 0.0, "noisy logits");
    // softplus at the extremes: no overflow for 1000, full relative precision for -50.
    real big_raw[3] = {1000, -1000, -50}, zero[3] = {0, 0, 0}, one[3] = {1, 1, 1}, h[3];
    bk()->noisy_logits_forward(T(h, 3), T(zero, 3), T(big_raw, 3), T(one, 3), 3);
    real want_big[3] = {1000.0, 0.0, exp(-50.0)};
    test_assert_finite(h, 3, "softplus extremes");
    test_assert_close(h, want_big, 3, EXACT, 0.0, "softplus extremes");
    free(clean);
    free(raw);
    free(eps);
    free(got);
    free(want);
}

static void test_gates_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 6);
    for (size_t s = 0; s < N_SHAPES; s++) {
        size_t N = shapes[s].N, E = shapes[s].E, k = shapes[s].k;
        real *scores = rand_positive(&r, N * E, 0.05, 1.0); // (N, E)
        int32_t *idx = izeros(N * k);                       // (N, k)
        rand_choices(&r, idx, N, E, k);
        real *got = test_zeros(N * k), *want = test_zeros(N * k);
        for (int renorm = 0; renorm <= 1; renorm++) {
            bk()->gates_forward(T(got, N * k), T(scores, N * E), I(idx, N * k), N, E, k,
                                renorm, 1.0);
            for (size_t n = 0; n < N; n++) {
                double sum = 0.0;
                for (size_t j = 0; j < k; j++) sum += scores[n * E + idx[n * k + j]];
                for (size_t j = 0; j < k; j++)
                    want[n * k + j] = scores[n * E + idx[n * k + j]] / (renorm ? sum : 1.0);
            }
            test_assert_close(got, want, N * k, EXACT, 0.0, renorm ? "gates renorm" : "gates");
        }
        free(scores);
        free(idx);
        free(got);
        free(want);
    }
}

// ---- forward: capacity ---------------------------------------------------------------

static size_t count_dropped(const int32_t *keep, size_t n) {
    size_t d = 0;
    for (size_t a = 0; a < n; a++) d += keep[a] == 0;
    return d;
}

// Capacity one below the balanced share, so some expert must drop; gates from `levels`
// distinct values (0: continuous) to exercise the tie rule.
static void check_capacity_policy(DropPolicy policy, unsigned levels, uint64_t seed) {
    Rng r;
    rng_init(&r, seed);
    for (size_t s = 0; s < N_SHAPES; s++) {
        size_t N = shapes[s].N, E = shapes[s].E, k = shapes[s].k;
        size_t cap = N * k / E > 1 ? N * k / E - 1 : 1;
        int32_t *idx = izeros(N * k), *got = izeros(N * k), *want = izeros(N * k); // (N, k)
        real *g = rand_positive(&r, N * k, 0.0, 1.0);                              // (N, k)
        if (levels)
            for (size_t a = 0; a < N * k; a++) g[a] = (real)(rng_next(&r) % levels) / levels;
        rand_choices(&r, idx, N, E, k);
        bk()->capacity_forward(I(got, N * k), I(idx, N * k), T(g, N * k), N, E, k, cap, policy);
        ref_capacity(want, idx, g, N, E, k, cap, policy);
        assert_ints_equal(got, want, N * k, "capacity vs reference");
        assert_true(count_dropped(got, N * k) > 0);
        free(idx);
        free(got);
        free(want);
        free(g);
    }
}

static void test_capacity_position_matches_reference(void **state) {
    (void)state;
    check_capacity_policy(DROP_POSITION, 0, 7);
}

static void test_capacity_probs_matches_reference(void **state) {
    (void)state;
    check_capacity_policy(DROP_PROBS, 0, 8);
    check_capacity_policy(DROP_PROBS, 3, 9);
}

// Expert 0 is wanted by the second choices of tokens 0, 1 and the first choices of
// tokens 2, 3, with room for two. Gates favour token 2's first and token 1's second.
static const int32_t hand_idx[8] = {1, 0, 2, 0, 0, 1, 0, 2};        // (4, 2)
static const real hand_gates[8] = {.3, .7, .2, .8, .9, .1, .6, .4}; // (4, 2)

static void test_capacity_position_first_choices_survive(void **state) {
    (void)state;
    int32_t keep[8];
    bk()->capacity_forward(I(keep, 8), I((int32_t *)hand_idx, 8), T((real *)hand_gates, 8), 4,
                           3, 2, 2, DROP_POSITION);
    assert_ints_equal(keep, (int32_t[]){1, 0, 1, 0, 1, 1, 1, 1}, 8, "position policy");
}

static void test_capacity_probs_keeps_highest_gates(void **state) {
    (void)state;
    int32_t keep[8];
    bk()->capacity_forward(I(keep, 8), I((int32_t *)hand_idx, 8), T((real *)hand_gates, 8), 4,
                           3, 2, 2, DROP_PROBS);
    assert_ints_equal(keep, (int32_t[]){1, 0, 1, 1, 1, 1, 0, 1}, 8, "probs policy");
}

static void test_capacity_probs_ties_follow_position(void **state) {
    (void)state;
    // One expert, equal gates 0.9 for tokens 0, 2, 3: the two earliest win.
    int32_t idx1[4] = {0, 0, 0, 0}, keep1[4];
    real g1[4] = {.9, .5, .9, .9};
    bk()->capacity_forward(I(keep1, 4), I(idx1, 4), T(g1, 4), 4, 2, 1, 2, DROP_PROBS);
    assert_ints_equal(keep1, (int32_t[]){1, 0, 1, 0}, 4, "probs tie by token");
    // Equal gates on expert 0 for token 0's second and token 3's first choice: a first
    // choice ranks before any second choice, whatever the token.
    int32_t idx2[8] = {1, 0, 1, 2, 1, 2, 0, 2}, keep2[8];
    real g2[8] = {.5, .5, .5, .5, .5, .5, .5, .5};
    bk()->capacity_forward(I(keep2, 8), I(idx2, 8), T(g2, 8), 4, 3, 2, 1, DROP_PROBS);
    assert_ints_equal(keep2, (int32_t[]){1, 0, 0, 1, 0, 0, 1, 0}, 8, "probs tie by choice");
}

static void check_keeps_all(size_t cap) {
    Rng r;
    rng_init(&r, 10);
    size_t N = 13, E = 4, k = 3;
    int32_t *idx = izeros(N * k), *keep = izeros(N * k); // (N, k)
    real *g = rand_positive(&r, N * k, 0.0, 1.0);        // (N, k)
    rand_choices(&r, idx, N, E, k);
    for (DropPolicy p = DROP_POSITION; p <= DROP_PROBS; p++) {
        for (size_t a = 0; a < N * k; a++) keep[a] = 7;
        bk()->capacity_forward(I(keep, N * k), I(idx, N * k), T(g, N * k), N, E, k, cap, p);
        for (size_t a = 0; a < N * k; a++) assert_int_equal(keep[a], 1);
    }
    free(idx);
    free(keep);
    free(g);
}

static void test_capacity_dropless_keeps_all(void **state) {
    (void)state;
    check_keeps_all(0);
}

static void test_capacity_larger_than_n_keeps_all(void **state) {
    (void)state;
    check_keeps_all(1000);
}

// Never above capacity, and never dropping while there is room: each expert keeps
// exactly min(capacity, demand).
static void test_capacity_fills_to_capacity_only(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 11);
    for (int trial = 0; trial < 60; trial++) {
        size_t N = 7 + rng_next(&r) % 7, E = 4 + rng_next(&r) % 3, k = 1 + rng_next(&r) % 3;
        size_t cap = 1 + rng_next(&r) % 4;
        DropPolicy policy = trial % 2 ? DROP_PROBS : DROP_POSITION;
        int32_t *idx = izeros(N * k), *keep = izeros(N * k); // (N, k)
        real *g = rand_positive(&r, N * k, 0.0, 1.0);        // (N, k)
        rand_choices(&r, idx, N, E, k);
        bk()->capacity_forward(I(keep, N * k), I(idx, N * k), T(g, N * k), N, E, k, cap,
                               policy);
        for (size_t e = 0; e < E; e++) {
            size_t demand = 0, kept = 0;
            for (size_t a = 0; a < N * k; a++) {
                demand += idx[a] == (int32_t)e;
                kept += idx[a] == (int32_t)e && keep[a];
            }
            assert_true(kept <= cap);
            assert_int_equal(kept, demand < cap ? demand : cap);
        }
        free(idx);
        free(keep);
        free(g);
    }
}

// ---- forward: dispatch, gather, combine ---------------------------------------------

// A routed batch: idx, gates and keep (with drops), and its dispatch plan.
typedef struct {
    size_t N, E, k, C, M;
    int32_t *idx, *keep, *offsets, *rows, *slot; // (N,k) (N,k) (E+1) (N*k) (N,k)
    real *gates;                                 // (N, k)
} Routed;

static Routed routed_batch(Rng *r, size_t N, size_t E, size_t k, size_t C, size_t cap) {
    Routed b = {N,
                E,
                k,
                C,
                0,
                izeros(N * k),
                izeros(N * k),
                izeros(E + 1),
                izeros(N * k),
                izeros(N * k),
                rand_positive(r, N * k, 0.1, 0.9)};
    rand_choices(r, b.idx, N, E, k);
    bk()->capacity_forward(I(b.keep, N * k), I(b.idx, N * k), T(b.gates, N * k), N, E, k, cap,
                           DROP_POSITION);
    bk()->dispatch_plan(I(b.offsets, E + 1), I(b.rows, N * k), I(b.slot, N * k),
                        I(b.idx, N * k), I(b.keep, N * k), N, E, k);
    b.M = (size_t)b.offsets[E];
    return b;
}

static void routed_free(Routed *b) {
    free(b->idx);
    free(b->keep);
    free(b->offsets);
    free(b->rows);
    free(b->slot);
    free(b->gates);
}

static void test_dispatch_plan_matches_brute_force(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 12);
    for (size_t s = 0; s < N_SHAPES; s++) {
        size_t N = shapes[s].N, E = shapes[s].E, k = shapes[s].k;
        for (size_t cap = 0; cap <= 2; cap++) {
            Routed b = routed_batch(&r, N, E, k, 1, cap);
            int32_t *off = izeros(E + 1), *rows = izeros(N * k), *slot = izeros(N * k);
            ref_dispatch(off, rows, slot, b.idx, b.keep, N, E, k);
            assert_ints_equal(b.offsets, off, E + 1, "dispatch offsets");
            assert_ints_equal(b.rows, rows, b.M, "dispatch rows");
            assert_ints_equal(b.slot, slot, N * k, "dispatch slot");
            assert_int_equal(b.M, N * k - count_dropped(b.keep, N * k));
            free(off);
            free(rows);
            free(slot);
            routed_free(&b);
        }
    }
}

static void test_gather_rows_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 13);
    Routed b = routed_batch(&r, 11, 5, 2, 7, 3);
    real *x = test_rand(&r, b.N * b.C, 1.0); // (N, C)
    real *xp = test_zeros(b.M * b.C);        // (M, C)
    bk()->gather_rows_forward(T(xp, b.M * b.C), T(x, b.N * b.C), I(b.rows, b.N * b.k),
                              I(b.offsets, b.E + 1), b.E, b.C);
    for (size_t m = 0; m < b.M; m++)
        test_assert_close(xp + m * b.C, x + (size_t)b.rows[m] * b.C, b.C, 0.0, 0.0, "gather");
    free(x);
    free(xp);
    routed_free(&b);
}

static void test_combine_forward_zero_for_dropped_tokens(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 14);
    Routed b = routed_batch(&r, 9, 4, 2, 5, 0);
    // Drop everything of token 0 and one choice of token 1, then re-plan.
    b.keep[0] = b.keep[1] = b.keep[3] = 0;
    bk()->dispatch_plan(I(b.offsets, b.E + 1), I(b.rows, b.N * b.k), I(b.slot, b.N * b.k),
                        I(b.idx, b.N * b.k), I(b.keep, b.N * b.k), b.N, b.E, b.k);
    b.M = (size_t)b.offsets[b.E];
    size_t NC = b.N * b.C;
    real *yp = test_rand(&r, b.M * b.C, 1.0); // (M, C)
    real *y = test_zeros(NC), *want = test_zeros(NC);
    for (size_t i = 0; i < NC; i++) y[i] = 99.0;
    bk()->combine_forward(T(y, NC), T(yp, b.M * b.C), T(b.gates, b.N * b.k),
                          I(b.slot, b.N * b.k), b.N, b.k, b.C);
    for (size_t n = 0; n < b.N; n++)
        for (size_t j = 0; j < b.k; j++) {
            if (!b.keep[n * b.k + j]) continue;
            for (size_t c = 0; c < b.C; c++)
                want[n * b.C + c] +=
                    b.gates[n * b.k + j] * yp[(size_t)b.slot[n * b.k + j] * b.C + c];
        }
    test_assert_close(y, want, NC, EXACT, 0.0, "combine");
    for (size_t c = 0; c < b.C; c++) assert_true(y[c] == 0.0);
    free(yp);
    free(y);
    free(want);
    routed_free(&b);
}

// ---- forward: auxiliary losses --------------------------------------------------------

static void test_lb_loss_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 15);
    for (size_t s = 0; s < N_SHAPES; s++) {
        size_t N = shapes[s].N, E = shapes[s].E, k = shapes[s].k;
        real *logits = test_rand(&r, N * E, 2.0), *probs = test_zeros(N * E); // (N, E)
        int32_t *idx = izeros(N * k), *counts = izeros(E);
        real *pmean = test_zeros(E); // (E)
        ref_softmax(probs, logits, N, E);
        rand_choices(&r, idx, N, E, k);
        real loss;
        bk()->lb_loss_forward(T(&loss, 1), I(counts, E), T(pmean, E), T(probs, N * E),
                              I(idx, N * k), N, E, k, 1);
        double want = 0.0;
        for (size_t i = 0; i < E; i++) {
            int32_t count = 0;
            double P = 0.0;
            for (size_t a = 0; a < N * k; a++) count += idx[a] == (int32_t)i;
            for (size_t n = 0; n < N; n++) P += probs[n * E + i] / (double)N;
            assert_int_equal(counts[i], count);
            real Pr = (real)P;
            test_assert_close(&pmean[i], &Pr, 1, 1e-12, 0.0, "lb pmean");
            want += (double)E / (double)(k * N) * count * P;
        }
        free(pmean);
        real w = (real)want;
        test_assert_close(&loss, &w, 1, EXACT, 0.0, "lb loss");
        free(logits);
        free(probs);
        free(idx);
        free(counts);
    }
}

static void check_balanced_lb(size_t N, size_t E, size_t k) {
    real *probs = test_zeros(N * E); // (N, E)
    int32_t *idx = izeros(N * k), *counts = izeros(E);
    for (size_t i = 0; i < N * E; i++) probs[i] = 1.0 / (double)E;
    for (size_t n = 0; n < N; n++)
        for (size_t j = 0; j < k; j++) idx[n * k + j] = (int32_t)((n + j) % E);
    real loss;
    bk()->lb_loss_forward(T(&loss, 1), I(counts, E), none(), T(probs, N * E), I(idx, N * k), N,
                          E, k, 1);
    assert_true(fabs(loss - 1.0) <= 1e-12);
    free(probs);
    free(idx);
    free(counts);
}

static void test_lb_loss_balanced_is_one(void **state) {
    (void)state;
    check_balanced_lb(12, 4, 2);
    check_balanced_lb(9, 3, 1);
    check_balanced_lb(30, 6, 3);
}

static void test_normalize_rows_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 16);
    size_t N = 9, E = 5;
    real *s = rand_positive(&r, N * E, 0.05, 1.0); // (N, E)
    real *got = test_zeros(N * E), *want = test_zeros(N * E);
    bk()->normalize_rows_forward(T(got, N * E), T(s, N * E), N, E);
    for (size_t n = 0; n < N; n++) {
        double sum = 0.0;
        for (size_t e = 0; e < E; e++) sum += s[n * E + e];
        for (size_t e = 0; e < E; e++) want[n * E + e] = s[n * E + e] / sum;
    }
    test_assert_close(got, want, N * E, EXACT, 0.0, "normalize rows");
    free(s);
    free(got);
    free(want);
}

static void test_zloss_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 17);
    size_t N = 13, E = 6;
    real *x = test_rand(&r, N * E, 3.0); // (N, E)
    real *lse = test_zeros(N), *want = test_zeros(N), loss;
    bk()->zloss_forward(T(&loss, 1), T(lse, N), T(x, N * E), N, E);
    double total = 0.0;
    for (size_t n = 0; n < N; n++) {
        double sum = 0.0;
        for (size_t e = 0; e < E; e++) sum += exp(x[n * E + e]);
        want[n] = log(sum);
        total += want[n] * want[n] / (double)N;
    }
    test_assert_close(lse, want, N, EXACT, 0.0, "z-loss lse");
    real t = (real)total;
    test_assert_close(&loss, &t, 1, EXACT, 0.0, "z-loss");
    // Logits far beyond exp's range: lse = 1000 + log 2 exactly, not inf.
    real big[2] = {1000, 1000}, lse_big, loss_big;
    bk()->zloss_forward(T(&loss_big, 1), T(&lse_big, 1), T(big, 2), 1, 2);
    real want_big = 1000.0 + log(2.0);
    test_assert_finite(&lse_big, 1, "z-loss huge logits");
    test_assert_close(&lse_big, &want_big, 1, EXACT, 0.0, "z-loss huge logits");
    free(x);
    free(lse);
    free(want);
}

static void test_importance_loss_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 18);
    for (size_t s = 0; s < N_SHAPES; s++) {
        size_t N = shapes[s].N, E = shapes[s].E, k = shapes[s].k;
        real *g = rand_positive(&r, N * k, 0.0, 1.0); // (N, k)
        int32_t *idx = izeros(N * k);
        rand_choices(&r, idx, N, E, k);
        real *imp = test_zeros(E), loss;
        double *want = calloc(E, sizeof(double)); // (E)
        bk()->importance_loss_forward(T(&loss, 1), T(imp, E), T(g, N * k), I(idx, N * k), N, E,
                                      k);
        for (size_t n = 0; n < N; n++)
            for (size_t j = 0; j < k; j++) want[idx[n * k + j]] += g[n * k + j];
        for (size_t i = 0; i < E; i++) {
            real w = (real)want[i];
            test_assert_close(&imp[i], &w, 1, EXACT, 0.0, "importance");
        }
        real want_loss = (real)ref_cv2(want, E);
        test_assert_close(&loss, &want_loss, 1, EXACT, 0.0, "importance loss");
        free(g);
        free(idx);
        free(imp);
        free(want);
    }
}

static void test_cv2_of_uniform_is_zero(void **state) {
    (void)state;
    size_t N = 8, E = 4, k = 1;
    int32_t idx[8];
    real g[8], imp[4], loss;
    for (size_t n = 0; n < N; n++) {
        idx[n] = (int32_t)(n % E);
        g[n] = 0.5;
    }
    bk()->importance_loss_forward(T(&loss, 1), T(imp, E), T(g, N), I(idx, N), N, E, k);
    assert_true(fabs(loss) <= 1e-15);
    // Nothing routed at all: the 1e-10 guard keeps it finite.
    for (size_t n = 0; n < N; n++) g[n] = 0.0;
    bk()->importance_loss_forward(T(&loss, 1), T(imp, E), T(g, N), I(idx, N), N, E, k);
    assert_true(loss == 0.0);
}

static void test_load_loss_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 19);
    for (size_t s = 0; s < N_SHAPES; s++) {
        size_t N = shapes[s].N, E = shapes[s].E, k = shapes[s].k, NE = N * E;
        real *clean = test_rand(&r, NE, 1.0), *raw = test_rand(&r, NE, 1.0); // (N, E)
        real *h = test_rand(&r, NE, 1.5);                                    // (N, E)
        int32_t *idx = izeros(N * k);
        ref_topk(idx, h, N, E, k);
        real *load = test_zeros(E), loss;
        double *want = calloc(E, sizeof(double)); // (E)
        bk()->load_loss_forward(T(&loss, 1), T(load, E), T(clean, NE), T(h, NE), T(raw, NE),
                                I(idx, N * k), N, E, k);
        for (size_t n = 0; n < N; n++)
            for (size_t i = 0; i < E; i++) {
                double thr = ref_kth_excluding(h + n * E, E, k, i);
                double z = (clean[n * E + i] - thr) / log(1.0 + exp(raw[n * E + i]));
                want[i] += 0.5 * (1.0 + erf(z / sqrt(2.0)));
            }
        for (size_t i = 0; i < E; i++) {
            real w = (real)want[i];
            test_assert_close(&load[i], &w, 1, EXACT, 1e-14, "load");
        }
        real want_loss = (real)ref_cv2(want, E);
        test_assert_close(&loss, &want_loss, 1, 1e-10, 0.0, "load loss");
        free(clean);
        free(raw);
        free(h);
        free(idx);
        free(load);
        free(want);
    }
}

// ---- gradients -------------------------------------------------------------------------
//
// A Case holds one op's inputs with its selection fixed. Its loss is test_dot(output, R)
// for a vector output or dloss * the scalar loss; its grad function runs the forward it
// needs, then the backward with only input `which`'s gradient wanted (the others NULL).

typedef struct Case Case;
typedef void (*grad_fn)(Case *c, size_t which, real *grad);

struct Case {
    const char *name;
    size_t N, E, k;
    int mode;    // ScoreFunc for scores; renorm for gates
    size_t n_in; // differentiable inputs in in[]
    real *in[3]; // in the op's argument order
    size_t in_n[3];
    real *eps;     // noisy logits: the fixed noise (N*E)
    int32_t *idx;  // (N, k) fixed selection
    Routed routed; // combine / gather: the fixed plan
    real *R;       // (out_n) weights of the scalar loss
    double dloss;
    real *out, *aux; // forward outputs: (out_n), and (N*E) room for lse, imp or load
    int32_t *counts; // (E)
    size_t out_n;
    test_loss_fn loss;
    grad_fn grad;
};

static Case case_new(const char *name, size_t N, size_t E, size_t k, size_t out_n) {
    return (Case){.name = name, .N = N, .E = E, .k = k, .out_n = out_n,
                  .out = test_zeros(out_n), .aux = test_zeros(N * E), .counts = izeros(E),
                  .dloss = 1.7};
}

static void case_free(Case *c) {
    for (size_t w = 0; w < c->n_in; w++) free(c->in[w]);
    free(c->eps);
    free(c->idx);
    free(c->R);
    free(c->out);
    free(c->aux);
    free(c->counts);
    if (c->routed.idx) routed_free(&c->routed);
}

static Tensor grad_or_none(const Case *c, size_t which, size_t w, real *grad) {
    return which == w ? T(grad, c->in_n[w]) : none();
}

// Every input's analytic gradient against central differences; also asserts the
// gradient is not identically zero, so a backward that does nothing cannot pass.
static void check_grads(Case *c) {
    Rng r;
    rng_init(&r, 100);
    for (size_t w = 0; w < c->n_in; w++) {
        real *g = test_zeros(c->in_n[w]);
        c->grad(c, w, g);
        double mx = 0.0;
        for (size_t i = 0; i < c->in_n[w]; i++) mx = fmax(mx, fabs(g[i]));
        if (!(mx > 1e-8)) fail_msg("%s: gradient of input %zu is all zero", c->name, w);
        test_fd_check(c->in[w], c->in_n[w], g, c->loss, c, 0, &r, RTOL, ATOL, c->name);
        free(g);
    }
}

// Two calls onto a non-zero buffer add twice what one call adds.
static void check_accumulates(Case *c) {
    Rng r;
    rng_init(&r, 101);
    for (size_t w = 0; w < c->n_in; w++) {
        size_t n = c->in_n[w];
        real *base = test_rand(&r, n, 1.0), *once = test_copy(base, n),
             *twice = test_copy(base, n);
        real *expect = test_zeros(n);
        c->grad(c, w, once);
        c->grad(c, w, twice);
        c->grad(c, w, twice);
        for (size_t i = 0; i < n; i++) expect[i] = base[i] + 2.0 * (once[i] - base[i]);
        test_assert_close(twice, expect, n, 1e-12, 1e-14, c->name);
        free(base);
        free(once);
        free(twice);
        free(expect);
    }
}

static double dot_loss(Case *c) { return test_dot(c->out, c->R, c->out_n); }

// -- scores
static double scores_loss(void *ctx) {
    Case *c = ctx;
    bk()->router_scores_forward(T(c->out, c->out_n), T(c->in[0], c->in_n[0]), c->N, c->E,
                                (ScoreFunc)c->mode);
    return dot_loss(c);
}

static void scores_grad(Case *c, size_t which, real *grad) {
    scores_loss(c);
    bk()->router_scores_backward(grad_or_none(c, which, 0, grad), T(c->R, c->out_n),
                                 T(c->out, c->out_n), c->N, c->E, (ScoreFunc)c->mode);
}

static Case scores_case(ScoreFunc func) {
    Rng r;
    rng_init(&r, 20 + (uint64_t)func);
    size_t N = 7, E = 5;
    Case c = case_new(func == SCORE_SOFTMAX ? "grad softmax scores" : "grad sigmoid scores", N,
                      E, 1, N * E);
    c.mode = (int)func;
    c.n_in = 1;
    c.in[0] = test_rand(&r, N * E, 2.0);
    c.in_n[0] = N * E;
    c.R = test_rand(&r, N * E, 1.0);
    c.loss = scores_loss;
    c.grad = scores_grad;
    return c;
}

// -- noisy logits: in = clean, raw
static double noisy_loss(void *ctx) {
    Case *c = ctx;
    size_t n = c->out_n;
    bk()->noisy_logits_forward(T(c->out, n), T(c->in[0], n), T(c->in[1], n), T(c->eps, n), n);
    return dot_loss(c);
}

static void noisy_grad(Case *c, size_t which, real *grad) {
    size_t n = c->out_n;
    bk()->noisy_logits_backward(grad_or_none(c, which, 0, grad),
                                grad_or_none(c, which, 1, grad), T(c->R, n), T(c->in[1], n),
                                T(c->eps, n), n);
}

static Case noisy_case(void) {
    Rng r;
    rng_init(&r, 22);
    size_t n = 9 * 5;
    Case c = case_new("grad noisy logits", 9, 5, 1, n);
    c.n_in = 2;
    c.in[0] = test_rand(&r, n, 1.0);
    c.in[1] = test_rand(&r, n, 3.0);
    c.in_n[0] = c.in_n[1] = n;
    c.eps = test_rand(&r, n, 1.5);
    c.R = test_rand(&r, n, 1.0);
    c.loss = noisy_loss;
    c.grad = noisy_grad;
    return c;
}

// -- gates: in = scores
static double gates_loss(void *ctx) {
    Case *c = ctx;
    bk()->gates_forward(T(c->out, c->out_n), T(c->in[0], c->in_n[0]), I(c->idx, c->N * c->k),
                        c->N, c->E, c->k, c->mode, 1.0);
    return dot_loss(c);
}

static void gates_grad(Case *c, size_t which, real *grad) {
    bk()->gates_backward(grad_or_none(c, which, 0, grad), T(c->R, c->out_n),
                         T(c->in[0], c->in_n[0]), I(c->idx, c->N * c->k), c->N, c->E, c->k,
                         c->mode, 1.0);
}

static Case gates_case(int renorm) {
    Rng r;
    rng_init(&r, 23 + (uint64_t)renorm);
    size_t N = 9, E = 6, k = 3;
    Case c = case_new(renorm ? "grad gates renorm" : "grad gates", N, E, k, N * k);
    c.mode = renorm;
    c.n_in = 1;
    c.in[0] = rand_positive(&r, N * E, 0.05, 1.0);
    c.in_n[0] = N * E;
    c.idx = izeros(N * k);
    ref_topk(c.idx, c.in[0], N, E, k);
    c.R = test_rand(&r, N * k, 1.0);
    c.loss = gates_loss;
    c.grad = gates_grad;
    return c;
}

// -- combine: in = yp, gates
static double combine_loss(void *ctx) {
    Case *c = ctx;
    Routed *b = &c->routed;
    bk()->combine_forward(T(c->out, c->out_n), T(c->in[0], c->in_n[0]), T(c->in[1], c->in_n[1]),
                          I(b->slot, b->N * b->k), b->N, b->k, b->C);
    return dot_loss(c);
}

static void combine_grad(Case *c, size_t which, real *grad) {
    Routed *b = &c->routed;
    bk()->combine_backward(grad_or_none(c, which, 0, grad), grad_or_none(c, which, 1, grad),
                           T(c->R, c->out_n), T(c->in[0], c->in_n[0]), T(c->in[1], c->in_n[1]),
                           I(b->slot, b->N * b->k), b->N, b->k, b->C);
}

// k = 6 is above the backward's group of four gate gradients taken side by side, so a
// token's kept choices span two groups, and capacity 7 drops some of them.
static Case combine_case(void) {
    Rng r;
    rng_init(&r, 25);
    size_t N = 11, E = 8, k = 6, C = 5;
    Case c = case_new("grad combine", N, E, k, N * C);
    c.routed = routed_batch(&r, N, E, k, C, 7);
    c.n_in = 2;
    c.in[0] = test_rand(&r, c.routed.M * C, 1.0);
    c.in_n[0] = c.routed.M * C;
    c.in[1] = test_copy(c.routed.gates, N * k);
    c.in_n[1] = N * k;
    c.R = test_rand(&r, N * C, 1.0);
    c.loss = combine_loss;
    c.grad = combine_grad;
    return c;
}

// -- gather rows: in = x
static double gather_loss(void *ctx) {
    Case *c = ctx;
    Routed *b = &c->routed;
    bk()->gather_rows_forward(T(c->out, c->out_n), T(c->in[0], c->in_n[0]),
                              I(b->rows, b->N * b->k), I(b->offsets, b->E + 1), b->E, b->C);
    return dot_loss(c);
}

static void gather_grad(Case *c, size_t which, real *grad) {
    Routed *b = &c->routed;
    bk()->gather_rows_backward(grad_or_none(c, which, 0, grad), T(c->R, c->out_n),
                               I(b->rows, b->N * b->k), I(b->offsets, b->E + 1), b->E, b->C);
}

// Tokens with three, fewer or no kept rows (capacity 5): the backward sums each token's.
static Case gather_case(void) {
    Rng r;
    rng_init(&r, 26);
    size_t N = 9, E = 5, k = 3, C = 70;
    Routed b = routed_batch(&r, N, E, k, C, 5);
    Case c = case_new("grad gather rows", N, E, k, b.M * C);
    c.routed = b;
    c.n_in = 1;
    c.in[0] = test_rand(&r, N * C, 1.0);
    c.in_n[0] = N * C;
    c.R = test_rand(&r, b.M * C, 1.0);
    c.loss = gather_loss;
    c.grad = gather_grad;
    return c;
}

// -- lb loss: in = probs
static double lb_loss(void *ctx) {
    Case *c = ctx;
    bk()->lb_loss_forward(T(c->out, 1), I(c->counts, c->E), none(), T(c->in[0], c->in_n[0]),
                          I(c->idx, c->N * c->k), c->N, c->E, c->k, 1);
    return c->dloss * c->out[0];
}

static void lb_grad(Case *c, size_t which, real *grad) {
    lb_loss(c);
    bk()->lb_loss_backward(grad_or_none(c, which, 0, grad), I(c->counts, c->E), c->dloss, c->N,
                           c->E, c->k, 1);
}

static Case lb_case(void) {
    Rng r;
    rng_init(&r, 27);
    size_t N = 13, E = 6, k = 2;
    Case c = case_new("grad lb loss", N, E, k, 1);
    c.n_in = 1;
    real *logits = test_rand(&r, N * E, 2.0);
    c.in[0] = test_zeros(N * E);
    ref_softmax(c.in[0], logits, N, E);
    free(logits);
    c.in_n[0] = N * E;
    c.idx = izeros(N * k);
    ref_topk(c.idx, c.in[0], N, E, k);
    c.loss = lb_loss;
    c.grad = lb_grad;
    return c;
}

// -- normalize rows: in = s
static double normalize_loss(void *ctx) {
    Case *c = ctx;
    bk()->normalize_rows_forward(T(c->out, c->out_n), T(c->in[0], c->in_n[0]), c->N, c->E);
    return dot_loss(c);
}

static void normalize_grad(Case *c, size_t which, real *grad) {
    bk()->normalize_rows_backward(grad_or_none(c, which, 0, grad), T(c->R, c->out_n),
                                  T(c->in[0], c->in_n[0]), c->N, c->E);
}

static Case normalize_case(void) {
    Rng r;
    rng_init(&r, 28);
    size_t N = 7, E = 5;
    Case c = case_new("grad normalize rows", N, E, 1, N * E);
    c.n_in = 1;
    c.in[0] = rand_positive(&r, N * E, 0.1, 1.0);
    c.in_n[0] = N * E;
    c.R = test_rand(&r, N * E, 1.0);
    c.loss = normalize_loss;
    c.grad = normalize_grad;
    return c;
}

// -- z-loss: in = logits
static double zloss_loss(void *ctx) {
    Case *c = ctx;
    bk()->zloss_forward(T(c->out, 1), T(c->aux, c->N), T(c->in[0], c->in_n[0]), c->N, c->E);
    return c->dloss * c->out[0];
}

static void zloss_grad(Case *c, size_t which, real *grad) {
    zloss_loss(c);
    bk()->zloss_backward(grad_or_none(c, which, 0, grad), T(c->in[0], c->in_n[0]),
                         T(c->aux, c->N), c->dloss, c->N, c->E);
}

static Case zloss_case(void) {
    Rng r;
    rng_init(&r, 29);
    size_t N = 11, E = 4;
    Case c = case_new("grad z-loss", N, E, 1, 1);
    c.n_in = 1;
    c.in[0] = test_rand(&r, N * E, 2.0);
    c.in_n[0] = N * E;
    c.loss = zloss_loss;
    c.grad = zloss_grad;
    return c;
}

// -- importance loss: in = gates
static double importance_loss(void *ctx) {
    Case *c = ctx;
    bk()->importance_loss_forward(T(c->out, 1), T(c->aux, c->E), T(c->in[0], c->in_n[0]),
                                  I(c->idx, c->N * c->k), c->N, c->E, c->k);
    return c->dloss * c->out[0];
}

static void importance_grad(Case *c, size_t which, real *grad) {
    importance_loss(c);
    bk()->importance_loss_backward(grad_or_none(c, which, 0, grad), T(c->aux, c->E),
                                   I(c->idx, c->N * c->k), c->dloss, c->N, c->E, c->k);
}

static Case importance_case(void) {
    Rng r;
    rng_init(&r, 30);
    size_t N = 9, E = 5, k = 2;
    Case c = case_new("grad importance loss", N, E, k, 1);
    c.n_in = 1;
    c.in[0] = rand_positive(&r, N * k, 0.05, 1.0);
    c.in_n[0] = N * k;
    c.idx = izeros(N * k);
    rand_choices(&r, c.idx, N, E, k);
    c.loss = importance_loss;
    c.grad = importance_grad;
    return c;
}

// -- load loss: in = clean, h, raw
static double load_loss(void *ctx) {
    Case *c = ctx;
    size_t NE = c->N * c->E;
    bk()->load_loss_forward(T(c->out, 1), T(c->aux, c->E), T(c->in[0], NE), T(c->in[1], NE),
                            T(c->in[2], NE), I(c->idx, c->N * c->k), c->N, c->E, c->k);
    return c->dloss * c->out[0];
}

static void load_grad(Case *c, size_t which, real *grad) {
    size_t NE = c->N * c->E;
    load_loss(c);
    bk()->load_loss_backward(grad_or_none(c, which, 0, grad), grad_or_none(c, which, 1, grad),
                             grad_or_none(c, which, 2, grad), T(c->aux, c->E), T(c->in[0], NE),
                             T(c->in[1], NE), T(c->in[2], NE), I(c->idx, c->N * c->k), c->dloss,
                             c->N, c->E, c->k);
}

// h = clean + noise as in training; idx is the top k of h.
static Case load_case(size_t N, size_t E, size_t k) {
    Rng r;
    rng_init(&r, 31 + k);
    size_t NE = N * E;
    Case c = case_new("grad load loss", N, E, k, 1);
    c.n_in = 3;
    c.in[0] = test_rand(&r, NE, 1.0);
    c.in[2] = test_rand(&r, NE, 1.0);
    c.in[1] = test_zeros(NE);
    c.eps = test_rand(&r, NE, 1.0);
    bk()->noisy_logits_forward(T(c.in[1], NE), T(c.in[0], NE), T(c.in[2], NE), T(c.eps, NE),
                               NE);
    c.in_n[0] = c.in_n[1] = c.in_n[2] = NE;
    c.idx = izeros(N * k);
    ref_topk(c.idx, c.in[1], N, E, k);
    c.loss = load_loss;
    c.grad = load_grad;
    return c;
}

static void run_grad_check(Case c) {
    check_grads(&c);
    case_free(&c);
}

static void test_grad_scores_softmax(void **state) {
    (void)state;
    run_grad_check(scores_case(SCORE_SOFTMAX));
}

static void test_grad_scores_sigmoid(void **state) {
    (void)state;
    run_grad_check(scores_case(SCORE_SIGMOID));
}

static void test_grad_noisy_logits(void **state) {
    (void)state;
    run_grad_check(noisy_case());
}

static void test_grad_gates_renorm(void **state) {
    (void)state;
    run_grad_check(gates_case(1));
}

static void test_grad_gates_plain(void **state) {
    (void)state;
    run_grad_check(gates_case(0));
}

static void test_grad_combine(void **state) {
    (void)state;
    run_grad_check(combine_case());
}

static void test_grad_gather_rows(void **state) {
    (void)state;
    run_grad_check(gather_case());
}

static void test_grad_lb_loss(void **state) {
    (void)state;
    run_grad_check(lb_case());
}

static void test_grad_normalize_rows(void **state) {
    (void)state;
    run_grad_check(normalize_case());
}

static void test_grad_zloss(void **state) {
    (void)state;
    run_grad_check(zloss_case());
}

static void test_grad_importance_loss(void **state) {
    (void)state;
    run_grad_check(importance_case());
}

static void test_grad_load_loss(void **state) {
    (void)state;
    for (size_t k = 1; k <= 3; k++) run_grad_check(load_case(9, 5, k));
    run_grad_check(load_case(7, 4, 3));
}

static void test_backward_accumulates(void **state) {
    (void)state;
    Case cases[] = {scores_case(SCORE_SOFTMAX),
                    scores_case(SCORE_SIGMOID),
                    noisy_case(),
                    gates_case(1),
                    gates_case(0),
                    combine_case(),
                    gather_case(),
                    lb_case(),
                    normalize_case(),
                    zloss_case(),
                    importance_case(),
                    load_case(9, 5, 2)};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        check_accumulates(&cases[i]);
        case_free(&cases[i]);
    }
}

// With every gradient NULL, each backward skips its products and touches nothing.
static void test_backward_skips_null_gradients(void **state) {
    (void)state;
    Case c = load_case(9, 5, 2);
    size_t NE = c.N * c.E;
    real *saved = test_copy(c.in[0], NE);
    load_loss(&c);
    bk()->load_loss_backward(none(), none(), none(), T(c.aux, c.E), T(c.in[0], NE),
                             T(c.in[1], NE), T(c.in[2], NE), I(c.idx, c.N * c.k), 1.0, c.N, c.E,
                             c.k);
    bk()->router_scores_backward(none(), T(c.in[0], NE), T(c.in[1], NE), c.N, c.E,
                                 SCORE_SOFTMAX);
    bk()->gates_backward(none(), T(c.in[0], NE), T(c.in[1], NE), I(c.idx, c.N * c.k), c.N, c.E,
                         c.k, 1, 1.0);
    bk()->lb_loss_backward(none(), I(c.counts, c.E), 1.0, c.N, c.E, c.k, 1);
    bk()->normalize_rows_backward(none(), T(c.in[0], NE), T(c.in[1], NE), c.N, c.E);
    bk()->zloss_backward(none(), T(c.in[0], NE), T(c.in[1], c.N), 1.0, c.N, c.E);
    bk()->importance_loss_backward(none(), T(c.aux, c.E), I(c.idx, c.N * c.k), 1.0, c.N, c.E,
                                   c.k);
    bk()->noisy_logits_backward(none(), none(), T(c.in[0], NE), T(c.in[1], NE), T(c.eps, NE),
                                NE);
    test_assert_close(c.in[0], saved, NE, 0.0, 0.0, "inputs untouched");
    free(saved);
    case_free(&c);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_topk_matches_stable_sort),
    cmocka_unit_test(test_topk_ties_prefer_lower_index),
    cmocka_unit_test(test_scores_softmax_forward),
    cmocka_unit_test(test_scores_sigmoid_forward),
    cmocka_unit_test(test_scores_extreme_logits_stay_finite),
    cmocka_unit_test(test_noisy_logits_forward),
    cmocka_unit_test(test_gates_forward),
    cmocka_unit_test(test_capacity_position_matches_reference),
    cmocka_unit_test(test_capacity_probs_matches_reference),
    cmocka_unit_test(test_capacity_position_first_choices_survive),
    cmocka_unit_test(test_capacity_probs_keeps_highest_gates),
    cmocka_unit_test(test_capacity_probs_ties_follow_position),
    cmocka_unit_test(test_capacity_dropless_keeps_all),
    cmocka_unit_test(test_capacity_larger_than_n_keeps_all),
    cmocka_unit_test(test_capacity_fills_to_capacity_only),
    cmocka_unit_test(test_dispatch_plan_matches_brute_force),
    cmocka_unit_test(test_gather_rows_forward),
    cmocka_unit_test(test_combine_forward_zero_for_dropped_tokens),
    cmocka_unit_test(test_lb_loss_forward),
    cmocka_unit_test(test_lb_loss_balanced_is_one),
    cmocka_unit_test(test_normalize_rows_forward),
    cmocka_unit_test(test_zloss_forward),
    cmocka_unit_test(test_importance_loss_forward),
    cmocka_unit_test(test_cv2_of_uniform_is_zero),
    cmocka_unit_test(test_load_loss_forward),
    cmocka_unit_test(test_grad_scores_softmax),
    cmocka_unit_test(test_grad_scores_sigmoid),
    cmocka_unit_test(test_grad_noisy_logits),
    cmocka_unit_test(test_grad_gates_renorm),
    cmocka_unit_test(test_grad_gates_plain),
    cmocka_unit_test(test_grad_combine),
    cmocka_unit_test(test_grad_gather_rows),
    cmocka_unit_test(test_grad_lb_loss),
    cmocka_unit_test(test_grad_normalize_rows),
    cmocka_unit_test(test_grad_zloss),
    cmocka_unit_test(test_grad_importance_loss),
    cmocka_unit_test(test_grad_load_loss),
    cmocka_unit_test(test_backward_accumulates),
    cmocka_unit_test(test_backward_skips_null_gradients),
};

TEST_MAIN(tests)
