// router_variants.cu: routing beyond token-choice top-k (CUDA): DeepSeek-V3 expert bias,
// hash routing, expert choice. kernels/cpu/router_variants.c is the reference.
#include "cuda_ops.cuh"
#include "../router_math.h"

__global__ void add_bias_kernel(float *o, const float *in, const float *bias, size_t N,
                                size_t E) {
    GRID_STRIDE(i, N * E) o[i] = in[i] + bias[i % E];
}

void cuda_add_bias_forward(Tensor out, Tensor s, Tensor b, size_t N, size_t E) {
    if (N * E == 0) return;
    add_bias_kernel<<<cuda_blocks(N * E), CUDA_THREADS>>>(DEV_R(out), DEV_R(s), DEV_R(b), N, E);
    cudaCheckLaunch();
}

__global__ void hash_route_kernel(int32_t *top, const int32_t *tok, size_t N, size_t E,
                                  size_t k) {
    GRID_STRIDE(n, N) {
        uint64_t h = mix64((uint64_t)(uint32_t)tok[n]) % E;
        for (size_t j = 0; j < k; j++) top[n * k + j] = (int32_t)((h + j) % E);
    }
}

void cuda_hash_route_forward(Tensor idx, Tensor tokens, size_t N, size_t E, size_t k) {
    CUDA_REQUIRE(k >= 1 && k <= E, "hash routing: k = %zu must be in 1..E = %zu", k, E);
    if (N == 0) return;
    hash_route_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(DEV_I(idx), DEV_I(tokens), N, E, k);
    cudaCheckLaunch();
}

// Expert choice: every expert takes its `capacity` highest scores over tokens, ties to the
// lower token. Two stable sorts of the (N, E) entries i = n * E + e: by score descending
// (ties keep i order, so lower token first within an expert), then by expert. Each
// expert then holds exactly N sorted entries, and its first `capacity` are kept.

__global__ void score_keys_kernel(float *keys, const float *s, size_t n) {
    GRID_STRIDE(i, n) keys[i] = s[i] + 0.0f;   // folds -0 into +0, as the CPU compares them
}

__global__ void expert_keys_kernel(int32_t *keys, const int32_t *vals, size_t n, size_t E) {
    GRID_STRIDE(i, n) keys[i] = (int32_t)((size_t)vals[i] % E);
}

__global__ void expert_choice_mark_kernel(int32_t *keep, const int32_t *svals, size_t n,
                                          size_t N, size_t capacity) {
    GRID_STRIDE(p, n) keep[svals[p]] = (p % N) < capacity;   // expert p / N, place p % N
}

void cuda_expert_choice_forward(Tensor keep, Tensor scores, size_t N, size_t E,
                                size_t capacity) {
    size_t n = N * E;
    if (n == 0) return;
    SortScratch sc = cuda_sort_scratch(n, 2);
    float *fk = (float *)sc.extra[0], *sfk = (float *)sc.extra[1];
    int32_t *ik = sc.keys, *sik = sc.skeys, *v = sc.vals, *sv = sc.svals;
    unsigned grid = cuda_blocks(n);
    score_keys_kernel<<<grid, CUDA_THREADS>>>(fk, DEV_R(scores), n);
    cudaCheckLaunch();
    cuda_iota(v, n);
    cuda_sort_pairs_float_desc(fk, sfk, v, sv, n);
    expert_keys_kernel<<<grid, CUDA_THREADS>>>(ik, sv, n, E);
    cudaCheckLaunch();
    cuda_sort_pairs_int(ik, sik, sv, v, n, cuda_key_bits(E - 1));
    expert_choice_mark_kernel<<<grid, CUDA_THREADS>>>(DEV_I(keep), v, n, N, capacity);
    cudaCheckLaunch();
}
