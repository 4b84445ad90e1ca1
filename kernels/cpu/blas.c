#include "blas.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

char *openblas_get_corename(void);

static const char *kernel_for_cpu(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return "SkylakeX";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
    return NULL;
}

void cpu_blas_select_kernel(char **argv) {
    if (getenv("OPENBLAS_CORETYPE") || getenv("MOE_BLAS_REEXEC")) return;
    const char *core = kernel_for_cpu();
    if (!core) return;
    setenv("OPENBLAS_CORETYPE", core, 1);
    setenv("MOE_BLAS_REEXEC", "1", 1);   // guards against a loop if exec lands here again
    execv("/proc/self/exe", argv);
    unsetenv("OPENBLAS_CORETYPE");   // exec failed: keep the library's choice
}

const char *cpu_blas_kernel_name(void) {
    const char *name = openblas_get_corename();
    return name ? name : "unknown";
}

const char *cpu_blas_kernel_origin(void) {
    if (!getenv("OPENBLAS_CORETYPE")) return "OpenBLAS's own detection";
    return getenv("MOE_BLAS_REEXEC") ? "chosen from CPUID" : "set by the user's OPENBLAS_CORETYPE";
}

int cpu_blas_self_check(void) {
    enum { M = 37, N = 29, K = 41 };
    float a[M * K], b[K * N], c[M * N];
    for (int i = 0; i < M * K; i++) a[i] = (float)((i * 7 % 13) - 6) / 8.0f;
    for (int i = 0; i < K * N; i++) b[i] = (float)((i * 5 % 11) - 5) / 4.0f;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, a, K, b, N, 0.0f, c,
                N);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int p = 0; p < K; p++) s += (double)a[i * K + p] * b[p * N + j];
            if (fabs(s - c[i * N + j]) > 1e-3 * (1 + fabs(s))) return -1;
        }
    return 0;
}
