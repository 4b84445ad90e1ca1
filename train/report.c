#include "report.h"

#include <csv.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "config.h"
#include "html.h"
#include "plot.h"

// The load heatmap keeps at most this many step columns; longer runs average bins.
#define REPORT_LOAD_COLUMNS 1000

// ---- numeric CSV files ------------------------------------------------------------------

// A CSV file of numbers under a header row: empty cells are NAN.
typedef struct {
    char **header; // (cols)
    double *v;     // (rows, cols)
    size_t rows, cols, cap;
    size_t col; // the cell being read in the current record
    long line;  // 1-based record number, for errors
    char path[RUN_FILE_MAX];
    char *err;
    size_t err_n;
    int failed;
} Table;

static void table_cell(void *s, size_t len, void *data) {
    Table *t = data;
    if (t->failed) return;
    char text[128];
    snprintf(text, sizeof text, "%.*s", (int)(len < 127 ? len : 127), (const char *)s);
    if (t->line == 1) {
        t->header = realloc(t->header, (t->cols + 1) * sizeof *t->header);
        if (!t->header || !(t->header[t->cols++] = strdup(text))) DIE("out of memory");
        return;
    }
    if (t->col >= t->cols) {
        t->failed = snprintf(t->err, t->err_n,
                             "%s line %ld: more cells than the %zu of the "
                             "header",
                             t->path, t->line, t->cols) > 0;
        return;
    }
    if (t->rows == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 256;
        if (!(t->v = realloc(t->v, t->cap * t->cols * sizeof *t->v))) DIE("out of memory");
    }
    double *cell = &t->v[t->rows * t->cols + t->col++];
    *cell = NAN;
    if (len && util_parse_number(text, 0, cell) != 0)
        t->failed = snprintf(t->err, t->err_n,
                             "%s line %ld, column %s: '%s' is not a "
                             "number",
                             t->path, t->line, t->header[t->col - 1], text) > 0;
}

static void table_row(int c, void *data) {
    (void)c;
    Table *t = data;
    if (t->failed) return;
    if (t->line++ > 1) {
        if (t->col != t->cols)
            t->failed = snprintf(t->err, t->err_n,
                                 "%s line %ld: %zu cells, the header has "
                                 "%zu",
                                 t->path, t->line - 1, t->col, t->cols) > 0;
        t->rows++;
    }
    t->col = 0;
}

static void table_free(Table *t) {
    for (size_t c = 0; c < t->cols; c++)
        free(t->header[c]);
    free(t->header);
    free(t->v);
    memset(t, 0, sizeof *t);
}

static int table_read(Table *t, const char *dir, const char *name, char *err, size_t n) {
    *t = (Table){.line = 1, .err = err, .err_n = n};
    snprintf(t->path, sizeof t->path, "%s/%s", dir, name);
    const char *path = t->path;
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, n, "%s: cannot read: %s (is %s a run directory?)", path, strerror(errno),
                 dir);
        return -1;
    }
    struct csv_parser p;
    csv_init(&p, CSV_APPEND_NULL);
    char buf[65536];
    size_t got;
    while (!t->failed && (got = fread(buf, 1, sizeof buf, f)) > 0)
        if (csv_parse(&p, buf, got, table_cell, table_row, t) != got)
            t->failed = snprintf(err, n, "%s: %s", path, csv_strerror(csv_error(&p))) > 0;
    if (!t->failed) csv_fini(&p, table_cell, table_row, t);
    csv_free(&p);
    fclose(f);
    if (!t->failed && t->cols == 0) t->failed = snprintf(err, n, "%s: empty file", path) > 0;
    int failed = t->failed;
    if (failed) table_free(t);
    return failed ? -1 : 0;
}

// The 0-based column named name, or -1.
static int table_col(const Table *t, const char *name) {
    for (size_t c = 0; c < t->cols; c++)
        if (!strcmp(t->header[c], name)) return (int)c;
    return -1;
}

static double table_at(const Table *t, size_t row, int col) {
    return col < 0 ? NAN : t->v[row * t->cols + (size_t)col];
}

// ---- figures ----------------------------------------------------------------------------

