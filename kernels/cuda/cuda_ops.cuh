// cuda_ops.cuh: the CUDA backend's op implementations and the helpers they share.
//
// Each cuda_<name> implements the op list's entry <name> (kernels/ops.def: semantics and
// shapes; kernels.h: the accumulate-in-backward rule), and the CPU op of the same name
// (kernels/cpu/) is the reference every one is tested against (tests/cuda/).
// runtime.cu: errors, cuBLAS (plain, grouped), the bf16 weight copy, scratch, sorting,
// memory ops; dense.cu: elementwise, embedding, RMSNorm, matmul, SwiGLU, experts,
// cross-entropy; attention.cu: RoPE and attention (cuDNN's fused kernel through
// sdpa_cudnn.cpp, host C++); router.cu: scores, noise, top-k, gates, fused routing;
// capacity.cu: capacity; dispatch.cu: dispatch plan, gather/combine; aux_losses.cu:
// load-balancing, z, importance and load losses, row normalisation; router_variants.cu:
// expert bias, hash routing, expert choice (the router files' per-row arithmetic is
// ../router_math.h, shared with the CPU ops); optim.cu: AdamW and the sum of squares;
// backend_cuda.cu: the table and the device probe.
//
// Everything runs in order on the legacy default stream, so an op's kernels see every
// earlier op's results, host arrays passed in (e.g. experts' `train`) are read during the
// call, and download() (a blocking copy) returns finished results.
//
// Determinism: no floating-point atomics. Reductions use fixed launch shapes and fixed
// tree orders; integer atomics appear only in histograms (exact) and the error flag.
#ifndef MOE_CUDA_OPS_CUH
#define MOE_CUDA_OPS_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "../kernels.h"
}

static_assert(sizeof(real) == sizeof(float), "the CUDA backend is built for real = float only");

// The project's one error printer (base/util.c): "moe: error: ... (file:line)", exits.
extern "C" [[noreturn]] void util_die(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define CUDA_DIE(...) util_die(__FILE__, __LINE__, __VA_ARGS__)
#define CUDA_REQUIRE(cond, ...) \
    do {                        \
        if (!(cond)) CUDA_DIE(__VA_ARGS__); \
    } while (0)

void cuda_check(cudaError_t err, const char *call, const char *file, int line);
void cublas_check(cublasStatus_t st, const char *call, const char *file, int line);
// Every CUDA runtime / cuBLAS call goes through these: a failure is one line naming the
// call, the error and the source location.
#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)
#define cublasCheck(call) cublas_check((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch errors (bad configuration, missing kernel image).
#define cudaCheckLaunch() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// ---- launch shapes --------------------------------------------------------------------

#define CUDA_THREADS 256   // block size of every 1-D kernel; the reductions assume it
// Blocks for a grid-stride loop over n items (at most 2^20 blocks; the loop covers the rest).
unsigned cuda_blocks(size_t n);
#define GRID_STRIDE(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); \
         i += (size_t)gridDim.x * blockDim.x)

// Sum of v over the block (blockDim.x == CUDA_THREADS), in a fixed order: warps by
// shuffle, then warp sums by the first warp. Every thread gets the result. All threads
// of the block must call it.
__device__ __forceinline__ double cuda_block_sum(double v) {
    __shared__ double warp_sums[CUDA_THREADS / 32];
    __shared__ double total;
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < CUDA_THREADS / 32 ? warp_sums[lane] : 0.0;
        for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) total = v;
    }
    __syncthreads();
    double r = total;
    __syncthreads();   // the shared slots may be reused by the next call
    return r;
}

__device__ __forceinline__ float cuda_block_max(float v) {
    __shared__ float warp_max[CUDA_THREADS / 32];
    __shared__ float total;
    for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, off));
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_max[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < CUDA_THREADS / 32 ? warp_max[lane] : -INFINITY;
        for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, off));
        if (lane == 0) total = v;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// Softmax numerators of a block's scores sc (n), each thread's strided share: sc[u] =
// exp(sc[u] - max) with the block's max of the threads' running maxima mx; returns the
// block's sum of them to every thread. All threads of the block must call it.
__device__ __forceinline__ double cuda_block_exp_sum(float *sc, size_t n, float mx) {
    mx = cuda_block_max(mx);
    double sum = 0.0;
    for (size_t u = threadIdx.x; u < n; u += blockDim.x) {
        sc[u] = expf(sc[u] - mx);
        sum += sc[u];
    }
    return cuda_block_sum(sum);
}

