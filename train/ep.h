// ep.h: expert parallelism (dist.expert_parallel = EP): the routed experts of every
// MoE layer are computed by the rank of the expert group (dist_split_expert_groups: EP
// consecutive ranks) that owns them, EP rank q owning experts [q E/EP, (q+1) E/EP). With
// P = EP x DP ranks there are DP such groups, each exchanging rows only within itself.
//
// Each rank routes its own micro-batch as one process would; at the routed experts op
// the per-expert row counts are exchanged first (MPI_Alltoall), then the gathered rows go
// to the experts' owners (MPI_Alltoallv, dispatch), the owner runs its experts over the
// rows of every rank, and the outputs come back (MPI_Alltoallv, combine); on a GPU the
// rows stay in device memory and travel by NCCL's grouped send/recv within the expert
// group's communicator (dist_alltoallv_tensor), the counts by MPI. Backward sends
// the output gradients the same way, the owner accumulates its experts' weight gradients
// from every rank's rows and returns the input gradients. Gates, combine and the router
// stay local, so the router's gradient is the whole one. A rank holds its own experts'
// weights, gradients and AdamW state only (the model is a shard); an expert's gradient is
// summed over its replicas (the same EP rank in every group) and the dense ones over all
// ranks (train/step.c). ep_gather.h puts the whole model together for checkpoints.
#ifndef MOE_TRAIN_EP_H
#define MOE_TRAIN_EP_H

#include "../model/model.h"
#include "../optim/adamw.h"

typedef struct EpLayer EpLayer;

typedef struct {
    EpLayer *layers;   // (n_models * n_moe) one exchange state per routed experts op
    Model **models;    // (n_models)
    int n_models;
    int n_moe;         // MoE layers of each model
} Ep;

// The routed experts this rank owns, [lo, hi) of every MoE layer (the expert group
// split before): its models are shards holding those only (model_init_experts). Dies
// unless the experts divide evenly over the group.
void ep_expert_range(const ModelConfig *cfg, int *lo, int *hi);
// Makes the routed experts ops of models (shards of this rank's range sharing one
// configuration, their tapes built) exchange with the other ranks of the expert group,
// from now on: a shard cannot compute its routed experts alone. Dies where the backend
// computes on a device and the build has no NCCL to carry device rows.
void ep_init(Ep *ep, Model **models, int n_models);
// The optimizer step of a shard (collective over the expert group), as adamw_step: the
// global norm adds every EP rank's experts' squares to the dense tensors' (the same on
// every rank); returns it.
double ep_step(const Ep *ep, AdamW *opt, Tensor params, Tensor grads, double lr_now, long step,
               double grad_scale);
// Before the models it was given are freed; their routed experts ops are left without a
// shard (and so cannot run).
void ep_free(Ep *ep);

#endif
