// expert_shard.h: ExpertShard, a replacement for the routed experts op that computes the
// experts elsewhere (expert parallelism: train/ep.h exchanges the rows with the ranks
// that own the experts).
//
// Its forward and backward take experts_forward's and experts_backward's operands
// (kernels/ops.def: rows [offsets[e], offsets[e+1]) of xp belong to expert e of E) and
// must produce the same results for them; where the rows are computed is its business.
// w and dw are the op's model's: a model sharded over ranks holds some of the E experts
// only (train/ep.c). ctx is the shard's own state (one per op: it keeps what its backward
// needs).
#ifndef MOE_EXPERT_SHARD_H
#define MOE_EXPERT_SHARD_H

#include "kernels.h"

typedef struct ExpertShard {
    void *ctx;
    void (*forward)(void *ctx, const Backend *be, Tensor yp, Tensor xp, Tensor w,
                    Tensor offsets, size_t E, size_t C, size_t F);
    void (*backward)(void *ctx, const Backend *be, Tensor dxp, Tensor dw, const uint8_t *train,
                     Tensor dyp, Tensor xp, Tensor w, Tensor offsets, size_t E, size_t C,
                     size_t F);
} ExpertShard;

#endif
