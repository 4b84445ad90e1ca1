// bench.c: `make bench` and `make bench-peer` (a benchmark, never a test).
//
//   bench [--steps N] [--seconds S] [--csv FILE] [--only train|layer|generate] [CONFIG.ini ...]
//         [section.key=value ...]
//   bench --peer [--steps N] [--python PATH ...] [CONFIG.ini] [section.key=value ...]
//   bench --gpu [--steps N] [--csv FILE] [CONFIG.ini] [section.key=value ...]
//   bench --gpu-peer [--steps N] [--python PATH] [CONFIG.ini] [section.key=value ...]
//
// Default configs: tiny, small, fine-grained. One run prints the machine's peaks (sgemm
// and FMA), then per config training throughput, MFU and time per phase, then one MoE
// layer alone with balanced and skewed routing, then generated tokens/s at 64 and 512
// tokens of context (KV cache, and a full forward per token), and writes every figure to
// bench.csv.
// --peer trains the config (default small) here and in bench/torch_ref.py (PyTorch,
// same shapes and routing) under each --python (default Debian's), eager and through
// torch.compile where its torch has it, and prints the ratios of their tokens/s. Override words
// (router.aux_scope=micro, ...) apply to every config of moe.c, not to the peer.
//
// --gpu measures the CUDA backend's device instead: its dense bf16 GEMM rate, the grouped
// experts op against a dense product of equal FLOPs (coarse and fine-grained layouts,
// balanced and skewed), and training steps of the config (default gpu-medium) with
// train.device=cuda; without a usable GPU it prints why and exits 0.
//
// Each measurement runs in its own child process, so its peak RSS (wait4) is its own and
// no OpenMP thread pool crosses a fork: this parent never enters a parallel region.
#include "bench.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../kernels/cpu/blas.h"
#include "../kernels/cpu/cpu_ops.h"

#define MAX_CONFIGS 16
#define SGEMM_N 2048
#define MAX_PYTHONS 4

typedef enum { JOB_PEAK, JOB_TRAIN, JOB_LAYER, JOB_GPU, JOB_GENERATE } JobKind;

typedef struct {
    JobKind kind;
    BenchConfig config;
    int steps;
    double seconds;
} Job;

typedef union {
    PeakResult peak;
    TrainResult train;
    LayerResult layer;
    GpuResult gpu;
    GenResult generate;
} JobResult;

typedef struct {
    int steps;
    double seconds;
    const char *csv;
    const char *python;
    int python_set;
    const char *pythons[MAX_PYTHONS]; // --peer: one PyTorch peer per interpreter
    int n_pythons;
    const char *only; // "train", "layer" or "generate": that part alone (peaks always)
    int peer;
    int gpu;
    int gpu_peer; // --python defaults to python3 there: the GPU machine's own PyTorch
    const char *configs[MAX_CONFIGS];
    int n_configs;
    char **words; // (MAX_CONFIGS) section.key=value overrides, applied to every config
    int n_words;
} Options;

static void job_run(const Job *j, JobResult *r) {
    switch (j->kind) {
    case JOB_PEAK: bench_measure_peaks(&r->peak, SGEMM_N); break;
    case JOB_TRAIN: bench_train(&r->train, &j->config, j->steps, j->seconds); break;
    case JOB_LAYER: bench_layer(&r->layer, &j->config); break;
    case JOB_GPU: bench_gpu(&r->gpu); break;
    case JOB_GENERATE: bench_generate(&r->generate, &j->config); break;
    }
}

static int read_all(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t k = read(fd, (char *)buf + got, n - got);
        if (k <= 0) return -1;
        got += (size_t)k;
    }
    return 0;
}

// Runs j in a child; returns 0 with its result and peak RSS (MB), or -1 if it failed
// (its error is already on stderr).
static int run_child(const Job *j, JobResult *r, double *rss_mb) {
    int fd[2];
    if (pipe(fd) != 0) return -1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        close(fd[0]);
        JobResult mine;
        memset(&mine, 0, sizeof mine);
        job_run(j, &mine);
        ssize_t put = write(fd[1], &mine, sizeof mine);
        _exit(put == (ssize_t)sizeof mine ? 0 : 1);
    }
    close(fd[1]);
    int ok = read_all(fd[0], r, sizeof *r);
    close(fd[0]);
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        ok = -1;
    *rss_mb = (double)ru.ru_maxrss / 1024.0;
    return ok;
}

// ---- output ---------------------------------------------------------------------------

