// router.cu: the router's CUDA ops that pick experts: scores, Shazeer noise, top-k,
// gates, and the fused top-k routing kernel. capacity.cu, dispatch.cu and aux_losses.cu
// hold the rest of routing. Semantics and shapes are in kernels.h; kernels/cpu/router.c
// is the reference, and the per-row arithmetic is its own: both include
// kernels/router_math.h.
//
// Per-token work is one thread per row (E and k are small).
#include "cuda_ops.cuh"
#include "../router_math.h"

static void check_score_func(ScoreFunc func) {
    CUDA_REQUIRE(func == SCORE_SOFTMAX || func == SCORE_SIGMOID,
                 "router scores: unknown function %d", (int)func);
}

// ---- scores -----------------------------------------------------------------------------

// The separate kernels and the fused routing kernel share the row steps of router_math.h,
// so the fused op gives the separate ops' bits.
__global__ void softmax_rows_kernel(float *s, const float *x, size_t N, size_t E) {
    GRID_STRIDE(n, N) softmax_row(s + n * E, x + n * E, E);
}

__global__ void sigmoid_kernel(float *s, const float *x, size_t n) {
    GRID_STRIDE(i, n) s[i] = (float)stable_sigmoid(x[i]);
}

void cuda_router_scores_forward(Tensor scores, Tensor logits, size_t N, size_t E,
                                ScoreFunc func) {
    check_score_func(func);
    if (N * E == 0) return;
    if (func == SCORE_SIGMOID)
        sigmoid_kernel<<<cuda_blocks(N * E), CUDA_THREADS>>>(DEV_R(scores), DEV_R(logits),
                                                             N * E);
    else
        softmax_rows_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(DEV_R(scores), DEV_R(logits), N,
                                                              E);
    cudaCheckLaunch();
}

__global__ void scores_backward_kernel(float *dx, const float *ds, const float *s, size_t N,
                                       size_t E, int sigmoid) {
    GRID_STRIDE(n, N) scores_backward_row(dx + n * E, ds + n * E, s + n * E, E, sigmoid);
}

void cuda_router_scores_backward(Tensor dlogits, Tensor dscores, Tensor scores, size_t N,
                                 size_t E, ScoreFunc func) {
    check_score_func(func);
    if (!dlogits.data || N * E == 0) return;
    scores_backward_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(
        DEV_R(dlogits), DEV_R(dscores), DEV_R(scores), N, E, func == SCORE_SIGMOID);
    cudaCheckLaunch();
}

// ---- Shazeer noise ----------------------------------------------------------------------

__global__ void noisy_kernel(float *h, const float *c, const float *r, const float *ev,
                             size_t n) {
    GRID_STRIDE(i, n) h[i] = noisy_value(c[i], r[i], ev[i]);
}

void cuda_noisy_logits_forward(Tensor h, Tensor clean, Tensor raw, Tensor eps, size_t n) {
    if (n == 0) return;
    noisy_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(DEV_R(h), DEV_R(clean), DEV_R(raw),
                                                   DEV_R(eps), n);
    cudaCheckLaunch();
}

__global__ void noisy_backward_kernel(float *dc, float *dr, const float *dh, const float *r,
                                      const float *ev, size_t n) {
    GRID_STRIDE(i, n) {
        if (dc) dc[i] += dh[i];
        // softplus' = sigmoid.
        if (dr) dr[i] += (float)((double)dh[i] * ev[i] * stable_sigmoid(r[i]));
    }
}

void cuda_noisy_logits_backward(Tensor dclean, Tensor draw, Tensor dh, Tensor raw, Tensor eps,
                                size_t n) {
    if ((!dclean.data && !draw.data) || n == 0) return;
    noisy_backward_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(
        DEV_R(dclean), DEV_R(draw), DEV_R(dh), DEV_R(raw), DEV_R(eps), n);
    cudaCheckLaunch();
}

// ---- selection --------------------------------------------------------------------------

// One thread per row, topk_row's list in registers.
__global__ void topk_kernel(int32_t *top, const float *vals, size_t N, size_t E, size_t k) {
    GRID_STRIDE(n, N) topk_row(top + n * k, vals + n * E, NULL, E, k);
}

