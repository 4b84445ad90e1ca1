// kernels.h: the op interface every backend implements.
//
// Defines: the element type `real` of the CPU build, the buffer descriptor `Tensor`,
// and `Backend`, the table of forward/backward op pairs through which the model reaches
// compute, generated from the op list (ops.def). Nothing here knows what a transformer
// is: ops see buffers and sizes.
//
// Conventions shared by every op:
// - Shapes are given as op arguments and written in comments; a Tensor's `numel` is the
//   capacity of its buffer (ops may use fewer rows, e.g. routed rows counted at run time).
// - Row-major storage; a weight W used as y = x W^T has shape (out, in), as in PyTorch.
// - Forward ops overwrite their outputs. Backward ops ACCUMULATE (+=) into every
//   gradient they produce; the caller zeroes gradient buffers once per step.
// - A gradient Tensor whose `data` is NULL is not wanted: the op skips that product
//   (a frozen weight computes no weight gradient).
// - Integer buffers (token ids, expert indices, offsets) are int32.
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

// The CPU backend is compiled twice: fp32 for training and fp64 for the gradient tests
// (finite differences need double precision to mean anything).
#ifdef MOE_REAL_F64
typedef double real;
#define DTYPE_REAL DTYPE_F64
#else
typedef float real;
#define DTYPE_REAL DTYPE_F32
#endif

typedef enum { DTYPE_F32, DTYPE_F64, DTYPE_BF16, DTYPE_I32 } DType;
typedef enum { DEVICE_CPU, DEVICE_CUDA } Device;

typedef struct {
    void *data; // NULL: buffer absent (e.g. gradient not wanted)
    DType dtype;
    Device device;
    size_t numel; // elements the buffer holds
} Tensor;

size_t dtype_size(DType dt);
Tensor tensor_none(void);
// A view of `numel` elements starting `offset` elements into `t`; keeps NULL as NULL.
Tensor tensor_slice(Tensor t, size_t offset, size_t numel);

#define TENSOR_R(t) ((real *)(t).data)
#define TENSOR_I(t) ((int32_t *)(t).data)

// The dispatch fused into the experts op (ops.def, experts_forward/_backward). rows.data
// NULL: nothing fused, the op reads xp (and dyp). Else the experts read their input row m
// as x[rows[m]] (x (N, C), rows (M) int32: dispatch_plan's rows) and, when dy.data, the
// backward reads its output gradient row m as gates[n, j] dy[n] for the (n, j) with
// slot[n, j] = m (dy (N, C), gates and slot (N, k): combine's operands), which is what
// combine's backward would have added into a zeroed dyp; and, when dgates.data too, the
// backward adds combine's gate gradients dgates[n, j] += dot(dy[n], yp[slot[n, j]])
// (dgates (N, k), yp (M, C): the experts' outputs), so combine's backward has nothing left.
typedef struct {
    Tensor x, rows, dy, gates, slot;
    size_t k;
    Tensor yp, dgates;
} ExpertRoute;

typedef enum { SCORE_SOFTMAX = 0, SCORE_SIGMOID = 1 } ScoreFunc;
// RoPE's frequencies for the MLA ops (rope_math.h): base theta and, when yarn is set,
// YaRN's scaling (factor, original context, beta_fast, beta_slow, mscale, mscale_all_dim).
typedef struct {
    double theta;
    int yarn;
    double factor, orig_max_pos, beta_fast, beta_slow, mscale, mscale_all_dim;
} RopeSpec;
typedef enum { DROP_POSITION = 0, DROP_PROBS = 1 } DropPolicy;
// A group's score for group-limited routing: its best expert (DeepSeek-V2's
// group_limited_greedy) or the sum of its two best (DeepSeek-V3's noaux_tc).
typedef enum { GROUP_SCORE_MAX = 0, GROUP_SCORE_TOP2 = 1 } GroupScore;

// How route_topk_forward selects and weighs (docs/routing.md, "Group-limited routing"):
// the E experts form `groups` equal groups of consecutive indices, only the
// `topk_groups` best groups compete for the k places (groups == topk_groups: plain
// top-k); gates are the scores of the chosen, over their sum when renorm, times `scale`
// (DeepSeek's routed_scaling_factor).
typedef struct {
    ScoreFunc func;
    int renorm;
    size_t groups, topk_groups;
    GroupScore group_score;
    double scale;
} RouteSpec;

// The op table: one function pointer per entry of ops.def (the op list, with each op's
// semantics and shapes).
typedef struct Backend {
    const char *name;
    Device device;
#define KERNEL(ret, fn, params) ret(*fn) params;
#define KERNEL_HOOK KERNEL
#include "ops.def"
#undef KERNEL
#undef KERNEL_HOOK
} Backend;

// The CPU backend: C, OpenBLAS and OpenMP. Always built.
const Backend *backend_cpu(void);

#endif
