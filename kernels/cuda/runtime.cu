// runtime.cu: what the CUDA ops share: error checks, the cuBLAS handle, scratch memory,
// the invalid-data flag, row-major gemm, CUB sorts; and the memory ops of the table.
//
// cuBLAS is opened with dlopen when the backend is first asked for, not linked: its
// libraries take ~70 ms to load, which every CPU-only start of ./moe would pay. libcudart
// (linked) loads in no measurable time and needs no driver until it is called.
#include "cuda_ops.cuh"

#include <cub/device/device_radix_sort.cuh>
#include <cuda_bf16.h>
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

// ---- cuBLAS, loaded at run time ---------------------------------------------------------

// cublasGemmEx is overloaded in C++ (the compute type as cudaDataType or as
// cublasComputeType_t): name the overload.
typedef cublasStatus_t (*GemmExFn)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                   int, int, const void *, const void *, cudaDataType, int,
                                   const void *, cudaDataType, int, const void *, void *,
                                   cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);

static struct {
    void *lib;
    decltype(&cublasCreate_v2) create;
    decltype(&cublasSetMathMode) set_math_mode;
    decltype(&cublasSgemm_v2) sgemm;
    GemmExFn gemm_ex;
    decltype(&cublasGetStatusString) status_string;
    decltype(&cublasGemmGroupedBatchedEx) gemm_grouped;   // NULL before cuBLAS 12.5
} blas;

#define CUBLAS_SONAME_(major) "libcublas.so." #major
#define CUBLAS_SONAME(major) CUBLAS_SONAME_(major)

int cuda_cublas_load(char *err, size_t n) {
    if (blas.lib) return 1;
    // The soname of the toolkit we compiled against, found through ./moe's rpath.
    void *lib = dlopen(CUBLAS_SONAME(CUBLAS_VER_MAJOR), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(err, n, "CUDA backend built, but cuBLAS cannot be loaded: %s", dlerror());
        return 0;
    }
    blas.create = (decltype(blas.create))dlsym(lib, "cublasCreate_v2");
    blas.set_math_mode = (decltype(blas.set_math_mode))dlsym(lib, "cublasSetMathMode");
    blas.sgemm = (decltype(blas.sgemm))dlsym(lib, "cublasSgemm_v2");
    blas.status_string = (decltype(blas.status_string))dlsym(lib, "cublasGetStatusString");
    blas.gemm_ex = (GemmExFn)dlsym(lib, "cublasGemmEx");
    blas.gemm_grouped = (decltype(blas.gemm_grouped))dlsym(lib, "cublasGemmGroupedBatchedEx");
    if (!blas.create || !blas.set_math_mode || !blas.sgemm || !blas.status_string ||
        !blas.gemm_ex) {
        snprintf(err, n, "CUDA backend built, but %s lacks a function it needs",
                 CUBLAS_SONAME(CUBLAS_VER_MAJOR));
        dlclose(lib);
        return 0;
    }
    blas.lib = lib;
    return 1;
}

// ---- errors ---------------------------------------------------------------------------

void cuda_check(cudaError_t err, const char *call, const char *file, int line) {
    if (err == cudaSuccess) return;
    util_die(file, line, "CUDA %s in %s: %s", cudaGetErrorName(err), call,
             cudaGetErrorString(err));
}

void cublas_check(cublasStatus_t st, const char *call, const char *file, int line) {
    if (st == CUBLAS_STATUS_SUCCESS) return;
    util_die(file, line, "cuBLAS %s (status %d) in %s",
             blas.status_string ? blas.status_string(st) : "error", (int)st, call);
}

unsigned cuda_blocks(size_t n) {
    size_t b = (n + CUDA_THREADS - 1) / CUDA_THREADS;
    if (b == 0) b = 1;
    return (unsigned)(b < (1u << 20) ? b : (1u << 20));
}

// ---- shared resources (one device, one thread: the trainer drives ops serially) --------

