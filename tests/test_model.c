// test_model.c: every gradient of the whole model against central finite differences
// (fp64 build), for each router and layer configuration the foundation must support.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../model/model.h"
#include "../model/pool.h"
#include "testlib.h"

static double total_loss(void *ctx) { return model_forward((Model *)ctx).total; }

static size_t count_dropped(const Model *m) {
    size_t dropped = 0, nk = m->N * (size_t)m->cfg.top_k;
    for (int i = 0; i < m->n_moe; i++)
        for (size_t j = 0; j < nk; j++) dropped += TENSOR_I(m->moe[i].keep)[j] == 0;
    return dropped;
}

// Builds the model, runs forward/backward once, then checks every parameter tensor:
// all entries of small tensors, 24 random entries of larger ones. Returns the number of
// dropped assignments so callers can assert that capacity really dropped some.
static size_t check_model_gradients(const ModelConfig *cfg) {
    Model m;
    model_init(&m, cfg, backend_cpu(), 2, 5);
    model_randomize_weights(&m, 7);
    Rng rng;
    rng_init(&rng, 11);
    int32_t tok[20];
    test_rand_ints(&rng, tok, 2 * m.N, 11);
    model_set_batch(&m, tok, tok + m.N);
    model_draw_noise(&m, &rng);
    ModelLosses l = model_forward(&m);
    assert_true(isfinite(l.total) && l.ce > 0);
    size_t dropped = count_dropped(&m);
    model_zero_grad(&m);
    model_backward(&m);
    real *analytic = test_copy(TENSOR_R(m.grads), m.layout.total);
    for (size_t i = 0; i < m.layout.n_params; i++) {
        const ParamInfo *p = &m.layout.params[i];
        size_t n_check = p->numel <= 48 ? 0 : 24;
        test_fd_check(TENSOR_R(m.params) + p->offset, p->numel, analytic + p->offset,
                      total_loss, &m, n_check, &rng, 1e-5, 1e-8, p->name);
    }
    free(analytic);
    model_free(&m);
    return dropped;
}

static void test_softmax_top1(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.top_k = 1;
    c.renorm = 0;
    check_model_gradients(&c);
}

static void test_softmax_top2(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    check_model_gradients(&c);
}

static void test_sigmoid_top2(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.score = SCORE_SIGMOID;
    check_model_gradients(&c);
}

static void test_shazeer_noisy_top2(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.noise = NOISE_SHAZEER;
    check_model_gradients(&c);
}

static void test_jitter_top2(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.noise = NOISE_JITTER;
    c.jitter_eps = 0.1;
    check_model_gradients(&c);
}

static void test_capacity_position_drops(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.capacity_factor = 1.0;
    c.drop_policy = DROP_POSITION;
    assert_true(check_model_gradients(&c) > 0);
}

static void test_capacity_probs_drops(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.capacity_factor = 1.0;
    c.drop_policy = DROP_PROBS;
    assert_true(check_model_gradients(&c) > 0);
}

static void test_dropless(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.capacity_factor = 0;
    assert_int_equal(check_model_gradients(&c), 0);
}

static void test_shared_experts(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.shared_experts = 2;
    c.shared_ffn_dim = 5;
    check_model_gradients(&c);
}

// Qwen3-MoE: RMSNorm on every query and key head.
static void test_qk_norm_per_head(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.qk_norm = QK_NORM_HEAD;
    check_model_gradients(&c);
}

// OLMoE: RMSNorm over the whole query and key projections, top-k without renormalising.
static void test_qk_norm_whole_projection(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.qk_norm = QK_NORM_FULL;
    c.renorm = 0;
    check_model_gradients(&c);
}

// Qwen2-MoE: q/k/v biases and a shared expert behind a sigmoid gate, with a dense layer.
static void test_qkv_bias_gated_shared_expert(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.layers = 3;
    c.moe_every = 2;
    c.qkv_bias = 1;
    c.shared_experts = 1;
    c.shared_ffn_dim = 5;
    c.shared_gate = 1;
    c.renorm = 0;
    check_model_gradients(&c);
}

static void test_mla(void **state) {
    (void)state;
    ModelConfig c = tiny_mla_config();
    check_model_gradients(&c);
}

