// test_ops_dense.c: the CPU backend's dense ops (add, mul, embedding, RMSNorm, matmul,
// SwiGLU, grouped experts, cross-entropy, RoPE, attention) in double precision.
//
// Each op's forward is compared with a naive loop written here from kernels.h, and its
// backward with central finite differences of loss = out . R for a fixed random R
// (so dout = R). Gradient buffers start from random values, which checks that backward
// adds into them; scratch buffers start as NaN, which checks that ops write them before
// reading. Sizes are small and odd so that indexing mistakes show.
#include "testlib.h"
#include "../kernels/cpu/cpu_ops.h"
#include "../kernels/exp_math.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define FD_RTOL 1e-6
#define FD_ATOL 1e-9
// Forward ops against loops that sum in another order: only rounding may differ.
#define REF_RTOL 1e-11
#define REF_ATOL 1e-13

static const Backend *ops(void) { return backend_cpu(); }

static real *filled(size_t n, real v) {
    real *x = test_zeros(n);
    for (size_t i = 0; i < n; i++)
        x[i] = v;
    return x;
}

static void assert_equal(const real *a, const real *b, size_t n, const char *what) {
    test_assert_close(a, b, n, 0.0, 0.0, what);
}

static double silu(double z) { return z / (1.0 + exp(-z)); }

// ---- add, mul -------------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *a, *b, *out; // (n) each; b is u for mul
    size_t n;
} PairCase;

static void add_run(void *self) {
    PairCase *c = self;
    ops()->add_forward(test_tensor(c->out, c->n), test_tensor(c->a, c->n),
                       test_tensor(c->b, c->n), c->n);
}

static void mul_run(void *self) {
    PairCase *c = self;
    ops()->mul_forward(test_tensor(c->out, c->n), test_tensor(c->a, c->n),
                       test_tensor(c->b, c->n), c->n);
}

static void test_add_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 1);
    size_t n = 11;
    real *a = test_rand(&r, n, 1.0), *b = test_rand(&r, n, 1.0), *out = test_zeros(n);
    real *ref = test_zeros(n);
    for (size_t i = 0; i < n; i++)
        ref[i] = a[i] + b[i];
    ops()->add_forward(test_tensor(out, n), test_tensor(a, n), test_tensor(b, n), n);
    assert_equal(out, ref, n, "add out");
    free(a), free(b), free(out), free(ref);
}

static void test_add_backward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 2);
    size_t n = 11;
    real *a = test_rand(&r, n, 1.0), *b = test_rand(&r, n, 1.0), *out = test_zeros(n);
    real *R = test_rand(&r, n, 1.0), *da = test_rand(&r, n, 1.0), *db = test_rand(&r, n, 1.0);
    real *da0 = test_copy(da, n), *db0 = test_copy(db, n);
    ops()->add_backward(test_tensor(da, n), test_tensor(db, n), test_tensor(R, n), n);
    test_subtract(da, da0, n);
    test_subtract(db, db0, n);
    PairCase c = {{add_run, out, R, n}, a, b, out, n};
    test_fd_check(a, n, da, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "add da");
    test_fd_check(b, n, db, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "add db");

    // An unwanted db is skipped; da still gets its gradient.
    memcpy(da, da0, n * sizeof(real));
    ops()->add_backward(test_tensor(da, n), tensor_none(), test_tensor(R, n), n);
    test_subtract(da, da0, n);
    assert_equal(da, R, n, "add da with db absent");
    free(a), free(b), free(out), free(R), free(da), free(db), free(da0), free(db0);
}

static void test_mul_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 3);
    size_t n = 13;
    real *x = test_rand(&r, n, 1.0), *u = test_rand(&r, n, 2.0), *out = test_zeros(n);
    real *ref = test_zeros(n);
    for (size_t i = 0; i < n; i++)
        ref[i] = x[i] * u[i];
    ops()->mul_forward(test_tensor(out, n), test_tensor(x, n), test_tensor(u, n), n);
    assert_equal(out, ref, n, "mul out");
    free(x), free(u), free(out), free(ref);
}

static void test_mul_backward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 4);
    size_t n = 13;
    real *x = test_rand(&r, n, 1.0), *u = test_rand(&r, n, 2.0), *out = test_zeros(n);
    real *R = test_rand(&r, n, 1.0), *dx = test_rand(&r, n, 1.0), *dx0 = test_copy(dx, n);
    ops()->mul_backward(test_tensor(dx, n), test_tensor(R, n), test_tensor(u, n), n);
    test_subtract(dx, dx0, n);
    PairCase c = {{mul_run, out, R, n}, x, u, out, n};
    test_fd_check(x, n, dx, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "mul dx");
    ops()->mul_backward(tensor_none(), test_tensor(R, n), test_tensor(u, n), n);
    free(x), free(u), free(out), free(R), free(dx), free(dx0);
}

// ---- embedding ------------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *out;    // (N, C)
    real *table;  // (V, C)
    int32_t *tok; // (N)
    size_t N, V, C;
} EmbCase;

static void embedding_run(void *self) {
    EmbCase *c = self;
    ops()->embedding_forward(test_tensor(c->out, c->N * c->C), test_itensor(c->tok, c->N),
                             test_tensor(c->table, c->V * c->C), c->N, c->C);
}

static void test_embedding_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 5);
    size_t N = 9, V = 7, C = 6;
    int32_t tok[] = {3, 0, 6, 3, 3, 1, 6, 2, 0};
    real *table = test_rand(&r, V * C, 1.0), *out = filled(N * C, NAN),
         *ref = test_zeros(N * C);
    for (size_t n = 0; n < N; n++)
        for (size_t c = 0; c < C; c++)
            ref[n * C + c] = table[(size_t)tok[n] * C + c];
    ops()->embedding_forward(test_tensor(out, N * C), test_itensor(tok, N),
                             test_tensor(table, V * C), N, C);
    assert_equal(out, ref, N * C, "embedding out");
    free(table), free(out), free(ref);
}

// Repeated tokens add into one row; the last row is never looked up and must not move.
// Also checks that a second backward adds the same gradient again.
static void check_embedding_backward(size_t N, size_t V, size_t C, uint64_t seed) {
    Rng r;
    rng_init(&r, seed);
    int32_t *tok = malloc(N * sizeof(int32_t));
    test_rand_ints(&r, tok, N, V - 1);
    real *table = test_rand(&r, V * C, 1.0), *out = test_zeros(N * C);
    real *R = test_rand(&r, N * C, 1.0), *dtab = test_rand(&r, V * C, 1.0);
    real *dtab0 = test_copy(dtab, V * C);
    Tensor dt = test_tensor(dtab, V * C), dy = test_tensor(R, N * C);
    ops()->embedding_backward(dt, dy, test_itensor(tok, N), N, C);
    real *once = test_copy(dtab, V * C);
    test_subtract(once, dtab0, V * C);
    EmbCase c = {{embedding_run, out, R, N * C}, out, table, tok, N, V, C};
    test_fd_check(table, V * C, once, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL,
                  "embedding dtable");
    assert_equal(dtab + (V - 1) * C, dtab0 + (V - 1) * C, C, "embedding unused row");

    ops()->embedding_backward(dt, dy, test_itensor(tok, N), N, C);
    test_subtract(dtab, dtab0, V * C);
    for (size_t i = 0; i < V * C; i++)
        once[i] *= 2;
    test_assert_close(dtab, once, V * C, 1e-14, 0.0, "embedding dtable after two calls");
    free(tok), free(table), free(out), free(R), free(dtab), free(dtab0), free(once);
}

