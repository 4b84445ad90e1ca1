// train.c: `moe train CONFIG [section.key=value ...]`, `moe train --resume RUN`,
// `moe finetune CONFIG finetune.init=CKPT ...`.
//
// One step: grad_accum micro-batches (forward with fresh router noise, backward into
// the accumulated gradients), then one AdamW step on their mean over the trainable
// tensors. Validation per domain every eval_every steps and at the end; checkpoints every
// ckpt_every steps, at the end, and best.h5 on a new best validation loss; then the
// expert-usage table and a sample. A resumed run continues bit for bit: weights, AdamW
// moments, step, router-noise generator and data cursor all come from the checkpoint.
#include "train.h"

#include <errno.h>
#include <math.h>
#include <libgen.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../data/loader.h"
#include "../dist/dist.h"
#include "../kernels/cpu/blas.h"
#include "../kernels/cpu/cpu_ops.h"
#include "../base/util.h"
#include "../model/esft.h"
#include "../model/model.h"
#include "../model/param_groups.h"
#include "../model/routing_stats.h"
#include "../optim/adamw.h"
#include "../optim/schedule.h"
#include "../model/trainable.h"
#include "formats/checkpoint.h"
#include "config.h"
#include "eval.h"
#include "interrupt.h"
#include "metrics.h"
#include "report.h"
#include "run.h"
#include "sample.h"
#include "ep.h"
#include "ep_gather.h"
#include "step.h"
#include "zero.h"

typedef enum { MODE_TRAIN, MODE_RESUME, MODE_FINETUNE } RunMode;

typedef struct {
    RunMode mode;
    RunConfig rc;
    char run_dir[RUN_PATH_MAX];
    char ckpt[KEY_STRING_MAX];   // resume: the checkpoint; finetune: the initial weights
    Model model;
    AdamW opt;                // this rank's block of the state under ZeRO-1
    Zero zero;
    Ep ep;                    // expert parallelism's exchanges (dist.expert_parallel > 1)
    int zero_on;              // dist.zero = 1 over several ranks
    int ep_on;                // dist.expert_parallel > 1: the model is this rank's shard
    Layout whole;             // the whole model's layout (under EP the model holds part)
    uint8_t *whole_trainable; // (whole.n_params) trainable flags of the whole model
    ParamGroup *whole_groups; // (whole.n_params) under EP: the checkpoint gather's
    DataLoader *data;
    Metrics metrics;
    RoutingStats step_stats;
    RoutingStats window;      // routing since the last evaluation (dead experts)
    EvalResult eval;
    TrainState st;            // step, tokens, data cursor, noise generator, best loss
    uint8_t *trainable;       // (layout tensors)
    uint64_t base_fingerprint;   // finetune: the initial weights, for delta checkpoints
    int32_t *batch;           // (grad_accum, 2, N) tokens then targets per micro-batch
    StepRunner step;          // the step's micro-batches forward and backward
    long first_step;          // the step this invocation started from
    long steps_run;           // optimizer steps this invocation ran (rolled back ones too)
    uint64_t step_bytes;      // bytes this rank handed to the collectives inside the steps
    double step_comm_s;       // seconds inside the steps' collectives
    double step_s;            // seconds inside the steps (gradients and update)
    long skipped;             // steps this invocation skipped as non-finite
    long saved_step;          // the step of the last ckpt_<step>.h5 written, or -1
    long rollback_step;       // the checkpoint step the last rollback returned to, or -1
    int rollbacks;            // rollbacks in a row to rollback_step
    double train_s, total_s;  // wall time of training steps, and of the whole loop
} Run;

static void print_train_help(void) {
    printf("usage: moe train CONFIG.ini [section.key=value ...]\n"
           "  Trains the model CONFIG describes; overrides follow the config file.\n"
           "  Output: <train.out_dir>/<train.name>/ with config.ini, metrics.csv,\n"
           "  experts.csv, report.html (moe report RUN_DIR writes it again). Keys:\n");
    run_config_print_help(stdout);
}

// The run name defaults to the config file's base name.
static void default_run_name(RunConfig *rc, const char *config_path) {
    if (rc->train.name[0]) return;
    char path[KEY_STRING_MAX];
    snprintf(path, sizeof path, "%s", config_path);
    char *base = basename(path), *dot = strrchr(base, '.');
    if (dot) *dot = '\0';
    snprintf(rc->train.name, sizeof rc->train.name, "%s", base);
}

// A run name is one directory inside train.out_dir: a name that climbs out of it or
// names it would mix this run's files with another's.
static void check_run_name(const char *name) {
    if (!name[0] || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
        FAIL("train.name = '%s': a run name is one directory name inside train.out_dir (no "
             "'/', not '.' or '..')", name);
}

static void make_dirs(const char *path) {
    char tmp[RUN_PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST) FAIL("%s: cannot create directory", tmp);
        *p = '/';
    }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) FAIL("%s: cannot create directory", tmp);
}

static void write_resolved_config(Run *r) {
    char path[RUN_FILE_MAX], tmp[RUN_FILE_MAX + 8];
    snprintf(path, sizeof path, "%s/config.ini", r->run_dir);
    FILE *f = run_create_file(path, tmp, sizeof tmp);
    fprintf(f, "; resolved configuration of run %s (every key, defaults included)\n\n",
            r->rc.train.name);
    run_config_write_ini(f, &r->rc);
    run_commit_file(f, tmp, path);
}

// A new run takes an empty directory (files of other programs, such as moe ablate's
// train.log, may be there): another run's config.ini, CSVs and checkpoints would mix
// with this one's, and eval or --resume would pick the other run's newest checkpoint.
static void check_run_dir_free(const Run *r) {
    char file[256];
    if (run_dir_find_run_file(r->run_dir, file, sizeof file))
        FAIL("%s: holds another run (%s)\nHINT: moe train --resume %s continues it; "
             "train.name=OTHER starts a new run beside it",
             r->run_dir, file, r->run_dir);
}

