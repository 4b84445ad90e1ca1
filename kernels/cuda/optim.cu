// optim.cu: the optimizer's CUDA ops: the AdamW update and the sum of squares behind the
// gradient norm. Semantics are in kernels.h; kernels/cpu/optim.c is the reference.
#include "cuda_ops.cuh"

#include <cuda_bf16.h>

// Arithmetic in double, rounded to float where torch (and the CPU op) keep a value
// between operations: the decayed parameter, m and v. p16 (NULL: none) receives the new
// parameter rounded to bf16: the copy bf16 products read (fp32 master weights).
__global__ void adamw_kernel(float *p, __nv_bfloat16 *p16, const float *g, float *m, float *v,
                             size_t n, double decay, double beta1, double beta2, double eps,
                             double step_size, double bc2_sqrt, double grad_scale) {
    GRID_STRIDE(i, n) {
        double gi = (double)g[i] * grad_scale;
        float decayed = (float)((double)p[i] * decay);
        float mi = (float)(beta1 * m[i] + (1.0 - beta1) * gi);
        float vi = (float)(beta2 * v[i] + (1.0 - beta2) * gi * gi);
        double denom = sqrt((double)vi) / bc2_sqrt + eps;
        p[i] = (float)(decayed - step_size * (double)mi / denom);
        if (p16) p16[i] = __float2bfloat16_rn(p[i]);
        m[i] = mi;
        v[i] = vi;
    }
}

void cuda_adamw_update(Tensor p, Tensor g, Tensor m, Tensor v, size_t n, double lr,
                       double beta1, double beta2, double eps, double weight_decay,
                       double bias_c1, double bias_c2, double grad_scale) {
    if (n == 0) return;
    adamw_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(
        DEV_R(p), cuda_bf16_weights_at(DEV_R(p), n), DEV_R(g), DEV_R(m), DEV_R(v), n,
        1.0 - lr * weight_decay, beta1, beta2, eps, lr / bias_c1, sqrt(bias_c2), grad_scale);
    cudaCheckLaunch();
}

// Deterministic sum of squares: a fixed grid (not sized by the device) of block partials,
// then one block adds the partials in a fixed order. Same input, same bits, on any GPU.
#define SUMSQ_BLOCKS 1024

__global__ void sumsq_partial_kernel(double *part, const float *x, size_t n) {
    double s = 0.0;
    GRID_STRIDE(i, n) s += (double)x[i] * (double)x[i];
    s = cuda_block_sum(s);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void sumsq_final_kernel(double *out, const double *part) {
    double s = 0.0;
    for (int b = threadIdx.x; b < SUMSQ_BLOCKS; b += blockDim.x) s += part[b];
    s = cuda_block_sum(s);
    if (threadIdx.x == 0) *out = s;
}

double cuda_sum_squares(Tensor x, size_t n) {
    if (n == 0) return 0.0;
    double *part = (double *)cuda_scratch(SCRATCH_OP, (SUMSQ_BLOCKS + 1) * sizeof(double));
    sumsq_partial_kernel<<<SUMSQ_BLOCKS, CUDA_THREADS>>>(part, DEV_R(x), n);
    cudaCheckLaunch();
    sumsq_final_kernel<<<1, CUDA_THREADS>>>(part + SUMSQ_BLOCKS, part);
    cudaCheckLaunch();
    double total = 0.0;
    cudaCheck(cudaMemcpy(&total, part + SUMSQ_BLOCKS, sizeof total, cudaMemcpyDeviceToHost));
    return total;
}
