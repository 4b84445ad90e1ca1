// test_cuda_ops.c: every CUDA op against the CPU op of the same name, on random inputs,
// forward and backward (build/tests/cuda_ops; tests/test_cuda.py runs it under pytest).
//
// Both backends get the same inputs; backward gradients start from the same random values
// so the accumulate (+=) rule is checked too, and some cases pass NULL gradients. Float
// outputs must agree within |gpu - cpu| <= rtol * (|cpu| + max|cpu|) over the buffer;
// integer outputs (indices, keep masks, offsets, counts) must be identical. rtol is 1e-5
// (fp32) unless a case says otherwise. A few ops are also run twice on the GPU and must
// give the same bits (the deterministic reductions).
//
//   cuda_ops              run every case; exit 0 when all pass
//   cuda_ops --list       the case names
//   cuda_ops --only NAME  one case
// Without a usable GPU it prints "SKIP: no CUDA device (<reason>)" and exits 77.
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/backend.h"
#include "../../kernels/cuda/backend_cuda.h"
#include "../../base/rng.h"

#define EXIT_SKIP 77
#define RTOL 1e-5

static const Backend *cpu, *gpu;
static Rng rng;
static int case_failures;

// ---- paired buffers: the same contents on the CPU and on the GPU ----------------------

typedef struct {
    Tensor c, g;   // CPU and GPU views; data NULL on both for "not wanted"
    size_t n;
} Pair;

#define MAX_LIVE 256
static void *live_cpu[MAX_LIVE], *live_gpu[MAX_LIVE];
static int n_live;

static Pair pair_new(size_t n, DType dt) {
    if (n_live == MAX_LIVE) {
        fprintf(stderr, "test_cuda_ops: too many live buffers\n");
        exit(2);
    }
    size_t bytes = (n ? n : 1) * 4;
    Pair p = {{cpu->alloc(bytes), dt, DEVICE_CPU, n}, {gpu->alloc(bytes), dt, DEVICE_CUDA, n}, n};
    if (!p.c.data || !p.g.data) {
        fprintf(stderr, "test_cuda_ops: out of memory for %zu elements\n", n);
        exit(2);
    }
    live_cpu[n_live] = p.c.data;
    live_gpu[n_live++] = p.g.data;
    return p;
}

static void free_all(void) {
    for (int i = 0; i < n_live; i++) {
        cpu->release(live_cpu[i]);
        gpu->release(live_gpu[i]);
    }
    n_live = 0;
}

static Pair none(void) {
    Pair p = {tensor_none(), tensor_none(), 0};
    p.g.device = DEVICE_CUDA;
    return p;
}

static void pair_set(Pair p, const void *host) {
    memcpy(p.c.data, host, p.n * 4);
    gpu->upload(p.g, host, p.n * 4);
}

// Normal values times scale.
static Pair reals(size_t n, double scale) {
    Pair p = pair_new(n, DTYPE_F32);
    float *h = malloc((n ? n : 1) * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = (float)(scale * rng_normal(&rng));
    pair_set(p, h);
    free(h);
    return p;
}

// Uniform in [lo, hi).
static Pair uniform(size_t n, double lo, double hi) {
    Pair p = pair_new(n, DTYPE_F32);
    float *h = malloc((n ? n : 1) * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = (float)(lo + (hi - lo) * rng_uniform(&rng));
    pair_set(p, h);
    free(h);
    return p;
}

// Integers 0..levels-1 scaled by step: many exact ties.
static Pair ties(size_t n, int levels, double step) {
    Pair p = pair_new(n, DTYPE_F32);
    float *h = malloc((n ? n : 1) * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = (float)(step * (double)(rng_next(&rng) % (uint64_t)levels));
    pair_set(p, h);
    free(h);
    return p;
}

static Pair ints(const int32_t *v, size_t n) {
    Pair p = pair_new(n, DTYPE_I32);
    pair_set(p, v);
    return p;
}

static Pair rand_ints(size_t n, int32_t below) {
    int32_t *h = malloc((n ? n : 1) * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = (int32_t)(rng_next(&rng) % (uint64_t)below);
    Pair p = ints(h, n);
    free(h);
    return p;
}

static Pair zeros(size_t n, DType dt) { return pair_new(n, dt); }

// ---- comparisons ------------------------------------------------------------------------

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("    mismatch: ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    case_failures++;
}

static float *gpu_copy(Pair p, size_t n) {
    float *h = malloc((n ? n : 1) * 4);
    gpu->download(h, p.g, n * 4);
    return h;
}

// The first n floats of p agree within rtol * (|cpu| + max|cpu|).
static void close_n(const char *what, Pair p, size_t n, double rtol) {
    float *g = gpu_copy(p, n);
    const float *c = (const float *)p.c.data;
    double mx = 0.0;
    for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs(c[i]));
    size_t bad = 0, worst = 0;
    double worst_err = 0.0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)g[i] - c[i]);
        if (!(err <= rtol * (fabs(c[i]) + mx))) {   // NaN fails too
            if (bad == 0 || !(err <= worst_err)) {
                worst = i;
                worst_err = err;
            }
            bad++;
        }
    }
    if (bad)
        fail("%s: %zu of %zu differ beyond rtol %.0e (max|cpu| %.3g); worst [%zu] cpu %.9g gpu "
             "%.9g",
             what, bad, n, rtol, mx, worst, c[worst], g[worst]);
    free(g);
}

static void close_all(const char *what, Pair p, double rtol) { close_n(what, p, p.n, rtol); }

static void same_ints_n(const char *what, Pair p, size_t n) {
    int32_t *g = (int32_t *)gpu_copy(p, n);
    const int32_t *c = (const int32_t *)p.c.data;
    for (size_t i = 0; i < n; i++)
        if (g[i] != c[i]) {
            fail("%s: [%zu] cpu %d gpu %d", what, i, (int)c[i], (int)g[i]);
            break;
        }
    free(g);
}

static void same_ints(const char *what, Pair p) { same_ints_n(what, p, p.n); }

// Two GPU results that must be bit-identical.
static void same_bits(const char *what, const float *a, const float *b, size_t n) {
    if (memcmp(a, b, n * sizeof *a) != 0) fail("%s: two GPU runs differ", what);
}

static int32_t *host_ints(Pair p) { return (int32_t *)p.c.data; }

// Uploads the CPU side of p to its GPU side: inputs built by CPU ops (routing plans), so
// the op under test sees the same inputs even if an earlier GPU op differed.
static void to_gpu(Pair p) { gpu->upload(p.g, p.c.data, p.n * 4); }

// ---- cases --------------------------------------------------------------------------------

