// gen_bench.c: generation's tokens/s at a given context, through the KV cache (what
// `moe sample` runs: one row, greedy) and, on equal work, by a full forward over the
// whole context for every new token (generation without a cache).
#include "bench.h"

#include <omp.h>
#include <stdlib.h>

#include "../base/util.h"
#include "../model/model.h"
#include "../train/run.h"
#include "../train/sample_pick.h"

#define GEN_NEW 32     // new tokens timed per repeat
#define GEN_REPEATS 3  // best of

// One decode step of d at position pos: the next token, greedy.
static int32_t decode_step(Model *d, int32_t tok, int32_t pos, real *logits) {
    int32_t zero = 0;
    size_t V = (size_t)d->cfg.vocab;
    model_set_batch(d, &tok, &zero);
    model_set_positions(d, &pos);
    model_forward(d);
    d->be->download(logits, d->logits.v, V * sizeof *logits);
    SamplePick greedy = {0, 0, 1};
    return (int32_t)sample_pick(logits, (int)V, &greedy, NULL);
}

// Tokens/s of GEN_NEW cached steps after a context of ctx tokens (fed untimed).
static double cached_rate(const ModelConfig *c, const Model *w, size_t ctx, real *logits) {
    Model d;
    model_init_decode(&d, c, w->be, 1, ctx + GEN_NEW);
    w->be->download(TENSOR_R(d.params), w->params, w->layout.total * sizeof(real));
    int32_t tok = 1;
    for (size_t t = 0; t < ctx; t++)
        tok = decode_step(&d, (int32_t)(t % 200) + 1, (int32_t)t, logits);
    double best = 0;
    for (int r = 0; r < GEN_REPEATS; r++) {
        double t0 = omp_get_wtime();
        int32_t next = tok;
        for (int i = 0; i < GEN_NEW; i++)
            next = decode_step(&d, next, (int32_t)(ctx + (size_t)i), logits);
        double rate = GEN_NEW / (omp_get_wtime() - t0);
        best = rate > best ? rate : best;
    }
    model_free(&d);
    return best;
}

// Tokens/s when each new token takes a full forward over the ctx tokens before it.
static double full_rate(const ModelConfig *c, const Model *w, size_t ctx, real *logits) {
    Model f;
    model_init(&f, c, w->be, 1, ctx);
    w->be->download(TENSOR_R(f.params), w->params, w->layout.total * sizeof(real));
    int32_t *tok = CALLOC(2 * ctx, sizeof *tok);
    for (size_t t = 0; t < ctx; t++)
        tok[t] = (int32_t)(t % 200) + 1;
    size_t V = (size_t)c->vocab;
    double best = 0;
    for (int r = 0; r < GEN_REPEATS; r++) {
        double t0 = omp_get_wtime();
        model_set_batch(&f, tok, tok + ctx);
        model_forward(&f);
        f.be->download(logits, tensor_slice(f.logits.v, (ctx - 1) * V, V), V * sizeof *logits);
        double rate = 1.0 / (omp_get_wtime() - t0);
        best = rate > best ? rate : best;
    }
    free(tok);
    model_free(&f);
    return best;
}

void bench_generate(GenResult *out, const BenchConfig *config) {
    static const size_t contexts[BENCH_GEN_CONTEXTS] = {64, 512};
    RunConfig rc;
    run_load_config(&rc, config->path, config->n_words, config->words);
    if (rc.train.threads > 0 && !getenv("OMP_NUM_THREADS"))
        omp_set_num_threads(rc.train.threads);
    bench_config_name(config, out->name, sizeof out->name);
    ModelConfig c = rc.model;
    // RoPE has no learned positions: a longer window than the config trains is the same
    // model, and the cache needs the room.
    if ((size_t)c.seq_len < contexts[BENCH_GEN_CONTEXTS - 1] + GEN_NEW)
        c.seq_len = (int)(contexts[BENCH_GEN_CONTEXTS - 1] + GEN_NEW);
    Model w;
    model_init(&w, &c, backend_cpu(), 1, 1);
    model_init_weights(&w, (uint64_t)rc.train.seed);
    real *logits = CALLOC((size_t)c.vocab, sizeof *logits);
    for (int i = 0; i < BENCH_GEN_CONTEXTS; i++) {
        out->context[i] = contexts[i];
        out->cached_tok_s[i] = cached_rate(&c, &w, contexts[i], logits);
        out->full_tok_s[i] = full_rate(&c, &w, contexts[i], logits);
    }
    out->threads = omp_get_max_threads();
    free(logits);
    model_free(&w);
}
