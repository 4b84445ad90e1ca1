// ablate_report.c: the comparison table and figures of `moe ablate`, from the metrics
// files every variant's training run wrote.
//
// Columns are found by header name, never by position, so the table keeps working as
// metrics.csv gains columns; a health column a run lacks (entropy, lse, dead) is taken
// from layers.csv (mean over MoE layers; dead experts summed) or left empty.
#include "ablate.h"

#include <csv.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../base/util.h"
#include "../plot.h"

// ---- CSV files, read by header name ---------------------------------------------------

typedef struct {
    char **cells; // (rows, cols) row-major, row 0 the header; NULL: a missing cell
    size_t rows, cols, cap;
    size_t col; // parser: cells read of the current row
} Table;

static void table_reserve(Table *t, size_t n) {
    if (n <= t->cap) return;
    size_t cap = t->cap * 2 > n ? t->cap * 2 : n + 64;
    char **grown = realloc(t->cells, cap * sizeof *grown);
    if (!grown) DIE("out of memory reading a CSV file");
    memset(grown + t->cap, 0, (cap - t->cap) * sizeof *grown);
    t->cells = grown;
    t->cap = cap;
}

static void table_on_cell(void *text, size_t len, void *user) {
    Table *t = user;
    if (t->rows > 0 && t->col >= t->cols) return; // a ragged row's extra cells
    size_t at = t->rows * t->cols + t->col++;
    table_reserve(t, at + 1);
    t->cells[at] = CALLOC(len + 1, 1);
    memcpy(t->cells[at], text, len);
}

static void table_on_row(int end, void *user) {
    (void)end;
    Table *t = user;
    if (t->rows == 0) t->cols = t->col;
    t->rows++;
    t->col = 0;
    table_reserve(t, t->rows * t->cols);
}

// 0, or -1 when the file is missing or is not CSV.
static int table_load(Table *t, const char *path) {
    memset(t, 0, sizeof *t);
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    struct csv_parser p;
    csv_init(&p, 0);
    char buf[1 << 16];
    size_t got;
    int bad = 0;
    while (!bad && (got = fread(buf, 1, sizeof buf, f)) > 0)
        bad = csv_parse(&p, buf, got, table_on_cell, table_on_row, t) != got;
    bad |= csv_fini(&p, table_on_cell, table_on_row, t) != 0;
    csv_free(&p);
    fclose(f);
    return bad || t->rows == 0 ? -1 : 0;
}

static void table_free(Table *t) {
    for (size_t i = 0; i < t->rows * t->cols; i++)
        free(t->cells[i]);
    free(t->cells);
    memset(t, 0, sizeof *t);
}

static int table_col(const Table *t, const char *name) {
    for (size_t c = 0; c < t->cols; c++)
        if (t->cells[c] && !strcmp(t->cells[c], name)) return (int)c;
    return -1;
}

// The number in a cell; NAN for a missing column, a missing cell or an empty one.
static double table_num(const Table *t, size_t row, int col) {
    if (col < 0) return NAN;
    const char *s = t->cells[row * t->cols + (size_t)col];
    char *end;
    double v = s ? strtod(s, &end) : NAN;
    return s && end != s ? v : NAN;
}

// A resumed run logs the steps after its checkpoint again: a row for step s replaces the
// rows logged for s and later before it. Returns how many row indices went into keep.
static size_t table_latest_rows(const Table *t, int step_col, size_t *keep) {
    size_t n = 0;
    for (size_t r = 1; r < t->rows; r++) {
        double s = table_num(t, r, step_col);
        if (isnan(s)) continue;
        while (n && table_num(t, keep[n - 1], step_col) >= s)
            n--;
        keep[n++] = r;
    }
    return n;
}

// ---- one run ------------------------------------------------------------------------

typedef struct {
    int ok;                           // metrics.csv read and holds an evaluation
    double val[DATA_MAX_DOMAINS + 1]; // the last evaluation: per domain, then the mean
    double dropped_pct;               // mean over steps
    double maxvio_mean, maxvio_final; // over all steps; over the last tenth
    double entropy, lse;              // last tenth of the steps
    double dead, tok_per_s;           // last logged value
    size_t n;                         // steps
    double *step, *maxvio;            // (n) steps completed, MaxVio
    size_t n_eval;
    double *eval_step, *eval_mean; // (n_eval) the validation curve
} RunSummary;