static FILE *csv_open(const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "bench: cannot write %s\n", path);
        exit(1);
    }
    fprintf(f, "section,config,metric,value\n");
    return f;
}

static void csv_row(FILE *f, const char *section, const char *config, const char *metric,
                    double value) {
    fprintf(f, "%s,%s,%s,%.6g\n", section, config, metric, value);
}

static void print_peaks(const PeakResult *p, double rss, FILE *csv) {
    printf("peaks (%d threads, the better of two measurements: before and after the rest)\n"
           "  sgemm %zu^3, OpenBLAS %s kernel (%s), %s threads: %.1f GFLOP/s (one product "
           "shared by all threads %.1f, one per thread at once %.1f)\n"
           "  FMA register loop, %s: %.1f GFLOP/s (AVX2: %.1f)\n",
           p->threads, p->sgemm_n, p->kernel, p->origin, p->threading, p->sgemm_gflops,
           p->sgemm_shared_gflops, p->sgemm_split_gflops, p->fma_isa, p->fma_gflops,
           p->fma_avx2_gflops);
    csv_row(csv, "peak", "-", "sgemm_gflops", p->sgemm_gflops);
    csv_row(csv, "peak", "-", "sgemm_shared_gflops", p->sgemm_shared_gflops);
    csv_row(csv, "peak", "-", "sgemm_split_gflops", p->sgemm_split_gflops);
    csv_row(csv, "peak", "-", "fma_gflops", p->fma_gflops);
    csv_row(csv, "peak", "-", "fma_avx2_gflops", p->fma_avx2_gflops);
    csv_row(csv, "peak", "-", "threads", p->threads);
    csv_row(csv, "peak", "-", "rss_mb", rss);
}

static void print_train_header(void) {
    printf("\ntraining steps on random tokens (the fastest step of those run):\n"
           "model FLOPs per token = 6 x active params + 12 x layers x seq_len x d_model "
           "(attention scores and\nweighted sums, forward and backward). FLOPs done leave "
           "out the expert products of the assignments\ncapacity dropped (they cost "
           "nothing); MFU = FLOPs done per second over the FMA peak, sgemm peak beside;\n"
           "the nominal figures count every assignment, dropped or not\n");
    printf("%-26s %7s %7s %6s %9s %8s %6s %6s %5s | %8s %7s %7s\n", "config", "params",
           "active", "tok/st", "tok/s", "GFLOP/s", "MFU", "sgemm", "kept", "nominal",
           "nomMFU", "RSS MB");
}

static void print_train(const TrainResult *t, const PeakResult *p, double rss, FILE *csv) {
    double tok_s = (double)t->tokens_per_step / t->step_s;
    double gflops = tok_s * t->flops_per_token / 1e9;
    // Dropped assignments cost nothing, so MFU on nominal FLOPs flatters a config that drops.
    double done = tok_s * (t->flops_per_token - (1.0 - t->kept) * t->expert_flops) / 1e9;
    printf("%-26s %6.1fM %6.1fM %6zu %9.0f %8.1f %5.1f%% %5.1f%% %4.0f%% | %8.1f %6.1f%% "
           "%7.0f\n",
           t->name, (double)t->params / 1e6, (double)t->active / 1e6, t->tokens_per_step, tok_s,
           done, 100.0 * done / p->fma_gflops, 100.0 * done / p->sgemm_gflops, 100.0 * t->kept,
           gflops, 100.0 * gflops / p->fma_gflops, rss);
    printf("  %-24s", "phases, % of step:");
    for (int i = 0; i < PHASE_COUNT; i++)
        printf(" %s %.1f", bench_phase_names[i], 100.0 * t->phase_s[i] / t->step_s);
    double moe = t->phase_s[PHASE_ROUTER] + t->phase_s[PHASE_DISPATCH];
    printf("\n  %-24s %.1f%% of router + dispatch + experts\n",
           "MoE overhead:", 100.0 * moe / (moe + t->phase_s[PHASE_EXPERTS]));
    printf("  %-24s %.1f%% in ops (embedding, norms, adds, lm_head, cross-entropy), %.1f%% "
           "outside the tape\n  %-24s (zeroing gradients and activation gradients, batch "
           "copies)\n",
           "other:", 100.0 * (t->phase_s[PHASE_OTHER] - t->untaped_s) / t->step_s,
           100.0 * t->untaped_s / t->step_s, "");
    double attn_gflops = t->attention_s > 0.0 ? t->attention_flops / t->attention_s / 1e9 : 0.0;
    printf("  %-24s the op alone %.1f%% of the step, %.1f GFLOP/s (%.0f%% of the sgemm peak; "
           "GEMM FLOPs\n  %-24s on the causal half, the backward's recomputed scores in)\n",
           "attention core:", 100.0 * t->attention_s / t->step_s, attn_gflops,
           100.0 * attn_gflops / p->sgemm_gflops, "");
    printf("  %-24s %d steps, fastest %.3f s; arenas: activations %.0f MB, their gradients "
           "%.0f MB\n",
           "run:", t->steps, t->step_s, t->acts_mb, t->dacts_mb);
    csv_row(csv, "train", t->name, "tokens_per_s", tok_s);
    csv_row(csv, "train", t->name, "model_gflops", gflops);
    csv_row(csv, "train", t->name, "mfu_done_fma", done / p->fma_gflops);
    csv_row(csv, "train", t->name, "mfu_done_sgemm", done / p->sgemm_gflops);
    csv_row(csv, "train", t->name, "mfu_nominal_sgemm", gflops / p->sgemm_gflops);
    csv_row(csv, "train", t->name, "mfu_nominal_fma", gflops / p->fma_gflops);
    csv_row(csv, "train", t->name, "flops_per_token", t->flops_per_token);
    csv_row(csv, "train", t->name, "step_s", t->step_s);
    csv_row(csv, "train", t->name, "rss_mb", rss);
    csv_row(csv, "train", t->name, "kept", t->kept);
    csv_row(csv, "train", t->name, "done_gflops", done);
    csv_row(csv, "train", t->name, "moe_overhead", moe / (moe + t->phase_s[PHASE_EXPERTS]));
    csv_row(csv, "train", t->name, "attention_core_s", t->attention_s);
    csv_row(csv, "train", t->name, "attention_core_gflops", attn_gflops);
    for (int i = 0; i < PHASE_COUNT; i++) {
        char key[48];
        snprintf(key, sizeof key, "phase_%s_s", bench_phase_names[i]);
        csv_row(csv, "train", t->name, key, t->phase_s[i]);
    }
}

