#include "run.h"

#include <dirent.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../kernels/backend.h"
#include "../base/util.h"
#include "formats/checkpoint.h"

void run_apply_overrides(RunConfig *rc, int n_words, char **words) {
    char err[1024];
    for (int i = 0; i < n_words; i++)
        if (run_config_override(rc, words[i], err, sizeof err) != 0) FAIL("%s", err);
}

static void finish_config(RunConfig *rc) {
    char err[1024];
    if (run_config_validate(rc, err, sizeof err) != 0) FAIL("%s", err);
    data_config_use_default(&rc->data);
}

void run_load_config(RunConfig *rc, const char *ini, int n_words, char **words) {
    char err[1024];
    run_config_defaults(rc);
    if (run_config_load_ini(rc, ini, err, sizeof err) != 0) FAIL("%s", err);
    run_apply_overrides(rc, n_words, words);
    finish_config(rc);
}

void run_load_checkpoint_config(RunConfig *rc, const char *ckpt, int n_words, char **words) {
    char err[1024];
    run_config_defaults(rc);
    if (ckpt_read_config(ckpt, rc, err, sizeof err) != 0) FAIL("%s", err);
    run_apply_overrides(rc, n_words, words);
    finish_config(rc);
}

// Highest-step ckpt_<step>.h5 in dir, or "" when none.
static void latest_in_dir(const char *dir, char *out, size_t len) {
    DIR *d = opendir(dir);
    if (!d) FAIL("%s: cannot open the run directory", dir);
    long best = -1;
    struct dirent *e;
    out[0] = '\0';
    while ((e = readdir(d))) {
        long step;
        char tail[8];
        if (sscanf(e->d_name, "ckpt_%ld.%7s", &step, tail) == 2 && !strcmp(tail, "h5") &&
            step > best) {
            best = step;
            snprintf(out, len, "%s/%s", dir, e->d_name);
        }
    }
    closedir(d);
}

void run_resolve_checkpoint(const char *path, char *out, size_t len) {
    struct stat sb;
    if (stat(path, &sb) != 0) FAIL("%s: no such checkpoint or run directory", path);
    if (!S_ISDIR(sb.st_mode)) {
        snprintf(out, len, "%s", path);
        return;
    }
    latest_in_dir(path, out, len);
    if (!out[0]) FAIL("%s: the run directory holds no ckpt_<step>.h5 checkpoint", path);
}

void run_use_text_domain(RunConfig *rc, const char *name, const char *path) {
    char err[1024];
    rc->data.n_domains = 0;
    DomainConfig *d = data_config_add_domain(&rc->data, name, err, sizeof err);
    if (!d) FAIL("%s", err);
    d->kind = DATA_TEXT;
    snprintf(d->train, sizeof d->train, "%s", path);
    snprintf(d->val, sizeof d->val, "%s", path);
}

void run_collect_routing(Model *m, DataLoader *dl, int batches, RoutingStats *rs) {
    int32_t *tok = CALLOC(2 * m->N, sizeof *tok);
    model_clear_noise(m);
    routing_stats_reset(rs);
    for (int i = 0; i < batches; i++) {
        data_loader_next(dl, tok, tok + m->N, NULL);
        model_set_batch(m, tok, tok + m->N);
        model_forward(m);
        routing_stats_add(rs, m, m->B);
    }
    free(tok);
}

const Backend *run_backend(const TrainConfig *tc) {
    if (tc->device == TRAIN_DEVICE_CPU) {
        if (tc->precision == PRECISION_BF16)
            FAIL("train.precision = bf16: the CPU backend computes in fp32 only\nHINT: use "
                 "train.device=cuda, or train.precision=fp32 (auto picks it on the CPU)");
        return backend_cpu();
    }
    char err[512];
    const Backend *be = backend_select("cuda", err, sizeof err);
    if (!be)
        FAIL("train.device = cuda: %s\nHINT: train.device=cpu runs the same model on the CPU",
             err);
    return be;
}

static int wants_bf16(const Model *m, const TrainConfig *tc) {
    return tc->precision == PRECISION_BF16 ||
           (tc->precision == PRECISION_AUTO && m->be->device == DEVICE_CUDA);
}

