// ablate.c: `moe ablate GRID.ini [--jobs N] [--out DIR] [overrides]` (format: ablate.h).
//
// Each variant trains in a child process, `moe train <out>/base.ini <overrides>
// train.out_dir=<out> train.name=<variant> train.threads=<cores/jobs>` (the same binary,
// /proc/self/exe), at most --jobs at a time, its output in <out>/<variant>/train.log. A
// child is a whole `moe train`, so a variant's run directory is like any other: `moe
// eval`, `moe route` and `moe train --resume` work on it. Resuming the ablation: a
// variant whose final checkpoint exists is skipped, one with an earlier checkpoint
// continues with `moe train --resume` (bit for bit), others start afresh.
#include "ablate.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <ini.h>
#include <libgen.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../base/util.h"
#include "../run.h"

#define ABLATE_NAME_MAX 200
#define ABLATE_MAX_RUNS 1000

static char *text_dup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = CALLOC(n, 1);
    memcpy(d, s, n);
    return d;
}

static char *text_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *text_printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *s = CALLOC((size_t)n + 1, 1);
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

static void words_push(char ***words, int *n, char *word) {
    char **grown = realloc(*words, (size_t)(*n + 1) * sizeof *grown);
    if (!grown) DIE("out of memory");
    grown[(*n)++] = word;
    *words = grown;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ---- the grid file ----------------------------------------------------------------

typedef struct {
    char *key; // section.key
    char **values;
    int n_values;
} GridAxis;

typedef struct {
    const char *path;
    RunConfig *base;         // heap: a RunConfig is ~150 KB
    RunConfig *scratch;      // checks each override's key and value as it is read
    AblateVariant *sections; // [variant NAME], in file order
    int n_sections;
    GridAxis *axes; // [grid] keys, in file order
    int n_axes;
    char err[1024];
} GridFile;

// Run names become directory names, gnuplot titles and CSV cells: keep them plain.
static int name_is_plain(const char *s) {
    if (!isalnum((unsigned char)*s) || strlen(s) > ABLATE_NAME_MAX) return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr("._+=-", *s)) return 0;
    return 1;
}

// What every variant shares (an ablation compares routers at equal data, seed and token
// budget) and what ablate sets itself for each child.
static int key_is_fixed(const char *key) {
    static const char *const fixed[] = {"train.steps",  "train.batch_size", "train.grad_accum",
                                        "train.seed",   "train.eval_every", "model.seq_len",
                                        "model.vocab",  "train.name",       "train.out_dir",
                                        "train.threads"};
    if (!strncmp(key, "data.", 5) || !strncmp(key, "domain.", 7)) return 1;
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++)
        if (!strcmp(key, fixed[i])) return 1;
    return 0;
}

// libinih reports keys only, so sections come from a scan of the header lines: a
// [variant NAME] without keys is a run of the base config itself.
static void grid_scan_sections(GridFile *g) {
    FILE *f = fopen(g->path, "r");
    struct stat sb;
    if (!f) FAIL("%s: cannot open the grid file", g->path);
    if (fstat(fileno(f), &sb) == 0 && S_ISDIR(sb.st_mode))
        FAIL("%s: is a directory, not a grid file", g->path);
    char line[4096];
    for (int no = 1; fgets(line, sizeof line, f); no++) {
        char *s = line + strspn(line, " \t"), *end = strchr(s, ']');
        if (*s != '[' || !end || strncmp(s + 1, "variant ", 8)) continue;
        *end = '\0';
        const char *name = s + 9;
        if (!name_is_plain(name))
            FAIL("%s:%d: variant name '%s': use letters, digits and ._+=- (it names a "
                 "directory), starting with a letter or digit",
                 g->path, no, name);
        for (int i = 0; i < g->n_sections; i++)
            if (!strcmp(g->sections[i].name, name))
                FAIL("%s:%d: [variant %s] appears twice", g->path, no, name);
        g->sections = realloc(g->sections, (size_t)(g->n_sections + 1) * sizeof *g->sections);
        if (!g->sections) DIE("out of memory");
        g->sections[g->n_sections++] = (AblateVariant){.name = text_dup(name)};
    }
    fclose(f);
}