// The directory's run id: a new run's, or on resume the directory's own (a directory
// from before run ids adopts its checkpoint's). Stale *.tmp of a killed save go.
static void claim_run_dir(Run *r) {
    make_dirs(r->run_dir);
    if (r->mode == MODE_RESUME) {
        run_remove_tmp(r->run_dir);
        uint64_t id;
        if (run_read_id(r->run_dir, &id) == 0) return;
        if (!r->st.run_id) r->st.run_id = run_new_id();
    } else {
        r->st.run_id = run_new_id();
    }
    run_write_id(r->run_dir, r->st.run_id);
}

static void open_metrics(Run *r, long from_step) {
    if (!dist_lead()) return;   // rank 0 alone writes the run's files
    int nd = data_loader_domains(r->data);
    const char *names[DATA_MAX_DOMAINS];
    for (int d = 0; d < nd; d++) names[d] = data_loader_domain_name(r->data, d);
    metrics_open(&r->metrics, r->run_dir, names, nd, r->rc.train.log_every, from_step);
}

// Parameters one token computes with: all but the experts it is not routed to (the
// embedding counts only when tied, i.e. when it is also the output matmul).
static size_t active_params(const Layout *lay, const ModelConfig *c) {
    size_t active = 0;
    for (size_t i = 0; i < lay->n_params; i++) {
        const ParamInfo *p = &lay->params[i];
        if (p->kind == PARAM_EXPERT) active += p->expert < c->top_k ? p->numel : 0;
        else if (p->kind != PARAM_EMBED || c->tie_embeddings) active += p->numel;
    }
    return active;
}

// Validation uses full batches only (the loss is a mean over all B rows), so every
// domain needs B windows of T+1 tokens; say so before training rather than after.
static void check_val_batches(const DataLoader *dl, size_t B, size_t T) {
    for (int d = 0; d < data_loader_domains(dl); d++) {
        size_t n = data_loader_val_batches(dl, d);
        int32_t *tok = CALLOC(2 * B * T, sizeof *tok);
        size_t rows = n ? data_loader_val_batch(dl, d, 0, tok, tok + B * T) : 0;
        free(tok);
        if (rows < B)
            FAIL("domain %s: validation data holds %zu windows of %zu tokens, fewer than "
                 "train.batch_size = %zu\nHINT: give the domain more validation text, or "
                 "raise data.val_tokens, or lower train.batch_size",
                 data_loader_domain_name(dl, d), rows, T + 1, B);
    }
}

// Trainable tensors from finetune.train minus finetune.freeze; "auto" is first replaced
// by the ESFT selection on this run's training data, and the expansion is written back
// into the config so the run directory and checkpoints record what really trained.
static void choose_trainable(Run *r) {
    FinetuneConfig *fc = &r->rc.finetune;
    Model *m = &r->model;
    if (!strcmp(fc->train, "auto")) {
        RoutingStats rs;
        routing_stats_init(&rs, &m->cfg);
        DataLoader *dl = run_open_data(&r->rc, m, (uint64_t)r->rc.train.seed ^ 0x65736674ULL);
        Ep ep = {0};   // a shard's routing needs its group's experts: every rank runs it
        if (r->ep_on) ep_init(&ep, &m, 1);
        run_collect_routing(m, dl, fc->select_batches, &rs);
        ep_free(&ep);
        data_loader_close(dl);
        EsftResult es;
        esft_select(&es, &rs, (EsftScore)fc->select, fc->p);
        esft_to_expr(&es, &m->cfg, fc->train, sizeof fc->train);
        printf("finetune.train = auto: ESFT %s score, p = %.3g over %d batches -> %s\n",
               fc->select == ESFT_GATE ? "gate" : "token", fc->p, fc->select_batches, fc->train);
        esft_free(&es);
        routing_stats_free(&rs);
    }
    char err[1024];
    r->whole_trainable = CALLOC(r->whole.n_params, 1);
    if (trainable_select(&r->whole, &m->cfg, fc->train, fc->freeze, r->whole_trainable, err,
                         sizeof err) != 0)
        FAIL("%s", err);
    r->trainable = CALLOC(m->layout.n_params, 1);   // the shard's part of the selection
    for (size_t i = 0; i < m->layout.n_params; i++)
        r->trainable[i] = r->whole_trainable[layout_find(&r->whole, m->layout.params[i].name) -
                                             r->whole.params];
    model_set_trainable(m, r->trainable);
}

// A checkpoint's weights, state and AdamW moments (this rank's block of them under
// ZeRO-1, sliced out of the whole state every rank reads).
static void load_checkpoint(Run *r, const char *path) {
    char err[1024];
    AdamW full, *opt = &r->opt;
    if (r->zero_on) zero_full_init(&r->zero, opt = &full);
    if (ckpt_load(path, &r->model, opt, &r->st, err, sizeof err) != 0) FAIL("%s", err);
    if (!r->zero_on) return;
    zero_take(&r->zero, &r->opt, &full);
    adamw_free(&full);
}

static void load_weights(Run *r) {
    char err[1024];
    Model *m = &r->model;
    if (r->mode == MODE_TRAIN) {
        model_init_weights(m, (uint64_t)r->rc.train.seed);
        return;
    }
    const char *init = r->mode == MODE_FINETUNE ? r->ckpt : r->rc.finetune.init;
    if (init[0] && ckpt_load(init, m, NULL, NULL, err, sizeof err) != 0) FAIL("%s", err);
    if (!init[0]) return;
    if (!r->ep_on) {
        r->base_fingerprint = ckpt_fingerprint(m);
        return;
    }
    EpWhole w;   // a delta names the whole model it applies to
    ep_gather(&w, m, NULL, NULL, NULL);
    if (dist_lead()) r->base_fingerprint = ckpt_fingerprint(&w.model);
    ep_whole_free(&w);
    dist_broadcast(&r->base_fingerprint, sizeof r->base_fingerprint, 0);
}

// The expert groups, before the model (a shard of this rank's experts) is made.
static void split_expert_groups(Run *r) {
    const DistConfig *dc = &r->rc.dist;
    int ep = dc->expert_parallel;
    if (dist_size() % ep != 0)
        FAIL("dist.expert_parallel = %d with %d rank(s): the rank count (mpirun -np) must be "
             "a multiple of EP (EP x DP ranks)", ep, dist_size());
    dist_split_expert_groups(ep);
    r->ep_on = 1;
}

