// router.cu: the router's CUDA ops: scores, Shazeer noise, top-k, gates, capacity,
// dispatch, gather/combine, and the auxiliary losses (load balancing, z-loss,
// importance, load). Semantics and shapes are in kernels.h; kernels/cpu/router.c is the
// reference, and the per-row arithmetic is its own: both include kernels/router_math.h.
//
// Per-token work is one thread per row (E and k are small). Everything that orders
// assignments (capacity, dispatch) is a stable CUB radix sort of (key, assignment)
// pairs, so ties resolve exactly as the CPU's serial loops do; each expert's first
// sorted position is found by binary search. Sums across tokens are column sums in
// fixed chunks (cuda_colsum) or one-block reductions: no floating-point atomics. The
// only atomics are integer: the per-group expert histogram of the load-balancing loss.
#include "cuda_ops.cuh"
#include "../router_math.h"

__device__ __forceinline__ bool expert_ok(int32_t e, size_t E) { return e >= 0 && (size_t)e < E; }

// First position in sorted keys (n) holding a key >= e.
__device__ __forceinline__ size_t lower_bound(const int32_t *keys, size_t n, int32_t e) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (keys[mid] < e) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

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
        sigmoid_kernel<<<cuda_blocks(N * E), CUDA_THREADS>>>(DEV_R(scores), DEV_R(logits), N * E);
    else
        softmax_rows_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(DEV_R(scores), DEV_R(logits), N, E);
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
    noisy_backward_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(DEV_R(dclean), DEV_R(draw), DEV_R(dh),
                                                            DEV_R(raw), DEV_R(eps), n);
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
                             size_t k, int renorm) {
    GRID_STRIDE(n, N) gates_row(g + n * k, s + n * E, top + n * k, k, renorm);
}

void cuda_gates_forward(Tensor gates, Tensor scores, Tensor idx, size_t N, size_t E, size_t k,
                        int renorm) {
    if (N * k == 0) return;
    gates_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(DEV_R(gates), DEV_R(scores), DEV_I(idx), N, E,
                                                   k, renorm);
    cudaCheckLaunch();
}

__global__ void gates_backward_kernel(float *ds, const float *dg, const float *s,
                                      const int32_t *top, size_t N, size_t E, size_t k,
                                      int renorm) {
    GRID_STRIDE(n, N) {
        gates_backward_row(ds + n * E, dg + n * k, s + n * E, top + n * k, k, renorm);
    }
}

void cuda_gates_backward(Tensor dscores, Tensor dgates, Tensor scores, Tensor idx, size_t N,
                         size_t E, size_t k, int renorm) {
    if (!dscores.data || N * k == 0) return;
    gates_backward_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(
        DEV_R(dscores), DEV_R(dgates), DEV_R(scores), DEV_I(idx), N, E, k, renorm);
    cudaCheckLaunch();
}

// ---- fused top-k routing ------------------------------------------------------------------

// One thread per row: noisy logits (raw not NULL), scores, top-k on scores (+ bias),
// gates, the row never leaving the thread between steps (the separate ops take up to
// five launches and round trips of the (N, E) rows through memory).
__global__ void route_topk_kernel(float *s, int32_t *top, float *g, float *h, const float *x,
                                  const float *raw, const float *ev, const float *bias,
                                  size_t N, size_t E, size_t k, int sigmoid, int renorm) {
    GRID_STRIDE(n, N) {
        float *sr = s + n * E;
        const float *xr = x + n * E;
        if (raw) {
            float *hr = h + n * E;
            for (size_t e = 0; e < E; e++)
                hr[e] = noisy_value(xr[e], raw[n * E + e], ev[n * E + e]);
            xr = hr;
        }
        if (sigmoid)
            for (size_t e = 0; e < E; e++) sr[e] = (float)stable_sigmoid(xr[e]);
        else
            softmax_row(sr, xr, E);
        topk_row(top + n * k, sr, bias, E, k);
        gates_row(g + n * k, sr, top + n * k, k, renorm);
    }
}

void cuda_route_topk_forward(Tensor scores, Tensor idx, Tensor gates, Tensor h, Tensor logits,
                             Tensor raw, Tensor eps, Tensor bias, size_t N, size_t E, size_t k,
                             ScoreFunc func, int renorm) {
    check_score_func(func);
    CUDA_REQUIRE(k >= 1 && k <= E && k <= MOE_TOPK_MAX,
                 "topk: need 1 <= k <= min(E, %d), got k=%zu E=%zu", MOE_TOPK_MAX, k, E);
    if (N == 0) return;
    route_topk_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(
        DEV_R(scores), DEV_I(idx), DEV_R(gates), DEV_R(h), DEV_R(logits), DEV_R(raw),
        DEV_R(eps), DEV_R(bias), N, E, k, func == SCORE_SIGMOID, renorm);
    cudaCheckLaunch();
}

