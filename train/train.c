// train.c: `moe train <config.ini> [section.key=value ...]`.
//
// One step: grad_accum micro-batches (forward with fresh router noise, backward into
// the accumulated gradients), then one AdamW step on their mean. Validation per domain
// every eval_every steps and at the end; then the expert-usage table and a sample.
#include "train.h"

#include <errno.h>
#include <libgen.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../data/loader.h"
#include "../kernels/cpu/blas.h"
#include "../kernels/util.h"
#include "../model/model.h"
#include "../model/routing.h"
#include "../optim/adamw.h"
#include "../optim/schedule.h"
#include "config.h"
#include "eval.h"
#include "metrics.h"
#include "sample.h"

typedef struct {
    RunConfig rc;
    char run_dir[1100];
    Model model;
    AdamW opt;
    DataLoader *data;
    Metrics metrics;
    RoutingStats step_stats;
    EvalResult eval;
    Rng noise_rng;
    int32_t *batch;   // (2, N) tokens then targets
    double train_s, total_s;   // wall time of training steps, and of the whole loop
} Run;

static void print_train_help(void) {
    printf("usage: moe train CONFIG.ini [section.key=value ...]\n"
           "  Trains the model CONFIG describes; overrides follow the config file.\n"
           "  Output: <train.out_dir>/<train.name>/ with config.ini, metrics.csv,\n"
           "  experts.csv. Keys:\n");
    run_config_print_help(stdout);
}

static void load_config(RunConfig *rc, int argc, char **argv) {
    char err[1024];
    run_config_defaults(rc);
    if (run_config_load_ini(rc, argv[1], err, sizeof err) != 0) FAIL("%s", err);
    for (int i = 2; i < argc; i++)
        if (run_config_override(rc, argv[i], err, sizeof err) != 0) FAIL("%s", err);
    if (run_config_validate(rc, err, sizeof err) != 0) FAIL("%s", err);
    if (!rc->train.name[0]) {
        char path[KEY_STRING_MAX];
        snprintf(path, sizeof path, "%s", argv[1]);
        char *base = basename(path), *dot = strrchr(base, '.');
        if (dot) *dot = '\0';
        snprintf(rc->train.name, sizeof rc->train.name, "%s", base);
    }
    data_config_use_default(&rc->data);
}

static void make_dirs(const char *path) {
    char tmp[1100];
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
    char path[1200];
    snprintf(path, sizeof path, "%s/config.ini", r->run_dir);
    FILE *f = fopen(path, "w");
    if (!f) FAIL("%s: cannot write the resolved config", path);
    fprintf(f, "; resolved configuration of run %s (every key, defaults included)\n\n",
            r->rc.train.name);
    run_config_write_ini(f, &r->rc);
    fclose(f);
}