// An override a variant or the grid may apply: a known key, a valid value, not fixed.
static int check_override(GridFile *g, const char *key, const char *value) {
    if (key_is_fixed(key)) {
        snprintf(g->err, sizeof g->err,
                 "%s is the same for every variant of an ablation (set it in the base "
                 "sections, outside [grid] and [variant])",
                 key);
        return 0;
    }
    char *word = text_printf("%s=%s", key, value);
    int bad = run_config_override(g->scratch, word, g->err, sizeof g->err);
    free(word);
    return bad == 0;
}

static void axis_free(GridAxis *a) {
    for (int i = 0; i < a->n_values; i++) free(a->values[i]);
    free(a->values);
    free(a->key);
}

static int grid_add_axis(GridFile *g, const char *key, const char *list) {
    for (int i = 0; i < g->n_axes; i++)
        if (!strcmp(g->axes[i].key, key)) {
            snprintf(g->err, sizeof g->err, "%s is listed twice in [grid]", key);
            return 0;
        }
    GridAxis a = {.key = text_dup(key)};
    char *copy = text_dup(list), *save = NULL;
    for (char *v = strtok_r(copy, ",", &save); v; v = strtok_r(NULL, ",", &save)) {
        v += strspn(v, " \t");
        for (char *e = v + strlen(v); e > v && isspace((unsigned char)e[-1]);)
            *--e = '\0';
        if (!*v || !check_override(g, key, v)) {
            if (!*v)
                snprintf(g->err, sizeof g->err, "%s = %s: an empty value in the list", key,
                         list);
            free(copy);
            axis_free(&a);
            return 0;
        }
        words_push(&a.values, &a.n_values, text_dup(v));
    }
    free(copy);
    g->axes = realloc(g->axes, (size_t)(g->n_axes + 1) * sizeof *g->axes);
    if (!g->axes) DIE("out of memory");
    g->axes[g->n_axes++] = a;
    return 1;
}

static int grid_key(void *user, const char *section, const char *key, const char *value) {
    GridFile *g = user;
    if (!strcmp(section, "grid")) return grid_add_axis(g, key, value);
    if (!strncmp(section, "variant ", 8)) {
        AblateVariant *v = NULL;
        for (int i = 0; i < g->n_sections; i++)
            if (!strcmp(g->sections[i].name, section + 8)) v = &g->sections[i];
        if (!v)
            snprintf(g->err, sizeof g->err, "[%s]: put the header on a line of its own",
                     section);
        if (!v || !check_override(g, key, value)) return 0;
        words_push(&v->words, &v->n_words, text_printf("%s=%s", key, value));
        return 1;
    }
    char *word = strncmp(section, "domain ", 7)
                     ? text_printf("%s.%s=%s", section, key, value)
                     : text_printf("domain.%s.%s=%s", section + 7, key, value);
    int bad = run_config_override(g->base, word, g->err, sizeof g->err);
    free(word);
    return bad == 0;
}

static void grid_load(GridFile *g, const char *path, int n_words, char **words) {
    memset(g, 0, sizeof *g);
    g->path = path;
    g->base = CALLOC(1, sizeof *g->base);
    g->scratch = CALLOC(1, sizeof *g->scratch);
    run_config_defaults(g->base);
    run_config_defaults(g->scratch);
    grid_scan_sections(g);
    int line = ini_parse(path, grid_key, g);
    if (line == -1) FAIL("%s: cannot open the grid file", path);
    if (line > 0) FAIL("%s:%d: %s", path, line, g->err[0] ? g->err : "syntax error");
    if (!g->n_sections && !g->n_axes)
        FAIL("%s: no [variant NAME] or [grid] section: nothing to compare", path);
    run_apply_overrides(g->base, n_words, words);
    if (run_config_validate(g->base, g->err, sizeof g->err) != 0) FAIL("%s: %s", path, g->err);
    data_config_use_default(&g->base->data);
}

static void variants_free(AblateVariant *v, int n) {
    for (int i = 0; i < n; i++) {
        for (int w = 0; w < v[i].n_words; w++) free(v[i].words[w]);
        free(v[i].words);
        free(v[i].name);
    }
    free(v);
}

static void grid_free(GridFile *g) {
    variants_free(g->sections, g->n_sections);
    for (int a = 0; a < g->n_axes; a++) axis_free(&g->axes[a]);
    free(g->axes);
    free(g->base);
    free(g->scratch);
}

