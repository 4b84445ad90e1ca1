// attention.cu: RoPE and causal grouped-query attention: which path runs, and the plain
// CUDA kernels; last, the decode-time attention over a KV cache (generation).
//
// Under bf16 products the ops run cuDNN's fused attention (sdpa_cudnn.cpp) wherever
// cuDNN builds a plan for the shape: att then holds the softmax statistics (B*H*T) and
// datt nothing. fp32 mode, and any shape or machine cuDNN refuses, runs the plain kernels
// below in fp32; they keep the probabilities att (B, H, T, T) exactly as the CPU op does.
//   forward:  one block per (batch, head, query t): scores, causal softmax, out = p v.
//   backward: one block per (batch, head, query t) for ds and dq, then one block per
//             (batch, KV head, key u) for dk and dv, summing the group's query heads and
//             the queries t >= u in a fixed order. Every output element has one writer.
#include "cuda_ops.cuh"
#include "backend_cuda.h"
#include "sdpa_cudnn.h"

#include <cuda_bf16.h>
#include <stdio.h>

// ---- RoPE -------------------------------------------------------------------------------

// Rotates the first H + KV heads of each row by sign * a_i, a_i = t * theta^(-2i/D), in
// double as the CPU op. One thread per (row, head, i).
__global__ void rope_kernel(float *qkv, size_t BT, size_t T, size_t H, size_t KV, size_t D,
                            double theta, double sign) {
    size_t half = D / 2, heads = H + KV, width = (H + 2 * KV) * D;
    GRID_STRIDE(j, BT * heads * half) {
        size_t i = j % half, head = (j / half) % heads, bt = j / (half * heads);
        double a = sign * (double)(bt % T) * pow(theta, -2.0 * (double)i / (double)D);
        double c = cos(a), s = sin(a);
        float *x1 = qkv + bt * width + head * D + i, *x2 = x1 + half;
        double v1 = *x1, v2 = *x2;
        *x1 = (float)(v1 * c - v2 * s);
        *x2 = (float)(v2 * c + v1 * s);
    }
}

static void rope_rotate(float *qkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                        double theta, double sign) {
    CUDA_REQUIRE(D % 2 == 0, "RoPE needs an even head size, not %zu", D);
    size_t n = B * T * (H + KV) * (D / 2);
    if (n == 0) return;
    rope_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(qkv, B * T, T, H, KV, D, theta, sign);
    cudaCheckLaunch();
}

void cuda_rope_forward(Tensor qkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                       double theta) {
    rope_rotate(DEV_R(qkv), B, T, H, KV, D, theta, 1.0);
}

void cuda_rope_backward(Tensor dqkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                        double theta) {
    if (dqkv.data) rope_rotate(DEV_R(dqkv), B, T, H, KV, D, theta, -1.0);
}

// ---- attention --------------------------------------------------------------------------

// Query/key heads Dk wide, value heads Dv wide from voff = (H + KV) Dk in each row.
struct AttnShape {
    size_t T, H, KV, Dk, Dv, voff, width, out_width, group;
    float scale;
};

static AttnShape attn_shape_split(size_t T, size_t H, size_t KV, size_t Dk, size_t Dv,
                                  double scale) {
    CUDA_REQUIRE(KV > 0 && H % KV == 0, "attention: %zu query heads cannot share %zu KV heads",
                 H, KV);
    AttnShape s = {T,  H,     KV,    Dk, Dv, (H + KV) * Dk, (H + KV) * Dk + KV * Dv, H * Dv,
                   H / KV, (float)scale};
    return s;
}

static AttnShape attn_shape(size_t T, size_t H, size_t KV, size_t D) {
    return attn_shape_split(T, H, KV, D, D, 1.0 / sqrt((double)D));
}

