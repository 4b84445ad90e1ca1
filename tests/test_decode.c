// test_decode.c: generation through the KV cache (model_init_decode) against the training
// path's full forward, and the choice of the next token against its definitions.
//
// (a) For every configuration generation accepts, B sequences fed one token per forward
// give at every position the logits the full causal forward gives over the whole
// sequence (fp64: within 1e-9). A capacity-limited config decodes dropless: it equals
// the full forward of the same weights with router.capacity_factor = 0.
// (b) top-k 1 is greedy; top-k and top-p draw only inside their sets, with frequencies
// near the renormalised softmax (a fixed generator seed: no flakiness).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../model/model.h"
#include "../train/sample_pick.h"
#include "testlib.h"

enum { B = 3, T = 7 };

// Logits (B*T, V) of the full forward over tokens (B, T) without router noise.
static real *full_logits(const ModelConfig *c, const int32_t *tokens, Model *m) {
    model_init(m, c, backend_cpu(), B, T);
    model_randomize_weights(m, 5);
    int32_t targets[B * T] = {0};
    model_clear_noise(m);
    model_set_batch(m, tokens, targets);
    model_forward(m);
    size_t V = (size_t)c->vocab;
    return test_copy(TENSOR_R(m->logits.v), B * T * V);
}

// The same through the cache, position by position; src gives the weights.
static real *decode_logits(const ModelConfig *c, const int32_t *tokens, const Model *src) {
    size_t V = (size_t)c->vocab;
    Model d;
    model_init_decode(&d, c, backend_cpu(), B, T);
    memcpy(TENSOR_R(d.params), TENSOR_R(src->params), src->layout.total * sizeof(real));
    memcpy(TENSOR_R(d.expert_bias), TENSOR_R(src->expert_bias),
           src->expert_bias.numel * sizeof(real));
    real *out = test_zeros(B * T * V);
    for (int t = 0; t < T; t++) {
        int32_t tok[B], zero[B] = {0}, pos[B];
        for (int b = 0; b < B; b++) {
            tok[b] = tokens[b * T + t];
            pos[b] = t;
        }
        model_set_batch(&d, tok, zero);
        model_set_positions(&d, pos);
        model_forward(&d);
        for (int b = 0; b < B; b++)
            memcpy(out + ((size_t)b * T + t) * V, TENSOR_R(d.logits.v) + (size_t)b * V,
                   V * sizeof(real));
    }
    model_free(&d);
    return out;
}

// decode(c) against the full forward of `full` (c itself, or c made dropless).
static void check_decode(ModelConfig c, ModelConfig full) {
    c.seq_len = full.seq_len = T;
    int32_t tokens[B * T];
    Rng r;
    rng_init(&r, 3);
    test_rand_ints(&r, tokens, B * T, (uint64_t)c.vocab);
    Model m;
    real *want = full_logits(&full, tokens, &m);
    real *got = decode_logits(&c, tokens, &m);
    test_assert_close(got, want, B * T * (size_t)c.vocab, 1e-9, 1e-10, "decode logits");
    free(want);
    free(got);
    model_free(&m);
}

static void check_same(ModelConfig c) { check_decode(c, c); }

static void test_decode_mixtral_top2(void **state) {
    (void)state;
    check_same(tiny_config());
}

static void test_decode_is_dropless_under_capacity(void **state) {
    (void)state;
    ModelConfig c = tiny_config(), dropless = c;
    c.capacity_factor = 0.5;
    dropless.capacity_factor = 0;
    check_decode(c, dropless);
}

static void test_decode_olmoe_qk_norm_full(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.qk_norm = QK_NORM_FULL;
    c.renorm = 0;
    c.top_k = 4;
    check_same(c);
}

static void test_decode_qwen3_qk_norm_head_dense(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.qk_norm = QK_NORM_HEAD;
    c.layers = 3;
    c.moe_every = 2;
    check_same(c);
}

static void test_decode_qwen2_bias_gated_shared(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.qkv_bias = 1;
    c.shared_experts = 1;
    c.shared_ffn_dim = 5;
    c.shared_gate = 1;
    c.renorm = 0;
    check_same(c);
}

static void test_decode_shared_experts_tied_mha(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.shared_experts = 2;
    c.shared_ffn_dim = 5;
    c.tie_embeddings = 1;
    c.kv_heads = 2;
    check_same(c);
}

static void test_decode_sigmoid_expert_bias(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.score = SCORE_SIGMOID;
    c.bias_gamma = 0.001;
    c.lb_type = LB_SEQ;
    check_same(c);
}

// DeepSeek-V3 routing: a leading dense layer, a frozen bias, group-limited, scaled gates.
static void test_decode_deepseek_v3_routing(void **state) {
    (void)state;
    check_same(tiny_deepseek_v3_config());
}