static void print_layer_header(void) {
    printf("\none MoE layer alone (the config's shape, one layer, dropless; forward + "
           "backward):\n");
}

static void print_layer(const LayerResult *l, const PeakResult *p, double rss, FILE *csv) {
    printf("%s: N %zu tokens, C %zu, E %zu, top-%zu, F %zu (peak RSS %.0f MB)\n", l->name, l->N,
           l->C, l->E, l->k, l->F, rss);
    printf("  experts op, GFLOP/s (%% of sgemm peak) by rows per expert; GEMMs alone in "
           "brackets:\n   ");
    for (int i = 0; i < BENCH_ROW_SIZES; i++) {
        const ExpertRate *r = &l->rate[i];
        printf(" %zu: %.0f (%.0f%%) [%.0f%%]", r->rows, r->op_gflops,
               100.0 * r->op_gflops / p->sgemm_gflops,
               100.0 * r->gemm_gflops / p->sgemm_gflops);
        char key[48];
        snprintf(key, sizeof key, "experts_op_gflops_rows%zu", r->rows);
        csv_row(csv, "layer", l->name, key, r->op_gflops);
        snprintf(key, sizeof key, "expert_gemm_gflops_rows%zu", r->rows);
        csv_row(csv, "layer", l->name, key, r->gemm_gflops);
    }
    printf("\n  %-9s %8s %9s %8s %9s %8s %9s\n", "routing", "max/mean", "layer ms", "router",
           "dispatch", "experts", "overhead");
    const char *names[2] = {"balanced", "skewed"};
    double total[2];
    for (int s = 0; s < 2; s++) {
        total[s] = l->router_s[s] + l->dispatch_s[s] + l->experts_s[s];
        printf("  %-9s %8.2f %9.2f %8.2f %9.2f %8.2f %8.1f%%\n", names[s], l->max_mean[s],
               1e3 * total[s], 1e3 * l->router_s[s], 1e3 * l->dispatch_s[s],
               1e3 * l->experts_s[s], 100.0 * (l->router_s[s] + l->dispatch_s[s]) / total[s]);
        char key[48];
        snprintf(key, sizeof key, "%s_max_mean", names[s]);
        csv_row(csv, "layer", l->name, key, l->max_mean[s]);
        snprintf(key, sizeof key, "%s_layer_s", names[s]);
        csv_row(csv, "layer", l->name, key, total[s]);
        snprintf(key, sizeof key, "%s_overhead", names[s]);
        csv_row(csv, "layer", l->name, key, (l->router_s[s] + l->dispatch_s[s]) / total[s]);
    }
    printf("  skewed / balanced: %.3fx\n", total[1] / total[0]);
    csv_row(csv, "layer", l->name, "skewed_over_balanced", total[1] / total[0]);
}