// Block (b, h, t): p[u] = softmax_u<=t(scale q_t . k_u), 0 above t; out_t = sum_u p[u] v_u.
// The probabilities are built in place in att's row; dynamic shared memory holds q_t.
__global__ void attention_forward_kernel(float *out, float *att, const float *qkv, AttnShape s) {
    extern __shared__ float q[];   // (Dk)
    size_t T = s.T, Dk = s.Dk, Dv = s.Dv, W = s.width;
    size_t t = blockIdx.x % T, bh = blockIdx.x / T, h = bh % s.H, b = bh / s.H;
    size_t kvh = h / s.group;
    const float *xb = qkv + b * T * W;
    const float *k = xb + (s.H + kvh) * Dk, *v = xb + s.voff + kvh * Dv;
    float *p = att + bh * T * T + t * T;
    for (size_t d = threadIdx.x; d < Dk; d += blockDim.x) q[d] = xb[t * W + h * Dk + d];
    __syncthreads();
    float mx = -INFINITY;
    for (size_t u = threadIdx.x; u <= t; u += blockDim.x) {
        float dot = 0.0f;
        for (size_t d = 0; d < Dk; d++) dot += q[d] * k[u * W + d];
        p[u] = s.scale * dot;
        mx = fmaxf(mx, p[u]);
    }
    mx = cuda_block_max(mx);
    double sum = 0.0;
    for (size_t u = threadIdx.x; u <= t; u += blockDim.x) {
        double e = exp((double)p[u] - mx);
        p[u] = (float)e;
        sum += e;
    }
    sum = cuda_block_sum(sum);
    for (size_t u = threadIdx.x; u < T; u += blockDim.x)
        p[u] = u <= t ? (float)((double)p[u] / sum) : 0.0f;
    __syncthreads();   // every p[u] written before any thread reads the row
    for (size_t d = threadIdx.x; d < Dv; d += blockDim.x) {
        float acc = 0.0f;
        for (size_t u = 0; u <= t; u++) acc += p[u] * v[u * W + d];
        out[(b * T + t) * s.out_width + h * Dv + d] = acc;
    }
}

// ---- the fused path (cuDNN, sdpa_cudnn.cpp) ------------------------------------------

// It runs for bf16 products when cuDNN plans the shape; the first refusal is said once,
// with cuDNN's reason.
extern "C" int backend_cuda_fused_attention(size_t B, size_t T, size_t H, size_t KV, size_t D,
                                            char *err, size_t n) {
    size_t fwd_ws, bwd_ws;
    SdpaDims s = {B, T, H, KV, D};
    return sdpa_cudnn_plan(&s, &fwd_ws, &bwd_ws, err, n);
}

static int use_fused(int bf16, size_t B, size_t T, size_t H, size_t KV, size_t D) {
    static int said;
    char why[512];
    if (!bf16 || B * H * T == 0 || D == 0) return 0;
    if (backend_cuda_fused_attention(B, T, H, KV, D, why, sizeof why)) return 1;
    if (!said++)
        fprintf(stderr, "moe: note: attention runs the plain CUDA kernels in fp32, not cuDNN's "
                        "fused attention: %s\n", why);
    return 0;
}

// dst = src, or dst += src when accumulate (a backward op's contract).
__global__ void float_from_bf16_kernel(float *dst, const __nv_bfloat16 *src, size_t n,
                                       int accumulate) {
    GRID_STRIDE(i, n) dst[i] = __bfloat162float(src[i]) + (accumulate ? dst[i] : 0.0f);
}

static void from_bf16(float *dst, const __nv_bfloat16 *src, size_t n, int accumulate) {
    float_from_bf16_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(dst, src, n, accumulate);
    cudaCheckLaunch();
}

// bf16 buffers of (B*T, W) or (B*T, H*D) and the workspace, carved from op scratch.
struct SdpaScratch {
    __nv_bfloat16 *qkv, *dqkv, *o, *dout;
    void *ws;
};

static SdpaScratch sdpa_scratch(const SdpaDims &s, int backward) {
    size_t fwd_ws = 0, bwd_ws = 0, N = s.B * s.T, W = (s.H + 2 * s.KV) * s.D, HD = s.H * s.D;
    char why[512];
    CUDA_REQUIRE(sdpa_cudnn_plan(&s, &fwd_ws, &bwd_ws, why, sizeof why),
                 "cuDNN fused attention: %s", why);
    size_t two = sizeof(__nv_bfloat16);
    ScratchLayout lay;
    size_t at_qkv = lay.add(N * W * two), at_o = lay.add(N * HD * two);
    size_t at_dqkv = backward ? lay.add(N * W * two) : 0;
    size_t at_do = backward ? lay.add(N * HD * two) : 0;
    size_t at_ws = lay.add(backward ? bwd_ws : fwd_ws);
    char *base = (char *)cuda_scratch(SCRATCH_OP, lay.used);
    SdpaScratch sc = {(__nv_bfloat16 *)(base + at_qkv), (__nv_bfloat16 *)(base + at_dqkv),
                      (__nv_bfloat16 *)(base + at_o), (__nv_bfloat16 *)(base + at_do),
                      base + at_ws};
    return sc;
}

static void sdpa_forward(float *out, float *stats, const float *qkv, const SdpaDims &s) {
    size_t N = s.B * s.T, W = (s.H + 2 * s.KV) * s.D;
    SdpaScratch sc = sdpa_scratch(s, 0);
    cuda_to_bf16(sc.qkv, qkv, N * W);
    const char *e = sdpa_cudnn_forward(&s, sc.qkv, sc.o, stats, sc.ws);
    CUDA_REQUIRE(!e, "cuDNN fused attention forward: %s; train.precision=fp32 runs the plain "
                     "attention kernels", e);
    from_bf16(out, sc.o, N * s.H * s.D, 0);
}

