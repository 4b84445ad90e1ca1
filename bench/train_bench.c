// train_bench.c: optimizer steps of a config on random tokens, split into phases.
//
// The step is the one `moe train` takes: the trainer's own StepRunner (train/step.h) over
// the micro-batches, then AdamW. No data files, evaluation, checkpoints or logs.
#include "bench.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../model/model.h"
#include "../model/param_groups.h"
#include "../optim/adamw.h"
#include "../train/run.h"
#include "../train/step.h"

const char *const bench_phase_names[PHASE_COUNT] = {
    "attention", "router", "dispatch", "experts", "optimizer", "pool", "other"};

typedef struct {
    RunConfig rc;
    Model m;
    AdamW opt;
    StepRunner step;
    Rng rng;            // tokens and router noise
    int32_t *tokens;    // (grad_accum, 2, N) inputs then targets per micro-batch
    double *op_seconds; // (tape ops) forward + backward time of the current step
    size_t kept;        // assignments kept by capacity in the current step
} Trainer;

// Parameters one token computes with, as `moe train` counts them: all but the experts
// it is not routed to; the embedding only when tied (then it is also the lm_head).
static size_t active_params(const Model *m) {
    size_t active = 0;
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
        if (p->kind == PARAM_EXPERT)
            active += p->expert < m->cfg.top_k ? p->numel : 0;
        else if (p->kind != PARAM_EMBED || m->cfg.tie_embeddings)
            active += p->numel;
    }
    return active;
}

// The tape's matmuls are the attention projections (q|k|v feeds RoPE, its bias or
// QK-norm; o_proj reads the attention output), the router's gate and noise, the shared
// experts' gate, and the lm_head before cross-entropy.
// MLA's projections (q, kv_a, kv_b and their norms) run up to the op that assembles them.
static int feeds_mla(const Tape *t, size_t i) {
    for (size_t j = i + 1; j < t->n; j++) {
        OpKind k = t->ops[j].kind;
        if (k == OP_MLA_QKV || k == OP_MLA_DECODE) return 1;
        if (k != OP_MATMUL && k != OP_RMSNORM) return 0;
    }
    return 0;
}

static Phase matmul_phase(const Tape *t, size_t i) {
    OpKind next = i + 1 < t->n ? t->ops[i + 1].kind : OP_CROSSENTROPY;
    OpKind prev = i > 0 ? t->ops[i - 1].kind : OP_EMBED;
    if (next == OP_ROPE || next == OP_QK_NORM || next == OP_BIAS_ADD) return PHASE_ATTENTION;
    if (next == OP_GATED_ADD) return PHASE_EXPERTS;
    if (prev == OP_ATTENTION || prev == OP_ATTENTION_MLA || prev == OP_MLA_DECODE)
        return PHASE_ATTENTION;
    if (feeds_mla(t, i)) return PHASE_ATTENTION;
    if (i + 1 < t->n && t->ops[i + 1].kind == OP_CROSSENTROPY) return PHASE_OTHER;
    return PHASE_ROUTER;
}

Phase bench_op_phase(const Tape *t, size_t i) {
    switch (t->ops[i].kind) {
    case OP_ROPE:
    case OP_QK_NORM:
    case OP_BIAS_ADD:
    case OP_ATTENTION:
    case OP_ATTENTION_DECODE:
    case OP_MLA_QKV:
    case OP_ATTENTION_MLA:
    case OP_MLA_DECODE: return PHASE_ATTENTION;
    case OP_GATED_ADD: return PHASE_EXPERTS;
    case OP_MATMUL: return matmul_phase(t, i);
    case OP_MUL: // Switch jitter, the router's input only
    case OP_SCORES:
    case OP_NOISY:
    case OP_ROUTE:
    case OP_GATES:
    case OP_CAPACITY:
    case OP_NORMALIZE:
    case OP_LB_LOSS:
    case OP_Z_LOSS:
    case OP_IMPORTANCE_LOSS:
    case OP_LOAD_LOSS:
    case OP_HASH_ROUTE:
    case OP_EXPERT_CHOICE: return PHASE_ROUTER;
    case OP_DISPATCH:
    case OP_GATHER:
    case OP_COMBINE: return PHASE_DISPATCH;
    case OP_EXPERTS: return PHASE_EXPERTS;
    default: return PHASE_OTHER;
    }
}