static void test_embedding_backward(void **state) {
    (void)state;
    check_embedding_backward(9, 7, 6, 6);
    check_embedding_backward(5, 4, 70, 7); // more columns than one thread's block
}

// ---- RMSNorm ---------------------------------------------------------------------------

#define RMS_EPS 1e-5

typedef struct {
    TestProbe probe;
    real *out, *x; // (N, C)
    real *rstd;    // (N)
    real *w;       // (C)
    size_t N, C;
} RmsCase;

static void rmsnorm_run(void *self) {
    RmsCase *c = self;
    size_t nc = c->N * c->C;
    ops()->rmsnorm_forward(test_tensor(c->out, nc), test_tensor(c->rstd, c->N),
                           test_tensor(c->x, nc), test_tensor(c->w, c->C), c->N, c->C, RMS_EPS);
}

static void test_rmsnorm_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 8);
    size_t N = 5, C = 9;
    real *x = test_rand(&r, N * C, 2.0), *w = test_rand(&r, C, 1.0);
    real *out = test_zeros(N * C), *rstd = test_zeros(N);
    real *ref = test_zeros(N * C), *ref_rstd = test_zeros(N);
    for (size_t n = 0; n < N; n++) {
        double ms = 0.0;
        for (size_t c = 0; c < C; c++)
            ms += x[n * C + c] * x[n * C + c] / (double)C;
        ref_rstd[n] = 1.0 / sqrt(ms + RMS_EPS);
        for (size_t c = 0; c < C; c++)
            ref[n * C + c] = x[n * C + c] * ref_rstd[n] * w[c];
    }
    RmsCase c = {{rmsnorm_run, out, NULL, 0}, out, x, rstd, w, N, C};
    rmsnorm_run(&c);
    test_assert_close(rstd, ref_rstd, N, REF_RTOL, REF_ATOL, "rmsnorm rstd");
    test_assert_close(out, ref, N * C, REF_RTOL, REF_ATOL, "rmsnorm out");
    free(x), free(w), free(out), free(rstd), free(ref), free(ref_rstd);
}

static void check_rmsnorm_backward(size_t N, size_t C, uint64_t seed) {
    Rng r;
    rng_init(&r, seed);
    size_t nc = N * C;
    real *x = test_rand(&r, nc, 2.0), *w = test_rand(&r, C, 1.0);
    real *out = test_zeros(nc), *rstd = test_zeros(N), *R = test_rand(&r, nc, 1.0);
    real *dx = test_rand(&r, nc, 1.0), *dw = test_rand(&r, C, 1.0);
    real *dx0 = test_copy(dx, nc), *dw0 = test_copy(dw, C);
    RmsCase c = {{rmsnorm_run, out, R, nc}, out, x, rstd, w, N, C};
    rmsnorm_run(&c);
    ops()->rmsnorm_backward(test_tensor(dx, nc), test_tensor(dw, C), test_tensor(R, nc),
                            test_tensor(x, nc), test_tensor(w, C), test_tensor(rstd, N), N, C);
    test_subtract(dx, dx0, nc);
    test_subtract(dw, dw0, C);
    test_fd_check(x, nc, dx, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "rmsnorm dx");
    test_fd_check(w, C, dw, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "rmsnorm dw");

    // With dw unwanted, dx gets the same gradient.
    rmsnorm_run(&c);
    real *dx_only = test_zeros(nc);
    ops()->rmsnorm_backward(test_tensor(dx_only, nc), tensor_none(), test_tensor(R, nc),
                            test_tensor(x, nc), test_tensor(w, C), test_tensor(rstd, N), N, C);
    test_assert_close(dx_only, dx, nc, 1e-13, 1e-15, "rmsnorm dx with dw absent");
    free(x), free(w), free(out), free(rstd), free(R), free(dx), free(dw), free(dx0), free(dw0);
    free(dx_only);
}

static void test_rmsnorm_backward(void **state) {
    (void)state;
    check_rmsnorm_backward(5, 9, 9);
    check_rmsnorm_backward(3, 70, 10); // more columns than one thread's block
}

// ---- matmul ---------------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *out; // (N, O)
    real *x;   // (N, I)
    real *w;   // (O, I)
    size_t N, I, O;
} MatCase;

static void matmul_run(void *self) {
    MatCase *c = self;
    ops()->matmul_forward(test_tensor(c->out, c->N * c->O), test_tensor(c->x, c->N * c->I),
                          test_tensor(c->w, c->O * c->I), c->N, c->I, c->O);
}

static void matmul_grads(MatCase *c, real *dx, real *dw, const real *dout) {
    Tensor tdx = dx ? test_tensor(dx, c->N * c->I) : tensor_none();
    Tensor tdw = dw ? test_tensor(dw, c->O * c->I) : tensor_none();
    ops()->matmul_backward(tdx, tdw, test_tensor((real *)dout, c->N * c->O),
                           test_tensor(c->x, c->N * c->I), test_tensor(c->w, c->O * c->I), c->N,
                           c->I, c->O);
}

static MatCase matmul_case(Rng *r, size_t N, size_t I, size_t O) {
    MatCase c = {{matmul_run, NULL, NULL, N * O},
                 test_zeros(N * O),
                 test_rand(r, N * I, 1.0),
                 test_rand(r, O * I, 1.0),
                 N,
                 I,
                 O};
    c.probe.out = c.out;
    return c;
}

static void matmul_case_free(MatCase *c) { free(c->out), free(c->x), free(c->w); }

static void test_matmul_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 11);
    MatCase c = matmul_case(&r, 5, 7, 6);
    real *ref = test_zeros(c.N * c.O);
    for (size_t n = 0; n < c.N; n++)
        for (size_t o = 0; o < c.O; o++)
            for (size_t i = 0; i < c.I; i++)
                ref[n * c.O + o] += c.x[n * c.I + i] * c.w[o * c.I + i];
    for (size_t i = 0; i < c.N * c.O; i++)
        c.out[i] = NAN;
    matmul_run(&c);
    test_assert_close(c.out, ref, c.N * c.O, REF_RTOL, REF_ATOL, "matmul out");
    free(ref);
    matmul_case_free(&c);
}

static void test_matmul_backward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 12);
    MatCase c = matmul_case(&r, 5, 7, 6);
    size_t nx = c.N * c.I, nw = c.O * c.I;
    real *R = test_rand(&r, c.N * c.O, 1.0);
    real *dx = test_rand(&r, nx, 1.0), *dw = test_rand(&r, nw, 1.0);
    real *dx0 = test_copy(dx, nx), *dw0 = test_copy(dw, nw);
    matmul_grads(&c, dx, dw, R);
    test_subtract(dx, dx0, nx);
    test_subtract(dw, dw0, nw);
    c.probe.R = R;
    test_fd_check(c.x, nx, dx, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "matmul dx");
    test_fd_check(c.w, nw, dw, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "matmul dw");
    free(R), free(dx), free(dw), free(dx0), free(dw0);
    matmul_case_free(&c);
}

