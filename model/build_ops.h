// build_ops.h: what the tape builders share (internal to model/).
//
// build_tape (build.c) lays the decoder out as tape ops; the MoE layer's stages have
// files of their own: build_router.c (router logits, noise, scores, top-k, gates),
// build_aux_losses.c (balance and z losses), build_dispatch.c (capacity, dispatch,
// experts, combine). Each stage takes its activations from the model's arenas through
// the Builder, so the same code measures the arenas (base NULL) and then lays them out.
#ifndef MOE_BUILD_OPS_H
#define MOE_BUILD_OPS_H

#include "model.h"

typedef struct {
    Model *m;
    size_t N, C; // tokens of the micro-batch (B*T), model width
} Builder;

// The router's outputs that later stages read.
typedef struct {
    Buf clean, raw, logits, scores, gates; // (N, E) x4, (N, slots)
} RouterBufs;

// A differentiable activation (value and gradient), or a plain one of any dtype.
Buf build_take_buf(Builder *b, size_t numel);
Tensor build_take(Builder *b, size_t numel, DType dt);
// 1 in the measuring pass (no buffers yet: nothing may be uploaded).
int build_is_measuring(const Builder *b);
// The parameter named by fmt (with i, j), or a run of consecutive parameters from it that
// one op computes with (all trainable or all frozen), and its gradient when it trains.
Buf build_param(Builder *b, size_t numel, const char *fmt, int i, int j);
// A layer's routed experts (E * 3FC values) with the per-expert trainable flags in
// st's slice of m->expert_train.
Buf build_expert_weights(Builder *b, int l, size_t numel, MoeLayerState *st);

// Ops every stage uses; each returns its output. Shapes: x (N, C) unless given.
Buf build_rmsnorm(Builder *b, Buf x, Buf w);
Buf build_rmsnorm_width(Builder *b, Buf x, Buf w, size_t width); // x (N, width)
// numel values of x (and of its gradient) from offset.
Buf build_slice(Buf x, size_t offset, size_t numel);
Buf build_matmul(Builder *b, Buf x, Buf w, size_t rows, size_t in, size_t out);
Buf build_matmul_fp32(Builder *b, Buf x, Buf w, size_t rows, size_t in, size_t out);
Buf build_add(Builder *b, Buf x, Buf y, size_t n);
Buf build_experts(Builder *b, Buf xp, Buf w, Tensor offsets, size_t rows, size_t E, size_t F);
Buf build_swiglu_all(Builder *b, Buf x, Buf w, size_t F);

// Multi-head latent attention (build_mla.c): layer l's attention output after o_proj
// (N, C) from the normalised residual xn (N, C); under a KV cache its decode form.
Buf build_mla_attention(Builder *b, Buf xn, int l);

// The MoE layer's stages, in order.
Buf build_router_input(Builder *b, Buf xn, MoeLayerState *st);
RouterBufs build_router(Builder *b, Buf xr, int l, MoeLayerState *st);
void build_aux_losses(Builder *b, const RouterBufs *r, MoeLayerState *st);
Buf build_routed_experts(Builder *b, Buf xn, const RouterBufs *r, int l, MoeLayerState *st);

#endif
