#include "testlib.h"

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int testlib_main(int argc, char **argv, const struct CMUnitTest *tests, size_t n,
                 const char *group) {
    if (argc > 1 && strcmp(argv[1], "--list") == 0) {
        for (size_t i = 0; i < n; i++) printf("%s\n", tests[i].name);
        return 0;
    }
    if (argc > 2 && strcmp(argv[1], "--only") == 0) cmocka_set_test_filter(argv[2]);
    return _cmocka_run_group_tests(group, tests, n, NULL, NULL);
}

real *test_rand(Rng *r, size_t n, double scale) {
    real *x = malloc((n ? n : 1) * sizeof(real));
    for (size_t i = 0; i < n; i++) x[i] = (real)((2.0 * rng_uniform(r) - 1.0) * scale);
    return x;
}

real *test_zeros(size_t n) { return calloc(n ? n : 1, sizeof(real)); }

real *test_copy(const real *x, size_t n) {
    real *y = malloc((n ? n : 1) * sizeof(real));
    memcpy(y, x, n * sizeof(real));
    return y;
}

Tensor test_tensor(void *data, size_t n) {
    Tensor t = {data, DTYPE_REAL, DEVICE_CPU, n};
    return t;
}

Tensor test_itensor(int32_t *data, size_t n) {
    Tensor t = {data, DTYPE_I32, DEVICE_CPU, n};
    return t;
}

void test_rand_ints(Rng *r, int32_t *x, size_t n, uint64_t below) {
    for (size_t i = 0; i < n; i++)
        x[i] = (int32_t)(rng_next(r) % below);
}

// Non-finite values are never close (an overflow must not pass as "within rtol * inf").
static int close_enough(double a, double b, double rtol, double atol) {
    if (!isfinite(a) || !isfinite(b)) return 0;
    double scale = fabs(a) > fabs(b) ? fabs(a) : fabs(b);
    return fabs(a - b) <= atol + rtol * scale;
}

void test_assert_close(const real *a, const real *b, size_t n, double rtol, double atol,
                       const char *what) {
    for (size_t i = 0; i < n; i++) {
        if (!close_enough(a[i], b[i], rtol, atol))
            fail_msg("%s: element %zu differs: %.12g vs %.12g (rtol %g, atol %g)", what, i,
                     (double)a[i], (double)b[i], rtol, atol);
    }
}

void test_assert_finite(const real *x, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite((double)x[i])) fail_msg("%s: element %zu is %g", what, i, (double)x[i]);
}

void test_fd_check(real *x, size_t n, const real *analytic, test_loss_fn f, void *ctx,
                   size_t n_check, Rng *r, double rtol, double atol, const char *what) {
    size_t count = (n_check == 0 || n_check > n) ? n : n_check;
    for (size_t c = 0; c < count; c++) {
        size_t i = (count == n) ? c : (size_t)(rng_next(r) % n);
        real saved = x[i];
        double h = 1e-6 * (fabs((double)saved) > 1.0 ? fabs((double)saved) : 1.0);
        x[i] = saved + (real)h;
        double up = f(ctx);
        x[i] = saved - (real)h;
        double down = f(ctx);
        x[i] = saved;
        double numeric = (up - down) / (2.0 * h);
        if (!close_enough(numeric, analytic[i], rtol, atol))
            fail_msg("%s: gradient entry %zu: analytic %.12g, finite difference %.12g", what,
                     i, (double)analytic[i], numeric);
    }
}

double test_dot(const real *a, const real *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

double test_probe_loss(void *ctx) {
    TestProbe *p = ctx;
    p->forward(ctx);
    return test_dot(p->out, p->R, p->n);
}

void test_subtract(real *a, const real *b, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] -= b[i];
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

int test_remove_tree(const char *dir) {
    return nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}
