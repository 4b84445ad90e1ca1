// test_trainable.c: trainable masks from text (model/trainable.h) and ESFT expert selection
// (model/esft.h). Expected tensor sets are written out by name from the grammar and
// Hugging Face's Mixtral naming, and expected ESFT selections are worked out by hand
// from the definitions, never produced by the code under test.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../model/esft.h"
#include "../model/layout.h"
#include "../model/routing_stats.h"
#include "../model/trainable.h"
#include "testlib.h"

// ---- models -----------------------------------------------------------------------------

static ModelConfig base_config(void) {
    ModelConfig c = tiny_config();
    c.layers = 3;
    c.experts = 2;
    c.shared_experts = 1;
    c.shared_ffn_dim = 4;
    c.top_k = 1;
    return c;
}

// Every layer MoE (2 experts, 1 shared, Shazeer noise so the router has two tensors).
static ModelConfig moe_config(void) {
    ModelConfig c = base_config();
    c.moe_every = 1;
    c.noise = NOISE_SHAZEER;
    return c;
}

// Layers 0 and 2 dense, layer 1 MoE (2 experts, 1 shared, no noise).
static ModelConfig mixed_config(void) {
    ModelConfig c = base_config();
    c.moe_every = 2;
    return c;
}

// ---- expected names ---------------------------------------------------------------------

#define LN(l, rest) "model.layers." #l "." rest ".weight"
#define NORMS(l) LN(l, "input_layernorm"), LN(l, "post_attention_layernorm")
#define ATTN(l)                                                                                \
    LN(l, "self_attn.q_proj"), LN(l, "self_attn.k_proj"), LN(l, "self_attn.v_proj"),           \
        LN(l, "self_attn.o_proj")