// The routed experts of every activation set exchange with the experts' owners in the
// rank's expert group.
static void start_expert_parallel(Run *r) {
    Model *models[64];
    int n = step_runner_sets(&r->step);
    CHECK(n <= 64, "%d activation sets", n);
    for (int a = 0; a < n; a++) models[a] = step_runner_model(&r->step, a);
    ep_init(&r->ep, models, n);
}

// ZeRO-1 over every rank; under EP the routed experts' state over their replicas.
static void start_zero(Run *r, const ParamGroup *groups) {
    const Layout *lay = &r->model.layout;
    uint8_t *expert = CALLOC(lay->n_params ? lay->n_params : 1, 1);   // (n_params)
    for (size_t i = 0; i < lay->n_params; i++) expert[i] = lay->params[i].kind == PARAM_EXPERT;
    zero_init(&r->zero, &r->opt, &r->rc.optim, groups, r->ep_on ? expert : NULL,
              lay->n_params, r->model.be);
    free(expert);
}

static void setup(Run *r) {
    RunConfig *rc = &r->rc;
    run_set_threads(&rc->train);
    if (cpu_blas_self_check() != 0)
        FAIL("OpenBLAS kernel %s computes a wrong product\nHINT: set OPENBLAS_CORETYPE to a "
             "kernel your CPU supports (e.g. Haswell) and run again", cpu_blas_kernel_name());
    if (rc->train.grad_accum % dist_size() != 0)
        FAIL("train.grad_accum = %d: %d ranks split the step's micro-batches, so it must be "
             "a multiple of %d\nHINT: train.grad_accum=%d runs the same batch size per rank",
             rc->train.grad_accum, dist_size(), dist_size(), rc->train.grad_accum * dist_size());
    if (r->mode != MODE_RESUME) {
        snprintf(r->run_dir, sizeof r->run_dir, "%s/%s", rc->train.out_dir, rc->train.name);
        if (dist_lead()) check_run_dir_free(r);
    }
    if (rc->dist.expert_parallel > 1) split_expert_groups(r);
    size_t B = (size_t)rc->train.batch_size, T = (size_t)rc->model.seq_len;
    int lo = 0, hi = rc->model.experts;
    if (r->ep_on) ep_expert_range(&rc->model, &lo, &hi);
    model_init_experts(&r->model, &rc->model, run_backend(&rc->train), B, T, lo, hi);
    layout_init(&r->whole, &rc->model);
    run_set_precision(&r->model, &rc->train);
    r->data = run_open_data(rc, &r->model, (uint64_t)rc->train.seed);
    check_val_batches(r->data, B, T);
    load_weights(r);
    rng_init(&r->st.noise_rng, (uint64_t)rc->train.seed ^ 0x6e6f697365ULL);
    r->st.best_val = INFINITY;
    r->st.lr_scale = 1.0;
    r->saved_step = r->rollback_step = -1;
    choose_trainable(r);
    ParamGroupRules rules = {rc->optim.decay_norms, rc->optim.decay_embeddings,
                             rc->optim.decay_router, rc->optim.router_lr_mult};
    ParamGroup *groups = param_groups_build(&r->model.layout, r->trainable, &rules);
    if (r->ep_on) r->whole_groups = param_groups_build(&r->whole, r->whole_trainable, &rules);
    r->zero_on = rc->dist.zero && dist_size() > 1;
    if (r->zero_on)
        start_zero(r, groups);
    else
        adamw_init(&r->opt, &rc->optim, groups, r->model.layout.n_params, r->model.be);
    free(groups);
    if (r->mode == MODE_RESUME) {
        load_checkpoint(r, r->ckpt);
        data_loader_seek(r->data, r->st.data_cursor);
    }
    if (dist_lead()) {
        claim_run_dir(r);
        run_save_tokenizer(rc, r->run_dir);
        write_resolved_config(r);
    }
    routing_stats_init(&r->step_stats, &rc->model);
    routing_stats_init(&r->window, &rc->model);
    eval_result_init(&r->eval, &rc->model, data_loader_domains(r->data));
    open_metrics(r, r->st.step);
    r->batch = CALLOC(2 * r->model.N * (size_t)rc->train.grad_accum, sizeof *r->batch);
    step_runner_init(&r->step, &r->model, rc->train.grad_accum,
                     rc->model.aux_scope == AUX_SCOPE_BATCH, rc->train.keep_activations);
    r->step.sum_grads = !r->zero_on;
    if (r->ep_on) start_expert_parallel(r);
}

// The largest block of a ZeRO-1 part.
static size_t largest_block(const ZeroPart *p) {
    size_t most = 0;
    for (int k = 0; k < p->P; k++)
        if (p->state_bounds[k + 1] - p->state_bounds[k] > most)
            most = p->state_bounds[k + 1] - p->state_bounds[k];
    return most;
}

// Under EP, ZeRO-1's two shardings: the dense tensors' state over every rank, this rank's
// experts' over their replicas.
static void print_zero_ep(const Run *r, FILE *f) {
    const ZeroPart *d = &r->zero.parts[0], *e = &r->zero.parts[1];
    fprintf(f, "ZeRO-1: optimizer state %.3f MB on rank 0 (frozen tensors hold none): the "
            "dense tensors' %zu trainable values over all %d ranks, at most %zu per rank, and "
            "the %zu of this rank's routed experts over the %d rank(s) holding them, at most "
            "%zu per rank; collectives on the trainable values packed into a host buffer\n",
            (double)adamw_state_bytes(&r->opt) / 1e6, d->state_bounds[d->P], d->P,
            largest_block(d), e->state_bounds[e->P], e->P, largest_block(e));
}