typedef struct {
    const char *dir;
    Table metrics, experts;
    int *val_cols; // metrics columns val_<domain> and val_mean, (n_val)
    int n_val;
    int layers, experts_n; // MoE layers and experts in experts.csv
    int *layer_ids;        // (layers) the model layer of each load.dat block
    long load_steps;       // step columns of load.dat (0: no heatmap)
    double load_max;       // the largest share in load.dat: one colour scale for all layers
    char load_why[256];    // why there is no heatmap
} Report;

// 1 when column c holds a number: gnuplot stops a script at a plot with no valid point.
static int has_values(const Table *t, int c) {
    for (size_t i = 0; c >= 0 && i < t->rows; i++)
        if (!isnan(table_at(t, i, c))) return 1;
    return 0;
}

// One curve of metrics.csv; returns 1 when plotted (the column has values).
static int plot_metric(FILE *f, const Report *r, const char *col, const char *title,
                       const char *style, int first) {
    int c = table_col(&r->metrics, col);
    if (!has_values(&r->metrics, c)) return 0;
    fprintf(f, "%s'metrics.csv' using ($1+1):%d with %s title ", first ? "plot " : ", ", c + 1,
            style);
    plot_quote(f, title);
    return 1;
}

static void plot_panel(FILE *f, const Report *r, const char *col, const char *title,
                       const char *style) {
    fputs("set title ", f);
    plot_quote(f, title);
    fputc('\n', f);
    plot_metric(f, r, col, col, style, 1);
    fputc('\n', f);
}

static void write_loss_figures(FILE *f, const Report *r) {
    plot_begin_figure(f, "loss", 900, 420);
    fputs("set title 'training loss (per step) and validation loss (per domain, on evaluation "
          "steps)'\nset ylabel 'nats per token'\n",
          f);
    int n = plot_metric(f, r, "loss", "training loss (total)", "lines lw 1.5", 1);
    n += plot_metric(f, r, "ce", "training cross-entropy", "lines", !n);
    for (int i = 0; i < r->n_val; i++)
        n += plot_metric(f, r, r->metrics.header[r->val_cols[i]],
                         r->metrics.header[r->val_cols[i]], "linespoints pt 7 ps 0.6 lw 1.5", !n);
    fputs("\nset ylabel ''\n", f);
    plot_begin_figure(f, "lr", 900, 300);
    plot_panel(f, r, "lr", "learning rate", "lines lw 1.5");
    plot_begin_figure(f, "aux", 900, 520);
    fputs("set multiplot layout 2,2\nunset key\n", f);
    plot_panel(f, r, "lb", "load-balancing loss (unscaled)", "lines");
    plot_panel(f, r, "z", "router z-loss (unscaled)", "lines");
    plot_panel(f, r, "importance", "importance loss (unscaled)", "lines");
    plot_panel(f, r, "load", "load loss (unscaled)", "lines");
    fputs("unset multiplot\n", f);
    plot_begin_figure(f, "routing", 900, 520);
    fputs("set multiplot layout 2,2\n", f);
    plot_panel(f, r, "dropped", "fraction of assignments dropped by capacity", "lines");
    plot_panel(f, r, "maxvio", "MaxVio ((max load - mean) / mean)", "lines");
    plot_panel(f, r, "entropy", "router entropy (nats)", "lines");
    plot_panel(f, r, "dead", "dead experts (since the previous evaluation)",
               "linespoints pt 7 ps 0.6");
    fputs("unset multiplot\nset key\n", f);
}