// Parameters one token computes with: all but the experts it is not routed to (the
// embedding counts only when tied, i.e. when it is also the output matmul).
static size_t active_params(const Model *m) {
    size_t active = 0;
    const ModelConfig *c = &m->cfg;
    for (size_t i = 0; i < m->layout.n_params; i++) {
        const ParamInfo *p = &m->layout.params[i];
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

static void setup(Run *r) {
    RunConfig *rc = &r->rc;
    if (rc->train.threads > 0) omp_set_num_threads(rc->train.threads);
    if (cpu_blas_self_check() != 0)
        FAIL("OpenBLAS kernel %s computes a wrong product\nHINT: set OPENBLAS_CORETYPE to a "
             "kernel your CPU supports (e.g. Haswell) and run again", cpu_blas_kernel_name());
    snprintf(r->run_dir, sizeof r->run_dir, "%s/%s", rc->train.out_dir, rc->train.name);
    size_t B = (size_t)rc->train.batch_size, T = (size_t)rc->model.seq_len;
    char err[1024];
    if (data_loader_open(&r->data, &rc->data, rc->model.vocab, B, T, (uint64_t)rc->train.seed,
                         err, sizeof err) != 0)
        FAIL("%s", err);
    check_val_batches(r->data, B, T);
    make_dirs(r->run_dir);
    write_resolved_config(r);
    model_init(&r->model, &rc->model, backend_cpu(), B, T);
    model_init_weights(&r->model, (uint64_t)rc->train.seed);
    adamw_init(&r->opt, &rc->optim, &r->model.layout, NULL, r->model.be);
    rng_init(&r->noise_rng, (uint64_t)rc->train.seed ^ 0x6e6f697365ULL);
    routing_stats_init(&r->step_stats, &rc->model);
    int nd = data_loader_domains(r->data);
    eval_result_init(&r->eval, &rc->model, nd);
    const char *names[DATA_MAX_DOMAINS];
    for (int d = 0; d < nd; d++) names[d] = data_loader_domain_name(r->data, d);
    metrics_open(&r->metrics, r->run_dir, names, nd, rc->train.log_every);
    r->batch = CALLOC(2 * r->model.N, sizeof *r->batch);
}

static void print_startup(const Run *r) {
    const Model *m = &r->model;
    const RunConfig *rc = &r->rc;
    printf("moe train: run %s -> %s\n", rc->train.name, r->run_dir);
    printf("model: %d layers, d_model %d, %d experts top-%d, %.2fM params (%.2fM active per "
           "token), %zu trainable, optimizer state %.1f MB\n",
           rc->model.layers, rc->model.d_model, rc->model.experts, rc->model.top_k,
           (double)m->layout.total / 1e6, (double)active_params(m) / 1e6,
           adamw_trainable_params(&r->opt), (double)adamw_state_bytes(&r->opt) / 1e6);
    printf("data:");
    for (int d = 0; d < data_loader_domains(r->data); d++)
        printf(" %s (%.2fM train tokens)", data_loader_domain_name(r->data, d),
               (double)data_loader_train_tokens(r->data, d) / 1e6);
    printf("\nbatch: %d x %d tokens x %d accum = %zu tokens/step, %d steps | cpu: %d threads, "
           "OpenBLAS %s kernel (%s); device cpu (this build has no CUDA backend)\n",
           rc->train.batch_size, rc->model.seq_len, rc->train.grad_accum,
           m->N * (size_t)rc->train.grad_accum, rc->train.steps, omp_get_max_threads(),
           cpu_blas_kernel_name(), cpu_blas_kernel_origin());
}

// Forward and backward over grad_accum micro-batches; returns their mean losses.
static ModelLosses accumulate_gradients(Run *r) {
    Model *m = &r->model;
    ModelLosses mean = {0};
    int accum = r->rc.train.grad_accum;
    model_zero_grad(m);
    routing_stats_reset(&r->step_stats);
    for (int a = 0; a < accum; a++) {
        data_loader_next(r->data, r->batch, r->batch + m->N, NULL);
        model_set_batch(m, r->batch, r->batch + m->N);
        model_draw_noise(m, &r->noise_rng);
        ModelLosses l = model_forward(m);
        model_backward(m);
        routing_stats_add(&r->step_stats, m, m->B);
        mean.total += l.total / accum;
        mean.ce += l.ce / accum;
        mean.lb += l.lb / accum;
        mean.z += l.z / accum;
        mean.importance += l.importance / accum;
        mean.load += l.load / accum;
    }
    return mean;
}

static void print_eval(Run *r, long step) {
    metrics_break_line(&r->metrics);
    printf("eval step %ld: val loss", step);
    for (int d = 0; d < r->eval.n_domains; d++)
        printf(" %s %.4f", data_loader_domain_name(r->data, d), r->eval.loss[d]);
    printf(" | mean %.4f\n", r->eval.loss[r->eval.n_domains]);
}

static void train_loop(Run *r) {
    const TrainConfig *tc = &r->rc.train;
    double t0 = omp_get_wtime(), eval_s = 0.0;   // tok/s counts training time only
    size_t tokens_per_step = r->model.N * (size_t)tc->grad_accum;
    if (tc->eval_every > 0) {   // the starting point every later evaluation compares to
        eval_run(&r->eval, &r->model, r->data);
        print_eval(r, 0);
        eval_s = omp_get_wtime() - t0;
    }
    for (long step = 0; step < tc->steps; step++) {
        StepReport rep = {.step = step, .steps = tc->steps};
        rep.losses = accumulate_gradients(r);
        rep.lr = optim_lr_at(&r->rc.optim, step, tc->steps);
        rep.grad_norm = adamw_step(&r->opt, r->model.params, r->model.grads, rep.lr, step,
                                   1.0 / tc->grad_accum);
        rep.elapsed_s = omp_get_wtime() - t0;
        rep.tok_per_s = (double)tokens_per_step * (double)(step + 1) / (rep.elapsed_s - eval_s);
        rep.eta_s = rep.elapsed_s / (double)(step + 1) * (double)(tc->steps - step - 1);
        rep.dropped = routing_dropped_fraction(&r->step_stats);
        rep.maxvio = routing_maxvio(&r->step_stats);
        int last = step + 1 == tc->steps;
        int eval = last || (tc->eval_every > 0 && (step + 1) % tc->eval_every == 0);
        metrics_print_step(&r->metrics, &rep);
        if (eval) {
            double te = omp_get_wtime();
            eval_run(&r->eval, &r->model, r->data);
            eval_s += omp_get_wtime() - te;
            print_eval(r, step + 1);
        }
        metrics_write_step(&r->metrics, &rep, eval ? r->eval.loss : NULL);
        metrics_write_experts(&r->metrics, step, &r->step_stats, &r->model);
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
    print_usage_table(r);
    const TrainConfig *tc = &r->rc.train;
    if (tc->sample_tokens > 0 && r->rc.model.vocab == 256) {
        size_t len = strlen(tc->sample_prompt) + (size_t)tc->sample_tokens + 1;
        char *text = CALLOC(len, 1);
        sample_text(&r->model, tc->sample_prompt, tc->sample_tokens, tc->sample_temperature,
                    (unsigned long long)tc->seed, text, len);
        printf("\nsample (temperature %.2f):\n%s\n", tc->sample_temperature, text);
        free(text);
    }
    size_t tokens = r->model.N * (size_t)tc->grad_accum * (size_t)tc->steps;
    printf("\ndone: %d steps, %.2fM tokens in %.1f s (%.0f tok/s training; %.1f s with "
           "evaluation); final val loss %.4f mean\n",
           tc->steps, (double)tokens / 1e6, r->train_s, (double)tokens / r->train_s,
           r->total_s, r->eval.loss[r->eval.n_domains]);
    printf("run written to %s (config.ini, metrics.csv, experts.csv)\n", r->run_dir);
    free(r->batch);
    eval_result_free(&r->eval);
    routing_stats_free(&r->step_stats);
    adamw_free(&r->opt);
    model_free(&r->model);
    data_loader_close(r->data);
}

int train_main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        if (argc < 2) {
            fprintf(stderr, "usage: moe train CONFIG.ini [section.key=value ...]\n"
                            "HINT: moe train --help lists every key\n");
            return 2;
        }
        print_train_help();
        return 0;
    }
    static Run run;
    load_config(&run.rc, argc, argv);
    setup(&run);
    print_startup(&run);
    train_loop(&run);
    finish(&run);
    return 0;
}