static void case_memory(void) {
    size_t n = 1000;
    Pair p = zeros(n, DTYPE_F32);
    if ((uintptr_t)p.g.data % 256 != 0) fail("alloc: %p is not 256-byte aligned", p.g.data);
    float *h = gpu_copy(p, n);
    for (size_t i = 0; i < n; i++)
        if (h[i] != 0.0f) {
            fail("alloc: not zeroed at %zu", i);
            break;
        }
    free(h);
    Pair q = reals(n, 1.0);
    close_all("upload/download", q, 0.0);
    gpu->zero(q.g, n / 2);
    cpu->zero(q.c, n / 2);
    close_all("zero", q, 0.0);
    Pair s = reals(n, 1.0);   // upload into a slice
    float part[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    memcpy((float *)s.c.data + 100, part, sizeof part);
    gpu->upload(tensor_slice(s.g, 100, 10), part, sizeof part);
    close_all("upload into a slice", s, 0.0);
}

// Every entry of the table is set: an op added to kernels.h without a CUDA version fails here.
static void case_table_complete(void) {
    const char *first = (const char *)&gpu->alloc, *end = (const char *)(gpu + 1);
    for (const char *at = first; at + sizeof(void (*)(void)) <= end; at += sizeof(void (*)(void))) {
        void (*fn)(void);
        memcpy(&fn, at, sizeof fn);
        if (!fn) fail("Backend entry at byte %zu is NULL", (size_t)(at - (const char *)gpu));
    }
    if (gpu->device != DEVICE_CUDA) fail("device is not DEVICE_CUDA");
}

static void case_add_mul(void) {
    size_t n = 1237;
    Pair a = reals(n, 1), b = reals(n, 1), u = uniform(n, 0.9, 1.1), out = zeros(n, DTYPE_F32);
    cpu->add_forward(out.c, a.c, b.c, n);
    gpu->add_forward(out.g, a.g, b.g, n);
    close_all("add out", out, RTOL);
    Pair da = reals(n, 1), dout = reals(n, 1), nb = none();
    cpu->add_backward(da.c, nb.c, dout.c, n);
    gpu->add_backward(da.g, nb.g, dout.g, n);
    close_all("add da (db NULL)", da, RTOL);
    cpu->mul_forward(out.c, a.c, u.c, n);
    gpu->mul_forward(out.g, a.g, u.g, n);
    close_all("mul out", out, RTOL);
    cpu->mul_backward(da.c, dout.c, u.c, n);
    gpu->mul_backward(da.g, dout.g, u.g, n);
    close_all("mul dx", da, RTOL);
}

static void case_embedding(void) {
    size_t V = 7, N = 53, C = 19;
    Pair tab = reals(V * C, 1), tok = rand_ints(N, (int32_t)V), out = zeros(N * C, DTYPE_F32);
    cpu->embedding_forward(out.c, tok.c, tab.c, N, C);
    gpu->embedding_forward(out.g, tok.g, tab.g, N, C);
    close_all("embedding out", out, 0.0);
    Pair dtab = reals(V * C, 1), dout = reals(N * C, 1);
    float *before = gpu_copy(dtab, V * C);
    cpu->embedding_backward(dtab.c, dout.c, tok.c, N, C);
    gpu->embedding_backward(dtab.g, dout.g, tok.g, N, C);
    close_all("embedding dtable (repeated tokens)", dtab, RTOL);
    // determinism: the same backward again from the same start gives the same bits
    float *first = gpu_copy(dtab, V * C);
    gpu->upload(dtab.g, before, V * C * 4);
    gpu->embedding_backward(dtab.g, dout.g, tok.g, N, C);
    float *second = gpu_copy(dtab, V * C);
    same_bits("embedding dtable", first, second, V * C);
    free(before);
    free(first);
    free(second);
}

static void case_rmsnorm(void) {
    size_t N = 17, C = 300;
    Pair x = reals(N * C, 2), w = uniform(C, 0.5, 1.5), out = zeros(N * C, DTYPE_F32),
         rstd = zeros(N, DTYPE_F32);
    cpu->rmsnorm_forward(out.c, rstd.c, x.c, w.c, N, C, 1e-5);
    gpu->rmsnorm_forward(out.g, rstd.g, x.g, w.g, N, C, 1e-5);
    close_all("rmsnorm out", out, RTOL);
    close_all("rmsnorm rstd", rstd, RTOL);
    Pair dx = reals(N * C, 1), dw = reals(C, 1), dout = reals(N * C, 1);
    cpu->rmsnorm_backward(dx.c, dw.c, dout.c, x.c, w.c, rstd.c, N, C);
    gpu->rmsnorm_backward(dx.g, dw.g, dout.g, x.g, w.g, rstd.g, N, C);
    close_all("rmsnorm dx", dx, RTOL);
    close_all("rmsnorm dw", dw, RTOL);
    Pair nw = none();
    cpu->rmsnorm_backward(dx.c, nw.c, dout.c, x.c, w.c, rstd.c, N, C);
    gpu->rmsnorm_backward(dx.g, nw.g, dout.g, x.g, w.g, rstd.g, N, C);
    close_all("rmsnorm dx (dw NULL)", dx, RTOL);
}

// Both QK-norm layouts (per head: Qwen3-MoE; whole projection: OLMoE).
static void case_qk_norm(void) {
    size_t N = 19, H = 6, KV = 2, D = 16, W = (H + 2 * KV) * D;
    for (int per_head = 0; per_head < 2; per_head++) {
        size_t G = per_head ? H + KV : 2, nq = per_head ? D : H * D, nk = per_head ? D : KV * D;
        Pair x = reals(N * W, 2), wq = uniform(nq, 0.5, 1.5), wk = uniform(nk, 0.5, 1.5);
        Pair out = zeros(N * W, DTYPE_F32), rstd = zeros(N * G, DTYPE_F32);
        cpu->qk_norm_forward(out.c, rstd.c, x.c, wq.c, wk.c, N, H, KV, D, per_head, 1e-6);
        gpu->qk_norm_forward(out.g, rstd.g, x.g, wq.g, wk.g, N, H, KV, D, per_head, 1e-6);
        close_all("qk_norm out", out, RTOL);
        close_all("qk_norm rstd", rstd, RTOL);
        Pair dx = reals(N * W, 1), dwq = reals(nq, 1), dwk = reals(nk, 1);
        Pair dout = reals(N * W, 1), nw = none();
        cpu->qk_norm_backward(dx.c, dwq.c, dwk.c, dout.c, x.c, wq.c, wk.c, rstd.c, N, H, KV, D,
                              per_head);
        gpu->qk_norm_backward(dx.g, dwq.g, dwk.g, dout.g, x.g, wq.g, wk.g, rstd.g, N, H, KV, D,
                              per_head);
        close_all("qk_norm dqkv", dx, RTOL);
        close_all("qk_norm dwq", dwq, RTOL);
        close_all("qk_norm dwk", dwk, RTOL);
        cpu->qk_norm_backward(dx.c, nw.c, nw.c, dout.c, x.c, wq.c, wk.c, rstd.c, N, H, KV, D,
                              per_head);
        gpu->qk_norm_backward(dx.g, nw.g, nw.g, dout.g, x.g, wq.g, wk.g, rstd.g, N, H, KV, D,
                              per_head);
        close_all("qk_norm dqkv (weights NULL)", dx, RTOL);
    }
}

static void case_bias_gated_add(void) {
    size_t N = 37, M = 53;
    Pair x = reals(N * M, 1), b = reals(M, 1), out = zeros(N * M, DTYPE_F32);
    cpu->bias_add_forward(out.c, x.c, b.c, N, M);
    gpu->bias_add_forward(out.g, x.g, b.g, N, M);
    close_all("bias_add out", out, RTOL);
    Pair dx = reals(N * M, 1), db = reals(M, 1), dout = reals(N * M, 1);
    cpu->bias_add_backward(dx.c, db.c, dout.c, N, M);
    gpu->bias_add_backward(dx.g, db.g, dout.g, N, M);
    close_all("bias_add dx", dx, RTOL);
    close_all("bias_add db", db, RTOL);
    Pair s = reals(N * M, 1), g = reals(N, 3), a = reals(N * M, 1);
    cpu->gated_add_forward(out.c, a.c, s.c, g.c, N, M);
    gpu->gated_add_forward(out.g, a.g, s.g, g.g, N, M);
    close_all("gated_add out", out, RTOL);
    Pair da = reals(N * M, 1), ds = reals(N * M, 1), dg = reals(N, 1);
    cpu->gated_add_backward(da.c, ds.c, dg.c, dout.c, s.c, g.c, N, M);
    gpu->gated_add_backward(da.g, ds.g, dg.g, dout.g, s.g, g.g, N, M);
    close_all("gated_add da", da, RTOL);
    close_all("gated_add ds", ds, RTOL);
    close_all("gated_add dg", dg, RTOL);
}

static void case_matmul(void) {
    size_t N = 37, K = 29, M = 41;
    Pair x = reals(N * K, 1), w = reals(M * K, 0.2), out = zeros(N * M, DTYPE_F32);
    cpu->matmul_forward(out.c, x.c, w.c, N, K, M);
    gpu->matmul_forward(out.g, x.g, w.g, N, K, M);
    close_all("matmul out", out, RTOL);
    Pair dx = reals(N * K, 1), dw = reals(M * K, 1), dout = reals(N * M, 1), nx = none();
    cpu->matmul_backward(dx.c, dw.c, dout.c, x.c, w.c, N, K, M);
    gpu->matmul_backward(dx.g, dw.g, dout.g, x.g, w.g, N, K, M);
    close_all("matmul dx", dx, RTOL);
    close_all("matmul dw", dw, RTOL);
    cpu->matmul_backward(nx.c, dw.c, dout.c, x.c, w.c, N, K, M);
    gpu->matmul_backward(nx.g, dw.g, dout.g, x.g, w.g, N, K, M);
    close_all("matmul dw (dx NULL)", dw, RTOL);
}

// x rounded to the nearest bfloat16, ties to even (finite x).
static float bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, sizeof x);
    return x;
}

// Normal values times scale; the CPU side holds them rounded to bf16, the GPU side as
// they are, for the GPU's bf16 products to round itself.
static Pair reals_bf16(size_t n, double scale) {
    Pair p = reals(n, scale);
    float *c = (float *)p.c.data;
    for (size_t i = 0; i < n; i++) c[i] = bf16_round(c[i]);
    return p;
}

// bf16 products: bf16 x bf16 products are exact in fp32, so the CPU's fp32 product of the
// rounded operands differs from cuBLAS's only in the order of the fp32 sums.
static void case_matmul_bf16(void) {
    size_t N = 67, K = 129, M = 45;
    gpu->set_gemm_bf16(1);
    Pair x = reals_bf16(N * K, 1), w = reals_bf16(M * K, 0.2), out = zeros(N * M, DTYPE_F32);
    cpu->matmul_forward(out.c, x.c, w.c, N, K, M);
    gpu->matmul_forward(out.g, x.g, w.g, N, K, M);
    close_all("bf16 matmul out", out, 1e-5);
    Pair dx = reals(N * K, 1), dw = reals(M * K, 1), dout = reals_bf16(N * M, 1);
    cpu->matmul_backward(dx.c, dw.c, dout.c, x.c, w.c, N, K, M);
    gpu->matmul_backward(dx.g, dw.g, dout.g, x.g, w.g, N, K, M);
    close_all("bf16 matmul dx", dx, 1e-5);
    close_all("bf16 matmul dw", dw, 1e-5);
    gpu->set_gemm_bf16(0);   // and back to plain fp32 products
    Pair x2 = reals(N * K, 1), w2 = reals(M * K, 0.2), out2 = zeros(N * M, DTYPE_F32);
    cpu->matmul_forward(out2.c, x2.c, w2.c, N, K, M);
    gpu->matmul_forward(out2.g, x2.g, w2.g, N, K, M);
    close_all("matmul out after bf16 off", out2, RTOL);
}

static void case_rope(void) {
    size_t B = 2, T = 11, H = 4, KV = 2, D = 8, W = (H + 2 * KV) * D;
    Pair qkv = reals(B * T * W, 1);
    cpu->rope_forward(qkv.c, B, T, H, KV, D, 10000.0);
    gpu->rope_forward(qkv.g, B, T, H, KV, D, 10000.0);
    close_all("rope qkv", qkv, RTOL);
    Pair d = reals(B * T * W, 1);
    cpu->rope_backward(d.c, B, T, H, KV, D, 500.0);
    gpu->rope_backward(d.g, B, T, H, KV, D, 500.0);
    close_all("rope dqkv", d, RTOL);
}

