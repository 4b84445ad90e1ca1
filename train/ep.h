// ep.h: expert parallelism (dist.expert_parallel = EP, CPU): the routed experts of every
// MoE layer are computed by the rank of the expert group (dist_split_expert_groups: EP
// consecutive ranks) that owns them, EP rank q owning experts [q E/EP, (q+1) E/EP). With
// P = EP x DP ranks there are DP such groups, each exchanging rows only within itself.
//
// Each rank routes its own micro-batch as one process would; at the routed experts op
// the per-expert row counts are exchanged first (MPI_Alltoall), then the gathered rows go
// to the experts' owners (MPI_Alltoallv, dispatch), the owner runs its experts over the
// rows of every rank, and the outputs come back (MPI_Alltoallv, combine). Backward sends
// the output gradients the same way, the owner accumulates its experts' weight gradients
// from every rank's rows and returns the input gradients. Gates, combine and the router
// stay local, so the router's gradient is the whole one. Every rank still holds every
// expert's weights: the data-parallel gradient sum over all P ranks adds each group's
// owner's expert gradient (the other ranks hold zeros there) and gives every rank the
// whole one. The compute is sharded, the weights and their memory are not yet.
#ifndef MOE_TRAIN_EP_H
#define MOE_TRAIN_EP_H

#include "../model/model.h"

typedef struct EpLayer EpLayer;

typedef struct {
    EpLayer *layers;   // (n_models * n_moe) one exchange state per routed experts op
    Model **models;    // (n_models)
    int n_models;
    int n_moe;         // MoE layers of each model
} Ep;

// Makes the routed experts ops of models (sharing one configuration, their tapes built)
// exchange with the other ranks of the expert group (split before). Dies unless the
// backend is the CPU's and the experts divide evenly over the group.
void ep_init(Ep *ep, Model **models, int n_models);
// 1: the ops exchange; 0: every expert runs locally (rank 0's evaluation and sample,
// which the other ranks do not join).
void ep_attach(Ep *ep, int on);
// Before the models it was given are freed.
void ep_free(Ep *ep);

#endif
