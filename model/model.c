#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../base/util.h"
#include "build.h"

static Tensor slab_alloc(const Backend *be, size_t numel, const char *what) {
    Tensor t = {be->alloc(numel * sizeof(real)), DTYPE_REAL, be->device, numel};
    CHECK(t.data, "out of memory allocating %s (%zu values)", what, numel);
    return t;
}

static void arena_alloc(const Backend *be, Arena *a, const char *what) {
    a->size = a->used;
    a->base = be->alloc(a->size);
    CHECK(a->base, "out of memory allocating %s (%zu bytes)", what, a->size);
}

// Builds the tape and the per-layer routing state for m's batch shape and precision (the
// backend may keep less attention state under bf16): a measuring pass sizes the arenas,
// then the real pass hands out views. The activation-gradient arena is allocated, or
// shared with shared_dacts (a replica: backward passes run one at a time).
static void plan_tape(Model *m, const Arena *shared_dacts, int bf16) {
    m->moe = CALLOC((size_t)m->n_moe, sizeof *m->moe);
    m->expert_train = CALLOC((size_t)m->n_moe * (size_t)m->cfg.experts, 1);
    m->block_op = CALLOC((size_t)m->cfg.layers, sizeof *m->block_op);
    tape_init(&m->tape);
    m->tape.bf16 = bf16;
    m->acts.device = m->dacts.device = m->be->device;
    build_tape(m);   // measuring pass: sizes the arenas
    arena_alloc(m->be, &m->acts, "activations");
    if (shared_dacts) {
        CHECK(m->dacts.used == shared_dacts->size,
              "replica plans %zu bytes of activation gradients, its model %zu", m->dacts.used,
              shared_dacts->size);
        m->dacts = *shared_dacts;
    } else {
        arena_alloc(m->be, &m->dacts, "activation gradients");
    }
    memset(m->moe, 0, (size_t)m->n_moe * sizeof *m->moe);
    build_tape(m);
    model_clear_noise(m);
}

// Parameters and gradients must fit the machine's memory: allocations succeed lazily
// (overcommit), and a model far too large would swap or be killed, not fail.
static void check_memory(const ModelConfig *cfg, const Backend *be, const Layout *lay) {
    if (be->device != DEVICE_CPU) return;   // the device's allocator says so itself
    double need = 2.0 * (double)lay->total * sizeof(real);
    double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (have > 0 && need > have)
        FAIL(MODEL_SIZE_KEYS ": %.3g parameters need %.1f GB for weights and gradients, more "
             "than this machine's %.1f GB", MODEL_SIZE_VALUES(cfg), (double)lay->total,
             need / 1e9, have / 1e9);
}

// model_init_experts with a KV cache of L positions per sequence (L 0: a training model).
static void init_model(Model *m, const ModelConfig *cfg, const Backend *be, size_t B, size_t T,
                       size_t L, int expert_lo, int expert_hi) {
    char err[512];
    CHECK(model_config_validate(cfg, err, sizeof err) == 0, "%s", err);
    CHECK(T <= (size_t)cfg->seq_len, "batch of %zu tokens per row exceeds model.seq_len = %d",
          T, cfg->seq_len);
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->be = be;
    m->B = B;
    m->T = T;
    m->N = B * T;
    layout_init_experts(&m->layout, cfg, expert_lo, expert_hi);
    check_memory(cfg, be, &m->layout);
    m->params = slab_alloc(be, m->layout.total, "parameters");
    m->grads = slab_alloc(be, m->layout.total, "gradients");
    m->n_moe = model_config_moe_layers(cfg);
    m->expert_bias = slab_alloc(be, (size_t)m->n_moe * (size_t)cfg->experts, "expert bias");
    m->cache_len = L;
    size_t width = model_config_cache_width(cfg);
    if (L) m->kv_cache = slab_alloc(be, (size_t)cfg->layers * B * L * width, "the KV cache");
    plan_tape(m, NULL, 0);
}

void model_init(Model *m, const ModelConfig *cfg, const Backend *be, size_t B, size_t T) {
    init_model(m, cfg, be, B, T, 0, 0, cfg->experts);
}

void model_init_experts(Model *m, const ModelConfig *cfg, const Backend *be, size_t B,
                        size_t T, int expert_lo, int expert_hi) {
    init_model(m, cfg, be, B, T, 0, expert_lo, expert_hi);
}

void model_init_decode(Model *m, const ModelConfig *cfg, const Backend *be, size_t B,
                       size_t L) {
    if (cfg->select == SELECT_EXPERT_CHOICE)
        FAIL("router.select = expert_choice: experts choose among a batch's tokens, which "
             "one token at a time does not define; generation cannot run this model");
    CHECK(L >= 1 && L <= (size_t)cfg->seq_len, "KV cache of %zu positions: 1 to model.seq_len "
          "= %d", L, cfg->seq_len);
    ModelConfig dropless = *cfg;
    dropless.capacity_factor = 0;
    init_model(m, &dropless, be, B, 1, L, 0, cfg->experts);
}