static void attention_case(size_t B, size_t T, size_t H, size_t KV, size_t D) {
    size_t W = (H + 2 * KV) * D;
    Pair qkv = reals(B * T * W, 1), out = zeros(B * T * H * D, DTYPE_F32),
         att = zeros(B * H * T * T, DTYPE_F32);
    cpu->attention_forward(out.c, att.c, qkv.c, B, T, H, KV, D);
    gpu->attention_forward(out.g, att.g, qkv.g, B, T, H, KV, D);
    // att is each side's own state (the GPU's plain kernels keep probabilities, the CPU a
    // logsumexp per query): out and dqkv compare the two.
    close_all("attention out", out, RTOL);
    Pair dqkv = reals(B * T * W, 1), datt = zeros(B * H * T * T, DTYPE_F32),
         dout = reals(B * T * H * D, 1);
    float *before = gpu_copy(dqkv, dqkv.n);
    cpu->attention_backward(dqkv.c, datt.c, dout.c, out.c, qkv.c, att.c, B, T, H, KV, D);
    gpu->attention_backward(dqkv.g, datt.g, dout.g, out.g, qkv.g, att.g, B, T, H, KV, D);
    // long float sums over T keys and the group's heads, in different orders
    close_all("attention dqkv", dqkv, 2e-5);
    float *first = gpu_copy(dqkv, dqkv.n);
    gpu->upload(dqkv.g, before, dqkv.n * 4);
    gpu->attention_backward(dqkv.g, datt.g, dout.g, out.g, qkv.g, att.g, B, T, H, KV, D);
    float *second = gpu_copy(dqkv, dqkv.n);
    same_bits("attention dqkv", first, second, dqkv.n);
    free(before);
    free(first);
    free(second);
}

// Generation: one row per sequence at positions 0, 4 and 9 of a cache of 10 whose other
// positions hold earlier keys and values; the row's rotation, the cache's writes and out.
static void case_attention_decode(void) {
    size_t B = 3, L = 10, H = 4, KV = 2, D = 8, W = (H + 2 * KV) * D;
    int32_t at[3] = {0, 4, 9};
    Pair qkv = reals(B * W, 1), kc = reals(B * L * KV * D, 1), vc = reals(B * L * KV * D, 1),
         pos = ints(at, B), out = zeros(B * H * D, DTYPE_F32);
    cpu->attention_decode_forward(out.c, qkv.c, kc.c, vc.c, pos.c, B, L, H, KV, D, 1e4);
    gpu->attention_decode_forward(out.g, qkv.g, kc.g, vc.g, pos.g, B, L, H, KV, D, 1e4);
    close_all("attention_decode qkv", qkv, RTOL);
    close_all("attention_decode kcache", kc, RTOL);
    close_all("attention_decode vcache", vc, RTOL);
    close_all("attention_decode out", out, RTOL);
}

// Multi-head latent attention: the attention input assembled with RoPE (plain and YaRN),
// its backward (accumulating into random gradients), attention with Dk != Dv and a scale,
// and the absorbed decode over the latent cache at positions 0, 4 and 9.
static const RopeSpec MLA_YARN = {1e4, 1, 40.0, 64, 32, 1, 0.707, 0.707};

static void mla_qkv_case(RopeSpec rope) {
    size_t B = 2, T = 9, H = 3, Dn = 5, Dr = 8, Dv = 4, N = B * T;
    size_t W = 2 * H * (Dn + Dr) + H * Dv;
    Pair q = reals(N * H * (Dn + Dr), 1), kv = reals(N * H * (Dn + Dv), 1), kpe = reals(N * Dr, 1);
    Pair qkv = zeros(N * W, DTYPE_F32);
    cpu->mla_qkv_forward(qkv.c, q.c, kv.c, kpe.c, B, T, H, Dn, Dr, Dv, rope);
    gpu->mla_qkv_forward(qkv.g, q.g, kv.g, kpe.g, B, T, H, Dn, Dr, Dv, rope);
    close_all("mla_qkv qkv", qkv, RTOL);
    Pair g = reals(N * W, 1), dq = reals(q.n, 1), dkv = reals(kv.n, 1), dk = reals(kpe.n, 1);
    cpu->mla_qkv_backward(dq.c, dkv.c, dk.c, g.c, B, T, H, Dn, Dr, Dv, rope);
    gpu->mla_qkv_backward(dq.g, dkv.g, dk.g, g.g, B, T, H, Dn, Dr, Dv, rope);
    close_all("mla_qkv dq", dq, RTOL);
    close_all("mla_qkv dkv", dkv, RTOL);
    close_all("mla_qkv dkpe", dk, RTOL);
}

static void attention_mla_case(size_t B, size_t T, size_t H, size_t Dk, size_t Dv) {
    size_t W = 2 * H * Dk + H * Dv;
    double scale = 0.3;
    Pair qkv = reals(B * T * W, 1), out = zeros(B * T * H * Dv, DTYPE_F32),
         att = zeros(B * H * T * T, DTYPE_F32);
    cpu->attention_mla_forward(out.c, att.c, qkv.c, B, T, H, H, Dk, Dv, scale);
    gpu->attention_mla_forward(out.g, att.g, qkv.g, B, T, H, H, Dk, Dv, scale);
    close_all("attention_mla out", out, RTOL);
    Pair dqkv = reals(B * T * W, 1), datt = zeros(B * H * T * T, DTYPE_F32),
         dout = reals(B * T * H * Dv, 1);
    cpu->attention_mla_backward(dqkv.c, datt.c, dout.c, out.c, qkv.c, att.c, B, T, H, H, Dk,
                                Dv, scale);
    gpu->attention_mla_backward(dqkv.g, datt.g, dout.g, out.g, qkv.g, att.g, B, T, H, H, Dk,
                                Dv, scale);
    close_all("attention_mla dqkv", dqkv, 2e-5);
}

static void case_mla(void) {
    RopeSpec plain = {1e4, 0, 1, 4096, 32, 1, 1, 0};
    mla_qkv_case(plain);
    mla_qkv_case(MLA_YARN);
    attention_mla_case(2, 13, 3, 12, 5);
    attention_mla_case(1, 70, 2, 6, 9);
    size_t B = 3, L = 10, H = 3, Dn = 5, Dr = 8, Dv = 4, R = 12, Dq = Dn + Dr;
    int32_t at[3] = {0, 4, 9};
    Pair q = reals(B * H * Dq, 1), lat = reals(B * R, 1), kpe = reals(B * Dr, 1),
         w = reals(H * (Dn + Dv) * R, 0.5), cc = reals(B * L * R, 1), kc = reals(B * L * Dr, 1),
         pos = ints(at, B), out = zeros(B * H * Dv, DTYPE_F32);
    cpu->mla_decode_forward(out.c, q.c, lat.c, kpe.c, w.c, cc.c, kc.c, pos.c, B, L, H, Dn, Dr,
                            Dv, R, MLA_YARN, 0.25);
    gpu->mla_decode_forward(out.g, q.g, lat.g, kpe.g, w.g, cc.g, kc.g, pos.g, B, L, H, Dn, Dr,
                            Dv, R, MLA_YARN, 0.25);
    close_all("mla_decode q", q, RTOL);
    close_all("mla_decode latent cache", cc, RTOL);
    close_all("mla_decode k_pe cache", kc, RTOL);
    close_all("mla_decode out", out, 1e-4);
}

static void case_attention(void) {
    attention_case(2, 13, 4, 2, 8);
    attention_case(1, 70, 2, 2, 16);   // T beyond the CPU's 64-row blocks; no grouping
    attention_case(2, 5, 3, 1, 4);     // three query heads on one KV head
}

// Host logsumexp of each query's scaled causal scores: what cuDNN keeps as statistics.
static void attention_lse(float *lse, const float *qkv, size_t B, size_t T, size_t H,
                          size_t KV, size_t D) {
    size_t W = (H + 2 * KV) * D;
    double scale = 1.0 / sqrt((double)D), *s = malloc(T * sizeof *s);
    for (size_t b = 0; b < B; b++)
        for (size_t h = 0; h < H; h++)
            for (size_t t = 0; t < T; t++) {
                const float *q = qkv + (b * T + t) * W + h * D;
                double mx = -INFINITY, sum = 0.0;
                for (size_t u = 0; u <= t; u++) {
                    const float *k = qkv + (b * T + u) * W + (H + h / (H / KV)) * D;
                    double dot = 0.0;
                    for (size_t d = 0; d < D; d++) dot += (double)q[d] * k[d];
                    s[u] = scale * dot;
                    mx = s[u] > mx ? s[u] : mx;
                }
                for (size_t u = 0; u <= t; u++) sum += exp(s[u] - mx);
                lse[(b * H + h) * T + t] = (float)(mx + log(sum));
            }
    free(s);
}

// The reasons that mean "no cuDNN here" rather than "our cuDNN graph is wrong".
static int cudnn_absent(const char *why) {
    return strstr(why, "cannot be loaded") || strstr(why, "no cuDNN frontend headers");
}

