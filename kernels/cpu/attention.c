// attention.c: RoPE and causal grouped-query attention (CPU).
//
// Attention runs one (batch, head) per OpenMP task, as BLAS products over blocks of
// ATTN_BLOCK query rows that stop at the diagonal, so the masked half of the scores is
// never computed. Each gemm runs on its task's thread (OpenBLAS inside a parallel
// region), so a result does not depend on the thread count. Backward goes over (batch,
// KV head): the query heads sharing a key/value head add their key and value gradients
// in one thread, in a fixed order.
#include "cpu_ops.h"
#include "../../base/util.h"
#include "vexp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---- RoPE -----------------------------------------------------------------------------

// Rotates the first H + KV heads of each row (queries, then keys) by sign * a_i, with
// a_i = t * theta^(-2i/D) as in kernels.h; sign -1 applies the transpose (backward).
// The angles depend on (t, i) alone: their cosines and sines are computed once per call
// for the T positions, not once per sequence.
static void rope_rotate(real *qkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                        double theta, double sign) {
    CHECK(D % 2 == 0, "RoPE needs an even head size, not %zu", D);
    size_t half = D / 2, width = (H + 2 * KV) * D;
    double *cs = CALLOC(2 * T * half, sizeof(double)); // (T, half, 2): cos, sin
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        for (size_t i = 0; i < half; i++) {
            double a = sign * (double)t * pow(theta, -2.0 * (double)i / (double)D);
            cs[2 * (t * half + i)] = cos(a);
            cs[2 * (t * half + i) + 1] = sin(a);
        }
#pragma omp parallel for schedule(static)
    for (size_t bt = 0; bt < B * T; bt++) {
        const double *ct = cs + 2 * (bt % T) * half;
        real *row = qkv + bt * width; // ((H + 2KV) * D)
        for (size_t i = 0; i < half; i++) {
            double c = ct[2 * i], s = ct[2 * i + 1];
            for (size_t head = 0; head < H + KV; head++) {
                real *x1 = row + head * D + i, *x2 = x1 + half;
                double v1 = *x1, v2 = *x2;
                *x1 = (real)(v1 * c - v2 * s);
                *x2 = (real)(v2 * c + v1 * s);
            }
        }
    }
    free(cs);
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

// Query rows per block: a causal block of scores is (ATTN_BLOCK, t1), t1 <= T.
#define ATTN_BLOCK 64

static void check_groups(size_t H, size_t KV) {
    CHECK(KV > 0 && H % KV == 0, "attention: %zu query heads cannot share %zu KV heads", H, KV);
}

static size_t block_end(size_t t0, size_t T) {
    return t0 + ATTN_BLOCK < T ? t0 + ATTN_BLOCK : T;
}

// Row t of p (T) holds its scores for u <= t; becomes the causal softmax, 0 above t.
static void softmax_causal_row(real *pt, size_t t, size_t T) {
    real mx = pt[0], sum = 0;
#pragma omp simd reduction(max : mx)
    for (size_t u = 1; u <= t; u++)
        mx = pt[u] > mx ? pt[u] : mx;
#pragma omp simd reduction(+ : sum)
    for (size_t u = 0; u <= t; u++) {
        pt[u] = vexp(pt[u] - mx);
        sum += pt[u];
    }
    real inv = 1 / sum;
#pragma omp simd
    for (size_t u = 0; u <= t; u++)
        pt[u] *= inv;
    memset(pt + t + 1, 0, (T - t - 1) * sizeof(real));
}

// One (batch, head): p (T, T) = causal softmax(q k^T / sqrt(D)), out (T, D) = p v.
// q, k, v step `width` elements per position, out `out_width`.
static void attend(real *out, real *p, const real *q, const real *k, const real *v, size_t T,
                   size_t D, size_t width, size_t out_width) {
    real scale = (real)(1.0 / sqrt((double)D));
    for (size_t t0 = 0; t0 < T; t0 += ATTN_BLOCK) {
        size_t t1 = block_end(t0, T);
        real *pb = p + t0 * T; // (t1 - t0, T): keys 0 .. t1-1 reach this block
        cpu_gemm(0, 1, t1 - t0, t1, D, scale, q + t0 * width, width, k, width, 0, pb, T);
        for (size_t t = t0; t < t1; t++)
            softmax_causal_row(p + t * T, t, T);
        cpu_gemm(0, 0, t1 - t0, D, t1, 1, pb, T, v, width, 0, out + t0 * out_width, out_width);
    }
}

void cpu_attention_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T, size_t H,
                           size_t KV, size_t D) {
    check_groups(H, KV);
    size_t width = (H + 2 * KV) * D, group = H / KV;
    real *o = TENSOR_R(out);       // (B*T, H*D)
    real *a = TENSOR_R(att);       // (B, H, T, T)
    const real *x = TENSOR_R(qkv); // (B*T, (H + 2KV) * D)
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t bh = 0; bh < B * H; bh++) {
        size_t b = bh / H, h = bh % H, kvh = h / group;
        const real *xb = x + b * T * width;
        attend(o + b * T * H * D + h * D, a + bh * T * T, xb + h * D, xb + (H + kvh) * D,
               xb + (H + KV + kvh) * D, T, D, width, H * D);
    }
}

