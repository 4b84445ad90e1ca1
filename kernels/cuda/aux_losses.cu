// aux_losses.cu: the router's auxiliary losses (CUDA): load balancing (with the row
// normalisation it may take its probabilities from), z-loss, and Shazeer's importance and
// load losses. Semantics and shapes are in kernels.h; kernels/cpu/aux_losses.c is the
// reference, and the per-row arithmetic is its own: both include kernels/router_math.h.
//
// Per-token work is one thread per row (E and k are small). Sums across tokens are
// column sums in fixed chunks (cuda_colsum) or one-block reductions: no floating-point
// atomics. The only atomics are integer: the per-group expert histogram of the
// load-balancing loss.
#include "cuda_ops.cuh"
#include "../router_math.h"

// ---- load balancing loss ----------------------------------------------------------------

__global__ void group_histogram_kernel(int32_t *cnt, const int32_t *top, size_t n_assign,
                                       size_t rows_per_group, size_t E, size_t k, int *flag) {
    GRID_STRIDE(a, n_assign) {
        int32_t e = top[a];
        if (!expert_ok(e, E)) {
            cuda_flag(flag, CUDA_BAD_EXPERT);
            continue;
        }
        atomicAdd(&cnt[(a / k / rows_per_group) * E + (size_t)e], 1); // integer: exact
    }
}

struct ColumnOf {
    const float *x;
    size_t cols;
    __device__ double operator()(size_t r, size_t c) const { return x[r * cols + c]; }
};

// One thread: the loss and pmean from the counts and column sums.
__global__ void lb_finish_kernel(float *loss, float *pm, const int32_t *cnt,
                                 const double *colsum, size_t n, size_t E, size_t k, size_t G) {
    loss[0] = (float)lb_loss(pm, cnt, colsum, n, E, k, G);
}

void cuda_lb_loss_forward(Tensor loss, Tensor counts, Tensor pmean, Tensor probs, Tensor idx,
                          size_t N, size_t E, size_t k, size_t G) {
    CUDA_REQUIRE(G >= 1 && N % G == 0, "lb_loss: %zu rows do not split into %zu groups", N, G);
    size_t n = N / G;
    cudaCheck(cudaMemset(counts.data, 0, G * E * sizeof(int32_t)));
    if (N * k > 0) {
        group_histogram_kernel<<<cuda_blocks(N * k), CUDA_THREADS>>>(
            DEV_I(counts), DEV_I(idx), N * k, n, E, k, cuda_error_flag());
        cudaCheckLaunch();
    }
    ScratchLayout L;
    size_t o_part = L.add(cuda_colsum_scratch(n, E)), o_sum = L.add(G * E * sizeof(double));
    char *s = (char *)cuda_scratch(SCRATCH_OP, L.used);
    double *colsum = (double *)(s + o_sum);
    for (size_t g = 0; g < G; g++)
        cuda_colsum(colsum + g * E, (double *)(s + o_part), n, E,
                    ColumnOf{DEV_R(probs) + g * n * E, E});
    lb_finish_kernel<<<1, 1>>>(DEV_R(loss), DEV_R(pmean), DEV_I(counts), colsum, n, E, k, G);
    cudaCheckLaunch();
}

__global__ void lb_backward_kernel(float *dp, const int32_t *cnt, double scale, size_t N,
                                   size_t E, size_t n) {
    GRID_STRIDE(i, N * E) dp[i] += (float)(scale * cnt[(i / E / n) * E + i % E]);
}

void cuda_lb_loss_backward(Tensor dprobs, Tensor counts, double dloss, size_t N, size_t E,
                           size_t k, size_t G) {
    if (!dprobs.data || N * E == 0) return;
    size_t n = N / G;
    double scale = dloss / (double)G * (double)E / ((double)k * n * n);
    lb_backward_kernel<<<cuda_blocks(N * E), CUDA_THREADS>>>(DEV_R(dprobs), DEV_I(counts),
                                                             scale, N, E, n);
    cudaCheckLaunch();
}

__global__ void normalize_rows_kernel(float *out, const float *in, size_t N, size_t E) {
    GRID_STRIDE(n, N) normalize_row(out + n * E, in + n * E, E);
}

void cuda_normalize_rows_forward(Tensor p, Tensor s, size_t N, size_t E) {
    if (N * E == 0) return;
    normalize_rows_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(DEV_R(p), DEV_R(s), N, E);
    cudaCheckLaunch();
}

__global__ void normalize_rows_backward_kernel(float *d, const float *dpv, const float *in,
                                               size_t N, size_t E) {
    GRID_STRIDE(n, N) normalize_row_backward(d + n * E, dpv + n * E, in + n * E, E);
}

void cuda_normalize_rows_backward(Tensor ds, Tensor dp, Tensor s, size_t N, size_t E) {
    if (!ds.data || N * E == 0) return;
    normalize_rows_backward_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(DEV_R(ds), DEV_R(dp),
                                                                     DEV_R(s), N, E);
    cudaCheckLaunch();
}