// cuDNN's fused attention (bf16 products). qkv and dout are bf16 values on both sides; the
// CPU computes in fp32 from them. cuDNN rounds the probabilities to bf16 for P V (and dP,
// dS for the backward's products) and its outputs to bf16: 2^-9 relative each, summed
// over up to T keys with weights that sum to one, so 1e-2 on out and on the statistics,
// and 2e-2 on dqkv, whose products chain two such roundings.
static void fused_attention_case(size_t B, size_t T, size_t H, size_t KV, size_t D) {
    char why[512];
    if (!backend_cuda_fused_attention(B, T, H, KV, D, why, sizeof why)) {
        if (cudnn_absent(why)) printf("  fused attention not checked: %s\n", why);
        else fail("fused attention B=%zu T=%zu H=%zu KV=%zu D=%zu: cuDNN refused: %s", B, T,
                  H, KV, D, why);
        return;
    }
    size_t W = (H + 2 * KV) * D, bhtt = B * H * T * T, att_n = 0, datt_n = 1;
    gpu->attention_plan(&att_n, &datt_n, B, T, H, KV, D, 1);
    if (att_n != B * H * T || datt_n != 0)
        fail("fused attention plans %zu state and %zu scratch values, not %zu and 0", att_n,
             datt_n, B * H * T);
    gpu->set_gemm_bf16(1);
    Pair qkv = reals_bf16(B * T * W, 1), out = zeros(B * T * H * D, DTYPE_F32);
    Pair probs = zeros(bhtt, DTYPE_F32), stats = zeros(B * H * T, DTYPE_F32);
    cpu->attention_forward(out.c, probs.c, qkv.c, B, T, H, KV, D);
    gpu->attention_forward(out.g, stats.g, qkv.g, B, T, H, KV, D);
    close_all("fused attention out", out, 1e-2);
    attention_lse((float *)stats.c.data, (const float *)qkv.c.data, B, T, H, KV, D);
    close_all("fused attention statistics", stats, 1e-2);
    Pair dqkv = reals(B * T * W, 1), datt = zeros(bhtt, DTYPE_F32),
         dout = reals_bf16(B * T * H * D, 1);
    float *before = gpu_copy(dqkv, dqkv.n);
    cpu->attention_backward(dqkv.c, datt.c, dout.c, out.c, qkv.c, probs.c, B, T, H, KV, D);
    gpu->attention_backward(dqkv.g, none().g, dout.g, out.g, qkv.g, stats.g, B, T, H, KV, D);
    close_all("fused attention dqkv", dqkv, 2e-2);
    float *first = gpu_copy(dqkv, dqkv.n);
    gpu->upload(dqkv.g, before, dqkv.n * 4);
    gpu->attention_backward(dqkv.g, none().g, dout.g, out.g, qkv.g, stats.g, B, T, H, KV, D);
    float *second = gpu_copy(dqkv, dqkv.n);
    same_bits("fused attention dqkv (deterministic backward)", first, second, dqkv.n);
    gpu->set_gemm_bf16(0);
    free(before);
    free(first);
    free(second);
}

static void case_attention_fused(void) {
    fused_attention_case(2, 64, 4, 2, 64);    // GQA, head size 64
    fused_attention_case(1, 100, 2, 2, 32);   // T not a multiple of the kernel's tiles
    fused_attention_case(2, 17, 8, 1, 128);   // one KV head for eight query heads
}

static void case_swiglu(void) {
    size_t N = 23, F = 37;
    Pair h13 = reals(N * 2 * F, 2), out = zeros(N * F, DTYPE_F32);
    cpu->swiglu_forward(out.c, h13.c, N, F);
    gpu->swiglu_forward(out.g, h13.g, N, F);
    close_all("swiglu out", out, RTOL);
    Pair dh = reals(N * 2 * F, 1), dout = reals(N * F, 1);
    cpu->swiglu_backward(dh.c, dout.c, h13.c, N, F);
    gpu->swiglu_backward(dh.g, dout.g, h13.g, N, F);
    close_all("swiglu dh13", dh, RTOL);
}

static void case_experts(void) {
    // Five experts, two of them empty; rows buffers larger than the routed rows.
    size_t E = 5, C = 16, F = 12, cap = 20;
    int32_t off[] = {0, 3, 3, 10, 10, 14};
    size_t M = 14;
    uint8_t train[] = {1, 1, 0, 1, 1};
    Pair offsets = ints(off, E + 1), w = reals(E * 3 * F * C, 0.25), xp = reals(cap * C, 1);
    Pair yp = zeros(cap * C, DTYPE_F32), h13 = zeros(cap * 2 * F, DTYPE_F32),
         act = zeros(cap * F, DTYPE_F32);
    cpu->experts_forward(yp.c, h13.c, act.c, xp.c, (ExpertRoute){0}, w.c, offsets.c,
                         E, C, F);
    gpu->experts_forward(yp.g, h13.g, act.g, xp.g, (ExpertRoute){0}, w.g, offsets.g,
                         E, C, F);
    close_n("experts yp", yp, M * C, RTOL);
    close_n("experts h13", h13, M * 2 * F, RTOL);
    close_n("experts act", act, M * F, RTOL);
    Pair dxp = reals(cap * C, 1), dw = reals(E * 3 * F * C, 1), dyp = reals(cap * C, 1);
    Pair dh13 = zeros(cap * 2 * F, DTYPE_F32), dact = zeros(cap * F, DTYPE_F32);
    cpu->experts_backward(dxp.c, dw.c, train, dyp.c, dh13.c, dact.c, h13.c, act.c, xp.c,
                          (ExpertRoute){0}, w.c, offsets.c, E, C, F);
    gpu->experts_backward(dxp.g, dw.g, train, dyp.g, dh13.g, dact.g, h13.g, act.g, xp.g,
                          (ExpertRoute){0}, w.g, offsets.g, E, C, F);
    close_n("experts dxp", dxp, M * C, RTOL);
    close_all("experts dw (expert 2 frozen)", dw, RTOL);
    Pair nx = none();
    cpu->experts_backward(nx.c, dw.c, NULL, dyp.c, dh13.c, dact.c, h13.c, act.c, xp.c,
                          (ExpertRoute){0}, w.c, offsets.c, E, C, F);
    gpu->experts_backward(nx.g, dw.g, NULL, dyp.g, dh13.g, dact.g, h13.g, act.g, xp.g,
                          (ExpertRoute){0}, w.g, offsets.g, E, C, F);
    close_all("experts dw (dxp NULL)", dw, RTOL);
}

// The dispatch fused in (ExpertRoute: x[rows], gates times dy, the gates' gradient): the
// GPU gathers into xp and scatters into dyp first, the CPU reads the tokens in place;
// both as the CPU's unfused op on the gathered rows. Four tokens for 7 rows, top-2,
// token 3's second choice dropped.
static void case_experts_fused(void) {
    size_t E = 3, C = 16, F = 12, N = 4, k = 2, M = 7;
    int32_t off[] = {0, 3, 3, 7}, rows[] = {0, 1, 2, 0, 1, 2, 3};
    int32_t slot[] = {0, 3, 1, 4, 2, 5, 6, -1};
    Pair offsets = ints(off, E + 1), w = reals(E * 3 * F * C, 0.25), x = reals(N * C, 1);
    Pair rw = ints(rows, M), sl = ints(slot, N * k), gates = reals(N * k, 1);
    Pair dy = reals(N * C, 1), xp = zeros(M * C, DTYPE_F32);
    Pair yp = zeros(M * C, DTYPE_F32), h13 = zeros(M * 2 * F, DTYPE_F32),
         act = zeros(M * F, DTYPE_F32);
    ExpertRoute rc = {x.c, rw.c, tensor_none(), tensor_none(), tensor_none(), k,
                      tensor_none(), tensor_none()};
    ExpertRoute rg = {x.g, rw.g, none().g, none().g, none().g, k, none().g, none().g};
    cpu->experts_forward(yp.c, h13.c, act.c, xp.c, rc, w.c, offsets.c, E, C, F);
    gpu->experts_forward(yp.g, h13.g, act.g, xp.g, rg, w.g, offsets.g, E, C, F);
    close_all("fused experts yp", yp, RTOL);
    Pair dxp = zeros(M * C, DTYPE_F32), dw = zeros(E * 3 * F * C, DTYPE_F32),
         dyp = zeros(M * C, DTYPE_F32);
    Pair dh13 = zeros(M * 2 * F, DTYPE_F32), dact = zeros(M * F, DTYPE_F32);
    Pair dgates = zeros(N * k, DTYPE_F32);
    rc.dy = dy.c, rc.gates = gates.c, rc.slot = sl.c, rc.yp = yp.c, rc.dgates = dgates.c;
    rg.dy = dy.g, rg.gates = gates.g, rg.slot = sl.g, rg.yp = yp.g, rg.dgates = dgates.g;
    cpu->experts_backward(dxp.c, dw.c, NULL, dyp.c, dh13.c, dact.c, h13.c, act.c, xp.c, rc,
                          w.c, offsets.c, E, C, F);
    gpu->experts_backward(dxp.g, dw.g, NULL, dyp.g, dh13.g, dact.g, h13.g, act.g, xp.g, rg,
                          w.g, offsets.g, E, C, F);
    close_all("fused experts dxp", dxp, RTOL);
    close_all("fused experts dw", dw, RTOL);
    close_all("fused experts dgates", dgates, RTOL);
}

