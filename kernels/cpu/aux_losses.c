// router.c: the router's CPU ops: scores, Shazeer noise, top-k, gates, capacity,
// dispatch, gather/combine, and the auxiliary losses (load balancing, z-loss,
// importance, load). Semantics and shapes are in kernels.h.
//
// Per-token work runs under OpenMP over tokens, where rows are independent. Anything
// summed across tokens is summed serially or in per-thread partials combined in thread
// order, so a result depends only on the thread count. Sums accumulate in double.
#include "cpu_ops.h"
#include "../router_math.h"
#include "../../base/util.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

// Columns per task in gather backward: one cache-friendly block of a row.
#define GATHER_COLS 64

// Expert indices are data: one out of range would write outside a per-expert buffer.
static void check_experts(const int32_t *idx, size_t n, size_t E, const char *op) {
    for (size_t a = 0; a < n; a++)
        CHECK(idx[a] >= 0 && (size_t)idx[a] < E, "%s: expert index %d at %zu outside [0, %zu)",
              op, (int)idx[a], a, E);
}

static void check_score_func(ScoreFunc func) {
    CHECK(func == SCORE_SOFTMAX || func == SCORE_SIGMOID, "router scores: unknown function %d",
          (int)func);
}

// ---- scores ---------------------------------------------------------------------

void cpu_router_scores_forward(Tensor scores, Tensor logits, size_t N, size_t E,
                               ScoreFunc func) {
    check_score_func(func);
    real *s = TENSOR_R(scores);       // (N, E)
    const real *x = TENSOR_R(logits); // (N, E)
    if (func == SCORE_SIGMOID) {
#pragma omp parallel for
        for (size_t i = 0; i < N * E; i++) s[i] = (real)stable_sigmoid(x[i]);
        return;
    }
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) softmax_row(s + n * E, x + n * E, E);
}

void cpu_router_scores_backward(Tensor dlogits, Tensor dscores, Tensor scores, size_t N,
                                size_t E, ScoreFunc func) {
    check_score_func(func);
    if (!dlogits.data) return;
    real *dx = TENSOR_R(dlogits);       // (N, E)
    const real *ds = TENSOR_R(dscores); // (N, E)
    const real *s = TENSOR_R(scores);   // (N, E)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        scores_backward_row(dx + n * E, ds + n * E, s + n * E, E, func == SCORE_SIGMOID);
}

// ---- Shazeer noise ----------------------------------------------------------------

void cpu_noisy_logits_forward(Tensor h, Tensor clean, Tensor raw, Tensor eps, size_t n) {
    real *hv = TENSOR_R(h);          // (n)
    const real *c = TENSOR_R(clean); // (n)
    const real *r = TENSOR_R(raw);   // (n)
    const real *ev = TENSOR_R(eps);  // (n)
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) hv[i] = noisy_value(c[i], r[i], ev[i]);
}

void cpu_noisy_logits_backward(Tensor dclean, Tensor draw, Tensor dh, Tensor raw, Tensor eps,
                               size_t n) {
    real *dc = TENSOR_R(dclean);    // (n)
    real *dr = TENSOR_R(draw);      // (n)
    const real *dhv = TENSOR_R(dh); // (n)
    const real *r = TENSOR_R(raw);  // (n)
    const real *ev = TENSOR_R(eps); // (n)
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        if (dc) dc[i] += dhv[i];
        // softplus' = sigmoid.
        if (dr) dr[i] += (real)((double)dhv[i] * ev[i] * stable_sigmoid(r[i]));
    }
}

// ---- selection --------------------------------------------------------------------

void cpu_topk_forward(Tensor idx, Tensor vals, size_t N, size_t E, size_t k) {
    CHECK(k >= 1 && k <= E && k <= MOE_TOPK_MAX,
          "topk: need 1 <= k <= min(E, %d), got k=%zu E=%zu", MOE_TOPK_MAX, k, E);
    int32_t *top = TENSOR_I(idx);   // (N, k)
    const real *v = TENSOR_R(vals); // (N, E)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) topk_row(top + n * k, v + n * E, NULL, E, k);
}

void cpu_gates_forward(Tensor gates, Tensor scores, Tensor idx, size_t N, size_t E, size_t k,
                       int renorm) {
    real *g = TENSOR_R(gates);          // (N, k)
    const real *s = TENSOR_R(scores);   // (N, E)
    const int32_t *top = TENSOR_I(idx); // (N, k)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) gates_row(g + n * k, s + n * E, top + n * k, k, renorm);
}