// ---- z-loss -----------------------------------------------------------------------------

__global__ void router_lse_kernel(float *l, const float *x, size_t N, size_t E) {
    GRID_STRIDE(n, N) l[n] = (float)logsumexp(x + n * E, E);
}

// loss = mean_n l[n]^2; one block, fixed order.
__global__ void mean_square_kernel(float *loss, const float *l, size_t N) {
    double s = 0.0;
    for (size_t n = threadIdx.x; n < N; n += blockDim.x)
        s += (double)l[n] * l[n];
    s = cuda_block_sum(s);
    if (threadIdx.x == 0) loss[0] = (float)(s / (double)N);
}

void cuda_zloss_forward(Tensor loss, Tensor lse, Tensor logits, size_t N, size_t E) {
    if (N > 0 && E > 0) {
        router_lse_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(DEV_R(lse), DEV_R(logits), N, E);
        cudaCheckLaunch();
    }
    mean_square_kernel<<<1, CUDA_THREADS>>>(DEV_R(loss), DEV_R(lse), N);
    cudaCheckLaunch();
}

__global__ void zloss_backward_kernel(float *dx, const float *x, const float *l, double dloss,
                                      size_t N, size_t E) {
    GRID_STRIDE(i, N * E) {
        size_t n = i / E;
        double scale = dloss * 2.0 * l[n] / (double)N;
        dx[i] += (float)(scale * exp((double)x[i] - l[n]));
    }
}

void cuda_zloss_backward(Tensor dlogits, Tensor logits, Tensor lse, double dloss, size_t N,
                         size_t E) {
    if (!dlogits.data || N * E == 0) return;
    zloss_backward_kernel<<<cuda_blocks(N * E), CUDA_THREADS>>>(DEV_R(dlogits), DEV_R(logits),
                                                                DEV_R(lse), dloss, N, E);
    cudaCheckLaunch();
}

// ---- CV^2 losses (Shazeer importance and load) ------------------------------------------
// The per-expert vectors are E long: their spread and gradient run on one thread, in the
// CPU's order.

// v (E) = (float) sums; loss = CV^2(v).
__global__ void cv2_finish_kernel(float *loss, float *v, const double *sums, size_t E) {
    for (size_t i = 0; i < E; i++)
        v[i] = (float)sums[i];
    loss[0] = (float)cv2(v, E);
}

// grad (E) = dloss * dCV^2/dv.
__global__ void cv2_grad_kernel(double *grad, const float *v, size_t E, double dloss) {
    cv2_grad(grad, v, E, dloss);
}

// Row n's gates into expert e.
struct GatesInto {
    const float *g;
    const int32_t *top;
    size_t k;
    __device__ double operator()(size_t n, size_t e) const {
        double s = 0.0;
        for (size_t j = 0; j < k; j++)
            if ((size_t)top[n * k + j] == e) s += g[n * k + j];
        return s;
    }
};

__global__ void check_experts_kernel(const int32_t *top, size_t n, size_t E, int *flag) {
    GRID_STRIDE(a, n) if (!expert_ok(top[a], E)) cuda_flag(flag, CUDA_BAD_EXPERT);
}

static void check_experts(const int32_t *top, size_t n, size_t E) {
    if (n == 0) return;
    check_experts_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(top, n, E, cuda_error_flag());
    cudaCheckLaunch();
}

void cuda_importance_loss_forward(Tensor loss, Tensor imp, Tensor gates, Tensor idx, size_t N,
                                  size_t E, size_t k) {
    check_experts(DEV_I(idx), N * k, E);
    ScratchLayout L;
    size_t o_part = L.add(cuda_colsum_scratch(N, E)), o_sum = L.add(E * sizeof(double));
    char *s = (char *)cuda_scratch(SCRATCH_OP, L.used);
    double *sum = (double *)(s + o_sum);
    cuda_colsum(sum, (double *)(s + o_part), N, E, GatesInto{DEV_R(gates), DEV_I(idx), k});
    cv2_finish_kernel<<<1, 1>>>(DEV_R(loss), DEV_R(imp), sum, E);
    cudaCheckLaunch();
}

__global__ void importance_backward_kernel(float *dg, const int32_t *top, const double *grad,
                                           size_t n, size_t E) {
    GRID_STRIDE(a, n) if (expert_ok(top[a], E)) dg[a] += (float)grad[top[a]];
}

void cuda_importance_loss_backward(Tensor dgates, Tensor imp, Tensor idx, double dloss,
                                   size_t N, size_t E, size_t k) {
    if (!dgates.data || E == 0) return;
    check_experts(DEV_I(idx), N * k, E);
    double *grad = (double *)cuda_scratch(SCRATCH_OP, E * sizeof(double));
    cv2_grad_kernel<<<1, 1>>>(grad, DEV_R(imp), E, dloss);
    cudaCheckLaunch();
    if (N * k == 0) return;
    importance_backward_kernel<<<cuda_blocks(N * k), CUDA_THREADS>>>(DEV_R(dgates), DEV_I(idx),
                                                                     grad, N * k, E);
    cudaCheckLaunch();
}