// One run: a [variant] section (or the base alone) plus one value of every [grid] list.
static AblateVariant grid_variant(const GridFile *g, const AblateVariant *section,
                                  const int *pick) {
    AblateVariant v = {0};
    char name[4 * ABLATE_NAME_MAX] = "";
    if (section) {
        snprintf(name, sizeof name, "%s", section->name);
        for (int i = 0; i < section->n_words; i++)
            words_push(&v.words, &v.n_words, text_dup(section->words[i]));
    }
    for (int a = 0; a < g->n_axes; a++) {
        const char *key = g->axes[a].key, *leaf = strrchr(key, '.');
        const char *value = g->axes[a].values[pick[a]];
        size_t len = strlen(name);
        snprintf(name + len, sizeof name - len, "%s%s=%s", len ? "+" : "",
                 leaf ? leaf + 1 : key, value);
        words_push(&v.words, &v.n_words, text_printf("%s=%s", key, value));
    }
    if (!name_is_plain(name))
        FAIL("%s: run name '%s' from the [grid] values is not a plain directory name (letters, "
             "digits, ._+=-; at most %d characters)",
             g->path, name, ABLATE_NAME_MAX);
    v.name = text_dup(name);
    return v;
}

// Every [variant] section (or the base alone) crossed with every combination of the
// [grid] lists, the first list varying slowest.
static AblateVariant *grid_expand(const GridFile *g, int *n_out) {
    long combos = 1, n = g->n_sections ? g->n_sections : 1;
    for (int a = 0; a < g->n_axes && n <= ABLATE_MAX_RUNS; a++) {
        combos *= g->axes[a].n_values;
        n *= g->axes[a].n_values;
    }
    if (n > ABLATE_MAX_RUNS)
        FAIL("%s: the grid expands to more than %d runs; list variants as [variant NAME] "
             "sections instead of a full factorial",
             g->path, ABLATE_MAX_RUNS);
    AblateVariant *out = CALLOC((size_t)n, sizeof *out);
    int *pick = CALLOC((size_t)g->n_axes, sizeof *pick);
    for (long i = 0; i < n; i++) {
        long c = i % combos;
        for (int a = g->n_axes - 1; a >= 0; a--) {
            pick[a] = (int)(c % g->axes[a].n_values);
            c /= g->axes[a].n_values;
        }
        out[i] = grid_variant(g, g->n_sections ? &g->sections[i / combos] : NULL, pick);
        for (long j = 0; j < i; j++)
            if (!strcmp(out[j].name, out[i].name))
                FAIL("%s: two runs are named %s", g->path, out[i].name);
    }
    free(pick);
    *n_out = (int)n;
    return out;
}

// ---- run directories ----------------------------------------------------------------

static void make_dirs(const char *path) {
    if (!path[0]) FAIL("an empty directory name (--out)");
    char tmp[RUN_FILE_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1;; p++) {
        if (*p && *p != '/') continue;
        char c = *p;
        *p = '\0';
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST) FAIL("%s: cannot create directory", tmp);
        if (!(*p = c)) break;
    }
}

// The variant's config as its child resolves it: base.ini, then its overrides.
static void variant_config(RunConfig *rc, const char *base_ini, const AblateVariant *v,
                           const char *grid) {
    char err[1024];
    run_config_defaults(rc);
    if (run_config_load_ini(rc, base_ini, err, sizeof err) != 0) FAIL("%s", err);
    for (int i = 0; i < v->n_words; i++)
        if (run_config_override(rc, v->words[i], err, sizeof err) != 0)
            FAIL("%s: variant %s: %s", grid, v->name, err);
    if (run_config_validate(rc, err, sizeof err) != 0)
        FAIL("%s: variant %s: %s", grid, v->name, err);
}

static char *config_text(RunConfig *rc) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) DIE("open_memstream failed");
    run_config_write_ini(f, rc);
    fclose(f);
    return text;
}