// Mean of the last tenth (at least one) of the non-NAN values.
static double tail_mean(const double *x, size_t n) {
    size_t w = n / 10 > 0 ? n / 10 : 1, used = 0;
    double sum = 0.0;
    for (size_t i = n; i-- > 0 && used < w;)
        if (!isnan(x[i])) sum += x[i], used++;
    return used ? sum / (double)used : NAN;
}

static double last_value(const double *x, size_t n) {
    for (size_t i = n; i-- > 0;)
        if (!isnan(x[i])) return x[i];
    return NAN;
}

// Per-step values of layers.csv's column `name` for the steps in step (n), averaged over
// layers or, with sum, added up; NAN where there is no row (or no file or column).
static void layers_series(const char *run_dir, const char *name, int sum, const double *step,
                          size_t n, double *out) {
    for (size_t i = 0; i < n; i++)
        out[i] = NAN;
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/layers.csv", run_dir);
    Table t;
    if (n == 0 || table_load(&t, path) != 0) return;
    int sc = table_col(&t, "step"), vc = table_col(&t, name);
    size_t max = (size_t)step[n - 1];
    double *acc = CALLOC(max + 1, sizeof *acc), *cnt = CALLOC(max + 1, sizeof *cnt);
    double prev = -1;
    for (size_t r = 1; sc >= 0 && vc >= 0 && r < t.rows; r++) {
        double s = table_num(&t, r, sc), v = table_num(&t, r, vc);
        if (isnan(s) || s < 0 || s > (double)max) continue;
        for (size_t k = (size_t)s; s < prev && k <= max; k++)
            acc[k] = cnt[k] = 0; // resumed
        prev = s;
        if (!isnan(v)) acc[(size_t)s] += v, cnt[(size_t)s] += 1;
    }
    for (size_t i = 0; i < n; i++) {
        size_t s = (size_t)step[i];
        if (cnt[s] > 0) out[i] = sum ? acc[s] : acc[s] / cnt[s];
    }
    free(acc);
    free(cnt);
    table_free(&t);
}

// A health column per step: metrics.csv's own, else aggregated from layers.csv.
static void health_series(const Table *t, const size_t *rows, size_t n, const char *run_dir,
                          const char *name, int sum, const double *step, double *out) {
    int c = table_col(t, name);
    if (c < 0) {
        layers_series(run_dir, name, sum, step, n, out);
        return;
    }
    for (size_t i = 0; i < n; i++)
        out[i] = table_num(t, rows[i], c);
}

static void summary_free(RunSummary *s) {
    free(s->step);
    free(s->maxvio);
    free(s->eval_step);
    free(s->eval_mean);
    memset(s, 0, sizeof *s);
}

