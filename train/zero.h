// zero.h: ZeRO-1 (dist.zero = 1): AdamW's state sharded over the ranks of a data-parallel
// run (Rajbhandari et al. 2020, stage 1).
//
// The parameter slab is cut into P consecutive blocks holding about equal numbers of
// trainable values; rank r keeps the moments of the trainable values in block r only (a
// frozen tensor holds state on no rank). A step reduce-scatters the gradients (rank r
// receives block r summed over the ranks), takes the global norm from every rank's sum of
// squares, updates its block and all-gathers the updated weights. Both collectives carry
// the trainable values only (frozen tensors neither change nor have gradients to sum).
// When every tensor trains, those are the whole slab in its own order: the collectives
// then work in place on the backend's gradient and parameter tensors (on a GPU, NCCL on
// device memory; no copy on the CPU). Otherwise the trainable values go packed back to
// back in slab order through a host buffer, and back. Checkpoints hold the
// whole state: it is gathered to rank 0 to save and sliced out of the file to load, so
// a run saved with one rank count or setting resumes with any other.
//
// Under expert parallelism (EP > 1) a rank's slab holds the dense tensors and its own
// experts, which the P / EP ranks holding the same experts (its replicas,
// DIST_EXPERT_REPLICAS) share: ZeRO-1 shards that slab's state over those replicas. The
// dense gradients are first summed within the expert group (where they differ but the
// experts do not overlap), so the reduce-scatter over the replicas completes every sum:
// dense over all P ranks, experts over their replicas. The expert groups cut their
// replicas' blocks at the same places unless the training selection differs between
// experts (train.c refuses that beyond 2 replicas: the dense sums could then round
// differently in different groups). The norm adds every rank's squares: the same bits on
// every rank.
#ifndef MOE_TRAIN_ZERO_H
#define MOE_TRAIN_ZERO_H

#include <stddef.h>
#include <stdint.h>

#include "../dist/dist.h"
#include "../kernels/param_group.h"
#include "../optim/adamw.h"

typedef struct {
    size_t *bounds;        // (P+1) slab blocks, in elements (P: the group's ranks)
    size_t *state_bounds;  // (P+1) the blocks' trainable values in the full state's order
    ParamGroup *groups;    // (n_groups) the unsharded groups, one per tensor
    uint8_t *expert;       // (n_groups) 1: a routed expert's tensor (expert parallel)
    ParamGroup *mine;      // (n_mine) this rank's pieces of the groups, in slab order
    uint8_t *mine_expert;  // (n_mine)
    size_t n_mine;
    real *packed;          // (state_bounds[P]) host: the trainable values back to back;
                           // NULL when in_place
    int in_place;          // 1: every slab value trains, bounds = state_bounds
    size_t n_groups;
    DistGroup group;       // the ranks sharing the state: DIST_ALL, under EP the replicas
    int P, rank;           // the group's size and this rank's place in it
    int ep;                // expert-parallel group size (1: none)
    OptimConfig cfg;
    const Backend *be;
} Zero;

// Cuts groups (one per tensor, in slab order) into the ranks' blocks and initialises
// shard, the optimizer of this rank's block. expert: one flag per group under expert
// parallelism (the groups split first), else NULL.
void zero_init(Zero *z, AdamW *shard, const OptimConfig *cfg, const ParamGroup *groups,
               const uint8_t *expert, size_t n_groups, const Backend *be);
void zero_free(Zero *z);

// The sharded step (collective): gradients summed into this rank's block, the global norm
// (returned, pre-clip, as adamw_step's), the update of this rank's block unless the norm
// is not finite, and every rank's updated block to every rank.
double zero_step(Zero *z, AdamW *shard, Tensor params, Tensor grads, double lr_now, long step,
                 double grad_scale);

// An unsharded optimizer with the whole state (collective): on the group's first rank
// (rank 0; under EP the ranks of expert group 0) every member's moments gathered into
// full (adamw_free it after use); elsewhere full is left zeroed.
void zero_gather(const Zero *z, const AdamW *shard, AdamW *full);
// An unsharded optimizer (full-size, zeroed state) to load a checkpoint into.
void zero_full_init(const Zero *z, AdamW *full);
// This rank's block of full's state into shard.
void zero_take(const Zero *z, AdamW *shard, const AdamW *full);

#endif
