// router.c: the router's CPU ops that pick experts: scores, Shazeer noise, top-k, gates
// and the fused top-k route; and the expert-index check the other router files share.
// capacity.c, dispatch.c and aux_losses.c hold the rest of routing. Semantics and shapes
// are in kernels.h; the per-row arithmetic is in kernels/router_math.h, shared with the
// CUDA backend.
//
// Per-token work runs under OpenMP over tokens, where rows are independent.
#include "cpu_ops.h"
#include "../router_math.h"
#include "../../base/util.h"

#include <stdlib.h>

// Expert indices are data: one out of range would write outside a per-expert buffer.
void cpu_check_experts(const int32_t *idx, size_t n, size_t E, const char *op) {
    for (size_t a = 0; a < n; a++)
        CHECK(idx[a] >= 0 && (size_t)idx[a] < E, "%s: expert index %d at %zu outside [0, %zu)",
              op, (int)idx[a], a, E);
}

static void check_score_func(ScoreFunc func) {
    CHECK(func == SCORE_SOFTMAX || func == SCORE_SIGMOID, "router scores: unknown function %d",
          (int)func);
}

// ---- scores ---------------------------------------------------------------------

// softmax_row in the widest vectors the CPU has (CPU_CLONES: its exps vectorise).
CPU_CLONES static void softmax_row_wide(real *out, const real *x, size_t E) {
    softmax_row(out, x, E);
}

// Scores of one token's logits x (E) into s (E).
static void scores_row(real *s, const real *x, size_t E, ScoreFunc func) {
    if (func == SCORE_SOFTMAX) {
        softmax_row_wide(s, x, E);
        return;
    }
    for (size_t e = 0; e < E; e++)
        s[e] = (real)stable_sigmoid(x[e]);
}

void cpu_router_scores_forward(Tensor scores, Tensor logits, size_t N, size_t E,
                               ScoreFunc func) {
    check_score_func(func);
    real *s = TENSOR_R(scores);       // (N, E)
    const real *x = TENSOR_R(logits); // (N, E)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        scores_row(s + n * E, x + n * E, E, func);
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
    for (size_t i = 0; i < n; i++)
        hv[i] = noisy_value(c[i], r[i], ev[i]);
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
    for (size_t n = 0; n < N; n++)
        topk_row(top + n * k, v + n * E, NULL, E, k);
}

void cpu_gates_forward(Tensor gates, Tensor scores, Tensor idx, size_t N, size_t E, size_t k,
                       int renorm, double scale) {
    real *g = TENSOR_R(gates);          // (N, k)
    const real *s = TENSOR_R(scores);   // (N, E)
    const int32_t *top = TENSOR_I(idx); // (N, k)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        gates_row(g + n * k, s + n * E, top + n * k, k, renorm, scale);
}

// The route op in one pass over the rows, each row's steps back to back while it is in
// cache: the noisy logits (when raw is given), scores, the selection on scores + bias
// (the sum in `real`, as the separate add_bias op takes it) and the gates; the same
// arithmetic as the separate ops, so the same bits.
void cpu_route_topk_forward(Tensor scores, Tensor idx, Tensor gates, Tensor h, Tensor logits,
                            Tensor raw, Tensor eps, Tensor bias, size_t N, size_t E, size_t k,
                            RouteSpec spec) {
    CHECK(k >= 1 && k <= E && k <= MOE_TOPK_MAX,
          "topk: need 1 <= k <= min(E, %d), got k=%zu E=%zu", MOE_TOPK_MAX, k, E);
    const char *bad = route_spec_problem(&spec, E, k);
    CHECK(!bad, "route: %s (groups=%zu topk_groups=%zu E=%zu k=%zu)", bad, spec.groups,
          spec.topk_groups, E, k);
    check_score_func(spec.func);
    real *s = TENSOR_R(scores);       // (N, E)
    int32_t *top = TENSOR_I(idx);     // (N, k)
    real *g = TENSOR_R(gates);        // (N, k)
    real *hv = TENSOR_R(h);           // (N, E) noisy logits, when raw is given
    const real *x = TENSOR_R(logits); // (N, E)
    const real *r = TENSOR_R(raw);    // (N, E) or NULL
    const real *ev = TENSOR_R(eps);   // (N, E) or NULL
    const real *b = TENSOR_R(bias);   // (E) or NULL
#pragma omp parallel for
    for (size_t n = 0; n < N; n++) {
        const real *xr = x + n * E;
        if (r) {
            for (size_t e = 0; e < E; e++)
                hv[n * E + e] = noisy_value(xr[e], r[n * E + e], ev[n * E + e]);
            xr = hv + n * E;
        }
        scores_row(s + n * E, xr, E, spec.func);
        route_select_row(top + n * k, s + n * E, b, E, k, &spec);
        gates_row(g + n * k, s + n * E, top + n * k, k, spec.renorm, spec.scale);
    }
}

void cpu_gates_backward(Tensor dscores, Tensor dgates, Tensor scores, Tensor idx, size_t N,
                        size_t E, size_t k, int renorm, double scale) {
    if (!dscores.data) return;
    real *ds = TENSOR_R(dscores);       // (N, E)
    const real *dg = TENSOR_R(dgates);  // (N, k)
    const real *s = TENSOR_R(scores);   // (N, E)
    const int32_t *top = TENSOR_I(idx); // (N, k)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        gates_backward_row(ds + n * E, dg + n * k, s + n * E, top + n * k, k, renorm, scale);
}