// out holds the forward's bf16 O widened to fp32, so rounding it back is exact.
static void sdpa_backward(float *dqkv, const float *dout, const float *out, const float *qkv,
                          const float *stats, const SdpaDims &s) {
    size_t N = s.B * s.T, W = (s.H + 2 * s.KV) * s.D, HD = s.H * s.D;
    SdpaScratch sc = sdpa_scratch(s, 1);
    cuda_to_bf16(sc.qkv, qkv, N * W);
    cuda_to_bf16(sc.o, out, N * HD);
    cuda_to_bf16(sc.dout, dout, N * HD);
    const char *e = sdpa_cudnn_backward(&s, sc.qkv, sc.o, sc.dout, stats, sc.dqkv, sc.ws);
    CUDA_REQUIRE(!e, "cuDNN fused attention backward: %s; train.precision=fp32 runs the plain "
                     "attention kernels", e);
    from_bf16(dqkv, sc.dqkv, N * W, 1);
}

// ---- which path -------------------------------------------------------------------------

void cuda_attention_plan(size_t *att_numel, size_t *datt_numel, size_t B, size_t T, size_t H,
                         size_t KV, size_t D, int bf16) {
    int fused = use_fused(bf16, B, T, H, KV, D);
    *att_numel = fused ? B * H * T : B * H * T * T;
    *datt_numel = fused ? 0 : B * H * T * T;
}

// The state the forward left in att must be the one its plan sized.
static int attention_fused(Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t D) {
    int fused = use_fused(cuda_gemm_bf16(), B, T, H, KV, D);
    size_t need = fused ? B * H * T : B * H * T * T;
    CUDA_REQUIRE(att.numel >= need,
                 "internal: attention state holds %zu values, the %s path needs %zu (plan the "
                 "model after setting its precision)",
                 att.numel, fused ? "fused" : "plain", need);
    return fused;
}

void cuda_attention_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T, size_t H,
                            size_t KV, size_t D) {
    AttnShape s = attn_shape(T, H, KV, D);
    if (B * H * T == 0 || D == 0) return;
    if (attention_fused(att, B, T, H, KV, D)) {
        sdpa_forward(DEV_R(out), DEV_R(att), DEV_R(qkv), SdpaDims{B, T, H, KV, D});
        return;
    }
    attention_forward_kernel<<<(unsigned)(B * H * T), CUDA_THREADS, D * sizeof(float)>>>(
        DEV_R(out), DEV_R(att), DEV_R(qkv), s);
    cudaCheckLaunch();
}

// Block (b, h, t): ds[u] = p[u] (dp[u] - sum_u' p[u'] dp[u']) with dp[u] = dout_t . v_u
// (0 above t), into datt's row; then dq_t += scale * sum_u ds[u] k_u.
__global__ void attention_backward_q_kernel(float *dqkv, float *datt, const float *dout,
                                            const float *qkv, const float *att, AttnShape s) {
    extern __shared__ float dy[];   // (Dv) dout_t for this head
    size_t T = s.T, Dk = s.Dk, Dv = s.Dv, W = s.width;
    size_t t = blockIdx.x % T, bh = blockIdx.x / T, h = bh % s.H, b = bh / s.H;
    size_t kvh = h / s.group;
    const float *xb = qkv + b * T * W;
    const float *k = xb + (s.H + kvh) * Dk, *v = xb + s.voff + kvh * Dv;
    const float *p = att + bh * T * T + t * T;
    float *ds = datt + bh * T * T + t * T;
    for (size_t d = threadIdx.x; d < Dv; d += blockDim.x)
        dy[d] = dout[(b * T + t) * s.out_width + h * Dv + d];
    __syncthreads();
    double rowsum = 0.0;
    for (size_t u = threadIdx.x; u <= t; u += blockDim.x) {
        float dp = 0.0f;
        for (size_t d = 0; d < Dv; d++) dp += dy[d] * v[u * W + d];
        ds[u] = dp;
        rowsum += (double)p[u] * dp;
    }
    rowsum = cuda_block_sum(rowsum);
    for (size_t u = threadIdx.x; u < T; u += blockDim.x)
        ds[u] = u <= t ? (float)((double)p[u] * ((double)ds[u] - rowsum)) : 0.0f;
    __syncthreads();
    for (size_t d = threadIdx.x; d < Dk; d += blockDim.x) {
        float acc = 0.0f;
        for (size_t u = 0; u <= t; u++) acc += ds[u] * k[u * W + d];
        dqkv[(b * T + t) * W + h * Dk + d] += s.scale * acc;
    }
}