// experts.csv's fraction column as layer blocks of "step expert fraction" rows, steps
// averaged in bins when the run is longer than REPORT_LOAD_COLUMNS.
static int write_load_data(Report *r, char *err, size_t n) {
    const Table *t = &r->experts;
    int cs = table_col(t, "step"), cl = table_col(t, "layer"), ce = table_col(t, "expert"),
        cf = table_col(t, "fraction");
    if (cs < 0 || cl < 0 || ce < 0 || cf < 0)
        return snprintf(err, n,
                        "%s/experts.csv: needs the columns step, layer, expert, "
                        "fraction",
                        r->dir),
               -1;
    double max_step = 0;
    int max_layer = -1, max_expert = -1;
    for (size_t i = 0; i < t->rows; i++) {
        max_step = fmax(max_step, table_at(t, i, cs));
        max_layer = (int)fmax(max_layer, table_at(t, i, cl));
        max_expert = (int)fmax(max_expert, table_at(t, i, ce));
    }
    long steps = t->rows ? (long)max_step + 1 : 0;
    if (steps < 2 || max_expert < 1) {
        snprintf(r->load_why, sizeof r->load_why,
                 "the heatmap needs at least 2 steps and 2 "
                 "experts (experts.csv has %ld steps)",
                 steps);
        return 0;
    }
    long bin = (long)util_ceil_div((size_t)steps, REPORT_LOAD_COLUMNS);
    long cols = (steps + bin - 1) / bin;
    int L = max_layer + 1, E = max_expert + 1;
    double *sum = CALLOC((size_t)L * cols * E, sizeof *sum); // (L, cols, E)
    int *seen = CALLOC((size_t)L, sizeof *seen);   // (L) 1: a MoE layer; then block -> layer
    long *cnt = CALLOC((size_t)cols, sizeof *cnt); // steps per bin
    for (size_t i = 0; i < t->rows; i++) {
        long s = (long)table_at(t, i, cs);
        int l = (int)table_at(t, i, cl), e = (int)table_at(t, i, ce);
        if (s < 0 || l < 0 || e < 0) continue;
        sum[((size_t)l * cols + s / bin) * E + e] += table_at(t, i, cf);
        seen[l] = 1;
        if (l == (int)table_at(t, 0, cl) && e == 0) cnt[s / bin]++;
    }
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/load.dat", r->dir);
    FILE *f = fopen(path, "w");
    if (!f) return snprintf(err, n, "%s: cannot write: %s", path, strerror(errno)), -1;
    fprintf(
        f,
        "# expert load: step (1-based, first of its bin of %ld) expert fraction; one block per "
        "MoE layer\n",
        bin);
    r->layers = 0;
    for (int l = 0; l < L; l++) {
        if (!seen[l]) continue;
        fprintf(f, "# layer %d\n", l);
        for (long c = 0; c < cols; c++) {
            for (int e = 0; e < E; e++) {
                double x = cnt[c] ? sum[((size_t)l * cols + c) * E + e] / (double)cnt[c] : 0.0;
                r->load_max = fmax(r->load_max, x);
                fprintf(f, "%ld %d %.6f\n", c * bin + 1, e, x);
            }
            fputc('\n', f);
        }
        fputc('\n', f);
        seen[r->layers++] = l; // block index -> layer
    }
    int ok = fclose(f) == 0;
    r->experts_n = E;
    r->load_steps = cols > 1 ? cols : 0;
    if (cols < 2)
        snprintf(r->load_why, sizeof r->load_why, "the heatmap needs at least 2 steps");
    r->layer_ids = seen;
    free(sum);
    free(cnt);
    if (!ok) return snprintf(err, n, "%s: cannot write (disk full?)", path), -1;
    return 0;
}

static void write_load_figure(FILE *f, const Report *r) {
    if (!r->load_steps) return;
    plot_begin_figure(f, "load", 900, 60 + 170 * r->layers);
    fprintf(f,
            "set multiplot layout %d,1 title 'share of each MoE layer''s assignments per "
            "expert over steps'\n"
            "set palette defined (0 '#ffffff', 0.5 '#6baed6', 1 '#08306b')\n"
            "set cbrange [0:%g]\nset yrange [-0.5:%d.5]\nset ylabel 'expert'\n"
            "set autoscale xfix\nset xlabel 'step'\nunset key\n%s",
            r->layers, r->load_max > 0 ? r->load_max : 1.0, r->experts_n - 1,
            r->experts_n <= 16 ? "set ytics 1\n" : "");
    for (int i = 0; i < r->layers; i++)
        fprintf(f, "set title 'layer %d'\nplot 'load.dat' index %d using 1:2:3 with image\n",
                r->layer_ids[i], i);
    fputs("unset multiplot\n", f);
}

// Line colours a colour-blind reader tells apart (Okabe and Ito 2008), black last.
static const char *okabe_ito =
    "set linetype 1 lc rgb '#0072B2'\nset linetype 2 lc rgb '#D55E00'\n"
    "set linetype 3 lc rgb '#009E73'\nset linetype 4 lc rgb '#CC79A7'\n"
    "set linetype 5 lc rgb '#E69F00'\nset linetype 6 lc rgb '#56B4E9'\n"
    "set linetype 7 lc rgb '#F0E442'\nset linetype 8 lc rgb '#000000'\nset linetype cycle 8\n";

