// cpu_ops.h: the CPU backend's op implementations (C, OpenBLAS, OpenMP).
//
// Each cpu_<name> implements the op list's entry <name> (kernels/ops.def: semantics and
// shapes; kernels.h: the accumulate-in-backward rule).
//
// memory.c: alloc/zero; elementwise.c: add, mul; dense.c: embedding,
// RMSNorm, matmul, SwiGLU, experts, cross-entropy; attention.c: RoPE and
// attention (a head's blocks: attention_tiles.h); attention_decode.c: attention over a KV cache (generation);
// router.c: scores, noise, top-k, gates, the fused top-k route; capacity.c: capacity; dispatch.c: dispatch plan, gather, combine;
// aux_losses.c: load-balancing, z, importance and load losses, row
// normalisation; router_variants.c: expert bias, hash routing, expert choice;
// optim.c: the AdamW update and the sum of squares. The router files share
// their per-row arithmetic with the CUDA backend through ../router_math.h.
#ifndef MOE_CPU_OPS_H
#define MOE_CPU_OPS_H

#include "../kernels.h"

// CPU_CLONES before a function: GCC compiles it for x86-64-v4 (AVX-512), x86-64-v3 (AVX2)
// and the baseline, and the loader picks the widest the CPU runs (an ifunc). The build is
// for the baseline (SSE2), so this is how an element loop gets wide vectors. Only for
// loops without reductions across lanes: each lane does the same operations whatever the
// width, and C11 mode leaves multiply-adds unfused, so every clone gives the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPU_CLONES
#endif

// c (m, n) = alpha op(a) op(b) + beta c through BLAS (sgemm, or dgemm in the fp64 build),
// row-major, op(x) = x^T when trans_x is set. Inside an OpenMP parallel region the
// OpenMP build of OpenBLAS runs it on the calling thread alone.
void cpu_gemm(int trans_a, int trans_b, size_t m, size_t n, size_t k, real alpha, const real *a,
              size_t lda, const real *b, size_t ldb, real beta, real *c, size_t ldc);
// Dies naming `op` when one of the n expert indices idx lies outside [0, E) (router.c;
// the capacity, dispatch and aux-loss ops check their inputs with it).
void cpu_check_experts(const int32_t *idx, size_t n, size_t E, const char *op);

// sum_c a[c] b[c], or sum_c a[c] w[c] b[c] when w is given, each term in double (dense.c).
// Summed in double lanes added in a fixed order: no wait on one running sum, and the same
// bits from every caller and instruction set (RMSNorm's rows, combine's gate gradients
// and the experts' with the combine fused in).
double cpu_row_dot(const real *a, const real *b, const real *w, size_t C);

// RoPE's rotation (attention.c), shared by the training op and the decode-time one
// (attention_decode.c): cs (D/2, 2) = cos, sin of sign * a_i at position t, with
// a_i = t * theta^(-2i/D) (kernels.h); cpu_rope_row rotates the first `heads` heads of
// one row of D-wide heads by those angles, in double.
void cpu_rope_angles(double *cs, size_t t, size_t D, double theta, double sign);
void cpu_rope_row(real *row, const double *cs, size_t heads, size_t D);
// The attention tiles' instruction set (attention_tiles.h): "avx512", "avx2" or "base".
// NULL returns the one in use; a name forces that variant from then on (the tests compare
// them; forcing one the CPU lacks would fault).
const char *cpu_attention_tiles(const char *name);

// cpu_<name> for every KERNEL of the op list. Of the KERNEL_HOOKs the CPU sets one:
// attention_plan (attention.c: fused attention keeps a logsumexp per query).
#define KERNEL(ret, fn, params) ret cpu_##fn params;
#define KERNEL_HOOK(ret, fn, params)
#include "../ops.def"
#undef KERNEL
#undef KERNEL_HOOK
void cpu_attention_plan(size_t *att_numel, size_t *datt_numel, size_t B, size_t T, size_t H,
                        size_t KV, size_t D, int bf16);

#endif