static void print_generate(const GenResult *g, double rss, FILE *csv) {
    printf("%s (%d threads, peak RSS %.0f MB):\n", g->name, g->threads, rss);
    for (int i = 0; i < BENCH_GEN_CONTEXTS; i++) {
        printf("  context %4zu: %8.1f tokens/s with the KV cache, %8.2f by a full forward "
               "per token (%.0fx)\n", g->context[i], g->cached_tok_s[i], g->full_tok_s[i],
               g->cached_tok_s[i] / g->full_tok_s[i]);
        char key[48];
        snprintf(key, sizeof key, "kv_cache_tok_s_ctx%zu", g->context[i]);
        csv_row(csv, "generate", g->name, key, g->cached_tok_s[i]);
        snprintf(key, sizeof key, "full_forward_tok_s_ctx%zu", g->context[i]);
        csv_row(csv, "generate", g->name, key, g->full_tok_s[i]);
    }
}

// ---- modes -------------------------------------------------------------------------------

static void print_banner(void) {
    char when[64];
    time_t now = time(NULL);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M", localtime(&now));
    // The kernel and who chose it: OPENBLAS_CORETYPE itself is set by now either way.
    printf("moe.c bench, %s, %ld cores, OpenBLAS %s kernel (%s), attention tiles %s\n", when,
           sysconf(_SC_NPROCESSORS_ONLN), cpu_blas_kernel_name(), cpu_blas_kernel_origin(),
           cpu_attention_tiles(NULL));
}

typedef struct {
    JobResult r;
    double rss_mb;
    int ok;
} Outcome;

static Outcome run_job(JobKind kind, const char *config, const Options *o) {
    static const char *what[] = {"machine peaks", "training steps", "one MoE layer",
                                 "GPU: GEMM peak and experts", "generation"};
    fprintf(stderr, "bench: %s%s%s ...\n", what[kind], config ? ", " : "",
            config ? config : "");
    Job j = {kind, {config, o->words, o->n_words}, o->steps, o->seconds};
    Outcome out;
    memset(&out, 0, sizeof out);
    out.ok = run_child(&j, &out.r, &out.rss_mb) == 0;
    return out;
}

// The peaks are measured before and after everything else and the higher kept, so a
// peak taken while another process shared the cores does not inflate the MFU.
static PeakResult best_peaks(const PeakResult *a, const PeakResult *b) {
    PeakResult best = *a;
    if (b->sgemm_gflops > best.sgemm_gflops) best.sgemm_gflops = b->sgemm_gflops;
    if (b->sgemm_shared_gflops > best.sgemm_shared_gflops)
        best.sgemm_shared_gflops = b->sgemm_shared_gflops;
    if (b->sgemm_split_gflops > best.sgemm_split_gflops)
        best.sgemm_split_gflops = b->sgemm_split_gflops;
    if (b->fma_gflops > best.fma_gflops) best.fma_gflops = b->fma_gflops;
    if (b->fma_avx2_gflops > best.fma_avx2_gflops) best.fma_avx2_gflops = b->fma_avx2_gflops;
    return best;
}

static int bench_all(const Options *o) {
    static Outcome train[MAX_CONFIGS], layer[MAX_CONFIGS], gen[MAX_CONFIGS];
    Outcome first = run_job(JOB_PEAK, NULL, o);
    if (!first.ok) return 1;
    int do_train = !o->only || !strcmp(o->only, "train");
    int do_layer = !o->only || !strcmp(o->only, "layer");
    int do_gen = !o->only || !strcmp(o->only, "generate");
    for (int i = 0; i < o->n_configs && do_train; i++)
        train[i] = run_job(JOB_TRAIN, o->configs[i], o);
    for (int i = 0; i < o->n_configs && do_layer; i++)
        layer[i] = run_job(JOB_LAYER, o->configs[i], o);
    for (int i = 0; i < o->n_configs && do_gen; i++)
        gen[i] = run_job(JOB_GENERATE, o->configs[i], o);
    Outcome last = run_job(JOB_PEAK, NULL, o);
    PeakResult peak = last.ok ? best_peaks(&first.r.peak, &last.r.peak) : first.r.peak;

    FILE *csv = csv_open(o->csv);
    print_banner();
    print_peaks(&peak, first.rss_mb, csv);
    int failed = 0;
    if (do_train) print_train_header();
    for (int i = 0; i < o->n_configs && do_train; i++) {
        if (train[i].ok)
            print_train(&train[i].r.train, &peak, train[i].rss_mb, csv);
        else
            failed = printf("%s: failed\n", o->configs[i]) > 0;
    }
    if (do_layer) print_layer_header();
    for (int i = 0; i < o->n_configs && do_layer; i++) {
        if (layer[i].ok)
            print_layer(&layer[i].r.layer, &peak, layer[i].rss_mb, csv);
        else
            failed = printf("%s: failed\n", o->configs[i]) > 0;
    }
    if (do_gen)
        printf("\ngeneration, one sequence, greedy (indicative: the machine may be shared):\n");
    for (int i = 0; i < o->n_configs && do_gen; i++) {
        if (gen[i].ok)
            print_generate(&gen[i].r.generate, gen[i].rss_mb, csv);
        else
            failed = printf("%s: failed\n", o->configs[i]) > 0;
    }
    fclose(csv);
    printf("\nwritten: %s\n", o->csv);
    return failed;
}

