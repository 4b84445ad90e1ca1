// dispatch.c: moving token rows to and from the experts (CPU): the dispatch plan (each
// expert's rows, grouped), gathering rows into that order, and combining expert outputs
// back per token with their gates. Semantics and shapes are in kernels.h.
#include "cpu_ops.h"
#include "../../base/util.h"

#include <stdlib.h>
#include <string.h>

// Columns per task in gather backward: one cache-friendly block of a row.
#define GATHER_COLS 64

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

// A token owns one permuted row per kept choice, so splitting the work by row would race;
// splitting by column block keeps every += in permuted-row order.
void cpu_gather_rows_backward(Tensor dx, Tensor dxp, Tensor rows, Tensor offsets, size_t E,
                              size_t C) {
    if (!dx.data) return;
    real *d = TENSOR_R(dx);              // (N, C)
    const real *dp = TENSOR_R(dxp);      // (M, C)
    const int32_t *row = TENSOR_I(rows); // (M)
    size_t M = (size_t)TENSOR_I(offsets)[E];
    size_t blocks = util_ceil_div(C, GATHER_COLS);
#pragma omp parallel for
    for (size_t b = 0; b < blocks; b++) {
        size_t c0 = b * GATHER_COLS, c1 = c0 + GATHER_COLS < C ? c0 + GATHER_COLS : C;
        for (size_t m = 0; m < M; m++) {
            real *dst = d + (size_t)row[m] * C;
            const real *src = dp + m * C;
            for (size_t c = c0; c < c1; c++)
                dst[c] += src[c];
        }
    }
}

void cpu_combine_forward(Tensor y, Tensor yp, Tensor gates, Tensor slot, size_t N, size_t k,
                         size_t C) {
    real *out = TENSOR_R(y);            // (N, C)
    const real *in = TENSOR_R(yp);      // (M, C)
    const real *g = TENSOR_R(gates);    // (N, k)
    const int32_t *sl = TENSOR_I(slot); // (N, k)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) {
        real *yr = out + n * C;
        memset(yr, 0, C * sizeof(real));
        for (size_t j = 0; j < k; j++) {
            int32_t m = sl[n * k + j];
            if (m < 0) continue;
            const real *src = in + (size_t)m * C;
            real gj = g[n * k + j];
            for (size_t c = 0; c < C; c++)
                yr[c] += gj * src[c];
        }
    }
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
        for (size_t j = 0; j < k; j++) {
            int32_t m = sl[n * k + j];
            if (m < 0) continue;
            // Each permuted row has one (n, j), so no two tokens write the same dp row.
            if (dp) {
                real *dst = dp + (size_t)m * C;
                real gj = g[n * k + j];
                for (size_t c = 0; c < C; c++)
                    dst[c] += gj * dyr[c];
            }
            if (dg) {
                const real *src = in + (size_t)m * C;
                double dot = 0.0;
                for (size_t c = 0; c < C; c++)
                    dot += (double)dyr[c] * src[c];
                dg[n * k + j] += (real)dot;
            }
        }
    }
}