// A run directory left by another grid (edited since, or sharing --out) must not pass for
// this variant's: its stored config must equal the variant's, thread count aside.
static void check_same_config(const char *ckpt, RunConfig *want, const char *name) {
    RunConfig *have = CALLOC(1, sizeof *have);
    run_load_checkpoint_config(have, ckpt, 0, NULL);
    have->train.threads = want->train.threads;
    char *a = config_text(have), *b = config_text(want);
    const char *pa = a, *pb = b, *section = "";
    char sec[128] = "";
    while (*pa && *pb) {
        size_t na = strcspn(pa, "\n"), nb = strcspn(pb, "\n");
        if (na != nb || memcmp(pa, pb, na)) {
            FAIL("variant %s: %s was trained with [%s] %.*s, the grid now gives %.*s\nHINT: "
                 "delete that run directory to train it again, or pass another --out",
                 name, ckpt, section, (int)na, pa, (int)nb, pb);
        }
        if (*pa == '[') {
            snprintf(sec, sizeof sec, "%.*s", na > 2 ? (int)na - 2 : 0, pa + 1);
            section = sec;
        }
        pa += na + (pa[na] == '\n');
        pb += nb + (pb[nb] == '\n');
    }
    if (*pa || *pb)
        FAIL("variant %s: %s was trained with other data domains than the grid now gives\n"
             "HINT: delete that run directory to train it again, or pass another --out",
             name, ckpt);
    free(a);
    free(b);
    free(have);
}

typedef enum { PLAN_FRESH, PLAN_RESUME, PLAN_SKIP } Plan;

typedef struct {
    AblateVariant *v;
    char run_dir[RUN_PATH_MAX];
    char ckpt[RUN_FILE_MAX]; // resume: the checkpoint it continues from; skip: the final one
    Plan plan;
    pid_t pid;
    double t0;
} Job;

// rc: the variant's config as its child resolves it (name, out_dir and threads included).
static void plan_job(Job *j, RunConfig *rc, const char *out) {
    if (snprintf(j->run_dir, sizeof j->run_dir, "%s/%s", out, j->v->name) >=
        (int)sizeof j->run_dir)
        FAIL("%s/%s: path too long", out, j->v->name);
    j->plan = PLAN_FRESH;
    char pattern[RUN_FILE_MAX];
    snprintf(pattern, sizeof pattern, "%s/ckpt_*.h5", j->run_dir);
    glob_t found;
    int none = glob(pattern, 0, NULL, &found) != 0;
    globfree(&found);
    if (none) return;
    run_resolve_checkpoint(j->run_dir, j->ckpt, sizeof j->ckpt);
    check_same_config(j->ckpt, rc, j->v->name);
    char final[RUN_FILE_MAX];
    snprintf(final, sizeof final, "%s/ckpt_%06d.h5", j->run_dir, rc->train.steps);
    j->plan = access(final, F_OK) == 0 ? PLAN_SKIP : PLAN_RESUME;
    if (j->plan == PLAN_SKIP) snprintf(j->ckpt, sizeof j->ckpt, "%s", final);
}

// ---- children -----------------------------------------------------------------------

// `moe train ...` with stdout and stderr to log (appended when resuming).
static pid_t spawn_train(char **argv, const char *log, int append) {
    int fd = open(log, O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0644);
    if (fd < 0) FAIL("%s: cannot create the log file: %s", log, strerror(errno));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) FAIL("cannot start a training process: %s", strerror(errno));
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0) dup2(null, STDIN_FILENO);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        execv("/proc/self/exe", argv);
        dprintf(STDERR_FILENO, "moe ablate: cannot run /proc/self/exe: %s\n", strerror(errno));
        _exit(127);
    }
    close(fd);
    return pid;
}

static void start_job(Job *j, const char *out, const char *base_ini, int threads) {
    char **argv = NULL;
    int n = 0;
    words_push(&argv, &n, text_dup("moe"));
    words_push(&argv, &n, text_dup("train"));
    if (j->plan == PLAN_RESUME) {
        words_push(&argv, &n, text_dup("--resume"));
        words_push(&argv, &n, text_dup(j->run_dir));
    } else {
        make_dirs(j->run_dir);
        run_dir_clear(j->run_dir);   // a start that never reached a checkpoint
        words_push(&argv, &n, text_dup(base_ini));
        for (int i = 0; i < j->v->n_words; i++)
            words_push(&argv, &n, text_dup(j->v->words[i]));
        words_push(&argv, &n, text_printf("train.out_dir=%s", out));
        words_push(&argv, &n, text_printf("train.name=%s", j->v->name));
    }
    words_push(&argv, &n, text_printf("train.threads=%d", threads));
    words_push(&argv, &n, NULL);
    char log[RUN_FILE_MAX];
    snprintf(log, sizeof log, "%s/train.log", j->run_dir);
    j->t0 = now_s();
    j->pid = spawn_train(argv, log, j->plan == PLAN_RESUME);
    for (int i = 0; argv[i]; i++)
        free(argv[i]);
    free(argv);
}

