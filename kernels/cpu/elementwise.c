// elementwise.c: add and mul (CPU), parallel over elements with OpenMP.
#include "cpu_ops.h"

void cpu_add_forward(Tensor out, Tensor a, Tensor b, size_t n) {
    real *o = TENSOR_R(out);                         // (n)
    const real *pa = TENSOR_R(a), *pb = TENSOR_R(b); // (n)
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        o[i] = pa[i] + pb[i];
}

// dst (n) += src (n); a NULL dst is a gradient nobody wants.
static void accumulate(real *dst, const real *src, size_t n) {
    if (!dst) return;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        dst[i] += src[i];
}

void cpu_add_backward(Tensor da, Tensor db, Tensor dout, size_t n) {
    accumulate(TENSOR_R(da), TENSOR_R(dout), n);
    accumulate(TENSOR_R(db), TENSOR_R(dout), n);
}

void cpu_mul_forward(Tensor out, Tensor x, Tensor u, size_t n) {
    real *o = TENSOR_R(out);                         // (n)
    const real *px = TENSOR_R(x), *pu = TENSOR_R(u); // (n)
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        o[i] = px[i] * pu[i];
}

void cpu_mul_backward(Tensor dx, Tensor dout, Tensor u, size_t n) {
    real *g = TENSOR_R(dx); // (n)
    if (!g) return;
    const real *pd = TENSOR_R(dout), *pu = TENSOR_R(u); // (n)
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        g[i] += pd[i] * pu[i];
}