// The experts op under bf16 products. xp, w and dyp are bf16 values on both sides, so the
// first product of each pass is exact up to sum order (h13, act within 1e-5); the second
// rounds an fp32 intermediate (act, dh13) on the GPU only: relative error up to 2^-9 per
// element, averaged down over the sums, bounded here by 1e-2 of the largest value.
static void case_experts_bf16(void) {
    size_t E = 3, C = 64, F = 48, M = 90;
    int32_t off[] = {0, 40, 40, 90};
    gpu->set_gemm_bf16(1);
    Pair offsets = ints(off, E + 1), w = reals_bf16(E * 3 * F * C, 0.2),
         xp = reals_bf16(M * C, 1);
    Pair yp = zeros(M * C, DTYPE_F32), h13 = zeros(M * 2 * F, DTYPE_F32),
         act = zeros(M * F, DTYPE_F32);
    cpu->experts_forward(yp.c, h13.c, act.c, xp.c, (ExpertRoute){0}, w.c, offsets.c,
                         E, C, F);
    gpu->experts_forward(yp.g, h13.g, act.g, xp.g, (ExpertRoute){0}, w.g, offsets.g,
                         E, C, F);
    close_all("bf16 experts h13", h13, 1e-5);
    close_all("bf16 experts act", act, 1e-5);
    close_all("bf16 experts yp", yp, 1e-2);
    Pair dxp = zeros(M * C, DTYPE_F32), dw = zeros(E * 3 * F * C, DTYPE_F32),
         dyp = reals_bf16(M * C, 1);
    Pair dh13 = zeros(M * 2 * F, DTYPE_F32), dact = zeros(M * F, DTYPE_F32);
    to_gpu(act); // the same act on both sides for backward
    cpu->experts_backward(dxp.c, dw.c, NULL, dyp.c, dh13.c, dact.c, h13.c, act.c, xp.c,
                          (ExpertRoute){0}, w.c, offsets.c, E, C, F);
    gpu->experts_backward(dxp.g, dw.g, NULL, dyp.g, dh13.g, dact.g, h13.g, act.g, xp.g,
                          (ExpertRoute){0}, w.g, offsets.g, E, C, F);
    close_all("bf16 experts dxp", dxp, 1e-2);
    close_all("bf16 experts dw", dw, 1e-2);
    gpu->set_gemm_bf16(0);
}

// The experts op keeping h13 and act in bf16 (its state under bf16 products): the up
// projection's output is rounded to bf16 before SwiGLU (2^-9 relative) and SwiGLU's
// output again; the down projection rounded act anyway, so yp stays within 1e-2 as in
// case_experts_bf16; the backward's SwiGLU derivative reads the rounded h13 too, one
// more rounding in dxp and dw: 2e-2. Looped and grouped.
static void case_experts_bf16_state(void) {
    size_t E = 3, C = 64, F = 48, M = 90;
    int32_t off[] = {0, 40, 40, 90};
    if (gpu->experts_state_dtype(1) != DTYPE_BF16) fail("bf16 products keep an fp32 state");
    gpu->set_gemm_bf16(1);
    Pair offsets = ints(off, E + 1), w = reals_bf16(E * 3 * F * C, 0.2),
         xp = reals_bf16(M * C, 1);
    Pair h13 = zeros(M * 2 * F, DTYPE_F32), act = zeros(M * F, DTYPE_F32);
    Tensor h16 = {gpu->alloc(M * 2 * F * 2), DTYPE_BF16, DEVICE_CUDA, M * 2 * F};
    Tensor a16 = {gpu->alloc(M * F * 2), DTYPE_BF16, DEVICE_CUDA, M * F};
    Pair dyp = reals_bf16(M * C, 1), dh13 = zeros(M * 2 * F, DTYPE_F32),
         dact = zeros(M * F, DTYPE_F32);
    for (int grouped = 0; grouped < 2; grouped++) {
        gpu->set_expert_gemm(grouped);
        Pair yp = zeros(M * C, DTYPE_F32), dxp = zeros(M * C, DTYPE_F32),
             dw = zeros(E * 3 * F * C, DTYPE_F32);
        cpu->experts_forward(yp.c, h13.c, act.c, xp.c, (ExpertRoute){0}, w.c,
                             offsets.c, E, C, F);
        gpu->experts_forward(yp.g, h16, a16, xp.g, (ExpertRoute){0}, w.g, offsets.g,
                             E, C, F);
        close_all(grouped ? "bf16-state experts yp (grouped)" : "bf16-state experts yp", yp,
                  1e-2);
        cpu->experts_backward(dxp.c, dw.c, NULL, dyp.c, dh13.c, dact.c, h13.c, act.c, xp.c,
                              (ExpertRoute){0}, w.c, offsets.c, E, C, F);
        gpu->experts_backward(dxp.g, dw.g, NULL, dyp.g, dh13.g, dact.g, h16, a16, xp.g,
                              (ExpertRoute){0}, w.g, offsets.g, E, C, F);
        close_all(grouped ? "bf16-state experts dxp (grouped)" : "bf16-state experts dxp", dxp,
                  2e-2);
        close_all(grouped ? "bf16-state experts dw (grouped)" : "bf16-state experts dw", dw,
                  2e-2);
    }
    gpu->set_expert_gemm(0);
    gpu->set_gemm_bf16(0);
    gpu->release(h16.data);
    gpu->release(a16.data);
}

// The same two cases with each product of the op one grouped GEMM over the experts
// (train.expert_gemm = grouped): the same tolerances, the products differ in sum order only.
static void case_experts_grouped(void) {
    gpu->set_expert_gemm(1);
    case_experts();
    case_experts_fused();
    case_experts_bf16();
    gpu->set_expert_gemm(0);
}

static void case_crossentropy(void) {
    size_t N = 19, V = 301;
    Pair lg = reals(N * V, 3), tg = rand_ints(N, (int32_t)V), loss = zeros(1, DTYPE_F32),
         lse = zeros(N, DTYPE_F32);
    cpu->crossentropy_forward(loss.c, lse.c, lg.c, tg.c, N, V);
    gpu->crossentropy_forward(loss.g, lse.g, lg.g, tg.g, N, V);
    close_all("crossentropy loss", loss, RTOL);
    close_all("crossentropy lse", lse, RTOL);
    Pair dl = reals(N * V, 0.01);
    cpu->crossentropy_backward(dl.c, lg.c, lse.c, tg.c, 0.7, N, V);
    gpu->crossentropy_backward(dl.g, lg.g, lse.g, tg.g, 0.7, N, V);
    close_all("crossentropy dlogits", dl, RTOL);
}

static void case_router_scores(void) {
    size_t N = 31, E = 9;
    for (int f = 0; f < 2; f++) {
        ScoreFunc func = f ? SCORE_SIGMOID : SCORE_SOFTMAX;
        const char *fn = f ? "sigmoid" : "softmax";
        char what[64];
        Pair lg = reals(N * E, 4), s = zeros(N * E, DTYPE_F32);
        cpu->router_scores_forward(s.c, lg.c, N, E, func);
        gpu->router_scores_forward(s.g, lg.g, N, E, func);
        snprintf(what, sizeof what, "%s scores", fn);
        close_all(what, s, RTOL);
        Pair dl = reals(N * E, 1), ds = reals(N * E, 1);
        cpu->router_scores_backward(dl.c, ds.c, s.c, N, E, func);
        gpu->router_scores_backward(dl.g, ds.g, s.g, N, E, func);
        snprintf(what, sizeof what, "%s dlogits", fn);
        close_all(what, dl, RTOL);
    }
}

static void case_noisy_logits(void) {
    size_t n = 517;
    Pair clean = reals(n, 1), raw = reals(n, 3), eps = reals(n, 1), h = zeros(n, DTYPE_F32);
    cpu->noisy_logits_forward(h.c, clean.c, raw.c, eps.c, n);
    gpu->noisy_logits_forward(h.g, clean.g, raw.g, eps.g, n);
    close_all("noisy h", h, RTOL);
    Pair dc = reals(n, 1), dr = reals(n, 1), dh = reals(n, 1), nc = none();
    cpu->noisy_logits_backward(dc.c, dr.c, dh.c, raw.c, eps.c, n);
    gpu->noisy_logits_backward(dc.g, dr.g, dh.g, raw.g, eps.g, n);
    close_all("noisy dclean", dc, RTOL);
    close_all("noisy draw", dr, RTOL);
    cpu->noisy_logits_backward(nc.c, dr.c, dh.c, raw.c, eps.c, n);
    gpu->noisy_logits_backward(nc.g, dr.g, dh.g, raw.g, eps.g, n);
    close_all("noisy draw (dclean NULL)", dr, RTOL);
}

static void case_topk(void) {
    size_t N = 97;
    size_t shapes[][2] = {{10, 1}, {10, 2}, {10, 4}, {16, 8}, {8, 8}, {3, 2}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        size_t E = shapes[s][0], k = shapes[s][1];
        char what[64];
        // few distinct values: ties everywhere, which must go to the lower expert index
        Pair v = s % 2 ? ties(N * E, 3, 0.5) : reals(N * E, 1), idx = zeros(N * k, DTYPE_I32);
        cpu->topk_forward(idx.c, v.c, N, E, k);
        gpu->topk_forward(idx.g, v.g, N, E, k);
        snprintf(what, sizeof what, "topk idx (E=%zu k=%zu%s)", E, k, s % 2 ? ", ties" : "");
        same_ints(what, idx);
    }
}

// Random top-k routing on both sides: scores (N, E) softmax and idx (N, k).
static void make_routing(size_t N, size_t E, size_t k, int with_ties, Pair *scores, Pair *idx) {
    Pair lg = with_ties ? ties(N * E, 4, 1.0) : reals(N * E, 2);
    *scores = zeros(N * E, DTYPE_F32);
    *idx = zeros(N * k, DTYPE_I32);
    cpu->router_scores_forward(scores->c, lg.c, N, E, SCORE_SOFTMAX);
    to_gpu(*scores);   // both sides from the CPU's scores
    cpu->topk_forward(idx->c, scores->c, N, E, k);
    to_gpu(*idx);
}

