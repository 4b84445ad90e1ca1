// cpu_ops.h: the CPU backend's op implementations (C, OpenBLAS, OpenMP).
//
// Each function implements the Backend entry of the same name without the
// `cpu_` prefix; semantics, shapes and the accumulate-in-backward rule are in
// kernels.h. memory.c: alloc/zero; elementwise.c: add, mul; dense.c: embedding,
// RMSNorm, matmul, SwiGLU, experts, cross-entropy; attention.c: RoPE and
// attention; router.c: scores, noise, top-k, gates, the fused top-k route;
// capacity.c: capacity; dispatch.c: dispatch plan, gather, combine;
// aux_losses.c: load-balancing, z, importance and load losses, row
// normalisation; router_variants.c: expert bias, hash routing, expert choice;
// optim.c: the AdamW update and the sum of squares. The router files share
// their per-row arithmetic with the CUDA backend through ../router_math.h.
#ifndef MOE_CPU_OPS_H
#define MOE_CPU_OPS_H

#include "../kernels.h"

// c (m, n) = alpha op(a) op(b) + beta c through BLAS (sgemm, or dgemm in the fp64 build),
// row-major, op(x) = x^T when trans_x is set. Inside an OpenMP parallel region the
// OpenMP build of OpenBLAS runs it on the calling thread alone.
void cpu_gemm(int trans_a, int trans_b, size_t m, size_t n, size_t k, real alpha, const real *a,
              size_t lda, const real *b, size_t ldb, real beta, real *c, size_t ldc);
// Dies naming `op` when one of the n expert indices idx lies outside [0, E) (router.c;
// the capacity, dispatch and aux-loss ops check their inputs with it).
void cpu_check_experts(const int32_t *idx, size_t n, size_t E, const char *op);

void *cpu_alloc(size_t bytes);
void cpu_release(void *p);
void cpu_zero(Tensor t, size_t numel);
void cpu_upload(Tensor dst, const void *src, size_t bytes);
void cpu_download(void *dst, Tensor src, size_t bytes);
void cpu_add_forward(Tensor out, Tensor a, Tensor b, size_t n);
void cpu_add_backward(Tensor da, Tensor db, Tensor dout, size_t n);
void cpu_mul_forward(Tensor out, Tensor x, Tensor u, size_t n);
void cpu_mul_backward(Tensor dx, Tensor dout, Tensor u, size_t n);
void cpu_embedding_forward(Tensor out, Tensor tokens, Tensor table, size_t N, size_t C);
void cpu_embedding_backward(Tensor dtable, Tensor dout, Tensor tokens, size_t N, size_t C);
void cpu_rmsnorm_forward(Tensor out, Tensor rstd, Tensor x, Tensor w, size_t N, size_t C,
                         double eps);
void cpu_rmsnorm_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, Tensor rstd,
                          size_t N, size_t C);
void cpu_matmul_forward(Tensor out, Tensor x, Tensor w, size_t N, size_t K, size_t M);
void cpu_matmul_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, size_t N,
                         size_t K, size_t M);
void cpu_rope_forward(Tensor qkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                      double theta);
void cpu_rope_backward(Tensor dqkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                       double theta);
void cpu_attention_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T, size_t H,
                           size_t KV, size_t D);
void cpu_attention_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor out, Tensor qkv,
                            Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t D);
void cpu_swiglu_forward(Tensor out, Tensor h13, size_t N, size_t F);
void cpu_swiglu_backward(Tensor dh13, Tensor dout, Tensor h13, size_t N, size_t F);
void cpu_experts_forward(Tensor yp, Tensor h13, Tensor act, Tensor xp, Tensor w, Tensor offsets,
                         size_t E, size_t C, size_t F);
void cpu_experts_backward(Tensor dxp, Tensor dw, const uint8_t *train, Tensor dyp, Tensor dh13,
                          Tensor dact, Tensor h13, Tensor act, Tensor xp, Tensor w,
                          Tensor offsets, size_t E, size_t C, size_t F);
void cpu_crossentropy_forward(Tensor loss, Tensor lse, Tensor logits, Tensor targets, size_t N,
                              size_t V);
void cpu_crossentropy_backward(Tensor dlogits, Tensor logits, Tensor lse, Tensor targets,
                               double dloss, size_t N, size_t V);
