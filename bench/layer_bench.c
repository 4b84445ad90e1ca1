// layer_bench.c: one MoE layer alone.
//
// Two measurements on a config's shape (N = batch_size * seq_len tokens):
// - the grouped experts op (forward + backward) with every expert given the same number
//   of rows, and the same GEMMs called alone: how close the experts come to sgemm;
// - a one-layer model, dropless, timing only its MoE ops (router, dispatch/combine,
//   experts; forward + backward) with balanced routing and with skewed routing (expert
//   0 at twice the mean load), both set through the DeepSeek-V3 selection bias.
#include "bench.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../model/model.h"
#include "../train/run.h"

static const size_t row_sizes[BENCH_ROW_SIZES] = {64, 128, 256, 512, 1024};

// The skew the second routing aims at, and how close calibration must get.
#define SKEW_TARGET 2.0
#define SKEW_TOLERANCE 0.02
// Balanced routing: max/mean load at most this, after at most this many bias steps.
#define BALANCE_TARGET 1.05
#define BALANCE_STEPS 200
#define LAYER_REPEATS 8
// The experts-op sweep times every size in each of SWEEP_ROUNDS rounds (SWEEP_REPEATS
// runs each) and keeps the best, so a burst of other work on the cores spoils one round
// of a size, not its figure.
#define SWEEP_ROUNDS 3
#define SWEEP_REPEATS 4

// Uniform on [-scale, scale): the values only need to be ordinary numbers.
static real *random_buffer(Rng *rng, size_t n, double scale) {
    real *x = CALLOC(n, sizeof *x);
    for (size_t i = 0; i < n; i++)
        x[i] = (real)(scale * (2.0 * rng_uniform(rng) - 1.0));
    return x;
}

static Tensor host_tensor(void *p, size_t numel, DType dt) {
    Tensor t = {p, dt, DEVICE_CPU, numel};
    return t;
}

// FLOPs of the experts' GEMMs for `rows` routed rows: forward h13 (4FC per row) and out
// (2FC), backward dact (2FC), dw2 (2FC), dxp (4FC), dw13 (4FC).
static double expert_flops(size_t rows, size_t C, size_t F) { return 18.0 * rows * C * F; }

typedef struct {
    size_t E, C, F, M;
    real *w, *dw, *xp, *dxp, *yp, *dyp, *h13, *dh13, *act, *dact;
    int32_t *offsets; // (E+1)
} ExpertBufs;

static void expert_bufs_init(ExpertBufs *b, Rng *rng, size_t E, size_t rows, size_t C,
                             size_t F) {
    b->E = E, b->C = C, b->F = F, b->M = E * rows;
    b->w = random_buffer(rng, E * 3 * F * C, 1.0 / sqrt((double)C));
    b->xp = random_buffer(rng, b->M * C, 1.0);
    b->dyp = random_buffer(rng, b->M * C, 1.0);
    b->dw = CALLOC(E * 3 * F * C, sizeof(real));
    b->dxp = CALLOC(b->M * C, sizeof(real));
    b->yp = CALLOC(b->M * C, sizeof(real));
    b->h13 = CALLOC(b->M * 2 * F, sizeof(real));
    b->dh13 = CALLOC(b->M * 2 * F, sizeof(real));
    b->act = CALLOC(b->M * F, sizeof(real));
    b->dact = CALLOC(b->M * F, sizeof(real));
    b->offsets = CALLOC(E + 1, sizeof(int32_t));
    for (size_t e = 0; e <= E; e++)
        b->offsets[e] = (int32_t)(e * rows);
}

static void expert_bufs_free(ExpertBufs *b) {
    real *all[] = {b->w, b->dw, b->xp, b->dxp, b->yp, b->dyp, b->h13, b->dh13, b->act, b->dact};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        free(all[i]);
    free(b->offsets);
}

