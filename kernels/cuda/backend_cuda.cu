// backend_cuda.cu: the CUDA backend table and the device probe behind backend_select().
#include "cuda_ops.cuh"
#include "backend_cuda.h"

#include <stdio.h>

// The architecture the Makefile compiled for (CUDA_ARCH), named when a device differs.
#ifndef MOE_CUDA_ARCH
#define MOE_CUDA_ARCH "?"
#endif

__global__ void probe_kernel(int *out) { *out = 42; }

// Runs one kernel on device 0: a binary built for another architecture fails here with
// a message that says how to rebuild, not at the first op.
static int probe_kernel_runs(char *err, size_t n) {
    int *dev = NULL, host = 0;
    cudaError_t e = cudaMalloc((void **)&dev, sizeof(int));
    if (e == cudaSuccess) {
        probe_kernel<<<1, 1>>>(dev);
        e = cudaGetLastError();
        if (e == cudaSuccess) e = cudaMemcpy(&host, dev, sizeof host, cudaMemcpyDeviceToHost);
        cudaFree(dev);
    }
    if (e == cudaSuccess && host == 42) return 1;
    (void)cudaGetLastError();
    cudaDeviceProp prop;
    int major = 0, minor = 0;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
        major = prop.major;
        minor = prop.minor;
    }
    if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction)
        snprintf(err, n,
                 "CUDA backend built for sm_%s, but device 0 is sm_%d%d: rebuild with "
                 "`make CUDA_ARCH=%d%d`",
                 MOE_CUDA_ARCH, major, minor, major, minor);
    else
        snprintf(err, n, "CUDA backend built, but a test kernel failed on device 0: %s: %s",
                 cudaGetErrorName(e), cudaGetErrorString(e));
    return 0;
}

extern "C" int backend_cuda_probe(char *err, size_t n) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(err, n, "CUDA backend built, but no GPU: cudaGetDeviceCount returned %d (%s): %s",
                 (int)e, cudaGetErrorName(e), cudaGetErrorString(e));
        return 0;
    }
    if (count == 0) {
        snprintf(err, n, "CUDA backend built, but no GPU: cudaGetDeviceCount found 0 devices");
        return 0;
    }
    e = cudaSetDevice(0);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(err, n, "CUDA backend built, but device 0 cannot be used: %s: %s",
                 cudaGetErrorName(e), cudaGetErrorString(e));
        return 0;
    }
    if (!probe_kernel_runs(err, n)) return 0;
    if (!cuda_cublas_load(err, n)) return 0;
    cuda_cublas();      // dies with the cuBLAS status if the library cannot start
    cuda_error_flag();
    return 1;
}

extern "C" void backend_cuda_describe(char *buf, size_t n) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(buf, n, "no CUDA device");
        return;
    }
    snprintf(buf, n, "%s (sm_%d%d, %.1f GiB)", prop.name, prop.major, prop.minor,
             (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
}

static Backend make_table(void) {
    Backend b = {};
    b.name = "cuda";
    b.device = DEVICE_CUDA;
    b.alloc = cuda_alloc;
    b.release = cuda_release;
    b.zero = cuda_zero;
    b.upload = cuda_upload;
    b.download = cuda_download;
    b.add_forward = cuda_add_forward;
    b.add_backward = cuda_add_backward;
    b.mul_forward = cuda_mul_forward;
    b.mul_backward = cuda_mul_backward;
    b.embedding_forward = cuda_embedding_forward;
    b.embedding_backward = cuda_embedding_backward;
    b.rmsnorm_forward = cuda_rmsnorm_forward;
    b.rmsnorm_backward = cuda_rmsnorm_backward;
    b.matmul_forward = cuda_matmul_forward;
    b.matmul_backward = cuda_matmul_backward;
    b.rope_forward = cuda_rope_forward;
    b.rope_backward = cuda_rope_backward;
    b.attention_forward = cuda_attention_forward;
    b.attention_backward = cuda_attention_backward;
    b.attention_plan = cuda_attention_plan;
    b.swiglu_forward = cuda_swiglu_forward;
    b.swiglu_backward = cuda_swiglu_backward;
    b.experts_forward = cuda_experts_forward;
    b.experts_backward = cuda_experts_backward;
    b.experts_state_dtype = cuda_experts_state_dtype;
    b.crossentropy_forward = cuda_crossentropy_forward;
    b.crossentropy_backward = cuda_crossentropy_backward;
    b.router_scores_forward = cuda_router_scores_forward;
    b.router_scores_backward = cuda_router_scores_backward;
    b.noisy_logits_forward = cuda_noisy_logits_forward;
    b.noisy_logits_backward = cuda_noisy_logits_backward;
    b.topk_forward = cuda_topk_forward;
    b.gates_forward = cuda_gates_forward;
    b.route_topk_forward = cuda_route_topk_forward;
    b.gates_backward = cuda_gates_backward;
    b.capacity_forward = cuda_capacity_forward;
    b.add_bias_forward = cuda_add_bias_forward;
    b.hash_route_forward = cuda_hash_route_forward;
    b.expert_choice_forward = cuda_expert_choice_forward;
    b.dispatch_plan = cuda_dispatch_plan;
    b.gather_rows_forward = cuda_gather_rows_forward;
    b.gather_rows_backward = cuda_gather_rows_backward;
    b.combine_forward = cuda_combine_forward;
    b.combine_backward = cuda_combine_backward;
    b.lb_loss_forward = cuda_lb_loss_forward;
    b.lb_loss_backward = cuda_lb_loss_backward;
    b.normalize_rows_forward = cuda_normalize_rows_forward;
    b.normalize_rows_backward = cuda_normalize_rows_backward;
    b.zloss_forward = cuda_zloss_forward;
    b.zloss_backward = cuda_zloss_backward;
    b.importance_loss_forward = cuda_importance_loss_forward;
    b.importance_loss_backward = cuda_importance_loss_backward;
    b.load_loss_forward = cuda_load_loss_forward;
    b.load_loss_backward = cuda_load_loss_backward;
    b.adamw_update = cuda_adamw_update;
    b.sum_squares = cuda_sum_squares;
    b.set_gemm_bf16 = cuda_set_gemm_bf16;
    b.set_expert_gemm = cuda_set_expert_gemm;
    b.set_bf16_weights = cuda_set_bf16_weights;
    b.synchronize = cuda_synchronize;
    return b;
}

static const Backend cuda_backend = make_table();

extern "C" const Backend *backend_cuda(void) { return &cuda_backend; }