static cublasHandle_t g_cublas;
static int *g_error_flag;
static void *g_scratch[SCRATCH_SLOTS];
static size_t g_scratch_bytes[SCRATCH_SLOTS];

cublasHandle_t cuda_cublas(void) {
    if (!g_cublas) {
        char err[512];
        if (!cuda_cublas_load(err, sizeof err)) CUDA_DIE("%s", err);
        cublasCheck(blas.create(&g_cublas));
        // Plain fp32 products (no TF32): the fp32 mode must match the CPU backend.
        cublasCheck(blas.set_math_mode(g_cublas, CUBLAS_DEFAULT_MATH));
    }
    return g_cublas;
}

int *cuda_error_flag(void) {
    if (!g_error_flag) {
        cudaCheck(cudaMalloc((void **)&g_error_flag, sizeof(int)));
        cudaCheck(cudaMemset(g_error_flag, 0, sizeof(int)));
    }
    return g_error_flag;
}

void cuda_error_check(void) {
    if (!g_error_flag) return;
    int code = 0;
    cudaCheck(cudaMemcpy(&code, g_error_flag, sizeof code, cudaMemcpyDeviceToHost));
    if (code == 0) return;
    const char *what[] = {"?", "a token id outside the embedding table",
                          "a target outside the vocabulary",
                          "an expert index outside [0, E)",
                          "a row or slot index outside its buffer"};
    CUDA_DIE("a CUDA op met invalid data: %s (the CPU backend stops at the op itself; "
             "run with train.device=cpu to find it)",
             code > 0 && code <= CUDA_BAD_ROW ? what[code] : what[0]);
}

void *cuda_scratch(int slot, size_t bytes) {
    if (bytes > g_scratch_bytes[slot]) {
        // Earlier ops may still be reading the old buffer: wait for them before freeing.
        cudaCheck(cudaDeviceSynchronize());
        cudaCheck(cudaFree(g_scratch[slot]));
        size_t grow = bytes + bytes / 4;   // room for a slightly larger call next time
        g_scratch[slot] = NULL;
        cudaError_t err = cudaMalloc(&g_scratch[slot], grow);
        if (err != cudaSuccess)
            CUDA_DIE("out of GPU memory for %zu bytes of op scratch (%s)", grow,
                     cudaGetErrorString(err));
        g_scratch_bytes[slot] = grow;
    }
    return g_scratch[slot];
}

SortScratch cuda_sort_scratch(size_t n, int extra) {
    CUDA_REQUIRE(extra >= 0 && extra <= 2, "internal: %d extra sort arrays", extra);
    ScratchLayout lay;
    size_t at[6];
    for (int i = 0; i < 4 + extra; i++) at[i] = lay.add(n * 4);
    char *s = (char *)cuda_scratch(SCRATCH_OP, lay.used);
    SortScratch sc = {(int32_t *)(s + at[0]), (int32_t *)(s + at[1]), (int32_t *)(s + at[2]),
                      (int32_t *)(s + at[3]), {NULL, NULL}};
    for (int i = 0; i < extra; i++) sc.extra[i] = s + at[4 + i];
    return sc;
}

void cuda_read_ints(int32_t *host, const int32_t *dev, size_t n) {
    cudaCheck(cudaMemcpy(host, dev, n * sizeof(int32_t), cudaMemcpyDeviceToHost));
}

// ---- gemm -----------------------------------------------------------------------------

__global__ void zero_rows_kernel(float *c, size_t m, size_t n, size_t ldc) {
    GRID_STRIDE(i, m * n) c[(i / n) * ldc + i % n] = 0.0f;
}

static int g_gemm_bf16;

void cuda_set_gemm_bf16(int bf16) { g_gemm_bf16 = bf16; }

int cuda_gemm_bf16(void) { return g_gemm_bf16; }

void cuda_synchronize(void) { cudaCheck(cudaDeviceSynchronize()); }

