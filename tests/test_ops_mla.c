// test_ops_mla.c: multi-head latent attention's ops on the CPU backend in double precision
// (kernels/cpu/mla.c, and attention.c's split-width attention).
//
// Forwards against naive loops written here from the ops.def comments and from the YaRN
// definition (Peng et al. 2023 as transformers' _compute_yarn_parameters states it: the
// correction range, the linear ramp, the blend of interpolated and extrapolated
// frequencies, get_mscale); backwards against central finite differences of
// loss = out . R (so dout = R), with gradient buffers that start random (the accumulate
// rule). The decode op is checked against expanding the keys and values from the latent
// cache through kv_b_proj, the non-absorbed form.
#include "testlib.h"
#include "../kernels/rope_math.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FD_RTOL 1e-6
#define FD_ATOL 1e-9
#define REF_RTOL 1e-11
#define REF_ATOL 1e-13

static const Backend *ops(void) { return backend_cpu(); }

// ---- RoPE frequencies, written from the definition --------------------------------------

static const RopeSpec PLAIN = {10000.0, 0, 1, 4096, 32, 1, 1, 0};
// factor 40 over an original context of 64: the ramp falls inside the 4 pairs of Dr = 8.
static const RopeSpec YARN = {10000.0, 1, 40.0, 64, 32, 1, 0.707, 0.707};
static const RopeSpec YARN_ONE_MSCALE = {500.0, 1, 4.0, 16, 8, 2, 1, 0};

static double ref_mscale(double factor, double m) {
    return factor <= 1 ? 1.0 : 0.1 * m * log(factor) + 1.0;
}

// inv_freq[i] for i < Dr/2 and the cos/sin factor.
static double ref_freqs(const RopeSpec *r, size_t Dr, double *inv) {
    double pi = acos(-1.0);
    double lo = Dr * log(r->orig_max_pos / (r->beta_fast * 2 * pi)) / (2 * log(r->theta));
    double hi = Dr * log(r->orig_max_pos / (r->beta_slow * 2 * pi)) / (2 * log(r->theta));
    lo = fmax(floor(lo), 0.0);
    hi = fmin(ceil(hi), (double)Dr - 1);
    if (lo == hi) hi += 0.001;
    for (size_t i = 0; i < Dr / 2; i++) {
        double base = 1.0 / pow(r->theta, (double)(2 * i) / (double)Dr);
        if (!r->yarn) {
            inv[i] = base;
            continue;
        }
        double ramp = fmin(fmax(((double)i - lo) / (hi - lo), 0.0), 1.0);
        double extrapolate = 1.0 - ramp;
        inv[i] = base / r->factor * ramp + base * extrapolate;
    }
    if (!r->yarn) return 1.0;
    if (r->mscale != 0 && r->mscale_all_dim != 0)
        return ref_mscale(r->factor, r->mscale) / ref_mscale(r->factor, r->mscale_all_dim);
    return ref_mscale(r->factor, 1.0);
}

// y (Dr) = m R(t inv) x, rotate-half.
static void ref_rope(double *y, const real *x, size_t t, size_t Dr, const RopeSpec *r) {
    double inv[64], m = ref_freqs(r, Dr, inv);
    size_t half = Dr / 2;
    for (size_t i = 0; i < half; i++) {
        double a = (double)t * inv[i];
        y[i] = m * (x[i] * cos(a) - x[i + half] * sin(a));
        y[i + half] = m * (x[i + half] * cos(a) + x[i] * sin(a));
    }
}

// The ramp really blends: pairs below lo extrapolate (theta^(-2i/D)), pairs above hi
// interpolate (divided by factor), and the one in between lies strictly between.
static void test_yarn_frequencies_blend(void **state) {
    (void)state;
    double inv[4];
    ref_freqs(&YARN, 8, inv);
    // lo = floor(8 ln(64/(64 pi)) / (2 ln 1e4)) = floor(-0.497) -> 0; hi = ceil(8 ln(64/(2 pi))
    // / (2 ln 1e4)) = ceil(1.008) = 2: pair 0 extrapolates, pair 1 is half way, 2 and 3
    // interpolate.
    assert_true(fabs(inv[0] - 1.0) < 1e-15);
    double base1 = pow(1e4, -0.25);
    assert_true(fabs(inv[1] - (base1 / 40 + base1) / 2) < 1e-15);
    assert_true(fabs(inv[3] - pow(1e4, -0.75) / 40) < 1e-15);
    for (size_t i = 0; i < 4; i++) {
        double got = rope_inv_freq(&YARN, i, 8);
        assert_true(fabs(got - inv[i]) <= 1e-15 * inv[i]);
    }
}