// ---- capacity ---------------------------------------------------------------------------
// Assignments are ranked r = j * N + n (all first choices, then all second choices, ...).
// DROP_POSITION: a stable sort by expert of the ranks in order puts each expert's claims
// in rank order. DROP_PROBS: first a stable sort by gate, descending, then a stable sort
// by expert: each expert's claims by gate descending, ties by rank. An assignment is kept
// when its place within its expert is below the capacity.

__global__ void keep_all_kernel(int32_t *keep, const int32_t *top, size_t n, size_t E, int *flag) {
    GRID_STRIDE(a, n) {
        bool ok = expert_ok(top[a], E);
        if (!ok) cuda_flag(flag, CUDA_BAD_EXPERT);
        keep[a] = ok;
    }
}

// keys[r] = expert of rank r; vals[r] = r.
__global__ void rank_expert_keys_kernel(int32_t *keys, int32_t *vals, const int32_t *top,
                                        size_t N, size_t E, size_t k, int *flag) {
    GRID_STRIDE(r, N * k) {
        int32_t e = top[(r % N) * k + r / N];
        if (!expert_ok(e, E)) {
            cuda_flag(flag, CUDA_BAD_EXPERT);
            e = (int32_t)E;
        }
        keys[r] = e;
        vals[r] = (int32_t)r;
    }
}

// gkeys[r] = gate of rank r (+0.0f folds -0 into +0, which the CPU compares as equal);
// ranks[r] = r.
__global__ void rank_gate_keys_kernel(float *gkeys, int32_t *ranks, const float *g, size_t N,
                                      size_t k) {
    GRID_STRIDE(r, N * k) {
        gkeys[r] = g[(r % N) * k + r / N] + 0.0f;
        ranks[r] = (int32_t)r;
    }
}

// keys[i] = expert of the rank vals[i].
__global__ void expert_of_rank_kernel(int32_t *keys, const int32_t *vals, const int32_t *top,
                                      size_t N, size_t E, size_t k, int *flag) {
    GRID_STRIDE(i, N * k) {
        int32_t r = vals[i];
        int32_t e = top[(size_t)(r % (int32_t)N) * k + (size_t)r / N];
        if (!expert_ok(e, E)) {
            cuda_flag(flag, CUDA_BAD_EXPERT);
            e = (int32_t)E;
        }
        keys[i] = e;
    }
}

__global__ void mark_kept_kernel(int32_t *keep, const int32_t *skeys, const int32_t *svals,
                                 size_t N, size_t E, size_t k, size_t capacity) {
    size_t n_items = N * k;
    GRID_STRIDE(i, n_items) {
        int32_t e = skeys[i];
        size_t r = (size_t)svals[i];
        size_t place = i - lower_bound(skeys, n_items, e);
        keep[(r % N) * k + r / N] = (size_t)e < E && place < capacity;
    }
}

void cuda_capacity_forward(Tensor keep, Tensor idx, Tensor gates, size_t N, size_t E, size_t k,
                           size_t capacity, DropPolicy policy) {
    CUDA_REQUIRE(policy == DROP_POSITION || policy == DROP_PROBS,
                 "capacity: unknown drop policy %d", (int)policy);
    size_t n = N * k;
    if (n == 0) return;
    int *flag = cuda_error_flag();
    unsigned grid = cuda_blocks(n);
    if (capacity == 0) {
        keep_all_kernel<<<grid, CUDA_THREADS>>>(DEV_I(keep), DEV_I(idx), n, E, flag);
        cudaCheckLaunch();
        return;
    }
    SortScratch sc = cuda_sort_scratch(n, 2);
    int32_t *keys = sc.keys, *skeys = sc.skeys, *vals = sc.vals, *svals = sc.svals;
    int bits = cuda_key_bits(E);
    if (policy == DROP_POSITION) {
        rank_expert_keys_kernel<<<grid, CUDA_THREADS>>>(keys, vals, DEV_I(idx), N, E, k, flag);
        cudaCheckLaunch();
    } else {
        float *gkeys = (float *)sc.extra[0], *sg = (float *)sc.extra[1];
        int32_t *ranks = svals;   // free until the second sort
        rank_gate_keys_kernel<<<grid, CUDA_THREADS>>>(gkeys, ranks, DEV_R(gates), N, k);
        cudaCheckLaunch();
        cuda_sort_pairs_float_desc(gkeys, sg, ranks, vals, n);   // vals: ranks by gate
        expert_of_rank_kernel<<<grid, CUDA_THREADS>>>(keys, vals, DEV_I(idx), N, E, k, flag);
        cudaCheckLaunch();
    }
    cuda_sort_pairs_int(keys, skeys, vals, svals, n, bits);
    mark_kept_kernel<<<grid, CUDA_THREADS>>>(DEV_I(keep), skeys, svals, N, E, k, capacity);
    cudaCheckLaunch();
}

