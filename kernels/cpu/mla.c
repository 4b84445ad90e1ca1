// mla.c: multi-head latent attention's own ops (CPU): assembling the attention input from
// the q, kv and shared k_pe projections with RoPE (YaRN) applied, and the decode-time
// attention over the latent cache in the absorbed form. The attention itself is
// attention.c's, with separate q/k and v head widths.
#include "cpu_ops.h"
#include "../rope_math.h"
#include "../../base/util.h"

#include <stdlib.h>
#include <string.h>

// cs (Dr/2, 2) = s cos(a_i), s sign sin(a_i) with a_i = t inv_freq_i, s YaRN's factor.
static void mla_angles(double *cs, size_t t, size_t Dr, const RopeSpec *rope, double sign) {
    double s = rope_cos_scale(rope);
    for (size_t i = 0; i < Dr / 2; i++) {
        double a = (double)t * rope_inv_freq(rope, i, Dr);
        cs[2 * i] = s * cos(a);
        cs[2 * i + 1] = s * sign * sin(a);
    }
}

// y (Dr) = (or +=) the rotate-half rotation of x (Dr) by cs, in double; y may be x.
static void mla_rotate(real *y, const real *x, const double *cs, size_t Dr, int accumulate) {
    size_t half = Dr / 2;
    for (size_t i = 0; i < half; i++) {
        double c = cs[2 * i], s = cs[2 * i + 1], x1 = x[i], x2 = x[i + half];
        double y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
        y[i] = (real)(accumulate ? y[i] + y1 : y1);
        y[i + half] = (real)(accumulate ? y[i + half] + y2 : y2);
    }
}

// (T, Dr/2, 2) angle table for positions 0..T-1, computed once per call.
static double *mla_table(size_t T, size_t Dr, const RopeSpec *rope, double sign) {
    CHECK(Dr % 2 == 0 && Dr > 0, "MLA RoPE needs an even qk_rope_dim, not %zu", Dr);
    double *cs = CALLOC(T * Dr, sizeof(double));
    for (size_t t = 0; t < T; t++)
        mla_angles(cs + t * Dr, t, Dr, rope, sign);
    return cs;
}

void cpu_mla_qkv_forward(Tensor qkv, Tensor q, Tensor kv, Tensor kpe, size_t B, size_t T,
                         size_t H, size_t Dn, size_t Dr, size_t Dv, RopeSpec rope) {
    size_t Dq = Dn + Dr, Dkv = Dn + Dv, W = 2 * H * Dq + H * Dv;
    double *cs = mla_table(T, Dr, &rope, 1.0);
    real *y = TENSOR_R(qkv);        // (N, 2*H*Dq + H*Dv)
    const real *xq = TENSOR_R(q);   // (N, H*Dq)
    const real *xkv = TENSOR_R(kv); // (N, H*(Dn+Dv))
    const real *xk = TENSOR_R(kpe); // (N, Dr)
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < B * T; n++) {
        const double *c = cs + (n % T) * Dr;
        real *yq = y + n * W, *yk = yq + H * Dq, *yv = yk + H * Dq;
        for (size_t h = 0; h < H; h++) {
            const real *qh = xq + n * H * Dq + h * Dq, *kvh = xkv + n * H * Dkv + h * Dkv;
            memcpy(yq + h * Dq, qh, Dn * sizeof(real));
            mla_rotate(yq + h * Dq + Dn, qh + Dn, c, Dr, 0);
            memcpy(yk + h * Dq, kvh, Dn * sizeof(real));
            mla_rotate(yk + h * Dq + Dn, xk + n * Dr, c, Dr, 0);
            memcpy(yv + h * Dv, kvh + Dn, Dv * sizeof(real));
        }
    }
    free(cs);
}

void cpu_mla_qkv_backward(Tensor dq, Tensor dkv, Tensor dkpe, Tensor dqkv, size_t B, size_t T,
                          size_t H, size_t Dn, size_t Dr, size_t Dv, RopeSpec rope) {
    size_t Dq = Dn + Dr, Dkv = Dn + Dv, W = 2 * H * Dq + H * Dv;
    double *cs = mla_table(T, Dr, &rope, -1.0); // the transposed rotation
    const real *g = TENSOR_R(dqkv);             // (N, 2*H*Dq + H*Dv)
    real *gq = TENSOR_R(dq);                    // (N, H*Dq)
    real *gkv = TENSOR_R(dkv);                  // (N, H*(Dn+Dv))
    real *gk = TENSOR_R(dkpe);                  // (N, Dr)
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < B * T; n++) {
        const double *c = cs + (n % T) * Dr;
        const real *tq = g + n * W, *tk = tq + H * Dq, *tv = tk + H * Dq;
        for (size_t h = 0; h < H; h++) {
            if (gq) {
                real *row = gq + n * H * Dq + h * Dq;
                for (size_t d = 0; d < Dn; d++)
                    row[d] += tq[h * Dq + d];
                mla_rotate(row + Dn, tq + h * Dq + Dn, c, Dr, 1);
            }
            if (gkv) {
                real *row = gkv + n * H * Dkv + h * Dkv;
                for (size_t d = 0; d < Dn; d++)
                    row[d] += tk[h * Dq + d];
                for (size_t d = 0; d < Dv; d++)
                    row[Dn + d] += tv[h * Dv + d];
            }
            if (gk) mla_rotate(gk + n * Dr, tk + h * Dq + Dn, c, Dr, 1); // heads in order
        }
    }
    free(cs);
}

