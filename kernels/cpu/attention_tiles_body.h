// attention_tiles_body.h: the code of attention_tiles.h, included by one translation unit
// per instruction set after it defines
//   ATTN_VBYTES       bytes per vector (64, 32, 16)
//   ATTN_MR           rows per register tile (the accumulators are ATTN_MR x 2 vectors)
//   ATTN_TILES_NAME   the AttnTiles it defines, ATTN_TILES_LABEL its name.
//
// Three products make up a block (rows queries r, cols keys c; a row sees the keys
// c <= r + q0, q0 = first query - first key):
//   scores   s (rows, cols) = alpha a b^T over D, from b transposed into (D, cols)
//   ab       c (rows, D) += alpha p b, p (rows, cols), b's rows padded
//   atb      c (cols, D) += alpha p^T b, b (rows, D) padded
// Each keeps ATTN_MR x 2 vectors of sums in registers and skips the tiles the mask
// empties. Loads and stores go through an unaligned vector type: rows of qkv start
// anywhere.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/util.h"
#include "attention_tiles.h"
#include "vexp.h"

#define VL (ATTN_VBYTES / sizeof(real)) // values per vector
#define NR 2                            // vectors per tile row

typedef real vreal __attribute__((vector_size(ATTN_VBYTES), aligned(sizeof(real)), may_alias));

static inline size_t tile_min(size_t a, size_t b) { return a < b ? a : b; }

static inline vreal vload(const real *p) { return *(const vreal *)p; }

// In a loop the compiler unrolls, so that the sums start in registers (a memset of the
// array made it write them to the stack and load them back).
static inline void tile_zero(vreal acc[ATTN_MR][NR]) {
#pragma GCC unroll 16
    for (size_t i = 0; i < ATTN_MR; i++)
        acc[i][0] = acc[i][1] = (vreal){0};
}

// Keys row r sees among the block's cols: min(cols, r + q0 + 1), at least 0.
static inline size_t tile_visible(size_t r, ptrdiff_t q0, size_t cols) {
    ptrdiff_t n = (ptrdiff_t)r + q0 + 1;
    return n <= 0 ? 0 : tile_min((size_t)n, cols);
}

// c[0 .. n-1] += alpha acc, n <= NR * VL values.
static inline void tile_add_row(real *c, const vreal acc[NR], real alpha, size_t n) {
    for (size_t v = 0; v < NR && v * VL < n; v++) {
        vreal x = alpha * acc[v];
        if (n >= (v + 1) * VL) {
            *(vreal *)(c + v * VL) = vload(c + v * VL) + x;
        } else {
            for (size_t j = 0; j < n - v * VL; j++)
                c[v * VL + j] += x[j];
        }
    }
}

// acc[i][v] = sum over s < steps of a[i][s] * b[s * ldb + v * VL]: the tile's register
// sums, one row pointer per tile row, NR vectors of b per step.
static inline __attribute__((always_inline)) void tile_accumulate(
    vreal acc[ATTN_MR][NR], const real *const a[ATTN_MR], const real *b, size_t ldb,
    size_t steps) {
    tile_zero(acc);
    for (size_t s = 0; s < steps; s++) {
        vreal b0 = vload(b + s * ldb), b1 = vload(b + s * ldb + VL);
#pragma GCC unroll 16
        for (size_t i = 0; i < ATTN_MR; i++) {
            real x = a[i][s];
            acc[i][0] += x * b0;
            acc[i][1] += x * b1;
        }
    }
}

// row[i] = the tile's row r0 + i of a (step lda); past its m rows the last one again, so
// the tile's sums stay defined and are not stored.
static inline void tile_rows(const real *row[ATTN_MR], const real *a, size_t lda, size_t r0,
                             size_t m) {
    for (size_t i = 0; i < ATTN_MR; i++)
        row[i] = a + (r0 + tile_min(i, m - 1)) * lda;
}

