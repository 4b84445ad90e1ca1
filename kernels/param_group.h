// param_group.h: ParamGroup, one tensor of the parameter slab as the optimizer sees it.
//
// The model knows which tensor is a norm, an embedding or a router; the optimizer needs
// only where each tensor lives and how it trains. This plain record is the contract
// between the two: the model fills one per layout tensor (model/param_groups.h) and
// AdamW reads them (optim/adamw.h). It sits in the room below both, so that neither of
// the two sibling rooms includes the other.
#ifndef MOE_PARAM_GROUP_H
#define MOE_PARAM_GROUP_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    size_t offset, numel; // the tensor in the parameter and gradient slabs, in elements
    double lr_mult;       // trains at lr * lr_mult
    uint8_t decay;        // 1: decoupled weight decay applies
    uint8_t trainable;    // 0: frozen: never updated, holds no optimizer state
} ParamGroup;

#endif
