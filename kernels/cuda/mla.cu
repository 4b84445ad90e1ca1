// mla.cu: multi-head latent attention's own ops (CUDA, fp32 storage): the attention input
// assembled with RoPE (YaRN) applied and its backward, and the decode-time attention over
// the latent cache in the absorbed form. The CPU file of the same name is the reference;
// the angles come from the same rope_math.h. One thread per output element, no atomics:
// the shared key's gradient sums the heads in order inside one thread.
#include "cuda_ops.cuh"
#include "../rope_math.h"

// Element i of a Dr-wide rotated part: the rotate-half rotation of x by t * inv_freq,
// times YaRN's factor; sign -1 is the transposed rotation.
__device__ static double mla_rot(const float *x, size_t i, size_t Dr, size_t t, RopeSpec r,
                                 double sign) {
    size_t half = Dr / 2, p = i % half;
    double a = (double)t * rope_inv_freq(&r, p, Dr), m = rope_cos_scale(&r);
    double c = m * cos(a), s = m * sign * sin(a), x1 = x[p], x2 = x[p + half];
    return i < half ? x1 * c - x2 * s : x2 * c + x1 * s;
}

__global__ void mla_qkv_forward_kernel(float *qkv, const float *q, const float *kv,
                                       const float *kpe, size_t N, size_t T, size_t H,
                                       size_t Dn, size_t Dr, size_t Dv, RopeSpec r) {
    size_t Dq = Dn + Dr, W = 2 * H * Dq + H * Dv;
    GRID_STRIDE(j, N * W) {
        size_t n = j / W, c = j % W, t = n % T;
        float y;
        if (c < 2 * H * Dq) {
            size_t key = c >= H * Dq, h = (c % (H * Dq)) / Dq, d = c % Dq;
            if (d < Dn)
                y = key ? kv[n * H * (Dn + Dv) + h * (Dn + Dv) + d]
                        : q[n * H * Dq + h * Dq + d];
            else
                y = (float)mla_rot(key ? kpe + n * Dr : q + n * H * Dq + h * Dq + Dn, d - Dn,
                                   Dr, t, r, 1.0);
        } else {
            size_t h = (c - 2 * H * Dq) / Dv, d = (c - 2 * H * Dq) % Dv;
            y = kv[n * H * (Dn + Dv) + h * (Dn + Dv) + Dn + d];
        }
        qkv[j] = y;
    }
}

__global__ void mla_dq_kernel(float *dq, const float *g, size_t N, size_t T, size_t H,
                              size_t Dn, size_t Dr, size_t Dv, RopeSpec r) {
    size_t Dq = Dn + Dr, W = 2 * H * Dq + H * Dv;
    GRID_STRIDE(j, N * H * Dq) {
        size_t n = j / (H * Dq), h = (j / Dq) % H, d = j % Dq;
        const float *gh = g + n * W + h * Dq;
        dq[j] += d < Dn ? gh[d] : (float)mla_rot(gh + Dn, d - Dn, Dr, n % T, r, -1.0);
    }
}

__global__ void mla_dkv_kernel(float *dkv, const float *g, size_t N, size_t H, size_t Dn,
                               size_t Dr, size_t Dv) {
    size_t Dq = Dn + Dr, Dkv = Dn + Dv, W = 2 * H * Dq + H * Dv;
    GRID_STRIDE(j, N * H * Dkv) {
        size_t n = j / (H * Dkv), h = (j / Dkv) % H, d = j % Dkv;
        const float *gn = g + n * W;
        dkv[j] += d < Dn ? gn[H * Dq + h * Dq + d] : gn[2 * H * Dq + h * Dv + d - Dn];
    }
}

__global__ void mla_dkpe_kernel(float *dkpe, const float *g, size_t N, size_t T, size_t H,
                                size_t Dn, size_t Dr, size_t Dv, RopeSpec r) {
    size_t Dq = Dn + Dr, W = 2 * H * Dq + H * Dv;
    GRID_STRIDE(j, N * Dr) {
        size_t n = j / Dr, i = j % Dr;
        double acc = dkpe[j];
        for (size_t h = 0; h < H; h++) // heads in order, as the CPU op
            acc =
                (float)(acc + mla_rot(g + n * W + H * Dq + h * Dq + Dn, i, Dr, n % T, r, -1.0));
        dkpe[j] = (float)acc;
    }
}