// ---- load loss --------------------------------------------------------------------------

// The highest h outside the top k (lowest index among equals); E when a top-k index is
// invalid (the row is then skipped, and flagged).
__global__ void best_unselected_kernel(int32_t *best_out, const float *hv, const int32_t *top,
                                       size_t N, size_t E, size_t k, int *flag) {
    GRID_STRIDE(n, N) {
        const int32_t *tr = top + n * k;
        const float *h = hv + n * E;
        bool ok = true;
        for (size_t j = 0; j < k; j++)
            ok = ok && expert_ok(tr[j], E);
        size_t best = E;
        if (ok)
            best = best_unselected(h, tr, E, k);
        else
            cuda_flag(flag, CUDA_BAD_EXPERT);
        best_out[n] = (int32_t)best;
    }
}

// Row n's term of expert i's load: Phi(z).
struct LoadCdf {
    const float *c, *h, *r;
    const int32_t *top, *best_out;
    size_t E, k;
    __device__ double operator()(size_t n, size_t i) const {
        size_t best = (size_t)best_out[n];
        if (best >= E) return 0.0;
        LoadTerm t = load_term(c + n * E, h + n * E, r + n * E, top + n * k, k, best, i);
        return normal_cdf(t.z);
    }
};

static void check_load_args(size_t E, size_t k) {
    CUDA_REQUIRE(k >= 1 && k < E,
                 "load_loss: need 1 <= k < E (a threshold outside the top k), got k=%zu E=%zu",
                 k, E);
}

void cuda_load_loss_forward(Tensor loss, Tensor load, Tensor clean, Tensor h, Tensor raw,
                            Tensor idx, size_t N, size_t E, size_t k) {
    check_load_args(E, k);
    ScratchLayout L;
    size_t o_best = L.add(N * sizeof(int32_t)), o_part = L.add(cuda_colsum_scratch(N, E)),
           o_sum = L.add(E * sizeof(double));
    char *s = (char *)cuda_scratch(SCRATCH_OP, L.used);
    int32_t *best = (int32_t *)(s + o_best);
    double *sum = (double *)(s + o_sum);
    if (N > 0) {
        best_unselected_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(best, DEV_R(h), DEV_I(idx), N,
                                                                 E, k, cuda_error_flag());
        cudaCheckLaunch();
    }
    cuda_colsum(sum, (double *)(s + o_part), N, E,
                LoadCdf{DEV_R(clean), DEV_R(h), DEV_R(raw), DEV_I(idx), best, E, k});
    cv2_finish_kernel<<<1, 1>>>(DEV_R(loss), DEV_R(load), sum, E);
    cudaCheckLaunch();
}

// Every write of row n lands in row n (thr_index is in row n): one thread per row.
__global__ void load_backward_kernel(float *dc, float *dhv, float *dr, const float *c,
                                     const float *hv, const float *r, const int32_t *top,
                                     const int32_t *best_out, const double *grad, size_t N,
                                     size_t E, size_t k) {
    GRID_STRIDE(n, N) {
        size_t best = (size_t)best_out[n];
        if (best >= E) continue;
        load_backward_row(dc, dhv, dr, c, hv, r, top, grad, n, E, k, best);
    }
}

void cuda_load_loss_backward(Tensor dclean, Tensor dh, Tensor draw, Tensor load, Tensor clean,
                             Tensor h, Tensor raw, Tensor idx, double dloss, size_t N, size_t E,
                             size_t k) {
    if (!dclean.data && !dh.data && !draw.data) return;
    check_load_args(E, k);
    if (N == 0) return;
    ScratchLayout L;
    size_t o_best = L.add(N * sizeof(int32_t)), o_grad = L.add(E * sizeof(double));
    char *s = (char *)cuda_scratch(SCRATCH_OP, L.used);
    int32_t *best = (int32_t *)(s + o_best);
    double *grad = (double *)(s + o_grad);
    cv2_grad_kernel<<<1, 1>>>(grad, DEV_R(load), E, dloss);
    cudaCheckLaunch();
    unsigned grid = cuda_blocks(N);
    best_unselected_kernel<<<grid, CUDA_THREADS>>>(best, DEV_R(h), DEV_I(idx), N, E, k,
                                                   cuda_error_flag());
    cudaCheckLaunch();
    load_backward_kernel<<<grid, CUDA_THREADS>>>(DEV_R(dclean), DEV_R(dh), DEV_R(draw),
                                                 DEV_R(clean), DEV_R(h), DEV_R(raw), DEV_I(idx),
                                                 best, grad, N, E, k);
    cudaCheckLaunch();
}
