// dense.cu: elementwise add/mul, embedding, RMSNorm, matmul, SwiGLU, grouped experts and
// cross-entropy (CUDA, fp32 storage).
//
// Matrix products are cuBLAS sgemm (cuda_gemm). Where the CPU op reduces in double (sums
// of squares, dot products, logsumexp, column sums) so does the kernel, with a fixed
// reduction order. Repeated embedding rows are summed by sorting the tokens (stable) and
// walking each token's rows in order: no atomics.
#include "cuda_ops.cuh"

#include <stdlib.h>

// ---- elementwise ------------------------------------------------------------------------

__global__ void add_kernel(float *o, const float *a, const float *b, size_t n) {
    GRID_STRIDE(i, n) o[i] = a[i] + b[i];
}

__global__ void accumulate_kernel(float *dst, const float *src, size_t n) {
    GRID_STRIDE(i, n) dst[i] += src[i];
}

__global__ void mul_kernel(float *o, const float *x, const float *u, size_t n) {
    GRID_STRIDE(i, n) o[i] = x[i] * u[i];
}

__global__ void mul_accumulate_kernel(float *g, const float *d, const float *u, size_t n) {
    GRID_STRIDE(i, n) g[i] += d[i] * u[i];
}

void cuda_add_forward(Tensor out, Tensor a, Tensor b, size_t n) {
    if (n == 0) return;
    add_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(DEV_R(out), DEV_R(a), DEV_R(b), n);
    cudaCheckLaunch();
}

static void accumulate(Tensor dst, Tensor src, size_t n) {
    if (!dst.data || n == 0) return;
    accumulate_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(DEV_R(dst), DEV_R(src), n);
    cudaCheckLaunch();
}

void cuda_add_backward(Tensor da, Tensor db, Tensor dout, size_t n) {
    accumulate(da, dout, n);
    accumulate(db, dout, n);
}

void cuda_mul_forward(Tensor out, Tensor x, Tensor u, size_t n) {
    if (n == 0) return;
    mul_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(DEV_R(out), DEV_R(x), DEV_R(u), n);
    cudaCheckLaunch();
}

void cuda_mul_backward(Tensor dx, Tensor dout, Tensor u, size_t n) {
    if (!dx.data || n == 0) return;
    mul_accumulate_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(DEV_R(dx), DEV_R(dout), DEV_R(u), n);
    cudaCheckLaunch();
}

// ---- embedding --------------------------------------------------------------------------

// out[i] = in[index[i]] (rows of C) for i < m, m = *count when count is not NULL (at most
// n: more is flagged `bad` and cut to n), else n. An index outside [0, in_rows) is
// flagged `bad` and gives a zero row.
__global__ void gather_rows_kernel(float *out, const float *in, const int32_t *index, size_t n,
                                   const int32_t *count, size_t in_rows, size_t C, int *flag,
                                   int bad) {
    size_t m = n;
    if (count && (size_t)*count > n) {
        if (blockIdx.x == 0 && threadIdx.x == 0) cuda_flag(flag, bad);
    } else if (count) {
        m = (size_t)*count;
    }
    GRID_STRIDE(i, m * C) {
        size_t row = i / C, c = i % C;
        int32_t r = index[row];
        if (r < 0 || (size_t)r >= in_rows) {
            if (c == 0) cuda_flag(flag, bad);
            out[i] = 0.0f;
            continue;
        }
        out[i] = in[(size_t)r * C + c];
    }
}

void cuda_gather_rows(float *out, const float *in, size_t in_rows, const int32_t *index,
                      size_t n, const int32_t *count, size_t C, int bad) {
    if (n == 0 || C == 0) return;
    gather_rows_kernel<<<cuda_blocks(n * C), CUDA_THREADS>>>(out, in, index, n, count, in_rows,
                                                             C, cuda_error_flag(), bad);
    cudaCheckLaunch();
}

void cuda_embedding_forward(Tensor out, Tensor tokens, Tensor table, size_t N, size_t C) {
    if (C == 0) return;
    cuda_gather_rows(DEV_R(out), DEV_R(table), table.numel / C, DEV_I(tokens), N, NULL, C,
                     CUDA_BAD_TOKEN);
}