// Runs a PyTorch peer script on the same config; returns the tokens/s it prints on its
// "<tag> tokens/s: X" line, 0 on failure, or -1 when the script says (exit status 3) that
// its torch lacks what was asked (torch.compile in torch 1).
static double peer_tokens_per_s(const char *python, const char *script, const char *config,
                                int steps, const char *extra) {
    char cmd[1024], tag[128];
    snprintf(cmd, sizeof cmd, "%s bench/%s.py %s --steps %d %s", python, script, config, steps,
             extra);
    snprintf(tag, sizeof tag, "%s tokens/s: %%lf", script);
    fflush(stdout);
    FILE *p = popen(cmd, "r");
    if (!p) return 0.0;
    char line[512];
    double tok_s = 0.0;
    while (fgets(line, sizeof line, p)) {
        fputs(line, stdout);
        sscanf(line, tag, &tok_s);
    }
    int status = pclose(p);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 3) return -1.0;
    return status == 0 ? tok_s : 0.0;
}

// Rounds of moe.c then each peer, alternating, each side's best kept: a quiet or a noisy
// stretch of a shared machine then falls on every side rather than on one. All sides run
// dropless (router.capacity_factor = 0), so all compute every assignment: equal work,
// though not the same weights. Each peer (an interpreter's torch, eager or through
// torch.compile) runs in the first round under each OpenMP wait policy and thread count
// (all cores, half of them), in later rounds at the fastest of those: its own best
// settings.
#define PEER_ROUNDS 2
#define PEER_SETTINGS 4

typedef struct {
    const char *policy;
    int threads;
    double tok_s;
} PeerSetting;

typedef struct {
    const char *python;
    int compiled; // through torch.compile
    int absent;   // its torch has no torch.compile: skipped
    PeerSetting set[PEER_SETTINGS];
} Peer;

static int peer_settings(PeerSetting *set) {
    int cores = (int)sysconf(_SC_NPROCESSORS_ONLN), n = 0;
    set[n++] = (PeerSetting){"PASSIVE", cores, 0};
    set[n++] = (PeerSetting){"ACTIVE", cores, 0};
    if (cores > 1) {
        set[n++] = (PeerSetting){"PASSIVE", cores / 2, 0};
        set[n++] = (PeerSetting){"ACTIVE", cores / 2, 0};
    }
    return n;
}

static int peer_best(const Peer *peer, int n_set) {
    int best = 0;
    for (int s = 1; s < n_set; s++)
        if (peer->set[s].tok_s > peer->set[best].tok_s) best = s;
    return best;
}

// One round of one peer: the first over all its settings, later ones at the best of
// those alone; nonzero when a run failed.
static int peer_round(Peer *peer, int n_set, const char *config, int steps, int round) {
    int first = round == 1 ? 0 : peer_best(peer, n_set), last = round == 1 ? n_set : first + 1;
    for (int s = first; s < last && !peer->absent; s++) {
        char extra[128];
        snprintf(extra, sizeof extra, "--dropless --wait-policy %s --threads %d%s",
                 peer->set[s].policy, peer->set[s].threads, peer->compiled ? " --compile" : "");
        printf("round %d: ", round);
        double tok_s = peer_tokens_per_s(peer->python, "torch_ref", config, steps, extra);
        if (tok_s < 0.0) peer->absent = 1;
        if (tok_s == 0.0) {
            fprintf(stderr, "bench: %s bench/torch_ref.py %s failed\n", peer->python, extra);
            return 1;
        }
        if (tok_s > peer->set[s].tok_s) peer->set[s].tok_s = tok_s;
    }
    return 0;
}

