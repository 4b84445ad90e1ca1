// test_ops_projection.c: the CPU backend's QK-norm, bias and sigmoid-gated add in double
// precision (kernels/cpu/projection.c).
//
// Forwards against naive loops written here from the ops.def comments (QK-norm slices
// each head out of the row and normalises it alone), backwards against central finite
// differences of loss = out . R (so dout = R). Gradient buffers start random, which
// checks that backward adds into them.
#include "testlib.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FD_RTOL 1e-6
#define FD_ATOL 1e-9
#define REF_RTOL 1e-11
#define REF_ATOL 1e-13
#define QK_EPS 1e-6

static const Backend *ops(void) { return backend_cpu(); }

// ---- QK-norm ------------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *out, *qkv, *rstd, *wq, *wk;
    size_t N, H, KV, D;
    int per_head;
} QkCase;

static size_t qk_width(const QkCase *c) { return (c->H + 2 * c->KV) * c->D; }
static size_t qk_groups(const QkCase *c) { return c->per_head ? c->H + c->KV : 2; }
static size_t wq_len(const QkCase *c) { return c->per_head ? c->D : c->H * c->D; }
static size_t wk_len(const QkCase *c) { return c->per_head ? c->D : c->KV * c->D; }

static void qk_run(void *self) {
    QkCase *c = self;
    size_t n = c->N * qk_width(c);
    ops()->qk_norm_forward(test_tensor(c->out, n), test_tensor(c->rstd, c->N * qk_groups(c)),
                           test_tensor(c->qkv, n), test_tensor(c->wq, wq_len(c)),
                           test_tensor(c->wk, wk_len(c)), c->N, c->H, c->KV, c->D, c->per_head,
                           QK_EPS);
}

// y = x / sqrt(mean x^2 + eps) * w over one slice of len values.
static void naive_norm(real *y, const real *x, const real *w, size_t len) {
    double ms = 0.0;
    for (size_t i = 0; i < len; i++) ms += x[i] * x[i];
    ms /= (double)len;
    for (size_t i = 0; i < len; i++) y[i] = x[i] / sqrt(ms + QK_EPS) * w[i];
}

static QkCase qk_case(Rng *r, size_t N, size_t H, size_t KV, size_t D, int per_head) {
    QkCase c = {{qk_run, NULL, NULL, 0}, NULL, NULL, NULL, NULL, NULL, N, H, KV, D, per_head};
    c.qkv = test_rand(r, N * qk_width(&c), 2.0);
    c.out = test_zeros(N * qk_width(&c));
    c.rstd = test_zeros(N * qk_groups(&c));
    c.wq = test_rand(r, wq_len(&c), 1.5);
    c.wk = test_rand(r, wk_len(&c), 1.5);
    c.probe.out = c.out;
    c.probe.n = N * qk_width(&c);
    return c;
}

static void qk_free(QkCase *c) {
    free(c->out), free(c->qkv), free(c->rstd), free(c->wq), free(c->wk);
}

static void check_qk_forward(int per_head) {
    Rng r;
    rng_init(&r, 31 + (uint64_t)per_head);
    QkCase c = qk_case(&r, 3, 4, 2, 6, per_head);
    size_t W = qk_width(&c), HD = c.H * c.D, KD = c.KV * c.D;
    real *ref = test_zeros(c.N * W);
    for (size_t n = 0; n < c.N; n++) {
        const real *row = c.qkv + n * W;
        real *o = ref + n * W;
        if (per_head) {
            for (size_t h = 0; h < c.H + c.KV; h++)
                naive_norm(o + h * c.D, row + h * c.D, h < c.H ? c.wq : c.wk, c.D);
        } else {
            naive_norm(o, row, c.wq, HD);
            naive_norm(o + HD, row + HD, c.wk, KD);
        }
        memcpy(o + HD + KD, row + HD + KD, KD * sizeof *o);
    }
    qk_run(&c);
    test_assert_close(c.out, ref, c.N * W, REF_RTOL, REF_ATOL, "qk_norm out");
    free(ref);
    qk_free(&c);
}

static void test_qk_norm_forward_per_head(void **state) {
    (void)state;
    check_qk_forward(1);
}

static void test_qk_norm_forward_whole_projection(void **state) {
    (void)state;
    check_qk_forward(0);
}

static void check_qk_backward(int per_head) {
    Rng r;
    rng_init(&r, 41 + (uint64_t)per_head);
    QkCase c = qk_case(&r, 3, 4, 2, 6, per_head);
    size_t n = c.N * qk_width(&c), nq = wq_len(&c), nk = wk_len(&c);
    real *R = test_rand(&r, n, 1.0);
    c.probe.R = R;
    real *dx = test_rand(&r, n, 1.0), *dwq = test_rand(&r, nq, 1.0), *dwk = test_rand(&r, nk, 1.0);
    real *dx0 = test_copy(dx, n), *dwq0 = test_copy(dwq, nq), *dwk0 = test_copy(dwk, nk);
    qk_run(&c);
    ops()->qk_norm_backward(test_tensor(dx, n), test_tensor(dwq, nq), test_tensor(dwk, nk),
                            test_tensor(R, n), test_tensor(c.qkv, n), test_tensor(c.wq, nq),
                            test_tensor(c.wk, nk), test_tensor(c.rstd, c.N * qk_groups(&c)),
                            c.N, c.H, c.KV, c.D, per_head);
    test_subtract(dx, dx0, n);
    test_subtract(dwq, dwq0, nq);
    test_subtract(dwk, dwk0, nk);
    test_fd_check(c.qkv, n, dx, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "qk_norm dqkv");
    test_fd_check(c.wq, nq, dwq, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "qk_norm dwq");
    test_fd_check(c.wk, nk, dwk, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "qk_norm dwk");

    // Weights frozen: dqkv is the same.
    qk_run(&c);
    real *dx_only = test_zeros(n);
    ops()->qk_norm_backward(test_tensor(dx_only, n), tensor_none(), tensor_none(),
                            test_tensor(R, n), test_tensor(c.qkv, n), test_tensor(c.wq, nq),
                            test_tensor(c.wk, nk), test_tensor(c.rstd, c.N * qk_groups(&c)),
                            c.N, c.H, c.KV, c.D, per_head);
    test_assert_close(dx_only, dx, n, 1e-12, 1e-14, "qk_norm dqkv with weights absent");
    free(R), free(dx), free(dwq), free(dwk), free(dx0), free(dwq0), free(dwk0), free(dx_only);
    qk_free(&c);
}

