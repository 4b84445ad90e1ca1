// build.h: turns a ModelConfig into the tape (the decoder's op list).
//
// Internal to model/: model_init calls build_tape twice, first to size the activation
// arenas (their base is NULL), then to lay the real buffers out.
#ifndef MOE_BUILD_H
#define MOE_BUILD_H

#include "model.h"

void build_tape(Model *m);

#endif