static int bench_peer(const Options *o) {
    const char *config = o->n_configs ? o->configs[0] : "configs/small.ini";
    static char dropless[] = "router.capacity_factor=0";
    char *words[MAX_CONFIGS + 1];
    memcpy(words, o->words, (size_t)o->n_words * sizeof *words);
    words[o->n_words] = dropless;
    Peer peers[2 * MAX_PYTHONS];
    int n_peers = 0, n_set = 0;
    for (int i = 0; i < o->n_pythons; i++)
        for (int compiled = 0; compiled < 2; compiled++) {
            Peer *p = &peers[n_peers++];
            *p = (Peer){o->pythons[i], compiled, 0, {{0}}};
            n_set = peer_settings(p->set);
        }
    print_banner();
    printf("equal work: every side dropless (router.capacity_factor=0 on %s), each from its "
           "own random weights\n", config);
    double ours = 0.0;
    for (int round = 1; round <= PEER_ROUNDS; round++) {
        JobResult r;
        double rss;
        Job j = {JOB_TRAIN, {config, words, o->n_words + 1}, o->steps, o->seconds};
        if (run_child(&j, &r, &rss) != 0) return 1;
        double tok_s = (double)r.train.tokens_per_step / r.train.step_s;
        printf("round %d: moe.c %s: %.0f tokens/s (%d threads, fastest of %d steps: %.3f s, "
               "%.1f%% of assignments kept)\n",
               round, r.train.name, tok_s, r.train.threads, r.train.steps, r.train.step_s,
               100.0 * r.train.kept);
        if (tok_s > ours) ours = tok_s;
        for (int p = 0; p < n_peers; p++)
            if (peer_round(&peers[p], n_set, config, o->steps, round)) return 1;
    }
    printf("best of %d rounds: moe.c %.0f tokens/s\n", PEER_ROUNDS, ours);
    for (int p = 0; p < n_peers; p++) {
        const Peer *peer = &peers[p];
        const char *mode = peer->compiled ? "torch.compile" : "eager";
        if (peer->absent) {
            printf("%s %s: skipped (its torch has no torch.compile)\n", peer->python, mode);
            continue;
        }
        int best = peer_best(peer, n_set);
        printf("moe.c / PyTorch (%s, %s) tokens/s, equal work (dropless): %.2fx (PyTorch %.0f "
               "tokens/s at its best setting: OMP_WAIT_POLICY=%s, %d threads)\n",
               peer->python, mode, ours / peer->set[best].tok_s, peer->set[best].tok_s,
               peer->set[best].policy, peer->set[best].threads);
    }
    return 0;
}

// ---- the GPU ---------------------------------------------------------------------------

static void print_gpu(const GpuResult *g, FILE *csv) {
    printf("GPU: %s\n  dense bf16 GEMM %zu^3 (cuBLAS, fp32 accumulate): %.1f TFLOP/s\n",
           g->device, g->peak_n, g->peak_gflops / 1e3);
    csv_row(csv, "gpu", "-", "dense_bf16_gflops", g->peak_gflops);
    printf("\nexpert GEMMs, bf16 products (the experts op: forward = both products and the "
           "SwiGLU;\ndgrad = backward without weight gradients; wgrad = the rest of "
           "backward), TFLOP/s and %% of a dense\nproduct of equal FLOPs (every row in one "
           "expert):\n");
    printf("  %-34s %-9s %15s %15s %15s %8s\n", "layout", "routing", "forward", "dgrad",
           "wgrad", "vs bal.");
    const char *routing[2] = {"balanced", "skewed"}, *pass[3] = {"fwd", "dgrad", "wgrad"};
    for (int l = 0; l < BENCH_GPU_LAYOUTS; l++) {
        const GpuLayoutResult *r = &g->layout[l];
        char name[BENCH_NAME_MAX + 64];
        snprintf(name, sizeof name, "%s E%zu top-%zu C%zu F%zu N%zu", r->name, r->E, r->k, r->C,
                 r->F, r->N);
        double total[2] = {0, 0};
        for (int s = 0; s < 2; s++) {
            printf("  %-34s %-9s", s ? "" : name, routing[s]);
            for (int p = 0; p < 3; p++) {
                double tf = r->flops_per_pass / r->grouped_s[s][p] / 1e12;
                printf(" %6.1f (%5.1f%%)", tf, 100.0 * r->dense_s[p] / r->grouped_s[s][p]);
                total[s] += r->grouped_s[s][p];
                char key[64];
                snprintf(key, sizeof key, "%s_%s_vs_dense", routing[s], pass[p]);
                csv_row(csv, "gpu", r->name, key, r->dense_s[p] / r->grouped_s[s][p]);
            }
            printf(" %7.3fx\n", total[s] / total[0]);
        }
        csv_row(csv, "gpu", r->name, "skewed_over_balanced", total[1] / total[0]);
        double grouped = 0.0;
        printf("  %-34s %-9s", "  as grouped GEMMs", "balanced");
        for (int p = 0; p < 3; p++) {
            printf(" %6.1f (%5.1f%%)", r->flops_per_pass / r->grouped_gemm_s[p] / 1e12,
                   100.0 * r->dense_s[p] / r->grouped_gemm_s[p]);
            grouped += r->grouped_gemm_s[p];
        }
        printf(" %7.3fx (time over the per-expert loop)\n", grouped / total[0]);
        csv_row(csv, "gpu", r->name, "grouped_gemm_over_loop", grouped / total[0]);
    }
}