// dst (rows, cols) dense = src (rows, cols, leading dimension ld) rounded to nearest even.
__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t rows, size_t cols,
                               size_t ld) {
    GRID_STRIDE(i, rows * cols) dst[i] = __float2bfloat16_rn(src[(i / cols) * ld + i % cols]);
}

static void to_bf16_rows(__nv_bfloat16 *dst, const float *src, size_t rows, size_t cols,
                         size_t ld) {
    if (rows * cols == 0) return;
    to_bf16_kernel<<<cuda_blocks(rows * cols), CUDA_THREADS>>>(dst, src, rows, cols, ld);
    cudaCheckLaunch();
}

void cuda_to_bf16(__nv_bfloat16 *dst, const float *src, size_t n) {
    to_bf16_rows(dst, src, 1, n, n);
}

static const __nv_bfloat16 *bf16_copy(int slot, const float *src, size_t rows, size_t cols,
                                      size_t ld) {
    __nv_bfloat16 *dst =
        (__nv_bfloat16 *)cuda_scratch(slot, rows * cols * sizeof(__nv_bfloat16));
    to_bf16_rows(dst, src, rows, cols, ld);
    return dst;
}

// ---- the bf16 copy of the weights (fp32 master weights) ----------------------------------
// One fp32 buffer (the model's parameters) may have a bf16 copy, the values products read
// under bf16 instead of rounding the weights in every call. AdamW writes it as it updates
// the fp32 master values; any other write into the buffer (upload, zero) marks it stale,
// and the next product that reads it rounds the whole buffer once.

static struct {
    const float *base;   // NULL: no copy
    size_t n;
    __nv_bfloat16 *copy; // (n)
    int stale;
} g_weights;

// One buffer at a time: on replaces any other; off releases the copy of w only.
void cuda_set_bf16_weights(Tensor w, int on) {
    if (!on && g_weights.base != DEV_R(w)) return;
    if (g_weights.copy) cuda_release(g_weights.copy);
    memset(&g_weights, 0, sizeof g_weights);
    if (!on || !w.data || w.numel == 0) return;
    g_weights.copy = (__nv_bfloat16 *)cuda_alloc(w.numel * sizeof(__nv_bfloat16));
    CUDA_REQUIRE(g_weights.copy, "out of GPU memory for the bf16 copy of %zu weights", w.numel);
    g_weights.base = DEV_R(w);
    g_weights.n = w.numel;
    g_weights.stale = 1;
}

// Offset of [p, p + n) in the weights with a bf16 copy, or -1 when it is not inside.
static ptrdiff_t weights_offset(const void *p, size_t n) {
    const float *f = (const float *)p;
    if (!g_weights.base || f < g_weights.base || f + n > g_weights.base + g_weights.n) return -1;
    return f - g_weights.base;
}

void cuda_weights_written(const void *p, size_t n) {
    const float *f = (const float *)p;
    if (g_weights.base && f < g_weights.base + g_weights.n && f + n > g_weights.base)
        g_weights.stale = 1;
}

__nv_bfloat16 *cuda_bf16_weights_at(const float *p, size_t n) {
    ptrdiff_t at = weights_offset(p, n);
    return at < 0 || g_weights.stale ? NULL : g_weights.copy + at;
}

// The bf16 values of the operand spanning [p, p + n), read in place, when it lies in the
// weights with a copy (refreshed first if stale); NULL otherwise.
static const __nv_bfloat16 *weights_bf16(const float *p, size_t n) {
    ptrdiff_t at = weights_offset(p, n);
    if (at < 0) return NULL;
    if (g_weights.stale) {
        cuda_to_bf16(g_weights.copy, g_weights.base, g_weights.n);
        g_weights.stale = 0;
    }
    return g_weights.copy + at;
}

// Elements a row-major operand of rows x cols with leading dimension ld spans.
static size_t span(size_t rows, size_t cols, size_t ld) {
    return rows == 0 ? 0 : (rows - 1) * ld + cols;
}

