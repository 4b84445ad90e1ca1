// attention.c: RoPE and causal grouped-query attention (CPU).
//
// Plain loops parallelised with OpenMP: attention over (batch, head) in forward and
// over (batch, KV head) in backward, so the query heads sharing a key/value head add
// their key and value gradients in one thread, in a fixed order. Dot products and
// weighted sums accumulate in double.
#include "cpu_ops.h"
#include "../util.h"

#include <math.h>
#include <stdlib.h>

// ---- RoPE -----------------------------------------------------------------------------

// Rotates the first H + KV heads of each row (queries, then keys) by sign * a_i, with
// a_i = t * theta^(-2i/D) as in kernels.h; sign -1 applies the transpose (backward).
static void rope_rotate(real *qkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                        double theta, double sign) {
    CHECK(D % 2 == 0, "RoPE needs an even head size, not %zu", D);
    size_t half = D / 2, width = (H + 2 * KV) * D;
#pragma omp parallel for schedule(static)
    for (size_t bt = 0; bt < B * T; bt++) {
        double t = (double)(bt % T);
        real *row = qkv + bt * width; // ((H + 2KV) * D)
        for (size_t i = 0; i < half; i++) {
            double a = sign * t * pow(theta, -2.0 * (double)i / (double)D);
            double c = cos(a), s = sin(a);
            for (size_t head = 0; head < H + KV; head++) {
                real *x1 = row + head * D + i, *x2 = x1 + half;
                double v1 = *x1, v2 = *x2;
                *x1 = (real)(v1 * c - v2 * s);
                *x2 = (real)(v2 * c + v1 * s);
            }
        }
    }
}

void cpu_rope_forward(Tensor qkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                      double theta) {
    rope_rotate(TENSOR_R(qkv), B, T, H, KV, D, theta, 1.0);
}

void cpu_rope_backward(Tensor dqkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                       double theta) {
    if (dqkv.data) rope_rotate(TENSOR_R(dqkv), B, T, H, KV, D, theta, -1.0);
}

// ---- attention ------------------------------------------------------------------------

static double dot(const real *a, const real *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

static void check_groups(size_t H, size_t KV) {
    CHECK(KV > 0 && H % KV == 0, "attention: %zu query heads cannot share %zu KV heads", H, KV);
}

// One (batch, head): p (T, T) = causal softmax(q k^T / sqrt(D)), out = p v.
// q, k, v and out step `width` / `out_width` elements per position.
static void attend(real *out, real *p, const real *q, const real *k, const real *v, double *acc,
                   size_t T, size_t D, size_t width, size_t out_width) {
    double scale = 1.0 / sqrt((double)D);
    for (size_t t = 0; t < T; t++) {
        real *pt = p + t * T; // (T)
        double mx = -INFINITY;
        for (size_t u = 0; u <= t; u++) {
            double s = scale * dot(q + t * width, k + u * width, D);
            pt[u] = (real)s;
            if (pt[u] > mx) mx = pt[u]; // the stored score, so the top one gets exp(0) = 1
        }
        double sum = 0.0;
        for (size_t u = 0; u <= t; u++) {
            double e = exp((double)pt[u] - mx);
            pt[u] = (real)e;
            sum += e;
        }
        for (size_t u = 0; u < T; u++)
            pt[u] = u <= t ? (real)(pt[u] / sum) : 0;
        for (size_t d = 0; d < D; d++)
            acc[d] = 0.0;
        for (size_t u = 0; u <= t; u++)
            for (size_t d = 0; d < D; d++)
                acc[d] += (double)pt[u] * v[u * width + d];
        for (size_t d = 0; d < D; d++)
            out[t * out_width + d] = (real)acc[d];
    }
}

void cpu_attention_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T, size_t H,
                           size_t KV, size_t D) {
    check_groups(H, KV);
    size_t width = (H + 2 * KV) * D, group = H / KV;
    real *o = TENSOR_R(out);       // (B*T, H*D)
    real *a = TENSOR_R(att);       // (B, H, T, T)
    const real *x = TENSOR_R(qkv); // (B*T, (H + 2KV) * D)
#pragma omp parallel
    {
        double *acc = CALLOC(D, sizeof(double)); // (D)
#pragma omp for schedule(static)
        for (size_t bh = 0; bh < B * H; bh++) {
            size_t b = bh / H, h = bh % H, kvh = h / group;
            const real *xb = x + b * T * width;
            attend(o + b * T * H * D + h * D, a + bh * T * T, xb + h * D, xb + (H + kvh) * D,
                   xb + (H + KV + kvh) * D, acc, T, D, width, H * D);
        }
        free(acc);
    }
}

