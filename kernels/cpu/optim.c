// optim.c: the optimizer's CPU ops: the AdamW update and the sum of squares behind the
// gradient norm. Semantics are in kernels.h.
//
// Arithmetic runs in double. The values torch keeps between operations (the decayed
// parameter, m, v) are rounded to `real` at the same points, so the fp32 build follows
// torch's fp32 AdamW to a few ulps rather than drifting by the rounding it skips.
#include "cpu_ops.h"
#include "../../base/util.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>

// Elements [0, n) of one thread's block; the constants as cpu_adamw_update derives them.
CPU_CLONES static void adamw_block(real *pp, const real *pg, real *pm, real *pv, size_t n,
                                   double beta1, double beta2, double eps, double decay,
                                   double step_size, double bc2_sqrt, double grad_scale) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        double gi = (double)pg[i] * grad_scale;
        real decayed = (real)((double)pp[i] * decay);
        real mi = (real)(beta1 * pm[i] + (1.0 - beta1) * gi);
        real vi = (real)(beta2 * pv[i] + (1.0 - beta2) * gi * gi);
        double denom = sqrt((double)vi) / bc2_sqrt + eps;
        pp[i] = (real)(decayed - step_size * (double)mi / denom);
        pm[i] = mi;
        pv[i] = vi;
    }
}

// Blocks of ADAMW_BLOCK elements: each a call to the widest clone the CPU runs.
#define ADAMW_BLOCK 4096

void cpu_adamw_update(Tensor p, Tensor g, Tensor m, Tensor v, size_t n, double lr, double beta1,
                      double beta2, double eps, double weight_decay, double bias_c1,
                      double bias_c2, double grad_scale) {
    real *pp = TENSOR_R(p);       // (n)
    const real *pg = TENSOR_R(g); // (n)
    real *pm = TENSOR_R(m);       // (n)
    real *pv = TENSOR_R(v);       // (n)
    double decay = 1.0 - lr * weight_decay;
    double step_size = lr / bias_c1;
    double bc2_sqrt = sqrt(bias_c2);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i += ADAMW_BLOCK) {
        size_t len = n - i < ADAMW_BLOCK ? n - i : ADAMW_BLOCK;
        adamw_block(pp + i, pg + i, pm + i, pv + i, len, beta1, beta2, eps, decay, step_size,
                    bc2_sqrt, grad_scale);
    }
}

double cpu_sum_squares(Tensor x, size_t n) {
    const real *px = TENSOR_R(x); // (n)
    size_t threads = (size_t)omp_get_max_threads();
    double *part = CALLOC(threads, sizeof(double)); // per-thread sums, written once each
#pragma omp parallel
    {
        double sum = 0.0;
#pragma omp for schedule(static)
        for (size_t i = 0; i < n; i++)
            sum += (double)px[i] * (double)px[i];
        part[omp_get_thread_num()] = sum;
    }
    double total = 0.0;
    for (size_t t = 0; t < threads; t++)
        total += part[t]; // in thread order: the same sum for the same thread count
    free(part);
    return total;
}
