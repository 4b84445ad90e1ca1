// dense.c: embedding, RMSNorm, matmul, SwiGLU, grouped experts and cross-entropy (CPU).
//
// Matrix products go through OpenBLAS gemm; row loops are parallelised with OpenMP.
// Reductions (sums of squares, dot products, logsumexp, column sums) run in double and
// are stored as `real`. Every parallel loop writes disjoint outputs, so results do not
// depend on scheduling.
#include "cpu_ops.h"
#include "../../base/util.h"
#include "../exp_math.h"
#include "vexp.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#ifdef MOE_REAL_F64
#define cblas_gemm cblas_dgemm
#else
#define cblas_gemm cblas_sgemm
#endif

// cpu_row_dot's double lanes: one AVX-512 vector, two AVX2 ones.
#define DOT_LANES 8

// Column c sums into lane c % DOT_LANES; the lanes are added in order at the end.
CPU_CLONES double cpu_row_dot(const real *a, const real *b, const real *w, size_t C) {
    double lane[DOT_LANES] = {0};
    size_t c = 0;
    if (w) {
        for (; c + DOT_LANES <= C; c += DOT_LANES)
#pragma omp simd
            for (size_t l = 0; l < DOT_LANES; l++)
                lane[l] += (double)a[c + l] * w[c + l] * b[c + l];
        for (size_t l = 0; c < C; c++, l++)
            lane[l] += (double)a[c] * w[c] * b[c];
    } else {
        for (; c + DOT_LANES <= C; c += DOT_LANES)
#pragma omp simd
            for (size_t l = 0; l < DOT_LANES; l++)
                lane[l] += (double)a[c + l] * b[c + l];
        for (size_t l = 0; c < C; c++, l++)
            lane[l] += (double)a[c] * b[c];
    }
    double sum = 0.0;
    for (size_t l = 0; l < DOT_LANES; l++)
        sum += lane[l];
    return sum;
}

// Column sums over rows (weight gradients, repeated embedding rows) are split into
// blocks of this many columns: one thread owns a block and walks the rows in order,
// which is deterministic and reads each row contiguously.
#define COL_BLOCK 64

void cpu_gemm(int trans_a, int trans_b, size_t m, size_t n, size_t k, real alpha, const real *a,
              size_t lda, const real *b, size_t ldb, real beta, real *c, size_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) { // an empty sum; BLAS would reject the zero leading dimension
        if (beta == 0)
            for (size_t i = 0; i < m; i++)
                memset(c + i * ldc, 0, n * sizeof(real));
        return;
    }
    CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
              ldc <= INT_MAX,
          "gemm of (%zu x %zu x %zu) exceeds BLAS's int sizes", m, n, k);
    cblas_gemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
               trans_b ? CblasTrans : CblasNoTrans, (int)m, (int)n, (int)k, alpha, a, (int)lda,
               b, (int)ldb, beta, c, (int)ldc);
}

// ---- embedding ------------------------------------------------------------------------

// Dies on a token outside the table: a bad id would otherwise read or write past it.
static void check_tokens(const int32_t *tok, size_t N, size_t rows) {
    for (size_t n = 0; n < N; n++)
        CHECK(tok[n] >= 0 && (size_t)tok[n] < rows,
              "token %zu is %d, outside the embedding table of %zu rows", n, (int)tok[n], rows);
}

void cpu_embedding_forward(Tensor out, Tensor tokens, Tensor table, size_t N, size_t C) {
    real *o = TENSOR_R(out);               // (N, C)
    const int32_t *tok = TENSOR_I(tokens); // (N)
    const real *tab = TENSOR_R(table);     // (V, C)
    check_tokens(tok, N, C ? table.numel / C : 0);
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++)
        memcpy(o + n * C, tab + (size_t)tok[n] * C, C * sizeof(real));
}