void cpu_router_scores_forward(Tensor scores, Tensor logits, size_t N, size_t E,
                               ScoreFunc func);
void cpu_router_scores_backward(Tensor dlogits, Tensor dscores, Tensor scores, size_t N,
                                size_t E, ScoreFunc func);
void cpu_noisy_logits_forward(Tensor h, Tensor clean, Tensor raw, Tensor eps, size_t n);
void cpu_noisy_logits_backward(Tensor dclean, Tensor draw, Tensor dh, Tensor raw, Tensor eps,
                               size_t n);
void cpu_topk_forward(Tensor idx, Tensor vals, size_t N, size_t E, size_t k);
void cpu_gates_forward(Tensor gates, Tensor scores, Tensor idx, size_t N, size_t E, size_t k,
                       int renorm);
void cpu_route_topk_forward(Tensor scores, Tensor idx, Tensor gates, Tensor h, Tensor logits,
                            Tensor raw, Tensor eps, Tensor bias, size_t N, size_t E, size_t k,
                            ScoreFunc func, int renorm);
void cpu_gates_backward(Tensor dscores, Tensor dgates, Tensor scores, Tensor idx, size_t N,
                        size_t E, size_t k, int renorm);
void cpu_capacity_forward(Tensor keep, Tensor idx, Tensor gates, size_t N, size_t E, size_t k,
                          size_t capacity, DropPolicy policy);
void cpu_dispatch_plan(Tensor offsets, Tensor rows, Tensor slot, Tensor idx, Tensor keep,
                       size_t N, size_t E, size_t k);
void cpu_gather_rows_forward(Tensor xp, Tensor x, Tensor rows, Tensor offsets, size_t E,
                             size_t C);
void cpu_gather_rows_backward(Tensor dx, Tensor dxp, Tensor rows, Tensor offsets, size_t E,
                              size_t C);
void cpu_combine_forward(Tensor y, Tensor yp, Tensor gates, Tensor slot, size_t N, size_t k,
                         size_t C);
void cpu_combine_backward(Tensor dyp, Tensor dgates, Tensor dy, Tensor yp, Tensor gates,
                          Tensor slot, size_t N, size_t k, size_t C);
void cpu_lb_loss_forward(Tensor loss, Tensor counts, Tensor pmean, Tensor probs, Tensor idx,
                         size_t N, size_t E, size_t k, size_t G);
void cpu_lb_loss_backward(Tensor dprobs, Tensor counts, double dloss, size_t N, size_t E,
                          size_t k, size_t G);
void cpu_normalize_rows_forward(Tensor p, Tensor s, size_t N, size_t E);
void cpu_normalize_rows_backward(Tensor ds, Tensor dp, Tensor s, size_t N, size_t E);
void cpu_zloss_forward(Tensor loss, Tensor lse, Tensor logits, size_t N, size_t E);
void cpu_zloss_backward(Tensor dlogits, Tensor logits, Tensor lse, double dloss, size_t N,
                        size_t E);
void cpu_importance_loss_forward(Tensor loss, Tensor imp, Tensor gates, Tensor idx, size_t N,
                                 size_t E, size_t k);
void cpu_importance_loss_backward(Tensor dgates, Tensor imp, Tensor idx, double dloss, size_t N,
                                  size_t E, size_t k);
void cpu_load_loss_forward(Tensor loss, Tensor load, Tensor clean, Tensor h, Tensor raw,
                           Tensor idx, size_t N, size_t E, size_t k);
void cpu_load_loss_backward(Tensor dclean, Tensor dh, Tensor draw, Tensor load, Tensor clean,
                            Tensor h, Tensor raw, Tensor idx, double dloss, size_t N, size_t E,
                            size_t k);
void cpu_adamw_update(Tensor p, Tensor g, Tensor m, Tensor v, size_t n, double lr, double beta1,
                      double beta2, double eps, double weight_decay, double bias_c1,
                      double bias_c2, double grad_scale);
double cpu_sum_squares(Tensor x, size_t n);void cpu_add_bias_forward(Tensor out, Tensor s, Tensor b, size_t N, size_t E);
void cpu_hash_route_forward(Tensor idx, Tensor tokens, size_t N, size_t E, size_t k);
void cpu_expert_choice_forward(Tensor keep, Tensor scores, size_t N, size_t E, size_t capacity);

#endif
