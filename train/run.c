#include "run.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

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
    run_find_tokenizer(rc, ckpt);
    run_apply_overrides(rc, n_words, words);
    finish_config(rc);
}

// "ckpt_<digits>.h5" -> 1 and its step; anything else -> 0.
static int parse_ckpt_name(const char *name, long *step) {
    int end = 0;
    if (sscanf(name, "ckpt_%ld.h5%n", step, &end) != 1 || name[end] || *step < 0) return 0;
    return strspn(name + 5, "0123456789") == strlen(name) - 8;
}

static int cmp_long(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

long *run_list_checkpoints(const char *dir, size_t *n) {
    DIR *d = opendir(dir);
    if (!d) FAIL("%s: cannot open the run directory: %s", dir, strerror(errno));
    size_t cap = 16;
    long *steps = CALLOC(cap, sizeof *steps);
    *n = 0;
    struct dirent *e;
    long step;
    while ((e = readdir(d))) {
        if (!parse_ckpt_name(e->d_name, &step)) continue;
        if (*n == cap) {
            long *grown = CALLOC(cap * 2, sizeof *steps);
            memcpy(grown, steps, cap * sizeof *steps);
            free(steps);
            steps = grown;
            cap *= 2;
        }
        steps[(*n)++] = step;
    }
    closedir(d);
    qsort(steps, *n, sizeof *steps, cmp_long);
    return steps;
}

int run_latest_checkpoint(const char *dir, char *out, size_t len) {
    size_t n;
    long *steps = run_list_checkpoints(dir, &n);
    if (n) snprintf(out, len, "%s/ckpt_%06ld.h5", dir, steps[n - 1]);
    free(steps);
    return n ? 0 : -1;
}

void run_resolve_checkpoint(const char *path, char *out, size_t len) {
    struct stat sb;
    if (stat(path, &sb) != 0) FAIL("%s: no such checkpoint or run directory", path);
    if (!S_ISDIR(sb.st_mode)) snprintf(out, len, "%s", path);
    else if (run_latest_checkpoint(path, out, len) != 0)
        FAIL("%s: the run directory holds no ckpt_<step>.h5 checkpoint\nHINT: a run stopped "
             "before its first checkpoint starts again under another train.name (or after "
             "removing the directory)", path);
    run_check_checkpoint(out);
}

uint64_t run_new_id(void) {
    uint64_t id = 0;
    if (getrandom(&id, sizeof id, 0) != (ssize_t)sizeof id)
        id = (uint64_t)time(NULL) * 6364136223846793005ull ^ (uint64_t)getpid();
    return id ? id : 1;   // 0 means "no run"
}

static void id_path(const char *dir, char *out, size_t len) {
    snprintf(out, len, "%s/run_id", dir);
}

int run_read_id(const char *dir, uint64_t *id) {
    char path[RUN_FILE_MAX];
    id_path(dir, path, sizeof path);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int ok = fscanf(f, "%16" SCNx64, id) == 1;
    fclose(f);
    if (!ok) FAIL("%s: not a run id (16 hex digits)", path);
    return 0;
}

FILE *run_create_file(const char *path, char *tmp, size_t len) {
    snprintf(tmp, len, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) FAIL("%s: cannot create: %s", tmp, strerror(errno));
    return f;
}

void run_commit_file(FILE *f, const char *tmp, const char *path) {
    if (ferror(f) || fflush(f) != 0 || fsync(fileno(f)) != 0) {
        int e = errno;
        fclose(f);
        remove(tmp);
        FAIL("%s: cannot write: %s", path, strerror(e));
    }
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        int e = errno;
        remove(tmp);
        FAIL("%s: cannot write: %s", path, strerror(e));
    }
}