static void test_matmul_backward_accumulates(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 13);
    MatCase c = matmul_case(&r, 5, 7, 6);
    size_t nx = c.N * c.I, nw = c.O * c.I;
    real *R = test_rand(&r, c.N * c.O, 1.0);
    real *dx = test_zeros(nx), *dw = test_zeros(nw);
    matmul_grads(&c, dx, dw, R);
    real *dx1 = test_copy(dx, nx), *dw1 = test_copy(dw, nw);
    matmul_grads(&c, dx, dw, R);
    for (size_t i = 0; i < nx; i++)
        dx1[i] *= 2;
    for (size_t i = 0; i < nw; i++)
        dw1[i] *= 2;
    test_assert_close(dx, dx1, nx, 1e-14, 0.0, "matmul dx after two calls");
    test_assert_close(dw, dw1, nw, 1e-14, 0.0, "matmul dw after two calls");
    free(R), free(dx), free(dw), free(dx1), free(dw1);
    matmul_case_free(&c);
}

// An absent gradient is skipped and the other one is still right.
static void test_matmul_backward_absent_grads(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 14);
    MatCase c = matmul_case(&r, 5, 7, 6);
    size_t nx = c.N * c.I, nw = c.O * c.I;
    real *R = test_rand(&r, c.N * c.O, 1.0);
    real *dx = test_zeros(nx), *dw = test_zeros(nw);
    real *dx_only = test_zeros(nx), *dw_only = test_zeros(nw);
    matmul_grads(&c, dx, dw, R);
    matmul_grads(&c, dx_only, NULL, R);
    matmul_grads(&c, NULL, dw_only, R);
    matmul_grads(&c, NULL, NULL, R);
    assert_equal(dx_only, dx, nx, "matmul dx with dw absent");
    assert_equal(dw_only, dw, nw, "matmul dw with dx absent");
    free(R), free(dx), free(dw), free(dx_only), free(dw_only);
    matmul_case_free(&c);
}

// ---- SwiGLU ---------------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *out; // (N, F)
    real *h13; // (N, 2F)
    size_t N, F;
} SwiCase;

static void swiglu_run(void *self) {
    SwiCase *c = self;
    ops()->swiglu_forward(test_tensor(c->out, c->N * c->F),
                          test_tensor(c->h13, c->N * 2 * c->F), c->N, c->F);
}

static void test_swiglu_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 15);
    size_t N = 5, F = 7;
    real *h13 = test_rand(&r, N * 2 * F, 4.0), *out = filled(N * F, NAN);
    real *ref = test_zeros(N * F);
    for (size_t n = 0; n < N; n++)
        for (size_t f = 0; f < F; f++)
            ref[n * F + f] = silu(h13[n * 2 * F + f]) * h13[n * 2 * F + F + f];
    SwiCase c = {{swiglu_run, out, NULL, 0}, out, h13, N, F};
    swiglu_run(&c);
    test_assert_close(out, ref, N * F, REF_RTOL, REF_ATOL, "swiglu out");
    free(h13), free(out), free(ref);
}

static void test_swiglu_backward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 16);
    size_t N = 5, F = 7, nh = N * 2 * F;
    real *h13 = test_rand(&r, nh, 4.0), *out = test_zeros(N * F),
         *R = test_rand(&r, N * F, 1.0);
    real *dh = test_rand(&r, nh, 1.0), *dh0 = test_copy(dh, nh);
    ops()->swiglu_backward(test_tensor(dh, nh), test_tensor(R, N * F), test_tensor(h13, nh), N,
                           F);
    test_subtract(dh, dh0, nh);
    SwiCase c = {{swiglu_run, out, R, N * F}, out, h13, N, F};
    test_fd_check(h13, nh, dh, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "swiglu dh13");
    free(h13), free(out), free(R), free(dh), free(dh0);
}

// ---- grouped experts ------------------------------------------------------------------

// Six experts over 9 routed rows in buffers of 11: experts 0, 2 and 5 get no rows (first,
// middle, last), and the two spare rows check that ops stop at offsets[E].
enum { EX_E = 6, EX_C = 6, EX_F = 5, EX_CAP = 11 };
static const int32_t EX_OFFSETS[EX_E + 1] = {0, 0, 3, 3, 7, 9, 9};
#define EX_M 9
#define EX_WSIZE (3 * EX_F * EX_C) // one expert's w1, w3, w2

typedef struct {
    TestProbe probe;
    real *yp;      // (CAP, C)
    real *h13;     // (CAP, 2F)
    real *act;     // (CAP, F)
    real *xp;      // (CAP, C)
    real *w;       // (E, 3FC)
    int32_t *off;  // (E+1)
    real *x;       // (EX_N, C) the tokens the fused gather reads, or NULL: xp's rows
    int32_t *rows; // (M) permuted row -> token of x
    real *dy;      // (EX_N, C) combine's output gradient (fused backward), or NULL: dyp
    real *gates;   // (EX_N, EX_K)
    int32_t *slot; // (EX_N, EX_K) -> permuted row, or -1
    real *dgates;  // (EX_N, EX_K) the gates' gradient the fused backward adds to, or NULL
} ExpCase;

// The fused dispatch's tokens: 5 tokens for 9 routed rows, token 1 taken by three experts,
// up to EX_K = 3 choices per token, the unused ones dropped (slot -1).
#define EX_N 5
#define EX_K 3
static const int32_t EX_ROWS[EX_M] = {1, 3, 4, 0, 1, 2, 4, 1, 3};

static ExpertRoute exp_route(const ExpCase *c) {
    if (!c->rows) return (ExpertRoute){0};
    ExpertRoute r = {test_tensor(c->x, EX_N * EX_C),
                     test_itensor(c->rows, EX_M),
                     tensor_none(),
                     tensor_none(),
                     tensor_none(),
                     EX_K,
                     tensor_none(),
                     tensor_none()};
    if (c->dy) {
        r.dy = test_tensor(c->dy, EX_N * EX_C);
        r.gates = test_tensor(c->gates, EX_N * EX_K);
        r.slot = test_itensor(c->slot, EX_N * EX_K);
    }
    if (c->dy && c->dgates) {
        r.yp = test_tensor(c->yp, EX_CAP * EX_C);
        r.dgates = test_tensor(c->dgates, EX_N * EX_K);
    }
    return r;
}

static void experts_run(void *self) {
    ExpCase *c = self;
    ops()->experts_forward(
        test_tensor(c->yp, EX_CAP * EX_C), test_tensor(c->h13, EX_CAP * 2 * EX_F),
        test_tensor(c->act, EX_CAP * EX_F), test_tensor(c->xp, EX_CAP * EX_C), exp_route(c),
        test_tensor(c->w, EX_E * EX_WSIZE), test_itensor(c->off, EX_E + 1), EX_E, EX_C, EX_F);
}

static ExpCase experts_case(Rng *r, const real *R) {
    ExpCase c = {{experts_run, NULL, R, EX_M * EX_C},
                 filled(EX_CAP * EX_C, 7.0),
                 filled(EX_CAP * 2 * EX_F, 7.0),
                 filled(EX_CAP * EX_F, 7.0),
                 test_rand(r, EX_CAP * EX_C, 1.0),
                 test_rand(r, EX_E * EX_WSIZE, 0.7),
                 malloc(sizeof(EX_OFFSETS)),
                 NULL,
                 NULL,
                 NULL,
                 NULL,
                 NULL,
                 NULL};
    memcpy(c.off, EX_OFFSETS, sizeof(EX_OFFSETS));
    c.probe.out = c.yp;
    return c;
}