static void case_gates(void) {
    size_t N = 41, E = 8, k = 3;
    Pair scores, idx;
    make_routing(N, E, k, 0, &scores, &idx);
    for (int renorm = 0; renorm < 2; renorm++) {
        Pair g = zeros(N * k, DTYPE_F32);
        cpu->gates_forward(g.c, scores.c, idx.c, N, E, k, renorm, 1.0 + 1.5 * renorm);
        gpu->gates_forward(g.g, scores.g, idx.g, N, E, k, renorm, 1.0 + 1.5 * renorm);
        close_all(renorm ? "gates (renorm)" : "gates", g, RTOL);
        Pair ds = reals(N * E, 1), dg = reals(N * k, 1);
        cpu->gates_backward(ds.c, dg.c, scores.c, idx.c, N, E, k, renorm, 1.0 + 1.5 * renorm);
        gpu->gates_backward(ds.g, dg.g, scores.g, idx.g, N, E, k, renorm, 1.0 + 1.5 * renorm);
        close_all(renorm ? "gates dscores (renorm)" : "gates dscores", ds, RTOL);
    }
}

// The fused routing op against the CPU's (the separate CPU ops in turn), and on the GPU
// bit for bit against the GPU's separate ops, for both score functions, with and without
// expert bias, renormalisation and Shazeer noise; group-limited (5 groups of 2, the best 2
// kept, group score max under softmax and top2 under sigmoid, gates times 2.5) against the
// CPU only. Logits with ties check the lower-index rule.
static void case_route_topk(void) {
    size_t N = 83, E = 10, k = 3;
    for (int variant = 0; variant < 24; variant++) {
        ScoreFunc func = variant & 1 ? SCORE_SIGMOID : SCORE_SOFTMAX;
        int renorm = (variant >> 1) & 1, with_bias = (variant >> 2) & 1;
        int noisy = (variant >> 3) & 1, grouped = variant >> 4;
        RouteSpec spec = {func, renorm, 1, 1, GROUP_SCORE_MAX, 1.0};
        if (grouped) {
            spec.groups = 5, spec.topk_groups = 2, spec.scale = 2.5;
            spec.group_score = func == SCORE_SIGMOID ? GROUP_SCORE_TOP2 : GROUP_SCORE_MAX;
        }
        char what[112];
        snprintf(what, sizeof what, "route_topk (%s%s%s%s%s)", func ? "sigmoid" : "softmax",
                 renorm ? ", renorm" : "", with_bias ? ", bias" : "", noisy ? ", noise" : "",
                 grouped ? ", groups" : "");
        Pair lg = variant == 6 ? ties(N * E, 4, 1.0) : reals(N * E, 2);
        Pair bias = with_bias ? reals(E, 0.3) : none();
        Pair raw = noisy ? reals(N * E, 1) : none(), eps = noisy ? reals(N * E, 1) : none();
        Pair h = noisy ? zeros(N * E, DTYPE_F32) : none();
        Pair s = zeros(N * E, DTYPE_F32), idx = zeros(N * k, DTYPE_I32), g = zeros(N * k, DTYPE_F32);
        cpu->route_topk_forward(s.c, idx.c, g.c, h.c, lg.c, raw.c, eps.c, bias.c, N, E, k,
                                spec);
        gpu->route_topk_forward(s.g, idx.g, g.g, h.g, lg.g, raw.g, eps.g, bias.g, N, E, k,
                                spec);
        if (noisy) close_all(what, h, RTOL);
        close_all(what, s, RTOL);
        same_ints(what, idx);
        close_all(what, g, RTOL);
        if (grouped) continue;   // no separate op selects by groups
        Pair s2 = zeros(N * E, DTYPE_F32), v = zeros(N * E, DTYPE_F32),
             idx2 = zeros(N * k, DTYPE_I32), g2 = zeros(N * k, DTYPE_F32),
             h2 = zeros(N * E, DTYPE_F32);
        if (noisy) gpu->noisy_logits_forward(h2.g, lg.g, raw.g, eps.g, N * E);
        gpu->router_scores_forward(s2.g, noisy ? h2.g : lg.g, N, E, func);
        if (with_bias) gpu->add_bias_forward(v.g, s2.g, bias.g, N, E);
        gpu->topk_forward(idx2.g, with_bias ? v.g : s2.g, N, E, k);
        gpu->gates_forward(g2.g, s2.g, idx2.g, N, E, k, renorm, 1.0);
        float *f[2][3] = {{gpu_copy(s, s.n), gpu_copy(idx, idx.n), gpu_copy(g, g.n)},
                          {gpu_copy(s2, s2.n), gpu_copy(idx2, idx2.n), gpu_copy(g2, g2.n)}};
        same_bits("route_topk scores vs the separate GPU ops", f[0][0], f[1][0], s.n);
        same_bits("route_topk idx vs the separate GPU ops", f[0][1], f[1][1], idx.n);
        same_bits("route_topk gates vs the separate GPU ops", f[0][2], f[1][2], g.n);
        for (int i = 0; i < 6; i++) free(f[i / 3][i % 3]);
        if (noisy) {
            float *ha = gpu_copy(h, h.n), *hb = gpu_copy(h2, h2.n);
            same_bits("route_topk noisy logits vs the separate GPU op", ha, hb, h.n);
            free(ha), free(hb);
        }
    }
}

static void case_capacity(void) {
    size_t N = 67, E = 6, k = 2;
    for (int with_ties = 0; with_ties < 2; with_ties++) {
        Pair scores, idx;
        make_routing(N, E, k, with_ties, &scores, &idx);
        Pair gates = with_ties ? ties(N * k, 3, 0.25) : uniform(N * k, 0, 1);
        size_t caps[] = {0, 1, 9, 23, 200};
        for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++)
            for (int policy = 0; policy < 2; policy++) {
                Pair keep = zeros(N * k, DTYPE_I32);
                char what[96];
                cpu->capacity_forward(keep.c, idx.c, gates.c, N, E, k, caps[c], policy);
                gpu->capacity_forward(keep.g, idx.g, gates.g, N, E, k, caps[c], policy);
                snprintf(what, sizeof what, "capacity keep (capacity %zu, %s%s)", caps[c],
                         policy == DROP_PROBS ? "probs" : "position",
                         with_ties ? ", tied gates" : "");
                same_ints(what, keep);
            }
    }
}

// The CPU routing plan for N tokens with drops: idx, gates, keep, offsets, rows, slot.
typedef struct {
    Pair scores, idx, gates, keep, offsets, rows, slot;
    size_t M;
} Plan;

static Plan make_plan(size_t N, size_t E, size_t k, size_t capacity) {
    Plan p;
    make_routing(N, E, k, 0, &p.scores, &p.idx);
    p.gates = zeros(N * k, DTYPE_F32);
    cpu->gates_forward(p.gates.c, p.scores.c, p.idx.c, N, E, k, 1, 1.0);
    to_gpu(p.gates);
    p.keep = zeros(N * k, DTYPE_I32);
    cpu->capacity_forward(p.keep.c, p.idx.c, p.gates.c, N, E, k, capacity, DROP_POSITION);
    to_gpu(p.keep);
    p.offsets = zeros(E + 1, DTYPE_I32);
    p.rows = zeros(N * k, DTYPE_I32);
    p.slot = zeros(N * k, DTYPE_I32);
    cpu->dispatch_plan(p.offsets.c, p.rows.c, p.slot.c, p.idx.c, p.keep.c, N, E, k);
    p.M = (size_t)host_ints(p.offsets)[E];
    to_gpu(p.offsets);
    to_gpu(p.rows);
    to_gpu(p.slot);
    return p;
}

static void case_dispatch(void) {
    size_t N = 59, E = 7, k = 2;
    size_t caps[] = {0, 5, 12};
    for (size_t c = 0; c < 3; c++) {
        Pair scores, idx;
        make_routing(N, E, k, c == 2, &scores, &idx);
        Pair gates = uniform(N * k, 0, 1), keep = zeros(N * k, DTYPE_I32);
        cpu->capacity_forward(keep.c, idx.c, gates.c, N, E, k, caps[c], DROP_PROBS);
        to_gpu(keep);
        Pair off = zeros(E + 1, DTYPE_I32), rows = zeros(N * k, DTYPE_I32),
             slot = zeros(N * k, DTYPE_I32);
        cpu->dispatch_plan(off.c, rows.c, slot.c, idx.c, keep.c, N, E, k);
        gpu->dispatch_plan(off.g, rows.g, slot.g, idx.g, keep.g, N, E, k);
        same_ints("dispatch offsets", off);
        same_ints_n("dispatch rows", rows, (size_t)host_ints(off)[E]);
        same_ints("dispatch slot", slot);
    }
    // An expert nobody chose: all tokens on expert 1 of 4.
    size_t n1 = 10;
    int32_t one[10];
    for (size_t i = 0; i < n1; i++) one[i] = 1;
    Pair idx = ints(one, n1), keep = ints(one, n1), off = zeros(5, DTYPE_I32),
         rows = zeros(n1, DTYPE_I32), slot = zeros(n1, DTYPE_I32);
    cpu->dispatch_plan(off.c, rows.c, slot.c, idx.c, keep.c, n1, 4, 1);
    gpu->dispatch_plan(off.g, rows.g, slot.g, idx.g, keep.g, n1, 4, 1);
    same_ints("dispatch offsets (empty experts)", off);
    same_ints("dispatch rows (empty experts)", rows);
}

