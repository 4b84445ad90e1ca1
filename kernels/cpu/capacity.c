// capacity.c: the router's capacity op (CPU): which assignments fit in their expert's
// capacity, under either drop policy. Semantics and shapes are in kernels.h.
#include "cpu_ops.h"
#include "../../base/util.h"

#include <stdlib.h>

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
    cpu_check_experts(top, N * k, E, "capacity");
    if (capacity == 0) {
        for (size_t a = 0; a < N * k; a++)
            kp[a] = 1;
    } else if (policy == DROP_POSITION) {
        keep_by_position(kp, top, N, E, k, capacity);
    } else {
        keep_by_probs(kp, top, g, N, k, capacity);
    }
}
