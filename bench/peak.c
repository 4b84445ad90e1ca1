// peak.c: what the machine can do: a large square sgemm through OpenBLAS, and the
// register-only FMA peak (docs/architecture.md, "CPU": MFU is reported against both; the FMA peak is
// the physical limit, the sgemm peak what a BLAS kernel reaches on this machine).
#include "bench.h"

#include <cblas.h>
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "../kernels/cpu/blas.h"
#include "../base/util.h"

// Independent accumulators per thread: enough to cover FMA latency (4) times the FMA
// ports (2), so the loop is bound by throughput alone.
#define FMA_CHAINS 12
#define FMA_ITERS 20000000L

// Each step is FMA_CHAINS independent fmadds, unrolled so the accumulators live in
// registers (a loop over the array keeps them on the stack, 2x slower); the result is
// returned so the compiler cannot drop the loop.
__attribute__((target("avx512f"))) static float fma_loop_512(long iters) {
    __m512 acc[FMA_CHAINS];
    __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    for (int c = 0; c < FMA_CHAINS; c++)
        acc[c] = _mm512_set1_ps((float)c);
    for (long i = 0; i < iters; i++)
#pragma GCC unroll 16
        for (int c = 0; c < FMA_CHAINS; c++)
            acc[c] = _mm512_fmadd_ps(acc[c], a, b);
    __m512 s = acc[0];
    for (int c = 1; c < FMA_CHAINS; c++)
        s = _mm512_add_ps(s, acc[c]);
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) static float fma_loop_256(long iters) {
    __m256 acc[FMA_CHAINS];
    __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    for (int c = 0; c < FMA_CHAINS; c++)
        acc[c] = _mm256_set1_ps((float)c);
    for (long i = 0; i < iters; i++)
#pragma GCC unroll 16
        for (int c = 0; c < FMA_CHAINS; c++)
            acc[c] = _mm256_fmadd_ps(acc[c], a, b);
    __m256 s = acc[0];
    for (int c = 1; c < FMA_CHAINS; c++)
        s = _mm256_add_ps(s, acc[c]);
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    return lanes[0] + lanes[7];
}

// GFLOP/s of the loop on `lanes`-wide vectors, all threads at once, best of repeats.
static double fma_gflops(int lanes) {
    double best = 0.0;
    volatile float sink = 0.0f;
    int threads = omp_get_max_threads();
    for (int r = 0; r < BENCH_REPEATS; r++) {
        float total = 0.0f;
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : total)
        total += lanes == 16 ? fma_loop_512(FMA_ITERS) : fma_loop_256(FMA_ITERS);
        double s = omp_get_wtime() - t0;
        sink += total;
        double flops = 2.0 * lanes * FMA_CHAINS * (double)FMA_ITERS * threads;
        if (flops / s / 1e9 > best) best = flops / s / 1e9;
    }
    return best;
}

typedef struct {
    float *a, *b, *c;
} GemmBufs;

static GemmBufs gemm_bufs_init(size_t m, size_t n, size_t k) {
    GemmBufs g = {CALLOC(m * k, sizeof(float)), CALLOC(n * k, sizeof(float)),
                  CALLOC(m * n, sizeof(float))};
    for (size_t i = 0; i < m * k; i++)
        g.a[i] = (float)(i % 7) * 0.01f;
    for (size_t i = 0; i < n * k; i++)
        g.b[i] = (float)(i % 5) * 0.01f;
    return g;
}

static void gemm_bufs_free(GemmBufs *g) {
    free(g->a);
    free(g->b);
    free(g->c);
}

static void gemm_run(const GemmBufs *g, size_t m, size_t n, size_t k) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)n, (int)k, 1.0f, g->a,
                (int)k, g->b, (int)k, 0.0f, g->c, (int)n);
}

double bench_sgemm_gflops(size_t m, size_t n, size_t k) {
    GemmBufs g = gemm_bufs_init(m, n, k);
    double best = 0.0;
    for (int r = 0; r <= BENCH_REPEATS; r++) { // the first call warms caches and threads
        double t0 = omp_get_wtime();
        gemm_run(&g, m, n, k);
        double s = omp_get_wtime() - t0;
        if (r > 0 && 2.0 * m * n * k / s / 1e9 > best) best = 2.0 * m * n * k / s / 1e9;
    }
    gemm_bufs_free(&g);
    return best;
}

// Every thread its own n^3 sgemm at the same time (inside a parallel region OpenBLAS's
// OpenMP build runs each on its calling thread): the experts op shares out whole experts
// this way, and on some machines it beats one product shared by all threads.
static double sgemm_split_gflops(size_t n) {
    int threads = omp_get_max_threads();
    GemmBufs *g = CALLOC((size_t)threads, sizeof *g);
    for (int t = 0; t < threads; t++) g[t] = gemm_bufs_init(n, n, n);
    double best = 0.0;
    for (int r = 0; r <= BENCH_REPEATS; r++) {
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        gemm_run(&g[omp_get_thread_num()], n, n, n);
        double s = omp_get_wtime() - t0, rate = 2.0 * n * n * n * threads / s / 1e9;
        if (r > 0 && rate > best) best = rate;
    }
    for (int t = 0; t < threads; t++) gemm_bufs_free(&g[t]);
    free(g);
    return best;
}

void bench_measure_peaks(PeakResult *out, size_t sgemm_n) {
    CHECK(cpu_blas_self_check() == 0, "OpenBLAS kernel %s computes a wrong product",
          cpu_blas_kernel_name());
    snprintf(out->kernel, sizeof out->kernel, "%s", cpu_blas_kernel_name());
    snprintf(out->origin, sizeof out->origin, "%s", cpu_blas_kernel_origin());
    static const char *threading[] = {"sequential", "pthreads", "OpenMP"};
    int par = openblas_get_parallel();
    snprintf(out->threading, sizeof out->threading, "%s",
             par >= 0 && par <= 2 ? threading[par] : "unknown");
    out->threads = omp_get_max_threads();
    out->sgemm_n = sgemm_n;
    out->sgemm_shared_gflops = bench_sgemm_gflops(sgemm_n, sgemm_n, sgemm_n);
    out->sgemm_split_gflops = sgemm_split_gflops(sgemm_n);
    out->sgemm_gflops = out->sgemm_shared_gflops > out->sgemm_split_gflops
                            ? out->sgemm_shared_gflops
                            : out->sgemm_split_gflops;
    __builtin_cpu_init();
    out->fma_avx2_gflops = __builtin_cpu_supports("avx2") ? fma_gflops(8) : 0.0;
    int wide = __builtin_cpu_supports("avx512f");
    out->fma_gflops = wide ? fma_gflops(16) : out->fma_avx2_gflops;
    snprintf(out->fma_isa, sizeof out->fma_isa, "%s", wide ? "AVX-512" : "AVX2");
}
