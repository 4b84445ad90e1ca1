// bench.h: `make bench`, the CPU benchmark (never a test): the machine's own peaks, then
// training steps per config split into phases, then one MoE layer alone, then generation
// through the KV cache.
//
// Every measurement runs in a child process (bench.c) so that each reports its own peak
// RSS and none inherits another's OpenMP or OpenBLAS state. The measuring functions
// below run in that child and fill a plain struct the parent reads through a pipe.
#ifndef MOE_BENCH_H
#define MOE_BENCH_H

#include <stddef.h>

#include "../model/tape.h"

#define BENCH_NAME_MAX 96

// A config file and the section.key=value words applied over it, as `moe train` takes them.
typedef struct {
    const char *path;
    char **words;
    int n_words;
} BenchConfig;

// "path word word ...", for the output.
void bench_config_name(const BenchConfig *c, char *out, size_t len);

// ---- peaks (peak.c) -------------------------------------------------------------------

typedef struct {
    double sgemm_gflops; // the higher of the two below: the sgemm peak MFU is taken against
    double sgemm_shared_gflops; // one square sgemm shared by all threads, best of repeats
    double sgemm_split_gflops;  // one square sgemm per thread at once (how the experts run)
    size_t sgemm_n;
    double fma_gflops;      // register-only fmadd loop, widest ISA the CPU has
    double fma_avx2_gflops; // the same loop on 256-bit vectors (the Haswell kernel's ceiling)
    char fma_isa[16];       // "AVX-512" or "AVX2"
    char kernel[BENCH_NAME_MAX]; // OpenBLAS's kernel, e.g. "Haswell"
    char origin[BENCH_NAME_MAX]; // who chose it (kernels/cpu/blas.h)
    char threading[16];          // OpenBLAS's threading: "OpenMP" shares our pool
    int threads;
} PeakResult;

void bench_measure_peaks(PeakResult *out, size_t sgemm_n);
// Best-of-BENCH_REPEATS GFLOP/s of c (m, n) = a (m, k) b (n, k)^T, all threads.
double bench_sgemm_gflops(size_t m, size_t n, size_t k);

#define BENCH_REPEATS 10

// ---- training steps (train_bench.c) -------------------------------------------------

// Where a training step's time goes. Router: gate (and noise) matmuls, scores, top-k,
// gates, capacity, aux losses. Dispatch: the counting-sort plan, gather, combine.
// Experts: every SwiGLU (routed, shared, dense). Pool: the extra forward pass that pools
// aux-loss statistics over micro-batches (router.aux_scope = batch, grad_accum > 1).
// Other: embedding, norms, residual adds, lm_head, cross-entropy, zeroing, noise.
typedef enum {
    PHASE_ATTENTION,
    PHASE_ROUTER,
    PHASE_DISPATCH,
    PHASE_EXPERTS,
    PHASE_OPTIMIZER,
    PHASE_POOL,
    PHASE_OTHER,
    PHASE_COUNT
} Phase;

extern const char *const bench_phase_names[PHASE_COUNT];
// The phase of the tape's op i (forward and backward alike).
Phase bench_op_phase(const Tape *t, size_t i);

typedef struct {
    char name[BENCH_NAME_MAX];
    size_t params, active;       // total and active per token
    size_t tokens_per_step;      // batch_size * seq_len * grad_accum
    double flops_per_token;      // 6 * active + 12 * layers * seq_len * d_model
    double expert_flops;         // the routed experts' share of flops_per_token
    double kept;                 // kept share of the routed assignments (capacity drops)
    double acts_mb, dacts_mb;    // activation and activation-gradient arenas
    double step_s;               // the fastest step
    double phase_s[PHASE_COUNT]; // that step, by phase
    double untaped_s;            // the part of PHASE_OTHER outside tape ops
    double attention_s;          // that step's attention op alone (forward + backward)
    double attention_flops;      // its GEMM FLOPs on the causal half, backward's recompute in
    int steps, threads;
} TrainResult;

// Runs warm-up plus at least `steps` optimizer steps on random tokens (more while less
// than `min_seconds` have passed) and keeps the fastest.
void bench_train(TrainResult *out, const BenchConfig *config, int steps, double min_seconds);

// ---- one MoE layer alone (layer_bench.c) ------------------------------------------------

typedef struct {
    size_t rows;        // per expert
    double op_gflops;   // experts_forward + experts_backward (GEMMs and SwiGLU)
    double gemm_gflops; // their GEMMs alone
} ExpertRate;

#define BENCH_ROW_SIZES 5

typedef struct {
    char name[BENCH_NAME_MAX];
    size_t N, C, E, k, F;
    ExpertRate rate[BENCH_ROW_SIZES];
    // [0] balanced, [1] skewed: max/mean load, and the layer's forward + backward time
    // (best repeat) split into router, dispatch/combine and experts.
    double max_mean[2];
    double router_s[2], dispatch_s[2], experts_s[2];
} LayerResult;

void bench_layer(LayerResult *out, const BenchConfig *config);

// ---- generation (gen_bench.c) -------------------------------------------------------------

#define BENCH_GEN_CONTEXTS 2

// Generated tokens/s of one sequence (greedy, CPU) after 64 and 512 tokens of context:
// through the KV cache, and by a full forward over the context per token (no cache).
typedef struct {
    char name[BENCH_NAME_MAX];
    size_t context[BENCH_GEN_CONTEXTS];
    double cached_tok_s[BENCH_GEN_CONTEXTS];
    double full_tok_s[BENCH_GEN_CONTEXTS];
    int threads;
} GenResult;

void bench_generate(GenResult *out, const BenchConfig *config);

// ---- the GPU (gpu_bench.c, bench --gpu) ---------------------------------------------------

#define BENCH_GPU_LAYOUTS 2

// One expert layout: N tokens, E experts, top-k, d_model C, expert width F; seconds of
// the experts op's forward, dgrad and wgrad, [0] balanced and [1] skewed (expert 0 at
// twice the mean load), one cuBLAS call per expert (train.expert_gemm = loop); balanced
// as grouped GEMMs (= grouped); and the loop with every row in one expert (dense, equal
// FLOPs).
typedef struct {
    char name[BENCH_NAME_MAX];
    size_t E, k, C, F, N;
    double grouped_s[2][3];
    double grouped_gemm_s[3];
    double dense_s[3];
    double flops_per_pass; // 6 * N*k * C * F, each of forward, dgrad and wgrad
} GpuLayoutResult;

// Causal attention of B sequences of T, H query heads of D sharing KV heads: seconds of
// the attention op's forward and backward, [0] the plain fp32 kernels, [1] under bf16
// products (cuDNN's fused kernel where `fused`, else the plain kernels again).
typedef struct {
    size_t B, T, H, KV, D;
    int fused;
    double s[2][2];
    double flops[2];   // forward 2 B H T^2 D (causal half of QK^T and PV), backward 2.5x
} GpuAttentionResult;

typedef struct {
    char why_not[512]; // non-empty: no GPU measurement, and why
    char device[256];
    double peak_gflops; // dense bf16 GEMM, fp32 accumulate, peak_n^3
    size_t peak_n;
    GpuLayoutResult layout[BENCH_GPU_LAYOUTS];
    GpuAttentionResult attention;
} GpuResult;

void bench_gpu(GpuResult *out);

#endif