#define GATE(l) LN(l, "block_sparse_moe.gate")
#define NOISE(l) LN(l, "block_sparse_moe.noise")
#define EXPERT(l, j)                                                                           \
    LN(l, "block_sparse_moe.experts." #j ".w1"), LN(l, "block_sparse_moe.experts." #j ".w3"),  \
        LN(l, "block_sparse_moe.experts." #j ".w2")
#define SHARED(l, j)                                                                           \
    LN(l, "block_sparse_moe.shared_experts." #j ".w1"),                                        \
        LN(l, "block_sparse_moe.shared_experts." #j ".w3"),                                    \
        LN(l, "block_sparse_moe.shared_experts." #j ".w2")
#define DENSE(l) LN(l, "mlp.gate_proj"), LN(l, "mlp.up_proj"), LN(l, "mlp.down_proj")
#define EMBED "model.embed_tokens.weight"
#define FINAL_NORM "model.norm.weight"
#define HEAD "lm_head.weight"

// ---- helpers ----------------------------------------------------------------------------

// Fails unless flags marks exactly the names in want (NULL-terminated), naming the first
// tensor that is missing or extra.
static void assert_flagged(const Layout *lay, const uint8_t *flags, const char *const *want,
                           const char *what) {
    size_t n_want = 0;
    for (; want[n_want]; n_want++) {
        const ParamInfo *p = layout_find(lay, want[n_want]);
        if (!p) fail_msg("%s: expected tensor %s is not in the layout", what, want[n_want]);
        if (!flags[p - lay->params]) fail_msg("%s: %s is not selected", what, want[n_want]);
    }
    for (size_t i = 0; i < lay->n_params; i++) {
        if (!flags[i]) continue;
        size_t k = 0;
        while (k < n_want && strcmp(want[k], lay->params[i].name))
            k++;
        if (k == n_want)
            fail_msg("%s: %s is selected but not expected", what, lay->params[i].name);
    }
}

// trainable_apply(expr) on a fresh mask must match exactly the names in want.
static void check_selects(const ModelConfig *cfg, const char *expr, const char *const *want) {
    Layout lay;
    layout_init(&lay, cfg);
    uint8_t *flags = calloc(lay.n_params, 1);
    char err[1024] = "";
    int got = trainable_apply(&lay, cfg, expr, flags, 1, err, sizeof err);
    if (got < 0) fail_msg("'%s': unexpected error: %s", expr, err);
    size_t n_want = 0;
    while (want[n_want])
        n_want++;
    if ((size_t)got != n_want) fail_msg("'%s': returned %d, want %zu", expr, got, n_want);
    assert_flagged(&lay, flags, want, expr);
    free(flags);
    layout_free(&lay);
}

#define SELECTS(cfg, expr, ...)                                                                \
    do {                                                                                       \
        const char *const want_[] = {__VA_ARGS__, NULL};                                       \
        check_selects(&(cfg), (expr), want_);                                                  \
    } while (0)

// trainable_apply(expr) must fail with exactly the message want and leave flags alone.
static void check_error(const ModelConfig *cfg, const char *expr, const char *want) {
    Layout lay;
    layout_init(&lay, cfg);
    uint8_t *flags = malloc(lay.n_params);
    memset(flags, 7, lay.n_params);
    char err[1024] = "";
    int got = trainable_apply(&lay, cfg, expr, flags, 1, err, sizeof err);
    if (got != -1) fail_msg("'%s': returned %d, want -1 (%s)", expr, got, want);
    if (strcmp(err, want)) fail_msg("'%s':\n got  '%s'\n want '%s'", expr, err, want);
    for (size_t i = 0; i < lay.n_params; i++)
        if (flags[i] != 7) fail_msg("'%s': the failed call changed flag %zu", expr, i);
    free(flags);
    layout_free(&lay);
}

// ---- grammar ----------------------------------------------------------------------------

static void test_words_every_layer_moe(void **state) {
    (void)state;
    ModelConfig c = moe_config();
    SELECTS(c, "embed", EMBED);
    SELECTS(c, "head", HEAD);
    SELECTS(c, "norm", NORMS(0), NORMS(1), NORMS(2), FINAL_NORM);
    SELECTS(c, "attn", ATTN(0), ATTN(1), ATTN(2));
    SELECTS(c, "router", GATE(0), NOISE(0), GATE(1), NOISE(1), GATE(2), NOISE(2));
    SELECTS(c, "experts", EXPERT(0, 0), EXPERT(0, 1), EXPERT(1, 0), EXPERT(1, 1), EXPERT(2, 0),
            EXPERT(2, 1));
    SELECTS(c, "shared", SHARED(0, 0), SHARED(1, 0), SHARED(2, 0));
    SELECTS(c, "all", EMBED, NORMS(0), ATTN(0), GATE(0), NOISE(0), EXPERT(0, 0), EXPERT(0, 1),
            SHARED(0, 0), NORMS(1), ATTN(1), GATE(1), NOISE(1), EXPERT(1, 0), EXPERT(1, 1),
            SHARED(1, 0), NORMS(2), ATTN(2), GATE(2), NOISE(2), EXPERT(2, 0), EXPERT(2, 1),
            SHARED(2, 0), FINAL_NORM, HEAD);
}

static void test_words_with_dense_layers(void **state) {
    (void)state;
    ModelConfig c = mixed_config();
    SELECTS(c, "dense", DENSE(0), DENSE(2));
    SELECTS(c, "experts", EXPERT(1, 0), EXPERT(1, 1));
    SELECTS(c, "router", GATE(1));
    SELECTS(c, "shared", SHARED(1, 0));
    SELECTS(c, "norm", NORMS(0), NORMS(1), NORMS(2), FINAL_NORM);
    SELECTS(c, "attn", ATTN(0), ATTN(1), ATTN(2));
}

static void test_tied_head_is_embed(void **state) {
    (void)state;
    ModelConfig c = mixed_config();
    c.tie_embeddings = 1;
    SELECTS(c, "head", EMBED);
    SELECTS(c, "embed", EMBED);
    SELECTS(c, "head, embed", EMBED);
}

static void test_none_and_blank_match_nothing(void **state) {
    (void)state;
    ModelConfig c = moe_config();
    const char *const nothing[] = {NULL};
    check_selects(&c, "none", nothing);
    check_selects(&c, "", nothing);
    check_selects(&c, "  \t ", nothing);
    SELECTS(c, "none, embed", EMBED);
}

static void test_layer_parts(void **state) {
    (void)state;
    ModelConfig m = moe_config(), d = mixed_config();
    SELECTS(m, "layers.1.attn", ATTN(1));
    SELECTS(m, "layers.2.norm", NORMS(2)); // not the final norm
    SELECTS(m, "layers.0.router", GATE(0), NOISE(0));
    SELECTS(m, "layers.2.experts", EXPERT(2, 0), EXPERT(2, 1));
    SELECTS(m, "layers.0.shared", SHARED(0, 0));
    SELECTS(m, "layers.1.experts.1", EXPERT(1, 1));
    SELECTS(m, "layers.2.shared_experts.0", SHARED(2, 0));
    SELECTS(d, "layers.0.dense", DENSE(0));
    SELECTS(d, "layers.2.mlp", DENSE(2));
    SELECTS(d, "layers.1.router", GATE(1));
    SELECTS(d, "layers.1.experts.0", EXPERT(1, 0));
}

static void test_wildcards(void **state) {
    (void)state;
    ModelConfig m = moe_config(), d = mixed_config();
    SELECTS(m, "layers.*.attn", ATTN(0), ATTN(1), ATTN(2));
    SELECTS(m, "layers.*.norm", NORMS(0), NORMS(1), NORMS(2)); // no final norm
    SELECTS(m, "layers.*.experts.1", EXPERT(0, 1), EXPERT(1, 1), EXPERT(2, 1));
    SELECTS(m, "layers.1.experts.*", EXPERT(1, 0), EXPERT(1, 1));
    SELECTS(m, "layers.*.shared_experts.*", SHARED(0, 0), SHARED(1, 0), SHARED(2, 0));
    // Wildcards reach only the layers where the part exists.
    SELECTS(d, "layers.*.experts.*", EXPERT(1, 0), EXPERT(1, 1));
    SELECTS(d, "layers.*.router", GATE(1));
    SELECTS(d, "layers.*.dense", DENSE(0), DENSE(2));
    SELECTS(d, "layers.*.mlp", DENSE(0), DENSE(2));
}

static void test_union_and_whitespace(void **state) {
    (void)state;
    ModelConfig m = moe_config();
    SELECTS(m, " layers.0.attn ,\tlayers.2.router  , embed ", ATTN(0), GATE(2), NOISE(2),
            EMBED);
    SELECTS(m, "layers.0.experts.1,layers.2.experts.0", EXPERT(0, 1), EXPERT(2, 0));
    // Overlapping items count each tensor once.
    SELECTS(m, "attn, layers.0.attn, layers.*.attn", ATTN(0), ATTN(1), ATTN(2));
    SELECTS(m, "experts, layers.1.experts.0", EXPERT(0, 0), EXPERT(0, 1), EXPERT(1, 0),
            EXPERT(1, 1), EXPERT(2, 0), EXPERT(2, 1));
}

static void test_apply_value_clears_only_matches(void **state) {
    (void)state;
    ModelConfig m = moe_config();
    Layout lay;
    layout_init(&lay, &m);
    uint8_t *flags = malloc(lay.n_params);
    memset(flags, 1, lay.n_params);
    char err[256];
    assert_int_equal(trainable_apply(&lay, &m, "layers.1.attn", flags, 0, err, sizeof err), 4);
    for (size_t i = 0; i < lay.n_params; i++) {
        int in_attn1 = lay.params[i].kind == PARAM_ATTN && lay.params[i].layer == 1;
        if (flags[i] != !in_attn1) fail_msg("%s: flag %d", lay.params[i].name, flags[i]);
    }
    free(flags);
    layout_free(&lay);
}

static void check_trainable(const ModelConfig *cfg, const char *train, const char *freeze,
                            const char *const *want) {
    Layout lay;
    layout_init(&lay, cfg);
    uint8_t *t = malloc(lay.n_params);
    memset(t, 9, lay.n_params);
    char err[1024] = "";
    if (trainable_select(&lay, cfg, train, freeze, t, err, sizeof err))
        fail_msg("train '%s' freeze '%s': unexpected error: %s", train, freeze, err);
    for (size_t i = 0; i < lay.n_params; i++)
        if (t[i] > 1) fail_msg("flag %zu not written", i);
    assert_flagged(&lay, t, want, train ? train : "(default)");
    free(t);
    layout_free(&lay);
}

#define TRAINS(cfg, train, freeze, ...)                                                        \
    do {                                                                                       \
        const char *const want_[] = {__VA_ARGS__, NULL};                                       \
        check_trainable(&(cfg), (train), (freeze), want_);                                     \
    } while (0)

static void test_train_minus_freeze(void **state) {
    (void)state;
    ModelConfig m = moe_config(), d = mixed_config();
    TRAINS(m, "experts", "layers.0.experts.1, layers.2.experts.*", EXPERT(0, 0), EXPERT(1, 0),
           EXPERT(1, 1));
    TRAINS(m, "router, shared", "layers.1.router", GATE(0), NOISE(0), GATE(2), NOISE(2),
           SHARED(0, 0), SHARED(1, 0), SHARED(2, 0));
    TRAINS(d, "layers.1.experts.*, layers.1.router, layers.0.mlp", "layers.1.experts.0",
           GATE(1), EXPERT(1, 1), DENSE(0));
    // Freezing what was not trained anyway is no error.
    TRAINS(m, "layers.0.attn", "experts", ATTN(0));
}

static void test_trainable_defaults(void **state) {
    (void)state;
    ModelConfig d = mixed_config();
    // NULL train is "all", NULL freeze is nothing.
    TRAINS(d, NULL, NULL, EMBED, NORMS(0), ATTN(0), DENSE(0), NORMS(1), ATTN(1), GATE(1),
           EXPERT(1, 0), EXPERT(1, 1), SHARED(1, 0), NORMS(2), ATTN(2), DENSE(2), FINAL_NORM,
           HEAD);
    TRAINS(d, NULL, "attn, norm, embed, head, layers.*.dense, layers.1.router, shared",
           EXPERT(1, 0), EXPERT(1, 1));
    TRAINS(d, "all", "", EMBED, NORMS(0), ATTN(0), DENSE(0), NORMS(1), ATTN(1), GATE(1),
           EXPERT(1, 0), EXPERT(1, 1), SHARED(1, 0), NORMS(2), ATTN(2), DENSE(2), FINAL_NORM,
           HEAD);
}

// ---- errors -----------------------------------------------------------------------------

#define ALLOWED                                                                                \
    "all, none, embed, head, norm, attn, router, experts, shared, dense, "                     \
    "layers.<L>.<part> (part: attn, router, norm, experts, shared, dense, mlp), "              \
    "layers.<L>.experts.<J>, layers.<L>.shared_experts.<J>; <L> and <J>: an index or *"
#define FORMS                                                                                  \
    "expected layers.<L>.<part> (part: attn, router, norm, experts, shared, dense, mlp), "     \
    "layers.<L>.experts.<J> or layers.<L>.shared_experts.<J>; <L> and <J>: an index or *"

static void test_errors_out_of_range(void **state) {
    (void)state;
    ModelConfig m = moe_config();
    check_error(&m, "layers.9.experts.2", "layers.9.experts.2: the model has 3 layers (0..2)");
    check_error(&m, "layers.3.attn", "layers.3.attn: the model has 3 layers (0..2)");
    check_error(&m, "layers.1.experts.2",
                "layers.1.experts.2: the model has 2 experts per MoE layer (0..1)");
    check_error(
        &m, "layers.*.shared_experts.1",
        "layers.*.shared_experts.1: the model has 1 shared expert per MoE layer (0..0)");
    m.layers = 1;
    check_error(&m, "layers.1.norm", "layers.1.norm: the model has 1 layer (0..0)");
}

static void test_errors_missing_parts(void **state) {
    (void)state;
    ModelConfig m = moe_config(), d = mixed_config(), s = moe_config();
    s.shared_experts = 0;
    check_error(&m, "dense", "dense: the model has no dense layers (model.moe_every = 1)");
    check_error(&m, "layers.*.mlp",
                "layers.*.mlp: the model has no dense layers (model.moe_every = 1)");
    check_error(&m, "layers.1.dense",
                "layers.1.dense: layer 1 is a MoE layer; dense layers: none "
                "(model.moe_every = 1)");
    check_error(&d, "layers.0.experts.*",
                "layers.0.experts.*: layer 0 is a dense layer; MoE layers: 1 "
                "(model.moe_every = 2)");
    check_error(
        &d, "layers.2.router",
        "layers.2.router: layer 2 is a dense layer; MoE layers: 1 (model.moe_every = 2)");
    check_error(
        &d, "layers.0.shared",
        "layers.0.shared: layer 0 is a dense layer; MoE layers: 1 (model.moe_every = 2)");
    check_error(
        &d, "layers.1.mlp",
        "layers.1.mlp: layer 1 is a MoE layer; dense layers: 0, 2 (model.moe_every = 2)");
    check_error(&s, "shared",
                "shared: the model has no shared experts (model.shared_experts = 0)");
    check_error(&s, "layers.0.shared",
                "layers.0.shared: the model has no shared experts (model.shared_experts = 0)");
    check_error(&s, "layers.0.shared_experts.0",
                "layers.0.shared_experts.0: the model has no shared experts "
                "(model.shared_experts = 0)");
}

static void test_errors_syntax(void **state) {
    (void)state;
    ModelConfig m = moe_config();
    check_error(&m, "foo", "foo: unknown item; allowed: " ALLOWED);
    check_error(&m, "Attn", "Attn: unknown item; allowed: " ALLOWED);
    check_error(&m, "embed attn", "embed attn: unknown item; allowed: " ALLOWED);
    check_error(&m, "layer.0.attn", "layer.0.attn: unknown item; allowed: " ALLOWED);
    check_error(&m, "attn,,router",
                "empty item in 'attn,,router' (a comma with nothing before or after it)");
    check_error(&m, "attn, ",
                "empty item in 'attn, ' (a comma with nothing before or after it)");
    check_error(&m, " ,attn",
                "empty item in ' ,attn' (a comma with nothing before or after it)");
    check_error(&m, "layers.x.attn", "layers.x.attn: layer 'x' is not an index or *");
    check_error(&m, "layers.-1.attn", "layers.-1.attn: layer '-1' is not an index or *");
    check_error(&m, "layers..attn", "layers..attn: layer '' is not an index or *");
    check_error(&m, "layers.1.experts.one",
                "layers.1.experts.one: expert 'one' is not an index or *");
    check_error(&m, "layers.1.foo", "layers.1.foo: " FORMS);
    check_error(&m, "layers.1", "layers.1: " FORMS);
    check_error(&m, "layers.1.shared.0", "layers.1.shared.0: " FORMS);
    check_error(&m, "layers.1.experts.1.w1", "layers.1.experts.1.w1: " FORMS);
    // A good item before the bad one must not have changed the flags (check_error).
    check_error(&m, "attn, layers.7.norm", "layers.7.norm: the model has 3 layers (0..2)");
}

static void test_error_auto(void **state) {
    (void)state;
    ModelConfig m = moe_config();
    const char *why = "ESFT's auto must be expanded by the caller (esft_to_expr) into "
                      "layers.<L>.experts.<J> items before selection";
    char want[512];
    snprintf(want, sizeof want, "auto: %s", why);
    check_error(&m, "auto", want);
    check_error(&m, "router, auto ", want);
}

static void check_trainable_error(const ModelConfig *cfg, const char *train, const char *freeze,
                                  const char *want) {
    Layout lay;
    layout_init(&lay, cfg);
    uint8_t *t = calloc(lay.n_params, 1);
    char err[1024] = "";
    assert_int_equal(trainable_select(&lay, cfg, train, freeze, t, err, sizeof err), -1);
    if (strcmp(err, want)) fail_msg("\n got  '%s'\n want '%s'", err, want);
    free(t);
    layout_free(&lay);
}

static void test_trainable_errors(void **state) {
    (void)state;
    ModelConfig m = moe_config();
    check_trainable_error(&m, NULL, "layers.5.attn",
                          "freeze: layers.5.attn: the model has 3 layers (0..2)");
    check_trainable_error(&m, "foo", NULL, "train: foo: unknown item; allowed: " ALLOWED);
    check_trainable_error(
        &m, "layers.0.attn", "attn",
        "train 'layers.0.attn' minus freeze 'attn' leaves no tensor to train");
    check_trainable_error(&m, "all", "all",
                          "train 'all' minus freeze 'all' leaves no tensor to train");
    check_trainable_error(&m, "", NULL, "train '' minus freeze '' leaves no tensor to train");
}

// ---- describe ---------------------------------------------------------------------------

// 4 experts and 2 shared experts per layer, every layer MoE, untied head.
static ModelConfig describe_config(void) {
    ModelConfig c = moe_config();
    c.experts = 4;
    c.shared_experts = 2;
    return c;
}

static void check_describe(const ModelConfig *cfg, const char *train, const char *freeze,
                           const char *want) {
    Layout lay;
    layout_init(&lay, cfg);
    uint8_t *t = calloc(lay.n_params, 1);
    char err[1024], got[512];
    if (trainable_select(&lay, cfg, train, freeze, t, err, sizeof err))
        fail_msg("train '%s': unexpected error: %s", train, err);
    trainable_describe(&lay, t, got, sizeof got);
    if (strcmp(got, want))
        fail_msg("train '%s' freeze '%s':\n got  '%s'\n want '%s'", train, freeze ? freeze : "",
                 got, want);
    free(t);
    layout_free(&lay);
}

static void test_describe_whole_kinds(void **state) {
    (void)state;
    ModelConfig c = describe_config(), d = mixed_config();
    check_describe(&c, "all", NULL, "all");
    check_describe(&c, "experts", NULL, "experts");
    check_describe(&c, "router, attn", NULL, "attn, router");
    check_describe(&c, "all", "head", "embed, norm, attn, router, experts, shared");
    check_describe(&d, "dense, head", NULL, "head, dense");
}

static void test_describe_layers_and_experts(void **state) {
    (void)state;
    ModelConfig c = describe_config();
    check_describe(&c, "layers.0.experts.1, layers.0.experts.3, layers.2.experts.0", NULL,
                   "layers.0.experts.{1,3}, layers.2.experts.{0}");
    // A whole part of a layer is named as the part.
    check_describe(&c, "layers.1.experts.*, layers.2.experts.2", NULL,
                   "layers.1.experts, layers.2.experts.{2}");
    check_describe(&c, "layers.1.shared_experts.1, layers.2.shared", NULL,
                   "layers.1.shared_experts.{1}, layers.2.shared");
    check_describe(&c, "embed, layers.2.norm, layers.1.attn", NULL,
                   "embed, layers.1.attn, layers.2.norm");
    check_describe(&c, "layers.*.norm", NULL, "layers.0.norm, layers.1.norm, layers.2.norm");
    check_describe(&c, "norm", "layers.*.norm", FINAL_NORM);
    check_describe(&c, "attn, layers.0.experts.2", NULL, "attn, layers.0.experts.{2}");
}

static void test_describe_partial_tensors(void **state) {
    (void)state;
    ModelConfig c = describe_config();
    Layout lay;
    layout_init(&lay, &c);
    uint8_t *t = calloc(lay.n_params, 1);
    const char *on[] = {LN(0, "self_attn.q_proj"),
                        LN(1, "block_sparse_moe.experts.0.w1"),
                        LN(1, "block_sparse_moe.experts.2.w1"),
                        LN(1, "block_sparse_moe.experts.2.w3"),
                        LN(1, "block_sparse_moe.experts.2.w2"),
                        LN(1, "block_sparse_moe.experts.3.w2")};
    for (size_t i = 0; i < sizeof on / sizeof on[0]; i++)
        t[layout_find(&lay, on[i]) - lay.params] = 1;
    char got[512];
    trainable_describe(&lay, t, got, sizeof got);
    assert_string_equal(
        got,
        LN(0, "self_attn.q_proj") ", layers.1.experts.{2}, " LN(
            1, "block_sparse_moe.experts.0.w1") ", " LN(1, "block_sparse_moe.experts.3.w2"));
    memset(t, 0, lay.n_params);
    trainable_describe(&lay, t, got, sizeof got);
    assert_string_equal(got, "none");
    free(t);
    layout_free(&lay);
}

static void test_describe_truncates_visibly(void **state) {
    (void)state;
    ModelConfig c = describe_config();
    Layout lay;
    layout_init(&lay, &c);
    uint8_t *t = calloc(lay.n_params, 1);
    char err[256], got[16];
    assert_int_equal(trainable_select(&lay, &c, "embed, layers.1.attn, layers.2.norm", NULL, t,
                                      err, sizeof err),
                     0);
    memset(got, 'x', sizeof got);
    trainable_describe(&lay, t, got, sizeof got);
    assert_string_equal(got, "embed, layer...");
    free(t);
    layout_free(&lay);
}

// ---- ESFT -------------------------------------------------------------------------------

static RoutingStats make_stats(int n_layers, int experts, int top_k, uint64_t tokens,
                               const uint64_t *routed, const double *gate_sum) {
    size_t n = (size_t)n_layers * (size_t)experts;
    RoutingStats rs = {.n_layers = n_layers,
                       .experts = experts,
                       .top_k = top_k,
                       .tokens = tokens,
                       .routed = calloc(n, sizeof(uint64_t)),
                       .dropped = calloc(n, sizeof(uint64_t)),
                       .gate_sum = calloc(n, sizeof(double))};
    memcpy(rs.routed, routed, n * sizeof *routed);
    if (gate_sum) memcpy(rs.gate_sum, gate_sum, n * sizeof *gate_sum);
    return rs;
}

// Fails unless each MoE layer's selection, written "0,2", equals want[layer].
static void check_esft(const RoutingStats *rs, EsftScore kind, double p,
                       const char *const *want) {
    EsftResult r;
    esft_select(&r, rs, kind, p);
    assert_int_equal(r.n_layers, rs->n_layers);
    assert_int_equal(r.experts, rs->experts);
    for (int l = 0; l < r.n_layers; l++) {
        char got[128] = "";
        size_t len = 0;
        for (int j = 0; j < r.experts; j++)
            if (r.selected[l * r.experts + j])
                len += (size_t)snprintf(got + len, sizeof got - len, "%s%d", len ? "," : "", j);
        if (strcmp(got, want[l]))
            fail_msg("%s score, p = %g, MoE layer %d: selected {%s}, want {%s}",
                     kind == ESFT_GATE ? "gate" : "token", p, l, got, want[l]);
    }
    esft_free(&r);
}

#define ESFT_SELECTS(rs, kind, p, ...)                                                         \
    do {                                                                                       \
        const char *const want_[] = {__VA_ARGS__};                                             \
        check_esft(&(rs), (kind), (p), want_);                                                 \
    } while (0)

static void assert_row(const double *got, const double *want, int n, const char *what) {
    for (int i = 0; i < n; i++)
        if (!(fabs(got[i] - want[i]) <= 1e-15)) // NaN fails too
            fail_msg("%s[%d] = %.17g, want %.17g", what, i, got[i], want[i]);
}

static void test_esft_token_threshold(void **state) {
    (void)state;
    // 50 tokens, k = 2: 100 assignments, so token scores are {0.5, 0.3, 0.15, 0.05}.
    const uint64_t routed[] = {50, 30, 15, 5};
    RoutingStats rs = make_stats(1, 4, 2, 50, routed, NULL);
    EsftResult r;
    esft_select(&r, &rs, ESFT_TOKEN, 0.5);
    assert_row(r.token, (const double[]){0.5, 0.3, 0.15, 0.05}, 4, "token");
    assert_ptr_equal(r.score, r.token);
    esft_free(&r);
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.2, "0");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.5, "0"); // reaching p exactly is enough
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.6, "0,1");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.8, "0,1");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.81, "0,1,2");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.96, "0,1,2,3");
    ESFT_SELECTS(rs, ESFT_TOKEN, 1.0, "0,1,2,3");
    routing_stats_free(&rs);
    // The same counts in another expert order: selection follows the scores.
    const uint64_t shuffled[] = {5, 50, 15, 30};
    rs = make_stats(1, 4, 2, 50, shuffled, NULL);
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.2, "1");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.6, "1,3");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.81, "1,2,3");
    routing_stats_free(&rs);
    // Scores {0.1, 0.3, 0.6}: in doubles 0.6 + 0.3 = 0.8999999999999999, which must
    // still reach p = 0.9.
    const uint64_t rounding[] = {10, 30, 60};
    rs = make_stats(1, 3, 1, 100, rounding, NULL);
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.9, "1,2");
    routing_stats_free(&rs);
}