// Sort keys: the destination row, or dst_rows (sorted last, skipped) past the count or
// outside the buffer.
__global__ void scatter_keys_kernel(int32_t *keys, const int32_t *index, size_t n,
                                    const int32_t *count, size_t dst_rows, int *flag, int bad) {
    size_t limit = count ? (size_t)*count : n;
    GRID_STRIDE(i, n) {
        int32_t r = i < limit ? index[i] : (int32_t)dst_rows;
        if (i < limit && (r < 0 || (size_t)r >= dst_rows)) {
            cuda_flag(flag, bad);
            r = (int32_t)dst_rows;
        }
        keys[i] = r;
    }
}

// One thread per (sorted position i, column c); the first position of each destination
// row sums that row's sources in sorted (= source) order onto the row's old value.
__global__ void scatter_add_kernel(float *dst, const float *src, const int32_t *keys,
                                   const int32_t *sources, size_t n, size_t C, size_t dst_rows) {
    GRID_STRIDE(i, n * C) {
        size_t p = i / C, c = i % C;
        int32_t row = keys[p];
        if ((size_t)row >= dst_rows || (p > 0 && keys[p - 1] == row)) continue;
        float acc = dst[(size_t)row * C + c];
        for (size_t q = p; q < n && keys[q] == row; q++)
            acc += src[(size_t)sources[q] * C + c];
        dst[(size_t)row * C + c] = acc;
    }
}

void cuda_scatter_add_rows(float *dst, size_t dst_rows, const float *src, const int32_t *index,
                           size_t n, const int32_t *count, size_t C, int bad) {
    if (n == 0 || C == 0) return;
    SortScratch sc = cuda_sort_scratch(n, 0);
    int32_t *keys = sc.keys, *skeys = sc.skeys, *vals = sc.vals, *svals = sc.svals;
    scatter_keys_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(keys, index, n, count, dst_rows,
                                                          cuda_error_flag(), bad);
    cudaCheckLaunch();
    cuda_iota(vals, n);
    cuda_sort_pairs_int(keys, skeys, vals, svals, n, cuda_key_bits(dst_rows));
    scatter_add_kernel<<<cuda_blocks(n * C), CUDA_THREADS>>>(dst, src, skeys, svals, n, C,
                                                             dst_rows);
    cudaCheckLaunch();
}

void cuda_embedding_backward(Tensor dtable, Tensor dout, Tensor tokens, size_t N, size_t C) {
    if (!dtable.data || C == 0) return;
    cuda_scatter_add_rows(DEV_R(dtable), dtable.numel / C, DEV_R(dout), DEV_I(tokens), N, NULL,
                          C, CUDA_BAD_TOKEN);
}

// ---- RMSNorm ----------------------------------------------------------------------------

// One block per row.
__global__ void rmsnorm_kernel(float *o, float *rs, const float *x, const float *w, size_t C,
                               double eps) {
    size_t n = blockIdx.x;
    const float *xr = x + n * C;
    double ss = 0.0;
    for (size_t c = threadIdx.x; c < C; c += blockDim.x) ss += (double)xr[c] * xr[c];
    ss = cuda_block_sum(ss);
    float r = (float)(1.0 / sqrt(ss / (double)C + eps));
    if (threadIdx.x == 0) rs[n] = r;
    for (size_t c = threadIdx.x; c < C; c += blockDim.x) o[n * C + c] = xr[c] * r * w[c];
}

void cuda_rmsnorm_forward(Tensor out, Tensor rstd, Tensor x, Tensor w, size_t N, size_t C,
                          double eps) {
    if (N == 0) return;
    rmsnorm_kernel<<<(unsigned)N, CUDA_THREADS>>>(DEV_R(out), DEV_R(rstd), DEV_R(x), DEV_R(w),
                                                  C, eps);
    cudaCheckLaunch();
}

// dx_i += r w_i dout_i - r^3 x_i / C * sum_j dout_j w_j x_j; one block per row.
__global__ void rmsnorm_backward_x_kernel(float *dx, const float *dy, const float *x,
                                          const float *w, const float *rstd, size_t C) {
    size_t n = blockIdx.x;
    const float *xr = x + n * C, *dyr = dy + n * C;
    double dot = 0.0;
    for (size_t c = threadIdx.x; c < C; c += blockDim.x) dot += (double)dyr[c] * w[c] * xr[c];
    dot = cuda_block_sum(dot);
    double r = rstd[n];
    double k = r * r * r * dot / (double)C;
    for (size_t c = threadIdx.x; c < C; c += blockDim.x)
        dx[n * C + c] += (float)(r * w[c] * dyr[c] - k * xr[c]);
}