void bench_config_name(const BenchConfig *c, char *out, size_t len) {
    size_t used = (size_t)snprintf(out, len, "%s", c->path);
    for (int i = 0; i < c->n_words && used < len; i++)
        used += (size_t)snprintf(out + used, len - used, " %s", c->words[i]);
}

static void trainer_init(Trainer *tr, const BenchConfig *config) {
    memset(tr, 0, sizeof *tr);
    run_load_config(&tr->rc, config->path, config->n_words, config->words);
    if (tr->rc.train.threads > 0 && !getenv("OMP_NUM_THREADS"))
        omp_set_num_threads(tr->rc.train.threads);
    size_t B = (size_t)tr->rc.train.batch_size, T = (size_t)tr->rc.model.seq_len;
    model_init(&tr->m, &tr->rc.model, run_backend(&tr->rc.train), B, T);
    run_set_precision(&tr->m, &tr->rc.train);
    model_init_weights(&tr->m, (uint64_t)tr->rc.train.seed);
    const OptimConfig *oc = &tr->rc.optim;
    ParamGroupRules rules = {oc->decay_norms, oc->decay_embeddings, oc->decay_router,
                             oc->router_lr_mult};
    ParamGroup *groups = param_groups_build(&tr->m.layout, NULL, &rules);
    adamw_init(&tr->opt, oc, groups, tr->m.layout.n_params, tr->m.be);
    free(groups);
    rng_init(&tr->rng, (uint64_t)tr->rc.train.seed);
    size_t accum = (size_t)tr->rc.train.grad_accum;
    tr->tokens = CALLOC(accum * 2 * tr->m.N, sizeof *tr->tokens);
    tr->op_seconds = CALLOC(tr->m.tape.n, sizeof *tr->op_seconds);
    step_runner_init(&tr->step, &tr->m, (int)accum, tr->rc.model.aux_scope == AUX_SCOPE_BATCH,
                     tr->rc.train.keep_activations);
}

static void trainer_free(Trainer *tr) {
    step_runner_free(&tr->step);
    free(tr->tokens);
    free(tr->op_seconds);
    adamw_free(&tr->opt);
    tr->m.tape.op_seconds = NULL;
    model_free(&tr->m);
}

// Uniform random tokens: the targets are noise too, which changes nothing in the cost.
static void draw_tokens(Trainer *tr) {
    size_t n = (size_t)tr->rc.train.grad_accum * 2 * tr->m.N, V = (size_t)tr->rc.model.vocab;
    for (size_t i = 0; i < n; i++)
        tr->tokens[i] = (int32_t)(rng_next(&tr->rng) % V);
}

// Assignments the experts computed in the last forward (kept by capacity), all layers.
static size_t kept_rows(const Model *m) {
    size_t E = (size_t)m->cfg.experts, rows = 0;
    for (int i = 0; i < m->n_moe; i++) {
        int32_t total;
        m->be->download(&total, tensor_slice(m->moe[i].offsets, E, 1), sizeof total);
        rows += (size_t)total;
    }
    return rows;
}

// Every tape op's time into tr->op_seconds (the replicas' tapes have the same ops).
static void time_ops(Trainer *tr, int on) {
    for (int a = 0; a < tr->rc.train.grad_accum; a++)
        step_runner_model(&tr->step, a)->tape.op_seconds = on ? tr->op_seconds : NULL;
}

static void count_kept(void *ctx, const Model *m) {
    Trainer *tr = ctx;
    tr->kept += kept_rows(m);
}

