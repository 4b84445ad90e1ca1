#include "metrics.h"

#include <csv.h>
#include <string.h>
#include <unistd.h>

#include "../base/util.h"
#include "config.h"

static FILE *open_in(const char *dir, const char *name, int append) {
    char path[RUN_FILE_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, append ? "a" : "w");
    if (!f) FAIL("%s: cannot create (check that the directory is writable)", path);
    return f;
}

// A header cell through libcsv, which quotes whatever a domain name contains.
static void csv_cell(FILE *f, const char *text, int first) {
    if (!first) fputc(',', f);
    csv_fwrite(f, text, strlen(text));
}

void metrics_open(Metrics *mt, const char *run_dir, const char **domains, int n_domains,
                  int log_every, int append) {
    memset(mt, 0, sizeof *mt);
    mt->metrics = open_in(run_dir, "metrics.csv", append);
    mt->experts = open_in(run_dir, "experts.csv", append);
    mt->layers = open_in(run_dir, "layers.csv", append);
    mt->tty = isatty(STDOUT_FILENO);
    mt->log_every = log_every;
    mt->n_domains = n_domains;
    if (append) return;
    const char *cols[] = {"step", "lr", "loss", "ce", "lb", "z", "importance", "load",
                          "grad_norm", "dropped", "maxvio", "entropy", "lse", "tok_per_s",
                          "elapsed_s", "dead"};
    for (size_t i = 0; i < sizeof cols / sizeof *cols; i++) csv_cell(mt->metrics, cols[i], i == 0);
    char name[256];
    for (int d = 0; d < n_domains; d++) {
        snprintf(name, sizeof name, "val_%s", domains[d]);
        csv_cell(mt->metrics, name, 0);
    }
    csv_cell(mt->metrics, "val_mean", 0);
    fputc('\n', mt->metrics);
    const char *ecols[] = {"step", "layer", "expert", "tokens", "fraction", "mean_gate", "dropped"};
    for (size_t i = 0; i < sizeof ecols / sizeof *ecols; i++) csv_cell(mt->experts, ecols[i], i == 0);
    fputc('\n', mt->experts);
    const char *lcols[] = {"step", "layer", "dropped", "maxvio", "entropy", "lse", "dead"};
    for (size_t i = 0; i < sizeof lcols / sizeof *lcols; i++) csv_cell(mt->layers, lcols[i], i == 0);
    fputc('\n', mt->layers);
}

void metrics_close(Metrics *mt) {
    metrics_break_line(mt);
    if (mt->metrics) fclose(mt->metrics);
    if (mt->experts) fclose(mt->experts);
    if (mt->layers) fclose(mt->layers);
    memset(mt, 0, sizeof *mt);
}

// Dead experts are counted over the evaluation window; empty on other steps.
static void write_layer_rows(Metrics *mt, const StepReport *r, const Model *m) {
    const RoutingStats *rs = r->routing;
    for (int l = 0; rs && l < rs->n_layers; l++) {
        fprintf(mt->layers, "%ld,%d,%.6f,%.6f,%.6f,%.6f,", r->step, m->moe[l].layer,
                routing_layer_dropped(rs, l), routing_layer_maxvio(rs, l),
                routing_layer_entropy(rs, l), routing_layer_lse(rs, l));
        if (r->window) fprintf(mt->layers, "%d", routing_layer_dead(r->window, l));
        fputc('\n', mt->layers);
    }
    fflush(mt->layers);
}

void metrics_write_step(Metrics *mt, const StepReport *r, const double *val, const Model *m) {
    const ModelLosses *l = &r->losses;
    fprintf(mt->metrics,
            "%ld,%.6g,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.1f,%.3f,", r->step,
            r->lr, l->total, l->ce, l->lb, l->z, l->importance, l->load, r->grad_norm, r->dropped,
            r->maxvio, r->entropy, r->lse, r->tok_per_s, r->elapsed_s);
    if (r->window) fprintf(mt->metrics, "%d", routing_dead(r->window));
    for (int d = 0; d <= mt->n_domains; d++) {
        if (val) fprintf(mt->metrics, ",%.6f", val[d]);
        else fputc(',', mt->metrics);
    }
    fputc('\n', mt->metrics);
    fflush(mt->metrics);
    write_layer_rows(mt, r, m);
}

void metrics_write_experts(Metrics *mt, long step, const RoutingStats *rs, const Model *m) {
    for (int l = 0; l < rs->n_layers; l++) {
        uint64_t total = 0;
        for (int e = 0; e < rs->experts; e++) total += rs->routed[(size_t)l * rs->experts + e];
        for (int e = 0; e < rs->experts; e++) {
            size_t c = (size_t)l * rs->experts + e;
            double frac = total ? (double)rs->routed[c] / (double)total : 0.0;
            double gate = rs->routed[c] ? rs->gate_sum[c] / (double)rs->routed[c] : 0.0;
            fprintf(mt->experts, "%ld,%d,%d,%llu,%.6f,%.6f,%llu\n", step, m->moe[l].layer, e,
                    (unsigned long long)rs->routed[c], frac, gate,
                    (unsigned long long)rs->dropped[c]);
        }
    }
    fflush(mt->experts);
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