// report.gp; returns "" in why, or why the figures are missing.
static void draw_figures(Report *r, char *why, size_t n) {
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/report.gp", r->dir);
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(why, n, "%s: cannot write: %s", path, strerror(errno));
        return;
    }
    fprintf(f,
            "# moe report: the figures of report.html. Render again with: cd %s && "
            "gnuplot report.gp\nset datafile separator comma\nset xlabel 'step'\n"
            "set grid\nset key top right\n%s",
            r->dir, okabe_ito);
    write_loss_figures(f, r);
    fputs("set datafile separator whitespace\nunset grid\n", f);
    write_load_figure(f, r);
    fputs("unset output\n", f);
    if (fclose(f) != 0) {
        snprintf(why, n, "%s: cannot write (disk full?)", path);
        return;
    }
    why[0] = '\0';
    plot_render_figures(r->dir, "report.gp", why, n);
}

// ---- the page ---------------------------------------------------------------------------

static void write_number(FILE *f, double x) {
    if (isnan(x))
        fputs("<td>-</td>", f);
    else
        fprintf(f, "<td>%.6g</td>", x);
}

// The last metrics row, and the last row with validation losses.
static void write_summary(FILE *f, const Report *r) {
    const Table *t = &r->metrics;
    long last = (long)t->rows - 1, eval = -1, best = -1;
    int mean = table_col(t, "val_mean");
    for (long i = 0; i <= last; i++) {
        double v = table_at(t, (size_t)i, mean);
        if (isnan(v)) continue;
        eval = i;
        if (best < 0 || v < table_at(t, (size_t)best, mean)) best = i;
    }
    fputs("<section id=\"summary\">\n<h2>Final numbers</h2>\n", f);
    if (last < 0) {
        fputs("<p>metrics.csv has no steps yet.</p>\n</section>\n", f);
        return;
    }
    fprintf(f, "<table>\n<tr><th>after step</th><td>%.0f</td></tr>\n",
            table_at(t, (size_t)last, 0) + 1);
    static const char *cols[] = {"loss",    "ce",        "lb",       "z",
                                 "lr",      "grad_norm", "dropped",  "maxvio",
                                 "entropy", "tok_per_s", "elapsed_s"};
    for (size_t i = 0; i < sizeof cols / sizeof *cols; i++) {
        if (table_col(t, cols[i]) < 0) continue;
        fprintf(f, "<tr><th>%s</th>", cols[i]);
        write_number(f, table_at(t, (size_t)last, table_col(t, cols[i])));
        fputs("</tr>\n", f);
    }
    fputs("</table>\n", f);
    if (eval < 0) {
        fputs("<p>No evaluation yet.</p>\n</section>\n", f);
        return;
    }
    fprintf(f,
            "<table>\n<tr><th>validation loss</th><th>after step %.0f</th>"
            "<th>best (after step %.0f)</th></tr>\n",
            table_at(t, (size_t)eval, 0) + 1, table_at(t, (size_t)best, 0) + 1);
    for (int i = 0; i < r->n_val; i++) {
        fputs("<tr><th>", f);
        html_text(f, t->header[r->val_cols[i]]);
        fputs("</th>", f);
        write_number(f, table_at(t, (size_t)eval, r->val_cols[i]));
        write_number(f, table_at(t, (size_t)best, r->val_cols[i]));
        fputs("</tr>\n", f);
    }
    fputs("<tr><th>dead experts</th>", f);
    write_number(f, table_at(t, (size_t)eval, table_col(t, "dead")));
    fputs("<td></td></tr>\n</table>\n</section>\n", f);
}