void run_set_precision(Model *m, const TrainConfig *tc) {
    char err[512];
    if (model_set_precision(m, wants_bf16(m, tc), err, sizeof err) != 0)
        FAIL("train.precision: %s", err);
    if (m->be->set_expert_gemm) m->be->set_expert_gemm(tc->expert_gemm == EXPERT_GEMM_GROUPED);
    else if (tc->expert_gemm == EXPERT_GEMM_GROUPED)
        FAIL("train.expert_gemm = grouped: the %s backend has one way to run the experts\nHINT: "
             "it applies to train.device=cuda", m->be->name);
}

// Which attention the tape planned: a fused kernel keeps no (B, H, T, T) probabilities.
static const char *attention_kind(const Model *m) {
    const ModelConfig *c = &m->cfg;
    size_t H = (size_t)c->heads, D = (size_t)c->d_model / H, att, datt;
    if (!m->be->attention_plan) return "attention keeps its probabilities";
    m->be->attention_plan(&att, &datt, m->B, m->T, H, (size_t)c->kv_heads, D, m->tape.bf16);
    return att < m->B * H * m->T * m->T ? "fused attention (cuDNN)"
                                        : "plain attention kernels (fp32)";
}

void run_describe_device(const Model *m, char *buf, size_t n) {
    char dev[384];
    backend_describe(m->be, dev, sizeof dev);
    const char *prec = m->tape.bf16 ? "bf16 products and weight copy, fp32 router, master "
                                      "weights and optimizer"
                                    : "fp32";
    if (m->be->device == DEVICE_CUDA)
        snprintf(buf, n, "device %s, %s, %s", dev, prec, attention_kind(m));
    else if (backend_cuda_built())
        snprintf(buf, n, "device cpu, fp32 (CUDA built: train.device=cuda to use a GPU)");
    else
        snprintf(buf, n, "device cpu, fp32 (this build has no CUDA backend: nvcc was not found)");
}

void run_model_from_checkpoint(Model *m, RunConfig *rc, const char *ckpt, size_t B) {
    char err[1024];
    if (rc->train.device != TRAIN_DEVICE_CPU)
        fprintf(stderr, "moe: note: this command runs on the CPU (train.device = cuda applies "
                        "to moe train and moe finetune)\n");
    model_init(m, &rc->model, backend_cpu(), B, (size_t)rc->model.seq_len);
    if (ckpt_load(ckpt, m, NULL, NULL, err, sizeof err) != 0) FAIL("%s", err);
}

DataLoader *run_open_data(const RunConfig *rc, const Model *m, uint64_t seed) {
    char err[1024];
    DataLoader *dl = NULL;
    if (data_loader_open(&dl, &rc->data, rc->model.vocab, m->B, m->T, seed, err, sizeof err) != 0)
        FAIL("%s", err);
    return dl;
}

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t go;
    int released;
} ThreadGate;

static void *gate_wait(void *arg) {
    ThreadGate *g = arg;
    pthread_mutex_lock(&g->mu);
    while (!g->released) pthread_cond_wait(&g->go, &g->mu);
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

// How many threads of a team of n can run at once (the caller is one): started, held
// until all are up, then joined.
static int threads_startable(int n) {
    ThreadGate g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
    pthread_t *t = CALLOC((size_t)n, sizeof *t);
    int started = 0;
    while (started < n - 1 && pthread_create(&t[started], NULL, gate_wait, &g) == 0)
        started++;
    pthread_mutex_lock(&g.mu);
    g.released = 1;
    pthread_cond_broadcast(&g.go);
    pthread_mutex_unlock(&g.mu);
    for (int i = 0; i < started; i++) pthread_join(t[i], NULL);
    free(t);
    return started + 1;
}

// libgomp dies with a line of its own ("Thread creation failed") when it cannot start a
// team, so the count is tried first. More threads than processors is allowed: the same
// count gives the same bits on any machine.
void run_set_threads(const TrainConfig *tc) {
    if (tc->threads == 0) return;
    int can = threads_startable(tc->threads);
    if (can < tc->threads)
        FAIL("train.threads = %d: this machine starts only %d threads now (ulimit -u, ulimit "
             "-v, kernel.threads-max; %d processors)", tc->threads, can, omp_get_num_procs());
    omp_set_num_threads(tc->threads);
}