// ---- mla_qkv ----------------------------------------------------------------------------

typedef struct {
    TestProbe probe;
    real *qkv, *q, *kv, *kpe;
    size_t B, T, H, Dn, Dr, Dv;
    RopeSpec rope;
} QkvCase;

static size_t qkv_w(const QkvCase *c) { return 2 * c->H * (c->Dn + c->Dr) + c->H * c->Dv; }
static size_t q_numel(const QkvCase *c) { return c->B * c->T * c->H * (c->Dn + c->Dr); }
static size_t kv_numel(const QkvCase *c) { return c->B * c->T * c->H * (c->Dn + c->Dv); }
static size_t kpe_numel(const QkvCase *c) { return c->B * c->T * c->Dr; }

static void qkv_run(void *self) {
    QkvCase *c = self;
    size_t N = c->B * c->T;
    ops()->mla_qkv_forward(test_tensor(c->qkv, N * qkv_w(c)), test_tensor(c->q, q_numel(c)),
                           test_tensor(c->kv, kv_numel(c)), test_tensor(c->kpe, kpe_numel(c)),
                           c->B, c->T, c->H, c->Dn, c->Dr, c->Dv, c->rope);
}

static QkvCase qkv_case(Rng *r, RopeSpec rope) {
    QkvCase c = {{qkv_run, NULL, NULL, 0}, NULL, NULL, NULL, NULL, 2, 6, 3, 3, 8, 2, rope};
    size_t n = c.B * c.T * qkv_w(&c);
    c.qkv = test_zeros(n);
    c.q = test_rand(r, q_numel(&c), 1.0);
    c.kv = test_rand(r, kv_numel(&c), 1.0);
    c.kpe = test_rand(r, kpe_numel(&c), 1.0);
    c.probe = (TestProbe){qkv_run, c.qkv, test_rand(r, n, 1.0), n};
    return c;
}

static void qkv_free(QkvCase *c) {
    free(c->qkv), free(c->q), free(c->kv), free(c->kpe), free((real *)c->probe.R);
}

static void check_qkv_forward(RopeSpec rope, uint64_t seed) {
    Rng r;
    rng_init(&r, seed);
    QkvCase c = qkv_case(&r, rope);
    size_t H = c.H, Dn = c.Dn, Dr = c.Dr, Dv = c.Dv, Dq = Dn + Dr, W = qkv_w(&c);
    real *ref = test_zeros(c.B * c.T * W);
    double rot[64];
    for (size_t n = 0; n < c.B * c.T; n++) {
        real *y = ref + n * W;
        for (size_t h = 0; h < H; h++) {
            const real *qh = c.q + (n * H + h) * Dq, *kvh = c.kv + (n * H + h) * (Dn + Dv);
            for (size_t d = 0; d < Dn; d++) {
                y[h * Dq + d] = qh[d];
                y[H * Dq + h * Dq + d] = kvh[d];
            }
            ref_rope(rot, qh + Dn, n % c.T, Dr, &rope);
            for (size_t d = 0; d < Dr; d++)
                y[h * Dq + Dn + d] = rot[d];
            ref_rope(rot, c.kpe + n * Dr, n % c.T, Dr, &rope);
            for (size_t d = 0; d < Dr; d++)
                y[H * Dq + h * Dq + Dn + d] = rot[d];
            for (size_t d = 0; d < Dv; d++)
                y[2 * H * Dq + h * Dv + d] = kvh[Dn + d];
        }
    }
    qkv_run(&c);
    test_assert_close(c.qkv, ref, c.B * c.T * W, REF_RTOL, REF_ATOL, "mla_qkv out");
    free(ref);
    qkv_free(&c);
}

static void test_mla_qkv_forward(void **state) {
    (void)state;
    check_qkv_forward(PLAIN, 31);
    check_qkv_forward(YARN, 32);
    check_qkv_forward(YARN_ONE_MSCALE, 33);
}