// ---- dispatch / combine -----------------------------------------------------------------

// keys[a] = expert of a kept assignment, E for a dropped one (sorted last); slot = -1 there.
__global__ void dispatch_keys_kernel(int32_t *keys, int32_t *sl, const int32_t *top,
                                     const int32_t *kp, size_t n, size_t E, int *flag) {
    GRID_STRIDE(a, n) {
        int32_t e = top[a];
        if (!expert_ok(e, E)) {
            cuda_flag(flag, CUDA_BAD_EXPERT);
            e = (int32_t)E;
        }
        if (!kp[a]) e = (int32_t)E;
        keys[a] = e;
        if (e == (int32_t)E) sl[a] = -1;
    }
}

__global__ void dispatch_offsets_kernel(int32_t *off, const int32_t *skeys, size_t n, size_t E) {
    GRID_STRIDE(e, E + 1) off[e] = (int32_t)lower_bound(skeys, n, (int32_t)e);
}

__global__ void dispatch_rows_kernel(int32_t *row, int32_t *sl, const int32_t *skeys,
                                     const int32_t *svals, size_t n, size_t E, size_t k) {
    GRID_STRIDE(m, n) {
        if ((size_t)skeys[m] >= E) continue;
        int32_t a = svals[m];
        row[m] = (int32_t)((size_t)a / k);
        sl[a] = (int32_t)m;
    }
}

void cuda_dispatch_plan(Tensor offsets, Tensor rows, Tensor slot, Tensor idx, Tensor keep,
                        size_t N, size_t E, size_t k) {
    size_t n = N * k;
    if (n == 0) {
        cudaCheck(cudaMemset(offsets.data, 0, (E + 1) * sizeof(int32_t)));
        return;
    }
    SortScratch sc = cuda_sort_scratch(n, 0);
    int32_t *keys = sc.keys, *skeys = sc.skeys, *vals = sc.vals, *svals = sc.svals;
    unsigned grid = cuda_blocks(n);
    dispatch_keys_kernel<<<grid, CUDA_THREADS>>>(keys, DEV_I(slot), DEV_I(idx), DEV_I(keep), n, E,
                                                 cuda_error_flag());
    cudaCheckLaunch();
    cuda_iota(vals, n);
    // Stable: each expert's rows keep assignment (= token) order, as the CPU's serial pass.
    cuda_sort_pairs_int(keys, skeys, vals, svals, n, cuda_key_bits(E));
    dispatch_offsets_kernel<<<cuda_blocks(E + 1), CUDA_THREADS>>>(DEV_I(offsets), skeys, n, E);
    cudaCheckLaunch();
    dispatch_rows_kernel<<<grid, CUDA_THREADS>>>(DEV_I(rows), DEV_I(slot), skeys, svals, n, E, k);
    cudaCheckLaunch();
}

// xp (M, C) = x[rows], M = offsets[E] read on the device: launched over the buffer's rows.
void cuda_gather_rows_forward(Tensor xp, Tensor x, Tensor rows, Tensor offsets, size_t E,
                              size_t C) {
    if (C == 0) return;
    cuda_gather_rows(DEV_R(xp), DEV_R(x), x.numel / C, DEV_I(rows), xp.numel / C,
                     DEV_I(offsets) + E, C, CUDA_BAD_ROW);
}

// dx[rows[m]] += dxp[m]: sorted by token so each token's rows add in permuted-row order.
void cuda_gather_rows_backward(Tensor dx, Tensor dxp, Tensor rows, Tensor offsets, size_t E,
                               size_t C) {
    if (!dx.data || C == 0) return;
    cuda_scatter_add_rows(DEV_R(dx), dx.numel / C, DEV_R(dxp), DEV_I(rows), dxp.numel / C,
                          DEV_I(offsets) + E, C, CUDA_BAD_ROW);
}

__global__ void combine_kernel(float *y, const float *yp, const float *g, const int32_t *sl,
                               size_t N, size_t k, size_t C, size_t yp_rows, int *flag) {
    GRID_STRIDE(i, N * C) {
        size_t n = i / C, c = i % C;
        float acc = 0.0f;
        for (size_t j = 0; j < k; j++) {
            int32_t m = sl[n * k + j];
            if (m < 0) continue;
            if ((size_t)m >= yp_rows) {
                cuda_flag(flag, CUDA_BAD_ROW);
                continue;
            }
            acc += g[n * k + j] * yp[(size_t)m * C + c];
        }
        y[i] = acc;
    }
}