// The same case with the gather fused in: xp holds NaN (the CPU must not read it), the
// input rows come from x (EX_N, C) through EX_ROWS.
static ExpCase experts_case_fused(Rng *r, const real *R) {
    ExpCase c = experts_case(r, R);
    for (size_t i = 0; i < EX_CAP * EX_C; i++)
        c.xp[i] = NAN;
    c.x = test_rand(r, EX_N * EX_C, 1.0);
    c.rows = malloc(sizeof(EX_ROWS));
    memcpy(c.rows, EX_ROWS, sizeof(EX_ROWS));
    return c;
}

// The fused case with combine's backward fused too: dy (EX_N, C), gates and slot (EX_N, K)
// for EX_ROWS (each token's choices in permuted-row order). Returns R (CAP, C), what
// combine's backward would have written into a zeroed dyp: R[m] = gates[n, j] dy[n]; it
// becomes the probe's R, so finite differences check the loss the fused gradient is of.
static real *experts_case_combine(ExpCase *c, Rng *r) {
    c->dy = test_rand(r, EX_N * EX_C, 1.0);
    c->gates = test_rand(r, EX_N * EX_K, 1.0);
    c->slot = malloc(EX_N * EX_K * sizeof *c->slot);
    for (size_t a = 0; a < EX_N * EX_K; a++)
        c->slot[a] = -1;
    real *R = test_zeros(EX_CAP * EX_C);
    for (size_t m = 0; m < EX_M; m++) {
        size_t n = (size_t)EX_ROWS[m], j = 0;
        while (c->slot[n * EX_K + j] >= 0)
            j++;
        c->slot[n * EX_K + j] = (int32_t)m;
        for (size_t k = 0; k < EX_C; k++)
            R[m * EX_C + k] = c->gates[n * EX_K + j] * c->dy[n * EX_C + k];
    }
    c->probe.R = R;
    return R;
}

static void experts_case_free(ExpCase *c) {
    free(c->yp), free(c->h13), free(c->act), free(c->xp), free(c->w), free(c->off);
    free(c->x), free(c->rows), free(c->dy), free(c->gates), free(c->slot), free(c->dgates);
}

// Runs forward, then backward with dout = R into dxp (CAP, C) and dw (E, 3FC) (either
// NULL: absent), with NaN scratch that the op must overwrite before reading.
static void experts_grads(ExpCase *c, const uint8_t *train, real *dxp, real *dw, real *R) {
    experts_run(c);
    real *dh13 = filled(EX_CAP * 2 * EX_F, NAN), *dact = filled(EX_CAP * EX_F, NAN);
    ops()->experts_backward(
        dxp ? test_tensor(dxp, EX_CAP * EX_C) : tensor_none(),
        dw ? test_tensor(dw, EX_E * EX_WSIZE) : tensor_none(), train,
        test_tensor(R, EX_CAP * EX_C), test_tensor(dh13, EX_CAP * 2 * EX_F),
        test_tensor(dact, EX_CAP * EX_F), test_tensor(c->h13, EX_CAP * 2 * EX_F),
        test_tensor(c->act, EX_CAP * EX_F), test_tensor(c->xp, EX_CAP * EX_C), exp_route(c),
        test_tensor(c->w, EX_E * EX_WSIZE), test_itensor(c->off, EX_E + 1), EX_E, EX_C, EX_F);
    free(dh13), free(dact);
}

// Forward against the naive loop; fused: the loop reads x[rows[m]] where it read xp[m].
static void check_experts_forward(int fused) {
    Rng r;
    rng_init(&r, 17);
    ExpCase c = fused ? experts_case_fused(&r, NULL) : experts_case(&r, NULL);
    real *yref = test_zeros(EX_CAP * EX_C), *href = test_zeros(EX_CAP * 2 * EX_F);
    real *aref = test_zeros(EX_CAP * EX_F);
    for (size_t m = 0; m < EX_M; m++) {
        size_t e = 0;
        while ((size_t)EX_OFFSETS[e + 1] <= m)
            e++;
        const real *w1 = c.w + e * EX_WSIZE, *w3 = w1 + EX_F * EX_C, *w2 = w3 + EX_F * EX_C;
        const real *xm = fused ? c.x + (size_t)EX_ROWS[m] * EX_C : c.xp + m * EX_C;
        for (size_t f = 0; f < EX_F; f++) {
            double h1 = 0.0, h3 = 0.0;
            for (size_t k = 0; k < EX_C; k++) {
                h1 += xm[k] * w1[f * EX_C + k];
                h3 += xm[k] * w3[f * EX_C + k];
            }
            href[m * 2 * EX_F + f] = h1;
            href[m * 2 * EX_F + EX_F + f] = h3;
            aref[m * EX_F + f] = silu(h1) * h3;
        }
        for (size_t k = 0; k < EX_C; k++)
            for (size_t f = 0; f < EX_F; f++)
                yref[m * EX_C + k] += aref[m * EX_F + f] * w2[k * EX_F + f];
    }
    experts_run(&c);
    test_assert_close(c.h13, href, EX_M * 2 * EX_F, REF_RTOL, REF_ATOL, "experts h13");
    test_assert_close(c.act, aref, EX_M * EX_F, REF_RTOL, REF_ATOL, "experts act");
    test_assert_close(c.yp, yref, EX_M * EX_C, REF_RTOL, REF_ATOL, "experts yp");
    real *spare = filled(2 * EX_F * (EX_CAP - EX_M), 7.0);
    assert_equal(c.yp + EX_M * EX_C, spare, (EX_CAP - EX_M) * EX_C, "experts yp past M");
    assert_equal(c.h13 + EX_M * 2 * EX_F, spare, (EX_CAP - EX_M) * 2 * EX_F, "h13 past M");
    for (size_t i = 0; fused && i < EX_CAP * EX_C; i++)
        assert_true(isnan(c.xp[i])); // the CPU reads x in place, xp untouched
    free(yref), free(href), free(aref), free(spare);
    experts_case_free(&c);
}

static void test_experts_forward(void **state) {
    (void)state;
    check_experts_forward(0);
}

static void test_experts_forward_fused(void **state) {
    (void)state;
    check_experts_forward(1);
}

// Finite-difference check of dw for every expert whose train flag is set (train NULL:
// all); the others must keep their starting gradient bit for bit.
static void check_expert_dw(ExpCase *c, const uint8_t *train, const real *dw, const real *dw0,
                            Rng *r) {
    real *delta = test_copy(dw, EX_E * EX_WSIZE);
    test_subtract(delta, dw0, EX_E * EX_WSIZE);
    for (size_t e = 0; e < EX_E; e++) {
        size_t o = e * EX_WSIZE;
        if (!train || train[e])
            test_fd_check(c->w + o, EX_WSIZE, delta + o, test_probe_loss, c, 0, r, FD_RTOL, FD_ATOL,
                          "experts dw");
        else
            assert_equal(dw + o, dw0 + o, EX_WSIZE, "frozen expert dw");
    }
    free(delta);
}