static void check_qkv_backward(RopeSpec rope, uint64_t seed) {
    Rng r;
    rng_init(&r, seed);
    QkvCase c = qkv_case(&r, rope);
    size_t nq = q_numel(&c), nkv = kv_numel(&c), nk = kpe_numel(&c);
    real *dq = test_rand(&r, nq, 1.0), *dkv = test_rand(&r, nkv, 1.0);
    real *dk = test_rand(&r, nk, 1.0);
    real *dq0 = test_copy(dq, nq), *dkv0 = test_copy(dkv, nkv), *dk0 = test_copy(dk, nk);
    ops()->mla_qkv_backward(test_tensor(dq, nq), test_tensor(dkv, nkv), test_tensor(dk, nk),
                            test_tensor((real *)c.probe.R, c.probe.n), c.B, c.T, c.H, c.Dn,
                            c.Dr, c.Dv, c.rope);
    test_subtract(dq, dq0, nq);
    test_subtract(dkv, dkv0, nkv);
    test_subtract(dk, dk0, nk);
    test_fd_check(c.q, nq, dq, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "mla_qkv dq");
    test_fd_check(c.kv, nkv, dkv, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "mla_qkv dkv");
    test_fd_check(c.kpe, nk, dk, test_probe_loss, &c, 0, &r, FD_RTOL, FD_ATOL, "mla_qkv dkpe");
    // Absent gradients are skipped.
    ops()->mla_qkv_backward(tensor_none(), tensor_none(), tensor_none(),
                            test_tensor((real *)c.probe.R, c.probe.n), c.B, c.T, c.H, c.Dn,
                            c.Dr, c.Dv, c.rope);
    free(dq), free(dkv), free(dk), free(dq0), free(dkv0), free(dk0);
    qkv_free(&c);
}

static void test_mla_qkv_backward(void **state) {
    (void)state;
    check_qkv_backward(PLAIN, 34);
    check_qkv_backward(YARN, 35);
}

// ---- attention with split head widths ----------------------------------------------------

typedef struct {
    TestProbe probe;
    real *out, *att, *qkv;
    size_t B, T, H, KV, Dk, Dv;
    double scale;
} SplitCase;

static size_t sw(const SplitCase *c) { return (c->H + c->KV) * c->Dk + c->KV * c->Dv; }

static void split_run(void *self) {
    SplitCase *c = self;
    size_t N = c->B * c->T;
    ops()->attention_mla_forward(
        test_tensor(c->out, N * c->H * c->Dv), test_tensor(c->att, c->B * c->H * c->T),
        test_tensor(c->qkv, N * sw(c)), c->B, c->T, c->H, c->KV, c->Dk, c->Dv, c->scale);
}

static SplitCase split_case(Rng *r, size_t B, size_t T, size_t H, size_t KV, size_t Dk,
                            size_t Dv, double scale) {
    SplitCase c = {{split_run, NULL, NULL, 0}, NULL, NULL, NULL, B, T, H, KV, Dk, Dv, scale};
    size_t N = B * T, no = N * H * Dv;
    c.out = test_zeros(no);
    c.att = test_zeros(B * H * T);
    c.qkv = test_rand(r, N * sw(&c), 1.0);
    c.probe = (TestProbe){split_run, c.out, test_rand(r, no, 1.0), no};
    return c;
}

static void split_free(SplitCase *c) {
    free(c->out), free(c->att), free(c->qkv), free((real *)c->probe.R);
}

// Naive: per (b, h, t) the scaled causal scores, softmax, weighted sum of values.
static void split_reference(const SplitCase *c, real *ref) {
    size_t W = sw(c), Dk = c->Dk, Dv = c->Dv, T = c->T;
    double *p = calloc(T, sizeof(double));
    for (size_t b = 0; b < c->B; b++)
        for (size_t h = 0; h < c->H; h++) {
            size_t g = h / (c->H / c->KV);
            for (size_t t = 0; t < T; t++) {
                const real *q = c->qkv + (b * T + t) * W + h * Dk;
                double mx = -INFINITY, sum = 0;
                for (size_t u = 0; u <= t; u++) {
                    const real *k = c->qkv + (b * T + u) * W + (c->H + g) * Dk;
                    double s = 0;
                    for (size_t d = 0; d < Dk; d++)
                        s += q[d] * k[d];
                    p[u] = s * c->scale;
                    mx = fmax(mx, p[u]);
                }
                for (size_t u = 0; u <= t; u++)
                    sum += (p[u] = exp(p[u] - mx));
                for (size_t d = 0; d < Dv; d++) {
                    double acc = 0;
                    for (size_t u = 0; u <= t; u++)
                        acc += p[u] / sum *
                               c->qkv[(b * T + u) * W + (c->H + c->KV) * Dk + g * Dv + d];
                    ref[(b * T + t) * c->H * Dv + h * Dv + d] = acc;
                }
            }
        }
    free(p);
}

