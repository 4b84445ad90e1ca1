// attention.cu: RoPE and causal grouped-query attention (CUDA, plain kernels).
//
// This is the fallback path the issue asks for; cuDNN's fused scaled-dot-product
// attention (forward and backward) is the next step and will keep these kernels as the
// reference. It keeps the probabilities att (B, H, T, T) exactly as the CPU op does.
//   forward:  one block per (batch, head, query t): scores, causal softmax, out = p v.
//   backward: one block per (batch, head, query t) for ds and dq, then one block per
//             (batch, KV head, key u) for dk and dv, summing the group's query heads and
//             the queries t >= u in a fixed order. Every output element has one writer.
#include "cuda_ops.cuh"

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

struct AttnShape {
    size_t T, H, KV, D, width, out_width, group;
    float scale;
};

static AttnShape attn_shape(size_t T, size_t H, size_t KV, size_t D) {
    CUDA_REQUIRE(KV > 0 && H % KV == 0, "attention: %zu query heads cannot share %zu KV heads",
                 H, KV);
    AttnShape s = {T, H, KV, D, (H + 2 * KV) * D, H * D, H / KV, (float)(1.0 / sqrt((double)D))};
    return s;
}

// Block (b, h, t): p[u] = softmax_u<=t(scale q_t . k_u), 0 above t; out_t = sum_u p[u] v_u.
// The probabilities are built in place in att's row; dynamic shared memory holds q_t.
__global__ void attention_forward_kernel(float *out, float *att, const float *qkv, AttnShape s) {
    extern __shared__ float q[];   // (D)
    size_t T = s.T, D = s.D, W = s.width;
    size_t t = blockIdx.x % T, bh = blockIdx.x / T, h = bh % s.H, b = bh / s.H;
    size_t kvh = h / s.group;
    const float *xb = qkv + b * T * W;
    const float *k = xb + (s.H + kvh) * D, *v = xb + (s.H + s.KV + kvh) * D;
    float *p = att + bh * T * T + t * T;
    for (size_t d = threadIdx.x; d < D; d += blockDim.x) q[d] = xb[t * W + h * D + d];
    __syncthreads();
    float mx = -INFINITY;
    for (size_t u = threadIdx.x; u <= t; u += blockDim.x) {
        float dot = 0.0f;
        for (size_t d = 0; d < D; d++) dot += q[d] * k[u * W + d];
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
    for (size_t d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (size_t u = 0; u <= t; u++) acc += p[u] * v[u * W + d];
        out[(b * T + t) * s.out_width + h * D + d] = acc;
    }
}

void cuda_attention_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T, size_t H,
                            size_t KV, size_t D) {
    AttnShape s = attn_shape(T, H, KV, D);
    if (B * H * T == 0 || D == 0) return;
    attention_forward_kernel<<<(unsigned)(B * H * T), CUDA_THREADS, D * sizeof(float)>>>(
        DEV_R(out), DEV_R(att), DEV_R(qkv), s);
    cudaCheckLaunch();
}

// Block (b, h, t): ds[u] = p[u] (dp[u] - sum_u' p[u'] dp[u']) with dp[u] = dout_t . v_u
// (0 above t), into datt's row; then dq_t += scale * sum_u ds[u] k_u.
__global__ void attention_backward_q_kernel(float *dqkv, float *datt, const float *dout,
                                            const float *qkv, const float *att, AttnShape s) {
    extern __shared__ float dy[];   // (D) dout_t for this head
    size_t T = s.T, D = s.D, W = s.width;
    size_t t = blockIdx.x % T, bh = blockIdx.x / T, h = bh % s.H, b = bh / s.H;
    size_t kvh = h / s.group;
    const float *xb = qkv + b * T * W;
    const float *k = xb + (s.H + kvh) * D, *v = xb + (s.H + s.KV + kvh) * D;
    const float *p = att + bh * T * T + t * T;
    float *ds = datt + bh * T * T + t * T;
    for (size_t d = threadIdx.x; d < D; d += blockDim.x)
        dy[d] = dout[(b * T + t) * s.out_width + h * D + d];
    __syncthreads();
    double rowsum = 0.0;
    for (size_t u = threadIdx.x; u <= t; u += blockDim.x) {
        float dp = 0.0f;
        for (size_t d = 0; d < D; d++) dp += dy[d] * v[u * W + d];
        ds[u] = dp;
        rowsum += (double)p[u] * dp;
    }
    rowsum = cuda_block_sum(rowsum);
    for (size_t u = threadIdx.x; u < T; u += blockDim.x)
        ds[u] = u <= t ? (float)((double)p[u] * ((double)ds[u] - rowsum)) : 0.0f;
    __syncthreads();
    for (size_t d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (size_t u = 0; u <= t; u++) acc += ds[u] * k[u * W + d];
        dqkv[(b * T + t) * W + h * D + d] += s.scale * acc;
    }
}

// Block (b, kvh, u): dk_u += scale * sum_h sum_{t>=u} ds[t,u] q_t,  dv_u += sum_h sum_{t>=u}
// p[t,u] dout_t, over the query heads h of this KV head, in head then query order.
__global__ void attention_backward_kv_kernel(float *dqkv, const float *datt, const float *dout,
                                             const float *qkv, const float *att, AttnShape s) {
    size_t T = s.T, D = s.D, W = s.width;
    size_t u = blockIdx.x % T, bk = blockIdx.x / T, kvh = bk % s.KV, b = bk / s.KV;
    const float *xb = qkv + b * T * W;
    const float *dyb = dout + b * T * s.out_width;
    for (size_t d = threadIdx.x; d < D; d += blockDim.x) {
        float dk = 0.0f, dv = 0.0f;
        for (size_t h = kvh * s.group; h < (kvh + 1) * s.group; h++) {
            const float *ds = datt + (b * s.H + h) * T * T, *p = att + (b * s.H + h) * T * T;
            for (size_t t = u; t < T; t++) {
                dk += ds[t * T + u] * xb[t * W + h * D + d];
                dv += p[t * T + u] * dyb[t * s.out_width + h * D + d];
            }
        }
        float *row = dqkv + (b * T + u) * W;
        row[(s.H + kvh) * D + d] += s.scale * dk;
        row[(s.H + s.KV + kvh) * D + d] += dv;
    }
}

void cuda_attention_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor qkv, Tensor att,
                             size_t B, size_t T, size_t H, size_t KV, size_t D) {
    if (!dqkv.data) return;
    AttnShape s = attn_shape(T, H, KV, D);
    if (B * H * T == 0 || D == 0) return;
    attention_backward_q_kernel<<<(unsigned)(B * H * T), CUDA_THREADS, D * sizeof(float)>>>(
        DEV_R(dqkv), DEV_R(datt), DEV_R(dout), DEV_R(qkv), DEV_R(att), s);
    cudaCheckLaunch();
    attention_backward_kv_kernel<<<(unsigned)(B * KV * T), CUDA_THREADS>>>(
        DEV_R(dqkv), DEV_R(datt), DEV_R(dout), DEV_R(qkv), DEV_R(att), s);
    cudaCheckLaunch();
}