// ---- invalid data ---------------------------------------------------------------------
// The CPU ops die on an index outside its range (token, target, expert, offsets). On the
// device a kernel skips the bad item and records the first problem in a flag; the flag is
// read at the next download() (every loss read is one) and the run dies there, naming it.
enum {
    CUDA_BAD_TOKEN = 1,
    CUDA_BAD_TARGET,
    CUDA_BAD_EXPERT,
    CUDA_BAD_ROW,
};
int *cuda_error_flag(void);   // device int, 0 while all is well
__device__ __forceinline__ void cuda_flag(int *flag, int code) { atomicCAS(flag, 0, code); }
void cuda_error_check(void);  // dies if a kernel raised the flag
// An expert index inside [0, E); the router kernels flag CUDA_BAD_EXPERT otherwise.
__device__ __forceinline__ bool expert_ok(int32_t e, size_t E) {
    return e >= 0 && (size_t)e < E;
}

// ---- shared resources -----------------------------------------------------------------
// Opens cuBLAS (dlopen); 0 with a one-line reason when it cannot.
int cuda_cublas_load(char *err, size_t n);
// The handle, created on first use; dies when cuBLAS cannot start.
cublasHandle_t cuda_cublas(void);
// Grow-only device scratch, one buffer per slot: an op takes what it needs for the length
// of the call (everything runs on one stream, so the next op cannot overlap it).
enum { SCRATCH_OP = 0, SCRATCH_SORT = 1, SCRATCH_BF16_A, SCRATCH_BF16_B, SCRATCH_PTRS,
       SCRATCH_SLOTS };
void *cuda_scratch(int slot, size_t bytes);
// Carves 256-byte aligned pieces out of one scratch request: size first, then place.
struct ScratchLayout {
    size_t used = 0;
    size_t add(size_t bytes) {
        size_t at = used;
        used += (bytes + 255) / 256 * 256;
        return at;
    }
};
// Scratch of the sort-based ops, one op-scratch request: n (key, value) int32 pairs before
// and after a sort, and `extra` (at most 2) more arrays of n 4-byte values (float keys).
struct SortScratch {
    int32_t *keys, *skeys, *vals, *svals;
    void *extra[2];
};
SortScratch cuda_sort_scratch(size_t n, int extra);
// Copies n int32 values of a device buffer to the host (a synchronising read).
void cuda_read_ints(int32_t *host, const int32_t *dev, size_t n);

// c (m, n) = alpha op(a) op(b) + beta c, row-major, as cpu_gemm: cuBLAS sgemm, or under
// cuda_set_gemm_bf16(1) cublasGemmEx on bf16 copies of a and b with fp32 accumulation
// and an fp32 c.
// The bf16 copy of [p, p + n) when p lies in the weights with a current copy (AdamW
// writes it alongside the fp32 values), else NULL. A write to the weights by any other
// op calls cuda_weights_written (the copy goes stale, to be rounded anew on next use).
__nv_bfloat16 *cuda_bf16_weights_at(const float *p, size_t n);
void cuda_weights_written(const void *p, size_t n);
int cuda_gemm_bf16(void);   // the mode set last
// dst (n) = src (n) rounded to bf16, nearest even.
void cuda_to_bf16(__nv_bfloat16 *dst, const float *src, size_t n);
void cuda_gemm(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha,
               const float *a, size_t lda, const float *b, size_t ldb, float beta, float *c,
               size_t ldc);
// A matrix of a product: fp32, or (under bf16 products only) bf16, read or written as it
// stands.
struct GemmArg {
    const void *p;
    int bf16;
};
// cuda_gemm with each of a, b and c fp32 or bf16.
void cuda_gemm_typed(int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha,
                     GemmArg a, size_t lda, GemmArg b, size_t ldb, float beta, GemmArg c,
                     size_t ldc);

// Independent products sharing transposes, leading dimensions, alpha and beta, each
// row-major as cuda_gemm: c[c_at] (m, n) = alpha op(a[a_at]) op(b[b_at]) + beta c[c_at],
// offsets in elements into the group's three buffers. Under bf16 products the first
// a_numel values of an fp32 a and b_numel of an fp32 b are rounded to bf16 once for the
// whole group.
struct GemmGroup {
    int trans_a, trans_b;
    GemmArg a, b, c;
    size_t a_numel, b_numel, lda, ldb, ldc;
    float alpha, beta;
};
struct GemmProblem {
    size_t m, n, k, a_at, b_at, c_at;
};
// One cublasGemmGroupedBatchedEx call for the whole group (empty problems skipped);
// 0 when this cuBLAS has none or refuses the types (said once): the caller loops.
int cuda_gemm_grouped(const GemmGroup *grp, const GemmProblem *p, size_t count);