// Block (b, kvh, u): dk_u += scale * sum_h sum_{t>=u} ds[t,u] q_t,  dv_u += sum_h sum_{t>=u}
// p[t,u] dout_t, over the query heads h of this KV head, in head then query order.
__global__ void attention_backward_kv_kernel(float *dqkv, const float *datt, const float *dout,
                                             const float *qkv, const float *att, AttnShape s) {
    size_t T = s.T, Dk = s.Dk, Dv = s.Dv, W = s.width, D = Dk > Dv ? Dk : Dv;
    size_t u = blockIdx.x % T, bk = blockIdx.x / T, kvh = bk % s.KV, b = bk / s.KV;
    const float *xb = qkv + b * T * W;
    const float *dyb = dout + b * T * s.out_width;
    for (size_t d = threadIdx.x; d < D; d += blockDim.x) {
        float dk = 0.0f, dv = 0.0f;
        for (size_t h = kvh * s.group; h < (kvh + 1) * s.group; h++) {
            const float *ds = datt + (b * s.H + h) * T * T, *p = att + (b * s.H + h) * T * T;
            for (size_t t = u; t < T; t++) {
                if (d < Dk) dk += ds[t * T + u] * xb[t * W + h * Dk + d];
                if (d < Dv) dv += p[t * T + u] * dyb[t * s.out_width + h * Dv + d];
            }
        }
        float *row = dqkv + (b * T + u) * W;
        if (d < Dk) row[(s.H + kvh) * Dk + d] += s.scale * dk;
        if (d < Dv) row[s.voff + kvh * Dv + d] += dv;
    }
}

void cuda_attention_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor out, Tensor qkv,
                             Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t D) {
    if (!dqkv.data) return;
    AttnShape s = attn_shape(T, H, KV, D);
    if (B * H * T == 0 || D == 0) return;
    if (attention_fused(att, B, T, H, KV, D)) {
        sdpa_backward(DEV_R(dqkv), DEV_R(dout), DEV_R(out), DEV_R(qkv), DEV_R(att),
                      SdpaDims{B, T, H, KV, D});
        return;
    }
    attention_backward_q_kernel<<<(unsigned)(B * H * T), CUDA_THREADS, D * sizeof(float)>>>(
        DEV_R(dqkv), DEV_R(datt), DEV_R(dout), DEV_R(qkv), DEV_R(att), s);
    cudaCheckLaunch();
    attention_backward_kv_kernel<<<(unsigned)(B * KV * T), CUDA_THREADS>>>(
        DEV_R(dqkv), DEV_R(datt), DEV_R(dout), DEV_R(qkv), DEV_R(att), s);
    cudaCheckLaunch();
}

// Split head widths and a given scale (multi-head latent attention): always the plain
// kernels in fp32 (cuDNN's path is not wired for Dk != Dv); the builder plans att for
// them (attention_plan with bf16 = 0).
void cuda_attention_mla_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T,
                                size_t H, size_t KV, size_t Dk, size_t Dv, double scale) {
    AttnShape s = attn_shape_split(T, H, KV, Dk, Dv, scale);
    if (B * H * T == 0 || Dk == 0 || Dv == 0) return;
    CUDA_REQUIRE(att.numel >= B * H * T * T, "internal: attention state holds %zu values, the "
                 "plain path needs %zu", att.numel, B * H * T * T);
    attention_forward_kernel<<<(unsigned)(B * H * T), CUDA_THREADS, Dk * sizeof(float)>>>(
        DEV_R(out), DEV_R(att), DEV_R(qkv), s);
    cudaCheckLaunch();
}

void cuda_attention_mla_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor out, Tensor qkv,
                                 Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t Dk,
                                 size_t Dv, double scale) {
    (void)out;
    if (!dqkv.data) return;
    AttnShape s = attn_shape_split(T, H, KV, Dk, Dv, scale);
    if (B * H * T == 0 || Dk == 0 || Dv == 0) return;
    attention_backward_q_kernel<<<(unsigned)(B * H * T), CUDA_THREADS, Dv * sizeof(float)>>>(
        DEV_R(dqkv), DEV_R(datt), DEV_R(dout), DEV_R(qkv), DEV_R(att), s);
    cudaCheckLaunch();
    attention_backward_kv_kernel<<<(unsigned)(B * KV * T), CUDA_THREADS>>>(
        DEV_R(dqkv), DEV_R(datt), DEV_R(dout), DEV_R(qkv), DEV_R(att), s);
    cudaCheckLaunch();
}

