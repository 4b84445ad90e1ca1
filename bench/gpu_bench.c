// gpu_bench.c: the GPU part of `make bench` (bench --gpu): the device's dense bf16 GEMM
// rate, the grouped experts op against a dense product of equal FLOPs (one cuBLAS call
// per expert, and grouped GEMMs), and attention: plain kernels against cuDNN's fused one.
//
// The experts op is the one the trainer runs (Backend.experts_forward / _backward under
// bf16 products): per layout and routing, forward (h13 and the down projection, with the
// SwiGLU between them), dgrad (backward with no weight gradient wanted) and wgrad (full
// backward minus dgrad). The dense reference is the same op with one expert holding every
// row: the same GEMM shapes and FLOPs, one product each instead of E.
#include "bench.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/backend.h"
#include "../base/rng.h"
#include "../base/util.h"

#define GPU_PEAK_N 8192
#define GPU_REPEATS 10

static const struct {
    const char *name;
    size_t E, k, C, F, N;
} layouts[BENCH_GPU_LAYOUTS] = {
    {"coarse", 8, 2, 1024, 2816, 16384},
    {"fine-grained", 64, 8, 1024, 512, 16384},
};

typedef struct {
    const Backend *be;
    size_t E, C, F, M; // experts, d_model, expert width, routed rows
    Tensor w, dw;      // (E, 3F, C) each expert's w1, w3, w2
    Tensor xp, dxp;    // (M, C) permuted rows
    Tensor yp, dyp;    // (M, C)
    Tensor h13, dh13;  // (M, 2F)
    Tensor act, dact;  // (M, F)
    Tensor offsets;    // (E+1) int32
} GpuExperts;

static Tensor device_buffer(const Backend *be, size_t numel, DType dt) {
    Tensor t = {be->alloc(numel * dtype_size(dt)), dt, be->device, numel};
    CHECK(t.data, "out of GPU memory for %zu values", numel);
    return t;
}

static void upload_random(const Backend *be, Tensor t, Rng *rng, double scale) {
    float *h = CALLOC(t.numel, sizeof *h);
    for (size_t i = 0; i < t.numel; i++)
        h[i] = (float)(scale * (2.0 * rng_uniform(rng) - 1.0));
    be->upload(t, h, t.numel * sizeof *h);
    free(h);
}

// Rows per expert: balanced (M / E each) or skewed (expert 0 at twice the mean, the
// rest sharing what is left evenly).
static void upload_offsets(GpuExperts *g, size_t E, int skewed) {
    int32_t *off = CALLOC(E + 1, sizeof *off);
    size_t mean = g->M / E, first = skewed && E > 1 ? 2 * mean : mean;
    size_t rest = E > 1 ? (g->M - first) / (E - 1) : 0;
    for (size_t e = 0; e < E; e++)
        off[e + 1] = off[e] + (int32_t)(e == 0 ? first : rest);
    off[E] = (int32_t)g->M; // the remainder of the division goes to the last expert
    g->be->upload(g->offsets, off, (E + 1) * sizeof *off);
    free(off);
}

static void gpu_experts_init(GpuExperts *g, const Backend *be, size_t E, size_t M, size_t C,
                             size_t F) {
    Rng rng;
    rng_init(&rng, 7);
    *g = (GpuExperts){.be = be, .E = E, .C = C, .F = F, .M = M};
    g->w = device_buffer(be, E * 3 * F * C, DTYPE_F32);
    g->dw = device_buffer(be, E * 3 * F * C, DTYPE_F32);
    g->xp = device_buffer(be, M * C, DTYPE_F32);
    g->dxp = device_buffer(be, M * C, DTYPE_F32);
    g->yp = device_buffer(be, M * C, DTYPE_F32);
    g->dyp = device_buffer(be, M * C, DTYPE_F32);
    DType state = be->experts_state_dtype(1);   // what a bf16 training run keeps
    g->h13 = device_buffer(be, M * 2 * F, state);
    g->dh13 = device_buffer(be, M * 2 * F, DTYPE_F32);
    g->act = device_buffer(be, M * F, state);
    g->dact = device_buffer(be, M * F, DTYPE_F32);
    g->offsets = device_buffer(be, E + 1, DTYPE_I32);
    upload_random(be, g->w, &rng, 1.0 / sqrt((double)C));
    upload_random(be, g->xp, &rng, 1.0);
    upload_random(be, g->dyp, &rng, 1.0);
}

static void gpu_experts_free(GpuExperts *g) {
    Tensor all[] = {g->w,   g->dw,   g->xp,  g->dxp,  g->yp,     g->dyp,
                    g->h13, g->dh13, g->act, g->dact, g->offsets};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        g->be->release(all[i].data);
}

typedef enum { PASS_FORWARD, PASS_DGRAD, PASS_BACKWARD } Pass;

// The best of GPU_REPEATS runs of one pass with E experts, in seconds.
static double time_pass(GpuExperts *g, size_t E, Pass pass) {
    const Backend *be = g->be;
    Tensor no_dw = tensor_none();
    no_dw.device = be->device;
    double best = 0.0;
    for (int r = 0; r <= GPU_REPEATS; r++) { // r = 0 warms up
        be->synchronize();
        double t0 = omp_get_wtime();
        if (pass == PASS_FORWARD)
            be->experts_forward(g->yp, g->h13, g->act, g->xp, (ExpertRoute){0},
                                g->w, g->offsets, E, g->C, g->F);
        else
            be->experts_backward(g->dxp, pass == PASS_DGRAD ? no_dw : g->dw, NULL, g->dyp,
                                 g->dh13, g->dact, g->h13, g->act, g->xp, (ExpertRoute){0}, g->w, g->offsets, E, g->C, g->F);
        be->synchronize();
        double t = omp_get_wtime() - t0;
        if (r > 0 && (best == 0.0 || t < best)) best = t;
    }
    return best;
}

