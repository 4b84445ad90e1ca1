// memory.c: CPU buffers: 64-byte aligned (one cache line, full AVX-512 vectors).
#include "cpu_ops.h"

#include <stdlib.h>
#include <string.h>

void *cpu_alloc(size_t bytes) {
    size_t rounded = (bytes + 63) / 64 * 64;
    void *p = aligned_alloc(64, rounded ? rounded : 64);
    if (p) memset(p, 0, rounded);
    return p;
}

void cpu_release(void *p) { free(p); }

void cpu_zero(Tensor t, size_t numel) {
    if (t.data) memset(t.data, 0, numel * dtype_size(t.dtype));
}

void cpu_upload(Tensor dst, const void *src, size_t bytes) { memcpy(dst.data, src, bytes); }

void cpu_download(void *dst, Tensor src, size_t bytes) { memcpy(dst, src.data, bytes); }