// Stable sorts of n (key, value) pairs with CUB's radix sort (stable, -0.0 == +0.0).
// Ascending int keys in [0, 2^bits): bits = 32 sorts any int32 (negative first).
void cuda_sort_pairs_int(const int32_t *keys_in, int32_t *keys_out, const int32_t *vals_in,
                         int32_t *vals_out, size_t n, int bits);
// Descending float keys.
void cuda_sort_pairs_float_desc(const float *keys_in, float *keys_out, const int32_t *vals_in,
                                int32_t *vals_out, size_t n);
// Fills v (n) with 0, 1, ..., n-1.
void cuda_iota(int32_t *v, size_t n);
// Bits needed for keys 0..max_key.
int cuda_key_bits(size_t max_key);
// First position in sorted keys (n) holding a key >= e: where key e's run starts (the
// router's capacity and dispatch ops, on experts sorted by cuda_sort_pairs_int).
__device__ __forceinline__ size_t lower_bound(const int32_t *keys, size_t n, int32_t e) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (keys[mid] < e)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

// ---- column sums ------------------------------------------------------------------------
// out (cols) = sum over rows r of f(r, c), in double: partial sums over fixed chunks of
// rows (set by `rows` alone, never by the device), then the chunks in order. F is a
// struct with `__device__ double operator()(size_t r, size_t c) const`.
#define COLSUM_MIN_CHUNK 64
static inline size_t cuda_colsum_chunk(size_t rows) {
    size_t chunk = (rows + 65534) / 65535;   // gridDim.y holds at most 65535 chunks
    return chunk > COLSUM_MIN_CHUNK ? chunk : COLSUM_MIN_CHUNK;
}
static inline size_t cuda_colsum_scratch(size_t rows, size_t cols) {
    size_t chunks = (rows + cuda_colsum_chunk(rows) - 1) / cuda_colsum_chunk(rows);
    return (chunks ? chunks : 1) * cols * sizeof(double);
}

template <class F>
__global__ void colsum_partial_kernel(double *part, size_t rows, size_t cols, size_t chunk, F f) {
    size_t c = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (c >= cols) return;
    size_t r0 = blockIdx.y * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
    double s = 0.0;
    for (size_t r = r0; r < r1; r++) s += f(r, c);
    part[blockIdx.y * cols + c] = s;
}

static __global__ void colsum_final_kernel(double *out, const double *part, size_t chunks,
                                           size_t cols) {
    GRID_STRIDE(c, cols) {
        double s = 0.0;
        for (size_t k = 0; k < chunks; k++) s += part[k * cols + c];
        out[c] = s;
    }
}

// part: cuda_colsum_scratch(rows, cols) bytes of device scratch; out: cols doubles.
template <class F>
void cuda_colsum(double *out, double *part, size_t rows, size_t cols, F f) {
    if (cols == 0) return;
    size_t chunk = cuda_colsum_chunk(rows), chunks = (rows + chunk - 1) / chunk;
    if (chunks > 0) {
        dim3 grid((unsigned)((cols + CUDA_THREADS - 1) / CUDA_THREADS), (unsigned)chunks);
        colsum_partial_kernel<<<grid, CUDA_THREADS>>>(part, rows, cols, chunk, f);
        cudaCheckLaunch();
    }
    colsum_final_kernel<<<cuda_blocks(cols), CUDA_THREADS>>>(out, part, chunks, cols);
    cudaCheckLaunch();
}

// out[i] = in[index[i]] (rows of C) for i < n (i < *count when count is not NULL; a count
// above n is flagged `bad`). Indices outside [0, in_rows) give zero rows, flagged `bad`.
void cuda_gather_rows(float *out, const float *in, size_t in_rows, const int32_t *index,
                      size_t n, const int32_t *count, size_t C, int bad);

// dst[index[i]] (rows of C) += src[i] for i < n (i < *count when count is not NULL), each
// destination row summing its sources in increasing i: the CPU loops' order, so the
// result is deterministic. Indices outside [0, dst_rows) are skipped and flagged `bad`.
void cuda_scatter_add_rows(float *dst, size_t dst_rows, const float *src, const int32_t *index,
                           size_t n, const int32_t *count, size_t C, int bad);

// ---- ops ------------------------------------------------------------------------------
// cuda_<name> for every entry of the op list, hooks included.
extern "C" {
#define KERNEL(ret, fn, params) ret cuda_##fn params;
#define KERNEL_HOOK KERNEL
#include "../ops.def"
#undef KERNEL
#undef KERNEL_HOOK
}

// Device pointers of a Tensor's data, typed.
#define DEV_R(t) ((float *)(t).data)
#define DEV_I(t) ((int32_t *)(t).data)

#endif