// Under several ranks the plan above is each rank's; ZeRO-1's optimizer state differs
// by rank: the largest block is what a rank must hold.
static void print_rank_memory(const Run *r, FILE *f) {
    if (r->ep_on) {
        const Layout *lay = &r->model.layout;
        fprintf(f, "expert parallel: the plan above is rank 0's; each rank holds %zu of the "
                "model's %zu parameter values (%.3f MB; the dense tensors and %d of the %d "
                "routed experts of each MoE layer), with their gradients%s\n",
                lay->total, r->whole.total, (double)(lay->total * sizeof(real)) / 1e6,
                lay->expert_hi - lay->expert_lo, r->rc.model.experts,
                r->zero_on ? "" : " and AdamW state");
        if (r->zero_on) print_zero_ep(r, f);
        return;
    }
    if (!r->zero_on) {
        fprintf(f, "every rank holds the plan above (dist.zero=1 shards the optimizer state)\n");
        return;
    }
    const ZeroPart *p = &r->zero.parts[0];
    const size_t bytes = 2 * sizeof(real);
    fprintf(f, "ZeRO-1: optimizer state at most %.3f MB per rank (of %.3f MB over %d ranks; "
            "frozen tensors hold none); collectives %s\n",
            (double)(largest_block(p) * bytes) / 1e6,
            (double)(p->state_bounds[p->P] * bytes) / 1e6, p->P,
            p->in_place ? "in place on the gradient and parameter tensors"
                        : "on the trainable values packed into a host buffer");
}

// Rank 0 evaluates; under expert parallelism its expert group (ranks 0 .. EP-1) with it,
// each rank running the same batches, since no rank holds every expert.
static int evaluates(const Run *r) {
    return r->ep_on ? dist_rank() < dist_ep_size() : dist_lead();
}

static void evaluate(Run *r) { eval_run(&r->eval, &r->model, r->data); }

// Everything the run allocated once, on the device it computes on.
static void print_memory_plan(const Run *r, FILE *f) {
    const Model *m = &r->model;
    double mb = 1e6, param = (double)m->layout.total * sizeof(real);
    int sets = step_runner_sets(&r->step);
    fprintf(f,
            "memory (%s, allocated once): parameters %.1f MB, gradients %.1f MB, optimizer "
            "state %.1f MB (trainable tensors only), activations %d x %.1f MB, their "
            "gradients %.1f MB",
            m->be->name, param / mb, param / mb, (double)adamw_state_bytes(&r->opt) / mb, sets,
            (double)m->acts.size / mb, (double)m->dacts.size / mb);
    if (m->tape.bf16 && m->be->set_bf16_weights)
        fprintf(f, ", bf16 weight copy %.1f MB", param / 2 / mb);
    fprintf(f, "\n");
    if (dist_size() > 1) print_rank_memory(r, f);
}

// EP x DP: the expert groups, each exchanging within itself.
static const char *expert_groups_note(int groups) {
    static char note[128];
    note[0] = '\0';
    if (groups > 1)
        snprintf(note, sizeof note, "; %d such groups of consecutive ranks (EP x DP), each "
                 "exchanging within itself", groups);
    return note;
}

static void print_startup(const Run *r, FILE *f) {
    const Model *m = &r->model;
    const RunConfig *rc = &r->rc;
    const char *what[] = {"train", "resume", "finetune"};
    fprintf(f, "moe %s: run %s -> %s", what[r->mode], rc->train.name, r->run_dir);
    if (r->mode != MODE_TRAIN) fprintf(f, " (from %s, step %ld)", r->ckpt, r->st.step);
    char sel[2048];
    trainable_describe(&r->whole, r->whole_trainable, sel, sizeof sel);
    size_t trainable = 0;   // the whole model's (under ZeRO-1 or EP a rank holds part)
    for (size_t i = 0; i < r->whole.n_params; i++)
        if (r->whole_trainable[i]) trainable += r->whole.params[i].numel;
    fprintf(f,
            "\nmodel: %d layers, d_model %d, %d experts top-%d, %.2fM params (%.2fM active per "
            "token)\ntraining: %s: %zu trainable params, optimizer state %.2f MB\n",
            rc->model.layers, rc->model.d_model, rc->model.experts, rc->model.top_k,
            (double)r->whole.total / 1e6, (double)active_params(&r->whole, &m->cfg) / 1e6, sel,
            trainable, (double)(2 * trainable * sizeof(real)) / 1e6);
    fprintf(f, "data:");
    for (int d = 0; d < data_loader_domains(r->data); d++)
        fprintf(f, " %s (%.2fM train tokens)", data_loader_domain_name(r->data, d),
                (double)data_loader_train_tokens(r->data, d) / 1e6);
    char dev[512];
    run_describe_device(m, dev, sizeof dev);
    fprintf(f,
            "\nbatch: %d x %d tokens x %d accum = %zu tokens/step, %d steps | cpu: %d threads, "
            "OpenBLAS %s kernel (%s), attention tiles %s\n%s\n",
            rc->train.batch_size, rc->model.seq_len, rc->train.grad_accum,
            m->N * (size_t)rc->train.grad_accum, rc->train.steps, omp_get_max_threads(),
            cpu_blas_kernel_name(), cpu_blas_kernel_origin(), cpu_attention_tiles(NULL), dev);
    if (dist_size() > 1)
        fprintf(f, "data parallel: %d ranks, %d micro-batch(es) of the step's %d each; %s\n",
                dist_size(), r->step.accum, r->step.total,
                r->zero_on ? "ZeRO-1: gradients reduce-scattered, AdamW state sharded, weights "
                             "all-gathered" : "gradients all-reduced every step");
    if (dist_size() > 1)
        fprintf(f, "gradient collectives (rank 0): %zu of the slab's %zu values (%.3f MB) per "
                "step, the trainable tensors' (frozen tensors send none)\n", r->step.sync.runs.values,
                m->layout.total, (double)(r->step.sync.runs.values * sizeof(real)) / 1e6);
    if (r->rc.dist.expert_parallel > 1)
        fprintf(f, "expert parallel: %d ranks, each computing %d of the %d experts of every MoE "
                "layer for every rank's tokens (rows exchanged with %s)%s\n",
                dist_ep_size(), r->rc.model.experts / dist_ep_size(), r->rc.model.experts,
                m->be->device == DEVICE_CPU ? "MPI_Alltoallv" : "NCCL's grouped send/recv",
                expert_groups_note(dist_size() / dist_ep_size()));
    print_memory_plan(r, f);
}