// The separate ops in turn: the CPU gains nothing from fusing rows it already streams.
void cpu_route_topk_forward(Tensor scores, Tensor idx, Tensor gates, Tensor h, Tensor logits,
                            Tensor raw, Tensor eps, Tensor bias, size_t N, size_t E, size_t k,
                            ScoreFunc func, int renorm) {
    if (raw.data) {
        cpu_noisy_logits_forward(h, logits, raw, eps, N * E);
        logits = h;
    }
    cpu_router_scores_forward(scores, logits, N, E, func);
    Tensor vals = scores;
    size_t n = N * E;
    if (bias.data) {
        vals.data = CALLOC(n ? n : 1, sizeof(real));   // (N, E) scores + bias
        cpu_add_bias_forward(vals, scores, bias, N, E);
    }
    cpu_topk_forward(idx, vals, N, E, k);
    if (bias.data) free(vals.data);
    cpu_gates_forward(gates, scores, idx, N, E, k, renorm);
}

void cpu_gates_backward(Tensor dscores, Tensor dgates, Tensor scores, Tensor idx, size_t N,
                        size_t E, size_t k, int renorm) {
    if (!dscores.data) return;
    real *ds = TENSOR_R(dscores);       // (N, E)
    const real *dg = TENSOR_R(dgates);  // (N, k)
    const real *s = TENSOR_R(scores);   // (N, E)
    const int32_t *top = TENSOR_I(idx); // (N, k)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        gates_backward_row(ds + n * E, dg + n * k, s + n * E, top + n * k, k, renorm);
}

// ---- capacity -----------------------------------------------------------------------

// One assignment as DROP_PROBS ranks it; rank = j * N + n is its DROP_POSITION order.
typedef struct {
    int32_t expert;
    real gate;
    size_t rank;
} Claim;

// Expert ascending, then gate descending, then position: a total order, so the
// result does not depend on qsort's (in)stability.
static int claim_cmp(const void *pa, const void *pb) {
    const Claim *a = pa, *b = pb;
    if (a->expert != b->expert) return a->expert < b->expert ? -1 : 1;
    if (a->gate != b->gate) return a->gate > b->gate ? -1 : 1;
    return (a->rank > b->rank) - (a->rank < b->rank);
}

static void keep_by_position(int32_t *keep, const int32_t *top, size_t N, size_t E, size_t k,
                             size_t capacity) {
    size_t *used = CALLOC(E, sizeof(size_t)); // (E)
    for (size_t j = 0; j < k; j++)
        for (size_t n = 0; n < N; n++) {
            size_t a = n * k + j;
            keep[a] = used[top[a]] < capacity;
            used[top[a]] += (size_t)keep[a];
        }
    free(used);
}

static void keep_by_probs(int32_t *keep, const int32_t *top, const real *g, size_t N, size_t k,
                          size_t capacity) {
    Claim *claims = CALLOC(N * k, sizeof(Claim)); // (N * k)
    for (size_t j = 0; j < k; j++)
        for (size_t n = 0; n < N; n++)
            claims[j * N + n] = (Claim){top[n * k + j], g[n * k + j], j * N + n};
    qsort(claims, N * k, sizeof(Claim), claim_cmp);
    size_t taken = 0;
    for (size_t r = 0; r < N * k; r++) {
        if (r == 0 || claims[r].expert != claims[r - 1].expert) taken = 0;
        size_t n = claims[r].rank % N, j = claims[r].rank / N;
        keep[n * k + j] = taken++ < capacity;
    }
    free(claims);
}

void cpu_capacity_forward(Tensor keep, Tensor idx, Tensor gates, size_t N, size_t E, size_t k,
                          size_t capacity, DropPolicy policy) {
    int32_t *kp = TENSOR_I(keep);       // (N, k)
    const int32_t *top = TENSOR_I(idx); // (N, k)
    const real *g = TENSOR_R(gates);    // (N, k)
    CHECK(policy == DROP_POSITION || policy == DROP_PROBS, "capacity: unknown drop policy %d",
          (int)policy);
    check_experts(top, N * k, E, "capacity");
    if (capacity == 0) {
        for (size_t a = 0; a < N * k; a++) kp[a] = 1;
    } else if (policy == DROP_POSITION) {
        keep_by_position(kp, top, N, E, k, capacity);
    } else {
        keep_by_probs(kp, top, g, N, k, capacity);
    }
}

// ---- dispatch / combine -----------------------------------------------------------