// dxp over the routed rows against finite differences; the spare rows stay untouched.
static void check_expert_dxp(ExpCase *c, real *dxp, const real *dxp0, Rng *r) {
    test_subtract(dxp, dxp0, EX_CAP * EX_C);
    test_fd_check(c->xp, EX_M * EX_C, dxp, test_probe_loss, c, 0, r, FD_RTOL, FD_ATOL,
                  "experts dxp");
    real *zeros = test_zeros((EX_CAP - EX_M) * EX_C);
    assert_equal(dxp + EX_M * EX_C, zeros, (EX_CAP - EX_M) * EX_C, "experts dxp past M");
    free(zeros);
}

static void check_experts_backward(const uint8_t *train, uint64_t seed) {
    Rng r;
    rng_init(&r, seed);
    real *R = test_rand(&r, EX_CAP * EX_C, 1.0);
    ExpCase c = experts_case(&r, R);
    real *dxp = test_rand(&r, EX_CAP * EX_C, 1.0), *dw = test_rand(&r, EX_E * EX_WSIZE, 1.0);
    real *dxp0 = test_copy(dxp, EX_CAP * EX_C), *dw0 = test_copy(dw, EX_E * EX_WSIZE);
    experts_grads(&c, train, dxp, dw, R);
    check_expert_dw(&c, train, dw, dw0, &r);
    check_expert_dxp(&c, dxp, dxp0, &r);
    free(R), free(dxp), free(dw), free(dxp0), free(dw0);
    experts_case_free(&c);
}

static void test_experts_backward(void **state) {
    (void)state;
    check_experts_backward(NULL, 18);
}

// The dispatch fused in (x[rows] and gates times dy, dyp NaN: not read): dw (expert 3
// frozen) against finite differences, and the token gradient, dxp summed per token by a
// loop here, against finite differences in x.
static void test_experts_backward_fused(void **state) {
    (void)state;
    const uint8_t train[EX_E] = {1, 1, 1, 0, 1, 1};
    Rng r;
    rng_init(&r, 21);
    ExpCase c = experts_case_fused(&r, NULL);
    real *R = experts_case_combine(&c, &r), *dyp = filled(EX_CAP * EX_C, NAN);
    real *dxp = test_zeros(EX_CAP * EX_C), *dw = test_rand(&r, EX_E * EX_WSIZE, 1.0);
    real *dw0 = test_copy(dw, EX_E * EX_WSIZE), *dx = test_zeros(EX_N * EX_C);
    experts_grads(&c, train, dxp, dw, dyp);
    check_expert_dw(&c, train, dw, dw0, &r);
    for (size_t m = 0; m < EX_M; m++)
        for (size_t k = 0; k < EX_C; k++)
            dx[(size_t)EX_ROWS[m] * EX_C + k] += dxp[m * EX_C + k];
    test_fd_check(c.x, EX_N * EX_C, dx, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL,
                  "fused experts dx");
    free(R), free(dyp), free(dxp), free(dw), free(dw0), free(dx);
    experts_case_free(&c);
}

// Fused and unfused give the same bits when xp holds x[rows] and dyp what combine's
// backward writes: the products see the same operands. Gather alone fused, then the
// combine too; thread counts 1 and 4 take both ways of sharing out 6 experts (by expert,
// and one expert after another with every thread on its products and its copies).
static void test_experts_fused_bits(void **state) {
    (void)state;
    int threads = omp_get_max_threads();
    for (int t = 1; t <= 4; t += 3)
        for (int with_dy = 0; with_dy < 2; with_dy++) {
            omp_set_num_threads(t);
            Rng r;
            rng_init(&r, 22);
            ExpCase f = experts_case_fused(&r, NULL), u = experts_case(&r, NULL);
            real *R =
                with_dy ? experts_case_combine(&f, &r) : test_rand(&r, EX_CAP * EX_C, 1.0);
            memcpy(u.w, f.w, EX_E * EX_WSIZE * sizeof(real));
            for (size_t m = 0; m < EX_M; m++)
                memcpy(u.xp + m * EX_C, f.x + (size_t)EX_ROWS[m] * EX_C, EX_C * sizeof(real));
            real *dxp[2] = {test_zeros(EX_CAP * EX_C), test_zeros(EX_CAP * EX_C)};
            real *dw[2] = {test_zeros(EX_E * EX_WSIZE), test_zeros(EX_E * EX_WSIZE)};
            real *nan = filled(EX_CAP * EX_C, NAN);
            experts_grads(&f, NULL, dxp[0], dw[0], with_dy ? nan : R);
            experts_grads(&u, NULL, dxp[1], dw[1], R);
            assert_equal(f.yp, u.yp, EX_M * EX_C, "fused experts yp bits");
            assert_equal(dxp[0], dxp[1], EX_CAP * EX_C, "fused experts dxp bits");
            assert_equal(dw[0], dw[1], EX_E * EX_WSIZE, "fused experts dw bits");
            for (int i = 0; i < 2; i++)
                free(dxp[i]), free(dw[i]);
            free(R), free(nan);
            experts_case_free(&f), experts_case_free(&u);
        }
    omp_set_num_threads(threads);
}

// The gates' gradient taken by the fused experts (route.dgates): dgates[n, j] +=
// dot(dy[n], yp[slot[n, j]]), against that sum in double here and bit for bit against
// combine's backward, whether the experts run their products (all training, threads 1
// and 4) or none (every expert frozen, no input gradient).
static void test_experts_fused_gate_grads(void **state) {
    (void)state;
    int threads = omp_get_max_threads();
    const uint8_t none[EX_E] = {0};
    for (int t = 1; t <= 4; t += 3)
        for (int frozen = 0; frozen < 2; frozen++) {
            omp_set_num_threads(t);
            Rng r;
            rng_init(&r, 23);
            ExpCase c = experts_case_fused(&r, NULL);
            real *R = experts_case_combine(&c, &r), *nan = filled(EX_CAP * EX_C, NAN);
            c.dgates = test_rand(&r, EX_N * EX_K, 1.0);
            real *start = test_copy(c.dgates, EX_N * EX_K);
            real *dxp = test_zeros(EX_CAP * EX_C), *dw = test_zeros(EX_E * EX_WSIZE);
            experts_grads(&c, frozen ? none : NULL, frozen ? NULL : dxp, dw, nan);
            real *want = test_copy(start, EX_N * EX_K), *comb = test_copy(start, EX_N * EX_K);
            for (size_t a = 0; a < EX_N * EX_K; a++) {
                if (c.slot[a] < 0) continue;
                double dot = 0.0;
                for (size_t k = 0; k < EX_C; k++)
                    dot += (double)c.dy[(a / EX_K) * EX_C + k] * c.yp[c.slot[a] * EX_C + k];
                want[a] += dot;
            }
            test_assert_close(c.dgates, want, EX_N * EX_K, REF_RTOL, REF_ATOL,
                              "fused experts dgates");
            ops()->combine_backward(
                tensor_none(), test_tensor(comb, EX_N * EX_K), test_tensor(c.dy, EX_N * EX_C),
                test_tensor(c.yp, EX_CAP * EX_C), test_tensor(c.gates, EX_N * EX_K),
                test_itensor(c.slot, EX_N * EX_K), EX_N, EX_K, EX_C);
            assert_equal(c.dgates, comb, EX_N * EX_K, "fused dgates bits = combine's");
            free(R), free(nan), free(start), free(dxp), free(dw), free(want), free(comb);
            experts_case_free(&c);
        }
    omp_set_num_threads(threads);
}

