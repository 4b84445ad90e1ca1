// aux_losses.c: the router's auxiliary losses (CPU): load balancing (with the row
// normalisation it may take its probabilities from), z-loss, and Shazeer's importance and
// load losses. Semantics and shapes are in kernels.h; the per-row arithmetic is in
// kernels/router_math.h, shared with the CUDA backend.
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

// ---- load balancing loss ------------------------------------------------------------

// One group of n rows: expert counts cnt (E) and probability column sums colsum (E,
// zeroed) of p (n, E).
static void lb_group_stats(int32_t *cnt, double *colsum, const real *p, const int32_t *top,
                           size_t n, size_t E, size_t k) {
    memset(cnt, 0, E * sizeof(int32_t));
    for (size_t a = 0; a < n * k; a++)
        cnt[top[a]]++;
    // Column sums row by row: serial, so independent of the thread count.
    for (size_t r = 0; r < n; r++)
        for (size_t i = 0; i < E; i++)
            colsum[i] += p[r * E + i];
}

void cpu_lb_loss_forward(Tensor loss, Tensor counts, Tensor pmean, Tensor probs, Tensor idx,
                         size_t N, size_t E, size_t k, size_t G) {
    CHECK(G >= 1 && N % G == 0, "lb_loss: %zu rows do not split into %zu groups", N, G);
    const int32_t *top = TENSOR_I(idx); // (N, k)
    int32_t *cnt = TENSOR_I(counts);    // (G, E)
    const real *p = TENSOR_R(probs);    // (N, E)
    cpu_check_experts(top, N * k, E, "lb_loss");
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
        for (size_t i = 0; i < E; i++)
            dp[r * E + i] += (real)(scale * cnt[(r / n) * E + i]);
}

void cpu_normalize_rows_forward(Tensor p, Tensor s, size_t N, size_t E) {
    real *out = TENSOR_R(p);      // (N, E)
    const real *in = TENSOR_R(s); // (N, E)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        normalize_row(out + n * E, in + n * E, E);
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

// logsumexp (router_math.h) in the widest vectors the CPU has (CPU_CLONES).
CPU_CLONES static double logsumexp_wide(const real *x, size_t E) { return logsumexp(x, E); }

// dx (E) += scale * softmax(x) (E), the softmax from the row's logsumexp l.
CPU_CLONES static void zloss_backward_row(real *dx, const real *x, real l, double scale,
                                          size_t E) {
#pragma omp simd
    for (size_t e = 0; e < E; e++)
        dx[e] += (real)(scale * row_exp((double)x[e] - l));
}

void cpu_zloss_forward(Tensor loss, Tensor lse, Tensor logits, size_t N, size_t E) {
    real *l = TENSOR_R(lse);          // (N)
    const real *x = TENSOR_R(logits); // (N, E)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        l[n] = (real)logsumexp_wide(x + n * E, E);
    double total = 0.0;
    for (size_t n = 0; n < N; n++)
        total += (double)l[n] * l[n];
    TENSOR_R(loss)[0] = (real)(total / (double)N);
}

void cpu_zloss_backward(Tensor dlogits, Tensor logits, Tensor lse, double dloss, size_t N,
                        size_t E) {
    if (!dlogits.data) return;
    real *dx = TENSOR_R(dlogits);     // (N, E)
    const real *x = TENSOR_R(logits); // (N, E)
    const real *l = TENSOR_R(lse);    // (N)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        zloss_backward_row(dx + n * E, x + n * E, l[n], dloss * 2.0 * l[n] / (double)N, E);
}

// ---- CV^2 losses (Shazeer importance and load) -------------------------------------

void cpu_importance_loss_forward(Tensor loss, Tensor imp, Tensor gates, Tensor idx, size_t N,
                                 size_t E, size_t k) {
    real *im = TENSOR_R(imp);           // (E)
    const real *g = TENSOR_R(gates);    // (N, k)
    const int32_t *top = TENSOR_I(idx); // (N, k)
    cpu_check_experts(top, N * k, E, "importance_loss");
    double *sum = CALLOC(E, sizeof(double)); // (E)
    for (size_t a = 0; a < N * k; a++)
        sum[top[a]] += g[a];
    for (size_t i = 0; i < E; i++)
        im[i] = (real)sum[i];
    free(sum);
    TENSOR_R(loss)[0] = (real)cv2(im, E);
}

void cpu_importance_loss_backward(Tensor dgates, Tensor imp, Tensor idx, double dloss, size_t N,
                                  size_t E, size_t k) {
    if (!dgates.data) return;
    real *dg = TENSOR_R(dgates);        // (N, k)
    const int32_t *top = TENSOR_I(idx); // (N, k)
    cpu_check_experts(top, N * k, E, "importance_loss");
    double *grad = CALLOC(E, sizeof(double)); // (E) dloss * dCV^2/dimp
    cv2_grad(grad, TENSOR_R(imp), E, dloss);
#pragma omp parallel for
    for (size_t a = 0; a < N * k; a++)
        dg[a] += (real)grad[top[a]];
    free(grad);
}

// ---- load loss ------------------------------------------------------------------------

static void check_load_args(const int32_t *top, size_t N, size_t E, size_t k) {
    CHECK(k >= 1 && k < E,
          "load_loss: need 1 <= k < E (a threshold outside the top k), got "
          "k=%zu E=%zu",
          k, E);
    cpu_check_experts(top, N * k, E, "load_loss");
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
        for (size_t t = 0; t < threads; t++)
            sum += part[t * E + i];
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
