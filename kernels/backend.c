// backend.c: backend selection by name (see backend.h).
#include "backend.h"

#include <stdio.h>
#include <string.h>

// The fp64 test build never has CUDA (the device backend is fp32), whatever the Makefile
// passed.
#if defined(MOE_CUDA) && !defined(MOE_REAL_F64)
#define HAVE_CUDA 1
#include "cuda/backend_cuda.h"
#else
#define HAVE_CUDA 0
#endif

static int cuda_ordinal;

void backend_set_cuda_device(int ordinal) { cuda_ordinal = ordinal; }

const Backend *backend_select(const char *device, char *err, size_t n) {
    if (!strcmp(device, "cpu")) return backend_cpu();
    if (strcmp(device, "cuda") != 0) {
        snprintf(err, n, "unknown device '%s' (valid: cpu, cuda)", device);
        return NULL;
    }
#if HAVE_CUDA
    return backend_cuda_probe(cuda_ordinal, err, n) ? backend_cuda() : NULL;
#else
#ifdef MOE_REAL_F64
    snprintf(err, n, "the fp64 build has no CUDA backend");
#else
    snprintf(err, n, "this moe was built without CUDA (nvcc not found at build time)");
#endif
    return NULL;
#endif
}

int backend_cuda_built(void) { return HAVE_CUDA; }

double backend_gemm_peak_bf16(size_t n, int repeats, char *err, size_t len) {
    if (!backend_select("cuda", err, len)) return 0.0;
#if HAVE_CUDA
    return backend_cuda_gemm_peak(n, repeats);
#else
    (void)n;
    (void)repeats;
    return 0.0;
#endif
}

void backend_describe(const Backend *be, char *buf, size_t n) {
#if HAVE_CUDA
    if (be->device == DEVICE_CUDA) {
        char dev[256];
        backend_cuda_describe(dev, sizeof dev);
        snprintf(buf, n, "%s: %s", be->name, dev);
        return;
    }
#endif
    snprintf(buf, n, "%s", be->name);
}