struct RmsnormDw {
    const float *dy, *x, *rstd;
    size_t C;
    __device__ double operator()(size_t n, size_t c) const {
        return (double)dy[n * C + c] * x[n * C + c] * rstd[n];
    }
};

__global__ void add_doubles_kernel(float *dst, const double *src, size_t n) {
    GRID_STRIDE(i, n) dst[i] += (float)src[i];
}

void cuda_rmsnorm_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, Tensor rstd,
                           size_t N, size_t C) {
    if (N == 0 || C == 0) return;
    if (dx.data) {
        rmsnorm_backward_x_kernel<<<(unsigned)N, CUDA_THREADS>>>(
            DEV_R(dx), DEV_R(dout), DEV_R(x), DEV_R(w), DEV_R(rstd), C);
        cudaCheckLaunch();
    }
    if (dw.data) {
        ScratchLayout L;
        size_t o_part = L.add(cuda_colsum_scratch(N, C)), o_sum = L.add(C * sizeof(double));
        char *s = (char *)cuda_scratch(SCRATCH_OP, L.used);
        double *sum = (double *)(s + o_sum);
        cuda_colsum(sum, (double *)(s + o_part), N, C,
                    RmsnormDw{DEV_R(dout), DEV_R(x), DEV_R(rstd), C});
        add_doubles_kernel<<<cuda_blocks(C), CUDA_THREADS>>>(DEV_R(dw), sum, C);
        cudaCheckLaunch();
    }
}

// ---- matmul -----------------------------------------------------------------------------

void cuda_matmul_forward(Tensor out, Tensor x, Tensor w, size_t N, size_t K, size_t M) {
    // out (N, M) = x (N, K) @ w (M, K)^T
    cuda_gemm(0, 1, N, M, K, 1.0f, DEV_R(x), K, DEV_R(w), K, 0.0f, DEV_R(out), M);
}

void cuda_matmul_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, size_t N,
                          size_t K, size_t M) {
    // dx (N, K) += dout (N, M) @ w (M, K)
    if (dx.data) cuda_gemm(0, 0, N, K, M, 1.0f, DEV_R(dout), M, DEV_R(w), K, 1.0f, DEV_R(dx), K);
    // dw (M, K) += dout^T (M, N) @ x (N, K)
    if (dw.data) cuda_gemm(1, 0, M, K, N, 1.0f, DEV_R(dout), M, DEV_R(x), K, 1.0f, DEV_R(dw), K);
}

// ---- SwiGLU -----------------------------------------------------------------------------

__device__ __forceinline__ double swiglu_sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

__device__ __forceinline__ double to_double(float x) { return x; }
__device__ __forceinline__ double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ T from_double(double v);
template <> __device__ __forceinline__ float from_double<float>(double v) { return (float)v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double v) {
    return __float2bfloat16_rn((float)v);
}

// out (N, F) = silu(h1) * h3 with h13 (N, 2F) rows [h1 | h3]; T: float, or bf16 for the
// experts' bf16 state.
template <class T>
__global__ void swiglu_kernel(T *out, const T *h13, size_t N, size_t F) {
    GRID_STRIDE(i, N * F) {
        size_t n = i / F, f = i % F;
        double h1 = to_double(h13[n * 2 * F + f]), h3 = to_double(h13[n * 2 * F + F + f]);
        out[i] = from_double<T>(h1 * swiglu_sigmoid(h1) * h3);
    }
}

// dh13 += d/dh13 of silu(h1) * h3; silu'(z) = s (1 + z (1 - s)), s = sigmoid(z).
template <class T>
__global__ void swiglu_backward_kernel(float *dh13, const float *dout, const T *h13, size_t N,
                                       size_t F) {
    GRID_STRIDE(i, N * F) {
        size_t n = i / F, f = i % F;
        double z = to_double(h13[n * 2 * F + f]), h3 = to_double(h13[n * 2 * F + F + f]);
        double s = swiglu_sigmoid(z), g = dout[i];
        dh13[n * 2 * F + f] += (float)(g * h3 * s * (1.0 + z * (1.0 - s)));
        dh13[n * 2 * F + F + f] += (float)(g * z * s);
    }
}

