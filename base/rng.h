// rng.h: a small deterministic random generator (xoshiro256** seeded by splitmix64).
//
// Used for weight init, noise for noisy gating and jitter, and data shuffling. Its whole
// state is four words, so a checkpoint can store it and resume bit-identically.
#ifndef MOE_RNG_H
#define MOE_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t s[4];
} Rng;

void rng_init(Rng *r, uint64_t seed);
uint64_t rng_next(Rng *r);
double rng_uniform(Rng *r);   // [0, 1)
double rng_normal(Rng *r);    // N(0, 1), Box-Muller (one draw per call)

#endif