// The start-up lines again in startup.txt, for the run report (report.h).
static void write_startup(const Run *r) {
    char path[RUN_FILE_MAX], tmp[RUN_FILE_MAX + 8];
    snprintf(path, sizeof path, "%s/startup.txt", r->run_dir);
    FILE *f = run_create_file(path, tmp, sizeof tmp);
    print_startup(r, f);
    run_commit_file(f, tmp, path);
}

// The step's micro-batches, drawn up front so a pooling pass can see them all.
static void draw_micro_batches(Run *r) {
    size_t N = r->model.N;
    for (int a = 0; a < r->rc.train.grad_accum; a++)
        data_loader_next(r->data, r->batch + 2 * N * a, r->batch + 2 * N * a + N, NULL);
}

static void add_routing(void *ctx, const Model *m) {
    Run *r = ctx;
    routing_stats_add(&r->step_stats, m, m->B);
}

// Every rank's routing of the step, so that the logs and the expert-bias update see the
// whole step's.
static void sum_routing(RoutingStats *rs) {
    size_t n = (size_t)rs->n_layers * (size_t)rs->experts;
    dist_sum_u64(&rs->tokens, 1);
    dist_sum_u64(rs->routed, n);
    dist_sum_u64(rs->dropped, n);
    dist_sum_doubles(rs->gate_sum, n);
    dist_sum_doubles(rs->entropy_sum, (size_t)rs->n_layers);
    dist_sum_doubles(rs->lse_sum, (size_t)rs->n_layers);
}

// Forward and backward over grad_accum micro-batches (this rank's share of them); returns
// the step's losses.
static ModelLosses accumulate_gradients(Run *r) {
    draw_micro_batches(r);
    routing_stats_reset(&r->step_stats);
    ModelLosses l = step_runner_run(&r->step, r->batch, &r->st.noise_rng, add_routing, r);
    if (dist_size() > 1) sum_routing(&r->step_stats);
    return l;
}

static void print_eval(Run *r, long step) {
    metrics_break_line(&r->metrics);
    printf("eval step %ld: val loss", step);
    for (int d = 0; d < r->eval.n_domains; d++)
        printf(" %s %.4f", data_loader_domain_name(r->data, d), r->eval.loss[d]);
    printf(" | mean %.4f\n", r->eval.loss[r->eval.n_domains]);
}

// The first tensor of slab (layout order; trainable ones only if asked) holding a NaN or
// an infinity: 1 and "NAME (value)" in out, else 0.
static int find_nonfinite(const Model *m, const uint8_t *trainable, Tensor slab,
                          int trainable_only, char *out, size_t n) {
    real *host = CALLOC(m->layout.total, sizeof *host);
    m->be->download(host, slab, m->layout.total * sizeof *host);
    int found = 0;
    for (size_t i = 0; i < m->layout.n_params && !found; i++) {
        const ParamInfo *p = &m->layout.params[i];
        if (trainable_only && !trainable[i]) continue;
        for (size_t j = 0; j < p->numel && !found; j++)
            if ((found = !isfinite(host[p->offset + j])))
                snprintf(out, n, "%s (%g)", p->name, (double)host[p->offset + j]);
    }
    free(host);
    return found;
}

// A checkpoint with a NaN or an infinity would poison every run resumed from it and
// push good ones out of train.keep: such weights are never saved.
static void write_checkpoint(Run *r, const char *file, const Model *m, AdamW *opt,
                             const uint8_t *trainable) {
    char path[RUN_FILE_MAX], err[1024], bad[384];
    snprintf(path, sizeof path, "%s/%s", r->run_dir, file);
    if (find_nonfinite(m, trainable, m->params, 0, bad, sizeof bad))
        FAIL("%s: not saved: the weight %s is not finite", path, bad);
    r->st.data_cursor = data_loader_cursor(r->data);
    // Only a delta names its base: a full checkpoint's fingerprint is 0 (export takes it,
    // merge refuses it), whatever weights the run started from.
    const int delta = r->rc.finetune.delta;
    if (ckpt_save(path, &r->rc, m, opt, &r->st, delta ? trainable : NULL,
                  delta ? r->base_fingerprint : 0, err, sizeof err) != 0)
        FAIL("%s", err);
}

// Every rank calls it (ZeRO-1 gathers the state to rank 0, under EP the experts' to the
// ranks of expert group 0; expert parallelism the whole model); rank 0 writes.
static void save_checkpoint(Run *r, const char *file) {
    AdamW full, *opt = &r->opt;
    if (r->zero_on) zero_gather(&r->zero, &r->opt, opt = &full);
    if (r->ep_on) {   // under ZeRO-1 the ranks of expert group 0 hold their shards' state
        EpWhole w;
        ep_gather(&w, &r->model, opt, r->whole_groups, &r->rc.optim);
        if (dist_lead()) write_checkpoint(r, file, &w.model, &w.opt, r->whole_trainable);
        ep_whole_free(&w);
    } else if (dist_lead()) {
        write_checkpoint(r, file, &r->model, opt, r->trainable);
    }
    if (r->zero_on) adamw_free(&full);
}

// Keeps the newest train.keep ckpt_<step>.h5 files up to the one just saved, which is
// finite (save_checkpoint refuses non-finite weights) and never removed; newer files, left
// by a run resumed from an older checkpoint, are not this pruning's to judge.
static void prune_checkpoints(const Run *r) {
    size_t n, kept = 0;
    long *steps = run_list_checkpoints(r->run_dir, &n);
    for (size_t i = n; i-- > 0;) {
        if (steps[i] > r->saved_step || ++kept <= (size_t)r->rc.train.keep) continue;
        char path[RUN_FILE_MAX];
        snprintf(path, sizeof path, "%s/ckpt_%06ld.h5", r->run_dir, steps[i]);
        if (remove(path) != 0)
            fprintf(stderr, "moe: warning: %s: cannot remove an old checkpoint: %s\n", path,
                    strerror(errno));
    }
    free(steps);
}

