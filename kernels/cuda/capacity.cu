// capacity.cu: the router's capacity op (CUDA): which assignments fit in their expert's
// capacity, under either drop policy. Semantics and shapes are in kernels.h;
// kernels/cpu/capacity.c is the reference.
//
// Assignments are ranked r = j * N + n (all first choices, then all second choices, ...).
// DROP_POSITION: a stable sort by expert of the ranks in order puts each expert's claims
// in rank order. DROP_PROBS: first a stable sort by gate, descending, then a stable sort
// by expert: each expert's claims by gate descending, ties by rank. An assignment is kept
// when its place within its expert is below the capacity. The sorts are stable CUB radix
// sorts of (key, rank) pairs, so ties resolve exactly as the CPU's serial loops do; each
// expert's first sorted position is found by binary search.
#include "cuda_ops.cuh"

__global__ void keep_all_kernel(int32_t *keep, const int32_t *top, size_t n, size_t E,
                                int *flag) {
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
        int32_t *ranks = svals; // free until the second sort
        rank_gate_keys_kernel<<<grid, CUDA_THREADS>>>(gkeys, ranks, DEV_R(gates), N, k);
        cudaCheckLaunch();
        cuda_sort_pairs_float_desc(gkeys, sg, ranks, vals, n); // vals: ranks by gate
        expert_of_rank_kernel<<<grid, CUDA_THREADS>>>(keys, vals, DEV_I(idx), N, E, k, flag);
        cudaCheckLaunch();
    }
    cuda_sort_pairs_int(keys, skeys, vals, svals, n, bits);
    mark_kept_kernel<<<grid, CUDA_THREADS>>>(DEV_I(keep), skeys, svals, N, E, k, capacity);
    cudaCheckLaunch();
}
