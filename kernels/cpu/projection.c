// projection.c: what some model families add around the attention projection and the
// shared expert (CPU): QK-norm (RMSNorm over groups of query and key heads), a bias on
// every row, and a sigmoid-gated add. Sums across rows run in double, each output
// column owned by one thread (see docs/architecture.md, "Determinism").
#include "cpu_ops.h"
#include "../router_math.h"

#include <math.h>
#include <string.h>

// One group shape of QK-norm: `groups` groups of `width` values from column `off` of a
// qkv row, normalised with one weight vector of `width`.
typedef struct {
    size_t off, width, groups;
} QkSeg;

// [0]: the query part, [1]: the key part.
static void qk_segments(QkSeg s[2], size_t H, size_t KV, size_t D, int per_head) {
    s[0] = per_head ? (QkSeg){0, D, H} : (QkSeg){0, H * D, 1};
    s[1] = per_head ? (QkSeg){H * D, D, KV} : (QkSeg){H * D, KV * D, 1};
}

void cpu_qk_norm_forward(Tensor out, Tensor rstd, Tensor qkv, Tensor wq, Tensor wk, size_t N,
                         size_t H, size_t KV, size_t D, int per_head, double eps) {
    real *o = TENSOR_R(out);                       // (N, (H+2KV)D)
    real *rs = TENSOR_R(rstd);                     // (N, G)
    const real *x = TENSOR_R(qkv);                 // (N, (H+2KV)D)
    const real *w[2] = {TENSOR_R(wq), TENSOR_R(wk)};
    QkSeg s[2];
    qk_segments(s, H, KV, D, per_head);
    size_t W = (H + 2 * KV) * D, G = s[0].groups + s[1].groups, V0 = (H + KV) * D;
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        size_t gi = 0;
        for (int p = 0; p < 2; p++)
            for (size_t j = 0; j < s[p].groups; j++, gi++) {
                size_t c0 = n * W + s[p].off + j * s[p].width;
                double ss = 0.0;
                for (size_t c = 0; c < s[p].width; c++) ss += (double)x[c0 + c] * x[c0 + c];
                real r = (real)(1.0 / sqrt(ss / (double)s[p].width + eps));
                rs[n * G + gi] = r;
                for (size_t c = 0; c < s[p].width; c++) o[c0 + c] = x[c0 + c] * r * w[p][c];
            }
        memcpy(o + n * W + V0, x + n * W + V0, KV * D * sizeof *o);
    }
}

// Per group, as rmsnorm's backward: dx_i += r w_i dy_i - r^3 x_i / width * sum_j dy_j w_j x_j.
static void qk_norm_backward_x(real *dx, const real *dy, const real *x, const real *const w[2],
                               const real *rs, const QkSeg s[2], size_t N, size_t W,
                               size_t V0) {
    size_t G = s[0].groups + s[1].groups;
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        size_t gi = 0;
        for (int p = 0; p < 2; p++)
            for (size_t j = 0; j < s[p].groups; j++, gi++) {
                size_t c0 = n * W + s[p].off + j * s[p].width;
                double dot = 0.0;
                for (size_t c = 0; c < s[p].width; c++)
                    dot += (double)dy[c0 + c] * w[p][c] * x[c0 + c];
                double r = rs[n * G + gi], k = r * r * r * dot / (double)s[p].width;
                for (size_t c = 0; c < s[p].width; c++)
                    dx[c0 + c] += (real)(r * w[p][c] * dy[c0 + c] - k * x[c0 + c]);
            }
        for (size_t c = V0; c < W; c++) dx[n * W + c] += dy[n * W + c];
    }
}

// dw_c += sum over rows and groups of dy x r at column c of the group.
static void qk_norm_backward_w(real *dw, const real *dy, const real *x, const real *rs,
                               const QkSeg *seg, size_t first_group, size_t G, size_t N,
                               size_t W) {
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < seg->width; c++) {
        double acc = 0.0;
        for (size_t n = 0; n < N; n++)
            for (size_t j = 0; j < seg->groups; j++) {
                size_t i = n * W + seg->off + j * seg->width + c;
                acc += (double)dy[i] * x[i] * rs[n * G + first_group + j];
            }
        dw[c] += (real)acc;
    }
}