void cpu_dispatch_plan(Tensor offsets, Tensor rows, Tensor slot, Tensor idx, Tensor keep,
                       size_t N, size_t E, size_t k) {
    int32_t *off = TENSOR_I(offsets);   // (E + 1)
    int32_t *row = TENSOR_I(rows);      // (N * k), the first off[E] written
    int32_t *sl = TENSOR_I(slot);       // (N, k)
    const int32_t *top = TENSOR_I(idx); // (N, k)
    const int32_t *kp = TENSOR_I(keep); // (N, k)
    check_experts(top, N * k, E, "dispatch_plan");
    memset(off, 0, (E + 1) * sizeof(int32_t));
    for (size_t a = 0; a < N * k; a++) off[top[a] + 1] += kp[a] != 0;
    for (size_t e = 0; e < E; e++) off[e + 1] += off[e];
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
            for (size_t c = c0; c < c1; c++) dst[c] += src[c];
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
            for (size_t c = 0; c < C; c++) yr[c] += gj * src[c];
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
                for (size_t c = 0; c < C; c++) dst[c] += gj * dyr[c];
            }
            if (dg) {
                const real *src = in + (size_t)m * C;
                double dot = 0.0;
                for (size_t c = 0; c < C; c++) dot += (double)dyr[c] * src[c];
                dg[n * k + j] += (real)dot;
            }
        }
    }
}

// ---- load balancing loss ------------------------------------------------------------

// One group of n rows: expert counts cnt (E) and probability column sums colsum (E,
// zeroed) of p (n, E).
static void lb_group_stats(int32_t *cnt, double *colsum, const real *p, const int32_t *top,
                           size_t n, size_t E, size_t k) {
    memset(cnt, 0, E * sizeof(int32_t));
    for (size_t a = 0; a < n * k; a++) cnt[top[a]]++;
    // Column sums row by row: serial, so independent of the thread count.
    for (size_t r = 0; r < n; r++)
        for (size_t i = 0; i < E; i++) colsum[i] += p[r * E + i];
}

void cpu_lb_loss_forward(Tensor loss, Tensor counts, Tensor pmean, Tensor probs, Tensor idx,
                         size_t N, size_t E, size_t k, size_t G) {
    CHECK(G >= 1 && N % G == 0, "lb_loss: %zu rows do not split into %zu groups", N, G);
    const int32_t *top = TENSOR_I(idx); // (N, k)
    check_experts(top, N * k, E, "lb_loss");
    int32_t *cnt = TENSOR_I(counts);  // (G, E)
    const real *p = TENSOR_R(probs);  // (N, E)
    size_t n = N / G;
    double *colsum = CALLOC(G * E, sizeof *colsum); // (G, E)
    for (size_t g = 0; g < G; g++)
        lb_group_stats(cnt + g * E, colsum + g * E, p + g * n * E, top + g * n * k, n, E, k);
    TENSOR_R(loss)[0] = (real)lb_loss(TENSOR_R(pmean), cnt, colsum, n, E, k, G);
    free(colsum);
}

void cpu_lb_loss_backward(Tensor dprobs, Tensor counts, double dloss, size_t N, size_t E,
                          size_t k, size_t G) {
    if (!dprobs.data) return;
    real *dp = TENSOR_R(dprobs);           // (N, E)
    const int32_t *cnt = TENSOR_I(counts); // (G, E)
    size_t n = N / G;
    double scale = dloss / (double)G * (double)E / ((double)k * n * n);
#pragma omp parallel for
    for (size_t r = 0; r < N; r++)
        for (size_t i = 0; i < E; i++) dp[r * E + i] += (real)(scale * cnt[(r / n) * E + i]);
}

void cpu_normalize_rows_forward(Tensor p, Tensor s, size_t N, size_t E) {
    real *out = TENSOR_R(p);      // (N, E)
    const real *in = TENSOR_R(s); // (N, E)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) normalize_row(out + n * E, in + n * E, E);
}

void cpu_normalize_rows_backward(Tensor ds, Tensor dp, Tensor s, size_t N, size_t E) {
    if (!ds.data) return;
    real *d = TENSOR_R(ds);         // (N, E)
    const real *dpv = TENSOR_R(dp); // (N, E)
    const real *in = TENSOR_R(s);   // (N, E)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        normalize_row_backward(d + n * E, dpv + n * E, in + n * E, E);
}

// ---- z-loss -------------------------------------------------------------------------

void cpu_zloss_forward(Tensor loss, Tensor lse, Tensor logits, size_t N, size_t E) {
    real *l = TENSOR_R(lse);          // (N)
    const real *x = TENSOR_R(logits); // (N, E)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) l[n] = (real)logsumexp(x + n * E, E);
    double total = 0.0;
    for (size_t n = 0; n < N; n++) total += (double)l[n] * l[n];
    TENSOR_R(loss)[0] = (real)(total / (double)N);
}

void cpu_zloss_backward(Tensor dlogits, Tensor logits, Tensor lse, double dloss, size_t N,
                        size_t E) {
    if (!dlogits.data) return;
    real *dx = TENSOR_R(dlogits);     // (N, E)
    const real *x = TENSOR_R(logits); // (N, E)
    const real *l = TENSOR_R(lse);    // (N)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) {
        double scale = dloss * 2.0 * l[n] / (double)N;
        for (size_t e = 0; e < E; e++)
            dx[n * E + e] += (real)(scale * exp((double)x[n * E + e] - l[n]));
    }
}