void cuda_swiglu_forward(Tensor out, Tensor h13, size_t N, size_t F) {
    if (N * F == 0) return;
    swiglu_kernel<<<cuda_blocks(N * F), CUDA_THREADS>>>(DEV_R(out), DEV_R(h13), N, F);
    cudaCheckLaunch();
}

void cuda_swiglu_backward(Tensor dh13, Tensor dout, Tensor h13, size_t N, size_t F) {
    if (!dh13.data || N * F == 0) return;
    swiglu_backward_kernel<<<cuda_blocks(N * F), CUDA_THREADS>>>(DEV_R(dh13), DEV_R(dout),
                                                                 DEV_R(h13), N, F);
    cudaCheckLaunch();
}

// ---- grouped experts --------------------------------------------------------------------
// The offsets (E+1) are read back to the host once per call (one synchronisation: cuBLAS
// takes problem sizes from host memory). Then either each non-empty expert runs its own
// cuBLAS calls in expert order (the loop), or each of the op's products is one
// cublasGemmGroupedBatchedEx call over the experts, with SwiGLU over all routed rows at
// once (grouped). cuda_set_expert_gemm chooses; make bench --gpu times both.
//
// h13 and act are fp32, or bf16 under bf16 products (cuda_experts_state_dtype): the up
// projection then writes bf16, SwiGLU reads and writes bf16, and act is the bf16
// operand of the down projection and of dw2 as it stands.

static int g_expert_gemm_grouped;

void cuda_set_expert_gemm(int grouped) { g_expert_gemm_grouped = grouped; }

DType cuda_experts_state_dtype(int bf16) { return bf16 ? DTYPE_BF16 : DTYPE_F32; }

// A view `at` elements into an fp32 or bf16 state buffer.
static GemmArg state_at(Tensor t, size_t at) {
    int half = t.dtype == DTYPE_BF16;
    return {(const char *)t.data + at * (half ? sizeof(__nv_bfloat16) : sizeof(float)), half};
}

static GemmArg f32_at(Tensor t, size_t at) { return {DEV_R(t) + at, 0}; }

// act rows [r0, r0 + rows) = SwiGLU of h13's, in the state's dtype.
static void swiglu_state(Tensor act, Tensor h13, size_t r0, size_t rows, size_t F) {
    if (rows * F == 0) return;
    if (h13.dtype == DTYPE_BF16)
        swiglu_kernel<<<cuda_blocks(rows * F), CUDA_THREADS>>>(
            (__nv_bfloat16 *)state_at(act, r0 * F).p,
            (const __nv_bfloat16 *)state_at(h13, r0 * 2 * F).p, rows, F);
    else
        swiglu_kernel<<<cuda_blocks(rows * F), CUDA_THREADS>>>(
            DEV_R(act) + r0 * F, DEV_R(h13) + r0 * 2 * F, rows, F);
    cudaCheckLaunch();
}

// dh13 rows [r0, r0 + rows) += SwiGLU's backward (dh13 is cleared first: it is scratch).
static void swiglu_state_backward(Tensor dh13, Tensor dact, Tensor h13, size_t r0, size_t rows,
                                  size_t F) {
    if (rows * F == 0) return;
    float *dh = DEV_R(dh13) + r0 * 2 * F;
    cudaCheck(cudaMemset(dh, 0, rows * 2 * F * sizeof(float)));
    if (h13.dtype == DTYPE_BF16)
        swiglu_backward_kernel<<<cuda_blocks(rows * F), CUDA_THREADS>>>(
            dh, DEV_R(dact) + r0 * F, (const __nv_bfloat16 *)state_at(h13, r0 * 2 * F).p, rows,
            F);
    else
        swiglu_backward_kernel<<<cuda_blocks(rows * F), CUDA_THREADS>>>(
            dh, DEV_R(dact) + r0 * F, DEV_R(h13) + r0 * 2 * F, rows, F);
    cudaCheckLaunch();
}