static void test_esft_gate_score(void **state) {
    (void)state;
    // 50 tokens, k = 2. Token scores {0.4, 0.4, 0.1, 0.1}. Mean gates {0.1, 0.3, 0.08,
    // 0.02} sum to 0.5 (no renormalisation), so normalised gates are {0.2, 0.6, 0.16, 0.04}.
    const uint64_t routed[] = {40, 40, 10, 10};
    const double gate_sum[] = {5, 15, 4, 1};
    RoutingStats rs = make_stats(1, 4, 2, 50, routed, gate_sum);
    EsftResult r;
    esft_select(&r, &rs, ESFT_GATE, 0.5);
    assert_row(r.gate, (const double[]){0.2, 0.6, 0.16, 0.04}, 4, "gate");
    assert_row(r.token, (const double[]){0.4, 0.4, 0.1, 0.1}, 4, "token");
    assert_ptr_equal(r.score, r.gate);
    esft_free(&r);
    ESFT_SELECTS(rs, ESFT_GATE, 0.5, "1");
    ESFT_SELECTS(rs, ESFT_GATE, 0.75, "0,1");
    ESFT_SELECTS(rs, ESFT_GATE, 0.8, "0,1");
    ESFT_SELECTS(rs, ESFT_GATE, 0.9, "0,1,2");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.5, "0,1"); // the token score ranks differently
    routing_stats_free(&rs);
}