void cpu_embedding_backward(Tensor dtable, Tensor dout, Tensor tokens, size_t N, size_t C) {
    real *dtab = TENSOR_R(dtable); // (V, C)
    if (!dtab) return;
    const real *dy = TENSOR_R(dout);       // (N, C)
    const int32_t *tok = TENSOR_I(tokens); // (N)
    check_tokens(tok, N, C ? dtable.numel / C : 0);
    // Repeated tokens add into the same row, so threads split columns, not tokens.
    size_t blocks = util_ceil_div(C, COL_BLOCK);
#pragma omp parallel for schedule(static)
    for (size_t blk = 0; blk < blocks; blk++) {
        size_t c0 = blk * COL_BLOCK, c1 = c0 + COL_BLOCK < C ? c0 + COL_BLOCK : C;
        for (size_t n = 0; n < N; n++) {
            real *row = dtab + (size_t)tok[n] * C;
            for (size_t c = c0; c < c1; c++)
                row[c] += dy[n * C + c];
        }
    }
}

// ---- RMSNorm --------------------------------------------------------------------------

// o (C) = x r w (CPU_CLONES).
CPU_CLONES static void scale_row(real *o, const real *x, real r, const real *w, size_t C) {
#pragma omp simd
    for (size_t c = 0; c < C; c++)
        o[c] = x[c] * r * w[c];
}

void cpu_rmsnorm_forward(Tensor out, Tensor rstd, Tensor x, Tensor w, size_t N, size_t C,
                         double eps) {
    real *o = TENSOR_R(out);      // (N, C)
    real *rs = TENSOR_R(rstd);    // (N)
    const real *xs = TENSOR_R(x); // (N, C)
    const real *ws = TENSOR_R(w); // (C)
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        const real *xr = xs + n * C;
        double ss = cpu_row_dot(xr, xr, NULL, C);
        real r = (real)(1.0 / sqrt(ss / (double)C + eps));
        rs[n] = r;
        scale_row(o + n * C, xr, r, ws, C);
    }
}

// dx (C) += r w dy - k x (CPU_CLONES).
CPU_CLONES static void rmsnorm_dx_row(real *dx, const real *dy, const real *x, const real *w,
                                      double r, double k, size_t C) {
#pragma omp simd
    for (size_t c = 0; c < C; c++)
        dx[c] += (real)(r * w[c] * dy[c] - k * x[c]);
}

// out = x r w with r = (mean x^2 + eps)^(-1/2), so dr/dx_j = -r^3 x_j / C and
//   dx_i = r w_i dout_i - r^3 x_i / C * sum_j dout_j w_j x_j.
static void rmsnorm_backward_x(real *dx, const real *dy, const real *x, const real *w,
                               const real *rstd, size_t N, size_t C) {
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        const real *xr = x + n * C, *dyr = dy + n * C;
        double dot = cpu_row_dot(dyr, xr, w, C);
        double r = rstd[n];
        double k = r * r * r * dot / (double)C;
        rmsnorm_dx_row(dx + n * C, dyr, xr, w, r, k, C);
    }
}

// acc (n) += dy (n) x (n) r, in double (CPU_CLONES).
CPU_CLONES static void rmsnorm_dw_row(double *acc, const real *dy, const real *x, real r,
                                      size_t n) {
#pragma omp simd
    for (size_t c = 0; c < n; c++)
        acc[c] += (double)dy[c] * x[c] * r;
}

// dw_c = sum_n dout[n, c] x[n, c] r[n]: a column sum, blocked so threads own columns.
static void rmsnorm_backward_w(real *dw, const real *dy, const real *x, const real *rstd,
                               size_t N, size_t C) {
    size_t blocks = util_ceil_div(C, COL_BLOCK);
#pragma omp parallel for schedule(static)
    for (size_t blk = 0; blk < blocks; blk++) {
        size_t c0 = blk * COL_BLOCK, c1 = c0 + COL_BLOCK < C ? c0 + COL_BLOCK : C;
        double acc[COL_BLOCK] = {0};
        for (size_t n = 0; n < N; n++)
            rmsnorm_dw_row(acc, dy + n * C + c0, x + n * C + c0, rstd[n], c1 - c0);
        for (size_t c = c0; c < c1; c++)
            dw[c] += (real)acc[c - c0];
    }
}