static void summary_read(RunSummary *s, const char *run_dir, const char *const *domains,
                         int n_domains) {
    memset(s, 0, sizeof *s);
    for (int d = 0; d <= n_domains; d++)
        s->val[d] = NAN;
    s->dropped_pct = s->maxvio_mean = s->maxvio_final = s->entropy = s->lse = s->dead =
        s->tok_per_s = NAN;
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/metrics.csv", run_dir);
    Table t;
    if (table_load(&t, path) != 0) return;
    size_t *rows = CALLOC(t.rows, sizeof *rows);
    size_t n = table_latest_rows(&t, table_col(&t, "step"), rows);
    int c_step = table_col(&t, "step"), c_drop = table_col(&t, "dropped");
    int c_vio = table_col(&t, "maxvio"), c_mean = table_col(&t, "val_mean");
    s->n = n;
    s->step = CALLOC(n, sizeof *s->step);
    s->maxvio = CALLOC(n, sizeof *s->maxvio);
    s->eval_step = CALLOC(n, sizeof *s->eval_step);
    s->eval_mean = CALLOC(n, sizeof *s->eval_mean);
    double *x = CALLOC(n, sizeof *x), drop = 0.0, vio = 0.0;
    size_t last_eval = 0;
    for (size_t i = 0; i < n; i++) {
        s->step[i] = table_num(&t, rows[i], c_step) + 1; // the row of step s logs s+1 done
        s->maxvio[i] = table_num(&t, rows[i], c_vio);
        drop += table_num(&t, rows[i], c_drop) / (double)n;
        vio += s->maxvio[i] / (double)n;
        double v = table_num(&t, rows[i], c_mean);
        if (isnan(v)) continue;
        s->eval_step[s->n_eval] = s->step[i];
        s->eval_mean[s->n_eval++] = v;
        last_eval = rows[i];
    }
    s->dropped_pct = 100.0 * drop;
    s->maxvio_mean = vio;
    s->maxvio_final = tail_mean(s->maxvio, n);
    char col[DATA_NAME_MAX + 8];
    for (int d = 0; d < n_domains; d++) {
        snprintf(col, sizeof col, "val_%s", domains[d]);
        s->val[d] = s->n_eval ? table_num(&t, last_eval, table_col(&t, col)) : NAN;
    }
    s->val[n_domains] = s->n_eval ? s->eval_mean[s->n_eval - 1] : NAN;
    health_series(&t, rows, n, run_dir, "entropy", 0, s->step, x);
    s->entropy = tail_mean(x, n);
    health_series(&t, rows, n, run_dir, "lse", 0, s->step, x);
    s->lse = tail_mean(x, n);
    health_series(&t, rows, n, run_dir, "dead", 1, s->step, x);
    s->dead = last_value(x, n);
    s->tok_per_s = n ? table_num(&t, rows[n - 1], table_col(&t, "tok_per_s")) : NAN;
    s->ok = s->n_eval > 0;
    free(x);
    free(rows);
    table_free(&t);
}

double ablate_final_val(const char *run_dir) {
    RunSummary s;
    summary_read(&s, run_dir, NULL, 0);
    double v = s.ok ? s.val[0] : NAN;
    summary_free(&s);
    return v;
}

// ---- ablation.csv and ablation.md -------------------------------------------------

static void csv_text(FILE *f, const char *text, int first) {
    if (!first) fputc(',', f);
    csv_fwrite(f, text, strlen(text));
}

static void csv_num(FILE *f, double x, const char *fmt) {
    fputc(',', f);
    if (!isnan(x)) fprintf(f, fmt, x);
}

static const char *status_of(const AblateVariant *v, const RunSummary *s) {
    return v->failed ? "failed" : s->ok ? "ok" : "no metrics";
}

static void write_csv(const char *path, const char *const *domains, int nd,
                      const AblateVariant *v, const RunSummary *s, int n) {
    FILE *f = fopen(path, "w");
    if (!f) FAIL("%s: cannot write", path);
    csv_text(f, "variant", 1);
    char col[DATA_NAME_MAX + 8];
    for (int d = 0; d < nd; d++) {
        snprintf(col, sizeof col, "val_%s", domains[d]);
        csv_text(f, col, 0);
    }
    const char *cols[] = {"val_mean", "dropped_pct", "maxvio_mean", "maxvio_final",
                          "entropy",  "lse",         "dead",        "tok_per_s",
                          "status",   "overrides"};
    for (size_t i = 0; i < sizeof cols / sizeof *cols; i++)
        csv_text(f, cols[i], 0);
    fputc('\n', f);
    for (int i = 0; i < n; i++) {
        csv_text(f, v[i].name, 1);
        for (int d = 0; d <= nd; d++)
            csv_num(f, s[i].val[d], "%.4f");
        csv_num(f, s[i].dropped_pct, "%.3f");
        csv_num(f, s[i].maxvio_mean, "%.4f");
        csv_num(f, s[i].maxvio_final, "%.4f");
        csv_num(f, s[i].entropy, "%.4f");
        csv_num(f, s[i].lse, "%.4f");
        csv_num(f, s[i].dead, "%g");
        csv_num(f, s[i].tok_per_s, "%.0f");
        csv_text(f, status_of(&v[i], &s[i]), 0);
        char words[4096] = "";
        for (int w = 0; w < v[i].n_words; w++)
            snprintf(words + strlen(words), sizeof words - strlen(words), "%s%s", w ? " " : "",
                     v[i].words[w]);
        csv_text(f, words, 0);
        fputc('\n', f);
    }
    if (fclose(f) != 0) FAIL("%s: cannot write", path);
}

static void md_num(FILE *f, double x, const char *fmt) {
    fputs(" | ", f);
    if (isnan(x))
        fputs("-", f);
    else
        fprintf(f, fmt, x);
}