// ---- CV^2 losses (Shazeer importance and load) -------------------------------------

void cpu_importance_loss_forward(Tensor loss, Tensor imp, Tensor gates, Tensor idx, size_t N,
                                 size_t E, size_t k) {
    real *im = TENSOR_R(imp);           // (E)
    const real *g = TENSOR_R(gates);    // (N, k)
    const int32_t *top = TENSOR_I(idx); // (N, k)
    check_experts(top, N * k, E, "importance_loss");
    double *sum = CALLOC(E, sizeof(double)); // (E)
    for (size_t a = 0; a < N * k; a++) sum[top[a]] += g[a];
    for (size_t i = 0; i < E; i++) im[i] = (real)sum[i];
    free(sum);
    TENSOR_R(loss)[0] = (real)cv2(im, E);
}

void cpu_importance_loss_backward(Tensor dgates, Tensor imp, Tensor idx, double dloss, size_t N,
                                  size_t E, size_t k) {
    if (!dgates.data) return;
    real *dg = TENSOR_R(dgates);        // (N, k)
    const int32_t *top = TENSOR_I(idx); // (N, k)
    check_experts(top, N * k, E, "importance_loss");
    double *grad = CALLOC(E, sizeof(double)); // (E) dloss * dCV^2/dimp
    cv2_grad(grad, TENSOR_R(imp), E, dloss);
#pragma omp parallel for
    for (size_t a = 0; a < N * k; a++) dg[a] += (real)grad[top[a]];
    free(grad);
}

// ---- load loss ------------------------------------------------------------------------

static void check_load_args(const int32_t *top, size_t N, size_t E, size_t k) {
    CHECK(k >= 1 && k < E,
          "load_loss: need 1 <= k < E (a threshold outside the top k), got "
          "k=%zu E=%zu",
          k, E);
    check_experts(top, N * k, E, "load_loss");
}

void cpu_load_loss_forward(Tensor loss, Tensor load, Tensor clean, Tensor h, Tensor raw,
                           Tensor idx, size_t N, size_t E, size_t k) {
    real *ld = TENSOR_R(load);          // (E)
    const real *c = TENSOR_R(clean);    // (N, E)
    const real *hv = TENSOR_R(h);       // (N, E)
    const real *r = TENSOR_R(raw);      // (N, E)
    const int32_t *top = TENSOR_I(idx); // (N, k)
    check_load_args(top, N, E, k);
    size_t threads = (size_t)omp_get_max_threads();
    double *part = CALLOC(threads * E, sizeof(double)); // (threads, E) per-thread load sums
#pragma omp parallel
    {
        double *mine = part + (size_t)omp_get_thread_num() * E;
#pragma omp for schedule(static)
        for (size_t n = 0; n < N; n++) {
            const int32_t *tr = top + n * k;
            size_t best_out = best_unselected(hv + n * E, tr, E, k);
            for (size_t i = 0; i < E; i++) {
                LoadTerm t = load_term(c + n * E, hv + n * E, r + n * E, tr, k, best_out, i);
                mine[i] += normal_cdf(t.z);
            }
        }
    }
    for (size_t i = 0; i < E; i++) {
        double sum = 0.0;
        for (size_t t = 0; t < threads; t++) sum += part[t * E + i];
        ld[i] = (real)sum;
    }
    free(part);
    TENSOR_R(loss)[0] = (real)cv2(ld, E);
}

void cpu_load_loss_backward(Tensor dclean, Tensor dh, Tensor draw, Tensor load, Tensor clean,
                            Tensor h, Tensor raw, Tensor idx, double dloss, size_t N, size_t E,
                            size_t k) {
    real *dc = TENSOR_R(dclean);        // (N, E)
    real *dhv = TENSOR_R(dh);           // (N, E)
    real *dr = TENSOR_R(draw);          // (N, E)
    const real *c = TENSOR_R(clean);    // (N, E)
    const real *hv = TENSOR_R(h);       // (N, E)
    const real *r = TENSOR_R(raw);      // (N, E)
    const int32_t *top = TENSOR_I(idx); // (N, k)
    if (!dc && !dhv && !dr) return;
    check_load_args(top, N, E, k);
    double *grad = CALLOC(E, sizeof(double)); // (E) dloss * dCV^2/dload
    cv2_grad(grad, TENSOR_R(load), E, dloss);
    // Every write of token n lands in row n (thr_index is in row n), so rows are independent.
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        load_backward_row(dc, dhv, dr, c, hv, r, top, grad, n, E, k,
                          best_unselected(hv + n * E, top + n * k, E, k));
    free(grad);
}