void cpu_rmsnorm_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, Tensor rstd,
                          size_t N, size_t C) {
    if (dx.data)
        rmsnorm_backward_x(TENSOR_R(dx), TENSOR_R(dout), TENSOR_R(x), TENSOR_R(w),
                           TENSOR_R(rstd), N, C);
    if (dw.data)
        rmsnorm_backward_w(TENSOR_R(dw), TENSOR_R(dout), TENSOR_R(x), TENSOR_R(rstd), N, C);
}

// ---- matmul ---------------------------------------------------------------------------

void cpu_matmul_forward(Tensor out, Tensor x, Tensor w, size_t N, size_t K, size_t M) {
    // out (N, M) = x (N, K) @ w (M, K)^T
    cpu_gemm(0, 1, N, M, K, 1, TENSOR_R(x), K, TENSOR_R(w), K, 0, TENSOR_R(out), M);
}

void cpu_matmul_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, size_t N,
                         size_t K, size_t M) {
    // dx (N, K) += dout (N, M) @ w (M, K)
    if (dx.data)
        cpu_gemm(0, 0, N, K, M, 1, TENSOR_R(dout), M, TENSOR_R(w), K, 1, TENSOR_R(dx), K);
    // dw (M, K) += dout^T (M, N) @ x (N, K)
    if (dw.data)
        cpu_gemm(1, 0, M, K, N, 1, TENSOR_R(dout), M, TENSOR_R(x), K, 1, TENSOR_R(dw), K);
}

// ---- SwiGLU ---------------------------------------------------------------------------

static real sigmoid(real z) { return 1 / (1 + vexp(-z)); }

// out (N, F) = silu(h1) * h3 with h13 (N, 2F) rows [h1 | h3].
CPU_CLONES static void swiglu_row(real *o, const real *h1, const real *h3, size_t F) {
#pragma omp simd
    for (size_t f = 0; f < F; f++)
        o[f] = h1[f] * sigmoid(h1[f]) * h3[f];
}

static void swiglu_rows(real *out, const real *h13, size_t N, size_t F) {
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++)
        swiglu_row(out + n * F, h13 + n * 2 * F, h13 + n * 2 * F + F, F);
}

// One row of swiglu_backward_rows: dh1, dh3 (F) from g (F) and h1, h3 (F).
CPU_CLONES static void swiglu_backward_row(real *dh1, real *dh3, const real *g, const real *h1,
                                           const real *h3, size_t F, int accumulate) {
#pragma omp simd
    for (size_t f = 0; f < F; f++) {
        real z = h1[f], s = sigmoid(z);
        real d1 = g[f] * h3[f] * s * (1 + z * (1 - s)), d3 = g[f] * z * s;
        dh1[f] = accumulate ? dh1[f] + d1 : d1;
        dh3[f] = accumulate ? dh3[f] + d3 : d3;
    }
}

// dh13 (N, 2F) += d/dh13 of silu(h1) * h3 (accumulate = 0: =, so scratch needs no
// clearing); silu'(z) = s (1 + z (1 - s)), s = sigmoid(z).
static void swiglu_backward_rows(real *dh13, const real *dout, const real *h13, size_t N,
                                 size_t F, int accumulate) {
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        const real *h1 = h13 + n * 2 * F;
        real *dh1 = dh13 + n * 2 * F;
        swiglu_backward_row(dh1, dh1 + F, dout + n * F, h1, h1 + F, F, accumulate);
    }
}

void cpu_swiglu_forward(Tensor out, Tensor h13, size_t N, size_t F) {
    swiglu_rows(TENSOR_R(out), TENSOR_R(h13), N, F);
}

void cpu_swiglu_backward(Tensor dh13, Tensor dout, Tensor h13, size_t N, size_t F) {
    if (dh13.data) swiglu_backward_rows(TENSOR_R(dh13), TENSOR_R(dout), TENSOR_R(h13), N, F, 1);
}

// ---- grouped experts ------------------------------------------------------------------

// Validates offsets (E+1) and returns M = offsets[E], the routed rows in use.
static size_t expert_rows(const int32_t *off, size_t E) {
    CHECK(off[0] == 0, "expert offsets must start at 0, not %d", (int)off[0]);
    for (size_t e = 0; e < E; e++)
        CHECK(off[e + 1] >= off[e], "expert offsets decrease at expert %zu (%d -> %d)", e,
              (int)off[e], (int)off[e + 1]);
    return (size_t)off[E];
}

