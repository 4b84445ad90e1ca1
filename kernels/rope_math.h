// rope_math.h: RoPE's frequencies and YaRN's scaling (Peng et al. 2023, as DeepSeek-V2 and
// Hugging Face transformers define them), written once for both backends.
//
// Pair i of a D-wide rotated part turns by t * rope_inv_freq(i) at position t, and the
// rotated values are multiplied by rope_cos_scale (YaRN's attention factor; 1 without
// YaRN). Under nvcc every function is __host__ __device__ (MOE_HD); everything is double.
#ifndef MOE_ROPE_MATH_H
#define MOE_ROPE_MATH_H

#include <math.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "kernels.h"
#ifdef __cplusplus
}
#endif

#ifdef __CUDACC__
#define MOE_ROPE_HD __host__ __device__
#else
#define MOE_ROPE_HD
#endif

// YaRN's get_mscale: 0.1 * mscale * ln(factor) + 1, and 1 for factor <= 1.
static inline MOE_ROPE_HD double rope_get_mscale(double factor, double mscale) {
    return factor <= 1 ? 1.0 : 0.1 * mscale * log(factor) + 1.0;
}

// The (fractional) pair index whose wavelength turns `rotations` times over the original
// context: D ln(orig / (2 pi rotations)) / (2 ln theta).
static inline MOE_ROPE_HD double rope_correction_dim(double rotations, double D, double theta,
                                                     double orig) {
    return D * log(orig / (rotations * 2.0 * 3.14159265358979323846)) / (2.0 * log(theta));
}

// inv_freq of pair i: theta^(-2i/D); under YaRN blended between interpolation (divided by
// factor) and extrapolation by a linear ramp over the pairs between the correction
// dimensions of beta_fast and beta_slow (floored and ceiled, clamped to [0, D-1]).
static inline MOE_ROPE_HD double rope_inv_freq(const RopeSpec *r, size_t i, size_t D) {
    double extra = pow(r->theta, -2.0 * (double)i / (double)D);
    if (!r->yarn) return extra;
    double lo = floor(rope_correction_dim(r->beta_fast, (double)D, r->theta, r->orig_max_pos));
    double hi = ceil(rope_correction_dim(r->beta_slow, (double)D, r->theta, r->orig_max_pos));
    lo = lo < 0 ? 0 : lo;
    hi = hi > (double)D - 1 ? (double)D - 1 : hi;
    if (lo == hi) hi += 0.001;
    double ramp = ((double)i - lo) / (hi - lo);
    ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
    double keep = 1.0 - ramp; // extrapolation's share
    return extra / r->factor * (1.0 - keep) + extra * keep;
}

// YaRN's attention factor on cos and sin: get_mscale(factor, mscale) / get_mscale(factor,
// mscale_all_dim) when both are non-zero, else get_mscale(factor, 1).
static inline MOE_ROPE_HD double rope_cos_scale(const RopeSpec *r) {
    if (!r->yarn) return 1.0;
    if (r->mscale != 0 && r->mscale_all_dim != 0)
        return rope_get_mscale(r->factor, r->mscale) /
               rope_get_mscale(r->factor, r->mscale_all_dim);
    return rope_get_mscale(r->factor, 1.0);
}

#endif