// Downloads and validates offsets (E+1) into a host array the caller frees; *M = offsets[E].
static int32_t *expert_offsets(Tensor offsets, size_t E, size_t *M) {
    int32_t *off = (int32_t *)malloc((E + 1) * sizeof(int32_t));
    CUDA_REQUIRE(off, "out of host memory for %zu expert offsets", E + 1);
    cuda_read_ints(off, DEV_I(offsets), E + 1);
    CUDA_REQUIRE(off[0] == 0, "expert offsets must start at 0, not %d", (int)off[0]);
    for (size_t e = 0; e < E; e++)
        CUDA_REQUIRE(off[e + 1] >= off[e], "expert offsets decrease at expert %zu (%d -> %d)", e,
                     (int)off[e], (int)off[e + 1]);
    *M = (size_t)off[E];
    return off;
}

// Routed row counts are known only at run time: refuse a buffer too small for them.
static void check_fits(Tensor t, size_t need, const char *name) {
    CUDA_REQUIRE(!t.data || t.numel >= need, "experts: %s holds %zu elements, needs %zu", name,
                 t.numel, need);
}

// h13 and act share a dtype, bf16 only under bf16 products.
static void check_state(Tensor h13, Tensor act) {
    CUDA_REQUIRE(h13.dtype == act.dtype && (h13.dtype == DTYPE_F32 || h13.dtype == DTYPE_BF16),
                 "experts: h13 and act must both be fp32 or both bf16");
    CUDA_REQUIRE(h13.dtype == DTYPE_F32 || cuda_gemm_bf16(),
                 "internal: the experts' bf16 state planned for bf16 products, run in fp32");
}

// One problem per expert with rows (and, when `only` is given, only[e] != 0): m, n, k
// from the expert's row count r as (m_r ? r : m), and so on, offsets r0 * *_row + e * *_exp.
struct ExpertProblem {
    size_t m, n, k;   // 0: the expert's row count
    size_t a_row, a_exp, b_row, b_exp, c_row, c_exp;
};

static size_t expert_problems(GemmProblem *p, const int32_t *off, size_t E, const uint8_t *only,
                              ExpertProblem s) {
    size_t count = 0;
    for (size_t e = 0; e < E; e++) {
        size_t r0 = (size_t)off[e], rows = (size_t)off[e + 1] - r0;
        if (rows == 0 || (only && !only[e])) continue;
        p[count++] = {s.m ? s.m : rows, s.n ? s.n : rows, s.k ? s.k : rows,
                      r0 * s.a_row + e * s.a_exp, r0 * s.b_row + e * s.b_exp,
                      r0 * s.c_row + e * s.c_exp};
    }
    return count;
}

// Once cuBLAS took an op's first grouped product, it takes the rest (the same types): a
// refusal now would leave a product undone.
static void grouped_after_first(const GemmGroup *grp, const GemmProblem *p, size_t n) {
    CUDA_REQUIRE(cuda_gemm_grouped(grp, p, n),
                 "internal: cuBLAS took one grouped gemm of the experts but not the next");
}

// The forward as two grouped products and one SwiGLU; 0 when cuBLAS refuses (loop then).
static int experts_forward_grouped(Tensor yp, Tensor h13, Tensor act, Tensor xp, Tensor w,
                                   const int32_t *off, size_t M, size_t E, size_t C, size_t F) {
    GemmProblem *p = (GemmProblem *)malloc((E ? E : 1) * sizeof *p);
    CUDA_REQUIRE(p, "out of host memory for %zu expert problems", E);
    size_t W = 3 * F * C;   // one expert's weights
    // h13 (rows, 2F) = x (rows, C) w13 (2F, C)^T
    GemmGroup up = {0, 1, f32_at(xp, 0), f32_at(w, 0), state_at(h13, 0), M * C, E * W, C, C,
                    2 * F, 1.0f, 0.0f};
    size_t n = expert_problems(p, off, E, NULL, {0, 2 * F, C, C, 0, 0, W, 2 * F, 0});
    int ok = cuda_gemm_grouped(&up, p, n);
    if (ok) {
        swiglu_state(act, h13, 0, M, F);
        // yp (rows, C) = act (rows, F) w2 (C, F)^T
        GemmGroup down = {0,  1, state_at(act, 0), f32_at(w, 2 * F * C), f32_at(yp, 0), M * F,
                          E * W - 2 * F * C, F, F, C, 1.0f, 0.0f};
        n = expert_problems(p, off, E, NULL, {0, C, F, F, 0, 0, W, C, 0});
        grouped_after_first(&down, p, n);
    }
    free(p);
    return ok;
}

