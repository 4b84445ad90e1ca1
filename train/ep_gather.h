// ep_gather.h: the whole model of an expert-parallel run put together on rank 0, for a
// checkpoint (one file holding every expert, whatever EP and P are).
//
// The ranks of expert group 0 (world ranks 0 .. EP-1) hold every expert between them;
// each sends its experts' weights (and their AdamW moments, where they train) to rank 0
// tensor by tensor, in the whole layout's order (through host memory and MPI, whatever
// device the shards compute on). Rank 0 keeps the whole model in host memory while the
// file is written (the checkpoint writer holds a file image of that
// size anyway); the other groups take no part.
#ifndef MOE_TRAIN_EP_GATHER_H
#define MOE_TRAIN_EP_GATHER_H

#include "../kernels/param_group.h"
#include "../model/model.h"
#include "../optim/adamw.h"

// What ckpt_save reads of a model, for every expert (rank 0 only; zeroed elsewhere).
typedef struct {
    Model model;      // cfg, the CPU backend, the whole layout, params and expert biases
                      // (host), the MoE layers' numbers
    AdamW opt;        // the whole state (when gathered with one)
    int has_opt;
} EpWhole;

// Collective (every rank calls it). shard: this rank's model; opt: its optimizer or NULL
// (weights only); groups: the whole layout's parameter groups (layout order, every rank
// the same trainable flags), needed with opt.
void ep_gather(EpWhole *w, const Model *shard, const AdamW *opt, const ParamGroup *groups,
               const OptimConfig *ocfg);
void ep_whole_free(EpWhole *w);

#endif