void run_write_id(const char *dir, uint64_t id) {
    char path[RUN_FILE_MAX], tmp[RUN_FILE_MAX + 8];
    id_path(dir, path, sizeof path);
    FILE *f = run_create_file(path, tmp, sizeof tmp);
    fprintf(f, "%016" PRIx64 "\n", id);
    run_commit_file(f, tmp, path);
}

void run_check_checkpoint(const char *path) {
    char err[1024], copy[RUN_FILE_MAX];
    long step, named;
    uint64_t id, dir_id;
    if (ckpt_read_identity(path, &step, &id, err, sizeof err) != 0) FAIL("%s", err);
    snprintf(copy, sizeof copy, "%s", path);
    if (parse_ckpt_name(basename(copy), &named) && named != step)
        FAIL("%s: holds step %ld, not the step its name says (%ld)", path, step, named);
    snprintf(copy, sizeof copy, "%s", path);
    const char *dir = dirname(copy);
    if (run_read_id(dir, &dir_id) == 0 && id != dir_id)
        FAIL("%s: written by another run (run id %016" PRIx64 ", %s/run_id says %016" PRIx64
             ")\nHINT: move it out of this run directory, or resume from its own", path, id,
             dir, dir_id);
}

// What a run writes into its directory.
static int is_run_file(const char *name) {
    static const char *files[] = {"run_id", "config.ini", "metrics.csv", "layers.csv",
                                  "experts.csv", "best.h5"};
    long step;
    for (size_t i = 0; i < sizeof files / sizeof *files; i++)
        if (!strcmp(name, files[i])) return 1;
    return parse_ckpt_name(name, &step);
}

int run_dir_find_run_file(const char *dir, char *name, size_t len) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *e;
    int found = 0;
    while (!found && (e = readdir(d)))
        if ((found = is_run_file(e->d_name))) snprintf(name, len, "%s", e->d_name);
    closedir(d);
    return found;
}

static void remove_matching(const char *dir, int (*match)(const char *name)) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[RUN_FILE_MAX];
    while ((e = readdir(d))) {
        if (!match(e->d_name)) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (remove(path) != 0 && errno != ENOENT)
            FAIL("%s: cannot remove: %s", path, strerror(errno));
    }
    closedir(d);
}

static int is_tmp_file(const char *name) {
    size_t n = strlen(name);
    return n > 4 && !strcmp(name + n - 4, ".tmp");
}

void run_remove_tmp(const char *dir) { remove_matching(dir, is_tmp_file); }

void run_dir_clear(const char *dir) {
    remove_matching(dir, is_run_file);
    run_remove_tmp(dir);
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
    int mla = c->attention == ATTENTION_MLA; // planned as fp32: CUDA runs the plain kernels
    if (mla) D = (size_t)(c->qk_nope_dim + c->qk_rope_dim);
    m->be->attention_plan(&att, &datt, m->B, m->T, H, mla ? H : (size_t)c->kv_heads, D,
                          mla ? 0 : m->tape.bf16);
    if (att == m->B * H * m->T * m->T) return "plain attention kernels (fp32)";
    return m->be->device == DEVICE_CPU ? "fused attention (online softmax)"
                                       : "fused attention (cuDNN)";
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
    Tokenizer *tok = run_open_tokenizer(rc);
    int rc_open = data_loader_open(&dl, &rc->data, rc->model.vocab, tok, m->B, m->T, seed, err,
                                   sizeof err);
    tokenizer_free(tok);
    if (rc_open != 0) FAIL("%s", err);
    return dl;
}

Tokenizer *run_open_tokenizer(const RunConfig *rc) {
    char err[1024];
    Tokenizer *tok = tokenizer_open(rc->data.tokenizer, rc->data.tokenizer_file, err, sizeof err);
    if (!tok) FAIL("data.tokenizer_file = %s", err);
    if (tokenizer_vocab(tok) > rc->model.vocab && rc->data.tokenizer != TOKENIZER_BYTES)
        FAIL("%s: the tokenizer's ids reach %d, past model.vocab = %d\nHINT: set "
             "model.vocab=%d (or more)", rc->data.tokenizer_file, tokenizer_vocab(tok) - 1,
             rc->model.vocab, tokenizer_vocab(tok));
    return tok;
}