// DeepSeek-V2/V3: the compressed query path and YaRN (theta 10 and an original context
// of 16 put the ramp between the two rope pairs; mscale_all_dim changes the softmax scale),
// with a dense first layer and a shared expert.
static void test_mla_q_lora_yarn(void **state) {
    (void)state;
    ModelConfig c = tiny_mla_config();
    c.q_lora_rank = 6;
    c.rope_scaling = ROPE_SCALING_YARN;
    c.rope_theta = 10;
    c.rope_factor = 8;
    c.rope_orig_max_pos = 16;
    c.rope_mscale = 0.707;
    c.rope_mscale_all_dim = 1.0;
    c.moe_every = 2;
    c.shared_experts = 1;
    c.shared_ffn_dim = 5;
    check_model_gradients(&c);
}

static void test_dense_interleaved(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.layers = 3;
    c.moe_every = 2;
    check_model_gradients(&c);
}

static void test_tied_embeddings_mha(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.tie_embeddings = 1;
    c.kv_heads = 2;
    check_model_gradients(&c);
}

static void test_expert_choice(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.select = SELECT_EXPERT_CHOICE;
    c.capacity_factor = 1.5;
    check_model_gradients(&c);
}

static void test_sigmoid_bias_balancing(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.score = SCORE_SIGMOID;
    c.bias_gamma = 0.001;
    check_model_gradients(&c);
}

// DeepSeek-V2: a leading dense layer, softmax scores limited to the best 2 of 4 groups by
// each group's best score, gates not renormalised but scaled, a shared expert.
static void test_deepseek_v2_routing(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.layers = 3;
    c.first_dense_layers = 1;
    c.experts = 8;
    c.groups = 4;
    c.topk_groups = 2;
    c.renorm = 0;
    c.gate_scale = 2.0;
    c.shared_experts = 1;
    c.shared_ffn_dim = 5;
    check_model_gradients(&c);
}

// DeepSeek-V3 noaux_tc (tiny_deepseek_v3_config).
static void test_deepseek_v3_routing(void **state) {
    (void)state;
    ModelConfig c = tiny_deepseek_v3_config();
    check_model_gradients(&c);
}

// first_dense_layers joins the moe_every rule: with 6 layers, moe_every 2 and 2 leading
// dense layers the MoE layers are 3 and 5.
static void test_first_dense_layers(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.layers = 6;
    c.moe_every = 2;
    c.first_dense_layers = 2;
    int want[6] = {0, 0, 0, 1, 0, 1};
    for (int l = 0; l < 6; l++) assert_int_equal(model_config_is_moe_layer(&c, l), want[l]);
    assert_int_equal(model_config_moe_layers(&c), 2);
    assert_int_equal(model_config_moe_layer(&c, 0), 3);
    assert_int_equal(model_config_moe_layer(&c, 1), 5);
    assert_int_equal(model_config_moe_layer(&c, 2), -1);
    c.moe_every = 1;
    Model m;
    model_init(&m, &c, backend_cpu(), 1, 5);
    assert_int_equal(m.n_moe, 4);
    assert_int_equal(m.moe[0].layer, 2);
    assert_non_null(layout_find(&m.layout, "model.layers.1.mlp.gate_proj.weight"));
    assert_null(layout_find(&m.layout, "model.layers.1.block_sparse_moe.gate.weight"));
    assert_non_null(layout_find(&m.layout, "model.layers.2.block_sparse_moe.gate.weight"));
    model_free(&m);
}

static void test_sequence_lb(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.lb_type = LB_SEQ;
    c.aux_coef = 0.5;
    check_model_gradients(&c);
}

static void test_hash_routing(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.select = SELECT_HASH;
    check_model_gradients(&c);
}

// Perfectly balanced routing gives lb = 1.0 whatever k and E: with all router weights
// zero every score is 1/E and top-k ties resolve to experts 0..k-1 for every token, so
// instead force balance with k = E, where every expert gets every token.
static void test_lb_loss_is_one_when_balanced(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.top_k = c.experts;
    Model m;
    model_init(&m, &c, backend_cpu(), 2, 5);
    model_randomize_weights(&m, 3);
    int32_t tok[20] = {0};
    model_set_batch(&m, tok, tok + m.N);
    ModelLosses l = model_forward(&m);
    assert_true(fabs(l.lb - 1.0) < 1e-12);
    model_free(&m);
}