// ---- decode-time attention over a KV cache ----------------------------------------------

// Row b's query and key heads rotated by pos[b] (the rope kernel's rotation), its key and
// value heads copied into the cache at pos[b]. One block per row; a position outside
// the cache raises the error flag and the row is left alone.
__global__ void decode_append_kernel(float *qkv, float *kc, float *vc, const int32_t *pos,
                                     size_t L, size_t H, size_t KV, size_t D, double theta,
                                     int *flag) {
    size_t b = blockIdx.x, half = D / 2, width = (H + 2 * KV) * D, p = (size_t)pos[b];
    if (pos[b] < 0 || p >= L) {
        if (threadIdx.x == 0) cuda_flag(flag, CUDA_BAD_ROW);
        return;
    }
    float *row = qkv + b * width;
    for (size_t j = threadIdx.x; j < (H + KV) * half; j += blockDim.x) {
        size_t i = j % half, head = j / half;
        double a = (double)p * pow(theta, -2.0 * (double)i / (double)D);
        double c = cos(a), s = sin(a);
        float *x1 = row + head * D + i, *x2 = x1 + half;
        double v1 = *x1, v2 = *x2;
        *x1 = (float)(v1 * c - v2 * s);
        *x2 = (float)(v2 * c + v1 * s);
    }
    __syncthreads();
    float *k = kc + (b * L + p) * KV * D, *v = vc + (b * L + p) * KV * D;
    for (size_t j = threadIdx.x; j < KV * D; j += blockDim.x) {
        k[j] = row[H * D + j];
        v[j] = row[(H + KV) * D + j];
    }
}

// Block (b, h): scores of positions 0..pos[b] in shared memory, their softmax, out = p v.
__global__ void decode_attend_kernel(float *out, const float *qkv, const float *kc,
                                     const float *vc, const int32_t *pos, size_t L, size_t H,
                                     size_t KV, size_t D) {
    extern __shared__ float sc[];   // (L) scores, then probabilities
    size_t b = blockIdx.x / H, h = blockIdx.x % H, g = h / (H / KV);
    size_t n = pos[b] < 0 || (size_t)pos[b] >= L ? 0 : (size_t)pos[b] + 1;
    const float *q = qkv + b * (H + 2 * KV) * D + h * D;
    const float *k = kc + b * L * KV * D + g * D, *v = vc + b * L * KV * D + g * D;
    float scale = 1.0f / sqrtf((float)D), mx = -INFINITY;
    for (size_t u = threadIdx.x; u < n; u += blockDim.x) {
        float dot = 0.0f;
        for (size_t d = 0; d < D; d++)
            dot += q[d] * k[u * KV * D + d];
        sc[u] = dot * scale;
        mx = fmaxf(mx, sc[u]);
    }
    double sum = cuda_block_exp_sum(sc, n, mx);
    for (size_t d = threadIdx.x; d < D; d += blockDim.x) {
        double acc = 0.0;
        for (size_t u = 0; u < n; u++)
            acc += (double)sc[u] * v[u * KV * D + d];
        out[blockIdx.x * D + d] = (float)(acc / sum);
    }
}

void cuda_attention_decode_forward(Tensor out, Tensor qkv, Tensor kcache, Tensor vcache,
                                   Tensor pos, size_t B, size_t L, size_t H, size_t KV,
                                   size_t D, double theta) {
    CUDA_REQUIRE(KV > 0 && H % KV == 0, "attention: %zu query heads cannot share %zu KV heads",
                 H, KV);
    CUDA_REQUIRE(D % 2 == 0, "RoPE needs an even head size, not %zu", D);
    // The scores of one (sequence, head) live in shared memory: 48 KiB of them.
    CUDA_REQUIRE(L * sizeof(float) <= 48 * 1024,
                 "decode attention on CUDA keeps at most %zu cached positions, not %zu",
                 (size_t)(48 * 1024 / sizeof(float)), L);
    if (B == 0) return;
    decode_append_kernel<<<(unsigned)B, CUDA_THREADS>>>(DEV_R(qkv), DEV_R(kcache),
                                                        DEV_R(vcache), DEV_I(pos), L, H, KV,
                                                        D, theta, cuda_error_flag());
    cudaCheckLaunch();
    decode_attend_kernel<<<(unsigned)(B * H), CUDA_THREADS, L * sizeof(float)>>>(
        DEV_R(out), DEV_R(qkv), DEV_R(kcache), DEV_R(vcache), DEV_I(pos), L, H, KV, D);
    cudaCheckLaunch();
}
