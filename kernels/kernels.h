// kernels.h: the op interface every backend implements.
//
// Defines: the element type `real` of the CPU build, the buffer descriptor `Tensor`,
// and `Backend`, the table of forward/backward op pairs through which the model reaches
// compute. Nothing here knows what a transformer is: ops see buffers and sizes.
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
    void *data;     // NULL: buffer absent (e.g. gradient not wanted)
    DType dtype;
    Device device;
    size_t numel;   // elements the buffer holds
} Tensor;

size_t dtype_size(DType dt);
Tensor tensor_none(void);
// A view of `numel` elements starting `offset` elements into `t`; keeps NULL as NULL.
Tensor tensor_slice(Tensor t, size_t offset, size_t numel);

#define TENSOR_R(t) ((real *)(t).data)
#define TENSOR_I(t) ((int32_t *)(t).data)

typedef enum { SCORE_SOFTMAX = 0, SCORE_SIGMOID = 1 } ScoreFunc;
typedef enum { DROP_POSITION = 0, DROP_PROBS = 1 } DropPolicy;

typedef struct Backend {
    const char *name;
    Device device;

    // ---- memory ---------------------------------------------------------------
    void *(*alloc)(size_t bytes);            // zeroed, 64-byte aligned; NULL on failure
    void (*release)(void *p);
    void (*zero)(Tensor t, size_t numel);
    // Copies between host memory and a backend buffer.
    void (*upload)(Tensor dst, const void *src, size_t bytes);
    void (*download)(void *dst, Tensor src, size_t bytes);

    // ---- elementwise ----------------------------------------------------------
    // out (n) = a + b.  Backward: da += dout, db += dout.
    void (*add_forward)(Tensor out, Tensor a, Tensor b, size_t n);
    void (*add_backward)(Tensor da, Tensor db, Tensor dout, size_t n);
    // out (n) = x * u, u a constant (e.g. Switch jitter).  Backward: dx += dout * u.
    void (*mul_forward)(Tensor out, Tensor x, Tensor u, size_t n);
    void (*mul_backward)(Tensor dx, Tensor dout, Tensor u, size_t n);

    // ---- embedding ------------------------------------------------------------
    // out (N, C) = table (V, C)[tokens (N)].  Backward: dtable[tokens[n]] += dout[n].
    void (*embedding_forward)(Tensor out, Tensor tokens, Tensor table, size_t N, size_t C);
    void (*embedding_backward)(Tensor dtable, Tensor dout, Tensor tokens, size_t N, size_t C);

    // ---- RMSNorm --------------------------------------------------------------
    // rstd (N) = 1 / sqrt(mean_c x^2 + eps);  out (N, C) = x * rstd * w (C).
    void (*rmsnorm_forward)(Tensor out, Tensor rstd, Tensor x, Tensor w, size_t N, size_t C,
                            double eps);
    void (*rmsnorm_backward)(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w,
                             Tensor rstd, size_t N, size_t C);

    // ---- matmul (BLAS gemm) ---------------------------------------------------
    // out (N, M) = x (N, K) @ w (M, K)^T.
    // Backward: dx (N, K) += dout @ w;  dw (M, K) += dout^T @ x.
    void (*matmul_forward)(Tensor out, Tensor x, Tensor w, size_t N, size_t K, size_t M);
    void (*matmul_backward)(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, size_t N,
                            size_t K, size_t M);

    // ---- RoPE (Hugging Face rotate-half convention) ------------------------------
    // qkv (B*T, (H + 2*KV) * D): per row, H query heads, then KV key heads, then KV value
    // heads, each D wide. Rotates the query and key heads in place; position = t.
    // For a head x = [x1 | x2] (D/2 each), angle a_i = t * theta^(-2i/D):
    //   x1' = x1 cos a - x2 sin a,   x2' = x2 cos a + x1 sin a.
    // Backward rotates the query and key gradients in place by -a: the one backward that
    // transforms rather than accumulates, so it must run after every op that adds into
    // dqkv (the tape guarantees it: attention is rope's only consumer).
    void (*rope_forward)(Tensor qkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                         double theta);
    void (*rope_backward)(Tensor dqkv, size_t B, size_t T, size_t H, size_t KV, size_t D,
                          double theta);

    // ---- causal attention with grouped KV heads ---------------------------------
    // Query head h reads key/value head h / (H / KV). Scores scaled by 1/sqrt(D), causal
    // mask, softmax over keys. out (B*T, H*D). att keeps what the backward needs: the
    // probabilities (B, H, T, T) (entries above the diagonal are 0), or, where
    // attention_plan says so, a fused kernel's softmax statistics.
    void (*attention_forward)(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T,
                              size_t H, size_t KV, size_t D);
    // dqkv (B*T, (H+2KV)*D) +=; datt is scratch; out is the forward's output.
    void (*attention_backward)(Tensor dqkv, Tensor datt, Tensor dout, Tensor out, Tensor qkv,
                               Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t D);
    // How many values att and datt hold for this shape when the attention ops run under
    // bf16 products (bf16 != 0) or fp32: B*H*T*T each where the probabilities are kept,
    // B*H*T and 0 for a fused kernel that keeps one logsumexp per query and recomputes
    // the rest. NULL: the probabilities, always (the CPU).
    void (*attention_plan)(size_t *att_numel, size_t *datt_numel, size_t B, size_t T,
                           size_t H, size_t KV, size_t D, int bf16);

    // ---- SwiGLU -----------------------------------------------------------------
    // h13 (N, 2F) holds [x w1^T | x w3^T] per row; out (N, F) = silu(h1) * h3.
    void (*swiglu_forward)(Tensor out, Tensor h13, size_t N, size_t F);
    void (*swiglu_backward)(Tensor dh13, Tensor dout, Tensor h13, size_t N, size_t F);

    // ---- grouped SwiGLU experts over contiguous permuted rows ---------------------
    // Rows [offsets[e], offsets[e+1]) of xp belong to expert e (offsets (E+1) int32,
    // offsets[0] = 0). Expert e's weights start at w + e * 3*F*C: w1 (F, C), w3 (F, C),
    // w2 (C, F), so [w1; w3] is one (2F, C) matrix.
    //   h13 (M, 2F) = xp w13^T;  act (M, F) = silu(h1) * h3;  yp (M, C) = act w2^T.
    void (*experts_forward)(Tensor yp, Tensor h13, Tensor act, Tensor xp, Tensor w,
                            Tensor offsets, size_t E, size_t C, size_t F);
    // dxp (M, C) +=; dw (E * 3FC) += for experts whose train[e] != 0 (train NULL: all;
    // dw.data NULL: none). dh13 (M, 2F) and dact (M, F) are scratch.
    // h13 and act are the op's own state between forward and backward: real, or the dtype
    // experts_state_dtype names (bf16 under bf16 products on CUDA: the up projection's
    // output rounded to bf16, as autocast stores a matmul's output).
    void (*experts_backward)(Tensor dxp, Tensor dw, const uint8_t *train, Tensor dyp,
                             Tensor dh13, Tensor dact, Tensor h13, Tensor act, Tensor xp,
                             Tensor w, Tensor offsets, size_t E, size_t C, size_t F);
    // The dtype of the experts' h13 and act under bf16 products (bf16 != 0) or fp32.
    // NULL: real.
    DType (*experts_state_dtype)(int bf16);

    // ---- cross-entropy ------------------------------------------------------------
    // lse (N) = logsumexp(logits (N, V)); loss (1) = mean_n (lse[n] - logits[n, targets[n]]).
    void (*crossentropy_forward)(Tensor loss, Tensor lse, Tensor logits, Tensor targets,
                                 size_t N, size_t V);
    // dlogits += dloss * (softmax(logits) - onehot(targets)) / N.
    void (*crossentropy_backward)(Tensor dlogits, Tensor logits, Tensor lse, Tensor targets,
                                  double dloss, size_t N, size_t V);

    // ---- router: scores, noise, selection ------------------------------------------
    // scores (N, E) = softmax over E of logits, or elementwise sigmoid.
    void (*router_scores_forward)(Tensor scores, Tensor logits, size_t N, size_t E,
                                  ScoreFunc func);
    void (*router_scores_backward)(Tensor dlogits, Tensor dscores, Tensor scores, size_t N,
                                   size_t E, ScoreFunc func);
    // Shazeer noisy logits: h (n) = clean + eps * softplus(raw), eps ~ N(0,1) given.
    void (*noisy_logits_forward)(Tensor h, Tensor clean, Tensor raw, Tensor eps, size_t n);
    void (*noisy_logits_backward)(Tensor dclean, Tensor draw, Tensor dh, Tensor raw,
                                  Tensor eps, size_t n);
    // idx (N, k) = indices of the k largest vals (N, E) per row, largest first; equal
    // values: lower expert index first. 1 <= k <= E, k <= 8.
    void (*topk_forward)(Tensor idx, Tensor vals, size_t N, size_t E, size_t k);
    // gates (N, k): g[n,j] = scores[n, idx[n,j]] / (renorm ? sum_j' scores[n, idx[n,j']] : 1).
    void (*gates_forward)(Tensor gates, Tensor scores, Tensor idx, size_t N, size_t E,
                          size_t k, int renorm);
    void (*gates_backward)(Tensor dscores, Tensor dgates, Tensor scores, Tensor idx, size_t N,
                           size_t E, size_t k, int renorm);
    // Top-k routing as one op. With Shazeer noise (raw.data not NULL) first h (N, E) =
    // noisy logits of (logits, raw, eps) and the scores are of h; without, of logits.
    // scores (N, E) = router_scores; idx (N, k) = the top-k of scores + bias (bias (E);
    // data NULL: the scores alone); gates (N, k) as gates_forward(scores, idx, renorm).
    // The results of noisy_logits_forward, router_scores_forward, add_bias_forward,
    // topk_forward and gates_forward in turn, bit for bit; the CUDA backend runs them as
    // one kernel. Backward: gates_backward, router_scores_backward, noisy_logits_backward.
    void (*route_topk_forward)(Tensor scores, Tensor idx, Tensor gates, Tensor h, Tensor logits,
                               Tensor raw, Tensor eps, Tensor bias, size_t N, size_t E,
                               size_t k, ScoreFunc func, int renorm);
    // keep (N, k) int32: 1 if assignment (n, j) fits in expert idx[n,j]'s capacity
    // (capacity 0: dropless, all kept). Policy DROP_POSITION: assignments ranked by choice
    // j first, then token n (all first choices before any second choice). DROP_PROBS:
    // ranked by gate descending, ties by (j, n) as in DROP_POSITION.
    void (*capacity_forward)(Tensor keep, Tensor idx, Tensor gates, size_t N, size_t E,
                             size_t k, size_t capacity, DropPolicy policy);

    // out (N, E) = s + b (b (E) broadcast over rows): DeepSeek-V3 selects experts on
    // score + expert bias. Forward only: the bias shifts selection, gradients skip it.
    void (*add_bias_forward)(Tensor out, Tensor s, Tensor b, size_t N, size_t E);
    // Hash routing (Roller et al. 2021): idx (N, k) = k distinct experts per token from a
    // fixed hash of its id: h = splitmix64(token), idx[n, j] = (h + j) % E. k <= E.
    void (*hash_route_forward)(Tensor idx, Tensor tokens, size_t N, size_t E, size_t k);
    // Expert choice (Zhou et al. 2022): keep (N, E) int32 = 1 where expert e takes token n:
    // each expert takes its `capacity` highest scores (N, E) over tokens, ties to the
    // lower token index. A token may be taken by 0..E experts.
    void (*expert_choice_forward)(Tensor keep, Tensor scores, size_t N, size_t E,
                                  size_t capacity);

    // ---- dispatch / combine ---------------------------------------------------------
    // Counting sort of the kept assignments by expert (stable in token order):
    // offsets (E+1) prefix sums of kept rows per expert; rows (N*k) permuted row ->
    // token; slot (N, k) assignment -> permuted row, or -1 when dropped.
    void (*dispatch_plan)(Tensor offsets, Tensor rows, Tensor slot, Tensor idx, Tensor keep,
                          size_t N, size_t E, size_t k);
    // xp (M, C) = x (N, C)[rows], M = offsets[E].  Backward: dx[rows[m]] += dxp[m].
    void (*gather_rows_forward)(Tensor xp, Tensor x, Tensor rows, Tensor offsets, size_t E,
                                size_t C);
    void (*gather_rows_backward)(Tensor dx, Tensor dxp, Tensor rows, Tensor offsets, size_t E,
                                 size_t C);
    // y (N, C) = sum_j gates[n,j] * yp[slot[n,j]] over kept assignments (0 if none).
    void (*combine_forward)(Tensor y, Tensor yp, Tensor gates, Tensor slot, size_t N,
                            size_t k, size_t C);
    // dyp[slot] += g * dy[n];  dgates[n,j] += <dy[n], yp[slot[n,j]]> (kept only).
    void (*combine_backward)(Tensor dyp, Tensor dgates, Tensor dy, Tensor yp, Tensor gates,
                             Tensor slot, size_t N, size_t k, size_t C);

    // ---- auxiliary losses (each writes an unscaled scalar loss (1)) -------------------
    // Load balancing (Switch/Megatron normalisation, 1.0 when balanced), over G groups of
    // N/G consecutive rows (G = 1: the batch; G = B: per sequence, DeepSeek), averaged:
    //   loss = mean_g E / (k n) * sum_i count_gi * P_gi, n = N/G rows per group,
    //   count_gi = #{(n,j) in group g: idx[n,j] = i} (before capacity), P_gi = mean over the
    //   group's rows of probs[n, i]. counts (G, E) int32 and pmean (G, E) = P are outputs
    //   (pmean.data NULL: not wanted), so statistics can be pooled over micro-batches.
    void (*lb_loss_forward)(Tensor loss, Tensor counts, Tensor pmean, Tensor probs, Tensor idx,
                            size_t N, size_t E, size_t k, size_t G);
    void (*lb_loss_backward)(Tensor dprobs, Tensor counts, double dloss, size_t N, size_t E,
                             size_t k, size_t G);
    // p (N, E) = s / sum_e s per row (sigmoid scores made a distribution for lb loss).
    void (*normalize_rows_forward)(Tensor p, Tensor s, size_t N, size_t E);
    void (*normalize_rows_backward)(Tensor ds, Tensor dp, Tensor s, size_t N, size_t E);
    // z-loss: lse (N) = logsumexp(logits (N, E)); loss = mean_n lse^2.
    void (*zloss_forward)(Tensor loss, Tensor lse, Tensor logits, size_t N, size_t E);
    void (*zloss_backward)(Tensor dlogits, Tensor logits, Tensor lse, double dloss, size_t N,
                           size_t E);
    // Shazeer importance loss: imp (E) = sum_n gates into each expert; loss = CV^2(imp),
    // CV^2 = population variance / mean^2 (mean^2 + 1e-10 guards the empty case).
    void (*importance_loss_forward)(Tensor loss, Tensor imp, Tensor gates, Tensor idx,
                                    size_t N, size_t E, size_t k);
    void (*importance_loss_backward)(Tensor dgates, Tensor imp, Tensor idx, double dloss,
                                     size_t N, size_t E, size_t k);
    // Shazeer load loss: load (E) = sum_n Phi((clean[n,i] - thr[n,i]) / softplus(raw[n,i]))
    // with thr the k-th largest of h[n, :] excluding i: for i among idx[n,:] (the top-k of
    // h) that is the largest h outside the top-k; otherwise h[n, idx[n,k-1]]. Needs k < E.
    // loss = CV^2(load). Gradients reach clean, h (through thr) and raw.
    void (*load_loss_forward)(Tensor loss, Tensor load, Tensor clean, Tensor h, Tensor raw,
                              Tensor idx, size_t N, size_t E, size_t k);
    void (*load_loss_backward)(Tensor dclean, Tensor dh, Tensor draw, Tensor load,
                               Tensor clean, Tensor h, Tensor raw, Tensor idx, double dloss,
                               size_t N, size_t E, size_t k);

    // ---- optimizer ---------------------------------------------------------------------
    // One AdamW step over n elements, in torch.optim.AdamW's order of operations, with
    // bias_c1 = 1 - beta1^t, bias_c2 = 1 - beta2^t for step t >= 1:
    //   g' = g * grad_scale                   (accumulation and clipping factors)
    //   p *= 1 - lr * weight_decay            (decoupled decay, before the Adam step)
    //   m = beta1 m + (1 - beta1) g'
    //   v = beta2 v + (1 - beta2) g'^2
    //   p -= (lr / bias_c1) * m / (sqrt(v) / sqrt(bias_c2) + eps)
    // Updates p, m, v (n) in place; g is read only.
    void (*adamw_update)(Tensor p, Tensor g, Tensor m, Tensor v, size_t n, double lr,
                         double beta1, double beta2, double eps, double weight_decay,
                         double bias_c1, double bias_c2, double grad_scale);
    // sum_i x[i]^2 over n elements, accumulated in double; the same result for the same
    // input and thread count (gradient norms must not wobble between identical runs).
    double (*sum_squares)(Tensor x, size_t n);

    // ---- precision of matrix products ----------------------------------------------------
    // bf16 != 0: the products of matmul and experts ops from now on round their operands
    // to bfloat16 (round to nearest even) and accumulate and write fp32, as autocast does;
    // 0: plain fp32. The tape sets it before every op with products (the router's stay
    // fp32). NULL: the backend has fp32 products only.
    void (*set_gemm_bf16)(int bf16);
    // on != 0: keep a bf16 copy of w (the model's parameters: fp32 master weights) that bf16
    // products read instead of rounding w in every call; adamw_update writes it alongside
    // the fp32 values, other writes into w make the backend round it anew before its next
    // use, so products see exactly the rounding of the current w. One buffer at a time
    // (on replaces the last); on = 0 releases w's copy. NULL: none (the CPU).
    void (*set_bf16_weights)(Tensor w, int on);
    // grouped != 0: the experts op issues each of its products as one grouped GEMM over the
    // experts; 0: one product per expert. The same numbers up to the order of fp32 sums.
    // NULL: the backend has one way only.
    void (*set_expert_gemm)(int grouped);

    // Waits until every op issued so far has finished (timing an asynchronous device);
    // NULL: ops finish before they return (the CPU).
    void (*synchronize)(void);
} Backend;

// The CPU backend: C, OpenBLAS and OpenMP. Always built.
const Backend *backend_cpu(void);

#endif
