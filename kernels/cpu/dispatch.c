// dispatch.c: moving token rows to and from the experts (CPU): the dispatch plan (each
// expert's rows, grouped), gathering rows into that order, and combining expert outputs
// back per token with their gates. Semantics and shapes are in kernels.h.
#include "cpu_ops.h"
#include "../../base/util.h"

#include <stdlib.h>
#include <string.h>

// dst (C) += src (C).
CPU_CLONES static void add_row(real *dst, const real *src, size_t C) {
#pragma omp simd
    for (size_t c = 0; c < C; c++)
        dst[c] += src[c];
}

void cpu_dispatch_plan(Tensor offsets, Tensor rows, Tensor slot, Tensor idx, Tensor keep,
                       size_t N, size_t E, size_t k) {
    int32_t *off = TENSOR_I(offsets);   // (E + 1)
    int32_t *row = TENSOR_I(rows);      // (N * k), the first off[E] written
    int32_t *sl = TENSOR_I(slot);       // (N, k)
    const int32_t *top = TENSOR_I(idx); // (N, k)
    const int32_t *kp = TENSOR_I(keep); // (N, k)
    cpu_check_experts(top, N * k, E, "dispatch_plan");
    memset(off, 0, (E + 1) * sizeof(int32_t));
    for (size_t a = 0; a < N * k; a++)
        off[top[a] + 1] += kp[a] != 0;
    for (size_t e = 0; e < E; e++)
        off[e + 1] += off[e];
    int32_t *next = CALLOC(E, sizeof(int32_t)); // (E) next free permuted row per expert
    memcpy(next, off, E * sizeof(int32_t));
    for (size_t a = 0; a < N * k; a++) {
        if (!kp[a]) {
            sl[a] = -1;
            continue;
        }
        int32_t m = next[top[a]]++;
        row[m] = (int32_t)(a / k);
        sl[a] = m;
    }
    free(next);
}

void cpu_gather_rows_forward(Tensor xp, Tensor x, Tensor rows, Tensor offsets, size_t E,
                             size_t C) {
    real *out = TENSOR_R(xp);            // (M, C)
    const real *in = TENSOR_R(x);        // (N, C)
    const int32_t *row = TENSOR_I(rows); // (M)
    size_t M = (size_t)TENSOR_I(offsets)[E];
#pragma omp parallel for
    for (size_t m = 0; m < M; m++)
        memcpy(out + m * C, in + (size_t)row[m] * C, C * sizeof(real));
}

// dx is summed per token, so threads split tokens without racing. Each token's permuted
// rows are taken in ascending order (a counting sort of rows by token), the order in which
// the rows come: the sums are the same, bit for bit, as adding row by row.
void cpu_gather_rows_backward(Tensor dx, Tensor dxp, Tensor rows, Tensor offsets, size_t E,
                              size_t C) {
    if (!dx.data) return;
    real *d = TENSOR_R(dx);              // (N, C)
    const real *dp = TENSOR_R(dxp);      // (M, C)
    const int32_t *row = TENSOR_I(rows); // (M)
    size_t M = (size_t)TENSOR_I(offsets)[E], N = 0;
    for (size_t m = 0; m < M; m++)
        if ((size_t)row[m] + 1 > N) N = (size_t)row[m] + 1;
    size_t *start = CALLOC(N + 1, sizeof *start); // (N+1) each token's first entry of order
    int32_t *order = CALLOC(M ? M : 1, sizeof *order); // (M) permuted rows grouped by token
    for (size_t m = 0; m < M; m++)
        start[row[m] + 1]++;
    for (size_t n = 0; n < N; n++)
        start[n + 1] += start[n];
    for (size_t m = 0; m < M; m++) // start[n] ends as the start of token n + 1
        order[start[row[m]]++] = (int32_t)m;
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) {
        for (size_t i = n ? start[n - 1] : 0; i < start[n]; i++)
            add_row(d + n * C, dp + (size_t)order[i] * C, C);
    }
    free(order);
    free(start);
}

// yr (C) = sum over the token's kept choices j, in order, of gates[j] * yp[slot[j]].
CPU_CLONES static void combine_row(real *yr, const real *in, const real *g, const int32_t *sl,
                                   size_t k, size_t C) {
    memset(yr, 0, C * sizeof(real));
    for (size_t j = 0; j < k; j++) {
        if (sl[j] < 0) continue;
        const real *src = in + (size_t)sl[j] * C;
        real gj = g[j];
#pragma omp simd
        for (size_t c = 0; c < C; c++)
            yr[c] += gj * src[c];
    }
}

void cpu_combine_forward(Tensor y, Tensor yp, Tensor gates, Tensor slot, size_t N, size_t k,
                         size_t C) {
    real *out = TENSOR_R(y);            // (N, C)
    const real *in = TENSOR_R(yp);      // (M, C)
    const real *g = TENSOR_R(gates);    // (N, k)
    const int32_t *sl = TENSOR_I(slot); // (N, k)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        combine_row(out + n * C, in, g + n * k, sl + n * k, k, C);
}

// dst (C) += g * src (C).
CPU_CLONES static void add_scaled_row(real *dst, real g, const real *src, size_t C) {
#pragma omp simd
    for (size_t c = 0; c < C; c++)
        dst[c] += g * src[c];
}

void cpu_combine_backward(Tensor dyp, Tensor dgates, Tensor dy, Tensor yp, Tensor gates,
                          Tensor slot, size_t N, size_t k, size_t C) {
    real *dp = TENSOR_R(dyp);           // (M, C)
    real *dg = TENSOR_R(dgates);        // (N, k)
    const real *dout = TENSOR_R(dy);    // (N, C)
    const real *in = TENSOR_R(yp);      // (M, C)
    const real *g = TENSOR_R(gates);    // (N, k)
    const int32_t *sl = TENSOR_I(slot); // (N, k)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) {
        const real *dyr = dout + n * C;
        // Each permuted row has one (n, j), so no two tokens write the same dp row.
        for (size_t j = 0; j < k; j++) {
            int32_t m = sl[n * k + j];
            if (m < 0) continue;
            if (dp) add_scaled_row(dp + (size_t)m * C, g[n * k + j], dyr, C);
            if (dg) dg[n * k + j] += (real)cpu_row_dot(dyr, in + (size_t)m * C, NULL, C);
        }
    }
}