void cuda_mla_qkv_forward(Tensor qkv, Tensor q, Tensor kv, Tensor kpe, size_t B, size_t T,
                          size_t H, size_t Dn, size_t Dr, size_t Dv, RopeSpec rope) {
    CUDA_REQUIRE(Dr % 2 == 0 && Dr > 0, "MLA RoPE needs an even qk_rope_dim, not %zu", Dr);
    size_t n = B * T * (2 * H * (Dn + Dr) + H * Dv);
    if (n == 0) return;
    mla_qkv_forward_kernel<<<cuda_blocks(n), CUDA_THREADS>>>(
        DEV_R(qkv), DEV_R(q), DEV_R(kv), DEV_R(kpe), B * T, T, H, Dn, Dr, Dv, rope);
    cudaCheckLaunch();
}

void cuda_mla_qkv_backward(Tensor dq, Tensor dkv, Tensor dkpe, Tensor dqkv, size_t B, size_t T,
                           size_t H, size_t Dn, size_t Dr, size_t Dv, RopeSpec rope) {
    size_t N = B * T;
    if (N == 0) return;
    if (dq.data) {
        mla_dq_kernel<<<cuda_blocks(N * H * (Dn + Dr)), CUDA_THREADS>>>(
            DEV_R(dq), DEV_R(dqkv), N, T, H, Dn, Dr, Dv, rope);
        cudaCheckLaunch();
    }
    if (dkv.data) {
        mla_dkv_kernel<<<cuda_blocks(N * H * (Dn + Dv)), CUDA_THREADS>>>(
            DEV_R(dkv), DEV_R(dqkv), N, H, Dn, Dr, Dv);
        cudaCheckLaunch();
    }
    if (dkpe.data) {
        mla_dkpe_kernel<<<cuda_blocks(N * Dr), CUDA_THREADS>>>(DEV_R(dkpe), DEV_R(dqkv), N, T,
                                                               H, Dn, Dr, Dv, rope);
        cudaCheckLaunch();
    }
}

// Block b: rotates its query heads' rope parts in place, writes its latent and rotated
// k_pe into the caches at pos[b]. A position outside the cache raises the error flag.
__global__ void mla_append_kernel(float *q, float *cc, float *kc, const float *lat,
                                  const float *kpe, const int32_t *pos, size_t L, size_t H,
                                  size_t Dn, size_t Dr, size_t R, RopeSpec r, int *flag) {
    extern __shared__ float tmp[]; // (H*Dr) the rope parts before rotation
    size_t b = blockIdx.x, Dq = Dn + Dr, p = (size_t)pos[b];
    if (pos[b] < 0 || p >= L) {
        if (threadIdx.x == 0) cuda_flag(flag, CUDA_BAD_ROW);
        return;
    }
    float *qb = q + b * H * Dq;
    for (size_t j = threadIdx.x; j < H * Dr; j += blockDim.x)
        tmp[j] = qb[(j / Dr) * Dq + Dn + j % Dr];
    __syncthreads();
    for (size_t j = threadIdx.x; j < H * Dr; j += blockDim.x)
        qb[(j / Dr) * Dq + Dn + j % Dr] =
            (float)mla_rot(tmp + (j / Dr) * Dr, j % Dr, Dr, p, r, 1.0);
    for (size_t j = threadIdx.x; j < R; j += blockDim.x)
        cc[(b * L + p) * R + j] = lat[b * R + j];
    for (size_t j = threadIdx.x; j < Dr; j += blockDim.x)
        kc[(b * L + p) * Dr + j] = (float)mla_rot(kpe + b * Dr, j, Dr, p, r, 1.0);
}