// s rows r < rows, columns up to the last visible key of the tile's last row rounded up
// to NR vectors: alpha sum_d a[r, d] bt[d, c]. bt is zero past cols, so the rounding
// writes zeros there; lds and ldb are multiples of NR * VL.
static void tile_scores(real *s, size_t lds, const real *a, size_t lda, const real *bt,
                        size_t ldb, size_t rows, size_t D, real alpha, ptrdiff_t q0,
                        size_t cols) {
    for (size_t r0 = 0; r0 < rows; r0 += ATTN_MR) {
        size_t m = tile_min(ATTN_MR, rows - r0);
        size_t need = tile_visible(r0 + m - 1, q0, cols);
        const real *ar[ATTN_MR];
        tile_rows(ar, a, lda, r0, m);
        for (size_t c0 = 0; c0 < need; c0 += NR * VL) {
            vreal acc[ATTN_MR][NR];
            tile_accumulate(acc, ar, bt + c0, ldb, D);
            for (size_t i = 0; i < m; i++) {
                real *sr = s + (r0 + i) * lds + c0;
                *(vreal *)sr = alpha * acc[i][0];
                *(vreal *)(sr + VL) = alpha * acc[i][1];
            }
        }
    }
}

// c rows r < rows, D values each (ldc apart) += alpha sum_k p[r, k] b[k, :], k over the
// keys the tile's last row sees (p is zero past each row's own). b (keys, ldb) is padded
// with zeros to a multiple of NR * VL columns.
static void tile_ab(real *c, size_t ldc, const real *p, size_t ldp, const real *b, size_t ldb,
                    size_t rows, size_t D, real alpha, ptrdiff_t q0, size_t cols) {
    for (size_t r0 = 0; r0 < rows; r0 += ATTN_MR) {
        size_t m = tile_min(ATTN_MR, rows - r0);
        size_t kmax = tile_visible(r0 + m - 1, q0, cols);
        const real *pr[ATTN_MR];
        tile_rows(pr, p, ldp, r0, m);
        for (size_t j0 = 0; j0 < D; j0 += NR * VL) {
            vreal acc[ATTN_MR][NR];
            tile_accumulate(acc, pr, b + j0, ldb, kmax);
            for (size_t i = 0; i < m; i++)
                tile_add_row(c + (r0 + i) * ldc + j0, acc[i], alpha, tile_min(NR * VL, D - j0));
        }
    }
}

// c rows k < cols (keys), D values each (ldc apart) += alpha sum_r p[r, k] b[r, :], r over
// the rows that see the tile's first key. b (rows, ldb) is padded to NR * VL columns.
static void tile_atb(real *c, size_t ldc, const real *p, size_t ldp, const real *b,
                     size_t ldb, size_t rows, size_t D, real alpha, ptrdiff_t q0,
                     size_t cols) {
    for (size_t k0 = 0; k0 < cols; k0 += ATTN_MR) {
        size_t m = tile_min(ATTN_MR, cols - k0);
        ptrdiff_t first = (ptrdiff_t)k0 - q0; // the first row that sees key k0
        size_t r_lo = first < 0 ? 0 : (size_t)first;
        size_t kc[ATTN_MR];
        for (size_t i = 0; i < ATTN_MR; i++)
            kc[i] = k0 + tile_min(i, m - 1);
        for (size_t j0 = 0; j0 < D; j0 += NR * VL) {
            vreal acc[ATTN_MR][NR];
            tile_zero(acc);
            for (size_t r = r_lo; r < rows; r++) {
                vreal b0 = vload(b + r * ldb + j0), b1 = vload(b + r * ldb + j0 + VL);
                const real *pr = p + r * ldp;
#pragma GCC unroll 16
                for (size_t i = 0; i < ATTN_MR; i++) {
                    real x = pr[kc[i]];
                    acc[i][0] += x * b0;
                    acc[i][1] += x * b1;
                }
            }
            for (size_t i = 0; i < m; i++)
                tile_add_row(c + (k0 + i) * ldc + j0, acc[i], alpha, tile_min(NR * VL, D - j0));
        }
    }
}

// ---- packing --------------------------------------------------------------------------

static size_t pad_width(size_t D) { return (D + ATTN_PAD - 1) / ATTN_PAD * ATTN_PAD; }

