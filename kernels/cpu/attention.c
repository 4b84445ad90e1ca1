// attention.c: RoPE and fused causal grouped-query attention (CPU).
//
// Attention is fused: per (batch, head) it walks blocks of ATTN_BQ queries and, within
// each, blocks of at most ATTN_BK keys that stop at the diagonal (the masked half of the
// scores is never computed), with an online softmax (running maximum and sum per query).
// No (B, H, T, T) probabilities are kept: att holds one logsumexp per query (B, H, T),
// and the backward recomputes each block's probabilities from it. A task's scratch is
// two (ATTN_BQ, ATTN_BK) blocks. Each gemm runs on its task's thread (OpenBLAS inside a
// parallel region), so a result does not depend on the thread count. Backward goes over
// (batch, KV head): the query heads sharing a key/value head add their key and value
// gradients in one thread, in a fixed order.
#include "cpu_ops.h"
#include "../../base/util.h"
#include "vexp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---- RoPE -----------------------------------------------------------------------------

void cpu_rope_angles(double *cs, size_t t, size_t D, double theta, double sign) {
    for (size_t i = 0; i < D / 2; i++) {
        double a = sign * (double)t * pow(theta, -2.0 * (double)i / (double)D);
        cs[2 * i] = cos(a);
        cs[2 * i + 1] = sin(a);
    }
}

void cpu_rope_row(real *row, const double *cs, size_t heads, size_t D) {
    size_t half = D / 2;
    for (size_t i = 0; i < half; i++) {
        double c = cs[2 * i], s = cs[2 * i + 1];
        for (size_t head = 0; head < heads; head++) {
            real *x1 = row + head * D + i, *x2 = x1 + half;
            double v1 = *x1, v2 = *x2;
            *x1 = (real)(v1 * c - v2 * s);
            *x2 = (real)(v2 * c + v1 * s);
        }
    }
}

// Rotates the first H + KV heads of each row (queries, then keys) by sign * a_i.
// The angles depend on (t, i) alone: their cosines and sines are computed once per call
// for the T positions, not once per sequence.
static void rope_rotate(real *qkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                        double theta, double sign) {
    CHECK(D % 2 == 0, "RoPE needs an even head size, not %zu", D);
    size_t half = D / 2, width = (H + 2 * KV) * D;
    double *cs = CALLOC(2 * T * half, sizeof(double)); // (T, half, 2): cos, sin
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++)
        cpu_rope_angles(cs + 2 * t * half, t, D, theta, sign);
#pragma omp parallel for schedule(static)
    for (size_t bt = 0; bt < B * T; bt++)
        cpu_rope_row(qkv + bt * width, cs + 2 * (bt % T) * half, H + KV, D);
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

// Queries per block, and keys per block: T <= ATTN_BK (small, tiny) is one key block, so
// each block of scores is one wide product. Both multiples of 16 (AVX-512 fp32 lanes).
#define ATTN_BQ 64
#define ATTN_BK 256

static void check_groups(size_t H, size_t KV) {
    CHECK(KV > 0 && H % KV == 0, "attention: %zu query heads cannot share %zu KV heads", H, KV);
}

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

void cpu_attention_plan(size_t *att_numel, size_t *datt_numel, size_t B, size_t T, size_t H,
                        size_t KV, size_t D, int bf16) {
    (void)KV, (void)D, (void)bf16;
    *att_numel = B * H * T; // one logsumexp per query
    *datt_numel = 0;        // the backward's scratch is its own, per block
}

// One head's q, k, v (and their gradients) step `width` per position, out and dout
// `out_width`; q and k are Dk wide, v and out Dv. lse (T) is the head's logsumexp per query.
typedef struct {
    const real *q, *k, *v;
    size_t T, Dk, Dv, width, out_width;
    real scale;
} HeadView;

// Row r of s (rows, ldS), query t = t0 + r, keys u0 .. u0+cols-1: the keys u <= t keep
// exp(s - ref[r]), the rest become 0. Returns the row's sum of kept values.
static real exp_row(real *sr, size_t t, size_t u0, size_t cols, real ref) {
    size_t n = t >= u0 ? min_size(t - u0 + 1, cols) : 0;
    real sum = 0;
#pragma omp simd reduction(+ : sum)
    for (size_t u = 0; u < n; u++) {
        sr[u] = vexp(sr[u] - ref);
        sum += sr[u];
    }
    memset(sr + n, 0, (cols - n) * sizeof(real));
    return sum;
}