void model_set_positions(Model *m, const int32_t *pos) {
    CHECK(m->cache_len, "internal: positions on a model without a KV cache");
    for (size_t b = 0; b < m->B; b++)
        CHECK(pos[b] >= 0 && (size_t)pos[b] < m->cache_len,
              "position %d of sequence %zu outside the KV cache of %zu", pos[b], b,
              m->cache_len);
    m->be->upload(m->positions, pos, m->B * sizeof *pos);
}

// What plan_tape made; a replica's dacts belong to its model.
static void unplan_tape(Model *m, int owns_dacts) {
    m->be->release(m->acts.base);
    if (owns_dacts) m->be->release(m->dacts.base);
    memset(&m->acts, 0, sizeof m->acts);
    memset(&m->dacts, 0, sizeof m->dacts);
    tape_free(&m->tape);
    free(m->moe);
    free(m->expert_train);
    free(m->block_op);
}

void model_free(Model *m) {
    if (m->be->set_bf16_weights) m->be->set_bf16_weights(m->params, 0);
    m->be->release(m->params.data);
    m->be->release(m->grads.data);
    m->be->release(m->expert_bias.data);
    m->be->release(m->kv_cache.data);
    unplan_tape(m, 1);
    layout_free(&m->layout);
    free(m->trainable);
    memset(m, 0, sizeof *m);
}

void model_init_replica(Model *r, const Model *m) {
    memset(r, 0, sizeof *r);
    r->cfg = m->cfg;
    r->be = m->be;
    r->B = m->B;
    r->T = m->T;
    r->N = m->N;
    r->layout = m->layout;
    r->params = m->params;
    r->grads = m->grads;
    r->expert_bias = m->expert_bias;
    r->n_moe = m->n_moe;
    plan_tape(r, &m->dacts, m->tape.bf16);
    model_set_trainable(r, m->trainable);
}

void model_free_replica(Model *r) {
    unplan_tape(r, 0);
    free(r->trainable);
    memset(r, 0, sizeof *r);
}

void model_set_trainable(Model *m, const uint8_t *trainable) {
    free(m->trainable);
    m->trainable = NULL;
    if (trainable) {
        m->trainable = CALLOC(m->layout.n_params, 1);
        memcpy(m->trainable, trainable, m->layout.n_params);
    }
    build_tape(m);   // same buffers, same offsets: only gradient views change
}

Tensor model_param(const Model *m, const ParamInfo *p) {
    return tensor_slice(m->params, p->offset, p->numel);
}

Tensor model_grad(const Model *m, const ParamInfo *p) {
    return tensor_slice(m->grads, p->offset, p->numel);
}

static int is_output_projection(const ParamInfo *p) {
    size_t len = strlen(p->name);
    const char *tails[] = {"o_proj.weight", "w2.weight", "down_proj.weight"};
    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(tails[i]);
        if (len >= n && !strcmp(p->name + len - n, tails[i])) return 1;
    }
    return 0;
}

static double param_init_std(const ModelConfig *cfg, const ParamInfo *p) {
    if (p->kind == PARAM_ROUTER && cfg->noise == NOISE_SHAZEER) return 0.0;
    if (is_output_projection(p)) return cfg->init_std / sqrt(2.0 * cfg->layers);
    return cfg->init_std;
}

// The draws walk the whole model's layout, so that a shard's experts get the values the
// whole model's would (the other experts' draws are made and dropped).
void model_init_weights(Model *m, uint64_t seed) {
    Rng rng;
    rng_init(&rng, seed);
    Layout whole;
    layout_init(&whole, &m->cfg);
    real *host = CALLOC(m->layout.total, sizeof(real));
    for (size_t i = 0; i < whole.n_params; i++) {
        const ParamInfo *p = &whole.params[i], *held = layout_find(&m->layout, p->name);
        real *w = held ? host + held->offset : NULL;
        if (p->kind == PARAM_NORM || p->cols == 0) {   // norms 1, projection biases 0
            for (size_t j = 0; w && p->kind == PARAM_NORM && j < p->numel; j++) w[j] = 1;
            continue;
        }
        double std = param_init_std(&m->cfg, p);
        for (size_t j = 0; j < p->numel; j++) {
            real v = (real)(std * rng_normal(&rng));
            if (w) w[j] = v;
        }
    }
    m->be->upload(m->params, host, m->layout.total * sizeof(real));
    free(host);
    layout_free(&whole);
}

