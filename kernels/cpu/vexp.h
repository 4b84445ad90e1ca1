// vexp.h: exp for the CPU ops' element loops (softmax, SwiGLU, cross-entropy), written so
// that the compiler vectorises it.
//
// libm's exp is a call per element (3.6 ns here), which made the attention softmax cost
// twice its two GEMMs. The fp32 build uses Cephes' expf instead: range reduction by
// ln 2, a degree-6 polynomial, 2^n built in the exponent bits; within 2 ulp of exp on
// [-87, 88] (inputs are clamped there: results stay normal and finite) and NaN passes
// through. Use it in `#pragma omp simd` loops; the clamps vectorise because the build
// says -fno-trapping-math. The fp64 build keeps libm: the gradient tests need full
// double precision.
#ifndef MOE_CPU_VEXP_H
#define MOE_CPU_VEXP_H

#include <math.h>
#include <stdint.h>

#include "../kernels.h"

#ifdef MOE_REAL_F64
static inline real vexp(real x) { return exp(x); }
#else
static inline real vexp(real x) {
    const float magic = 12582912.0f; // 1.5 * 2^23: adding it rounds to an integer
    float lo = x < -87.0f ? -87.0f : x;
    // A NaN passes both clamps; it becomes 0 here so that the integer exponent below is
    // defined (NaN to int and a negative left shift are undefined), and x == x returns it.
    float c = lo > 88.0f ? 88.0f : (lo == lo ? lo : 0.0f);
    float n = (c * 1.44269504088896341f + magic) - magic; // round(c / ln 2)
    float r = c - n * 0.693359375f;                       // ln 2 in two parts, Cephes
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale = {.i = ((int32_t)n + 127) << 23};
    return x == x ? p * scale.f : x;
}
#endif

#endif