// (B, T, H, KV, Dk, Dv): MLA's KV = H with Dk > Dv and Dk < Dv, grouped heads, and T = 70
// across the kernel's 64-query blocks.
static const size_t SPLIT_SHAPES[][6] = {
    {2, 5, 3, 3, 7, 4}, {1, 6, 2, 2, 3, 6}, {2, 4, 4, 2, 5, 3}, {1, 70, 2, 2, 6, 4}};

static void test_attention_mla_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 41);
    for (size_t i = 0; i < sizeof SPLIT_SHAPES / sizeof *SPLIT_SHAPES; i++) {
        const size_t *s = SPLIT_SHAPES[i];
        SplitCase c = split_case(&r, s[0], s[1], s[2], s[3], s[4], s[5], 0.3 + 0.2 * (double)i);
        size_t no = c.B * c.T * c.H * c.Dv;
        real *ref = test_zeros(no);
        split_reference(&c, ref);
        split_run(&c);
        test_assert_close(c.out, ref, no, REF_RTOL, REF_ATOL, "attention_mla out");
        free(ref);
        split_free(&c);
    }
}

static void test_attention_mla_backward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 42);
    for (size_t i = 0; i < sizeof SPLIT_SHAPES / sizeof *SPLIT_SHAPES; i++) {
        const size_t *s = SPLIT_SHAPES[i];
        SplitCase c = split_case(&r, s[0], s[1], s[2], s[3], s[4], s[5], 0.3 + 0.2 * (double)i);
        size_t n = c.B * c.T * sw(&c);
        split_run(&c);
        real *dx = test_rand(&r, n, 1.0), *dx0 = test_copy(dx, n);
        ops()->attention_mla_backward(
            test_tensor(dx, n), tensor_none(), test_tensor((real *)c.probe.R, c.probe.n),
            test_tensor(c.out, c.probe.n), test_tensor(c.qkv, n),
            test_tensor(c.att, c.B * c.H * c.T), c.B, c.T, c.H, c.KV, c.Dk, c.Dv, c.scale);
        test_subtract(dx, dx0, n);
        test_fd_check(c.qkv, n, dx, test_probe_loss, &c, c.T > 64 ? 300 : 0, &r, FD_RTOL, FD_ATOL,
                      "attention_mla dqkv");
        free(dx), free(dx0);
        split_free(&c);
    }
}

// Dk = Dv = D with scale 1/sqrt(D) is the grouped-query attention op, to the bit.
static void test_attention_mla_is_attention(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 43);
    SplitCase c = split_case(&r, 2, 9, 4, 2, 6, 6, 1.0 / sqrt(6.0));
    size_t no = c.B * c.T * c.H * c.Dv;
    real *out = test_zeros(no), *att = test_zeros(c.B * c.H * c.T);
    split_run(&c);
    ops()->attention_forward(test_tensor(out, no), test_tensor(att, c.B * c.H * c.T),
                             test_tensor(c.qkv, c.B * c.T * sw(&c)), c.B, c.T, c.H, c.KV, 6);
    assert_memory_equal(out, c.out, no * sizeof(real));
    free(out), free(att);
    split_free(&c);
}

// ---- decode over the latent cache --------------------------------------------------------