// Expert 3 (rows 3..6) is frozen: no weight gradient, but its rows' input gradient flows.
static void test_experts_backward_frozen_expert(void **state) {
    (void)state;
    const uint8_t train[EX_E] = {1, 1, 1, 0, 1, 1};
    check_experts_backward(train, 19);
}

static void test_experts_backward_absent_dw(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 20);
    real *R = test_rand(&r, EX_CAP * EX_C, 1.0);
    ExpCase c = experts_case(&r, R);
    real *dxp = test_rand(&r, EX_CAP * EX_C, 1.0), *dxp0 = test_copy(dxp, EX_CAP * EX_C);
    experts_grads(&c, NULL, dxp, NULL, R);
    check_expert_dxp(&c, dxp, dxp0, &r);

    // Nothing wanted at all (a frozen expert layer whose input needs no gradient).
    const uint8_t none[EX_E] = {0};
    real *dw = test_rand(&r, EX_E * EX_WSIZE, 1.0), *dw0 = test_copy(dw, EX_E * EX_WSIZE);
    experts_grads(&c, none, NULL, dw, R);
    assert_equal(dw, dw0, EX_E * EX_WSIZE, "experts dw with every expert frozen");
    free(R), free(dxp), free(dxp0), free(dw), free(dw0);
    experts_case_free(&c);
}

// ---- cross-entropy --------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real loss;    // (1)
    real *lse;    // (N)
    real *logits; // (N, V)
    int32_t *tgt; // (N)
    size_t N, V;
} CeCase;

static void ce_run(void *self) {
    CeCase *c = self;
    ops()->crossentropy_forward(test_tensor(&c->loss, 1), test_tensor(c->lse, c->N),
                                test_tensor(c->logits, c->N * c->V), test_itensor(c->tgt, c->N),
                                c->N, c->V);
}

static int32_t CE_TARGETS[] = {0, 6, 3, 3, 1};
enum { CE_N = 5, CE_V = 7 };

static void test_crossentropy_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 21);
    real *logits = test_rand(&r, CE_N * CE_V, 3.0), *lse = filled(CE_N, NAN);
    real lse_ref[CE_N];
    double loss_ref = 0.0;
    for (size_t n = 0; n < CE_N; n++) {
        double s = 0.0;
        for (size_t v = 0; v < CE_V; v++)
            s += exp(logits[n * CE_V + v]);
        lse_ref[n] = log(s);
        loss_ref += (lse_ref[n] - logits[n * CE_V + (size_t)CE_TARGETS[n]]) / CE_N;
    }
    CeCase c = {{ce_run, NULL, NULL, 0}, NAN, lse, logits, CE_TARGETS, CE_N, CE_V};
    ce_run(&c);
    test_assert_close(lse, lse_ref, CE_N, REF_RTOL, REF_ATOL, "crossentropy lse");
    real loss = (real)loss_ref;
    test_assert_close(&c.loss, &loss, 1, REF_RTOL, REF_ATOL, "crossentropy loss");
    free(logits), free(lse);
}

// Logits near 1000 overflow a plain exp; the loss is shift invariant and lse shifts along.
static void test_crossentropy_forward_large_logits(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 22);
    real *logits = test_rand(&r, CE_N * CE_V, 3.0);
    CeCase c = {{ce_run, NULL, NULL, 0}, NAN, test_zeros(CE_N), logits, CE_TARGETS, CE_N, CE_V};
    ce_run(&c);
    real loss = c.loss, *lse = test_copy(c.lse, CE_N);
    for (size_t i = 0; i < CE_N * CE_V; i++)
        logits[i] += 1000.0;
    ce_run(&c);
    for (size_t n = 0; n < CE_N; n++)
        lse[n] += 1000.0;
    test_assert_finite(&c.loss, 1, "crossentropy loss of shifted logits");
    test_assert_finite(c.lse, CE_N, "crossentropy lse of shifted logits");
    test_assert_close(&c.loss, &loss, 1, 1e-10, 1e-12, "crossentropy loss of shifted logits");
    test_assert_close(c.lse, lse, CE_N, 1e-12, 0.0, "crossentropy lse of shifted logits");
    free(logits), free(c.lse), free(lse);
}

static void test_crossentropy_backward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 23);
    size_t n = CE_N * CE_V;
    real dloss = 0.7;
    real *logits = test_rand(&r, n, 3.0), *lse = test_zeros(CE_N);
    real *dl = test_rand(&r, n, 1.0), *dl0 = test_copy(dl, n);
    CeCase c = {{ce_run, NULL, &dloss, 1}, NAN, lse, logits, CE_TARGETS, CE_N, CE_V};
    c.probe.out = &c.loss;
    ce_run(&c);
    ops()->crossentropy_backward(test_tensor(dl, n), test_tensor(logits, n),
                                 test_tensor(lse, CE_N), test_itensor(CE_TARGETS, CE_N), dloss,
                                 CE_N, CE_V);
    test_subtract(dl, dl0, n);
    test_fd_check(logits, n, dl, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL,
                  "crossentropy dlogits");
    free(logits), free(lse), free(dl), free(dl0);
}

// ---- RoPE -----------------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *x; // (B*T, (H + 2KV) * D) input
    real *y; // same shape: x rotated
    size_t B, T, H, KV, D;
    double theta;
} RopeCase;

static size_t rope_numel(const RopeCase *c) { return c->B * c->T * (c->H + 2 * c->KV) * c->D; }

static void rope_run(void *self) {
    RopeCase *c = self;
    memcpy(c->y, c->x, rope_numel(c) * sizeof(real));
    ops()->rope_forward(test_tensor(c->y, rope_numel(c)), c->B, c->T, c->H, c->KV, c->D,
                        c->theta);
}

static void check_rope_forward(double theta, uint64_t seed) {
    Rng r;
    rng_init(&r, seed);
    RopeCase c = {{rope_run, NULL, NULL, 0}, NULL, NULL, 2, 5, 4, 2, 6, theta};
    size_t n = rope_numel(&c), width = (c.H + 2 * c.KV) * c.D, half = c.D / 2;
    c.x = test_rand(&r, n, 1.0);
    c.y = test_zeros(n);
    real *ref = test_copy(c.x, n); // value heads pass through
    for (size_t b = 0; b < c.B; b++)
        for (size_t t = 0; t < c.T; t++)
            for (size_t head = 0; head < c.H + c.KV; head++)
                for (size_t i = 0; i < half; i++) {
                    size_t at = (b * c.T + t) * width + head * c.D + i;
                    double angle = (double)t / pow(theta, (double)(2 * i) / (double)c.D);
                    double x1 = c.x[at], x2 = c.x[at + half];
                    ref[at] = x1 * cos(angle) - x2 * sin(angle);
                    ref[at + half] = x2 * cos(angle) + x1 * sin(angle);
                }
    rope_run(&c);
    test_assert_close(c.y, ref, n, 1e-12, 1e-14, "rope out");
    free(c.x), free(c.y), free(ref);
}

static void test_rope_forward(void **state) {
    (void)state;
    check_rope_forward(10000.0, 24);
    check_rope_forward(3.0, 25); // large angles in every frequency
}

