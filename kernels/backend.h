// backend.h: choosing the backend a run computes on, by name, at run time.
//
// The CPU backend is always built. The CUDA backend is built when nvcc was found at build
// time (the Makefile defines MOE_CUDA for backend.c) and is usable when the machine has a
// GPU; otherwise asking for it gives NULL and a one-line reason, and the caller decides
// (fail, or fall back to the CPU saying why).
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stddef.h>

#include "kernels.h"

// device: "cpu" or "cuda". Returns the backend, or NULL with a one-line reason in err
// (an unknown name, a build without CUDA, no GPU, a GPU of another architecture).
const Backend *backend_select(const char *device, char *err, size_t n);

// The GPU backend_select("cuda") takes: ordinal modulo the visible GPUs (default 0). A
// distributed run sets each rank's (dist/) before selecting.
void backend_set_cuda_device(int ordinal);

// 1 when this binary was built with the CUDA backend (whether or not a GPU is present).
int backend_cuda_built(void);

// make bench on a GPU: the dense bf16 GEMM rate (GFLOP/s) of the CUDA backend's device,
// n-cubed, best of `repeats`; 0 with a reason in err when there is no CUDA backend or GPU.
double backend_gemm_peak_bf16(size_t n, int repeats, char *err, size_t len);

// One line for a start-up message: "cpu", or "cuda: NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)".
void backend_describe(const Backend *be, char *buf, size_t n);

#endif
