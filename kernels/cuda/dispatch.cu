// dispatch.cu: moving token rows to and from the experts (CUDA): the dispatch plan (each
// expert's rows, grouped, by a stable CUB radix sort of the assignments by expert, so each
// expert's rows keep the CPU's token order), gathering rows into that order, and combining
// expert outputs back per token with their gates. Semantics and shapes are in kernels.h;
// kernels/cpu/dispatch.c is the reference.
#include "cuda_ops.cuh"

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

__global__ void dispatch_offsets_kernel(int32_t *off, const int32_t *skeys, size_t n,
                                        size_t E) {
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
    dispatch_keys_kernel<<<grid, CUDA_THREADS>>>(keys, DEV_I(slot), DEV_I(idx), DEV_I(keep), n,
                                                 E, cuda_error_flag());
    cudaCheckLaunch();
    cuda_iota(vals, n);
    // Stable: each expert's rows keep assignment (= token) order, as the CPU's serial pass.
    cuda_sort_pairs_int(keys, skeys, vals, svals, n, cuda_key_bits(E));
    dispatch_offsets_kernel<<<cuda_blocks(E + 1), CUDA_THREADS>>>(DEV_I(offsets), skeys, n, E);
    cudaCheckLaunch();
    dispatch_rows_kernel<<<grid, CUDA_THREADS>>>(DEV_I(rows), DEV_I(slot), skeys, svals, n, E,
                                                 k);
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
    if (m < 0 || (size_t)m >= yp_rows) return; // the whole block leaves together
    const float *dyr = dy + (a / k) * C, *src = yp + (size_t)m * C;
    double dot = 0.0;
    for (size_t c = threadIdx.x; c < C; c += blockDim.x)
        dot += (double)dyr[c] * src[c];
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