static void test_rope_backward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 26);
    RopeCase c = {{rope_run, NULL, NULL, 0}, NULL, NULL, 2, 5, 4, 2, 6, 3.0};
    size_t n = rope_numel(&c);
    c.x = test_rand(&r, n, 1.0);
    c.y = test_zeros(n);
    real *R = test_rand(&r, n, 1.0), *dx = test_copy(R, n);
    c.probe = (TestProbe){rope_run, c.y, R, n};
    ops()->rope_backward(test_tensor(dx, n), c.B, c.T, c.H, c.KV, c.D, c.theta);
    test_fd_check(c.x, n, dx, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "rope dqkv");
    free(c.x), free(c.y), free(R), free(dx);
}

// ---- attention ------------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *out; // (B*T, H*D)
    real *att; // (B, H, T): the logsumexp of each query's scaled causal scores
    real *qkv; // (B*T, (H + 2KV) * D)
    size_t B, T, H, KV, D;
} AttCase;

static size_t att_qkv_numel(const AttCase *c) {
    return c->B * c->T * (c->H + 2 * c->KV) * c->D;
}
static size_t att_out_numel(const AttCase *c) { return c->B * c->T * c->H * c->D; }
static size_t att_att_numel(const AttCase *c) { return c->B * c->H * c->T; }

static void attention_run(void *self) {
    AttCase *c = self;
    ops()->attention_forward(
        test_tensor(c->out, att_out_numel(c)), test_tensor(c->att, att_att_numel(c)),
        test_tensor(c->qkv, att_qkv_numel(c)), c->B, c->T, c->H, c->KV, c->D);
}

// Grouped (H=4 over KV=2), plain multi-head (KV = H) and multi-query (KV = 1) layouts.
static const size_t ATT_SHAPES[][5] = {{2, 5, 4, 2, 4}, {1, 6, 3, 3, 5}, {2, 4, 4, 1, 3}};
#define ATT_NSHAPES (sizeof(ATT_SHAPES) / sizeof(ATT_SHAPES[0]))

static AttCase attention_case(Rng *r, const size_t shape[5]) {
    AttCase c = {{attention_run, NULL, NULL, 0},
                 NULL,
                 NULL,
                 NULL,
                 shape[0],
                 shape[1],
                 shape[2],
                 shape[3],
                 shape[4]};
    c.out = filled(att_out_numel(&c), NAN);
    c.att = filled(att_att_numel(&c), NAN);
    c.qkv = test_rand(r, att_qkv_numel(&c), 1.0);
    c.probe.out = c.out;
    c.probe.n = att_out_numel(&c);
    return c;
}

static void attention_case_free(AttCase *c) { free(c->out), free(c->att), free(c->qkv); }

// Per query: scores against keys 0..t of its KV head, explicit softmax, weighted values;
// att gets the logsumexp of the scores (what the fused backward recomputes from).
static void attention_reference(const AttCase *c, real *out, real *att) {
    real *a = malloc(c->T * sizeof(real)); // (T): one query's probabilities
    size_t width = (c->H + 2 * c->KV) * c->D, T = c->T, D = c->D;
    double *p = malloc(T * sizeof(double));
    for (size_t b = 0; b < c->B; b++)
        for (size_t h = 0; h < c->H; h++) {
            size_t kvh = h * c->KV / c->H; // = h / (H / KV)
            for (size_t t = 0; t < T; t++) {
                const real *q = c->qkv + (b * T + t) * width + h * D;
                double mx = -INFINITY, sum = 0.0;
                for (size_t u = 0; u <= t; u++) {
                    const real *k = c->qkv + (b * T + u) * width + (c->H + kvh) * D;
                    double s = 0.0;
                    for (size_t d = 0; d < D; d++)
                        s += q[d] * k[d];
                    p[u] = s / sqrt((double)D);
                    mx = fmax(mx, p[u]);
                }
                for (size_t u = 0; u <= t; u++)
                    sum += (p[u] = exp(p[u] - mx));
                att[(b * c->H + h) * T + t] = mx + log(sum);
                for (size_t u = 0; u <= t; u++)
                    a[u] = p[u] / sum;
                real *o = out + (b * T + t) * c->H * D + h * D;
                for (size_t d = 0; d < D; d++) {
                    o[d] = 0.0;
                    for (size_t u = 0; u <= t; u++)
                        o[d] +=
                            a[u] * c->qkv[(b * T + u) * width + (c->H + c->KV + kvh) * D + d];
                }
            }
        }
    free(p);
    free(a);
}

static void test_attention_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 27);
    for (size_t s = 0; s < ATT_NSHAPES; s++) {
        AttCase c = attention_case(&r, ATT_SHAPES[s]);
        real *out = test_zeros(att_out_numel(&c)), *att = test_zeros(att_att_numel(&c));
        attention_reference(&c, out, att);
        attention_run(&c);
        test_assert_close(c.att, att, att_att_numel(&c), REF_RTOL, REF_ATOL, "attention att");
        test_assert_close(c.out, out, att_out_numel(&c), REF_RTOL, REF_ATOL, "attention out");
        free(out), free(att);
        attention_case_free(&c);
    }
}

// Scores in the thousands overflow a plain exp: the softmax must subtract the row maximum.
static void test_attention_forward_large_scores(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 30);
    AttCase c = attention_case(&r, ATT_SHAPES[0]);
    for (size_t i = 0; i < att_qkv_numel(&c); i++)
        c.qkv[i] *= 60.0;
    real *out = test_zeros(att_out_numel(&c)), *att = test_zeros(att_att_numel(&c));
    attention_reference(&c, out, att);
    attention_run(&c);
    test_assert_finite(c.att, att_att_numel(&c), "attention att at large scores");
    test_assert_finite(c.out, att_out_numel(&c), "attention out at large scores");
    test_assert_close(c.att, att, att_att_numel(&c), 1e-9, REF_ATOL, "attention att");
    test_assert_close(c.out, out, att_out_numel(&c), 1e-9, REF_ATOL, "attention out");
    free(out), free(att);
    attention_case_free(&c);
}

// Runs forward, then backward with dout = R into dqkv; the CPU plans no datt scratch.
static void attention_grads(AttCase *c, real *dqkv, real *R) {
    attention_run(c);
    ops()->attention_backward(
        test_tensor(dqkv, att_qkv_numel(c)), tensor_none(), test_tensor(R, att_out_numel(c)),
        test_tensor(c->out, att_out_numel(c)), test_tensor(c->qkv, att_qkv_numel(c)),
        test_tensor(c->att, att_att_numel(c)), c->B, c->T, c->H, c->KV, c->D);
}

static void test_attention_backward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 28);
    for (size_t s = 0; s < ATT_NSHAPES; s++) {
        AttCase c = attention_case(&r, ATT_SHAPES[s]);
        size_t n = att_qkv_numel(&c);
        real *R = test_rand(&r, att_out_numel(&c), 1.0);
        real *dqkv = test_rand(&r, n, 1.0), *dqkv0 = test_copy(dqkv, n);
        c.probe.R = R;
        attention_grads(&c, dqkv, R);
        test_subtract(dqkv, dqkv0, n);
        test_fd_check(c.qkv, n, dqkv, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL,
                      "attention dqkv");
        free(R), free(dqkv), free(dqkv0);
        attention_case_free(&c);
    }
}