static void test_esft_ties_prefer_lower_index(void **state) {
    (void)state;
    // 100 tokens, k = 1: scores {0.2, 0.3, 0.3, 0.2}.
    const uint64_t routed[] = {20, 30, 30, 20};
    RoutingStats rs = make_stats(1, 4, 1, 100, routed, NULL);
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.25, "1");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.7, "0,1,2");
    routing_stats_free(&rs);
    const uint64_t equal[] = {25, 25, 25, 25};
    rs = make_stats(1, 4, 1, 100, equal, NULL);
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.25, "0");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.5, "0,1");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.51, "0,1,2");
    routing_stats_free(&rs);
}

static void test_esft_normalises_per_layer(void **state) {
    (void)state;
    // 50 tokens, k = 2 (100 assignments). Layer 0 token scores {0.6, 0.2, 0.1, 0.1} sum
    // to 1; layer 1's raw {0.1, 0.1, 0.05, 0.25} sum to 0.5 and normalise to
    // {0.2, 0.2, 0.1, 0.5}. Normalised across layers instead, layer 1 would never reach p.
    // Gates: layer 0 {0.8, 0.2, 0, 0}; layer 1 raw {0.06, 0.06, 0.04, 0.04} -> {0.3, 0.3,
    // 0.2, 0.2}.
    const uint64_t routed[] = {60, 20, 10, 10, 10, 10, 5, 25};
    const double gate_sum[] = {40, 10, 0, 0, 3, 3, 2, 2};
    RoutingStats rs = make_stats(2, 4, 2, 50, routed, gate_sum);
    EsftResult r;
    esft_select(&r, &rs, ESFT_TOKEN, 0.6);
    assert_row(r.token + 4, (const double[]){0.2, 0.2, 0.1, 0.5}, 4, "layer 1 token");
    assert_row(r.gate + 4, (const double[]){0.3, 0.3, 0.2, 0.2}, 4, "layer 1 gate");
    esft_free(&r);
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.6, "0", "0,3");
    ESFT_SELECTS(rs, ESFT_GATE, 0.5, "0", "0,1");
    ESFT_SELECTS(rs, ESFT_GATE, 1.0, "0,1", "0,1,2,3"); // zero scores never needed
    routing_stats_free(&rs);
}