static double time_experts_op(const Backend *be, ExpertBufs *b) {
    size_t E = b->E, C = b->C, F = b->F, M = b->M;
    Tensor w = host_tensor(b->w, E * 3 * F * C, DTYPE_REAL);
    Tensor dw = host_tensor(b->dw, E * 3 * F * C, DTYPE_REAL);
    Tensor off = host_tensor(b->offsets, E + 1, DTYPE_I32);
    Tensor xp = host_tensor(b->xp, M * C, DTYPE_REAL),
           dxp = host_tensor(b->dxp, M * C, DTYPE_REAL);
    Tensor yp = host_tensor(b->yp, M * C, DTYPE_REAL),
           dyp = host_tensor(b->dyp, M * C, DTYPE_REAL);
    Tensor h13 = host_tensor(b->h13, M * 2 * F, DTYPE_REAL);
    Tensor dh13 = host_tensor(b->dh13, M * 2 * F, DTYPE_REAL);
    Tensor act = host_tensor(b->act, M * F, DTYPE_REAL);
    Tensor dact = host_tensor(b->dact, M * F, DTYPE_REAL);
    double best = INFINITY;
    for (int r = 0; r <= SWEEP_REPEATS; r++) { // the first run warms up
        double t0 = omp_get_wtime();
        be->experts_forward(yp, h13, act, xp, (ExpertRoute){0}, w, off, E, C, F);
        be->experts_backward(dxp, dw, NULL, dyp, dh13, dact, h13, act, xp, (ExpertRoute){0}, w, off, E, C, F);
        double s = omp_get_wtime() - t0;
        if (r > 0 && s < best) best = s;
    }
    return best;
}

// c (m, n) = op(a) op(b) + beta c, row-major, as kernels/cpu/dense.c calls it.
static void sgemm(int ta, int tb, size_t m, size_t n, size_t k, const real *a, size_t lda,
                  const real *b, size_t ldb, real beta, real *c, size_t ldc) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (int)m, (int)n, (int)k, 1.0f, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
}

// The six products of one expert's forward + backward over its rows, nothing else.
static void expert_gemms(ExpertBufs *b, size_t e) {
    size_t C = b->C, F = b->F, rows = b->M / b->E, r0 = e * rows;
    const real *w13 = b->w + e * 3 * F * C, *w2 = w13 + 2 * F * C;
    real *dw13 = b->dw + e * 3 * F * C, *dw2 = dw13 + 2 * F * C;
    real *x = b->xp + r0 * C, *h = b->h13 + r0 * 2 * F, *a = b->act + r0 * F;
    real *dy = b->dyp + r0 * C, *dh = b->dh13 + r0 * 2 * F, *da = b->dact + r0 * F;
    sgemm(0, 1, rows, 2 * F, C, x, C, w13, C, 0, h, 2 * F);
    sgemm(0, 1, rows, C, F, a, F, w2, F, 0, b->yp + r0 * C, C);
    sgemm(0, 0, rows, F, C, dy, C, w2, F, 0, da, F);
    sgemm(1, 0, C, F, rows, dy, C, a, F, 1, dw2, F);
    sgemm(0, 0, rows, C, 2 * F, dh, 2 * F, w13, C, 1, b->dxp + r0 * C, C);
    sgemm(1, 0, 2 * F, C, rows, dh, 2 * F, x, C, 1, dw13, C);
}

// The experts' GEMMs alone, shared out as the experts op does (kernels/cpu/dense.c):
// experts across threads when there are at least two per thread, else each product on
// every thread.
static double time_expert_gemms(ExpertBufs *b) {
    int by_thread = b->E >= 2 * (size_t)omp_get_max_threads();
    double best = INFINITY;
    for (int r = 0; r <= SWEEP_REPEATS; r++) {
        double t0 = omp_get_wtime();
        if (by_thread) {
#pragma omp parallel for schedule(dynamic, 1)
            for (size_t e = 0; e < b->E; e++)
                expert_gemms(b, e);
        } else {
            for (size_t e = 0; e < b->E; e++)
                expert_gemms(b, e);
        }
        double s = omp_get_wtime() - t0;
        if (r > 0 && s < best) best = s;
    }
    return best;
}

