// projection.cu: QK-norm, a bias on every row and the sigmoid-gated add (CUDA, fp32
// storage). The CPU file of the same name is the reference: one thread per row or group
// with the CPU's loop order inside it, column sums through cuda_colsum (double, fixed
// chunks), no atomics.
#include "cuda_ops.cuh"
#include "../router_math.h"

// One group shape of QK-norm, as in the CPU file.
struct QkSeg {
    size_t off, width, groups;
};

static void qk_segments(QkSeg s[2], size_t H, size_t KV, size_t D, int per_head) {
    s[0] = per_head ? QkSeg{0, D, H} : QkSeg{0, H * D, 1};
    s[1] = per_head ? QkSeg{H * D, D, KV} : QkSeg{H * D, KV * D, 1};
}

// Group gi of row n: its segment p and index j within the segment.
__device__ static void qk_group(const QkSeg &q, size_t gi, int *p, size_t *j) {
    *p = gi < q.groups ? 0 : 1;
    *j = gi < q.groups ? gi : gi - q.groups;
}

// One thread per (row, group).
__global__ void qk_norm_kernel(float *o, float *rs, const float *x, const float *wq,
                               const float *wk, QkSeg q, QkSeg k, size_t N, size_t W,
                               double eps) {
    size_t G = q.groups + k.groups;
    GRID_STRIDE(i, N * G) {
        size_t n = i / G, j;
        int p;
        qk_group(q, i % G, &p, &j);
        const QkSeg &s = p ? k : q;
        const float *w = p ? wk : wq;
        size_t c0 = n * W + s.off + j * s.width;
        double ss = 0.0;
        for (size_t c = 0; c < s.width; c++) ss += (double)x[c0 + c] * x[c0 + c];
        float r = (float)(1.0 / sqrt(ss / (double)s.width + eps));
        rs[i] = r;
        for (size_t c = 0; c < s.width; c++) o[c0 + c] = x[c0 + c] * r * w[c];
    }
}

// dst[n, V0 + c] (+)= src[n, V0 + c] for the value columns of every row.
__global__ void qk_values_kernel(float *dst, const float *src, size_t N, size_t W, size_t V0,
                                 int accumulate) {
    size_t VW = W - V0;
    GRID_STRIDE(i, N * VW) {
        size_t at = (i / VW) * W + V0 + i % VW;
        dst[at] = accumulate ? dst[at] + src[at] : src[at];
    }
}

void cuda_qk_norm_forward(Tensor out, Tensor rstd, Tensor qkv, Tensor wq, Tensor wk, size_t N,
                          size_t H, size_t KV, size_t D, int per_head, double eps) {
    if (N == 0) return;
    QkSeg s[2];
    qk_segments(s, H, KV, D, per_head);
    size_t W = (H + 2 * KV) * D, G = s[0].groups + s[1].groups;
    qk_norm_kernel<<<cuda_blocks(N * G), CUDA_THREADS>>>(DEV_R(out), DEV_R(rstd), DEV_R(qkv),
                                                         DEV_R(wq), DEV_R(wk), s[0], s[1], N,
                                                         W, eps);
    cudaCheckLaunch();
    qk_values_kernel<<<cuda_blocks(N * KV * D), CUDA_THREADS>>>(DEV_R(out), DEV_R(qkv), N, W,
                                                                (H + KV) * D, 0);
    cudaCheckLaunch();
}

__global__ void qk_norm_backward_x_kernel(float *dx, const float *dy, const float *x,
                                          const float *wq, const float *wk, const float *rs,
                                          QkSeg q, QkSeg k, size_t N, size_t W) {
    size_t G = q.groups + k.groups;
    GRID_STRIDE(i, N * G) {
        size_t n = i / G, j;
        int p;
        qk_group(q, i % G, &p, &j);
        const QkSeg &s = p ? k : q;
        const float *w = p ? wk : wq;
        size_t c0 = n * W + s.off + j * s.width;
        double dot = 0.0;
        for (size_t c = 0; c < s.width; c++) dot += (double)dy[c0 + c] * w[c] * x[c0 + c];
        double r = rs[i], kk = r * r * r * dot / (double)s.width;
        for (size_t c = 0; c < s.width; c++)
            dx[c0 + c] += (float)(r * w[c] * dy[c0 + c] - kk * x[c0 + c]);
    }
}

// Row r of the column sum is (row n, group j) of one segment.
struct QkNormDw {
    const float *dy, *x, *rs;
    QkSeg s;
    size_t first_group, G, W;
    __device__ double operator()(size_t r, size_t c) const {
        size_t n = r / s.groups, j = r % s.groups;
        size_t i = n * W + s.off + j * s.width + c;
        return (double)dy[i] * x[i] * rs[n * G + first_group + j];
    }
};

static __global__ void projection_add_doubles_kernel(float *dst, const double *src, size_t n) {
    GRID_STRIDE(i, n) dst[i] += (float)src[i];
}