static void experts_forward_loop(Tensor yp, Tensor h13, Tensor act, Tensor xp, Tensor w,
                                 const int32_t *off, size_t E, size_t C, size_t F) {
    for (size_t e = 0; e < E; e++) {
        size_t r0 = (size_t)off[e], rows = (size_t)off[e + 1] - r0, at = e * 3 * F * C;
        if (rows == 0) continue;
        // h13 (rows, 2F) = x (rows, C) w13 (2F, C)^T;  yp (rows, C) = act (rows, F) w2 (C, F)^T
        cuda_gemm_typed(0, 1, rows, 2 * F, C, 1.0f, f32_at(xp, r0 * C), C, f32_at(w, at), C,
                        0.0f, state_at(h13, r0 * 2 * F), 2 * F);
        swiglu_state(act, h13, r0, rows, F);
        cuda_gemm_typed(0, 1, rows, C, F, 1.0f, state_at(act, r0 * F), F,
                        f32_at(w, at + 2 * F * C), F, 0.0f, f32_at(yp, r0 * C), C);
    }
}

// The gather fused in (route.rows.data) is gathered into xp first: the grouped products
// take their operands as strided matrices, and the backward reads xp again.
void cuda_experts_forward(Tensor yp, Tensor h13, Tensor act, Tensor xp, ExpertRoute route,
                          Tensor w, Tensor offsets, size_t E, size_t C, size_t F) {
    size_t M;
    check_state(h13, act);
    int32_t *off = expert_offsets(offsets, E, &M);
    check_fits(w, E * 3 * F * C, "w");
    check_fits(xp, M * C, "xp");
    if (route.rows.data) {
        check_fits(route.rows, M, "rows");
        cuda_gather_rows_forward(xp, route.x, route.rows, offsets, E, C);
    }
    check_fits(h13, M * 2 * F, "h13");
    check_fits(act, M * F, "act");
    check_fits(yp, M * C, "yp");
    if (!g_expert_gemm_grouped || !experts_forward_grouped(yp, h13, act, xp, w, off, M, E, C, F))
        experts_forward_loop(yp, h13, act, xp, w, off, E, C, F);
    free(off);
}

// Experts whose weight gradient is wanted: train[e] (all when train is NULL), none
// without dw. Returns how many.
static size_t experts_wanting_dw(uint8_t *want, Tensor dw, const uint8_t *train, size_t E) {
    size_t n = 0;
    for (size_t e = 0; e < E; e++) {
        want[e] = dw.data && (!train || train[e]);
        n += want[e];
    }
    return n;
}

// The backward's buffers, as the op receives them.
struct ExpertGrads {
    Tensor dxp, dw, dyp, dh13, dact, h13, act, xp, w;
    const uint8_t *want;   // (E) weight gradient wanted
    size_t n_dw;           // experts wanting it
};