void cuda_topk_forward(Tensor idx, Tensor vals, size_t N, size_t E, size_t k) {
    CUDA_REQUIRE(k >= 1 && k <= E && k <= MOE_TOPK_MAX,
                 "topk: need 1 <= k <= min(E, %d), got k=%zu E=%zu", MOE_TOPK_MAX, k, E);
    if (N == 0) return;
    topk_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(DEV_I(idx), DEV_R(vals), N, E, k);
    cudaCheckLaunch();
}

__global__ void gates_kernel(float *g, const float *s, const int32_t *top, size_t N, size_t E,
                             size_t k, int renorm, double scale) {
    GRID_STRIDE(n, N) gates_row(g + n * k, s + n * E, top + n * k, k, renorm, scale);
}

void cuda_gates_forward(Tensor gates, Tensor scores, Tensor idx, size_t N, size_t E, size_t k,
                        int renorm, double scale) {
    if (N * k == 0) return;
    gates_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(DEV_R(gates), DEV_R(scores), DEV_I(idx), N,
                                                   E, k, renorm, scale);
    cudaCheckLaunch();
}

__global__ void gates_backward_kernel(float *ds, const float *dg, const float *s,
                                      const int32_t *top, size_t N, size_t E, size_t k,
                                      int renorm, double scale) {
    GRID_STRIDE(n, N) {
        gates_backward_row(ds + n * E, dg + n * k, s + n * E, top + n * k, k, renorm, scale);
    }
}

void cuda_gates_backward(Tensor dscores, Tensor dgates, Tensor scores, Tensor idx, size_t N,
                         size_t E, size_t k, int renorm, double scale) {
    if (!dscores.data || N * k == 0) return;
    gates_backward_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(
        DEV_R(dscores), DEV_R(dgates), DEV_R(scores), DEV_I(idx), N, E, k, renorm, scale);
    cudaCheckLaunch();
}

// ---- fused top-k routing ------------------------------------------------------------------

// One thread per row: noisy logits (raw not NULL), scores, top-k on scores (+ bias), plain
// or group-limited, gates, the row never leaving the thread between steps (the separate
// ops take up to five launches and round trips of the (N, E) rows through memory).
__global__ void route_topk_kernel(float *s, int32_t *top, float *g, float *h, const float *x,
                                  const float *raw, const float *ev, const float *bias,
                                  size_t N, size_t E, size_t k, RouteSpec spec) {
    GRID_STRIDE(n, N) {
        float *sr = s + n * E;
        const float *xr = x + n * E;
        if (raw) {
            float *hr = h + n * E;
            for (size_t e = 0; e < E; e++)
                hr[e] = noisy_value(xr[e], raw[n * E + e], ev[n * E + e]);
            xr = hr;
        }
        if (spec.func == SCORE_SIGMOID)
            for (size_t e = 0; e < E; e++)
                sr[e] = (float)stable_sigmoid(xr[e]);
        else
            softmax_row(sr, xr, E);
        route_select_row(top + n * k, sr, bias, E, k, &spec);
        gates_row(g + n * k, sr, top + n * k, k, spec.renorm, spec.scale);
    }
}

void cuda_route_topk_forward(Tensor scores, Tensor idx, Tensor gates, Tensor h, Tensor logits,
                             Tensor raw, Tensor eps, Tensor bias, size_t N, size_t E, size_t k,
                             RouteSpec spec) {
    check_score_func(spec.func);
    CUDA_REQUIRE(k >= 1 && k <= E && k <= MOE_TOPK_MAX,
                 "topk: need 1 <= k <= min(E, %d), got k=%zu E=%zu", MOE_TOPK_MAX, k, E);
    const char *bad = route_spec_problem(&spec, E, k);
    CUDA_REQUIRE(!bad, "route: %s (groups=%zu topk_groups=%zu E=%zu k=%zu)", bad ? bad : "",
                 spec.groups, spec.topk_groups, E, k);
    if (N == 0) return;
    route_topk_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(
        DEV_R(scores), DEV_I(idx), DEV_R(gates), DEV_R(h), DEV_R(logits), DEV_R(raw),
        DEV_R(eps), DEV_R(bias), N, E, k, spec);
    cudaCheckLaunch();
}