// The two sides of a gradient accumulation check, with the same weights: `full` takes a
// batch of 4 rows of T=5, `micro` takes it 2 rows at a time. tok gets the batch's inputs
// (20) then its targets (20), drawn from rng, which the pooled check draws on from there.
static void init_accum_models(const ModelConfig *c, Model *full, Model *micro, Rng *rng,
                              int32_t tok[40]) {
    model_init(full, c, backend_cpu(), 4, 5);
    model_init(micro, c, backend_cpu(), 2, 5);
    model_randomize_weights(full, 5);
    model_randomize_weights(micro, 5);
    rng_init(rng, 9);
    test_rand_ints(rng, tok, 40, 11);
}

// Gradient accumulation: two micro-batches of 2 rows, gradients summed and halved, equal
// one batch of 4 rows. Cross-entropy and z-loss are means over tokens, so they split
// exactly; the load-balancing loss uses each micro-batch's own routing counts (the local
// batch, see README), so it is switched off here.
static void test_grad_accum_matches_full_batch(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.aux_coef = 0;
    Model full, micro;
    Rng rng;
    int32_t tok[40];
    init_accum_models(&c, &full, &micro, &rng, tok);
    model_set_batch(&full, tok, tok + 20);
    double loss_full = model_forward(&full).total;
    model_zero_grad(&full);
    model_backward(&full);
    double loss_micro = 0;
    model_zero_grad(&micro);
    for (size_t half = 0; half < 2; half++) {
        model_set_batch(&micro, tok + 10 * half, tok + 20 + 10 * half);
        loss_micro += model_forward(&micro).total / 2;
        model_backward(&micro);
    }
    real *g = TENSOR_R(micro.grads);
    for (size_t i = 0; i < micro.layout.total; i++) g[i] /= 2;
    assert_true(fabs(loss_full - loss_micro) < 1e-12);
    test_assert_close(g, TENSOR_R(full.grads), full.layout.total, 1e-10, 1e-14,
                      "accumulated gradient");
    model_free(&full);
    model_free(&micro);
}

// Freezing: frozen tensors compute no weight gradient (theirs stay exactly zero) while
// every trainable gradient, which still flows through the frozen ones, is unchanged.
static void test_frozen_tensors_get_no_gradient(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.shared_experts = 1;
    c.shared_ffn_dim = 4;
    Model m;
    model_init(&m, &c, backend_cpu(), 2, 5);
    model_randomize_weights(&m, 3);
    int32_t tok[20];
    for (int i = 0; i < 20; i++) tok[i] = (i * 7) % 11;
    model_set_batch(&m, tok, tok + 10);
    model_forward(&m);
    model_zero_grad(&m);
    model_backward(&m);
    real *all = test_copy(TENSOR_R(m.grads), m.layout.total);

    uint8_t *trainable = calloc(m.layout.n_params, 1);
    for (size_t i = 0; i < m.layout.n_params; i++) {
        const ParamInfo *p = &m.layout.params[i];
        int frozen = (p->kind == PARAM_EXPERT && p->layer == 0 && p->expert == 1) ||
                     (p->kind == PARAM_ATTN && p->layer == 1) || p->kind == PARAM_EMBED ||
                     p->kind == PARAM_SHARED || (p->kind == PARAM_EXPERT && p->layer == 1);
        trainable[i] = (uint8_t)!frozen;
    }
    model_set_trainable(&m, trainable);
    model_forward(&m);
    model_zero_grad(&m);
    model_backward(&m);
    for (size_t i = 0; i < m.layout.n_params; i++) {
        const ParamInfo *p = &m.layout.params[i];
        const real *g = TENSOR_R(m.grads) + p->offset;
        for (size_t j = 0; j < p->numel; j++) {
            if (trainable[i]) {
                if (g[j] != all[p->offset + j]) fail_msg("%s[%zu] changed", p->name, j);
            } else if (g[j] != 0) {
                fail_msg("frozen %s has gradient %g", p->name, (double)g[j]);
            }
        }
    }
    free(trainable);
    free(all);
    model_free(&m);
}