// The last non-empty line of a log: a failed run's one-line error.
static void log_last_line(const char *log, char *out, size_t n) {
    out[0] = '\0';
    FILE *f = fopen(log, "r");
    if (!f) return;
    char line[1024];
    while (fgets(line, sizeof line, f))
        if (line[strspn(line, " \t\r\n")]) snprintf(out, n, "%s", line);
    fclose(f);
    out[strcspn(out, "\r\n")] = '\0';
}

static void print_progress(int i, int n, const char *what, const char *name) {
    int w = snprintf(NULL, 0, "%d", n);
    printf("ablate [%*d/%d] %-6s %s", w, i + 1, n, what, name);
}

static void finish_job(Job *j, int i, int n, int status) {
    double s = now_s() - j->t0;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        print_progress(i, n, "done", j->v->name);
        printf(" in %.0f s, val mean %.4f\n", s, ablate_final_val(j->run_dir));
        return;
    }
    char log[RUN_FILE_MAX], last[1024];
    snprintf(log, sizeof log, "%s/train.log", j->run_dir);
    log_last_line(log, last, sizeof last);
    j->v->failed = 1;
    print_progress(i, n, "FAILED", j->v->name);
    if (WIFEXITED(status))
        printf(" (exit status %d, %s): %s\n", WEXITSTATUS(status), log, last);
    else
        printf(" (killed by signal %d, %s)\n", WTERMSIG(status), log);
}

// Starts jobs in order, at most `jobs` at a time, until all have finished.
static void run_jobs(Job *job, int n, int jobs, const char *out, const char *base_ini,
                     int threads) {
    int next = 0, running = 0;
    while (next < n || running > 0) {
        while (running < jobs && next < n) {
            Job *j = &job[next];
            if (j->plan == PLAN_SKIP) {
                print_progress(next++, n, "skip", j->v->name);
                printf(": finished (%s)\n", j->ckpt);
                continue;
            }
            start_job(j, out, base_ini, threads);
            print_progress(next++, n, j->plan == PLAN_RESUME ? "resume" : "start", j->v->name);
            if (j->plan == PLAN_RESUME)
                printf(" from %s\n", j->ckpt);
            else
                printf(" -> %s/train.log\n", j->run_dir);
            running++;
        }
        if (running == 0) break;
        fflush(stdout); // progress lines show up in a log file while the runs go on
        int status;
        pid_t pid = wait(&status);
        if (pid < 0 && errno == EINTR) continue;
        if (pid < 0) DIE("wait: %s", strerror(errno));
        for (int i = 0; i < n; i++)
            if (job[i].pid == pid) {
                job[i].pid = 0;
                finish_job(&job[i], i, n, status);
                running--;
            }
    }
}

// ---- the command ----------------------------------------------------------------------

typedef struct {
    const char *grid;
    const char *out;
    int jobs;
    char **words; // section.key=value overrides of the base
    int n_words;
} AblateArgs;

static void parse_args(AblateArgs *a, int argc, char **argv) {
    *a = (AblateArgs){.grid = argv[1], .jobs = 1};
    for (int i = 2; i < argc; i++) {
        if (strncmp(argv[i], "--", 2) && strchr(argv[i], '=')) {
            words_push(&a->words, &a->n_words, argv[i]);
            continue;
        }
        if (i + 1 >= argc) FAIL("%s needs a value (moe ablate --help)", argv[i]);
        const char *f = argv[i], *v = argv[++i];
        char *end;
        if (!strcmp(f, "--out"))
            a->out = v;
        else if (!strcmp(f, "--jobs")) {
            long j = strtol(v, &end, 10);
            if (end == v || *end || j < 1 || j > 1024)
                FAIL("--jobs %s: expected a number from 1 to 1024", v);
            a->jobs = (int)j;
        } else
            FAIL("unknown option %s (moe ablate --help lists them)", f);
    }
}

