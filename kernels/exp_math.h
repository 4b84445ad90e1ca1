// exp_math.h: exp in double for the row loops (softmax, log-sum-exp, cross-entropy).
//
// libm's exp is a call per element, which keeps a row loop scalar: on the router's 64
// experts a row and the cross-entropy's vocabulary it was the loops' whole cost. On the
// host, row_exp is Cephes' exp instead (Moshier, Cephes Math Library): range reduction
// by ln 2 in two parts, exp(r) = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)), 2^n built in the
// exponent bits; relative error within 2.2e-16 of exp (about 1 ulp), branch-free so that
// `#pragma omp simd` loops vectorise it. Below -708.7 it is 0 (exp leaves the normal range
// there: under 2.3e-308), above 709 +inf (exp's own limit is 709.78), a NaN passes through;
// the row loops pass x - max <= 0. Device code keeps
// CUDA's exp. Results rounded to float equal libm's but where the double lies within an
// ulp of a float's rounding boundary.
#ifndef MOE_EXP_MATH_H
#define MOE_EXP_MATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "kernels.h"
#ifdef __cplusplus
}
#endif

// On the host, always inlined: a CPU_CLONES caller then compiles these for its own
// instruction set (GCC does not inline a large callee into a clone by itself).
#ifdef __CUDACC__
#define MOE_EXP_HD __host__ __device__
#define MOE_EXP_SIMD
#else
#define MOE_EXP_HD __attribute__((always_inline))
#define MOE_EXP_SIMD _Pragma("omp simd")
#endif

static inline MOE_EXP_HD double row_exp(double x) {
#ifdef __CUDA_ARCH__
    return exp(x);
#else
    // Adding 1.5 * 2^52 rounds to an integer and leaves it in the low mantissa bits, where
    // a 64-bit shift moves it into the exponent: no double-to-integer conversion, which
    // the baseline's vectors lack.
    const double magic = 6755399441055744.0;
    double c = x < -708.7 ? -708.7 : (x > 709.0 ? 709.0 : (x == x ? x : 0.0));
    union {
        double d;
        uint64_t u;
    } t = {.d = c * 1.4426950408889634074 + magic}, scale;
    double n = t.d - magic;                 // round(c / ln 2)
    double r = c - n * 6.93145751953125e-1; // ln 2 in two parts
    r = r - n * 1.42860682030941723212e-6;
    double rr = r * r;
    double p = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
                    9.99999999999999999910e-1);
    double q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                2.27265548208155028766e-1) * rr +
               2.00000000000000000009e0;
    scale.u = (t.u << 52) + ((uint64_t)1023 << 52); // 2^n
    double e = (1.0 + 2.0 * p / (q - p)) * scale.d;
    e = x < -708.7 ? 0.0 : (x > 709.0 ? INFINITY : e);
    return x == x ? e : x;
#endif
}

// sum over i < n of exp(x[i] - shift), in double and in index order: on the host the exps
// of a chunk at a time (a loop that vectorises), then their sum one by one.
static inline MOE_EXP_HD double row_sum_exp(const real *x, size_t n, double shift) {
#ifdef __CUDA_ARCH__
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += exp((double)x[i] - shift);
    return s;
#else
    double sum = 0.0, t[64];
    for (size_t i0 = 0; i0 < n; i0 += 64) {
        size_t len = n - i0 < 64 ? n - i0 : 64;
        MOE_EXP_SIMD
        for (size_t i = 0; i < len; i++)
            t[i] = row_exp((double)x[i0 + i] - shift);
        for (size_t i = 0; i < len; i++)
            sum += t[i];
    }
    return sum;
#endif
}

#endif