// One (batch, query head), first half of backward: ds (T, T) = p * (dp - rowsum(p dp))
// with dp = dout v^T, the gradient of the pre-softmax scores. Only the causal part
// (u <= t) is written; nothing reads above the diagonal.
static void score_grads(real *ds, const real *p, const real *dout, const real *v, size_t T,
                        size_t D, size_t width, size_t out_width) {
    for (size_t t = 0; t < T; t++) {
        real *dst = ds + t * T;
        const real *pt = p + t * T;
        double rowsum = 0.0;
        for (size_t u = 0; u <= t; u++) {
            double dp = dot(dout + t * out_width, v + u * width, D);
            dst[u] = (real)dp;
            rowsum += (double)pt[u] * dp;
        }
        for (size_t u = 0; u <= t; u++)
            dst[u] = (real)((double)pt[u] * ((double)dst[u] - rowsum));
    }
}

// dq (T, D) += scale * ds k for one (batch, query head).
static void query_grads(real *dq, const real *ds, const real *k, double *acc, double scale,
                        size_t T, size_t D, size_t width) {
    for (size_t t = 0; t < T; t++) {
        for (size_t d = 0; d < D; d++)
            acc[d] = 0.0;
        for (size_t u = 0; u <= t; u++)
            for (size_t d = 0; d < D; d++)
                acc[d] += (double)ds[t * T + u] * k[u * width + d];
        for (size_t d = 0; d < D; d++)
            dq[t * width + d] += (real)(scale * acc[d]);
    }
}

// For one (batch, KV head) shared by `group` query heads h0 .. h0+group-1:
//   dk_u += scale * sum_{h, t >= u} ds[h,t,u] q[h,t]
//   dv_u += sum_{h, t >= u} p[h,t,u] dout[h,t]
// ds and p point at the first head's (T, T) block; q and dout at its first column.
static void key_value_grads(real *dk, real *dv, const real *ds, const real *p, const real *q,
                            const real *dout, double *acck, double *accv, double scale,
                            size_t group, size_t T, size_t D, size_t width, size_t out_width) {
    for (size_t u = 0; u < T; u++) {
        for (size_t d = 0; d < D; d++)
            acck[d] = accv[d] = 0.0;
        for (size_t g = 0; g < group; g++) {
            const real *dsg = ds + g * T * T, *pg = p + g * T * T;
            const real *qg = q + g * D, *dog = dout + g * D;
            for (size_t t = u; t < T; t++) {
                double s = dsg[t * T + u], pr = pg[t * T + u];
                for (size_t d = 0; d < D; d++) {
                    acck[d] += s * qg[t * width + d];
                    accv[d] += pr * dog[t * out_width + d];
                }
            }
        }
        for (size_t d = 0; d < D; d++) {
            dk[u * width + d] += (real)(scale * acck[d]);
            dv[u * width + d] += (real)accv[d];
        }
    }
}

void cpu_attention_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor qkv, Tensor att,
                            size_t B, size_t T, size_t H, size_t KV, size_t D) {
    if (!dqkv.data) return;
    check_groups(H, KV);
    size_t width = (H + 2 * KV) * D, out_width = H * D, group = H / KV;
    double scale = 1.0 / sqrt((double)D);
    real *dx = TENSOR_R(dqkv);       // (B*T, (H + 2KV) * D)
    real *ds = TENSOR_R(datt);       // (B, H, T, T)
    const real *dy = TENSOR_R(dout); // (B*T, H*D)
    const real *x = TENSOR_R(qkv);   // (B*T, (H + 2KV) * D)
    const real *p = TENSOR_R(att);   // (B, H, T, T)
#pragma omp parallel
    {
        double *acc = CALLOC(2 * D, sizeof(double)); // (2, D)
#pragma omp for schedule(static)
        for (size_t bk = 0; bk < B * KV; bk++) {
            size_t b = bk / KV, kvh = bk % KV, h0 = kvh * group;
            const real *xb = x + b * T * width, *dyb = dy + b * T * out_width;
            real *dxb = dx + b * T * width;
            size_t blk = (b * H + h0) * T * T; // first query head's (T, T) block
            const real *k = xb + (H + kvh) * D, *v = xb + (H + KV + kvh) * D;
            for (size_t g = 0; g < group; g++) {
                size_t h = h0 + g, hb = blk + g * T * T;
                score_grads(ds + hb, p + hb, dyb + h * D, v, T, D, width, out_width);
                query_grads(dxb + h * D, ds + hb, k, acc, scale, T, D, width);
            }
            key_value_grads(dxb + (H + kvh) * D, dxb + (H + KV + kvh) * D, ds + blk, p + blk,
                            xb + h0 * D, dyb + h0 * D, acc, acc + D, scale, group, T, D, width,
                            out_width);
        }
        free(acc);
    }
}