static void case_gather_combine(void) {
    size_t N = 45, E = 6, k = 3, C = 21;
    Plan p = make_plan(N, E, k, 16);   // capacity 16 of ~22 per expert: drops
    size_t R = N * k;                   // worst-case permuted rows
    Pair x = reals(N * C, 1), xp = zeros(R * C, DTYPE_F32);
    cpu->gather_rows_forward(xp.c, x.c, p.rows.c, p.offsets.c, E, C);
    gpu->gather_rows_forward(xp.g, x.g, p.rows.g, p.offsets.g, E, C);
    close_n("gather xp", xp, p.M * C, 0.0);
    Pair dx = reals(N * C, 1), dxp = reals(R * C, 1);
    float *before = gpu_copy(dx, dx.n);
    cpu->gather_rows_backward(dx.c, dxp.c, p.rows.c, p.offsets.c, E, C);
    gpu->gather_rows_backward(dx.g, dxp.g, p.rows.g, p.offsets.g, E, C);
    close_all("gather dx", dx, RTOL);
    float *first = gpu_copy(dx, dx.n);
    gpu->upload(dx.g, before, dx.n * 4);
    gpu->gather_rows_backward(dx.g, dxp.g, p.rows.g, p.offsets.g, E, C);
    float *second = gpu_copy(dx, dx.n);
    same_bits("gather dx", first, second, dx.n);
    free(before);
    free(first);
    free(second);

    Pair yp = reals(R * C, 1), y = zeros(N * C, DTYPE_F32);
    cpu->combine_forward(y.c, yp.c, p.gates.c, p.slot.c, N, k, C);
    gpu->combine_forward(y.g, yp.g, p.gates.g, p.slot.g, N, k, C);
    close_all("combine y", y, RTOL);
    Pair dyp = reals(R * C, 1), dg = reals(N * k, 1), dy = reals(N * C, 1), nn = none();
    cpu->combine_backward(dyp.c, dg.c, dy.c, yp.c, p.gates.c, p.slot.c, N, k, C);
    gpu->combine_backward(dyp.g, dg.g, dy.g, yp.g, p.gates.g, p.slot.g, N, k, C);
    close_n("combine dyp", dyp, p.M * C, RTOL);
    close_all("combine dgates", dg, RTOL);
    cpu->combine_backward(nn.c, dg.c, dy.c, yp.c, p.gates.c, p.slot.c, N, k, C);
    gpu->combine_backward(nn.g, dg.g, dy.g, yp.g, p.gates.g, p.slot.g, N, k, C);
    close_all("combine dgates (dyp NULL)", dg, RTOL);
}

static void case_lb_loss(void) {
    size_t N = 48, E = 8, k = 2;
    size_t groups[] = {1, 4};
    for (size_t gi = 0; gi < 2; gi++) {
        size_t G = groups[gi];
        Pair scores, idx;
        make_routing(N, E, k, 0, &scores, &idx);
        Pair loss = zeros(1, DTYPE_F32), counts = zeros(G * E, DTYPE_I32),
             pmean = zeros(G * E, DTYPE_F32), nopm = none();
        cpu->lb_loss_forward(loss.c, counts.c, pmean.c, scores.c, idx.c, N, E, k, G);
        gpu->lb_loss_forward(loss.g, counts.g, pmean.g, scores.g, idx.g, N, E, k, G);
        close_all("lb loss", loss, RTOL);
        same_ints("lb counts", counts);
        close_all("lb pmean", pmean, RTOL);
        cpu->lb_loss_forward(loss.c, counts.c, nopm.c, scores.c, idx.c, N, E, k, G);
        gpu->lb_loss_forward(loss.g, counts.g, nopm.g, scores.g, idx.g, N, E, k, G);
        close_all("lb loss (pmean NULL)", loss, RTOL);
        Pair dp = reals(N * E, 1);
        cpu->lb_loss_backward(dp.c, counts.c, 0.3, N, E, k, G);
        gpu->lb_loss_backward(dp.g, counts.g, 0.3, N, E, k, G);
        close_all("lb dprobs", dp, RTOL);
    }
}

static void case_normalize_rows(void) {
    size_t N = 29, E = 7;
    Pair s = uniform(N * E, 0.05, 1), p = zeros(N * E, DTYPE_F32);
    cpu->normalize_rows_forward(p.c, s.c, N, E);
    gpu->normalize_rows_forward(p.g, s.g, N, E);
    close_all("normalize p", p, RTOL);
    Pair ds = reals(N * E, 1), dp = reals(N * E, 1);
    cpu->normalize_rows_backward(ds.c, dp.c, s.c, N, E);
    gpu->normalize_rows_backward(ds.g, dp.g, s.g, N, E);
    close_all("normalize ds", ds, RTOL);
}

static void case_zloss(void) {
    size_t N = 53, E = 8;
    Pair lg = reals(N * E, 3), loss = zeros(1, DTYPE_F32), lse = zeros(N, DTYPE_F32);
    cpu->zloss_forward(loss.c, lse.c, lg.c, N, E);
    gpu->zloss_forward(loss.g, lse.g, lg.g, N, E);
    close_all("zloss loss", loss, RTOL);
    close_all("zloss lse", lse, RTOL);
    Pair dl = reals(N * E, 1);
    cpu->zloss_backward(dl.c, lg.c, lse.c, 0.5, N, E);
    gpu->zloss_backward(dl.g, lg.g, lse.g, 0.5, N, E);
    close_all("zloss dlogits", dl, RTOL);
}

static void case_importance_loss(void) {
    size_t N = 61, E = 8, k = 2;
    Pair scores, idx;
    make_routing(N, E, k, 0, &scores, &idx);
    Pair gates = uniform(N * k, 0, 1), loss = zeros(1, DTYPE_F32), imp = zeros(E, DTYPE_F32);
    cpu->importance_loss_forward(loss.c, imp.c, gates.c, idx.c, N, E, k);
    gpu->importance_loss_forward(loss.g, imp.g, gates.g, idx.g, N, E, k);
    close_all("importance loss", loss, RTOL);
    close_all("importance imp", imp, RTOL);
    Pair dg = reals(N * k, 1);
    cpu->importance_loss_backward(dg.c, imp.c, idx.c, 0.8, N, E, k);
    gpu->importance_loss_backward(dg.g, imp.g, idx.g, 0.8, N, E, k);
    close_all("importance dgates", dg, RTOL);
}

static void case_load_loss(void) {
    size_t N = 57, E = 8, k = 2;
    Pair clean = reals(N * E, 1), raw = reals(N * E, 1), eps = reals(N * E, 1),
         h = zeros(N * E, DTYPE_F32), idx = zeros(N * k, DTYPE_I32);
    cpu->noisy_logits_forward(h.c, clean.c, raw.c, eps.c, N * E);
    to_gpu(h);
    cpu->topk_forward(idx.c, h.c, N, E, k);
    to_gpu(idx);
    Pair loss = zeros(1, DTYPE_F32), load = zeros(E, DTYPE_F32);
    cpu->load_loss_forward(loss.c, load.c, clean.c, h.c, raw.c, idx.c, N, E, k);
    gpu->load_loss_forward(loss.g, load.g, clean.g, h.g, raw.g, idx.g, N, E, k);
    close_all("load loss", loss, RTOL);
    close_all("load load", load, RTOL);
    Pair dc = reals(N * E, 1), dh = reals(N * E, 1), dr = reals(N * E, 1), nh = none();
    cpu->load_loss_backward(dc.c, dh.c, dr.c, load.c, clean.c, h.c, raw.c, idx.c, 0.6, N, E, k);
    gpu->load_loss_backward(dc.g, dh.g, dr.g, load.g, clean.g, h.g, raw.g, idx.g, 0.6, N, E, k);
    close_all("load dclean", dc, RTOL);
    close_all("load dh", dh, RTOL);
    close_all("load draw", dr, RTOL);
    cpu->load_loss_backward(dc.c, nh.c, dr.c, load.c, clean.c, h.c, raw.c, idx.c, 0.6, N, E, k);
    gpu->load_loss_backward(dc.g, nh.g, dr.g, load.g, clean.g, h.g, raw.g, idx.g, 0.6, N, E, k);
    close_all("load dclean (dh NULL)", dc, RTOL);
}

static void case_router_variants(void) {
    size_t N = 71, E = 9;
    Pair s = reals(N * E, 1), b = reals(E, 0.1), out = zeros(N * E, DTYPE_F32);
    cpu->add_bias_forward(out.c, s.c, b.c, N, E);
    gpu->add_bias_forward(out.g, s.g, b.g, N, E);
    close_all("add_bias out", out, RTOL);
    Pair tok = rand_ints(N, 50000);
    for (size_t k = 1; k <= 3; k++) {
        Pair idx = zeros(N * k, DTYPE_I32);
        cpu->hash_route_forward(idx.c, tok.c, N, E, k);
        gpu->hash_route_forward(idx.g, tok.g, N, E, k);
        same_ints("hash_route idx", idx);
    }
    size_t caps[] = {0, 1, 7, 30, 71, 100};
    for (int with_ties = 0; with_ties < 2; with_ties++) {
        Pair sc = with_ties ? ties(N * E, 3, 0.5) : uniform(N * E, 0, 1);
        for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
            Pair keep = zeros(N * E, DTYPE_I32);
            char what[80];
            cpu->expert_choice_forward(keep.c, sc.c, N, E, caps[c]);
            gpu->expert_choice_forward(keep.g, sc.g, N, E, caps[c]);
            snprintf(what, sizeof what, "expert_choice keep (capacity %zu%s)", caps[c],
                     with_ties ? ", ties" : "");
            same_ints(what, keep);
        }
    }
}

