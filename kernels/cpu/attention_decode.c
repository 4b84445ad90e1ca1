// attention_decode.c: decode-time attention over a KV cache (CPU): one new row per
// sequence, rotated by RoPE at its own position, appended to the cache and attending to
// every cached position before it. The training path's rotation (cpu_rope_row) and
// scaling, and its two products per head (here one group of query heads sharing a KV
// head, against every cached position: no blocking or online softmax needed).
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

// The `group` query heads q (group, D) sharing one KV head, over positions 0..n-1:
// o (group, D) = softmax(q k^T / sqrt D) v, two products per group as in training
// (k and v step `stride` per position); each row's softmax is summed in double.
// p (group, n) is scratch.
static void decode_group(real *o, const real *q, const real *k, const real *v, size_t group,
                         size_t n, size_t stride, size_t D, real *p) {
    cpu_gemm(0, 1, group, n, D, (real)(1.0 / sqrt((double)D)), q, D, k, stride, 0, p, n);
    for (size_t r = 0; r < group; r++) {
        real *s = p + r * n, mx = s[0];
        for (size_t u = 1; u < n; u++) mx = s[u] > mx ? s[u] : mx;
        double sum = 0.0;
        for (size_t u = 0; u < n; u++) {
            s[u] = (real)exp((double)(s[u] - mx));
            sum += s[u];
        }
        for (size_t u = 0; u < n; u++) s[u] = (real)(s[u] / sum);
    }
    cpu_gemm(0, 0, group, D, n, 1, p, n, v, stride, 0, o, D);
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
    for (size_t bg = 0; bg < B * KV; bg++) {
        size_t b = bg / KV, g = bg % KV, n = (size_t)p[b] + 1;
        real *scratch = CALLOC(group * n, sizeof *scratch); // (group, n)
        decode_group(TENSOR_R(out) + (b * H + g * group) * D,
                     TENSOR_R(qkv) + b * width + g * group * D, TENSOR_R(kcache) + b * seq + g * D,
                     TENSOR_R(vcache) + b * seq + g * D, group, n, KV * D, D, scratch);
        free(scratch);
    }
}