void cuda_combine_forward(Tensor y, Tensor yp, Tensor gates, Tensor slot, size_t N, size_t k,
                          size_t C) {
    if (N * C == 0) return;
    combine_kernel<<<cuda_blocks(N * C), CUDA_THREADS>>>(DEV_R(y), DEV_R(yp), DEV_R(gates),
                                                         DEV_I(slot), N, k, C, yp.numel / C,
                                                         cuda_error_flag());
    cudaCheckLaunch();
}

// dyp[slot[a]] += g[a] dy[n]: each permuted row has one assignment, so one writer.
__global__ void combine_backward_rows_kernel(float *dp, const float *dy, const float *g,
                                             const int32_t *sl, size_t n_assign, size_t k,
                                             size_t C, size_t yp_rows) {
    GRID_STRIDE(i, n_assign * C) {
        size_t a = i / C, c = i % C;
        int32_t m = sl[a];
        if (m < 0 || (size_t)m >= yp_rows) continue;
        dp[(size_t)m * C + c] += g[a] * dy[(a / k) * C + c];
    }
}

// dgates[a] += <dy[n], yp[slot[a]]>; one block per assignment.
__global__ void combine_backward_gates_kernel(float *dg, const float *dy, const float *yp,
                                              const int32_t *sl, size_t k, size_t C,
                                              size_t yp_rows) {
    size_t a = blockIdx.x;
    int32_t m = sl[a];
    if (m < 0 || (size_t)m >= yp_rows) return;   // the whole block leaves together
    const float *dyr = dy + (a / k) * C, *src = yp + (size_t)m * C;
    double dot = 0.0;
    for (size_t c = threadIdx.x; c < C; c += blockDim.x) dot += (double)dyr[c] * src[c];
    dot = cuda_block_sum(dot);
    if (threadIdx.x == 0) dg[a] += (float)dot;
}

void cuda_combine_backward(Tensor dyp, Tensor dgates, Tensor dy, Tensor yp, Tensor gates,
                           Tensor slot, size_t N, size_t k, size_t C) {
    size_t n = N * k;
    if (n == 0 || C == 0) return;
    size_t yp_rows = (dyp.data ? dyp.numel : yp.numel) / C;
    if (dyp.data) {
        combine_backward_rows_kernel<<<cuda_blocks(n * C), CUDA_THREADS>>>(
            DEV_R(dyp), DEV_R(dy), DEV_R(gates), DEV_I(slot), n, k, C, yp_rows);
        cudaCheckLaunch();
    }
    if (dgates.data) {
        combine_backward_gates_kernel<<<(unsigned)n, CUDA_THREADS>>>(
            DEV_R(dgates), DEV_R(dy), DEV_R(yp), DEV_I(slot), k, C, yp.numel / C);
        cudaCheckLaunch();
    }
}

// ---- load balancing loss ----------------------------------------------------------------

__global__ void group_histogram_kernel(int32_t *cnt, const int32_t *top, size_t n_assign,
                                       size_t rows_per_group, size_t E, size_t k, int *flag) {
    GRID_STRIDE(a, n_assign) {
        int32_t e = top[a];
        if (!expert_ok(e, E)) {
            cuda_flag(flag, CUDA_BAD_EXPERT);
            continue;
        }
        atomicAdd(&cnt[(a / k / rows_per_group) * E + (size_t)e], 1);   // integer: exact
    }
}

struct ColumnOf {
    const float *x;
    size_t cols;
    __device__ double operator()(size_t r, size_t c) const { return x[r * cols + c]; }
};

// One thread: the loss and pmean from the counts and column sums.
__global__ void lb_finish_kernel(float *loss, float *pm, const int32_t *cnt, const double *colsum,
                                 size_t n, size_t E, size_t k, size_t G) {
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
    lb_backward_kernel<<<cuda_blocks(N * E), CUDA_THREADS>>>(DEV_R(dprobs), DEV_I(counts), scale,
                                                             N, E, n);
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
    for (size_t n = threadIdx.x; n < N; n += blockDim.x) s += (double)l[n] * l[n];
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
    for (size_t i = 0; i < E; i++) v[i] = (float)sums[i];
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
        for (size_t j = 0; j < k; j++) ok = ok && expert_ok(tr[j], E);
        size_t best = E;
        if (ok) best = best_unselected(h, tr, E, k);
        else cuda_flag(flag, CUDA_BAD_EXPERT);
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
        best_unselected_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(best, DEV_R(h), DEV_I(idx), N, E,
                                                                 k, cuda_error_flag());
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