static void print_gpu_attention(const GpuAttentionResult *a, FILE *csv) {
    printf("\nattention B%zu T%zu H%zu KV%zu D%zu (causal), TFLOP/s:\n", a->B, a->T, a->H, a->KV,
           a->D);
    const char *name[2] = {"plain kernels, fp32", a->fused ? "cuDNN fused, bf16"
                                                            : "bf16 (cuDNN unavailable: plain)"};
    for (int p = 0; p < 2; p++)
        printf("  %-34s forward %7.1f  backward %7.1f\n", name[p],
               a->flops[0] / a->s[p][0] / 1e12, a->flops[1] / a->s[p][1] / 1e12);
    double speedup = (a->s[0][0] + a->s[0][1]) / (a->s[1][0] + a->s[1][1]);
    printf("  %-34s %.2fx\n", "bf16 over plain (forward + backward)", speedup);
    csv_row(csv, "gpu", "attention", a->fused ? "fused_over_plain" : "bf16_plain_over_plain",
            speedup);
}

static void print_gpu_train(const TrainResult *t, const GpuResult *g, FILE *csv) {
    double tok_s = (double)t->tokens_per_step / t->step_s;
    double gflops = tok_s * t->flops_per_token / 1e9;
    double moe = t->phase_s[PHASE_ROUTER] + t->phase_s[PHASE_DISPATCH];
    printf("\ntraining steps on the GPU (random tokens, the fastest step; model FLOPs as on "
           "the CPU):\n  %s: %.1fM params (%.1fM active), %zu tokens/step: %.0f tokens/s, "
           "%.1f TFLOP/s, MFU %.1f%% of the dense bf16 peak\n  %-22s",
           t->name, (double)t->params / 1e6, (double)t->active / 1e6, t->tokens_per_step,
           tok_s, gflops / 1e3, 100.0 * gflops / g->peak_gflops, "phases, % of step:");
    for (int i = 0; i < PHASE_COUNT; i++)
        printf(" %s %.1f", bench_phase_names[i], 100.0 * t->phase_s[i] / t->step_s);
    printf("\n  %-22s %.1f%% of the step (router, top-k, aux losses, dispatch, combine)\n",
           "MoE overhead:", 100.0 * moe / t->step_s);
    csv_row(csv, "gpu_train", t->name, "tokens_per_s", tok_s);
    csv_row(csv, "gpu_train", t->name, "mfu", gflops / g->peak_gflops);
    csv_row(csv, "gpu_train", t->name, "moe_overhead_of_step", moe / t->step_s);
}

static int bench_gpu_all(const Options *o) {
    Outcome g = run_job(JOB_GPU, NULL, o);
    print_banner();
    if (g.ok && g.r.gpu.why_not[0]) {
        printf("GPU: skipped (%s)\n", g.r.gpu.why_not);
        return 0;
    }
    if (!g.ok) return 1;
    FILE *csv = csv_open(o->csv);
    print_gpu(&g.r.gpu, csv);
    print_gpu_attention(&g.r.gpu.attention, csv);
    const char *config = o->n_configs ? o->configs[0] : "configs/gpu-medium.ini";
    Outcome t = run_job(JOB_TRAIN, config, o);
    if (t.ok) print_gpu_train(&t.r.train, &g.r.gpu, csv);
    fclose(csv);
    printf("\nwritten: %s\n", o->csv);
    return t.ok ? 0 : 1;
}

