#include "metrics.h"

#include <csv.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../base/util.h"

// Dies naming the file when anything written to it so far failed (a full disk, a file
// size limit); the rows reach the file here, so a crash loses at most the current step.
static void csv_flush(CsvFile *c) {
    if (fflush(c->f) == 0 && !ferror(c->f)) return;
    FAIL("%s: cannot write: %s (checkpoints already saved are intact)", c->path,
         strerror(errno ? errno : EIO));
}

// The byte offset after the header and every complete row of a step below from_step.
// Rows are in step order, so the first row at from_step or later, or a row without its
// newline, ends what is kept.
static long kept_bytes(FILE *f, long from_step) {
    char *line = NULL;
    size_t cap = 0;
    long kept = 0;
    ssize_t n;
    for (int row = 0; (n = getline(&line, &cap, f)) > 0; row++) {
        if (line[n - 1] != '\n') break;
        char *end;
        long step = strtol(line, &end, 10);
        int data = end != line && *end == ',';
        if (row > 0 && (!data || step >= from_step)) break;
        if (row == 0 && data) break;   // no header: the file is rewritten whole
        kept += n;
    }
    free(line);
    return kept;
}

// Cuts path down to kept_bytes; returns the size left (0 for a missing file). Devices
// and pipes are left alone.
static long csv_cut(const char *path, long from_step) {
    struct stat sb;
    if (stat(path, &sb) != 0) return 0;
    if (!S_ISREG(sb.st_mode)) return 1;
    FILE *f = fopen(path, "r");
    if (!f) FAIL("%s: cannot read: %s", path, strerror(errno));
    long kept = kept_bytes(f, from_step);
    fclose(f);
    if (kept < sb.st_size && truncate(path, kept) != 0)
        FAIL("%s: cannot cut it back to step %ld: %s", path, from_step, strerror(errno));
    return kept;
}

// A header cell through libcsv, which quotes whatever a domain name contains.
static void csv_cell(CsvFile *c, const char *text, int first) {
    if (!first) fputc(',', c->f);
    if (csv_fwrite(c->f, text, strlen(text)) != 0) csv_flush(c);
}

static void csv_header(CsvFile *c, const char **cols, size_t n) {
    for (size_t i = 0; i < n; i++) csv_cell(c, cols[i], i == 0);
    fputc('\n', c->f);
}

// Opens dir/name for rows from from_step on; *fresh says whether it needs its header.
static void csv_open(CsvFile *c, const char *dir, const char *name, long from_step,
                     int *fresh) {
    snprintf(c->path, sizeof c->path, "%s/%s", dir, name);
    *fresh = csv_cut(c->path, from_step) == 0;
    c->f = fopen(c->path, "a");
    if (!c->f) FAIL("%s: cannot create (check that the directory is writable)", c->path);
}

static void metrics_header(CsvFile *c, const char **domains, int n_domains) {
    const char *cols[] = {"step", "lr", "loss", "ce", "lb", "z", "importance", "load",
                          "grad_norm", "dropped", "maxvio", "entropy", "lse", "tok_per_s",
                          "elapsed_s", "skipped", "dead"};
    for (size_t i = 0; i < sizeof cols / sizeof *cols; i++) csv_cell(c, cols[i], i == 0);
    char name[256];
    for (int d = 0; d < n_domains; d++) {
        snprintf(name, sizeof name, "val_%s", domains[d]);
        csv_cell(c, name, 0);
    }
    csv_cell(c, "val_mean", 0);
    fputc('\n', c->f);
}

void metrics_open(Metrics *mt, const char *run_dir, const char **domains, int n_domains,
                  int log_every, long from_step) {
    memset(mt, 0, sizeof *mt);
    mt->tty = isatty(STDOUT_FILENO);
    mt->log_every = log_every;
    mt->n_domains = n_domains;
    errno = 0;
    int fresh;
    csv_open(&mt->metrics, run_dir, "metrics.csv", from_step, &fresh);
    if (fresh) metrics_header(&mt->metrics, domains, n_domains);
    csv_flush(&mt->metrics);
    csv_open(&mt->experts, run_dir, "experts.csv", from_step, &fresh);
    const char *ecols[] = {"step", "layer", "expert", "tokens", "fraction", "mean_gate", "dropped"};
    if (fresh) csv_header(&mt->experts, ecols, sizeof ecols / sizeof *ecols);
    csv_flush(&mt->experts);
    csv_open(&mt->layers, run_dir, "layers.csv", from_step, &fresh);
    const char *lcols[] = {"step", "layer", "dropped", "maxvio", "entropy", "lse", "dead"};
    if (fresh) csv_header(&mt->layers, lcols, sizeof lcols / sizeof *lcols);
    csv_flush(&mt->layers);
}

