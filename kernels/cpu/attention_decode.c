// attention_decode.c: decode-time attention over a KV cache (CPU): one new row per
// sequence, rotated by RoPE at its own position, appended to the cache and attending to
// every cached position before it. The training path's rotation (cpu_rope_row) and
// scaling; the softmax of one query row is summed in double (a row is short work: no
// blocking or online softmax needed).
#include "cpu_ops.h"
#include "../../base/util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// Rotates row b's query and key heads by pos, then copies its key and value heads into
// the cache at pos.
static void decode_append(real *row, real *kc, real *vc, size_t pos, size_t H, size_t KV,
                          size_t D, double theta) {
    double *cs = CALLOC(D, sizeof(double)); // (D/2, 2) cos, sin
    cpu_rope_angles(cs, pos, D, theta, 1.0);
    cpu_rope_row(row, cs, H + KV, D);
    free(cs);
    memcpy(kc + pos * KV * D, row + H * D, KV * D * sizeof *row);
    memcpy(vc + pos * KV * D, row + (H + KV) * D, KV * D * sizeof *row);
}

// One query head q (D) over positions 0..n-1 of its KV head: o (D) = softmax(q k / sqrt D) v.
// k and v step KV*D per position; s (n) is scratch.
static void decode_head(real *o, const real *q, const real *k, const real *v, size_t n,
                        size_t stride, size_t D, double *s) {
    double scale = 1.0 / sqrt((double)D), mx = -INFINITY, sum = 0.0;
    for (size_t u = 0; u < n; u++) {
        double dot = 0.0;
        for (size_t d = 0; d < D; d++)
            dot += (double)q[d] * (double)k[u * stride + d];
        s[u] = dot * scale;
        mx = s[u] > mx ? s[u] : mx;
    }
    for (size_t u = 0; u < n; u++) {
        s[u] = exp(s[u] - mx);
        sum += s[u];
    }
    for (size_t d = 0; d < D; d++) {
        double acc = 0.0;
        for (size_t u = 0; u < n; u++)
            acc += s[u] * (double)v[u * stride + d];
        o[d] = (real)(acc / sum);
    }
}

void cpu_attention_decode_forward(Tensor out, Tensor qkv, Tensor kcache, Tensor vcache,
                                  Tensor pos, size_t B, size_t L, size_t H, size_t KV,
                                  size_t D, double theta) {
    CHECK(KV > 0 && H % KV == 0, "attention: %zu query heads cannot share %zu KV heads", H, KV);
    CHECK(D % 2 == 0, "RoPE needs an even head size, not %zu", D);
    size_t width = (H + 2 * KV) * D, group = H / KV, seq = L * KV * D;
    const int32_t *p = TENSOR_I(pos); // (B)
    for (size_t b = 0; b < B; b++)
        CHECK(p[b] >= 0 && (size_t)p[b] < L, "decode: position %d outside the cache of %zu",
              (int)p[b], L);
#pragma omp parallel for schedule(static)
    for (size_t b = 0; b < B; b++)
        decode_append(TENSOR_R(qkv) + b * width, TENSOR_R(kcache) + b * seq,
                      TENSOR_R(vcache) + b * seq, (size_t)p[b], H, KV, D, theta);
#pragma omp parallel for schedule(dynamic)
    for (size_t bh = 0; bh < B * H; bh++) {
        size_t b = bh / H, h = bh % H, n = (size_t)p[b] + 1, g = h / group;
        double *s = CALLOC(n, sizeof *s);
        decode_head(TENSOR_R(out) + bh * D, TENSOR_R(qkv) + b * width + h * D,
                    TENSOR_R(kcache) + b * seq + g * D, TENSOR_R(vcache) + b * seq + g * D, n,
                    KV * D, D, s);
        free(s);
    }
}