const char *run_tokenizer_name(int kind) {
    return kind == TOKENIZER_HF_BPE          ? "tokenizer.json"
           : kind == TOKENIZER_SENTENCEPIECE ? "tokenizer.model"
                                             : NULL;
}

int run_file_crc32(const char *path, char out[16]) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    unsigned char buf[1 << 16];
    uLong crc = crc32(0L, Z_NULL, 0);
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) crc = crc32(crc, buf, (uInt)got);
    int failed = ferror(f);
    fclose(f);
    snprintf(out, 16, "%08lx", (unsigned long)crc);
    return failed ? -1 : 0;
}

static void copy_file(const char *from, const char *to) {
    FILE *in = fopen(from, "rb");
    if (!in) FAIL("%s: cannot read: %s", from, strerror(errno));
    char tmp[RUN_FILE_MAX + 8];
    FILE *out = run_create_file(to, tmp, sizeof tmp);
    unsigned char buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, got, out);
    int failed = ferror(in);
    fclose(in);
    if (failed) FAIL("%s: read error", from);
    run_commit_file(out, tmp, to);
}

static void set_tokenizer_file(DataConfig *d, const char *path) {
    size_t len = strlen(path);
    if (len >= sizeof d->tokenizer_file)
        FAIL("%s: path longer than %zu bytes", path, sizeof d->tokenizer_file - 1);
    memcpy(d->tokenizer_file, path, len + 1);
}

void run_save_tokenizer(RunConfig *rc, const char *dir) {
    DataConfig *d = &rc->data;
    const char *name = run_tokenizer_name(d->tokenizer);
    if (!name) return;
    char copy[RUN_FILE_MAX], crc[16], have[16];
    snprintf(copy, sizeof copy, "%s/%s", dir, name);
    if (run_file_crc32(d->tokenizer_file, crc) != 0)
        FAIL("data.tokenizer_file = %s: cannot read: %s", d->tokenizer_file, strerror(errno));
    char *a = realpath(d->tokenizer_file, NULL), *b = realpath(copy, NULL);
    int same = a && b && !strcmp(a, b);
    free(a);
    free(b);
    if (!same) {
        if (run_file_crc32(copy, have) == 0 && strcmp(have, crc))
            FAIL("%s: already holds another tokenizer than data.tokenizer_file = %s\nHINT: "
                 "write to another directory", copy, d->tokenizer_file);
        copy_file(d->tokenizer_file, copy);
    }
    set_tokenizer_file(d, copy);
    snprintf(d->tokenizer_crc32, sizeof d->tokenizer_crc32, "%s", crc);
}

void run_find_tokenizer(RunConfig *rc, const char *ckpt) {
    DataConfig *d = &rc->data;
    const char *name = run_tokenizer_name(d->tokenizer);
    if (!name) return;
    char dir[RUN_FILE_MAX], path[RUN_FILE_MAX + 32], crc[16];
    snprintf(dir, sizeof dir, "%s", ckpt);
    snprintf(path, sizeof path, "%s/%s", dirname(dir), name);
    if (run_file_crc32(path, crc) != 0)
        FAIL("%s: missing: %s was trained with this tokenizer (data.tokenizer = %s) and "
             "needs it beside it", path, ckpt,
             d->tokenizer == TOKENIZER_HF_BPE ? "hf-bpe" : "sentencepiece");
    if (strcmp(crc, d->tokenizer_crc32))
        FAIL("%s: changed since %s was saved (CRC-32 %s, the checkpoint says %s)\nHINT: put "
             "the run's own tokenizer file back", path, ckpt, crc, d->tokenizer_crc32);
    set_tokenizer_file(d, path);
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