// Gradient accumulation with every aux loss on: two micro-batches of 2 rows, their
// routing statistics pooled first (model/pool.h), give the losses and gradients of one
// batch of 4 rows. Shazeer noise is per token, so the micro-batches get the full batch's
// noise rows.
static void check_grad_accum_pooled(LbType lb_type) {
    ModelConfig c = tiny_config();
    c.lb_type = lb_type;
    c.aux_coef = 0.3;
    c.z_coef = 0.1;
    c.noise = NOISE_SHAZEER;
    c.noise_coef = 0.5;
    Model full, micro;
    Rng rng;
    int32_t tok[40];
    init_accum_models(&c, &full, &micro, &rng, tok);
    size_t per_layer = 20 * 4;   // (N, E) noise rows of the full batch
    real *eps = test_rand(&rng, 2 * per_layer, 1.5);
    for (int l = 0; l < 2; l++) memcpy(TENSOR_R(full.moe[l].eps), eps + l * per_layer, per_layer * sizeof(real));
    model_set_batch(&full, tok, tok + 20);
    ModelLosses want = model_forward(&full);
    model_zero_grad(&full);
    model_backward(&full);

    RoutingPool pool;
    routing_pool_init(&pool, &micro);
    for (int pass = 0; pass < 2; pass++) {   // pass 0 pools, pass 1 trains
        if (pass == 1) model_use_pool(&micro, &pool);
        model_zero_grad(&micro);
        for (size_t half = 0; half < 2; half++) {
            for (int l = 0; l < 2; l++)
                memcpy(TENSOR_R(micro.moe[l].eps), eps + l * per_layer + half * per_layer / 2,
                       per_layer / 2 * sizeof(real));
            model_set_batch(&micro, tok + 10 * half, tok + 20 + 10 * half);
            model_forward(&micro);
            if (pass == 0) routing_pool_add(&pool, &micro);
            else model_backward(&micro);
        }
    }
    ModelLosses got = routing_pool_losses(&pool, &micro);
    assert_true(want.lb > 0 && want.importance > 0 && want.load > 0);
    double w[5] = {want.total, want.ce, want.lb, want.importance, want.load};
    double g[5] = {got.total, got.ce, got.lb, got.importance, got.load};
    for (int i = 0; i < 5; i++)
        if (fabs(w[i] - g[i]) > 1e-12 * (1 + fabs(w[i])))
            fail_msg("pooled loss %d: %.15g, one batch %.15g", i, g[i], w[i]);
    real *gm = TENSOR_R(micro.grads);
    for (size_t i = 0; i < micro.layout.total; i++) gm[i] /= 2;
    test_assert_close(gm, TENSOR_R(full.grads), full.layout.total, 1e-10, 1e-14,
                      "pooled accumulated gradient");
    model_use_pool(&micro, NULL);
    routing_pool_free(&pool);
    free(eps);
    model_free(&full);
    model_free(&micro);
}

// ---- precision of products: a CPU backend that records the mode of each product ---------

static Backend g_recording;
static int g_bf16, g_router_bf16, g_other_fp32, g_experts_fp32, g_products;

static void record_set_gemm_bf16(int bf16) { g_bf16 = bf16; }

static void record_matmul(size_t M) {
    g_products++;
    if (M == 4) g_router_bf16 += g_bf16;   // (N, E) outputs: the router's gate and noise
    else g_other_fp32 += !g_bf16;
}

static void recording_matmul_forward(Tensor out, Tensor x, Tensor w, size_t N, size_t K,
                                     size_t M) {
    record_matmul(M);
    backend_cpu()->matmul_forward(out, x, w, N, K, M);
}

static void recording_matmul_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w,
                                      size_t N, size_t K, size_t M) {
    record_matmul(M);
    backend_cpu()->matmul_backward(dx, dw, dout, x, w, N, K, M);
}

static void recording_experts_forward(Tensor yp, Tensor h13, Tensor act, Tensor xp,
                                      ExpertRoute route, Tensor w, Tensor offsets, size_t E,
                                      size_t C, size_t F) {
    g_experts_fp32 += !g_bf16;
    backend_cpu()->experts_forward(yp, h13, act, xp, route, w, offsets, E, C, F);
}