// An operand in bf16 for a product: the weights' copy in place (same leading dimension),
// or a dense rounded copy in scratch (leading dimension = its width).
static const __nv_bfloat16 *bf16_operand(int slot, const float *src, size_t rows, size_t cols,
                                         size_t *ld) {
    const __nv_bfloat16 *w = weights_bf16(src, span(rows, cols, *ld));
    if (w) return w;
    const __nv_bfloat16 *copy = bf16_copy(slot, src, rows, cols, *ld);
    *ld = cols;
    return copy;
}

// An operand in bf16 as it stands, or rounded (bf16_operand).
static const __nv_bfloat16 *bf16_of(int slot, GemmArg x, size_t rows, size_t cols, size_t *ld) {
    if (x.bf16) return (const __nv_bfloat16 *)x.p;
    return bf16_operand(slot, (const float *)x.p, rows, cols, ld);
}

// The bf16 product: a and b in bf16, fp32 accumulate (CUBLAS_COMPUTE_32F) into c, fp32 or
// bf16.
static void gemm_bf16(cublasHandle_t h, int trans_a, int trans_b, int m, int n, int k,
                      float alpha, GemmArg a, size_t lda, GemmArg b, size_t ldb, float beta,
                      GemmArg c, int ldc) {
    size_t a_cols = (size_t)(trans_a ? m : k), b_cols = (size_t)(trans_b ? k : n);
    const __nv_bfloat16 *a16 = bf16_of(SCRATCH_BF16_A, a, (size_t)(trans_a ? k : m), a_cols, &lda);
    const __nv_bfloat16 *b16 = bf16_of(SCRATCH_BF16_B, b, (size_t)(trans_b ? n : k), b_cols, &ldb);
    cublasCheck(blas.gemm_ex(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                              trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b16,
                              CUDA_R_16BF, (int)ldb, a16, CUDA_R_16BF, (int)lda, &beta,
                              (void *)c.p, c.bf16 ? CUDA_R_16BF : CUDA_R_32F, ldc,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

extern "C" double backend_cuda_gemm_peak(size_t n, int repeats) {
    void *a = cuda_alloc(n * n * sizeof(__nv_bfloat16));
    void *b = cuda_alloc(n * n * sizeof(__nv_bfloat16));
    void *c = cuda_alloc(n * n * sizeof(float));
    if (!a || !b || !c) CUDA_DIE("out of GPU memory for the %zu^3 GEMM peak", n);
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    const float one = 1.0f, zero = 0.0f;
    float best_ms = 0.0f;
    for (int r = 0; r <= repeats; r++) {   // r = 0 warms up
        cudaCheck(cudaEventRecord(start));
        cublasCheck(blas.gemm_ex(cuda_cublas(), CUBLAS_OP_N, CUBLAS_OP_N, (int)n, (int)n,
                                  (int)n, &one, a, CUDA_R_16BF, (int)n, b, CUDA_R_16BF,
                                  (int)n, &zero, c, CUDA_R_32F, (int)n, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
        cudaCheck(cudaEventRecord(stop));
        cudaCheck(cudaEventSynchronize(stop));
        float ms;
        cudaCheck(cudaEventElapsedTime(&ms, start, stop));
        if (r > 0 && (best_ms == 0.0f || ms < best_ms)) best_ms = ms;
    }
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    cuda_release(a);
    cuda_release(b);
    cuda_release(c);
    return 2.0 * (double)n * (double)n * (double)n / (best_ms * 1e-3) / 1e9;
}

// cuBLAS is column-major: a row-major (r, c) matrix is its column-major transpose, so
// row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
void cuda_gemm(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha,
               const float *a, size_t lda, const float *b, size_t ldb, float beta, float *c,
               size_t ldc) {
    cuda_gemm_typed(trans_a, trans_b, m, n, k, alpha, {a, 0}, lda, {b, 0}, ldb, beta, {c, 0},
                    ldc);
}

void cuda_gemm_typed(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha,
                     GemmArg a, size_t lda, GemmArg b, size_t ldb, float beta, GemmArg c,
                     size_t ldc) {
    if (m == 0 || n == 0) return;
    CUDA_REQUIRE(g_gemm_bf16 || !(a.bf16 || b.bf16 || c.bf16),
                 "internal: a bf16 matrix in an fp32 product");
    if (k == 0) {   // an empty sum, as cpu_gemm
        CUDA_REQUIRE(!c.bf16, "internal: an empty product into a bf16 matrix");
        if (beta == 0.0f) {
            zero_rows_kernel<<<cuda_blocks(m * n), CUDA_THREADS>>>((float *)c.p, m, n, ldc);
            cudaCheckLaunch();
        }
        return;
    }
    CUDA_REQUIRE(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX &&
                     ldb <= INT_MAX && ldc <= INT_MAX,
                 "gemm of (%zu x %zu x %zu) exceeds cuBLAS's int sizes", m, n, k);
    cublasHandle_t h = cuda_cublas();
    if (g_gemm_bf16) {
        gemm_bf16(h, trans_a, trans_b, (int)m, (int)n, (int)k, alpha, a, lda, b, ldb, beta, c,
                  (int)ldc);
        return;
    }
    cublasCheck(blas.sgemm(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                            trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m, (int)k, &alpha,
                            (const float *)b.p, (int)ldb, (const float *)a.p, (int)lda, &beta,
                            (float *)c.p, (int)ldc));
}

// ---- grouped gemm -----------------------------------------------------------------------

static const __nv_bfloat16 *bf16_dense(int slot, const float *src, size_t n) {
    const __nv_bfloat16 *w = weights_bf16(src, n);
    return w ? w : bf16_copy(slot, src, 1, n, n);
}

// Host and device arrays of one grouped call: every problem its own group of one.
struct GroupedArgs {
    cublasOperation_t *ta, *tb;
    int *m, *n, *k, *lda, *ldb, *ldc, *size;
    float *alpha, *beta;
    const void **a, **b;
    void **c;
};

static void grouped_args_free(GroupedArgs *g) {
    free(g->ta), free(g->tb), free(g->m), free(g->n), free(g->k), free(g->lda), free(g->ldb);
    free(g->ldc), free(g->size), free(g->alpha), free(g->beta), free(g->a), free(g->b);
    free(g->c);
}

// Fills the arguments in cuBLAS's column-major terms (operands swapped, as cuda_gemm).
// Returns the problems kept (empty ones dropped).
static int grouped_args(GroupedArgs *g, const GemmGroup *grp, const GemmProblem *p,
                        size_t count, const void *a, const void *b, size_t elem,
                        size_t c_elem) {
    size_t n = count ? count : 1;
    g->ta = (cublasOperation_t *)malloc(n * sizeof *g->ta);
    g->tb = (cublasOperation_t *)malloc(n * sizeof *g->tb);
    int **ints[] = {&g->m, &g->n, &g->k, &g->lda, &g->ldb, &g->ldc, &g->size};
    for (int **q : ints) *q = (int *)malloc(n * sizeof(int));
    g->alpha = (float *)malloc(n * sizeof(float));
    g->beta = (float *)malloc(n * sizeof(float));
    g->a = (const void **)malloc(n * sizeof(void *));
    g->b = (const void **)malloc(n * sizeof(void *));
    g->c = (void **)malloc(n * sizeof(void *));
    CUDA_REQUIRE(g->c && g->b && g->a && g->beta && g->alpha && g->size && g->ta && g->tb,
                 "out of host memory for a grouped gemm of %zu problems", count);
    int kept = 0;
    for (size_t i = 0; i < count; i++) {
        if (p[i].m == 0 || p[i].n == 0 || p[i].k == 0) continue;
        CUDA_REQUIRE(p[i].m <= INT_MAX && p[i].n <= INT_MAX && p[i].k <= INT_MAX,
                     "grouped gemm problem of (%zu x %zu x %zu) exceeds cuBLAS's int sizes",
                     p[i].m, p[i].n, p[i].k);
        g->ta[kept] = grp->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
        g->tb[kept] = grp->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
        g->m[kept] = (int)p[i].n;
        g->n[kept] = (int)p[i].m;
        g->k[kept] = (int)p[i].k;
        g->lda[kept] = (int)grp->ldb;
        g->ldb[kept] = (int)grp->lda;
        g->ldc[kept] = (int)grp->ldc;
        g->size[kept] = 1;
        g->alpha[kept] = grp->alpha;
        g->beta[kept] = grp->beta;
        g->a[kept] = (const char *)b + p[i].b_at * elem;
        g->b[kept] = (const char *)a + p[i].a_at * elem;
        g->c[kept] = (char *)grp->c.p + p[i].c_at * c_elem;
        kept++;
    }
    return kept;
}

static int g_grouped_refused;

int cuda_gemm_grouped(const GemmGroup *grp, const GemmProblem *p, size_t count) {
    if (!blas.gemm_grouped || g_grouped_refused) return 0;
    CUDA_REQUIRE(grp->lda <= INT_MAX && grp->ldb <= INT_MAX && grp->ldc <= INT_MAX,
                 "grouped gemm leading dimensions exceed cuBLAS's int sizes");
    cublasHandle_t h = cuda_cublas();
    CUDA_REQUIRE(g_gemm_bf16 || !(grp->a.bf16 || grp->b.bf16 || grp->c.bf16),
                 "internal: a bf16 matrix in an fp32 grouped product");
    const void *a = grp->a.p, *b = grp->b.p;
    cudaDataType ab = CUDA_R_32F;
    size_t elem = sizeof(float), c_elem = grp->c.bf16 ? sizeof(__nv_bfloat16) : sizeof(float);
    if (g_gemm_bf16) {
        if (!grp->a.bf16) a = bf16_dense(SCRATCH_BF16_A, (const float *)a, grp->a_numel);
        if (!grp->b.bf16) b = bf16_dense(SCRATCH_BF16_B, (const float *)b, grp->b_numel);
        ab = CUDA_R_16BF;
        elem = sizeof(__nv_bfloat16);
    }
    GroupedArgs g;
    int kept = grouped_args(&g, grp, p, count, a, b, elem, c_elem);
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    if (kept > 0) {
        // The pointer arrays live on the device: one upload of the three.
        void **dev = (void **)cuda_scratch(SCRATCH_PTRS, 3 * (size_t)kept * sizeof(void *));
        cudaCheck(cudaMemcpy(dev, g.a, kept * sizeof(void *), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(dev + kept, g.b, kept * sizeof(void *), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(dev + 2 * kept, g.c, kept * sizeof(void *), cudaMemcpyHostToDevice));
        st = blas.gemm_grouped(h, g.ta, g.tb, g.m, g.n, g.k, g.alpha, (const void *const *)dev,
                               ab, g.lda, (const void *const *)(dev + kept), ab, g.ldb, g.beta,
                               dev + 2 * kept, grp->c.bf16 ? CUDA_R_16BF : CUDA_R_32F, g.ldc,
                               kept, g.size, CUBLAS_COMPUTE_32F);
    }
    grouped_args_free(&g);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
        fprintf(stderr, "moe: note: cublasGemmGroupedBatchedEx refused the experts' %s products "
                        "(%s): they run one cuBLAS call per expert\n",
                g_gemm_bf16 ? "bf16" : "fp32", blas.status_string(st));
        g_grouped_refused = 1;
        return 0;
    }
    cublasCheck(st);
    return 1;
}

// ---- sorting ----------------------------------------------------------------------------

__global__ void iota_kernel(int32_t *v, size_t n) {
    GRID_STRIDE(i, n) v[i] = (int32_t)i;
}

void cuda_iota(int32_t *v, size_t n) {
    if (n == 0) return;
    iota_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(v, n);
    cudaCheckLaunch();
}

int cuda_key_bits(size_t max_key) {
    int bits = 1;
    while (bits < 32 && (max_key >> bits) != 0) bits++;
    return bits;
}

static void check_sort_size(size_t n) {
    CUDA_REQUIRE(n <= INT_MAX, "sort of %zu items exceeds CUB's int sizes", n);
}

void cuda_sort_pairs_int(const int32_t *keys_in, int32_t *keys_out, const int32_t *vals_in,
                         int32_t *vals_out, size_t n, int bits) {
    if (n == 0) return;
    check_sort_size(n);
    size_t bytes = 0;
    // 32 bits: the full signed range. Fewer: keys are known to be in [0, 2^bits), and
    // sorting them as unsigned skips the sign transform, so the bit range is exact.
    if (bits >= 32) {
        cudaCheck(cub::DeviceRadixSort::SortPairs(NULL, bytes, keys_in, keys_out, vals_in,
                                                  vals_out, (int)n));
        void *tmp = cuda_scratch(SCRATCH_SORT, bytes);
        cudaCheck(cub::DeviceRadixSort::SortPairs(tmp, bytes, keys_in, keys_out, vals_in,
                                                  vals_out, (int)n));
    } else {
        const uint32_t *ki = (const uint32_t *)keys_in;
        uint32_t *ko = (uint32_t *)keys_out;
        cudaCheck(cub::DeviceRadixSort::SortPairs(NULL, bytes, ki, ko, vals_in, vals_out,
                                                  (int)n, 0, bits));
        void *tmp = cuda_scratch(SCRATCH_SORT, bytes);
        cudaCheck(cub::DeviceRadixSort::SortPairs(tmp, bytes, ki, ko, vals_in, vals_out,
                                                  (int)n, 0, bits));
    }
    cudaCheckLaunch();
}

void cuda_sort_pairs_float_desc(const float *keys_in, float *keys_out, const int32_t *vals_in,
                                int32_t *vals_out, size_t n) {
    if (n == 0) return;
    check_sort_size(n);
    size_t bytes = 0;
    cudaCheck(cub::DeviceRadixSort::SortPairsDescending(NULL, bytes, keys_in, keys_out, vals_in,
                                                        vals_out, (int)n));
    void *tmp = cuda_scratch(SCRATCH_SORT, bytes);
    cudaCheck(cub::DeviceRadixSort::SortPairsDescending(tmp, bytes, keys_in, keys_out, vals_in,
                                                        vals_out, (int)n));
    cudaCheckLaunch();
}

// ---- memory ops -------------------------------------------------------------------------

// cudaMalloc returns 256-byte aligned memory (more than the 64 bytes kernels.h promises).
void *cuda_alloc(size_t bytes) {
    size_t rounded = (bytes + 255) / 256 * 256;
    if (rounded == 0) rounded = 256;
    void *p = NULL;
    if (cudaMalloc(&p, rounded) != cudaSuccess) {
        (void)cudaGetLastError();   // clear it: the caller reports the failure
        return NULL;
    }
    cudaCheck(cudaMemset(p, 0, rounded));
    return p;
}

void cuda_release(void *p) {
    if (p) cudaCheck(cudaFree(p));
}

void cuda_zero(Tensor t, size_t numel) {
    if (!t.data || !numel) return;
    cudaCheck(cudaMemset(t.data, 0, numel * dtype_size(t.dtype)));
    cuda_weights_written(t.data, numel * dtype_size(t.dtype) / sizeof(float));
}

void cuda_upload(Tensor dst, const void *src, size_t bytes) {
    if (!bytes) return;
    cudaCheck(cudaMemcpy(dst.data, src, bytes, cudaMemcpyHostToDevice));
    cuda_weights_written(dst.data, bytes / sizeof(float));
}

void cuda_download(void *dst, Tensor src, size_t bytes) {
    if (bytes) cudaCheck(cudaMemcpy(dst, src.data, bytes, cudaMemcpyDeviceToHost));
    cuda_error_check();   // every read of a result is a point where bad data surfaces
}
