// router_variants.c: routing beyond token-choice top-k (CPU): DeepSeek-V3 expert bias,
// hash routing, expert choice.
#include "cpu_ops.h"

#include <stdlib.h>

#include "../router_math.h"
#include "../../base/util.h"

void cpu_add_bias_forward(Tensor out, Tensor s, Tensor b, size_t N, size_t E) {
    real *o = TENSOR_R(out);        // (N, E)
    const real *in = TENSOR_R(s);   // (N, E)
    const real *bias = TENSOR_R(b); // (E)
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        for (size_t e = 0; e < E; e++) o[n * E + e] = in[n * E + e] + bias[e];
}

void cpu_hash_route_forward(Tensor idx, Tensor tokens, size_t N, size_t E, size_t k) {
    CHECK(k >= 1 && k <= E, "hash routing: k = %zu must be in 1..E = %zu", k, E);
    int32_t *top = TENSOR_I(idx);           // (N, k)
    const int32_t *tok = TENSOR_I(tokens);  // (N)
    for (size_t n = 0; n < N; n++) {
        uint64_t h = mix64((uint64_t)(uint32_t)tok[n]) % E;
        for (size_t j = 0; j < k; j++) top[n * k + j] = (int32_t)((h + j) % E);
    }
}

typedef struct {
    real score;
    int32_t token;
} Candidate;

static int by_score_desc(const void *a, const void *b) {
    const Candidate *x = a, *y = b;
    if (x->score != y->score) return x->score < y->score ? 1 : -1;
    return x->token - y->token;
}

void cpu_expert_choice_forward(Tensor keep, Tensor scores, size_t N, size_t E, size_t capacity) {
    int32_t *kp = TENSOR_I(keep);         // (N, E)
    const real *s = TENSOR_R(scores);     // (N, E)
    size_t C = capacity < N ? capacity : N;
#pragma omp parallel
    {
        Candidate *cand = CALLOC(N, sizeof *cand);   // (N) one expert's column
#pragma omp for
        for (size_t e = 0; e < E; e++) {
            for (size_t n = 0; n < N; n++) {
                cand[n] = (Candidate){s[n * E + e], (int32_t)n};
                kp[n * E + e] = 0;
            }
            qsort(cand, N, sizeof *cand, by_score_desc);
            for (size_t c = 0; c < C; c++) kp[(size_t)cand[c].token * E + e] = 1;
        }
        free(cand);
    }
}