static void test_qk_norm_backward_per_head(void **state) {
    (void)state;
    check_qk_backward(1);
}

static void test_qk_norm_backward_whole_projection(void **state) {
    (void)state;
    check_qk_backward(0);
}

// ---- bias ---------------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *out, *x, *b;
    size_t N, M;
} BiasCase;

static void bias_run(void *self) {
    BiasCase *c = self;
    ops()->bias_add_forward(test_tensor(c->out, c->N * c->M), test_tensor(c->x, c->N * c->M),
                            test_tensor(c->b, c->M), c->N, c->M);
}

static void test_bias_add(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 51);
    size_t N = 7, M = 5, n = N * M;
    real *x = test_rand(&r, n, 1.0), *b = test_rand(&r, M, 1.0), *out = test_zeros(n);
    real *R = test_rand(&r, n, 1.0), *ref = test_zeros(n);
    for (size_t i = 0; i < N; i++)
        for (size_t j = 0; j < M; j++) ref[i * M + j] = x[i * M + j] + b[j];
    BiasCase c = {{bias_run, out, R, n}, out, x, b, N, M};
    bias_run(&c);
    test_assert_close(out, ref, n, 0.0, 0.0, "bias_add out");
    real *dx = test_rand(&r, n, 1.0), *db = test_rand(&r, M, 1.0);
    real *dx0 = test_copy(dx, n), *db0 = test_copy(db, M);
    ops()->bias_add_backward(test_tensor(dx, n), test_tensor(db, M), test_tensor(R, n), N, M);
    test_subtract(dx, dx0, n);
    test_subtract(db, db0, M);
    test_fd_check(x, n, dx, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "bias_add dx");
    test_fd_check(b, M, db, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "bias_add db");
    free(x), free(b), free(out), free(R), free(ref), free(dx), free(db), free(dx0), free(db0);
}

// ---- sigmoid-gated add --------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *out, *a, *s, *g;
    size_t N, C;
} GateCase;

static void gate_run(void *self) {
    GateCase *c = self;
    size_t n = c->N * c->C;
    ops()->gated_add_forward(test_tensor(c->out, n), test_tensor(c->a, n), test_tensor(c->s, n),
                             test_tensor(c->g, c->N), c->N, c->C);
}

static void test_gated_add(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 61);
    size_t N = 6, C = 7, n = N * C;
    real *a = test_rand(&r, n, 1.0), *s = test_rand(&r, n, 1.0), *g = test_rand(&r, N, 4.0);
    g[0] = -40.0;   // a saturated gate: sigmoid ~ 4e-18, its gradient still finite
    real *out = test_zeros(n), *R = test_rand(&r, n, 1.0), *ref = test_zeros(n);
    for (size_t i = 0; i < N; i++)
        for (size_t j = 0; j < C; j++)
            ref[i * C + j] = a[i * C + j] + s[i * C + j] / (1.0 + exp(-g[i]));
    GateCase c = {{gate_run, out, R, n}, out, a, s, g, N, C};
    gate_run(&c);
    test_assert_close(out, ref, n, REF_RTOL, REF_ATOL, "gated_add out");
    real *da = test_rand(&r, n, 1.0), *ds = test_rand(&r, n, 1.0), *dg = test_rand(&r, N, 1.0);
    real *da0 = test_copy(da, n), *ds0 = test_copy(ds, n), *dg0 = test_copy(dg, N);
    ops()->gated_add_backward(test_tensor(da, n), test_tensor(ds, n), test_tensor(dg, N),
                              test_tensor(R, n), test_tensor(s, n), test_tensor(g, N), N, C);
    test_subtract(da, da0, n);
    test_subtract(ds, ds0, n);
    test_subtract(dg, dg0, N);
    test_fd_check(a, n, da, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "gated_add da");
    test_fd_check(s, n, ds, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "gated_add ds");
    test_fd_check(g, N, dg, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "gated_add dg");
    free(a), free(s), free(g), free(out), free(R), free(ref);
    free(da), free(ds), free(dg), free(da0), free(ds0), free(dg0);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_qk_norm_forward_per_head),
    cmocka_unit_test(test_qk_norm_forward_whole_projection),
    cmocka_unit_test(test_qk_norm_backward_per_head),
    cmocka_unit_test(test_qk_norm_backward_whole_projection),
    cmocka_unit_test(test_bias_add),
    cmocka_unit_test(test_gated_add),
};

TEST_MAIN(tests)
