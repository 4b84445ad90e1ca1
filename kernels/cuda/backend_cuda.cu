// backend_cuda.cu: the CUDA backend table (every entry of the op list) and the device
// probe behind backend_select().
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

extern "C" int backend_cuda_probe(int ordinal, char *err, size_t n) {
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
    int dev = ordinal % count;
    e = cudaSetDevice(dev);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(err, n, "CUDA backend built, but device %d cannot be used: %s: %s", dev,
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
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
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
#define KERNEL(ret, fn, params) b.fn = cuda_##fn;
#define KERNEL_HOOK KERNEL
#include "../ops.def"
#undef KERNEL
#undef KERNEL_HOOK
    return b;
}

static const Backend cuda_backend = make_table();

extern "C" const Backend *backend_cuda(void) { return &cuda_backend; }
