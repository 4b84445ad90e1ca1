// attention.c: RoPE and fused causal grouped-query attention (CPU).
//
// Attention shares heads out over threads: the forward goes over (batch, head), the
// backward over (batch, KV head), so that the query heads sharing a key/value head add
// their key and value gradients in one thread, in a fixed order. A head's work is
// attention_tiles.h's (blocked, online softmax, one logsumexp per query kept), compiled per
// instruction set; the widest the CPU runs is used unless a test forces one.
#include "cpu_ops.h"
#include "../../base/util.h"
#include "attention_tiles.h"

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

// Head by head, pairs i in vectors (CPU_CLONES): each pair's arithmetic is the same
// whatever the order, so the same bits.
CPU_CLONES void cpu_rope_row(real *row, const double *cs, size_t heads, size_t D) {
    size_t half = D / 2;
    for (size_t head = 0; head < heads; head++) {
        real *x1 = row + head * D, *x2 = x1 + half;
#pragma omp simd
        for (size_t i = 0; i < half; i++) {
            double c = cs[2 * i], s = cs[2 * i + 1], v1 = x1[i], v2 = x2[i];
            x1[i] = (real)(v1 * c - v2 * s);
            x2[i] = (real)(v2 * c + v1 * s);
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

static void check_groups(size_t H, size_t KV) {
    CHECK(KV > 0 && H % KV == 0, "attention: %zu query heads cannot share %zu KV heads", H, KV);
}

static const AttnTiles *tiles_forced;

static const AttnTiles *tiles_for_cpu(void) {
    if (tiles_forced) return tiles_forced;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return &attn_tiles_avx512;
    if (__builtin_cpu_supports("x86-64-v3")) return &attn_tiles_avx2;
#endif
    return &attn_tiles_base;
}

const char *cpu_attention_tiles(const char *name) {
    if (name) {
        const AttnTiles *all[] = {&attn_tiles_avx512, &attn_tiles_avx2, &attn_tiles_base};
        tiles_forced = NULL;
        for (size_t i = 0; i < sizeof all / sizeof *all; i++)
            if (!strcmp(all[i]->name, name)) tiles_forced = all[i];
        CHECK(tiles_forced, "attention: no tile variant named '%s'", name);
    }
    return tiles_for_cpu()->name;
}

static size_t pad_to(size_t n) { return (n + ATTN_PAD - 1) / ATTN_PAD * ATTN_PAD; }

static real *scratch_alloc(size_t n) {
    size_t bytes = (n * sizeof(real) + 63) / 64 * 64;
    real *p = aligned_alloc(64, bytes);
    CHECK(p, "attention: out of memory for %zu bytes of scratch", bytes);
    memset(p, 0, bytes);
    return p;
}

void attn_scratch_init(AttnScratch *ws, size_t T, size_t Dk, size_t Dv) {
    ws->s = scratch_alloc(ATTN_BQ * ATTN_BK);
    ws->ds = scratch_alloc(ATTN_BQ * ATTN_BK);
    ws->kt = scratch_alloc(Dk * pad_to(T));
    ws->vt = scratch_alloc(Dv * pad_to(T));
    ws->rows_k = scratch_alloc(T * pad_to(Dk));
    ws->rows_v = scratch_alloc(T * pad_to(Dv));
    ws->acc_dk = scratch_alloc(T * pad_to(Dk));
    ws->acc_dv = scratch_alloc(T * pad_to(Dv));
    ws->rows_q = scratch_alloc(ATTN_BQ * pad_to(Dk));
    ws->rows_dout = scratch_alloc(ATTN_BQ * pad_to(Dv));
    ws->m = scratch_alloc(ATTN_BQ);
    ws->l = scratch_alloc(ATTN_BQ);
}

void attn_scratch_free(AttnScratch *ws) {
    real *bufs[] = {ws->s,      ws->ds,     ws->kt,     ws->vt,     ws->rows_k, ws->rows_v,
                    ws->acc_dk, ws->acc_dv, ws->rows_q, ws->rows_dout, ws->m,   ws->l};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        free(bufs[i]);
}

void cpu_attention_plan(size_t *att_numel, size_t *datt_numel, size_t B, size_t T, size_t H,
                        size_t KV, size_t D, int bf16) {
    (void)KV, (void)D, (void)bf16;
    *att_numel = B * H * T; // one logsumexp per query
    *datt_numel = 0;        // the backward's scratch is its own, per thread
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
    const AttnTiles *tiles = tiles_for_cpu();
#pragma omp parallel
    {
        AttnScratch ws;
        attn_scratch_init(&ws, T, Dk, Dv);
#pragma omp for schedule(dynamic, 1)
        for (size_t bh = 0; bh < B * H; bh++) {
            size_t b = bh / H, h = bh % H, kvh = h / group;
            const real *xb = x + b * T * width;
            HeadView view = {xb + h * Dk, xb + (H + kvh) * Dk, xb + (H + KV) * Dk + kvh * Dv, T,
                             Dk, Dv, width, H * Dv, (real)scale};
            tiles->forward_head(o + b * T * H * Dv + h * Dv, lse + bh * T, &view, &ws);
        }
        attn_scratch_free(&ws);
    }
}

void cpu_attention_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T, size_t H,
                           size_t KV, size_t D) {
    cpu_attention_mla_forward(out, att, qkv, B, T, H, KV, D, D, 1.0 / sqrt((double)D));
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
    const AttnTiles *tiles = tiles_for_cpu();
#pragma omp parallel
    {
        AttnScratch ws;
        attn_scratch_init(&ws, T, Dk, Dv);
        real *delta = CALLOC(T, sizeof(real)); // (T)
#pragma omp for schedule(dynamic, 1)
        for (size_t bk = 0; bk < B * KV; bk++) {
            size_t b = bk / KV, kvh = bk % KV, vo = (H + KV) * Dk + kvh * Dv;
            const real *xb = x + b * T * width;
            real *dxb = dx + b * T * width;
            for (size_t h = kvh * group; h < (kvh + 1) * group; h++) {
                HeadView view = {xb + h * Dk, xb + (H + kvh) * Dk, xb + vo, T, Dk, Dv, width,
                                 out_width, (real)scale};
                const real *dyh = dy + b * T * out_width + h * Dv;
                head_delta(delta, dyh, y + b * T * out_width + h * Dv, T, Dv, out_width);
                tiles->backward_head(dxb + h * Dk, dxb + (H + kvh) * Dk, dxb + vo, &view, dyh,
                                     lse + (b * H + h) * T, delta, &ws);
            }
        }
        free(delta);
        attn_scratch_free(&ws);
    }
}

void cpu_attention_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor out, Tensor qkv,
                            Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t D) {
    cpu_attention_mla_backward(dqkv, datt, dout, out, qkv, att, B, T, H, KV, D, D,
                               1.0 / sqrt((double)D));
}