static void csv_close(CsvFile *c) {
    if (!c->f) return;
    csv_flush(c);
    if (fclose(c->f) != 0) {
        c->f = NULL;
        FAIL("%s: cannot write: %s (checkpoints already saved are intact)", c->path,
             strerror(errno));
    }
    c->f = NULL;
}

void metrics_close(Metrics *mt) {
    metrics_break_line(mt);
    csv_close(&mt->metrics);
    csv_close(&mt->experts);
    csv_close(&mt->layers);
    memset(mt, 0, sizeof *mt);
}

// Dead experts are counted over the evaluation window; empty on other steps.
static void write_layer_rows(Metrics *mt, const StepReport *r, const Model *m) {
    const RoutingStats *rs = r->routing;
    FILE *f = mt->layers.f;
    for (int l = 0; rs && l < rs->n_layers; l++) {
        fprintf(f, "%ld,%d,%.6f,%.6f,%.6f,%.6f,", r->step, m->moe[l].layer,
                routing_layer_dropped(rs, l), routing_layer_maxvio(rs, l),
                routing_layer_entropy(rs, l), routing_layer_lse(rs, l));
        if (r->window) fprintf(f, "%d", routing_layer_dead(r->window, l));
        fputc('\n', f);
    }
    csv_flush(&mt->layers);
}

void metrics_write_step(Metrics *mt, const StepReport *r, const double *val, const Model *m) {
    errno = 0;   // csv_flush reports the failure that set it
    const ModelLosses *l = &r->losses;
    FILE *f = mt->metrics.f;
    fprintf(f, "%ld,%.6g,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.1f,%.3f,%d,",
            r->step, r->lr, l->total, l->ce, l->lb, l->z, l->importance, l->load, r->grad_norm,
            r->dropped, r->maxvio, r->entropy, r->lse, r->tok_per_s, r->elapsed_s, r->skipped);
    if (r->window) fprintf(f, "%d", routing_dead(r->window));
    for (int d = 0; d <= mt->n_domains; d++) {
        if (val) fprintf(f, ",%.6f", val[d]);
        else fputc(',', f);
    }
    fputc('\n', f);
    csv_flush(&mt->metrics);
    write_layer_rows(mt, r, m);
}

void metrics_write_experts(Metrics *mt, long step, const RoutingStats *rs, const Model *m) {
    errno = 0;   // csv_flush reports the failure that set it
    for (int l = 0; l < rs->n_layers; l++) {
        uint64_t total = 0;
        for (int e = 0; e < rs->experts; e++) total += rs->routed[(size_t)l * rs->experts + e];
        for (int e = 0; e < rs->experts; e++) {
            size_t c = (size_t)l * rs->experts + e;
            double frac = total ? (double)rs->routed[c] / (double)total : 0.0;
            double gate = rs->routed[c] ? rs->gate_sum[c] / (double)rs->routed[c] : 0.0;
            fprintf(mt->experts.f, "%ld,%d,%d,%llu,%.6f,%.6f,%llu\n", step, m->moe[l].layer, e,
                    (unsigned long long)rs->routed[c], frac, gate,
                    (unsigned long long)rs->dropped[c]);
        }
    }
    csv_flush(&mt->experts);
}

static void format_eta(double s, char *out, size_t n) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(out, n, "%ldh%02ldm", t / 3600, t / 60 % 60);
    else snprintf(out, n, "%ldm%02lds", t / 60, t % 60);
}

void metrics_print_step(Metrics *mt, const StepReport *r) {
    int last = r->step + 1 == r->steps;
    if (!mt->tty && (r->step + 1) % mt->log_every != 0 && !last && r->step != 0) return;
    char eta[32];
    format_eta(r->eta_s, eta, sizeof eta);
    printf("%sstep %ld/%ld | loss %.4f | aux %.3f | z %.3f | lr %.2e | gnorm %.2f | "
           "%.0f tok/s | eta %s | drop %.1f%% | maxvio %.2f%s",
           mt->tty ? "\r" : "", r->step + 1, r->steps, r->losses.total, r->losses.lb,
           r->losses.z, r->lr, r->grad_norm, r->tok_per_s, eta, 100.0 * r->dropped, r->maxvio,
           mt->tty ? "\033[K" : "\n");
    fflush(stdout);
    mt->line_open = mt->tty;
}

void metrics_break_line(Metrics *mt) {
    if (mt->line_open) putchar('\n');
    mt->line_open = 0;
}