// The backward as grouped products (SwiGLU's backward over every routed row); 0 when
// cuBLAS refuses (loop then, before anything was written).
static int experts_backward_grouped(const ExpertGrads *g, const int32_t *off, size_t M,
                                    size_t E, size_t C, size_t F) {
    GemmProblem *p = (GemmProblem *)malloc((E ? E : 1) * sizeof *p);
    CUDA_REQUIRE(p, "out of host memory for %zu expert problems", E);
    size_t W = 3 * F * C, n;
    // dact (rows, F) = dy (rows, C) w2 (C, F), for every expert with rows (dact is scratch)
    GemmGroup g_da = {0, 0, f32_at(g->dyp, 0), f32_at(g->w, 2 * F * C), f32_at(g->dact, 0),
                      M * C, E * W - 2 * F * C, C, F, F, 1.0f, 0.0f};
    n = expert_problems(p, off, E, NULL, {0, F, C, C, 0, 0, W, F, 0});
    int ok = cuda_gemm_grouped(&g_da, p, n);
    if (ok) {
        // dw2 (C, F) += dy (rows, C)^T act (rows, F)
        GemmGroup g_dw2 = {1, 0, f32_at(g->dyp, 0), state_at(g->act, 0), f32_at(g->dw, 2 * F * C),
                           M * C, M * F, C, F, F, 1.0f, 1.0f};
        n = expert_problems(p, off, E, g->want, {C, F, 0, C, 0, F, 0, 0, W});
        if (g->n_dw) grouped_after_first(&g_dw2, p, n);
        swiglu_state_backward(g->dh13, g->dact, g->h13, 0, M, F);
        // dxp (rows, C) += dh13 (rows, 2F) w13 (2F, C)
        GemmGroup g_dx = {0, 0, f32_at(g->dh13, 0), f32_at(g->w, 0), f32_at(g->dxp, 0),
                          M * 2 * F, E * W, 2 * F, C, C, 1.0f, 1.0f};
        n = expert_problems(p, off, E, NULL, {0, C, 2 * F, 2 * F, 0, 0, W, C, 0});
        if (g->dxp.data) grouped_after_first(&g_dx, p, n);
        // dw13 (2F, C) += dh13 (rows, 2F)^T x (rows, C)
        GemmGroup g_dw13 = {1, 0, f32_at(g->dh13, 0), f32_at(g->xp, 0), f32_at(g->dw, 0),
                            M * 2 * F, M * C, 2 * F, C, C, 1.0f, 1.0f};
        n = expert_problems(p, off, E, g->want, {2 * F, C, 0, 2 * F, 0, C, 0, 0, W});
        if (g->n_dw) grouped_after_first(&g_dw13, p, n);
    }
    free(p);
    return ok;
}

static void experts_backward_loop(const ExpertGrads *g, const int32_t *off, size_t E, size_t C,
                                  size_t F) {
    for (size_t e = 0; e < E; e++) {
        size_t r0 = (size_t)off[e], rows = (size_t)off[e + 1] - r0, at = e * 3 * F * C;
        int want_dw = g->want[e];
        if (rows == 0 || (!want_dw && !g->dxp.data)) continue;
        // dact (rows, F) = dy (rows, C) w2 (C, F);  dw2 (C, F) += dy^T act
        cuda_gemm_typed(0, 0, rows, F, C, 1.0f, f32_at(g->dyp, r0 * C), C,
                        f32_at(g->w, at + 2 * F * C), F, 0.0f, f32_at(g->dact, r0 * F), F);
        if (want_dw)
            cuda_gemm_typed(1, 0, C, F, rows, 1.0f, f32_at(g->dyp, r0 * C), C,
                            state_at(g->act, r0 * F), F, 1.0f, f32_at(g->dw, at + 2 * F * C), F);
        swiglu_state_backward(g->dh13, g->dact, g->h13, r0, rows, F);
        // dxp (rows, C) += dh13 (rows, 2F) w13 (2F, C);  dw13 (2F, C) += dh13^T x
        if (g->dxp.data)
            cuda_gemm_typed(0, 0, rows, C, 2 * F, 1.0f, f32_at(g->dh13, r0 * 2 * F), 2 * F,
                            f32_at(g->w, at), C, 1.0f, f32_at(g->dxp, r0 * C), C);
        if (want_dw)
            cuda_gemm_typed(1, 0, 2 * F, C, rows, 1.0f, f32_at(g->dh13, r0 * 2 * F), 2 * F,
                            f32_at(g->xp, r0 * C), C, 1.0f, f32_at(g->dw, at), C);
    }
}