static const Backend *recording_backend(void) {
    g_recording = *backend_cpu();
    g_recording.name = "recording";
    g_recording.set_gemm_bf16 = record_set_gemm_bf16;
    g_recording.matmul_forward = recording_matmul_forward;
    g_recording.matmul_backward = recording_matmul_backward;
    g_recording.experts_forward = recording_experts_forward;
    return &g_recording;
}

// Under bf16 products every matmul and expert product runs with the backend's bf16 mode on
// but the router's (gate and Shazeer noise), forward and backward; a model without bf16
// on the same backend runs all its products in fp32 whatever the mode was left at.
static void test_bf16_products_spare_the_router(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.noise = NOISE_SHAZEER;
    char err[256];
    Model cpu;
    model_init(&cpu, &c, backend_cpu(), 2, 5);
    assert_int_equal(model_set_precision(&cpu, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "fp32 only"));
    model_free(&cpu);
    const Backend *be = recording_backend();
    Model m, plain;
    model_init(&m, &c, be, 2, 5);
    model_init(&plain, &c, be, 2, 5);
    model_randomize_weights(&m, 3);
    assert_int_equal(model_set_precision(&m, 1, err, sizeof err), 0);
    int32_t tok[20] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    model_set_batch(&m, tok, tok + m.N);
    model_forward(&m);
    model_zero_grad(&m);
    model_backward(&m);
    assert_true(g_products > 0);
    assert_int_equal(g_router_bf16, 0);
    assert_int_equal(g_other_fp32, 0);
    assert_int_equal(g_experts_fp32, 0);
    g_bf16 = 1;   // left on by m; plain must switch it off for itself
    model_set_batch(&plain, tok, tok + plain.N);
    model_forward(&plain);
    assert_true(g_other_fp32 > 0 && g_experts_fp32 > 0);
    model_free(&plain);
    model_free(&m);
}

// ---- attention state planned per precision: a CPU backend posing as a fused kernel -------
// Under bf16 it plans B*H*T values of attention state and no datt, as cuDNN's fused
// attention does; its ops check they got exactly that and compute through a private
// (B, H, T, T) buffer per layer, so the model's numbers stay the CPU backend's.

#define FUSED_LAYERS 4
static Backend g_fused;
static int g_fused_bf16, g_fused_calls;
static struct {
    void *att;   // the model's state buffer: the key
    real *probs;
} g_fused_probs[FUSED_LAYERS];

static void fused_set_gemm_bf16(int bf16) { g_fused_bf16 = bf16; }

static const void *g_weights_copied;   // the buffer given a bf16 copy, NULL: none
static void fused_set_bf16_weights(Tensor w, int on) {
    if (on) g_weights_copied = w.data;
    else if (g_weights_copied == w.data) g_weights_copied = NULL;
}

static void fused_plan(size_t *att, size_t *datt, size_t B, size_t T, size_t H, size_t KV,
                       size_t D, int bf16) {
    (void)KV, (void)D;
    *att = bf16 ? B * H * T : B * H * T * T;
    *datt = bf16 ? 0 : B * H * T * T;
}

static real *fused_probs_for(Tensor att, size_t numel) {
    for (int i = 0; i < FUSED_LAYERS; i++) {
        if (!g_fused_probs[i].att) {
            g_fused_probs[i].att = att.data;
            g_fused_probs[i].probs = calloc(numel, sizeof(real));
        }
        if (g_fused_probs[i].att == att.data) return g_fused_probs[i].probs;
    }
    fail_msg("more attention layers than the test expects");
    return NULL;
}

static void fused_forward(Tensor out, Tensor att, Tensor qkv, size_t B, size_t T, size_t H,
                          size_t KV, size_t D) {
    size_t bhtt = B * H * T * T;
    if (!g_fused_bf16) {
        assert_int_equal(att.numel, bhtt);
        backend_cpu()->attention_forward(out, att, qkv, B, T, H, KV, D);
        return;
    }
    g_fused_calls++;
    assert_int_equal(att.numel, B * H * T);
    Tensor probs = {fused_probs_for(att, bhtt), DTYPE_REAL, DEVICE_CPU, bhtt};
    backend_cpu()->attention_forward(out, probs, qkv, B, T, H, KV, D);
}