static void test_esft_layer_without_score_keeps_all(void **state) {
    (void)state;
    // Layer 1 has routed tokens but no gate mass: nothing ranks its experts.
    const uint64_t routed[] = {10, 0, 0, 0, 4, 3, 2, 1};
    const double gate_sum[] = {10, 0, 0, 0, 0, 0, 0, 0};
    RoutingStats rs = make_stats(2, 4, 1, 10, routed, gate_sum);
    ESFT_SELECTS(rs, ESFT_GATE, 0.2, "0", "0,1,2,3");
    ESFT_SELECTS(rs, ESFT_TOKEN, 0.2, "0", "0");
    EsftResult r;
    esft_select(&r, &rs, ESFT_GATE, 0.2);
    assert_row(r.gate + 4, (const double[]){0, 0, 0, 0}, 4, "layer 1 gate"); // not NaN
    esft_free(&r);
    routing_stats_free(&rs);
}

static void test_esft_to_expr_uses_model_layers(void **state) {
    (void)state;
    // Same scores as test_esft_normalises_per_layer: p = 0.6 keeps {0} and {0, 3}.
    const uint64_t routed[] = {60, 20, 10, 10, 10, 10, 5, 25};
    RoutingStats rs = make_stats(2, 4, 2, 50, routed, NULL);
    EsftResult r;
    esft_select(&r, &rs, ESFT_TOKEN, 0.6);
    ModelConfig every2 = base_config(), every1 = base_config();
    every2.layers = 4, every2.moe_every = 2, every2.experts = 4, every2.top_k = 2;
    every1.layers = 2, every1.moe_every = 1, every1.experts = 4, every1.top_k = 2;
    char expr[256], err[256];
    assert_int_equal(model_config_validate(&every2, err, sizeof err), 0);
    esft_to_expr(&r, &every2, expr, sizeof expr);
    // MoE layer 0 is model layer 1, MoE layer 1 is model layer 3.
    assert_string_equal(expr, "layers.1.experts.0, layers.3.experts.0, layers.3.experts.3");
    esft_to_expr(&r, &every1, expr, sizeof expr);
    assert_string_equal(expr, "layers.0.experts.0, layers.1.experts.0, layers.1.experts.3");
    // The expression is what trainable.h reads back.
    esft_to_expr(&r, &every2, expr, sizeof expr);
    TRAINS(every2, expr, NULL, EXPERT(1, 0), EXPERT(3, 0), EXPERT(3, 3));
    check_describe(&every2, expr, NULL, "layers.1.experts.{0}, layers.3.experts.{0,3}");
    esft_free(&r);
    routing_stats_free(&rs);
}