// xp holds the rows the forward gathered. The combine fused in (route.dy.data): dyp is
// written first, as combine's backward would have (zeroed, then gates times dy added),
// with the gates' gradient (route.dgates) beside it.
void cuda_experts_backward(Tensor dxp, Tensor dw, const uint8_t *train, Tensor dyp,
                           Tensor dh13, Tensor dact, Tensor h13, Tensor act, Tensor xp,
                           ExpertRoute route, Tensor w, Tensor offsets, size_t E, size_t C,
                           size_t F) {
    if (route.rows.data && route.dy.data && C) {
        cuda_zero(dyp, dyp.numel);
        cuda_combine_backward(dyp, route.dgates, route.dy, route.yp, route.gates, route.slot,
                              route.dy.numel / C, route.k, C);
    }
    size_t M;
    check_state(h13, act);
    int32_t *off = expert_offsets(offsets, E, &M);
    check_fits(dw, E * 3 * F * C, "dw");
    check_fits(dxp, M * C, "dxp");
    check_fits(dyp, M * C, "dyp");
    check_fits(dh13, M * 2 * F, "dh13");
    check_fits(dact, M * F, "dact");
    uint8_t *want = (uint8_t *)malloc(E ? E : 1);
    CUDA_REQUIRE(want, "out of host memory for %zu expert flags", E);
    ExpertGrads g = {dxp, dw, dyp, dh13, dact, h13, act, xp, w, want, 0};
    g.n_dw = experts_wanting_dw(want, dw, train, E);
    if (g.n_dw || dxp.data) {
        if (!g_expert_gemm_grouped || !experts_backward_grouped(&g, off, M, E, C, F))
            experts_backward_loop(&g, off, E, C, F);
    }
    free(want);
    free(off);
}

// ---- cross-entropy ----------------------------------------------------------------------

// lse (N) = logsumexp of each row, max-shifted; one block per row.
__global__ void logsumexp_rows_kernel(float *lse, const float *x, size_t V) {
    const float *row = x + blockIdx.x * V;
    float mx = -INFINITY;
    for (size_t v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, row[v]);
    mx = cuda_block_max(mx);
    double s = 0.0;
    for (size_t v = threadIdx.x; v < V; v += blockDim.x) s += exp((double)row[v] - mx);
    s = cuda_block_sum(s);
    if (threadIdx.x == 0) lse[blockIdx.x] = (float)((double)mx + log(s));
}

// loss (1) = mean_n (lse[n] - logits[n, target[n]]); one block, fixed order. A target
// outside the vocabulary makes the loss NaN and raises the flag.
__global__ void crossentropy_loss_kernel(float *loss, const float *lse, const float *lg,
                                         const int32_t *tg, size_t N, size_t V, int *flag) {
    double s = 0.0;
    for (size_t n = threadIdx.x; n < N; n += blockDim.x) {
        int32_t t = tg[n];
        if (t < 0 || (size_t)t >= V) {
            cuda_flag(flag, CUDA_BAD_TARGET);
            s += NAN;
            continue;
        }
        s += (double)lse[n] - lg[n * V + (size_t)t];
    }
    s = cuda_block_sum(s);
    if (threadIdx.x == 0) loss[0] = (float)(s / (double)N);
}

void cuda_crossentropy_forward(Tensor loss, Tensor lse, Tensor logits, Tensor targets,
                               size_t N, size_t V) {
    CUDA_REQUIRE(N > 0, "cross-entropy over zero rows has no mean");
    logsumexp_rows_kernel<<<(unsigned)N, CUDA_THREADS>>>(DEV_R(lse), DEV_R(logits), V);
    cudaCheckLaunch();
    crossentropy_loss_kernel<<<1, CUDA_THREADS>>>(DEV_R(loss), DEV_R(lse), DEV_R(logits),
                                                  DEV_I(targets), N, V, cuda_error_flag());
    cudaCheckLaunch();
}

// dlogits += scale * (softmax - onehot(target)).
__global__ void crossentropy_backward_kernel(float *dl, const float *lg, const float *ls,
                                             const int32_t *tg, double scale, size_t N,
                                             size_t V) {
    GRID_STRIDE(i, N * V) {
        size_t n = i / V, v = i % V;
        double p = exp((double)lg[i] - ls[n]);
        dl[i] += (float)(scale * (p - (double)(v == (size_t)tg[n])));
    }
}

void cuda_crossentropy_backward(Tensor dlogits, Tensor logits, Tensor lse, Tensor targets,
                                double dloss, size_t N, size_t V) {
    if (!dlogits.data || N * V == 0) return;
    crossentropy_backward_kernel<<<cuda_blocks(N * V), CUDA_THREADS>>>(
        DEV_R(dlogits), DEV_R(logits), DEV_R(lse), DEV_I(targets), dloss / (double)N, N, V);
    cudaCheckLaunch();
}