// Eight values of `real`, and the shuffle of two such vectors by eight constant lanes
// (0-7 the first's, 8-15 the second's).
typedef real v8 __attribute__((vector_size(8 * sizeof(real)), aligned(sizeof(real))));
#ifdef MOE_REAL_F64
typedef int64_t v8i __attribute__((vector_size(8 * sizeof(real))));
#else
typedef int32_t v8i __attribute__((vector_size(8 * sizeof(real))));
#endif
#ifdef __clang__
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

// dst rows j < 8 (step ldd) = column j of the 8 x 8 block of src (step lds): the standard
// three rounds of shuffles (pairs of values, then of pairs, then of quads).
static inline void transpose8(real *dst, size_t ldd, const real *src, size_t lds) {
    v8 r[8], t[8], u[8];
    for (size_t i = 0; i < 8; i++)
        r[i] = *(const v8 *)(src + i * lds);
    for (size_t i = 0; i < 8; i += 2) {
        t[i] = SHUF8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUF8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (size_t i = 0; i < 8; i += 4)
        for (size_t j = 0; j < 2; j++) {
            u[i + j] = SHUF8(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[i + j + 2] = SHUF8(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    // u[i] holds columns i % 4 (low half) and i % 4 + 4 (high half) of rows 0-3 (i < 4)
    // or rows 4-7 (i >= 4); u was filled in the order 0, 2, 1, 3 within each four.
    static const size_t col_of[4] = {0, 2, 1, 3};
    for (size_t i = 0; i < 4; i++) {
        size_t c = col_of[i];
        *(v8 *)(dst + c * ldd) = SHUF8(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        *(v8 *)(dst + (c + 4) * ldd) = SHUF8(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

// dst (D, pad(n)) = rows u < n of src (step ld) transposed, zeros past n: 8 x 8 blocks
// through registers, the edges value by value. (Row by row the stores went down a
// column, pad(n) values apart, and stalled: 7% of the op's time.)
static void pack_transposed(real *dst, const real *src, size_t ld, size_t n, size_t D) {
    size_t np = pad_width(n), n8 = n / 8 * 8, D8 = D / 8 * 8;
    for (size_t u0 = 0; u0 < n8; u0 += 8)
        for (size_t d0 = 0; d0 < D8; d0 += 8)
            transpose8(dst + d0 * np + u0, np, src + u0 * ld + d0, ld);
    for (size_t u = 0; u < n; u++)
        for (size_t d = u < n8 ? D8 : 0; d < D; d++)
            dst[d * np + u] = src[u * ld + d];
    for (size_t d = 0; d < D; d++)
        memset(dst + d * np + n, 0, (np - n) * sizeof(real));
}

// dst (n, pad(D)) = rows u < n of src (step ld), zeros past D.
static void pack_rows(real *dst, const real *src, size_t ld, size_t n, size_t D) {
    size_t Dp = pad_width(D);
    for (size_t u = 0; u < n; u++) {
        memcpy(dst + u * Dp, src + u * ld, D * sizeof(real));
        memset(dst + u * Dp + D, 0, (Dp - D) * sizeof(real));
    }
}

// ---- softmax rows ---------------------------------------------------------------------

typedef int32_t vmask __attribute__((vector_size(ATTN_VBYTES)));
typedef int64_t vmask64 __attribute__((vector_size(ATTN_VBYTES)));

// The larger of each lane (x where x > y, else y: a NaN score is passed over).
static inline vreal vmax(vreal x, vreal y) {
#ifdef MOE_REAL_F64
    vmask64 gt = x > y;
    return (vreal)(((vmask64)x & gt) | ((vmask64)y & ~gt));
#else
    vmask gt = x > y;
    return (vreal)(((vmask)x & gt) | ((vmask)y & ~gt));
#endif
}

// max(init, s[0 .. n-1]), lanes of VL then across them.
static real row_max(const real *s, size_t n, real init) {
    vreal acc = init - (vreal){0};
    size_t u = 0;
    for (; u + VL <= n; u += VL)
        acc = vmax(vload(s + u), acc);
    real mx = init;
    for (size_t j = 0; j < VL; j++)
        mx = acc[j] > mx ? acc[j] : mx;
    for (; u < n; u++)
        mx = s[u] > mx ? s[u] : mx;
    return mx;
}

// s[0 .. n-1] summed in VL lanes, then across them.
static real row_sum(const real *s, size_t n) {
    vreal acc = {0};
    size_t u = 0;
    for (; u + VL <= n; u += VL)
        acc += vload(s + u);
    real sum = 0;
    for (size_t j = 0; j < VL; j++)
        sum += acc[j];
    for (; u < n; u++)
        sum += s[u];
    return sum;
}

// The first n values of sr become exp(sr - ref), the rest up to cols 0. Returns the sum.
static real exp_row(real *sr, size_t n, size_t cols, real ref) {
#pragma omp simd
    for (size_t u = 0; u < n; u++)
        sr[u] = vexp(sr[u] - ref);
    memset(sr + n, 0, (cols - n) * sizeof(real));
    return row_sum(sr, n);
}

// Online softmax over one key block: folds row r's n visible scores into its running
// maximum m and sum l; the output row o (D values) is zeroed on the first block and
// rescaled by exp(m_old - m_new) on later ones.
static void online_row(real *sr, real *o, real *m, real *l, size_t n, size_t cols, size_t D,
                       int first) {
    real mx = row_max(sr, n, first ? -INFINITY : *m);
    real sum = exp_row(sr, n, cols, mx);
    if (first) {
        *l = sum;
        memset(o, 0, D * sizeof(real));
    } else {
        real alpha = vexp(*m - mx);
        *l = *l * alpha + sum;
        for (size_t d = 0; d < D; d++)
            o[d] *= alpha;
    }
    *m = mx;
}

// ---- heads ----------------------------------------------------------------------------

// A head's k transposed (Dk, pad(T)) and v rows (T, pad(Dv)) are packed once; every block
// reads its keys from them.
static void forward_head(real *out, real *lse, const HeadView *h, AttnScratch *ws) {
    size_t w = h->width, ow = h->out_width, Tp = pad_width(h->T), Dvp = pad_width(h->Dv);
    pack_transposed(ws->kt, h->k, w, h->T, h->Dk);
    pack_rows(ws->rows_v, h->v, w, h->T, h->Dv);
    for (size_t t0 = 0; t0 < h->T; t0 += ATTN_BQ) {
        size_t t1 = tile_min(t0 + ATTN_BQ, h->T), rows = t1 - t0;
        for (size_t u0 = 0; u0 < t1; u0 += ATTN_BK) {
            size_t cols = tile_min(u0 + ATTN_BK, t1) - u0;
            ptrdiff_t q0 = (ptrdiff_t)t0 - (ptrdiff_t)u0;
            tile_scores(ws->s, ATTN_BK, h->q + t0 * w, w, ws->kt + u0, Tp, rows, h->Dk,
                        h->scale, q0, cols);
            for (size_t r = 0; r < rows; r++)
                online_row(ws->s + r * ATTN_BK, out + (t0 + r) * ow, ws->m + r, ws->l + r,
                           tile_visible(r, q0, cols), cols, h->Dv, u0 == 0);
            tile_ab(out + t0 * ow, ow, ws->s, ATTN_BK, ws->rows_v + u0 * Dvp, Dvp, rows, h->Dv,
                    1, q0, cols);
        }
        for (size_t r = 0; r < rows; r++) {
            real inv = 1 / ws->l[r], *o = out + (t0 + r) * ow;
            for (size_t d = 0; d < h->Dv; d++)
                o[d] *= inv;
            lse[t0 + r] = ws->m[r] + (real)log(ws->l[r]);
        }
    }
}

// One block of queries against one block of keys: recomputes p = exp(q k^T scale - lse),
// then dv += p^T dout, ds = p * (dout v^T - delta), dq += scale ds k, dk += scale ds^T q.
// ws holds the head's packed k and v and the query block's q and dout rows; dk and dv add
// up in ws's (T, pad(D)) rows, in cache, and go to the head's rows once at the end.
static void backward_block(real *dq, const HeadView *h, const real *dout,
                           const real *lse, const real *delta, AttnScratch *ws, size_t t0,
                           size_t rows, size_t u0, size_t cols) {
    size_t w = h->width, ow = h->out_width, Dk = h->Dk, Dv = h->Dv, Tp = pad_width(h->T);
    ptrdiff_t q0 = (ptrdiff_t)t0 - (ptrdiff_t)u0;
    tile_scores(ws->s, ATTN_BK, h->q + t0 * w, w, ws->kt + u0, Tp, rows, Dk, h->scale, q0,
                cols);
    tile_scores(ws->ds, ATTN_BK, dout + t0 * ow, ow, ws->vt + u0, Tp, rows, Dv, 1, q0, cols);
    for (size_t r = 0; r < rows; r++) {
        real *pr = ws->s + r * ATTN_BK, *dr = ws->ds + r * ATTN_BK, dl = delta[t0 + r];
        real ref = lse[t0 + r];
        size_t n = tile_visible(r, q0, cols);
#pragma omp simd
        for (size_t u = 0; u < n; u++) {
            real p = vexp(pr[u] - ref);
            pr[u] = p;
            dr[u] = p * (dr[u] - dl);
        }
        memset(pr + n, 0, (cols - n) * sizeof(real));
        memset(dr + n, 0, (cols - n) * sizeof(real));
    }
    size_t Dkp = pad_width(Dk), Dvp = pad_width(Dv);
    tile_atb(ws->acc_dv + u0 * Dvp, Dvp, ws->s, ATTN_BK, ws->rows_dout, Dvp, rows, Dv, 1, q0,
             cols);
    tile_ab(dq + t0 * w, w, ws->ds, ATTN_BK, ws->rows_k + u0 * Dkp, Dkp, rows, Dk, h->scale, q0,
            cols);
    tile_atb(ws->acc_dk + u0 * Dkp, Dkp, ws->ds, ATTN_BK, ws->rows_q, Dkp, rows, Dk, h->scale,
             q0, cols);
}

// c rows (step ldc) += acc rows (T, pad(D)).
static void add_rows(real *c, size_t ldc, const real *acc, size_t T, size_t D) {
    size_t Dp = pad_width(D);
    for (size_t t = 0; t < T; t++)
#pragma omp simd
        for (size_t d = 0; d < D; d++)
            c[t * ldc + d] += acc[t * Dp + d];
}

static void backward_head(real *dq, real *dk, real *dv, const HeadView *h, const real *dout,
                          const real *lse, const real *delta, AttnScratch *ws) {
    pack_transposed(ws->kt, h->k, h->width, h->T, h->Dk);
    pack_transposed(ws->vt, h->v, h->width, h->T, h->Dv);
    pack_rows(ws->rows_k, h->k, h->width, h->T, h->Dk);
    memset(ws->acc_dk, 0, h->T * pad_width(h->Dk) * sizeof(real));
    memset(ws->acc_dv, 0, h->T * pad_width(h->Dv) * sizeof(real));
    for (size_t t0 = 0; t0 < h->T; t0 += ATTN_BQ) {
        size_t t1 = tile_min(t0 + ATTN_BQ, h->T), rows = t1 - t0;
        pack_rows(ws->rows_q, h->q + t0 * h->width, h->width, rows, h->Dk);
        pack_rows(ws->rows_dout, dout + t0 * h->out_width, h->out_width, rows, h->Dv);
        for (size_t u0 = 0; u0 < t1; u0 += ATTN_BK)
            backward_block(dq, h, dout, lse, delta, ws, t0, rows, u0,
                           tile_min(u0 + ATTN_BK, t1) - u0);
    }
    add_rows(dk, h->width, ws->acc_dk, h->T, h->Dk);
    add_rows(dv, h->width, ws->acc_dv, h->T, h->Dv);
}

const AttnTiles ATTN_TILES_NAME = {ATTN_TILES_LABEL, forward_head, backward_head};