// One (batch, query head): ds (T, T) = p * (dp - rowsum(p dp)) with dp = dout v^T, the
// gradient of the pre-softmax scores, 0 above the diagonal; then dq += scale * ds k.
static void score_and_query_grads(real *ds, real *dq, const real *p, const real *dout,
                                  const real *k, const real *v, real scale, size_t T, size_t D,
                                  size_t width, size_t out_width) {
    for (size_t t0 = 0; t0 < T; t0 += ATTN_BLOCK) {
        size_t t1 = block_end(t0, T);
        real *db = ds + t0 * T; // (t1 - t0, T)
        cpu_gemm(0, 1, t1 - t0, t1, D, 1, dout + t0 * out_width, out_width, v, width, 0, db, T);
        for (size_t t = t0; t < t1; t++) {
            real *dst = ds + t * T;
            const real *pt = p + t * T;
            real rowsum = 0;
#pragma omp simd reduction(+ : rowsum)
            for (size_t u = 0; u <= t; u++)
                rowsum += pt[u] * dst[u];
#pragma omp simd
            for (size_t u = 0; u <= t; u++)
                dst[u] = pt[u] * (dst[u] - rowsum);
            memset(dst + t + 1, 0, (t1 - t - 1) * sizeof(real));
        }
        cpu_gemm(0, 0, t1 - t0, D, t1, scale, db, T, k, width, 1, dq + t0 * width, width);
    }
}

// dk (T, D) += scale * ds^T q and dv (T, D) += p^T dout for one query head, by blocks of
// keys: keys u0 .. u1-1 see the queries t >= u0 (ds and p are 0 above the diagonal).
static void key_value_grads(real *dk, real *dv, const real *ds, const real *p, const real *q,
                            const real *dout, real scale, size_t T, size_t D, size_t width,
                            size_t out_width) {
    for (size_t u0 = 0; u0 < T; u0 += ATTN_BLOCK) {
        size_t u1 = block_end(u0, T), rows = T - u0;
        cpu_gemm(1, 0, u1 - u0, D, rows, scale, ds + u0 * T + u0, T, q + u0 * width, width, 1,
                 dk + u0 * width, width);
        cpu_gemm(1, 0, u1 - u0, D, rows, 1, p + u0 * T + u0, T, dout + u0 * out_width,
                 out_width, 1, dv + u0 * width, width);
    }
}

// The probabilities in att suffice: out is not needed here.
void cpu_attention_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor out, Tensor qkv,
                            Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t D) {
    (void)out;
    if (!dqkv.data) return;
    check_groups(H, KV);
    size_t width = (H + 2 * KV) * D, out_width = H * D, group = H / KV;
    real scale = (real)(1.0 / sqrt((double)D));
    real *dx = TENSOR_R(dqkv);       // (B*T, (H + 2KV) * D)
    real *ds = TENSOR_R(datt);       // (B, H, T, T)
    const real *dy = TENSOR_R(dout); // (B*T, H*D)
    const real *x = TENSOR_R(qkv);   // (B*T, (H + 2KV) * D)
    const real *p = TENSOR_R(att);   // (B, H, T, T)
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t bk = 0; bk < B * KV; bk++) {
        size_t b = bk / KV, kvh = bk % KV;
        const real *xb = x + b * T * width, *dyb = dy + b * T * out_width;
        real *dxb = dx + b * T * width;
        const real *k = xb + (H + kvh) * D, *v = xb + (H + KV + kvh) * D;
        real *dk = dxb + (H + kvh) * D, *dv = dxb + (H + KV + kvh) * D;
        for (size_t h = kvh * group; h < (kvh + 1) * group; h++) {
            size_t blk = (b * H + h) * T * T; // this head's (T, T) block
            score_and_query_grads(ds + blk, dxb + h * D, p + blk, dyb + h * D, k, v, scale, T,
                                  D, width, out_width);
            key_value_grads(dk, dv, ds + blk, p + blk, xb + h * D, dyb + h * D, scale, T, D,
                            width, out_width);
        }
    }
}