static void fused_backward(Tensor dqkv, Tensor datt, Tensor dout, Tensor out, Tensor qkv,
                           Tensor att, size_t B, size_t T, size_t H, size_t KV, size_t D) {
    size_t bhtt = B * H * T * T;
    if (!g_fused_bf16) {
        backend_cpu()->attention_backward(dqkv, datt, dout, out, qkv, att, B, T, H, KV, D);
        return;
    }
    g_fused_calls++;
    assert_int_equal(datt.numel, 0);
    Tensor probs = {fused_probs_for(att, bhtt), DTYPE_REAL, DEVICE_CPU, bhtt};
    real *scratch = calloc(bhtt, sizeof(real));
    Tensor ds = {scratch, DTYPE_REAL, DEVICE_CPU, bhtt};
    backend_cpu()->attention_backward(dqkv, ds, dout, out, qkv, probs, B, T, H, KV, D);
    free(scratch);
}

static const Backend *fused_backend(void) {
    g_fused = *backend_cpu();
    g_fused.name = "fused-attention stand-in";
    g_fused.set_gemm_bf16 = fused_set_gemm_bf16;
    g_fused.attention_plan = fused_plan;
    g_fused.attention_forward = fused_forward;
    g_fused.attention_backward = fused_backward;
    g_fused.set_bf16_weights = fused_set_bf16_weights;
    return &g_fused;
}

static size_t attention_state(const Model *m) {
    size_t n = 0;
    for (size_t i = 0; i < m->tape.n; i++)
        if (m->tape.ops[i].kind == OP_ATTENTION) n += m->tape.ops[i].attention.att.numel;
    return n;
}

// Switching to bf16 plans the activations again (less attention state, a smaller arena),
// gives the weights a bf16 copy, keeps frozen tensors frozen, and a replica follows its
// model; the losses and gradients
// are the CPU backend's bit for bit (the stand-in computes in fp32 whatever the mode).
static void test_attention_state_follows_precision(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    size_t B = 2, T = 5, H = (size_t)c.heads, L = (size_t)c.layers;
    const Backend *be = fused_backend();
    Model m, ref;
    model_init(&m, &c, be, B, T);
    model_init(&ref, &c, backend_cpu(), B, T);
    model_randomize_weights(&m, 4);
    model_randomize_weights(&ref, 4);
    uint8_t *trainable = calloc(m.layout.n_params, 1);
    memset(trainable, 1, m.layout.n_params);
    trainable[0] = 0;   // a frozen embedding: lost flags would give m a gradient there
    model_set_trainable(&m, trainable);
    model_set_trainable(&ref, trainable);
    size_t fp32_acts = m.acts.size;
    assert_int_equal(attention_state(&m), L * B * H * T * T);
    char err[256];
    assert_int_equal(model_set_precision(&m, 1, err, sizeof err), 0);
    assert_ptr_equal(g_weights_copied, m.params.data);   // the weights get a bf16 copy
    assert_int_equal(attention_state(&m), L * B * H * T);
    assert_true(m.acts.size < fp32_acts);
    Model r;
    model_init_replica(&r, &m);
    assert_int_equal(attention_state(&r), L * B * H * T);
    model_free_replica(&r);

    int32_t tok[20] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    Model *both[2] = {&m, &ref};
    ModelLosses loss[2];
    for (int i = 0; i < 2; i++) {
        model_set_batch(both[i], tok, tok + 10);
        loss[i] = model_forward(both[i]);
        model_zero_grad(both[i]);
        model_backward(both[i]);
    }
    assert_true(g_fused_calls == 2 * (int)L);
    assert_memory_equal(&loss[0].total, &loss[1].total, sizeof loss[0].total);
    size_t n = m.layout.total;
    assert_memory_equal(TENSOR_R(m.grads), TENSOR_R(ref.grads), n * sizeof(real));

    assert_int_equal(model_set_precision(&m, 0, err, sizeof err), 0);
    assert_null(g_weights_copied);   // fp32 products need no copy
    assert_int_equal(attention_state(&m), L * B * H * T * T);
    assert_int_equal(m.acts.size, fp32_acts);
    for (int i = 0; i < FUSED_LAYERS; i++) free(g_fused_probs[i].probs);
    free(trainable);
    model_free(&m);
    model_free(&ref);
}