static void save_step_checkpoint(Run *r) {
    char file[64];
    snprintf(file, sizeof file, "ckpt_%06ld.h5", r->st.step);
    save_checkpoint(r, file);
    r->saved_step = r->st.step;
    if (dist_lead()) prune_checkpoints(r);
}

static void after_step(Run *r, int evaluated) {
    const TrainConfig *tc = &r->rc.train;
    long done = r->st.step;
    if (evaluated && r->eval.loss[r->eval.n_domains] < r->st.best_val) {
        r->st.best_val = r->eval.loss[r->eval.n_domains];
        save_checkpoint(r, "best.h5");
    }
    if (done == tc->steps || (tc->ckpt_every > 0 && done % tc->ckpt_every == 0))
        save_step_checkpoint(r);
}

// SIGINT or SIGTERM arrived: the step is complete, so it is saved and the run ends.
// Every rank stops after the same step: a signal reaching any of them counts.
static void stop_if_interrupted(Run *r) {
    int sig = dist_max_int(interrupt_pending());
    if (!sig) return;
    if (r->saved_step != r->st.step) save_step_checkpoint(r);
    if (!dist_lead()) {
        dist_finalize();
        exit(0);
    }
    run_remove_tmp(r->run_dir);
    metrics_close(&r->metrics);
    fflush(stdout);
    fprintf(stderr, "moe: %s: stopped after step %ld; checkpoint %s/ckpt_%06ld.h5 (moe train "
                    "--resume %s continues)\n",
            interrupt_name(sig), r->st.step, r->run_dir, r->st.step, r->run_dir);
    dist_finalize();
    exit(0);
}

// Back to the run's newest checkpoint (weights, moments, expert bias, data cursor, CSV
// rows) at a lower learning rate; repeated rollbacks to one checkpoint are bounded.
static void roll_back(Run *r, long step, const char *what) {
    const TrainConfig *tc = &r->rc.train;
    char ckpt[RUN_FILE_MAX];
    if (run_latest_checkpoint(r->run_dir, ckpt, sizeof ckpt) != 0)
        FAIL("step %ld: non-finite %s; train.on_nonfinite = rollback, but the run has no "
             "checkpoint yet", step + 1, what);
    load_checkpoint(r, ckpt);
    r->rollbacks = r->st.step == r->rollback_step ? r->rollbacks + 1 : 1;
    r->rollback_step = r->st.step;
    if (r->rollbacks > tc->max_rollbacks)
        FAIL("step %ld: non-finite %s after %d rollbacks to %s; stopped\nHINT: lower optim.lr "
             "or raise train.max_rollbacks", step + 1, what, tc->max_rollbacks, ckpt);
    r->st.lr_scale *= pow(tc->rollback_lr_factor, r->rollbacks);
    data_loader_seek(r->data, r->st.data_cursor);
    metrics_close(&r->metrics);
    open_metrics(r, r->st.step);
    routing_stats_reset(&r->window);
    fprintf(stderr, "moe: warning: step %ld: non-finite %s; rolled back to %s (step %ld), "
                    "learning rate x%g (rollback %d of at most %d)\n",
            step + 1, what, ckpt, r->st.step, r->st.lr_scale, r->rollbacks, tc->max_rollbacks);
}

// What train.on_nonfinite says to do about a step whose `what` is not finite. Returns 1
// when the step goes on (skipped), 0 when the run rolled back.
static int handle_nonfinite(Run *r, StepReport *rep, const char *what) {
    metrics_break_line(&r->metrics);
    switch (r->rc.train.on_nonfinite) {
    case NONFINITE_SKIP:
        fprintf(stderr, "moe: warning: step %ld: non-finite %s; update skipped "
                        "(train.on_nonfinite = skip)\n", rep->step + 1, what);
        rep->skipped = 1;
        r->skipped++;
        return 1;
    case NONFINITE_ROLLBACK:
        roll_back(r, rep->step, what);
        return 0;
    default:
        FAIL("step %ld: non-finite %s; stopped (train.on_nonfinite = abort)\nHINT: "
             "train.on_nonfinite=skip or rollback ride over such steps", rep->step + 1, what);
    }
}

// The optimizer step and the expert-bias update, unless the loss or a gradient is not
// finite (AdamW then changes nothing). Returns 0 when the run rolled back.
static int update_weights(Run *r, StepReport *rep) {
    const TrainConfig *tc = &r->rc.train;
    char what[512];
    rep->grad_norm = NAN;
    if (!isfinite(rep->losses.total)) {
        snprintf(what, sizeof what, "loss (%g)", rep->losses.total);
        return handle_nonfinite(r, rep, what);
    }
    Tensor params = r->model.params, grads = r->model.grads;
    double scale = 1.0 / tc->grad_accum;
    rep->grad_norm = r->zero_on ? zero_step(&r->zero, &r->opt, params, grads, rep->lr, rep->step,
                                            scale)
                     : r->ep_on ? ep_step(&r->ep, &r->opt, params, grads, rep->lr, rep->step,
                                          scale)
                                : adamw_step(&r->opt, params, grads, rep->lr, rep->step, scale);
    if (!isfinite(rep->grad_norm)) {
        char name[384];
        if (find_nonfinite(&r->model, r->trainable, r->model.grads, 1, name, sizeof name))
            snprintf(what, sizeof what, "gradient of %s", name);
        else   // finite gradients whose sum of squares overflowed
            snprintf(what, sizeof what, "gradient norm (%g)", rep->grad_norm);
        return handle_nonfinite(r, rep, what);
    }
    if (r->rc.model.bias_gamma > 0)
        routing_update_expert_bias(&r->model, &r->step_stats, r->rc.model.bias_gamma);
    return 1;
}