// Routed row counts are known only at run time: refuse a buffer too small for them.
static void check_fits(Tensor t, size_t need, const char *name) {
    CHECK(!t.data || t.numel >= need, "experts: %s holds %zu elements, needs %zu", name,
          t.numel, need);
}

// Few experts: each one's GEMMs use every thread, one expert after another. Many (at
// least two per thread): the experts are shared out among the threads, each expert's
// GEMMs and SwiGLU on its own thread, which spares small GEMMs the fork and join per
// product. An expert's result never depends on which thread ran it.
static int experts_by_thread(size_t E) { return E >= 2 * (size_t)omp_get_max_threads(); }

// dst (C) = src, or gate * src.
static void pick_row(real *dst, const real *src, const real *gate, size_t C) {
    if (!gate) {
        memcpy(dst, src, C * sizeof(real));
        return;
    }
    for (size_t c = 0; c < C; c++)
        dst[c] = *gate * src[c];
}

// Where the experts read their input rows and, in backward, their output gradient rows:
// xp's and dyp's own rows, or (the dispatch fused in, ExpertRoute) rows of x and gate-scaled
// rows of dy, copied one expert at a time into the running thread's scratch right before
// the products that read them, so they are read from cache and no (M, C) gathered copy is
// written to memory and read back.
typedef struct {
    const real *xp, *dyp; // (M, C): route.rows NULL (dyp also: route.dy NULL)
    const real *x, *dy;   // (N, C)
    const int32_t *rows;  // (M) permuted row -> token, or NULL
    real *gate;           // (M) each permuted row's gate: dy given
    const real *yp;       // (M, C) the experts' outputs: gate gradients wanted
    double *dg;           // (M) each permuted row's gate gradient, or NULL
    real *scratch;        // (slots, 2, most, C): one expert's x rows and dy rows per thread
    size_t most, C;       // most: the largest expert's rows
} ExpertInput;

// gate[slot[a]] = gates[a] for the kept assignments a: each permuted row has one.
static real *expert_row_gates(const ExpertRoute *r, size_t M) {
    size_t n = r->slot.numel;
    const int32_t *sl = TENSOR_I(r->slot); // (N, k)
    const real *g = TENSOR_R(r->gates);    // (N, k)
    check_fits(r->gates, n, "gates");
    real *gate = CALLOC(M + 1, sizeof *gate);
    for (size_t a = 0; a < n; a++) {
        CHECK(sl[a] < 0 || (size_t)sl[a] < M, "experts: slot %zu is %d of %zu rows", a,
              (int)sl[a], M);
        if (sl[a] >= 0) gate[sl[a]] = g[a];
    }
    return gate;
}

static void expert_input_init(ExpertInput *in, Tensor xp, Tensor dyp, const ExpertRoute *r,
                              const int32_t *off, size_t E, size_t C, int by_thread) {
    size_t M = (size_t)off[E];
    *in = (ExpertInput){.xp = TENSOR_R(xp), .dyp = TENSOR_R(dyp), .C = C};
    if (!r->rows.data) {
        check_fits(xp, M * C, "xp");
        return;
    }
    check_fits(r->rows, M, "rows");
    in->x = TENSOR_R(r->x), in->rows = TENSOR_I(r->rows);
    size_t N = C ? r->x.numel / C : 0;
    for (size_t m = 0; m < M; m++)
        CHECK(in->rows[m] >= 0 && (size_t)in->rows[m] < N,
              "experts: row %zu reads token %d of %zu", m, (int)in->rows[m], N);
    if (r->dy.data) {
        check_fits(r->dy, N * C, "dy");
        in->dy = TENSOR_R(r->dy), in->dyp = NULL;
        in->gate = expert_row_gates(r, M);
    }
    if (r->dy.data && r->dgates.data) {
        check_fits(r->dgates, r->slot.numel, "dgates");
        check_fits(r->yp, M * C, "yp");
        in->yp = TENSOR_R(r->yp);
        in->dg = CALLOC(M + 1, sizeof *in->dg);
    }
    for (size_t e = 0; e < E; e++)
        if ((size_t)(off[e + 1] - off[e]) > in->most) in->most = (size_t)(off[e + 1] - off[e]);
    size_t slots = by_thread ? (size_t)omp_get_max_threads() : 1;
    in->scratch = CALLOC(slots * 2 * in->most * C + 1, sizeof(real));
}