// fwd, dgrad, wgrad seconds with E experts under the given routing.
static void time_passes(GpuExperts *g, size_t E, int skewed, double out[3]) {
    upload_offsets(g, E, skewed);
    out[0] = time_pass(g, E, PASS_FORWARD);
    out[1] = time_pass(g, E, PASS_DGRAD);
    out[2] = time_pass(g, E, PASS_BACKWARD) - out[1];
}

// gpu-medium's attention shape (configs/gpu-medium.ini), batch 8.
static const GpuAttentionResult attention_shape = {8, 1024, 16, 8, 64, 0, {{0}}, {0}};

// The best of GPU_REPEATS forward and backward passes of the attention op in the
// backend's current precision, state sized by its plan.
static void time_attention(const Backend *be, GpuAttentionResult *a, int bf16, double s[2]) {
    size_t N = a->B * a->T, W = (a->H + 2 * a->KV) * a->D, att_n, datt_n;
    be->attention_plan(&att_n, &datt_n, a->B, a->T, a->H, a->KV, a->D, bf16);
    Rng rng;
    rng_init(&rng, 11);
    Tensor qkv = device_buffer(be, N * W, DTYPE_F32), dqkv = device_buffer(be, N * W, DTYPE_F32);
    Tensor out = device_buffer(be, N * a->H * a->D, DTYPE_F32);
    Tensor dout = device_buffer(be, N * a->H * a->D, DTYPE_F32);
    Tensor att = device_buffer(be, att_n, DTYPE_F32), datt = device_buffer(be, datt_n, DTYPE_F32);
    upload_random(be, qkv, &rng, 1.0);
    upload_random(be, dout, &rng, 1.0);
    be->set_gemm_bf16(bf16);
    s[0] = s[1] = 0.0;
    for (int r = 0; r <= GPU_REPEATS; r++) {   // r = 0 warms up (and builds cuDNN's plans)
        for (int pass = 0; pass < 2; pass++) {
            be->synchronize();
            double t0 = omp_get_wtime();
            if (pass == 0) be->attention_forward(out, att, qkv, a->B, a->T, a->H, a->KV, a->D);
            else
                be->attention_backward(dqkv, datt, dout, out, qkv, att, a->B, a->T, a->H, a->KV,
                                       a->D);
            be->synchronize();
            double t = omp_get_wtime() - t0;
            if (r > 0 && (s[pass] == 0.0 || t < s[pass])) s[pass] = t;
        }
    }
    be->set_gemm_bf16(0);
    Tensor all[] = {qkv, dqkv, out, dout, att, datt};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) be->release(all[i].data);
}

static void bench_attention(const Backend *be, GpuAttentionResult *a) {
    *a = attention_shape;
    size_t att_n, datt_n;
    be->attention_plan(&att_n, &datt_n, a->B, a->T, a->H, a->KV, a->D, 1);
    a->fused = att_n < a->B * a->H * a->T * a->T;
    a->flops[0] = 2.0 * a->B * a->H * (double)a->T * a->T * a->D;
    a->flops[1] = 2.5 * a->flops[0];
    time_attention(be, a, 0, a->s[0]);
    time_attention(be, a, 1, a->s[1]);
}

void bench_gpu(GpuResult *out) {
    char err[512];
    memset(out, 0, sizeof *out);
    out->peak_gflops = backend_gemm_peak_bf16(GPU_PEAK_N, GPU_REPEATS, err, sizeof err);
    if (out->peak_gflops <= 0.0) {
        snprintf(out->why_not, sizeof out->why_not, "%s", err);
        return;
    }
    const Backend *be = backend_select("cuda", err, sizeof err);
    backend_describe(be, out->device, sizeof out->device);
    out->peak_n = GPU_PEAK_N;
    be->set_gemm_bf16(1);
    for (int l = 0; l < BENCH_GPU_LAYOUTS; l++) {
        GpuLayoutResult *r = &out->layout[l];
        snprintf(r->name, sizeof r->name, "%s", layouts[l].name);
        r->E = layouts[l].E, r->k = layouts[l].k, r->C = layouts[l].C, r->F = layouts[l].F;
        r->N = layouts[l].N;
        GpuExperts g;
        gpu_experts_init(&g, be, r->E, r->N * r->k, r->C, r->F);
        time_passes(&g, r->E, 0, r->grouped_s[0]);
        time_passes(&g, r->E, 1, r->grouped_s[1]);
        be->set_expert_gemm(1);
        time_passes(&g, r->E, 0, r->grouped_gemm_s);
        be->set_expert_gemm(0);
        time_passes(&g, 1, 0, r->dense_s);
        r->flops_per_pass = 6.0 * (double)g.M * (double)r->C * (double)r->F;
        gpu_experts_free(&g);
    }
    be->set_gemm_bf16(0);
    bench_attention(be, &out->attention);
}
