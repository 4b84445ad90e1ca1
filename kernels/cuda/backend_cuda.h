// backend_cuda.h: the CUDA backend's entry points, callable from C.
//
// Compiled only when nvcc is found (the Makefile then defines MOE_CUDA for
// kernels/backend.c, the one C file that includes this header). Everything else reaches
// the backend through backend_select() (kernels/backend.h).
#ifndef MOE_BACKEND_CUDA_H
#define MOE_BACKEND_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "../kernels.h"

// 1 when device `ordinal` modulo the visible devices is usable (selected, a test kernel
// ran, cuBLAS is ready); 0 otherwise, with a one-line reason in err. Safe without a GPU
// driver: it only asks the runtime.
int backend_cuda_probe(int ordinal, char *err, size_t n);

// The table (fp32: real = float on the device). Call after backend_cuda_probe returned 1.
const Backend *backend_cuda(void);

// One line about the selected device, e.g. "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)".
void backend_cuda_describe(char *buf, size_t n);

// 1 when attention of this shape runs cuDNN's fused kernel under bf16 products (cuDNN
// loads and plans it on device 0); 0 with the reason: no libcudnn, a build without the
// frontend's headers, or cuDNN's own refusal. fp32 always runs the plain kernels.
int backend_cuda_fused_attention(size_t B, size_t T, size_t H, size_t KV, size_t D, char *err,
                                 size_t n);

// The dense bf16 GEMM rate of device 0 (make bench): the best of `repeats` products
// c (n, n) fp32 = a (n, n) b (n, n) with bf16 operands and fp32 accumulation, timed
// with CUDA events, in GFLOP/s. Call after backend_cuda_probe returned 1.
double backend_cuda_gemm_peak(size_t n, int repeats);

#ifdef __cplusplus
}
#endif

#endif