static void expert_input_free(ExpertInput *in) {
    free(in->scratch);
    free(in->gate);
    free(in->dg);
}

// Permuted row m's gate gradient, dot(dy[rows[m]], yp[m]), into in->dg.
static void expert_gate_grad(const ExpertInput *in, size_t m) {
    size_t C = in->C;
    in->dg[m] = cpu_row_dot(in->dy + (size_t)in->rows[m] * C, in->yp + m * C, NULL, C);
}

// dgates[a] += the gate gradient of assignment a's permuted row, for the kept a: in
// assignment order, as combine's backward adds them.
static void expert_gate_grads_add(const ExpertInput *in, const ExpertRoute *r) {
    real *dg = TENSOR_R(r->dgates);        // (N, k)
    const int32_t *sl = TENSOR_I(r->slot); // (N, k)
    for (size_t a = 0; a < r->slot.numel; a++)
        if (sl[a] >= 0) dg[a] += (real)in->dg[sl[a]];
}

// Permuted row m into dst: src[rows[m]], or gate[m] times it. The dy rows (gate given)
// also give their gate gradient when wanted, while the row is in cache.
static void pick_at(const ExpertInput *in, real *dst, const real *src, const real *gate,
                    size_t m) {
    pick_row(dst, src + (size_t)in->rows[m] * in->C, gate ? gate + m : NULL, in->C);
    if (gate && in->dg) expert_gate_grad(in, m);
}