static void train_loop(Run *r) {
    const TrainConfig *tc = &r->rc.train;
    double t0 = omp_get_wtime(), eval_s = 0.0;   // tok/s counts training time only
    size_t tokens_per_step = r->model.N * (size_t)tc->grad_accum;
    long first = r->first_step = r->st.step;
    int n_evals = 0;
    const int lead = dist_lead();   // evaluates, logs and writes; the others only train
    if (evaluates(r) && tc->eval_every > 0 && r->mode != MODE_RESUME) {   // the starting point
        evaluate(r);
        if (lead) print_eval(r, first);
        eval_s = omp_get_wtime() - t0;
        n_evals++;
    }
    while (r->st.step < tc->steps) {
        long step = r->st.step;
        StepReport rep = {.step = step, .steps = tc->steps};
        // The steps' own communication, apart from checkpoints' and evaluations'.
        uint64_t b0 = dist_bytes_sent();
        double c0 = dist_seconds(), w0 = omp_get_wtime();
        rep.losses = accumulate_gradients(r);
        rep.lr = optim_lr_at(&r->rc.optim, step, tc->steps) * r->st.lr_scale;
        int updated = update_weights(r, &rep);
        r->step_bytes += dist_bytes_sent() - b0;
        r->step_comm_s += dist_seconds() - c0;
        r->step_s += omp_get_wtime() - w0;
        if (!updated) continue;
        r->st.step = step + 1;
        r->st.tokens_seen += tokens_per_step;
        rep.elapsed_s = omp_get_wtime() - t0;
        double done = (double)++r->steps_run, left = (double)(tc->steps - step - 1);
        rep.tok_per_s = (double)tokens_per_step * done / (rep.elapsed_s - eval_s);
        double evals_left = tc->eval_every > 0 ? floor(left / tc->eval_every) + 1 : 1;
        rep.eta_s = (rep.elapsed_s - eval_s) / done * left +
                    (n_evals ? eval_s / n_evals * evals_left : 0.0);
        rep.dropped = routing_dropped_fraction(&r->step_stats);
        rep.maxvio = routing_maxvio(&r->step_stats);
        rep.entropy = routing_entropy(&r->step_stats);
        rep.lse = routing_lse(&r->step_stats);
        rep.routing = &r->step_stats;
        routing_stats_merge(&r->window, &r->step_stats);
        int last = step + 1 == tc->steps;
        int eval = last || (tc->eval_every > 0 && (step + 1) % tc->eval_every == 0);
        if (lead) metrics_print_step(&r->metrics, &rep);
        if (eval) {   // on rank 0; the others learn its losses (best.h5 is saved by all)
            double te = omp_get_wtime();
            if (evaluates(r)) evaluate(r);
            dist_broadcast(r->eval.loss, (size_t)(r->eval.n_domains + 1) * sizeof *r->eval.loss,
                           0);
            eval_s += omp_get_wtime() - te;
            n_evals++;
            if (lead) print_eval(r, step + 1);
        }
        rep.window = eval ? &r->window : NULL;
        if (lead) {
            metrics_write_step(&r->metrics, &rep, eval ? r->eval.loss : NULL, &r->model);
            metrics_write_experts(&r->metrics, step, &r->step_stats, &r->model);
        }
        if (eval) routing_stats_reset(&r->window);
        after_step(r, eval);
        stop_if_interrupted(r);
    }
    r->train_s = omp_get_wtime() - t0 - eval_s;
    r->total_s = omp_get_wtime() - t0;
}

// Share of each domain's validation assignments per expert, one row per layer and domain.
static void print_usage_table(const Run *r) {
    const EvalResult *ev = &r->eval;
    if (ev->n_domains == 0 || ev->usage[0].n_layers == 0) return;
    int E = ev->usage[0].experts;
    printf("\nexpert usage on validation data (%% of each domain's assignments):\n%-16s",
           "layer/domain");
    for (int e = 0; e < E; e++) printf(" e%-3d", e);
    printf("\n");
    for (int l = 0; l < ev->usage[0].n_layers; l++) {
        for (int d = 0; d < ev->n_domains; d++) {
            const RoutingStats *rs = &ev->usage[d];
            uint64_t total = 0;
            for (int e = 0; e < E; e++) total += rs->routed[(size_t)l * E + e];
            printf("L%-2d %-12.12s", r->model.moe[l].layer, data_loader_domain_name(r->data, d));
            for (int e = 0; e < E; e++)
                printf(" %4.0f", total ? 100.0 * rs->routed[(size_t)l * E + e] / total : 0.0);
            printf("\n");
        }
    }
}

static void finish(Run *r) {
    metrics_close(&r->metrics);
    const TrainConfig *tc = &r->rc.train;
    if (dist_lead()) print_usage_table(r);
    int bytes = r->rc.data.tokenizer == TOKENIZER_BYTES;
    int sample = dist_lead() && tc->sample_tokens > 0 && (!bytes || r->rc.model.vocab == 256);
    if (sample && r->rc.model.select == SELECT_EXPERT_CHOICE) {   // model_init_decode
        printf("\nno sample: router.select = expert_choice routes among a batch's tokens, "
               "which generation does not have (docs/routing.md)\n");
        sample = 0;
    }
    if (sample && r->ep_on) {
        printf("\nsample: skipped (under expert parallelism no rank holds every expert; moe "
               "sample %s/ckpt_%06ld.h5 writes one)\n", r->run_dir, r->st.step);
        sample = 0;
    }
    if (sample) {
        char err[512];
        Tokenizer *tok = run_open_tokenizer(&r->rc);
        char *text = sample_text(&r->model, tok, tc->sample_prompt, tc->sample_tokens,
                                 tc->sample_temperature, 1.0, (unsigned long long)tc->seed,
                                 err, sizeof err);
        if (!text) FAIL("train.sample_prompt: %s", err);
        printf("\nsample (temperature %.2f):\n%s\n", tc->sample_temperature, text);
        free(text);
        tokenizer_free(tok);
    }
    size_t tokens = r->model.N * (size_t)tc->grad_accum * (size_t)r->steps_run;
    if (r->train_s > 0)
        printf("\ndone: step %ld, %.2fM tokens this run in %.1f s (%.0f tok/s training; %.1f s "
               "with evaluation); final val loss %.4f mean\n",
               r->st.step, (double)tokens / 1e6, r->train_s, (double)tokens / r->train_s,
               r->total_s, r->eval.loss[r->eval.n_domains]);
    if (dist_size() > 1 && r->steps_run > 0 && r->step_s > 0)
        printf("communication (rank 0): %.3f MB per step handed to MPI, %.1f%% of the steps' "
               "time inside collectives (waiting for other ranks included); besides the steps "
               "(start-up, checkpoints, evaluation) %.3f MB in all\n",
               (double)r->step_bytes / 1e6 / (double)r->steps_run,
               100.0 * r->step_comm_s / r->step_s,
               (double)(dist_bytes_sent() - r->step_bytes) / 1e6);
    if (r->skipped)
        printf("%ld of %ld steps skipped as non-finite (train.on_nonfinite = skip)\n",
               r->skipped, r->steps_run);
    printf("run written to %s (config.ini, metrics.csv, experts.csv, checkpoints)\n",
           r->run_dir);
    if (dist_lead()) report_after_run(r->run_dir);
    free(r->batch);
    ep_free(&r->ep);
    step_runner_free(&r->step);
    free(r->trainable);
    free(r->whole_trainable);
    free(r->whole_groups);
    layout_free(&r->whole);
    eval_result_free(&r->eval);
    routing_stats_free(&r->step_stats);
    routing_stats_free(&r->window);
    adamw_free(&r->opt);
    zero_free(&r->zero);
    model_free(&r->model);
    data_loader_close(r->data);
}

