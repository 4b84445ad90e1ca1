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
// Under expert parallelism (EP > 1) a rank's slab holds the dense tensors, the same on
// every rank, and its own routed experts, the same on the P / EP ranks holding them (its
// replicas, DIST_EXPERT_REPLICAS). The state then has two shardings, each a ZeroPart: the
// dense tensors' over all P ranks, the experts' over the replicas. Each part cuts, sums,
// updates and gathers its own trainable values (packed: the two interleave in the slab),
// so a dense value is summed once over every rank and lands on every rank with the same
// bits, whatever the expert groups' training selections. The norm adds every rank's
// squares (each value is held by one rank): the same bits on every rank.
#ifndef MOE_TRAIN_ZERO_H
#define MOE_TRAIN_ZERO_H

#include <stddef.h>
#include <stdint.h>

#include "../dist/dist.h"
#include "../kernels/param_group.h"
#include "../optim/adamw.h"

// One sharding: a set of the slab's tensors whose state is cut over one group's ranks.
typedef struct {
    DistGroup group;       // DIST_ALL, or under EP the expert replicas
    int P, rank;           // the group's size and this rank's place in it
    size_t *index;         // (n_groups) its tensors, in slab order: indices into Zero.groups
    size_t n_groups;
    size_t *bounds;        // (P+1) slab blocks, in elements
    size_t *state_bounds;  // (P+1) the blocks in the part's trainable values, in order
    real *packed;          // (state_bounds[P]) host: the trainable values back to back;
                           // NULL when in_place
    int in_place;          // 1: the part's trainable values are the whole slab, in order
    size_t shard_at;       // where this rank's block starts in the shard's state
} ZeroPart;

typedef struct {
    ParamGroup *groups;    // (n_groups) the unsharded groups, one per tensor
    size_t n_groups;
    ZeroPart parts[2];     // without EP: every tensor over every rank; under EP: the dense
                           // tensors over every rank, the routed experts over the replicas
    int n_parts;
    OptimConfig cfg;
    const Backend *be;
} Zero;

// Cuts groups (one per tensor, in slab order) into the ranks' blocks and initialises
// shard, the optimizer of this rank's block. expert: one flag per group under expert
// parallelism (the expert groups split before; the flagged groups form the second part),
// else NULL.
void zero_init(Zero *z, AdamW *shard, const OptimConfig *cfg, const ParamGroup *groups,
               const uint8_t *expert, size_t n_groups, const Backend *be);
void zero_free(Zero *z);

// The sharded step (collective): gradients summed into this rank's block, the global norm
// (returned, pre-clip, as adamw_step's), the update of this rank's block unless the norm
// is not finite, and every rank's updated block to every rank.
double zero_step(Zero *z, AdamW *shard, Tensor params, Tensor grads, double lr_now, long step,
                 double grad_scale);

// An unsharded optimizer with the whole state (collective): on rank 0 (under EP the ranks
// of expert group 0) every rank's moments of the tensors it holds gathered into
// full (adamw_free it after use); elsewhere full is left zeroed. Under EP world rank 0
// receives the dense tensors' state, every rank of expert group 0 its experts'.
void zero_gather(const Zero *z, const AdamW *shard, AdamW *full);
// An unsharded optimizer (full-size, zeroed state) to load a checkpoint into.
void zero_full_init(const Zero *z, AdamW *full);
// This rank's block of full's state into shard.
void zero_take(const Zero *z, AdamW *shard, const AdamW *full);

#endif