// Block (b, h), absorbed: q_lat = q_nope W_uk (R), scores over 0..pos[b], softmax,
// o_lat = sum_u p_u c_u (R), out = W_uv o_lat (Dv). Shared: q_lat, o_lat (R each), scores.
__global__ void mla_attend_kernel(float *out, const float *q, const float *w, const float *cc,
                                  const float *kc, const int32_t *pos, size_t L, size_t H,
                                  size_t Dn, size_t Dr, size_t Dv, size_t R, float scale) {
    extern __shared__ float sh[]; // (R) q_lat, (R) o_lat, (L) scores
    float *ql = sh, *ol = sh + R, *sc = sh + 2 * R;
    size_t b = blockIdx.x / H, h = blockIdx.x % H, Dq = Dn + Dr, Dkv = Dn + Dv;
    size_t n = pos[b] < 0 || (size_t)pos[b] >= L ? 0 : (size_t)pos[b] + 1;
    const float *qh = q + b * H * Dq + h * Dq, *wh = w + h * Dkv * R;
    const float *c = cc + b * L * R, *k = kc + b * L * Dr;
    for (size_t j = threadIdx.x; j < R; j += blockDim.x) {
        float acc = 0.0f;
        for (size_t d = 0; d < Dn; d++)
            acc += qh[d] * wh[d * R + j];
        ql[j] = acc;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (size_t u = threadIdx.x; u < n; u += blockDim.x) {
        float dot = 0.0f;
        for (size_t j = 0; j < R; j++)
            dot += ql[j] * c[u * R + j];
        for (size_t d = 0; d < Dr; d++)
            dot += qh[Dn + d] * k[u * Dr + d];
        sc[u] = dot * scale;
        mx = fmaxf(mx, sc[u]);
    }
    double sum = cuda_block_exp_sum(sc, n, mx);
    __syncthreads();
    for (size_t j = threadIdx.x; j < R; j += blockDim.x) {
        double acc = 0.0;
        for (size_t u = 0; u < n; u++)
            acc += (double)sc[u] * c[u * R + j];
        ol[j] = (float)(acc / sum);
    }
    __syncthreads();
    for (size_t d = threadIdx.x; d < Dv; d += blockDim.x) {
        float acc = 0.0f;
        for (size_t j = 0; j < R; j++)
            acc += wh[(Dn + d) * R + j] * ol[j];
        out[(b * H + h) * Dv + d] = acc;
    }
}

void cuda_mla_decode_forward(Tensor out, Tensor q, Tensor latent, Tensor kpe, Tensor wkvb,
                             Tensor ccache, Tensor kcache, Tensor pos, size_t B, size_t L,
                             size_t H, size_t Dn, size_t Dr, size_t Dv, size_t R, RopeSpec rope,
                             double scale) {
    CUDA_REQUIRE(Dr % 2 == 0 && Dr > 0, "MLA RoPE needs an even qk_rope_dim, not %zu", Dr);
    size_t shared = (2 * R + L) * sizeof(float);
    CUDA_REQUIRE(shared <= 48 * 1024 && H * Dr * sizeof(float) <= 48 * 1024,
                 "MLA decode on CUDA keeps 2 kv_lora_rank + cached positions <= %zu values, "
                 "not %zu",
                 (size_t)(48 * 1024 / sizeof(float)), 2 * R + L);
    if (B == 0) return;
    mla_append_kernel<<<(unsigned)B, CUDA_THREADS, H * Dr * sizeof(float)>>>(
        DEV_R(q), DEV_R(ccache), DEV_R(kcache), DEV_R(latent), DEV_R(kpe), DEV_I(pos), L, H, Dn,
        Dr, R, rope, cuda_error_flag());
    cudaCheckLaunch();
    mla_attend_kernel<<<(unsigned)(B * H), CUDA_THREADS, shared>>>(
        DEV_R(out), DEV_R(q), DEV_R(wkvb), DEV_R(ccache), DEV_R(kcache), DEV_I(pos), L, H, Dn,
        Dr, Dv, R, (float)scale);
    cudaCheckLaunch();
}
