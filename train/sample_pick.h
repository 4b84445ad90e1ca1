// sample_pick.h: choosing the next token from a row of logits: greedy, or sampling with
// temperature, top-k and top-p (nucleus), combinable.
#ifndef MOE_SAMPLE_PICK_H
#define MOE_SAMPLE_PICK_H

#include "../base/rng.h"
#include "../kernels/kernels.h"

typedef struct {
    double temperature;   // <= 0: greedy (the largest logit, lowest id on ties)
    int top_k;            // keep the k most probable tokens; 0: all
    double top_p;         // then the fewest of those whose probability reaches top_p; 1: all
} SamplePick;

// The next token from logits (V). Sampling order: temperature scales the logits, top-k
// keeps the k largest (ties: lower id), top-p keeps the shortest prefix of those, by
// probability descending, whose sum reaches top_p of theirs, and the token is drawn from
// what is kept in proportion to its probability (one rng_uniform draw). top_k 1 is greedy.
int sample_pick(const real *logits, int V, const SamplePick *p, Rng *rng);

#endif