static void measure_expert_rates(LayerResult *out, Rng *rng) {
    for (size_t i = 0; i < BENCH_ROW_SIZES; i++)
        out->rate[i].rows = row_sizes[i];
    for (int round = 0; round < SWEEP_ROUNDS; round++)
        for (size_t i = 0; i < BENCH_ROW_SIZES; i++) {
            ExpertBufs b;
            expert_bufs_init(&b, rng, out->E, row_sizes[i], out->C, out->F);
            double flops = expert_flops(b.M, out->C, out->F);
            double op = flops / time_experts_op(backend_cpu(), &b) / 1e9;
            double gemm = flops / time_expert_gemms(&b) / 1e9;
            ExpertRate *r = &out->rate[i];
            r->op_gflops = op > r->op_gflops ? op : r->op_gflops;
            r->gemm_gflops = gemm > r->gemm_gflops ? gemm : r->gemm_gflops;
            expert_bufs_free(&b);
        }
}

// ---- the layer in a one-layer model -----------------------------------------------------

typedef struct {
    Model m;
    double *op_seconds; // (tape ops)
} LayerModel;

// The config's shape with one MoE layer, dropless (capacity would hide the skew), and a
// selection bias op in the tape (bias_gamma > 0; the bias is never updated here).
static void layer_model_init(LayerModel *lm, const RunConfig *rc, Rng *rng) {
    ModelConfig cfg = rc->model;
    cfg.layers = 1;
    cfg.moe_every = 1;
    cfg.capacity_factor = 0;
    cfg.bias_gamma = 1e-9;
    size_t B = (size_t)rc->train.batch_size, T = (size_t)cfg.seq_len;
    model_init(&lm->m, &cfg, backend_cpu(), B, T);
    model_init_weights(&lm->m, (uint64_t)rc->train.seed);
    int32_t *tok = CALLOC(2 * lm->m.N, sizeof *tok);
    for (size_t i = 0; i < 2 * lm->m.N; i++)
        tok[i] = (int32_t)(rng_next(rng) % (size_t)cfg.vocab);
    model_set_batch(&lm->m, tok, tok + lm->m.N);
    free(tok);
    lm->op_seconds = CALLOC(lm->m.tape.n, sizeof *lm->op_seconds);
}

static void layer_model_free(LayerModel *lm) {
    free(lm->op_seconds);
    lm->m.tape.op_seconds = NULL;
    model_free(&lm->m);
}

static double max_over_mean(const int32_t *off, size_t E) {
    int32_t most = 0;
    for (size_t e = 0; e < E; e++)
        if (off[e + 1] - off[e] > most) most = off[e + 1] - off[e];
    return (double)most / ((double)off[E] / (double)E);
}

// Forward with selection bias (E); returns the expert offsets (E+1), caller frees.
static int32_t *route_with_bias(LayerModel *lm, const real *bias) {
    size_t E = (size_t)lm->m.cfg.experts;
    lm->m.be->upload(lm->m.moe[0].bias, bias, E * sizeof(real));
    model_forward(&lm->m);
    int32_t *off = CALLOC(E + 1, sizeof *off);
    lm->m.be->download(off, lm->m.moe[0].offsets, (E + 1) * sizeof *off);
    return off;
}

// Selection biases (E) that balance the load (max/mean <= BALANCE_TARGET), the way
// DeepSeek-V3's bias balancing does it: b_i += gamma * sign(mean load - load_i), with a
// shrinking step; the best seen is kept. Random tokens through an untrained model
// route very unevenly.
static void balance_bias(LayerModel *lm, real *bias) {
    size_t E = (size_t)lm->m.cfg.experts;
    real *try = CALLOC(E, sizeof *try);
    double gamma = 0.2 / (double)E, best = INFINITY;
    for (int it = 0; it < BALANCE_STEPS && best > BALANCE_TARGET; it++, gamma *= 0.97) {
        int32_t *off = route_with_bias(lm, try);
        double r = max_over_mean(off, E), mean = (double)off[E] / (double)E;
        if (r < best) {
            best = r;
            memcpy(bias, try, E * sizeof *bias);
        }
        for (size_t e = 0; e < E; e++) {
            double load = off[e + 1] - off[e];
            try[e] += (real)(gamma * (load < mean ? 1.0 : load > mean ? -1.0 : 0.0));
        }
        free(off);
    }
    free(try);
}