// Sequence b's new row at pos[b], earlier positions already cached: the op's output
// against expanding every cached latent into k_nope and v through kv_b_proj.
static void test_mla_decode_forward(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 51);
    const size_t B = 2, L = 7, H = 3, Dn = 4, Dr = 6, Dv = 5, R = 8, Dq = Dn + Dr;
    const int32_t pos[2] = {4, 0};
    const double scale = 0.37;
    real *q = test_rand(&r, B * H * Dq, 1.0), *lat = test_rand(&r, B * R, 1.0);
    real *kpe = test_rand(&r, B * Dr, 1.0), *w = test_rand(&r, H * (Dn + Dv) * R, 0.5);
    real *cc = test_rand(&r, B * L * R, 1.0), *kc = test_rand(&r, B * L * Dr, 1.0);
    real *out = test_zeros(B * H * Dv), *ref = test_zeros(B * H * Dv);
    real *q0 = test_copy(q, B * H * Dq);
    int32_t p[2] = {pos[0], pos[1]};
    // The reference's caches: the new row's latent and rotated k_pe at pos[b].
    real *cc_ref = test_copy(cc, B * L * R), *kc_ref = test_copy(kc, B * L * Dr);
    double rot[64];
    for (size_t b = 0; b < B; b++) {
        memcpy(cc_ref + (b * L + pos[b]) * R, lat + b * R, R * sizeof(real));
        ref_rope(rot, kpe + b * Dr, (size_t)pos[b], Dr, &YARN);
        for (size_t d = 0; d < Dr; d++)
            kc_ref[(b * L + pos[b]) * Dr + d] = rot[d];
    }
    for (size_t b = 0; b < B; b++)
        for (size_t h = 0; h < H; h++) {
            const real *qh = q0 + (b * H + h) * Dq, *wh = w + h * (Dn + Dv) * R;
            double qr[64], s[16], mx = -INFINITY, sum = 0;
            ref_rope(qr, qh + Dn, (size_t)pos[b], Dr, &YARN);
            size_t n = (size_t)pos[b] + 1;
            for (size_t u = 0; u < n; u++) {
                const real *c = cc_ref + (b * L + u) * R;
                double dot = 0;
                for (size_t d = 0; d < Dn; d++) { // k_nope[d] = W_uk[d] . c
                    double k = 0;
                    for (size_t j = 0; j < R; j++)
                        k += wh[d * R + j] * c[j];
                    dot += qh[d] * k;
                }
                for (size_t d = 0; d < Dr; d++)
                    dot += qr[d] * kc_ref[(b * L + u) * Dr + d];
                s[u] = dot * scale;
                mx = fmax(mx, s[u]);
            }
            for (size_t u = 0; u < n; u++)
                sum += (s[u] = exp(s[u] - mx));
            for (size_t d = 0; d < Dv; d++) {
                double acc = 0;
                for (size_t u = 0; u < n; u++) {
                    double v = 0; // v[d] = W_uv[d] . c_u
                    for (size_t j = 0; j < R; j++)
                        v += wh[(Dn + d) * R + j] * cc_ref[(b * L + u) * R + j];
                    acc += s[u] / sum * v;
                }
                ref[(b * H + h) * Dv + d] = acc;
            }
        }
    ops()->mla_decode_forward(
        test_tensor(out, B * H * Dv), test_tensor(q, B * H * Dq), test_tensor(lat, B * R),
        test_tensor(kpe, B * Dr), test_tensor(w, H * (Dn + Dv) * R), test_tensor(cc, B * L * R),
        test_tensor(kc, B * L * Dr), test_itensor(p, B), B, L, H, Dn, Dr, Dv, R, YARN, scale);
    test_assert_close(out, ref, B * H * Dv, 1e-10, 1e-12, "mla_decode out");
    test_assert_close(cc, cc_ref, B * L * R, 0, 0, "mla_decode latent cache");
    test_assert_close(kc, kc_ref, B * L * Dr, REF_RTOL, REF_ATOL, "mla_decode k_pe cache");
    free(q), free(lat), free(kpe), free(w), free(cc), free(kc), free(out), free(ref);
    free(q0), free(cc_ref), free(kc_ref);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_yarn_frequencies_blend),
    cmocka_unit_test(test_mla_qkv_forward),
    cmocka_unit_test(test_mla_qkv_backward),
    cmocka_unit_test(test_attention_mla_forward),
    cmocka_unit_test(test_attention_mla_backward),
    cmocka_unit_test(test_attention_mla_is_attention),
    cmocka_unit_test(test_mla_decode_forward),
};

TEST_MAIN(tests)