static void case_adamw(void) {
    size_t n = 2049;
    Pair p = reals(n, 1), g = reals(n, 0.1), m = reals(n, 0.01), v = uniform(n, 0, 1e-3);
    for (int t = 1; t <= 3; t++) {
        double b1 = 0.9, b2 = 0.95;
        double c1 = 1 - pow(b1, t), c2 = 1 - pow(b2, t);
        cpu->adamw_update(p.c, g.c, m.c, v.c, n, 1e-3, b1, b2, 1e-8, 0.1, c1, c2, 0.5);
        gpu->adamw_update(p.g, g.g, m.g, v.g, n, 1e-3, b1, b2, 1e-8, 0.1, c1, c2, 0.5);
    }
    close_all("adamw p", p, RTOL);
    close_all("adamw m", m, RTOL);
    close_all("adamw v", v, RTOL);
}

// bf16 products of a weight slice of the buffer with a bf16 copy, with the same product
// of a plain fp32 buffer holding the same values (rounded per call): both forms of the
// matmul and the experts op, bit for bit.
static void same_products(const char *what, Tensor w, Tensor plain, size_t off, Pair x,
                          size_t N, size_t K, size_t M) {
    Pair a = zeros(N * M, DTYPE_F32), b = zeros(N * M, DTYPE_F32);
    gpu->matmul_forward(a.g, x.g, tensor_slice(w, off, M * K), N, K, M);
    gpu->matmul_forward(b.g, x.g, tensor_slice(plain, off, M * K), N, K, M);
    Pair dxa = zeros(N * K, DTYPE_F32), dxb = zeros(N * K, DTYPE_F32);
    gpu->matmul_backward(dxa.g, tensor_none(), b.g, x.g, tensor_slice(w, off, M * K), N, K, M);
    gpu->matmul_backward(dxb.g, tensor_none(), b.g, x.g, tensor_slice(plain, off, M * K), N, K, M);
    float *fa = gpu_copy(a, a.n), *fb = gpu_copy(b, b.n), *da = gpu_copy(dxa, dxa.n),
          *db = gpu_copy(dxb, dxb.n);
    char line[128];
    snprintf(line, sizeof line, "%s: matmul out", what);
    same_bits(line, fa, fb, a.n);
    snprintf(line, sizeof line, "%s: matmul dx", what);
    same_bits(line, da, db, dxa.n);
    free(fa), free(fb), free(da), free(db);
}

static void copy_gpu(Pair dst, Pair src) {
    float *h = gpu_copy(src, src.n);
    gpu->upload(dst.g, h, src.n * 4);
    free(h);
}

// The bf16 copy of the weights (fp32 master weights): fresh, after AdamW wrote it, after
// an upload made it stale; and the experts op reading it, looped and grouped.
static void case_bf16_weights(void) {
    size_t N = 37, K = 64, M = 48, n = 3 * M * K + 5, off = M * K + 5;
    Pair w = reals(n, 0.3), plain = zeros(n, DTYPE_F32), x = reals(N * K, 1);
    copy_gpu(plain, w);
    gpu->set_gemm_bf16(1);
    gpu->set_bf16_weights(w.g, 1);
    same_products("fresh copy", w.g, plain.g, off, x, N, K, M);
    Pair g = reals(n, 0.1), m = zeros(n, DTYPE_F32), v = zeros(n, DTYPE_F32);
    gpu->adamw_update(tensor_slice(w.g, 7, n - 7), tensor_slice(g.g, 7, n - 7),
                      tensor_slice(m.g, 7, n - 7), tensor_slice(v.g, 7, n - 7), n - 7, 1e-2, 0.9,
                      0.95, 1e-8, 0.1, 0.1, 0.05, 1.0);
    copy_gpu(plain, w);
    same_products("after AdamW", w.g, plain.g, off, x, N, K, M);
    Pair fresh = reals(n, 0.3);
    copy_gpu(w, fresh);
    copy_gpu(plain, fresh);
    same_products("after an upload", w.g, plain.g, off, x, N, K, M);
    size_t E = 2, C = 16, F = 8, rows = 12;
    int32_t offs[] = {0, 5, 12};
    Pair o = ints(offs, E + 1), xp = reals(rows * C, 1);
    for (int grouped = 0; grouped < 2; grouped++) {
        gpu->set_expert_gemm(grouped);
        Pair ya = zeros(rows * C, DTYPE_F32), yb = zeros(rows * C, DTYPE_F32),
             h = zeros(rows * 2 * F, DTYPE_F32), act = zeros(rows * F, DTYPE_F32);
        gpu->experts_forward(ya.g, h.g, act.g, xp.g, (ExpertRoute){0},
                             tensor_slice(w.g, off, E * 3 * F * C), o.g, E, C, F);
        gpu->experts_forward(yb.g, h.g, act.g, xp.g, (ExpertRoute){0},
                             tensor_slice(plain.g, off, E * 3 * F * C), o.g, E, C, F);
        float *fa = gpu_copy(ya, ya.n), *fb = gpu_copy(yb, yb.n);
        same_bits(grouped ? "experts yp, grouped, bf16 copy" : "experts yp, bf16 copy", fa, fb,
                  ya.n);
        free(fa), free(fb);
    }
    gpu->set_expert_gemm(0);
    gpu->set_bf16_weights(w.g, 0);
    gpu->set_gemm_bf16(0);
}

static void case_sum_squares(void) {
    size_t sizes[] = {1, 255, 4097, 1000003};
    for (size_t i = 0; i < 4; i++) {
        Pair x = reals(sizes[i], 1);
        double c = cpu->sum_squares(x.c, sizes[i]), g1 = gpu->sum_squares(x.g, sizes[i]),
               g2 = gpu->sum_squares(x.g, sizes[i]);
        if (!(fabs(g1 - c) <= 1e-10 * c))   // double sums in different orders
            fail("sum_squares n=%zu: cpu %.17g gpu %.17g", sizes[i], c, g1);
        if (memcmp(&g1, &g2, sizeof g1) != 0)
            fail("sum_squares n=%zu: two GPU runs differ (%.17g, %.17g)", sizes[i], g1, g2);
    }
}

typedef struct {
    const char *name;
    void (*run)(void);
} Case;

static const Case cases[] = {
    {"memory", case_memory},
    {"table_complete", case_table_complete},
    {"add_mul", case_add_mul},
    {"embedding", case_embedding},
    {"rmsnorm", case_rmsnorm},
    {"qk_norm", case_qk_norm},
    {"bias_gated_add", case_bias_gated_add},
    {"matmul", case_matmul},
    {"matmul_bf16", case_matmul_bf16},
    {"rope", case_rope},
    {"attention", case_attention},
    {"attention_decode", case_attention_decode},
    {"mla", case_mla},
    {"attention_fused", case_attention_fused},
    {"swiglu", case_swiglu},
    {"experts", case_experts},
    {"experts_bf16", case_experts_bf16},
    {"experts_grouped", case_experts_grouped},
    {"experts_bf16_state", case_experts_bf16_state},
    {"crossentropy", case_crossentropy},
    {"router_scores", case_router_scores},
    {"noisy_logits", case_noisy_logits},
    {"topk", case_topk},
    {"gates", case_gates},
    {"route_topk", case_route_topk},
    {"capacity", case_capacity},
    {"dispatch", case_dispatch},
    {"gather_combine", case_gather_combine},
    {"lb_loss", case_lb_loss},
    {"normalize_rows", case_normalize_rows},
    {"zloss", case_zloss},
    {"importance_loss", case_importance_loss},
    {"load_loss", case_load_loss},
    {"router_variants", case_router_variants},
    {"adamw", case_adamw},
    {"bf16_weights", case_bf16_weights},
    {"sum_squares", case_sum_squares},
};
#define N_CASES (sizeof cases / sizeof cases[0])

int main(int argc, char **argv) {
    const char *only = NULL;
    if (argc >= 2 && !strcmp(argv[1], "--list")) {
        for (size_t i = 0; i < N_CASES; i++) printf("%s\n", cases[i].name);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "--only")) only = argv[2];
    char err[512];
    cpu = backend_cpu();
    gpu = backend_select("cuda", err, sizeof err);
    if (!gpu) {
        printf("SKIP: no CUDA device (%s)\n", err);
        return EXIT_SKIP;
    }
    char dev[256];
    backend_describe(gpu, dev, sizeof dev);
    printf("CUDA ops against the CPU ops on %s\n", dev);
    int failed = 0, ran = 0;
    for (size_t i = 0; i < N_CASES; i++) {
        if (only && strcmp(only, cases[i].name) != 0) continue;
        rng_init(&rng, 1234 + i);
        case_failures = 0;
        cases[i].run();
        free_all();
        printf("%-4s %s\n", case_failures ? "FAIL" : "ok", cases[i].name);
        failed += case_failures != 0;
        ran++;
    }
    if (ran == 0) {
        printf("no case named '%s' (--list names them)\n", only);
        return 2;
    }
    printf("%d of %d CUDA op cases passed\n", ran - failed, ran);
    return failed ? 1 : 0;
}