// max/mean expert load of routing with `bias` plus beta on expert 0.
static double skew_with(LayerModel *lm, const real *bias, double beta, real *tmp) {
    size_t E = (size_t)lm->m.cfg.experts;
    memcpy(tmp, bias, E * sizeof *tmp);
    tmp[0] += (real)beta;
    int32_t *off = route_with_bias(lm, tmp);
    double r = max_over_mean(off, E);
    free(off);
    return r;
}

// skewed = balanced + beta on expert 0, beta bisected to max/mean SKEW_TARGET: at
// beta 1 expert 0 takes every token (max/mean E/k >= 2 for every config benched).
static void skew_bias(LayerModel *lm, const real *balanced, real *skewed) {
    size_t E = (size_t)lm->m.cfg.experts;
    double lo = 0.0, hi = 1.0, beta = 0.5;
    for (int it = 0; it < 40; it++) {
        beta = 0.5 * (lo + hi);
        double r = skew_with(lm, balanced, beta, skewed);
        if (fabs(r - SKEW_TARGET) < SKEW_TOLERANCE) break;
        if (r < SKEW_TARGET)
            lo = beta;
        else
            hi = beta;
    }
    memcpy(skewed, balanced, E * sizeof *skewed);
    skewed[0] += (real)beta;
}

// Forward + backward with the given bias; MoE ops' time by phase (router, dispatch,
// experts) into t (3); returns max/mean load.
static double time_layer_once(LayerModel *lm, const real *bias, double *t) {
    Model *m = &lm->m;
    size_t E = (size_t)m->cfg.experts;
    memset(lm->op_seconds, 0, m->tape.n * sizeof *lm->op_seconds);
    m->tape.op_seconds = lm->op_seconds;
    int32_t *off = route_with_bias(lm, bias);
    model_zero_grad(m);
    model_backward(m);
    m->tape.op_seconds = NULL;
    t[0] = t[1] = t[2] = 0.0;
    for (size_t i = 0; i < m->tape.n; i++) {
        Phase p = bench_op_phase(&m->tape, i);
        if (p == PHASE_ROUTER) t[0] += lm->op_seconds[i];
        if (p == PHASE_DISPATCH) t[1] += lm->op_seconds[i];
        if (p == PHASE_EXPERTS) t[2] += lm->op_seconds[i];
    }
    double r = max_over_mean(off, E);
    free(off);
    return r;
}

// Balanced and skewed repeats interleaved, so drift in the machine hits both alike.
static void measure_layer(LayerResult *out, const RunConfig *rc, Rng *rng) {
    LayerModel lm;
    layer_model_init(&lm, rc, rng);
    size_t E = (size_t)rc->model.experts;
    real *bias[2] = {CALLOC(E, sizeof(real)), CALLOC(E, sizeof(real))};
    balance_bias(&lm, bias[0]);
    skew_bias(&lm, bias[0], bias[1]);
    double best[2] = {INFINITY, INFINITY};
    for (int r = 0; r <= LAYER_REPEATS; r++)
        for (int s = 0; s < 2; s++) {
            double t[3], skew = time_layer_once(&lm, bias[s], t);
            if (r == 0 || t[0] + t[1] + t[2] >= best[s]) continue; // r = 0 warms up
            best[s] = t[0] + t[1] + t[2];
            out->max_mean[s] = skew;
            out->router_s[s] = t[0], out->dispatch_s[s] = t[1], out->experts_s[s] = t[2];
        }
    free(bias[0]);
    free(bias[1]);
    layer_model_free(&lm);
}

void bench_layer(LayerResult *out, const BenchConfig *config) {
    RunConfig rc;
    run_load_config(&rc, config->path, config->n_words, config->words);
    if (rc.train.threads > 0 && !getenv("OMP_NUM_THREADS"))
        omp_set_num_threads(rc.train.threads);
    bench_config_name(config, out->name, sizeof out->name);
    out->N = (size_t)rc.train.batch_size * (size_t)rc.model.seq_len;
    out->C = (size_t)rc.model.d_model;
    out->E = (size_t)rc.model.experts;
    out->k = (size_t)rc.model.top_k;
    out->F = (size_t)rc.model.expert_ffn_dim;
    Rng rng;
    rng_init(&rng, (uint64_t)rc.train.seed);
    measure_expert_rates(out, &rng);
    measure_layer(out, &rc, &rng);
}
