// metrics.h: what a run tells its user: the progress line and the metrics files.
//
// Defines Metrics: <run>/metrics.csv (one row per step; validation columns filled on
// evaluation steps) and <run>/experts.csv (one row per step, MoE layer and expert),
// both written with libcsv, plus the live progress line on a terminal (plain lines
// every log_every steps otherwise).
#ifndef MOE_METRICS_H
#define MOE_METRICS_H

#include <stdio.h>

#include "../model/model.h"
#include "../model/routing_stats.h"

typedef struct {
    long step, steps;
    ModelLosses losses;   // means over the step's micro-batches
    double lr, grad_norm;
    double tok_per_s;     // this run so far
    double elapsed_s, eta_s;
    double dropped, maxvio;   // this step, over MoE layers
    double entropy, lse;      // mean router entropy and logsumexp, this step
    const RoutingStats *routing;   // this step's routing, for layers.csv
    const RoutingStats *window;    // routing since the last evaluation (dead experts); NULL
                                   // on steps without evaluation
} StepReport;

typedef struct {
    FILE *metrics;
    FILE *experts;
    FILE *layers;
    int tty;              // progress line redrawn in place
    int log_every;
    int n_domains;
    int line_open;        // a progress line is on screen without its newline
} Metrics;

// Opens the CSV files in run_dir (metrics.csv, experts.csv, layers.csv: one row per step
// and MoE layer) and writes their headers, or, with append (a resumed run), adds rows to
// the existing files.
void metrics_open(Metrics *mt, const char *run_dir, const char **domains, int n_domains,
                  int log_every, int append);
void metrics_close(Metrics *mt);
// One metrics.csv row and the step's layers.csv rows; val holds one loss per domain plus
// their mean, or NULL.
void metrics_write_step(Metrics *mt, const StepReport *r, const double *val, const Model *m);
void metrics_write_experts(Metrics *mt, long step, const RoutingStats *rs, const Model *m);
// The progress line (terminal) or a plain line every log_every steps.
void metrics_print_step(Metrics *mt, const StepReport *r);
// Ends a live progress line so that other output starts on a fresh line.
void metrics_break_line(Metrics *mt);

#endif