// Online softmax over one key block: folds row r's scores into its running maximum m and
// sum l, rescaling the output row already accumulated (o, D wide) by exp(m_old - m_new).
static void online_row(real *sr, real *o, real *m, real *l, size_t t, size_t u0, size_t cols,
                       size_t D, int first) {
    size_t n = t >= u0 ? min_size(t - u0 + 1, cols) : 0;
    real mx = *m;
#pragma omp simd reduction(max : mx)
    for (size_t u = 0; u < n; u++)
        mx = sr[u] > mx ? sr[u] : mx;
    real sum = exp_row(sr, t, u0, cols, mx);
    if (first) {
        *l = sum;
    } else {
        real alpha = vexp(*m - mx);
        *l = *l * alpha + sum;
        for (size_t d = 0; d < D; d++)
            o[d] *= alpha;
    }
    *m = mx;
}

// Queries t0 .. t1-1 of one head: out rows = softmax(q k^T scale) v, lse = m + log(l).
static void attend_block(real *out, real *lse, real *s, real *m, real *l, const HeadView *h,
                         size_t t0, size_t t1) {
    size_t rows = t1 - t0;
    for (size_t u0 = 0; u0 < t1; u0 += ATTN_BK) {
        size_t cols = min_size(u0 + ATTN_BK, t1) - u0;
        cpu_gemm(0, 1, rows, cols, h->Dk, h->scale, h->q + t0 * h->width, h->width,
                 h->k + u0 * h->width, h->width, 0, s, ATTN_BK);
        for (size_t r = 0; r < rows; r++) {
            if (u0 == 0) m[r] = -INFINITY;
            online_row(s + r * ATTN_BK, out + (t0 + r) * h->out_width, m + r, l + r, t0 + r,
                       u0, cols, h->Dv, u0 == 0);
        }
        cpu_gemm(0, 0, rows, h->Dv, cols, 1, s, ATTN_BK, h->v + u0 * h->width, h->width,
                 u0 == 0 ? 0 : 1, out + t0 * h->out_width, h->out_width);
    }
    for (size_t r = 0; r < rows; r++) {
        real inv = 1 / l[r], *o = out + (t0 + r) * h->out_width;
        for (size_t d = 0; d < h->Dv; d++)
            o[d] *= inv;
        lse[t0 + r] = m[r] + (real)log(l[r]);
    }
}

void cpu_attention_mla_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T,
                               size_t H, size_t KV, size_t Dk, size_t Dv, double scale) {
    check_groups(H, KV);
    CHECK(att.numel >= B * H * T, "attention: att holds %zu values, the logsumexp needs %zu",
          att.numel, B * H * T);
    size_t width = (H + KV) * Dk + KV * Dv, group = H / KV;
    real *o = TENSOR_R(out);       // (B*T, H*Dv)
    real *lse = TENSOR_R(att);     // (B, H, T)
    const real *x = TENSOR_R(qkv); // (B*T, (H + KV) * Dk + KV * Dv)
#pragma omp parallel
    {
        real *s = CALLOC(ATTN_BQ * ATTN_BK, sizeof(real)); // (ATTN_BQ, ATTN_BK)
        real m[ATTN_BQ], l[ATTN_BQ];                         // running max and sum per query
#pragma omp for schedule(dynamic, 1)
        for (size_t bh = 0; bh < B * H; bh++) {
            size_t b = bh / H, h = bh % H, kvh = h / group;
            const real *xb = x + b * T * width;
            HeadView view = {xb + h * Dk, xb + (H + kvh) * Dk, xb + (H + KV) * Dk + kvh * Dv, T,
                             Dk, Dv, width, H * Dv, (real)scale};
            for (size_t t0 = 0; t0 < T; t0 += ATTN_BQ)
                attend_block(o + b * T * H * Dv + h * Dv, lse + bh * T, s, m, l, &view, t0,
                             min_size(t0 + ATTN_BQ, T));
        }
        free(s);
    }
}

void cpu_attention_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T, size_t H,
                           size_t KV, size_t D) {
    cpu_attention_mla_forward(out, att, qkv, B, T, H, KV, D, D, 1.0 / sqrt((double)D));
}