// The experts' h13 and act take the dtype the backend names for the precision: the tape
// plans them (and only them) in bf16 under bf16 products, and back in fp32 after.
static DType bf16_state(int bf16) { return bf16 ? DTYPE_BF16 : DTYPE_REAL; }

static size_t experts_state_bytes(const Model *m, DType *dtype) {
    size_t bytes = 0;
    for (size_t i = 0; i < m->tape.n; i++) {
        const TapeOp *op = &m->tape.ops[i];
        if (op->kind != OP_EXPERTS) continue;
        assert_int_equal(op->experts.h13.dtype, op->experts.act.dtype);
        *dtype = op->experts.h13.dtype;
        bytes += (op->experts.h13.numel + op->experts.act.numel) * dtype_size(*dtype);
    }
    return bytes;
}

static void test_experts_state_follows_precision(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    Backend be = *backend_cpu();
    be.set_gemm_bf16 = fused_set_gemm_bf16;
    be.experts_state_dtype = bf16_state;
    Model m;
    model_init(&m, &c, &be, 2, 5);
    DType dt;
    size_t fp32_acts = m.acts.size, fp32_state = experts_state_bytes(&m, &dt);
    assert_int_equal(dt, DTYPE_REAL);
    char err[256];
    assert_int_equal(model_set_precision(&m, 1, err, sizeof err), 0);
    size_t bf16_bytes = experts_state_bytes(&m, &dt);
    assert_int_equal(dt, DTYPE_BF16);
    assert_int_equal(bf16_bytes * sizeof(real), fp32_state * 2);
    assert_true(m.acts.size < fp32_acts);
    assert_int_equal(model_set_precision(&m, 0, err, sizeof err), 0);
    assert_int_equal(experts_state_bytes(&m, &dt), fp32_state);
    assert_int_equal(m.acts.size, fp32_acts);
    model_free(&m);
}

static void test_grad_accum_pooled_aux_losses(void **state) {
    (void)state;
    check_grad_accum_pooled(LB_BATCH);
}

static void test_grad_accum_pooled_sequence_lb(void **state) {
    (void)state;
    check_grad_accum_pooled(LB_SEQ);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_bf16_products_spare_the_router),
    cmocka_unit_test(test_attention_state_follows_precision),
    cmocka_unit_test(test_experts_state_follows_precision),
    cmocka_unit_test(test_grad_accum_pooled_aux_losses),
    cmocka_unit_test(test_grad_accum_pooled_sequence_lb),
    cmocka_unit_test(test_frozen_tensors_get_no_gradient),
    cmocka_unit_test(test_grad_accum_matches_full_batch),
    cmocka_unit_test(test_softmax_top1),
    cmocka_unit_test(test_softmax_top2),
    cmocka_unit_test(test_sigmoid_top2),
    cmocka_unit_test(test_shazeer_noisy_top2),
    cmocka_unit_test(test_jitter_top2),
    cmocka_unit_test(test_capacity_position_drops),
    cmocka_unit_test(test_capacity_probs_drops),
    cmocka_unit_test(test_dropless),
    cmocka_unit_test(test_shared_experts),
    cmocka_unit_test(test_qk_norm_per_head),
    cmocka_unit_test(test_qk_norm_whole_projection),
    cmocka_unit_test(test_qkv_bias_gated_shared_expert),
    cmocka_unit_test(test_dense_interleaved),
    cmocka_unit_test(test_mla),
    cmocka_unit_test(test_mla_q_lora_yarn),
    cmocka_unit_test(test_tied_embeddings_mha),
    cmocka_unit_test(test_lb_loss_is_one_when_balanced),
    cmocka_unit_test(test_expert_choice),
    cmocka_unit_test(test_sigmoid_bias_balancing),
    cmocka_unit_test(test_deepseek_v2_routing),
    cmocka_unit_test(test_deepseek_v3_routing),
    cmocka_unit_test(test_first_dense_layers),
    cmocka_unit_test(test_sequence_lb),
    cmocka_unit_test(test_hash_routing),
};

TEST_MAIN(tests)