// Rows [r0, r0 + n) of src picked by rows, times gate[m] when gate is given, into scratch
// half `half` of this call's slot. by_thread: inside the experts' parallel loop (this
// thread's slot, one thread copies); else the copy is shared out.
static const real *expert_pick_rows(const ExpertInput *in, const real *src, const real *gate,
                                    int half, size_t r0, size_t n, int by_thread) {
    size_t C = in->C, slot = by_thread ? (size_t)omp_get_thread_num() : 0;
    real *dst = in->scratch + (slot * 2 + (size_t)half) * in->most * C;
    if (by_thread) {
        for (size_t i = 0; i < n; i++)
            pick_at(in, dst + i * C, src, gate, r0 + i);
        return dst;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        pick_at(in, dst + i * C, src, gate, r0 + i);
    return dst;
}

// The experts' input rows [r0, r0 + n).
static const real *expert_input_rows(const ExpertInput *in, size_t r0, size_t n,
                                     int by_thread) {
    if (!in->rows) return in->xp + r0 * in->C;
    return expert_pick_rows(in, in->x, NULL, 0, r0, n, by_thread);
}

// The experts' output gradient rows [r0, r0 + n): combine's gate times dy, the product
// combine's backward adds into a zeroed dyp (the same bits).
static const real *expert_dy_rows(const ExpertInput *in, size_t r0, size_t n, int by_thread) {
    if (!in->dy) return in->dyp + r0 * in->C;
    return expert_pick_rows(in, in->dy, in->gate, 1, r0, n, by_thread);
}

// One expert's rows: h (rows, 2F) = x w13^T, a = silu(h1) * h3, y (rows, C) = a w2^T.
static void expert_forward(real *y, real *h, real *a, const real *x, const real *w13,
                           size_t rows, size_t C, size_t F) {
    const real *w2 = w13 + 2 * F * C; // (C, F)
    cpu_gemm(0, 1, rows, 2 * F, C, 1, x, C, w13, C, 0, h, 2 * F);
    swiglu_rows(a, h, rows, F);
    cpu_gemm(0, 1, rows, C, F, 1, a, F, w2, F, 0, y, C);
}

// The rows of expert e: [off[e], off[e+1]).
static void experts_forward_one(size_t e, const int32_t *off, Tensor yp, Tensor h13, Tensor act,
                                const ExpertInput *in, int by_thread, Tensor w, size_t C,
                                size_t F) {
    size_t r0 = (size_t)off[e], rows = (size_t)off[e + 1] - r0;
    if (rows == 0) return;
    expert_forward(TENSOR_R(yp) + r0 * C, TENSOR_R(h13) + r0 * 2 * F, TENSOR_R(act) + r0 * F,
                   expert_input_rows(in, r0, rows, by_thread), TENSOR_R(w) + e * 3 * F * C,
                   rows, C, F);
}

void cpu_experts_forward(Tensor yp, Tensor h13, Tensor act, Tensor xp, ExpertRoute route,
                         Tensor w, Tensor offsets, size_t E, size_t C, size_t F) {
    const int32_t *off = TENSOR_I(offsets); // (E+1)
    size_t M = expert_rows(off, E);
    check_fits(w, E * 3 * F * C, "w");
    check_fits(h13, M * 2 * F, "h13");
    check_fits(act, M * F, "act");
    check_fits(yp, M * C, "yp");
    int by_thread = experts_by_thread(E);
    ExpertInput in;
    route.dy = tensor_none(); // the forward reads no gradient
    expert_input_init(&in, xp, tensor_none(), &route, off, E, C, by_thread);
    // Two loops, not one `parallel for if (...)`: that hung libgomp (GCC 12) on a shared
    // expert (inactive region, SwiGLU's parallel loop nested in it) then routed experts.
    if (by_thread) {
#pragma omp parallel for schedule(dynamic, 1)
        for (size_t e = 0; e < E; e++)
            experts_forward_one(e, off, yp, h13, act, &in, 1, w, C, F);
    } else {
        for (size_t e = 0; e < E; e++)
            experts_forward_one(e, off, yp, h13, act, &in, 0, w, C, F);
    }
    expert_input_free(&in);
}

// One expert's backward over its rows (shapes as in expert_forward); dw13 (3FC) NULL: no
// weight gradient; dx NULL: no input gradient. dh (rows, 2F), da (rows, F) are scratch.
// The input rows are fetched only for dw13, their one reader, right before it.
static void expert_backward(real *dx, real *dw13, real *dh, real *da, const real *h,
                            const real *a, const ExpertInput *in, size_t r0, int by_thread,
                            const real *w13, size_t rows, size_t C, size_t F) {
    const real *w2 = w13 + 2 * F * C;                         // (C, F)
    const real *dy = expert_dy_rows(in, r0, rows, by_thread); // (rows, C)
    cpu_gemm(0, 0, rows, F, C, 1, dy, C, w2, F, 0, da, F);
    if (dw13) cpu_gemm(1, 0, C, F, rows, 1, dy, C, a, F, 1, dw13 + 2 * F * C, F);
    swiglu_backward_rows(dh, da, h, rows, F, 0);
    if (dx) cpu_gemm(0, 0, rows, C, 2 * F, 1, dh, 2 * F, w13, C, 1, dx, C);
    if (dw13)
        cpu_gemm(1, 0, 2 * F, C, rows, 1, dh, 2 * F, expert_input_rows(in, r0, rows, by_thread),
                 C, 1, dw13, C);
}

// Gradients of expert e's rows, and of its weights when it trains (train NULL: all).
static void experts_backward_one(size_t e, const int32_t *off, Tensor dxp, Tensor dw,
                                 const uint8_t *train, Tensor dh13, Tensor dact, Tensor h13,
                                 Tensor act, const ExpertInput *in, int by_thread, Tensor w,
                                 size_t C, size_t F) {
    size_t r0 = (size_t)off[e], rows = (size_t)off[e + 1] - r0;
    int want_dw = dw.data && (!train || train[e]);
    if (!want_dw && !dxp.data) { // no products; the gates still want their gradient
        for (size_t m = r0; in->dg && m < r0 + rows; m++)
            expert_gate_grad(in, m);
        return;
    }
    if (rows == 0) return;
    expert_backward(dxp.data ? TENSOR_R(dxp) + r0 * C : NULL,
                    want_dw ? TENSOR_R(dw) + e * 3 * F * C : NULL, TENSOR_R(dh13) + r0 * 2 * F,
                    TENSOR_R(dact) + r0 * F, TENSOR_R(h13) + r0 * 2 * F, TENSOR_R(act) + r0 * F,
                    in, r0, by_thread, TENSOR_R(w) + e * 3 * F * C, rows, C, F);
}

void cpu_experts_backward(Tensor dxp, Tensor dw, const uint8_t *train, Tensor dyp, Tensor dh13,
                          Tensor dact, Tensor h13, Tensor act, Tensor xp, ExpertRoute route,
                          Tensor w, Tensor offsets, size_t E, size_t C, size_t F) {
    const int32_t *off = TENSOR_I(offsets); // (E+1)
    size_t M = expert_rows(off, E);
    check_fits(dw, E * 3 * F * C, "dw");
    check_fits(dxp, M * C, "dxp");
    check_fits(dh13, M * 2 * F, "dh13");
    check_fits(dact, M * F, "dact");
    if (!route.rows.data || !route.dy.data) check_fits(dyp, M * C, "dyp");
    int by_thread = experts_by_thread(E);
    ExpertInput in;
    expert_input_init(&in, xp, dyp, &route, off, E, C, by_thread);
    if (by_thread) {
#pragma omp parallel for schedule(dynamic, 1)
        for (size_t e = 0; e < E; e++)
            experts_backward_one(e, off, dxp, dw, train, dh13, dact, h13, act, &in, 1, w, C, F);
    } else {
        for (size_t e = 0; e < E; e++)
            experts_backward_one(e, off, dxp, dw, train, dh13, dact, h13, act, &in, 0, w, C, F);
    }
    if (in.dg) expert_gate_grads_add(&in, &route);
    expert_input_free(&in);
}

// ---- cross-entropy --------------------------------------------------------------------

// log sum_v exp(x_v), shifted by the max so large logits do not overflow (CPU_CLONES: the
// exps vectorise).
CPU_CLONES static double logsumexp(const real *x, size_t V) {
    double mx = -INFINITY;
    for (size_t v = 0; v < V; v++)
        if (x[v] > mx) mx = x[v];
    return mx + log(row_sum_exp(x, V, mx));
}

// dl (V) += scale * (softmax(x) - onehot(target)), the softmax from the row's lse.
CPU_CLONES static void crossentropy_backward_row(real *dl, const real *x, real lse,
                                                 int32_t target, double scale, size_t V) {
#pragma omp simd
    for (size_t v = 0; v < V; v++) {
        double p = row_exp((double)x[v] - lse);
        dl[v] += (real)(scale * (p - (v == (size_t)target)));
    }
}

void cpu_crossentropy_forward(Tensor loss, Tensor lse, Tensor logits, Tensor targets, size_t N,
                              size_t V) {
    real *ls = TENSOR_R(lse);              // (N)
    const real *lg = TENSOR_R(logits);     // (N, V)
    const int32_t *tg = TENSOR_I(targets); // (N)
    CHECK(N > 0, "cross-entropy over zero rows has no mean");
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++)
        ls[n] = (real)logsumexp(lg + n * V, V);
    // Summed serially, in row order, so the loss does not depend on the thread count.
    double sum = 0.0;
    for (size_t n = 0; n < N; n++) {
        CHECK(tg[n] >= 0 && (size_t)tg[n] < V, "target %zu is %d, outside the vocabulary %zu",
              n, (int)tg[n], V);
        sum += (double)ls[n] - lg[n * V + (size_t)tg[n]];
    }
    TENSOR_R(loss)[0] = (real)(sum / (double)N);
}

void cpu_crossentropy_backward(Tensor dlogits, Tensor logits, Tensor lse, Tensor targets,
                               double dloss, size_t N, size_t V) {
    real *dl = TENSOR_R(dlogits); // (N, V)
    if (!dl) return;
    const real *lg = TENSOR_R(logits);     // (N, V)
    const real *ls = TENSOR_R(lse);        // (N)
    const int32_t *tg = TENSOR_I(targets); // (N)
    double scale = dloss / (double)N;
#pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++)
        crossentropy_backward_row(dl + n * V, lg + n * V, ls[n], tg[n], scale, V);
}