static void test_attention_backward_accumulates(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 29);
    AttCase c = attention_case(&r, ATT_SHAPES[0]);
    size_t n = att_qkv_numel(&c);
    real *R = test_rand(&r, att_out_numel(&c), 1.0), *dqkv = test_zeros(n);
    attention_grads(&c, dqkv, R);
    real *once = test_copy(dqkv, n);
    attention_grads(&c, dqkv, R);
    for (size_t i = 0; i < n; i++)
        once[i] *= 2;
    test_assert_close(dqkv, once, n, 1e-14, 0.0, "attention dqkv after two calls");
    attention_grads(&c, NULL, R); // no gradient wanted: nothing to do, nothing to crash
    free(R), free(dqkv), free(once);
    attention_case_free(&c);
}

// T = 300 spans five blocks of 64 queries and two blocks of 256 keys: the online softmax
// folds a second key block into rows that already hold a partial sum, and query blocks past
// the first see keys of earlier blocks. Forward against the explicit reference, backward by
// finite differences on 300 random coordinates; the loss sums 2400 outputs, so its
// rounding over the step h = 1e-6 is about 1e-16 * 20 / 1e-6 = 2e-9: atol 2e-8.
static void test_attention_across_blocks(void **state) {
    (void)state;
    static const size_t shape[5] = {1, 300, 2, 1, 4};
    Rng r;
    rng_init(&r, 31);
    AttCase c = attention_case(&r, shape);
    real *out = test_zeros(att_out_numel(&c)), *att = test_zeros(att_att_numel(&c));
    attention_reference(&c, out, att);
    attention_run(&c);
    test_assert_close(c.att, att, att_att_numel(&c), REF_RTOL, REF_ATOL, "long attention lse");
    test_assert_close(c.out, out, att_out_numel(&c), REF_RTOL, REF_ATOL, "long attention out");
    size_t n = att_qkv_numel(&c);
    real *R = test_rand(&r, att_out_numel(&c), 1.0), *dqkv = test_zeros(n);
    c.probe.R = R;
    attention_grads(&c, dqkv, R);
    test_fd_check(c.qkv, n, dqkv, test_probe_loss, &c, 300, &r, FD_RTOL, 2e-8,
                  "long attention dqkv");
    free(out), free(att), free(R), free(dqkv);
    attention_case_free(&c);
}

// Each tile variant this CPU runs (attention_tiles.h; x86-64-v4 runs all three), at head
// width 40 (a vector and a part in every variant) and 70 positions (a second query block,
// short of a whole tile): forward against the explicit reference, backward by finite
// differences on 300 coordinates. atol 1e-7: with this shape the loss's rounding over the
// step h = 1e-6 reaches 4e-8 (the same for the BLAS-based attention this replaced; with
// h = 1e-5 every difference falls below 2e-8, with 1e-7 they grow to 2e-7: rounding).
static void test_attention_tile_variants(void **state) {
    (void)state;
    static const size_t shape[5] = {1, 70, 2, 1, 40};
    static const char *const widest_first[] = {"avx512", "avx2", "base"};
    const char *in_use = cpu_attention_tiles(NULL);
    size_t v = 0;
    while (strcmp(widest_first[v], in_use))
        v++;
    for (; v < 3; v++) {
        cpu_attention_tiles(widest_first[v]);
        Rng r;
        rng_init(&r, 32);
        AttCase c = attention_case(&r, shape);
        real *out = test_zeros(att_out_numel(&c)), *att = test_zeros(att_att_numel(&c));
        attention_reference(&c, out, att);
        attention_run(&c);
        test_assert_close(c.att, att, att_att_numel(&c), REF_RTOL, REF_ATOL, widest_first[v]);
        test_assert_close(c.out, out, att_out_numel(&c), REF_RTOL, REF_ATOL, widest_first[v]);
        size_t n = att_qkv_numel(&c);
        real *R = test_rand(&r, att_out_numel(&c), 1.0), *dqkv = test_zeros(n);
        c.probe.R = R;
        attention_grads(&c, dqkv, R);
        test_fd_check(c.qkv, n, dqkv, test_probe_loss, &c, 300, &r, FD_RTOL, 1e-7,
                      widest_first[v]);
        free(out), free(att), free(R), free(dqkv);
        attention_case_free(&c);
    }
    cpu_attention_tiles(in_use);
}

// row_exp (exp_math.h) against libm's exp: within 4e-16 relative (under 2 ulp) over
// exp's normal range and densely around 0; its limits; row_sum_exp against a libm sum
// over 150 values (three chunks, the last partial).
static void test_row_exp(void **state) {
    (void)state;
    double worst = 0.0;
    for (double x = -708.7; x <= 709.0; x += 0.000713)
        worst = fmax(worst, fabs(row_exp(x) - exp(x)) / exp(x));
    for (double x = -1.0; x <= 1.0; x += 1e-5)
        worst = fmax(worst, fabs(row_exp(x) - exp(x)) / exp(x));
    if (worst > 4e-16) fail_msg("row_exp: relative error %.3g against exp", worst);
    assert_true(row_exp(0.0) == 1.0);
    assert_true(row_exp(-800.0) == 0.0 && row_exp(-INFINITY) == 0.0);
    assert_true(isinf(row_exp(INFINITY)) && isnan(row_exp(NAN)));
    Rng r;
    rng_init(&r, 33);
    real *x = test_rand(&r, 150, 30.0);
    double want = 0.0;
    for (size_t i = 0; i < 150; i++)
        want += exp((double)x[i] - 7.0);
    test_assert_close((real[]){(real)row_sum_exp(x, 150, 7.0)}, (real[]){(real)want}, 1, 1e-15,
                      0.0, "row_sum_exp");
    free(x);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_add_forward),
    cmocka_unit_test(test_add_backward),
    cmocka_unit_test(test_mul_forward),
    cmocka_unit_test(test_mul_backward),
    cmocka_unit_test(test_embedding_forward),
    cmocka_unit_test(test_embedding_backward),
    cmocka_unit_test(test_rmsnorm_forward),
    cmocka_unit_test(test_rmsnorm_backward),
    cmocka_unit_test(test_matmul_forward),
    cmocka_unit_test(test_matmul_backward),
    cmocka_unit_test(test_matmul_backward_accumulates),
    cmocka_unit_test(test_matmul_backward_absent_grads),
    cmocka_unit_test(test_swiglu_forward),
    cmocka_unit_test(test_swiglu_backward),
    cmocka_unit_test(test_experts_forward),
    cmocka_unit_test(test_experts_forward_fused),
    cmocka_unit_test(test_experts_backward),
    cmocka_unit_test(test_experts_backward_fused),
    cmocka_unit_test(test_experts_fused_bits),
    cmocka_unit_test(test_experts_fused_gate_grads),
    cmocka_unit_test(test_experts_backward_frozen_expert),
    cmocka_unit_test(test_experts_backward_absent_dw),
    cmocka_unit_test(test_crossentropy_forward),
    cmocka_unit_test(test_crossentropy_forward_large_logits),
    cmocka_unit_test(test_crossentropy_backward),
    cmocka_unit_test(test_rope_forward),
    cmocka_unit_test(test_rope_backward),
    cmocka_unit_test(test_attention_forward),
    cmocka_unit_test(test_attention_forward_large_scores),
    cmocka_unit_test(test_attention_backward),
    cmocka_unit_test(test_attention_backward_accumulates),
    cmocka_unit_test(test_attention_across_blocks),
    cmocka_unit_test(test_attention_tile_variants),
    cmocka_unit_test(test_row_exp),
};

TEST_MAIN(tests)
