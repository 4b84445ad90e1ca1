// testlib.h: shared helpers for the C test suites (cmocka).
//
// Every suite is a cmocka group whose main is TEST_MAIN(tests). `--list` prints the test
// names (one per line) and `--only NAME` runs one test: tests/test_suites.py uses both so
// pytest reports each C test by name. The suites link the fp64 build (real = double), so
// finite differences are accurate to ~1e-9 and tolerances can be tight.
#ifndef MOE_TESTLIB_H
#define MOE_TESTLIB_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "../kernels/kernels.h"
#include "../base/rng.h"
#include "../model/config.h"

int testlib_main(int argc, char **argv, const struct CMUnitTest *tests, size_t n,
                 const char *group);
#define TEST_MAIN(tests)                                                                    \
    int main(int argc, char **argv) {                                                      \
        return testlib_main(argc, argv, tests, sizeof(tests) / sizeof(tests[0]), __FILE__); \
    }

// Buffers owned by the test (freed with free()).
real *test_rand(Rng *r, size_t n, double scale);   // uniform in [-scale, scale)
real *test_zeros(size_t n);
real *test_copy(const real *x, size_t n);
Tensor test_tensor(void *data, size_t n);          // a real tensor over data
Tensor test_itensor(int32_t *data, size_t n);      // an int32 tensor over data

// Fills x (n) with integers uniform in [0, below): token ids, expert choices.
void test_rand_ints(Rng *r, int32_t *x, size_t n, uint64_t below);

// Fails the current test when |a - b| > atol + rtol * max(|a|, |b|) for some element,
// naming `what`, the index and both values.
void test_assert_close(const real *a, const real *b, size_t n, double rtol, double atol,
                       const char *what);

// Fails the current test naming `what`, the index and the value of the first inf or NaN:
// an overflow check then says so, where test_assert_close would report a mismatch.
void test_assert_finite(const real *x, size_t n, const char *what);

// Central finite differences: for each of `n` entries of `x` (all when n_check == 0,
// else n_check entries picked by `r`), compares (f(x+h) - f(x-h)) / 2h with analytic[i].
// f reads x through ctx. Restores x. Fails like test_assert_close.
typedef double (*test_loss_fn)(void *ctx);
void test_fd_check(real *x, size_t n, const real *analytic, test_loss_fn f, void *ctx,
                   size_t n_check, Rng *r, double rtol, double atol, const char *what);

// sum_i a[i] * b[i] in double: the scalar a test differentiates (out . random weights).
double test_dot(const real *a, const real *b, size_t n);

// A forward pass and the scalar finite differences differentiate: out . R. An op suite's
// case struct starts with a TestProbe, so test_probe_loss runs any of them.
typedef struct {
    void (*forward)(void *self);
    const real *out; // (n) written by forward
    const real *R;   // (n) fixed random weights
    size_t n;
} TestProbe;
double test_probe_loss(void *ctx);

// a (n) -= b (n): turns a gradient buffer that started at b into what backward added.
void test_subtract(real *a, const real *b, size_t n);

// Removes dir and everything below it (a test's mkdtemp directory). Returns nftw's result:
// 0, or -1 when something could not be removed.
int test_remove_tree(const char *dir);

// The model-level suites' tiny model: 2 layers, C=8, 2 heads over 1 KV head, T=5, V=11,
// every layer MoE with E=4 experts of width 6 under the default router (softmax top-2),
// dense width 10 for suites that interleave dense layers, untied head. Small enough for
// finite differences over every weight; a suite assigns the fields it varies on top.
// static inline: the op suites link only base/ and kernels/ (Makefile), and an unused
// static inline function leaves them no reference to model/.
static inline ModelConfig tiny_config(void) {
    ModelConfig c;
    model_config_defaults(&c);
    c.layers = 2;
    c.d_model = 8;
    c.heads = 2;
    c.kv_heads = 1;
    c.vocab = 11;
    c.seq_len = 5;
    c.ffn_dim = 10;
    c.experts = 4;
    c.expert_ffn_dim = 6;
    c.tie_embeddings = 0;
    return c;
}

// tiny_config with DeepSeek-V2-Lite's attention: MLA without a compressed query, 3 heads
// that do not divide d_model, q/k heads (3 + 4) wide and values 2 wide.
static inline ModelConfig tiny_mla_config(void) {
    ModelConfig c = tiny_config();
    c.attention = ATTENTION_MLA;
    c.heads = 3;
    c.kv_lora_rank = 5;
    c.qk_nope_dim = 3;
    c.qk_rope_dim = 4;
    c.v_head_dim = 2;
    return c;
}

// tiny_config with DeepSeek-V3's routing (noaux_tc): a leading dense layer, sigmoid
// scores with a frozen expert bias in selection (bias_gamma 0), the best group of 2 by its
// two best biased scores, renormalised gates scaled by 2.5.
static inline ModelConfig tiny_deepseek_v3_config(void) {
    ModelConfig c = tiny_config();
    c.layers = 3;
    c.first_dense_layers = 1;
    c.score = SCORE_SIGMOID;
    c.expert_bias = 1;
    c.groups = 2;
    c.topk_groups = 1;
    c.group_score = GROUP_SCORE_TOP2;
    c.gate_scale = 2.5;
    return c;
}

#endif