// One block of queries t0 .. t1-1 against keys u0 .. u0+cols-1 of one head: recomputes
// p = exp(q k^T scale - lse), then dv += p^T dout, ds = p * (dout v^T - delta) with
// delta = rowsum(dout * out), dq += scale ds k, dk += scale ds^T q.
static void grad_block(real *dq, real *dk, real *dv, real *p, real *ds, const HeadView *h,
                       const real *dout, const real *lse, const real *delta, size_t t0,
                       size_t t1, size_t u0, size_t cols) {
    size_t rows = t1 - t0, w = h->width, ow = h->out_width, Dk = h->Dk, Dv = h->Dv;
    cpu_gemm(0, 1, rows, cols, Dk, h->scale, h->q + t0 * w, w, h->k + u0 * w, w, 0, p, ATTN_BK);
    cpu_gemm(0, 1, rows, cols, Dv, 1, dout + t0 * ow, ow, h->v + u0 * w, w, 0, ds, ATTN_BK);
    for (size_t r = 0; r < rows; r++) {
        real *pr = p + r * ATTN_BK, *dr = ds + r * ATTN_BK, dl = delta[t0 + r];
        exp_row(pr, t0 + r, u0, cols, lse[t0 + r]);
#pragma omp simd
        for (size_t u = 0; u < cols; u++)
            dr[u] = pr[u] * (dr[u] - dl);
    }
    cpu_gemm(1, 0, cols, Dv, rows, 1, p, ATTN_BK, dout + t0 * ow, ow, 1, dv + u0 * w, w);
    cpu_gemm(0, 0, rows, Dk, cols, h->scale, ds, ATTN_BK, h->k + u0 * w, w, 1, dq + t0 * w, w);
    cpu_gemm(1, 0, cols, Dk, rows, h->scale, ds, ATTN_BK, h->q + t0 * w, w, 1, dk + u0 * w, w);
}

// delta (T) = rowsum(dout * out) for one head: equals rowsum(p * dp), the softmax
// gradient's subtrahend, without the probabilities.
static void head_delta(real *delta, const real *dout, const real *out, size_t T, size_t D,
                       size_t ow) {
    for (size_t t = 0; t < T; t++) {
        real acc = 0;
#pragma omp simd reduction(+ : acc)
        for (size_t d = 0; d < D; d++)
            acc += dout[t * ow + d] * out[t * ow + d];
        delta[t] = acc;
    }
}

// The forward's out and att (the logsumexp) suffice; datt is not used.
void cpu_attention_mla_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor out, Tensor qkv,
                                Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t Dk,
                                size_t Dv, double scale) {
    (void)datt;
    if (!dqkv.data) return;
    check_groups(H, KV);
    size_t width = (H + KV) * Dk + KV * Dv, out_width = H * Dv, group = H / KV;
    real *dx = TENSOR_R(dqkv);       // (B*T, (H + KV) * Dk + KV * Dv)
    const real *dy = TENSOR_R(dout); // (B*T, H*Dv)
    const real *y = TENSOR_R(out);   // (B*T, H*Dv)
    const real *x = TENSOR_R(qkv);   // (B*T, (H + KV) * Dk + KV * Dv)
    const real *lse = TENSOR_R(att); // (B, H, T)
#pragma omp parallel
    {
        real *p = CALLOC(2 * ATTN_BQ * ATTN_BK, sizeof(real)); // 2 x (ATTN_BQ, ATTN_BK)
        real *ds = p + ATTN_BQ * ATTN_BK, *delta = CALLOC(T, sizeof(real)); // delta (T)
#pragma omp for schedule(dynamic, 1)
        for (size_t bk = 0; bk < B * KV; bk++) {
            size_t b = bk / KV, kvh = bk % KV;
            const real *xb = x + b * T * width;
            real *dxb = dx + b * T * width;
            for (size_t h = kvh * group; h < (kvh + 1) * group; h++) {
                size_t vo = (H + KV) * Dk + kvh * Dv;
                HeadView view = {xb + h * Dk, xb + (H + kvh) * Dk, xb + vo, T, Dk, Dv, width,
                                 out_width, (real)scale};
                const real *dyh = dy + b * T * out_width + h * Dv;
                head_delta(delta, dyh, y + b * T * out_width + h * Dv, T, Dv, out_width);
                for (size_t t0 = 0; t0 < T; t0 += ATTN_BQ) {
                    size_t t1 = min_size(t0 + ATTN_BQ, T);
                    for (size_t u0 = 0; u0 < t1; u0 += ATTN_BK)
                        grad_block(dxb + h * Dk, dxb + (H + kvh) * Dk, dxb + vo, p, ds,
                                   &view, dyh, lse + (b * H + h) * T, delta, t0, t1, u0,
                                   min_size(u0 + ATTN_BK, t1) - u0);
                }
            }
        }
        free(delta);
        free(p);
    }
}

void cpu_attention_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor out, Tensor qkv,
                            Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t D) {
    cpu_attention_mla_backward(dqkv, datt, dout, out, qkv, att, B, T, H, KV, D, D,
                               1.0 / sqrt((double)D));
}