static void run_all(Run *r) {
    interrupt_install();   // a signal during setup stops the run after its first step
    setup(r);
    print_startup(r, stdout);
    if (dist_lead()) write_startup(r);
    if (r->st.step >= r->rc.train.steps)
        FAIL("%s is at step %ld, train.steps = %d: nothing to do\nHINT: raise train.steps "
             "(e.g. train.steps=%ld) to train further",
             r->ckpt, r->st.step, r->rc.train.steps, r->st.step * 2);
    train_loop(r);
    finish(r);
}

int train_main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        if (argc < 2) {
            fprintf(stderr, "usage: moe train CONFIG.ini [section.key=value ...]\n"
                            "       moe train --resume RUN_DIR|CHECKPOINT [section.key=value ...]\n"
                            "HINT: moe train --help lists every key\n");
            return 2;
        }
        print_train_help();
        return 0;
    }
    static Run run;
    if (!strcmp(argv[1], "--resume")) {
        if (argc < 3) FAIL("--resume needs a run directory or a checkpoint");
        run.mode = MODE_RESUME;
        run_resolve_checkpoint(argv[2], run.ckpt, sizeof run.ckpt);
        run_load_checkpoint_config(&run.rc, run.ckpt, argc - 3, argv + 3);
        // [dist] describes this launch, not the run: the checkpoint's does not carry over.
        dist_config_defaults(&run.rc.dist);
        run_apply_overrides(&run.rc, argc - 3, argv + 3);
        char dir[KEY_STRING_MAX];
        snprintf(dir, sizeof dir, "%s", run.ckpt);
        snprintf(run.run_dir, sizeof run.run_dir, "%s", dirname(dir));
    } else {
        run.mode = MODE_TRAIN;
        run_load_config(&run.rc, argv[1], argc - 2, argv + 2);
        default_run_name(&run.rc, argv[1]);
        check_run_name(run.rc.train.name);
    }
    run_all(&run);
    return 0;
}

// A fine-tune reads its text with the tokenizer its base was trained with (the copy
// beside the base); a config that names another one is refused.
static void use_base_tokenizer(DataConfig *d, const DataConfig *base, const char *ckpt) {
    char crc[16] = "";
    if (d->tokenizer != TOKENIZER_BYTES &&
        (d->tokenizer != base->tokenizer || run_file_crc32(d->tokenizer_file, crc) != 0 ||
         strcmp(crc, base->tokenizer_crc32)))
        FAIL("data.tokenizer_file = %s: not the tokenizer %s was trained with (%s beside "
             "it)\nHINT: moe finetune uses its base's tokenizer; leave data.tokenizer unset",
             d->tokenizer_file, ckpt, base->tokenizer_file);
    d->tokenizer = base->tokenizer;
    snprintf(d->tokenizer_file, sizeof d->tokenizer_file, "%s", base->tokenizer_file);
    snprintf(d->tokenizer_crc32, sizeof d->tokenizer_crc32, "%s", base->tokenizer_crc32);
}

// defaults <- the checkpoint's [model] [router] <- CONFIG <- overrides: the architecture
// comes from the checkpoint, so a config only needs data, optim and finetune keys (one
// that sets a model key to another value is refused by ckpt_load, naming the key).
int finetune_main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        printf("usage: moe finetune CONFIG.ini finetune.init=CHECKPOINT [section.key=value ...]\n"
               "  Starts from CHECKPOINT's weights with fresh optimizer state and trains what\n"
               "  finetune.train / finetune.freeze select (see moe train --help).\n");
        return argc < 2 ? 2 : 0;
    }
    static Run run;
    RunConfig user;
    run_load_config(&user, argv[1], argc - 2, argv + 2);
    if (!user.finetune.init[0])
        FAIL("moe finetune needs finetune.init=CHECKPOINT (in %s or on the command line)", argv[1]);
    run.mode = MODE_FINETUNE;
    run_resolve_checkpoint(user.finetune.init, run.ckpt, sizeof run.ckpt);
    RunConfig base;
    run_load_checkpoint_config(&base, run.ckpt, 0, NULL);
    char err[1024];
    run_config_defaults(&run.rc);
    run.rc.model = base.model;
    if (run_config_load_ini(&run.rc, argv[1], err, sizeof err) != 0) FAIL("%s", err);
    run_apply_overrides(&run.rc, argc - 2, argv + 2);
    if (run_config_validate(&run.rc, err, sizeof err) != 0) FAIL("%s", err);
    data_config_use_default(&run.rc.data);
    use_base_tokenizer(&run.rc.data, &base.data, run.ckpt);
    snprintf(run.rc.finetune.init, sizeof run.rc.finetune.init, "%s", run.ckpt);
    default_run_name(&run.rc, argv[1]);
    check_run_name(run.rc.train.name);
    run_all(&run);
    return 0;
}