static void test_decode_noisy_routers_without_noise(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.noise = NOISE_SHAZEER;
    check_same(c);
    c.noise = NOISE_JITTER;
    check_same(c);
}

// MLA: the cache keeps latents and rotated k_pe; each step attends in the absorbed form.
static void test_decode_mla(void **state) {
    (void)state;
    check_same(tiny_mla_config());
}

static void test_decode_mla_q_lora_yarn(void **state) {
    (void)state;
    ModelConfig c = tiny_mla_config();
    c.q_lora_rank = 4;
    c.rope_scaling = ROPE_SCALING_YARN;
    c.rope_theta = 10;
    c.rope_factor = 8;
    c.rope_orig_max_pos = 16;
    c.rope_mscale = 0.707;
    c.rope_mscale_all_dim = 1.0;
    check_same(c);
}

static void test_decode_hash_routing(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.select = SELECT_HASH;
    check_same(c);
}

// ---- the next token --------------------------------------------------------------------

enum { V = 6, DRAWS = 20000 };
static const real LOGITS[V] = {0.5, 2.0, -1.0, 1.5, 1.0, 0.0};   // order: 1, 3, 4, 0, 5, 2

static void count_draws(const SamplePick *p, int *counts) {
    Rng r;
    rng_init(&r, 9);
    memset(counts, 0, V * sizeof *counts);
    for (int i = 0; i < DRAWS; i++)
        counts[sample_pick(LOGITS, V, p, &r)]++;
}

// Frequencies of the kept ids within 0.02 of softmax(logits / temp) renormalised over them.
static void assert_frequencies(const int *counts, const int *kept, int n, double temp) {
    double z = 0;
    for (int i = 0; i < n; i++)
        z += exp(LOGITS[kept[i]] / temp);
    int inside = 0;
    for (int i = 0; i < n; i++) {
        double want = exp(LOGITS[kept[i]] / temp) / z, got = (double)counts[kept[i]] / DRAWS;
        assert_true(fabs(got - want) < 0.02);
        inside += counts[kept[i]];
    }
    assert_int_equal(inside, DRAWS);
}

static void test_top_k_one_is_greedy(void **state) {
    (void)state;
    Rng r;
    rng_init(&r, 1);
    SamplePick greedy = {0, 0, 1}, k1 = {1.5, 1, 1};
    assert_int_equal(sample_pick(LOGITS, V, &greedy, &r), 1);
    for (int i = 0; i < 100; i++)
        assert_int_equal(sample_pick(LOGITS, V, &k1, &r), 1);
}

static void test_top_k_draws_among_the_k_largest(void **state) {
    (void)state;
    int counts[V], kept[] = {1, 3, 4};
    SamplePick p = {1.0, 3, 1};
    count_draws(&p, counts);
    assert_frequencies(counts, kept, 3, 1.0);
}

// softmax of LOGITS at temperature 1 (id: p): 1: .420, 3: .255, 4: .154, 0: .094, ...:
// top-p 0.6 keeps {1, 3} (.675 >= .6, .420 < .6); top-k 2 then top-p 0.8 keeps the same
// two (renormalised .622, .378); temperature 2 flattens to .290, .226, .176, .137, ...:
// top-p 0.8 keeps {1, 3, 4, 0} (.829 >= .8 > .692).
static void test_top_p_and_combinations(void **state) {
    (void)state;
    int counts[V], two[] = {1, 3}, four[] = {1, 3, 4, 0};
    SamplePick p = {1.0, 0, 0.6};
    count_draws(&p, counts);
    assert_frequencies(counts, two, 2, 1.0);
    p = (SamplePick){1.0, 2, 0.8};
    count_draws(&p, counts);
    assert_frequencies(counts, two, 2, 1.0);
    p = (SamplePick){2.0, 0, 0.8};
    count_draws(&p, counts);
    assert_frequencies(counts, four, 4, 2.0);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_decode_mixtral_top2),
    cmocka_unit_test(test_decode_is_dropless_under_capacity),
    cmocka_unit_test(test_decode_olmoe_qk_norm_full),
    cmocka_unit_test(test_decode_qwen3_qk_norm_head_dense),
    cmocka_unit_test(test_decode_qwen2_bias_gated_shared),
    cmocka_unit_test(test_decode_shared_experts_tied_mha),
    cmocka_unit_test(test_decode_sigmoid_expert_bias),
    cmocka_unit_test(test_decode_deepseek_v3_routing),
    cmocka_unit_test(test_decode_noisy_routers_without_noise),
    cmocka_unit_test(test_decode_hash_routing),
    cmocka_unit_test(test_decode_mla),
    cmocka_unit_test(test_decode_mla_q_lora_yarn),
    cmocka_unit_test(test_top_k_one_is_greedy),
    cmocka_unit_test(test_top_k_draws_among_the_k_largest),
    cmocka_unit_test(test_top_p_and_combinations),
};

TEST_MAIN(tests)