static void print_ablate_help(void) {
    printf("usage: moe ablate GRID.ini [--jobs N] [--out DIR] [section.key=value ...]\n"
           "  Trains every variant of GRID (a config plus [variant NAME] sections of\n"
           "  overrides and/or a [grid] section of comma-separated value lists) with the same\n"
           "  data, seed, init and token budget, N at a time (default 1, cores/N threads\n"
           "  each), into DIR (default <train.out_dir>/<GRID base name>); finished variants\n"
           "  are skipped and interrupted ones resumed when run again. Writes\n"
           "  DIR/ablation.csv, DIR/ablation.md, DIR/val_loss.png and DIR/maxvio.png.\n"
           "  Overrides change the base (e.g. train.steps=20 for a quick trial).\n");
}

// <train.out_dir>/<grid file's base name without .ini>
static void default_out(char *out, size_t n, const char *grid, const RunConfig *base) {
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s", grid);
    char *name = basename(path), *dot = strrchr(name, '.');
    if (dot && dot != name) *dot = '\0';
    snprintf(out, n, "%s/%s", base->train.out_dir, name);
}

static void write_base_ini(const char *path, RunConfig *base, const char *grid) {
    FILE *f = fopen(path, "w");
    if (!f) FAIL("%s: cannot write", path);
    fprintf(f,
            "; base config of the ablation %s (every key, defaults included); each variant\n"
            "; trains from this file plus its overrides\n\n",
            grid);
    run_config_write_ini(f, base);
    if (fclose(f) != 0) FAIL("%s: cannot write", path);
}

int ablate_main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        print_ablate_help();
        return argc < 2 ? 2 : 0;
    }
    double t0 = now_s();
    AblateArgs a;
    parse_args(&a, argc, argv);
    GridFile g;
    grid_load(&g, a.grid, a.n_words, a.words);
    int n;
    AblateVariant *v = grid_expand(&g, &n);
    char out[RUN_PATH_MAX], base_ini[RUN_FILE_MAX];
    if (a.out)
        snprintf(out, sizeof out, "%s", a.out);
    else
        default_out(out, sizeof out, a.grid, g.base);
    make_dirs(out);
    snprintf(base_ini, sizeof base_ini, "%s/base.ini", out);
    write_base_ini(base_ini, g.base, a.grid);
    // Every variant resolves from base.ini, exactly as its child will.
    run_load_config(g.base, base_ini, 0, NULL);
    int cores = omp_get_num_procs(), jobs = a.jobs < n ? a.jobs : n;
    int threads = cores / jobs > 0 ? cores / jobs : 1;
    Job *job = CALLOC((size_t)n, sizeof *job);
    RunConfig *rc = CALLOC(1, sizeof *rc);
    for (int i = 0; i < n; i++) { // every config error before any run starts
        job[i].v = &v[i];
        variant_config(rc, base_ini, &v[i], a.grid);
        rc->train.threads = threads;
        snprintf(rc->train.name, sizeof rc->train.name, "%s", v[i].name);
        if (snprintf(rc->train.out_dir, sizeof rc->train.out_dir, "%s", out) >=
            (int)sizeof rc->train.out_dir)
            FAIL("--out %s: path too long", out);
        plan_job(&job[i], rc, out);
    }
    free(rc);
    const TrainConfig *tc = &g.base->train;
    printf("ablate: %d variants of %s -> %s, %d at a time, %d thread%s each\n"
           "ablate: each trains %d steps x %d x %d tokens x %d accum, seed %d\n",
           n, a.grid, out, jobs, threads, threads == 1 ? "" : "s", tc->steps, tc->batch_size,
           g.base->model.seq_len, tc->grad_accum, tc->seed);
    run_jobs(job, n, jobs, out, base_ini, threads);
    int failed = 0, skipped = 0;
    for (int i = 0; i < n; i++) {
        failed += v[i].failed;
        skipped += job[i].plan == PLAN_SKIP;
    }
    char note[256];
    snprintf(note, sizeof note,
             "%d trained, %d already finished (skipped), %d failed; %d at a time, %d thread%s "
             "each; %.0f s wall",
             n - skipped - failed, skipped, failed, jobs, threads, threads == 1 ? "" : "s",
             now_s() - t0);
    ablate_report(out, a.grid, g.base, v, n, note);
    free(job);
    variants_free(v, n);
    grid_free(&g);
    free(a.words);   // the words themselves are argv's
    return failed ? 1 : 0;
}