void cpu_qk_norm_backward(Tensor dqkv, Tensor dwq, Tensor dwk, Tensor dout, Tensor qkv,
                          Tensor wq, Tensor wk, Tensor rstd, size_t N, size_t H, size_t KV,
                          size_t D, int per_head) {
    QkSeg s[2];
    qk_segments(s, H, KV, D, per_head);
    size_t W = (H + 2 * KV) * D, G = s[0].groups + s[1].groups;
    const real *w[2] = {TENSOR_R(wq), TENSOR_R(wk)};
    if (dqkv.data)
        qk_norm_backward_x(TENSOR_R(dqkv), TENSOR_R(dout), TENSOR_R(qkv), w, TENSOR_R(rstd), s,
                           N, W, (H + KV) * D);
    if (dwq.data)
        qk_norm_backward_w(TENSOR_R(dwq), TENSOR_R(dout), TENSOR_R(qkv), TENSOR_R(rstd), &s[0],
                           0, G, N, W);
    if (dwk.data)
        qk_norm_backward_w(TENSOR_R(dwk), TENSOR_R(dout), TENSOR_R(qkv), TENSOR_R(rstd), &s[1],
                           s[0].groups, G, N, W);
}

void cpu_bias_add_forward(Tensor out, Tensor x, Tensor b, size_t N, size_t M) {
    real *o = TENSOR_R(out);         // (N, M)
    const real *xs = TENSOR_R(x);    // (N, M)
    const real *bs = TENSOR_R(b);    // (M)
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++)
        for (size_t m = 0; m < M; m++) o[n * M + m] = xs[n * M + m] + bs[m];
}

void cpu_bias_add_backward(Tensor dx, Tensor db, Tensor dout, size_t N, size_t M) {
    const real *dy = TENSOR_R(dout); // (N, M)
    if (dx.data) {
        real *d = TENSOR_R(dx);
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < N * M; i++) d[i] += dy[i];
    }
    if (!db.data) return;
    real *d = TENSOR_R(db);          // (M)
#pragma omp parallel for schedule(static)
    for (size_t m = 0; m < M; m++) {
        double acc = 0.0;
        for (size_t n = 0; n < N; n++) acc += dy[n * M + m];
        d[m] += (real)acc;
    }
}

void cpu_gated_add_forward(Tensor out, Tensor a, Tensor s, Tensor g, size_t N, size_t C) {
    real *o = TENSOR_R(out);                          // (N, C)
    const real *pa = TENSOR_R(a), *ps = TENSOR_R(s);  // (N, C)
    const real *pg = TENSOR_R(g);                     // (N)
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        real sg = (real)stable_sigmoid(pg[n]);
        for (size_t c = 0; c < C; c++) o[n * C + c] = pa[n * C + c] + sg * ps[n * C + c];
    }
}

void cpu_gated_add_backward(Tensor da, Tensor ds, Tensor dg, Tensor dout, Tensor s, Tensor g,
                            size_t N, size_t C) {
    real *pda = TENSOR_R(da), *pds = TENSOR_R(ds), *pdg = TENSOR_R(dg);
    const real *dy = TENSOR_R(dout), *ps = TENSOR_R(s), *pg = TENSOR_R(g);
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        double sg = stable_sigmoid(pg[n]), dot = 0.0;
        for (size_t c = 0; c < C; c++) {
            size_t i = n * C + c;
            if (pda) pda[i] += dy[i];
            if (pds) pds[i] += (real)(sg * dy[i]);
            dot += (double)dy[i] * ps[i];
        }
        if (pdg) pdg[n] += (real)(sg * (1.0 - sg) * dot);
    }
}