void model_randomize_weights(Model *m, uint64_t seed) {
    Rng rng;
    rng_init(&rng, seed);
    real *host = CALLOC(m->layout.total, sizeof(real));
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
        real *w = host + p->offset;
        double std = p->cols ? 1.0 / sqrt((double)p->cols) : 0.1;
        for (size_t j = 0; j < p->numel; j++)
            w[j] = (real)((p->kind == PARAM_NORM ? 1.0 : 0.0) + std * rng_normal(&rng));
    }
    m->be->upload(m->params, host, m->layout.total * sizeof(real));
    free(host);
    if (!model_config_has_bias(&m->cfg)) return;   // a bias only matters when selection uses it
    size_t nb = m->expert_bias.numel;
    real *b = CALLOC(nb, sizeof *b);
    for (size_t i = 0; i < nb; i++) b[i] = (real)(0.2 * rng_normal(&rng));
    m->be->upload(m->expert_bias, b, nb * sizeof *b);
    free(b);
}

// Fills every noise buffer: Shazeer eps ~ N(0,1) (or 0), jitter u ~ U[1-e, 1+e] (or 1).
static void fill_noise(Model *m, Rng *rng) {
    size_t E = (size_t)m->cfg.experts, C = (size_t)m->cfg.d_model;
    double e = m->cfg.jitter_eps;
    for (int i = 0; i < m->n_moe; i++) {
        MoeLayerState *st = &m->moe[i];
        size_t n = st->eps.data ? m->N * E : st->jitter.data ? m->N * C : 0;
        if (!n) continue;
        real *host = CALLOC(n, sizeof(real));
        for (size_t j = 0; j < n; j++) {
            if (st->eps.data) host[j] = rng ? (real)rng_normal(rng) : 0;
            else host[j] = rng ? (real)(1.0 - e + 2.0 * e * rng_uniform(rng)) : 1;
        }
        m->be->upload(st->eps.data ? st->eps : st->jitter, host, n * sizeof(real));
        free(host);
    }
}

void model_draw_noise(Model *m, Rng *rng) { fill_noise(m, rng); }

void model_clear_noise(Model *m) { fill_noise(m, NULL); }

void model_set_batch(Model *m, const int32_t *tokens, const int32_t *targets) {
    for (size_t i = 0; i < m->N; i++) {
        CHECK(tokens[i] >= 0 && tokens[i] < m->cfg.vocab && targets[i] >= 0 &&
                  targets[i] < m->cfg.vocab,
              "token id %d (or target %d) at position %zu outside model.vocab = %d", tokens[i],
              targets[i], i, m->cfg.vocab);
    }
    m->be->upload(m->tokens, tokens, m->N * sizeof(int32_t));
    m->be->upload(m->targets, targets, m->N * sizeof(int32_t));
}

static double read_scalar(const Model *m, Tensor t) {
    if (!t.data) return 0.0;
    real v;
    m->be->download(&v, t, sizeof v);
    return (double)v;
}

static ModelLosses collect_losses(const Model *m) {
    ModelLosses l = {0};
    l.ce = read_scalar(m, m->ce);
    for (int i = 0; i < m->n_moe; i++) {
        l.lb += read_scalar(m, m->moe[i].lb) / m->n_moe;
        l.z += read_scalar(m, m->moe[i].z) / m->n_moe;
        l.importance += read_scalar(m, m->moe[i].importance) / m->n_moe;
        l.load += read_scalar(m, m->moe[i].load) / m->n_moe;
    }
    const ModelConfig *c = &m->cfg;
    l.total = l.ce + c->aux_coef * l.lb + c->z_coef * l.z;
    if (c->noise == NOISE_SHAZEER) l.total += c->noise_coef * (l.importance + l.load);
    return l;
}

ModelLosses model_forward(Model *m) {
    tape_forward(&m->tape, m->be);
    m->losses = collect_losses(m);
    return m->losses;
}

void model_zero_grad(Model *m) { m->be->zero(m->grads, m->grads.numel); }

void model_backward(Model *m) {
    Tensor d = {m->dacts.base, DTYPE_F32, m->dacts.device, m->dacts.size / 4};
    m->be->zero(d, d.numel);
    tape_backward(&m->tape, m->be);
}

int model_set_precision(Model *m, int bf16, char *err, size_t n) {
    if (bf16 && !m->be->set_gemm_bf16) {
        snprintf(err, n, "the %s backend computes in fp32 only (bf16 products need CUDA)",
                 m->be->name);
        return -1;
    }
    // The tape sets the backend's mode before each product; the attention state the
    // backend keeps may differ between modes, so the activations are planned again.
    if (bf16 != m->tape.bf16) {
        unplan_tape(m, 1);
        plan_tape(m, NULL, bf16);
    }
    if (m->be->set_bf16_weights) m->be->set_bf16_weights(m->params, bf16);
    return 0;
}