// "model name" of /proc/cpuinfo, or the empty string.
static void cpu_model(char *out, size_t n) {
    out[0] = '\0';
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (!out[0] && fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (!strncmp(line, "model name", 10) && colon)
            snprintf(out, n, "%.*s", (int)strcspn(colon + 2, "\n"), colon + 2);
    }
    fclose(f);
}

static void write_md_header(FILE *f, const char *grid, const RunConfig *base, int n,
                            const char *note) {
    const TrainConfig *tc = &base->train;
    double tokens = (double)tc->steps * tc->batch_size * tc->grad_accum * base->model.seq_len;
    char cpu[256], date[64];
    cpu_model(cpu, sizeof cpu);
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    fprintf(f,
            "# Ablation: %s\n\n"
            "%d variants, each %d steps x %d sequences x %d tokens x %d accum (%.2fM tokens), "
            "seed %d (the same data order and weight init). %s, on %s (%ld cores), %s.\n\n",
            grid, n, tc->steps, tc->batch_size, base->model.seq_len, tc->grad_accum,
            tokens / 1e6, tc->seed, note, cpu[0] ? cpu : "an unknown CPU",
            sysconf(_SC_NPROCESSORS_ONLN), date);
}

static void write_md(const char *path, const char *grid, const RunConfig *base,
                     const char *const *domains, int nd, const AblateVariant *v,
                     const RunSummary *s, int n, const char *note) {
    FILE *f = fopen(path, "w");
    if (!f) FAIL("%s: cannot write", path);
    write_md_header(f, grid, base, n, note);
    fputs("| variant", f);
    for (int d = 0; d < nd; d++)
        fprintf(f, " | %s", domains[d]);
    fputs(" | val mean | dropped % | MaxVio mean | MaxVio final | entropy | lse | dead | tok/s "
          "|\n"
          "|---",
          f);
    for (int d = 0; d < nd + 8; d++)
        fputs("|---:", f);
    fputs("|\n", f);
    for (int i = 0; i < n; i++) {
        fprintf(f, "| %s%s", v[i].name,
                s[i].ok       ? ""
                : v[i].failed ? " (failed)"
                              : " (no metrics)");
        for (int d = 0; d <= nd; d++)
            md_num(f, s[i].val[d], "%.4f");
        md_num(f, s[i].dropped_pct, "%.2f");
        md_num(f, s[i].maxvio_mean, "%.3f");
        md_num(f, s[i].maxvio_final, "%.3f");
        md_num(f, s[i].entropy, "%.3f");
        md_num(f, s[i].lse, "%.3f");
        md_num(f, s[i].dead, "%g");
        md_num(f, s[i].tok_per_s, "%.0f");
        fputs(" |\n", f);
    }
    fputs("\nValidation loss: cross-entropy (nats/token) at the last step on each domain's "
          "validation windows. dropped %: assignments dropped by capacity, mean over steps. "
          "MaxVio: (max load - mean load) / mean load, mean over MoE layers; mean over all "
          "steps, and over the last tenth of them (final). entropy, lse: router entropy and "
          "mean router logsumexp, last tenth of the steps. dead: experts, over all MoE layers, "
          "that got no token between the last two evaluations. tok/s: training throughput. "
          "`-`: not logged.\n\n"
          "Variants (overrides of base.ini):\n\n",
          f);
    for (int i = 0; i < n; i++) {
        fprintf(f, "- `%s`:", v[i].name);
        for (int w = 0; w < v[i].n_words; w++)
            fprintf(f, " `%s`", v[i].words[w]);
        fputs(v[i].n_words ? "\n" : " the base config\n", f);
    }
    if (fclose(f) != 0) FAIL("%s: cannot write", path);
}

// ---- figures ------------------------------------------------------------------------