// dst (cols) += column sums of f over rows.
template <class F> static void add_colsum(float *dst, size_t rows, size_t cols, F f) {
    ScratchLayout L;
    size_t o_part = L.add(cuda_colsum_scratch(rows, cols)), o_sum = L.add(cols * sizeof(double));
    char *s = (char *)cuda_scratch(SCRATCH_OP, L.used);
    double *sum = (double *)(s + o_sum);
    cuda_colsum(sum, (double *)(s + o_part), rows, cols, f);
    projection_add_doubles_kernel<<<cuda_blocks(cols), CUDA_THREADS>>>(dst, sum, cols);
    cudaCheckLaunch();
}

void cuda_qk_norm_backward(Tensor dqkv, Tensor dwq, Tensor dwk, Tensor dout, Tensor qkv,
                           Tensor wq, Tensor wk, Tensor rstd, size_t N, size_t H, size_t KV,
                           size_t D, int per_head) {
    if (N == 0) return;
    QkSeg s[2];
    qk_segments(s, H, KV, D, per_head);
    size_t W = (H + 2 * KV) * D, G = s[0].groups + s[1].groups;
    if (dqkv.data) {
        qk_norm_backward_x_kernel<<<cuda_blocks(N * G), CUDA_THREADS>>>(
            DEV_R(dqkv), DEV_R(dout), DEV_R(qkv), DEV_R(wq), DEV_R(wk), DEV_R(rstd), s[0], s[1],
            N, W);
        cudaCheckLaunch();
        qk_values_kernel<<<cuda_blocks(N * KV * D), CUDA_THREADS>>>(DEV_R(dqkv), DEV_R(dout), N,
                                                                    W, (H + KV) * D, 1);
        cudaCheckLaunch();
    }
    if (dwq.data)
        add_colsum(DEV_R(dwq), N * s[0].groups, s[0].width,
                   QkNormDw{DEV_R(dout), DEV_R(qkv), DEV_R(rstd), s[0], 0, G, W});
    if (dwk.data)
        add_colsum(DEV_R(dwk), N * s[1].groups, s[1].width,
                   QkNormDw{DEV_R(dout), DEV_R(qkv), DEV_R(rstd), s[1], s[0].groups, G, W});
}

// ---- bias -------------------------------------------------------------------------------

__global__ void bias_add_kernel(float *o, const float *x, const float *b, size_t N, size_t M) {
    GRID_STRIDE(i, N * M) o[i] = x[i] + b[i % M];
}

__global__ void bias_accumulate_kernel(float *dx, const float *dy, size_t n) {
    GRID_STRIDE(i, n) dx[i] += dy[i];
}

struct BiasDb {
    const float *dy;
    size_t M;
    __device__ double operator()(size_t n, size_t m) const { return dy[n * M + m]; }
};

void cuda_bias_add_forward(Tensor out, Tensor x, Tensor b, size_t N, size_t M) {
    if (N * M == 0) return;
    bias_add_kernel<<<cuda_blocks(N * M), CUDA_THREADS>>>(DEV_R(out), DEV_R(x), DEV_R(b), N, M);
    cudaCheckLaunch();
}

void cuda_bias_add_backward(Tensor dx, Tensor db, Tensor dout, size_t N, size_t M) {
    if (N * M == 0) return;
    if (dx.data) {
        bias_accumulate_kernel<<<cuda_blocks(N * M), CUDA_THREADS>>>(DEV_R(dx), DEV_R(dout),
                                                                     N * M);
        cudaCheckLaunch();
    }
    if (db.data) add_colsum(DEV_R(db), N, M, BiasDb{DEV_R(dout), M});
}

// ---- sigmoid-gated add ------------------------------------------------------------------

__global__ void gated_add_kernel(float *o, const float *a, const float *s, const float *g,
                                 size_t N, size_t C) {
    GRID_STRIDE(i, N * C) o[i] = a[i] + (float)stable_sigmoid(g[i / C]) * s[i];
}

// One thread per row: the CPU's loop over the row's columns.
__global__ void gated_add_backward_kernel(float *da, float *ds, float *dg, const float *dy,
                                          const float *s, const float *g, size_t N, size_t C) {
    GRID_STRIDE(n, N) {
        double sg = stable_sigmoid(g[n]), dot = 0.0;
        for (size_t c = 0; c < C; c++) {
            size_t i = n * C + c;
            if (da) da[i] += dy[i];
            if (ds) ds[i] += (float)(sg * dy[i]);
            dot += (double)dy[i] * s[i];
        }
        if (dg) dg[n] += (float)(sg * (1.0 - sg) * dot);
    }
}

void cuda_gated_add_forward(Tensor out, Tensor a, Tensor s, Tensor g, size_t N, size_t C) {
    if (N * C == 0) return;
    gated_add_kernel<<<cuda_blocks(N * C), CUDA_THREADS>>>(DEV_R(out), DEV_R(a), DEV_R(s),
                                                           DEV_R(g), N, C);
    cudaCheckLaunch();
}

void cuda_gated_add_backward(Tensor da, Tensor ds, Tensor dg, Tensor dout, Tensor s, Tensor g,
                             size_t N, size_t C) {
    if (N == 0) return;
    gated_add_backward_kernel<<<cuda_blocks(N), CUDA_THREADS>>>(
        DEV_R(da), DEV_R(ds), DEV_R(dg), DEV_R(dout), DEV_R(s), DEV_R(g), N, C);
    cudaCheckLaunch();
}