// Sequence b's heads over positions 0..n-1 of its latent cache c (n, R) and rotated key
// cache kr (n, Dr), absorbed: s (H, n) scratch, lat (H, R) scratch.
static void decode_heads(real *out, real *q, const real *w, const real *c, const real *kr,
                         size_t n, size_t H, size_t Dn, size_t Dr, size_t Dv, size_t R,
                         double scale, real *s, real *lat) {
    size_t Dq = Dn + Dr, Dkv = Dn + Dv;
    for (size_t h = 0; h < H; h++) // q_lat_h (1, R) = q_nope_h (1, Dn) W_uk_h (Dn, R)
        cpu_gemm(0, 0, 1, R, Dn, 1, q + h * Dq, Dq, w + h * Dkv * R, R, 0, lat + h * R, R);
    cpu_gemm(0, 1, H, n, R, (real)scale, lat, R, c, R, 0, s, n);
    cpu_gemm(0, 1, H, n, Dr, (real)scale, q + Dn, Dq, kr, Dr, 1, s, n);
    for (size_t h = 0; h < H; h++) {
        real *sh = s + h * n, mx = sh[0];
        for (size_t u = 1; u < n; u++)
            mx = sh[u] > mx ? sh[u] : mx;
        double sum = 0.0;
        for (size_t u = 0; u < n; u++) {
            sh[u] = (real)exp((double)(sh[u] - mx));
            sum += sh[u];
        }
        for (size_t u = 0; u < n; u++)
            sh[u] = (real)(sh[u] / sum);
    }
    cpu_gemm(0, 0, H, R, n, 1, s, n, c, R, 0, lat, R); // o_lat (H, R)
    for (size_t h = 0; h < H; h++) // out_h (1, Dv) = o_lat_h (1, R) W_uv_h^T (R, Dv)
        cpu_gemm(0, 1, 1, Dv, R, 1, lat + h * R, R, w + (h * Dkv + Dn) * R, R, 0, out + h * Dv,
                 Dv);
}

void cpu_mla_decode_forward(Tensor out, Tensor q, Tensor latent, Tensor kpe, Tensor wkvb,
                            Tensor ccache, Tensor kcache, Tensor pos, size_t B, size_t L,
                            size_t H, size_t Dn, size_t Dr, size_t Dv, size_t R, RopeSpec rope,
                            double scale) {
    CHECK(Dr % 2 == 0 && Dr > 0, "MLA RoPE needs an even qk_rope_dim, not %zu", Dr);
    const int32_t *p = TENSOR_I(pos); // (B)
    for (size_t b = 0; b < B; b++)
        CHECK(p[b] >= 0 && (size_t)p[b] < L, "decode: position %d outside the cache of %zu",
              (int)p[b], L);
    size_t Dq = Dn + Dr;
#pragma omp parallel for schedule(dynamic)
    for (size_t b = 0; b < B; b++) {
        size_t t = (size_t)p[b], n = t + 1;
        real *c = TENSOR_R(ccache) + b * L * R, *kr = TENSOR_R(kcache) + b * L * Dr;
        real *qb = TENSOR_R(q) + b * H * Dq;
        double *cs = CALLOC(Dr, sizeof(double)); // (Dr/2, 2)
        mla_angles(cs, t, Dr, &rope, 1.0);
        memcpy(c + t * R, TENSOR_R(latent) + b * R, R * sizeof(real));
        mla_rotate(kr + t * Dr, TENSOR_R(kpe) + b * Dr, cs, Dr, 0);
        for (size_t h = 0; h < H; h++) // in place: each pair is read before it is written
            mla_rotate(qb + h * Dq + Dn, qb + h * Dq + Dn, cs, Dr, 0);
        real *s = CALLOC(H * n + H * R, sizeof(real)); // (H, n) scores, (H, R) latents
        decode_heads(TENSOR_R(out) + b * H * Dv, qb, TENSOR_R(wkvb), c, kr, n, H, Dn, Dr, Dv, R,
                     scale, s, s + H * n);
        free(s);
        free(cs);
    }
}