// One gnuplot data block per plotted variant: "x y" rows, blocks two blank lines apart.
static void write_curves(const char *path, const RunSummary *s, int n, int maxvio, int window) {
    FILE *f = fopen(path, "w");
    if (!f) FAIL("%s: cannot write", path);
    for (int i = 0; i < n; i++) {
        if (!s[i].ok) continue;
        if (!maxvio)
            for (size_t e = 0; e < s[i].n_eval; e++)
                fprintf(f, "%g %.6f\n", s[i].eval_step[e], s[i].eval_mean[e]);
        for (size_t k = 0; maxvio && k < s[i].n; k++) {
            size_t from = k + 1 >= (size_t)window ? k + 1 - (size_t)window : 0;
            double sum = 0.0;
            for (size_t j = from; j <= k; j++)
                sum += s[i].maxvio[j];
            fprintf(f, "%g %.6f\n", s[i].step[k], sum / (double)(k + 1 - from));
        }
        fputs("\n\n", f);
    }
    if (fclose(f) != 0) FAIL("%s: cannot write", path);
}

static void write_plot_lines(FILE *f, const char *data, const char *with,
                             const AblateVariant *v, const RunSummary *s, int n) {
    int block = 0;
    fputs("plot", f);
    for (int i = 0; i < n; i++) {
        if (!s[i].ok) continue;
        // 8 colours, then the same colours dashed: up to 16 variants stay distinguishable.
        fprintf(f, "%s \\\n  '%s' index %d using 1:2 with %s lw 2 lc %d dt %d title '%s'",
                block ? "," : "", data, block, with, block % 8 + 1, block / 8 % 4 + 1,
                v[i].name);
        block++;
    }
    fputc('\n', f);
}

static void write_plots(const char *out, const char *grid, const AblateVariant *v,
                        const RunSummary *s, int n) {
    size_t steps = 0;
    int plotted = 0;
    for (int i = 0; i < n; i++) {
        plotted += s[i].ok;
        if (s[i].n > steps) steps = s[i].n;
    }
    if (!plotted) return;
    int window = steps / 50 > 1 ? (int)(steps / 50) : 1;
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/val.dat", out);
    write_curves(path, s, n, 0, window);
    snprintf(path, sizeof path, "%s/maxvio.dat", out);
    write_curves(path, s, n, 1, window);
    snprintf(path, sizeof path, "%s/plots.gp", out);
    FILE *f = fopen(path, "w");
    if (!f) FAIL("%s: cannot write", path);
    fprintf(f,
            "# moe ablate %s: validation loss and MaxVio over steps, one line per variant.\n"
            "# Render again with: cd %s && gnuplot plots.gp\n"
            "set terminal pngcairo size 1200,650 noenhanced font ',10'\n"
            "set grid\nset key outside right top\nset xlabel 'step'\n"
            "set output 'val_loss.png'\n"
            "set title 'validation loss, mean over domains (nats/token): %s'\n"
            "set ylabel 'loss'\n",
            grid, out, grid);
    write_plot_lines(f, "val.dat", "linespoints", v, s, n);
    fprintf(f,
            "set output 'maxvio.png'\n"
            "set title 'MaxVio, mean over MoE layers, moving average over %d steps: %s'\n"
            "set ylabel 'MaxVio'\n",
            window, grid);
    write_plot_lines(f, "maxvio.dat", "lines", v, s, n);
    if (fclose(f) != 0) FAIL("%s: cannot write", path);
    if (!plot_available())
        plot_warn_missing("val_loss.png and maxvio.png");
    else if (plot_render(out, "plots.gp") == 0)
        printf("ablate: wrote %s/val_loss.png and %s/maxvio.png\n", out, out);
}

void ablate_report(const char *out, const char *grid_path, const RunConfig *base,
                   const AblateVariant *v, int n, const char *note) {
    const char *domains[DATA_MAX_DOMAINS];
    int nd = base->data.n_domains;
    for (int d = 0; d < nd; d++)
        domains[d] = base->data.domains[d].name;
    RunSummary *s = CALLOC((size_t)n, sizeof *s);
    char path[RUN_FILE_MAX];
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%s", out, v[i].name);
        summary_read(&s[i], path, domains, nd);
    }
    snprintf(path, sizeof path, "%s/ablation.csv", out);
    write_csv(path, domains, nd, v, s, n);
    snprintf(path, sizeof path, "%s/ablation.md", out);
    write_md(path, grid_path, base, domains, nd, v, s, n, note);
    printf("ablate: wrote %s/ablation.csv and %s/ablation.md\n", out, out);
    write_plots(out, grid_path, v, s, n);
    for (int i = 0; i < n; i++)
        summary_free(&s[i]);
    free(s);
}