// ---- layout -----------------------------------------------------------------------------

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// 64 layers of 1024 experts: 197 059 tensors. A linear search over the names takes
// minutes for all of them (the builders look up every tensor); a hash takes milliseconds.
static void test_layout_find_many_tensors(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.layers = 64, c.experts = 1024, c.d_model = 2, c.heads = 1, c.kv_heads = 1;
    c.expert_ffn_dim = 1;
    Layout lay;
    layout_init(&lay, &c);
    assert_int_equal(lay.n_params, 3 + 64 * (6 + 1 + 3 * 1024));   // embed, norm, head
    double t0 = now_s();
    for (size_t i = 0; i < lay.n_params; i++)
        if (layout_find(&lay, lay.params[i].name) != &lay.params[i])
            fail_msg("layout_find(%s) is not tensor %zu", lay.params[i].name, i);
    double seconds = now_s() - t0;
    if (seconds > 10) fail_msg("%zu lookups took %.1f s", lay.n_params, seconds);
    assert_null(layout_find(&lay, "model.layers.64.input_layernorm.weight"));
    assert_null(layout_find(&lay, ""));
    assert_true(model_config_params(&c) == (double)lay.total);
    layout_free(&lay);
}

// model_config_params counts what layout_init lays out, for every kind of layer.
static void test_config_params_match_layout(void **state) {
    (void)state;
    ModelConfig c = tiny_config();
    c.moe_every = 2, c.layers = 4, c.shared_experts = 2, c.noise = NOISE_SHAZEER;
    Layout lay;
    layout_init(&lay, &c);
    assert_true(model_config_params(&c) == (double)lay.total);
    layout_free(&lay);
    c.tie_embeddings = 1, c.noise = NOISE_NONE, c.select = SELECT_HASH;
    layout_init(&lay, &c);
    assert_true(model_config_params(&c) == (double)lay.total);
    layout_free(&lay);
    // multi-head latent attention, without and with the compressed query
    c.attention = ATTENTION_MLA, c.heads = 3, c.kv_lora_rank = 5, c.qk_nope_dim = 3;
    c.qk_rope_dim = 4, c.v_head_dim = 2;
    for (int rq = 0; rq <= 6; rq += 6) {
        c.q_lora_rank = rq;
        layout_init(&lay, &c);
        assert_true(model_config_params(&c) == (double)lay.total);
        layout_free(&lay);
    }
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_layout_find_many_tensors),
    cmocka_unit_test(test_config_params_match_layout),
    cmocka_unit_test(test_words_every_layer_moe),
    cmocka_unit_test(test_words_with_dense_layers),
    cmocka_unit_test(test_tied_head_is_embed),
    cmocka_unit_test(test_none_and_blank_match_nothing),
    cmocka_unit_test(test_layer_parts),
    cmocka_unit_test(test_wildcards),
    cmocka_unit_test(test_union_and_whitespace),
    cmocka_unit_test(test_apply_value_clears_only_matches),
    cmocka_unit_test(test_train_minus_freeze),
    cmocka_unit_test(test_trainable_defaults),
    cmocka_unit_test(test_errors_out_of_range),
    cmocka_unit_test(test_errors_missing_parts),
    cmocka_unit_test(test_errors_syntax),
    cmocka_unit_test(test_error_auto),
    cmocka_unit_test(test_trainable_errors),
    cmocka_unit_test(test_describe_whole_kinds),
    cmocka_unit_test(test_describe_layers_and_experts),
    cmocka_unit_test(test_describe_partial_tensors),
    cmocka_unit_test(test_describe_truncates_visibly),
    cmocka_unit_test(test_esft_token_threshold),
    cmocka_unit_test(test_esft_gate_score),
    cmocka_unit_test(test_esft_ties_prefer_lower_index),
    cmocka_unit_test(test_esft_normalises_per_layer),
    cmocka_unit_test(test_esft_layer_without_score_keeps_all),
    cmocka_unit_test(test_esft_to_expr_uses_model_layers),
};

TEST_MAIN(tests)