// One optimizer step; fills phase (PHASE_COUNT) and *untaped (the part of PHASE_OTHER
// outside tape ops) and returns the step's wall time.
static double train_step(Trainer *tr, long step, double *phase, double *untaped) {
    Model *m = &tr->m;
    int accum = tr->rc.train.grad_accum;
    draw_tokens(tr);
    memset(tr->op_seconds, 0, m->tape.n * sizeof *tr->op_seconds);
    memset(phase, 0, PHASE_COUNT * sizeof *phase);
    double t0 = step_clock(m);
    tr->kept = 0;
    time_ops(tr, 1);
    step_runner_run(&tr->step, tr->tokens, &tr->rng, count_kept, tr);
    time_ops(tr, 0);
    phase[PHASE_POOL] = tr->step.pool_seconds;
    double t1 = step_clock(m);
    adamw_step(&tr->opt, m->params, m->grads, tr->rc.optim.lr, step, 1.0 / accum);
    double t2 = step_clock(m);
    phase[PHASE_OPTIMIZER] = t2 - t1;
    for (size_t i = 0; i < m->tape.n; i++)
        phase[bench_op_phase(&m->tape, i)] += tr->op_seconds[i];
    double timed = 0.0;
    for (int p = 0; p < PHASE_COUNT; p++)
        timed += p == PHASE_OTHER ? 0.0 : phase[p];
    *untaped = (t2 - t0) - timed - phase[PHASE_OTHER]; // zeroing, noise, batch copies
    phase[PHASE_OTHER] += *untaped;
    return t2 - t0;
}

// The attention op's time in the step just run (the op timer keeps it until the next),
// and its GEMM FLOPs over the query-key pairs the causal mask keeps: forward q k^T and
// p v (4D per pair), backward the scores again, dout v^T, dv, dq and dk (10D).
static void attention_core(const Trainer *tr, double *seconds, double *flops) {
    const Tape *t = &tr->m.tape;
    *seconds = *flops = 0.0;
    for (size_t i = 0; i < t->n; i++) {
        const TapeOp *op = &t->ops[i];
        double B, T, HD; // HD: query/key and value widths of all heads, averaged
        if (op->kind == OP_ATTENTION) {
            B = (double)op->attention.B, T = (double)op->attention.T;
            HD = (double)(op->attention.D * op->attention.H);
        } else if (op->kind == OP_ATTENTION_MLA) {
            B = (double)op->attention_mla.B, T = (double)op->attention_mla.T;
            HD = 0.5 * (double)((op->attention_mla.Dk + op->attention_mla.Dv) *
                                op->attention_mla.H);
        } else {
            continue;
        }
        double pairs = 0.5 * T * (T + 1);
        *seconds += tr->op_seconds[i];
        *flops += 14.0 * HD * B * pairs * tr->rc.train.grad_accum;
    }
}

void bench_train(TrainResult *out, const BenchConfig *config, int steps, double min_seconds) {
    static Trainer tr;
    trainer_init(&tr, config);
    const ModelConfig *c = &tr.rc.model;
    bench_config_name(config, out->name, sizeof out->name);
    out->params = tr.m.layout.total;
    out->active = active_params(&tr.m);
    out->tokens_per_step = tr.m.N * (size_t)tr.rc.train.grad_accum;
    out->flops_per_token =
        6.0 * (double)out->active + 12.0 * c->layers * (double)c->seq_len * c->d_model;
    out->expert_flops = 6.0 * c->top_k * 3.0 * c->expert_ffn_dim * c->d_model * tr.m.n_moe;
    out->threads = omp_get_max_threads();
    out->acts_mb = (double)tr.m.acts.size / 1e6;
    out->dacts_mb = (double)tr.m.dacts.size / 1e6;
    size_t routed = out->tokens_per_step * (size_t)c->top_k * (size_t)tr.m.n_moe;
    double phase[PHASE_COUNT], untaped;
    train_step(&tr, 0, phase, &untaped); // warm-up: first touch of every buffer, threads
    out->step_s = 0.0;
    double started = omp_get_wtime();
    long s = 1;
    for (; s <= steps || omp_get_wtime() - started < min_seconds; s++) {
        double t = train_step(&tr, s, phase, &untaped);
        if (out->step_s == 0.0 || t < out->step_s) {
            out->step_s = t;
            out->untaped_s = untaped;
            out->kept = routed ? (double)tr.kept / (double)routed : 1.0;
            memcpy(out->phase_s, phase, sizeof phase);
            attention_core(&tr, &out->attention_s, &out->attention_flops);
        }
    }
    out->steps = (int)(s - 1);
    trainer_free(&tr);
}