// moe.c on the GPU against bench/torch_gpu_ref.py, eager and under torch.compile.
static int bench_gpu_peer(const Options *o) {
    const char *config = o->n_configs ? o->configs[0] : "configs/gpu-medium.ini";
    print_banner();
    Job j = {JOB_TRAIN, {config, o->words, o->n_words}, o->steps, o->seconds};
    JobResult r;
    double rss;
    if (run_child(&j, &r, &rss) != 0) return 1;
    double ours = (double)r.train.tokens_per_step / r.train.step_s;
    printf("moe.c %s on the GPU: %.0f tokens/s (fastest of %d steps: %.3f s)\n", r.train.name,
           ours, r.train.steps, r.train.step_s);
    const char *modes[2] = {"", "--compile"}, *names[2] = {"eager", "torch.compile"};
    int failed = 0;
    for (int m = 0; m < 2; m++) {
        double theirs = peer_tokens_per_s(o->python, "torch_gpu_ref", config, o->steps, modes[m]);
        if (theirs <= 0.0) {
            fprintf(stderr, "bench: bench/torch_gpu_ref.py %s failed\n", modes[m]);
            failed = 1;
            continue;
        }
        printf("moe.c / PyTorch %s tokens/s: %.2fx\n", names[m], ours / theirs);
    }
    return failed;
}

static void usage(void) {
    fprintf(stderr, "usage: bench [--steps N] [--seconds S] [--csv FILE] "
                    "[--only train|layer|generate] [CONFIG.ini ...] [section.key=value ...]\n"
                    "       bench --peer [--steps N] [--python PATH ...] [CONFIG.ini] "
                    "[section.key=value ...]\n"
                    "       bench --gpu [--steps N] [--csv FILE] [CONFIG.ini] "
                    "[section.key=value ...]\n"
                    "       bench --gpu-peer [--steps N] [--python PATH] [CONFIG.ini] "
                    "[section.key=value ...]\n"
                    "  section.key=value words apply to every config, as in moe train\n");
    exit(2);
}

static Options parse_options(int argc, char **argv) {
    static char *words[MAX_CONFIGS];
    Options o = {.steps = 3,
                 .seconds = 5.0,
                 .csv = "bench.csv",
                 .python = "/usr/bin/python3",
                 .words = words};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--steps") && more)
            o.steps = atoi(argv[++i]);
        else if (!strcmp(a, "--seconds") && more)
            o.seconds = atof(argv[++i]);
        else if (!strcmp(a, "--csv") && more)
            o.csv = argv[++i];
        else if (!strcmp(a, "--python") && more && o.n_pythons < MAX_PYTHONS)
            o.python = o.pythons[o.n_pythons++] = argv[++i], o.python_set = 1;
        else if (!strcmp(a, "--only") && more)
            o.only = argv[++i];
        else if (!strcmp(a, "--peer"))
            o.peer = 1;
        else if (!strcmp(a, "--gpu"))
            o.gpu = 1;
        else if (!strcmp(a, "--gpu-peer"))
            o.gpu_peer = 1;
        else if (a[0] == '-' || o.n_configs == MAX_CONFIGS || o.n_words == MAX_CONFIGS)
            usage();
        else if (strchr(a, '='))
            o.words[o.n_words++] = argv[i];
        else
            o.configs[o.n_configs++] = a;
    }
    if (o.steps < 1 || (o.only && strcmp(o.only, "train") && strcmp(o.only, "layer") &&
                        strcmp(o.only, "generate")))
        usage();
    if (o.gpu || o.gpu_peer) { // their training runs are the GPU's
        static char device_word[] = "train.device=cuda";
        if (o.n_words == MAX_CONFIGS) usage();
        o.words[o.n_words++] = device_word;
    }
    return o;
}

int main(int argc, char **argv) {
    cpu_blas_select_kernel(argv);
    Options o = parse_options(argc, argv);
    if (o.peer && !o.n_pythons) o.pythons[o.n_pythons++] = o.python;
    if (o.peer) return bench_peer(&o);
    if (o.gpu) return bench_gpu_all(&o);
    if (o.gpu_peer) {
        if (!o.python_set) o.python = "python3";
        return bench_gpu_peer(&o);
    }
    if (!o.n_configs) {
        const char *defaults[] = {"configs/tiny.ini", "configs/small.ini",
                                  "configs/fine-grained.ini"};
        for (int i = 0; i < 3; i++)
            o.configs[o.n_configs++] = defaults[i];
    }
    return bench_all(&o);
}