// A text file of the run as <pre>, or a line saying it is missing.
static void write_text_file(FILE *f, const char *dir, const char *name, const char *missing) {
    char path[RUN_FILE_MAX], line[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *in = fopen(path, "r");
    if (!in) {
        fprintf(f, "<p class=\"note\">%s: %s</p>\n", name, missing);
        return;
    }
    fputs("<pre>", f);
    while (fgets(line, sizeof line, in))
        html_text(f, line);
    fputs("</pre>\n", f);
    fclose(in);
}

static void write_section(FILE *f, const Report *r, const char *id, const char *heading,
                          const char *caption, const char *why) {
    fprintf(f, "<section id=\"%s\">\n<h2>%s</h2>\n", id, heading);
    html_figure(f, r->dir, id, caption, why);
    fputs("</section>\n", f);
}

static void write_page(FILE *f, const Report *r, const char *why) {
    const char *name = strrchr(r->dir, '/');
    char title[RUN_FILE_MAX];
    snprintf(title, sizeof title, "moe run report: %s", name && name[1] ? name + 1 : r->dir);
    html_begin(f, title, "");
    write_summary(f, r);
    fputs("<section id=\"startup\">\n<h2>Start-up: model, trainable tensors, memory "
          "plan</h2>\n",
          f);
    write_text_file(f, r->dir, "startup.txt",
                    "not found (written by moe train since the run "
                    "report exists)");
    fputs("</section>\n", f);
    write_section(f, r, "loss", "Loss",
                  "training loss per step; validation loss per domain "
                  "and their mean on evaluation steps",
                  why);
    write_section(f, r, "lr", "Learning rate", "learning rate per step", why);
    write_section(f, r, "aux", "Aux losses",
                  "auxiliary losses per step, means over MoE "
                  "layers, before their coefficients",
                  why);
    write_section(f, r, "routing", "Routing",
                  "dropped fraction, MaxVio and router entropy "
                  "per step (means over MoE layers); dead experts on evaluation steps",
                  why);
    write_section(f, r, "load", "Expert load per layer",
                  "share of each layer's assignments "
                  "per expert (experts.csv fraction), step x expert",
                  why[0] ? why : r->load_why);
    fputs("<section id=\"config\">\n<h2>Configuration</h2>\n<details><summary>config.ini "
          "(every key)</summary>\n",
          f);
    write_text_file(f, r->dir, "config.ini", "not found");
    fputs("</details>\n</section>\n", f);
    html_end(f);
}

static int find_val_cols(Report *r) {
    const Table *t = &r->metrics;
    r->val_cols = CALLOC(t->cols + 1, sizeof *r->val_cols);
    for (size_t c = 0; c < t->cols; c++)
        if (!strncmp(t->header[c], "val_", 4)) r->val_cols[r->n_val++] = (int)c;
    return table_col(t, "step") == 0 && table_col(t, "loss") > 0;
}

static int write_html(const Report *r, const char *why, char *err, size_t n) {
    char path[RUN_FILE_MAX], tmp[RUN_FILE_MAX + 8];
    snprintf(path, sizeof path, "%s/report.html", r->dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return snprintf(err, n, "%s: cannot write: %s", tmp, strerror(errno)), -1;
    write_page(f, r, why);
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        snprintf(err, n, "%s: cannot write: %s", path, strerror(errno));
        remove(tmp);
        return -1;
    }
    return 0;
}

int report_write_run(const char *run_dir, char *msg, size_t n) {
    Report r = {.dir = run_dir};
    char why[RUN_FILE_MAX + 512] = "";
    if (table_read(&r.metrics, run_dir, "metrics.csv", msg, n) != 0) return -1;
    int rc = -1;
    if (!find_val_cols(&r))
        snprintf(msg, n,
                 "%s/metrics.csv: not moe's metrics (its header starts step, lr, "
                 "loss)",
                 run_dir);
    else if (table_read(&r.experts, run_dir, "experts.csv", msg, n) == 0 &&
             write_load_data(&r, msg, n) == 0) {
        if (r.metrics.rows == 0) snprintf(why, sizeof why, "metrics.csv has no steps yet");
        else draw_figures(&r, why, sizeof why);
        rc = write_html(&r, why, msg, n);
    }
    if (rc == 0)
        snprintf(msg, n, "report written to %s/report.html%s%s", run_dir,
                 why[0] ? "; figures not drawn: " : "", why);
    table_free(&r.metrics);
    table_free(&r.experts);
    free(r.val_cols);
    free(r.layer_ids);
    return rc;
}

void report_after_run(const char *run_dir) {
    char msg[3 * RUN_FILE_MAX];
    fflush(stdout);
    if (report_write_run(run_dir, msg, sizeof msg) == 0)
        printf("%s\n", msg);
    else
        fprintf(stderr, "moe: warning: report.html not written: %s\n", msg);
}
