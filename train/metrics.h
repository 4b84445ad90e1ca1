// metrics.h: what a run tells its user: the progress line and the metrics files.
//
// Defines Metrics: <run>/metrics.csv (one row per step; validation columns filled on
// evaluation steps) and <run>/experts.csv (one row per step, MoE layer and expert),
// both written with libcsv; every write is checked (a failure, a full disk included,
// is a one-line error naming the file); plus the live progress line on a terminal (plain lines
// every log_every steps otherwise).
#ifndef MOE_METRICS_H
#define MOE_METRICS_H

#include <stdio.h>

#include "../model/model.h"
#include "../model/routing_stats.h"
#include "config.h"

typedef struct {
    long step, steps;
    ModelLosses losses;   // means over the step's micro-batches
    double lr, grad_norm;
    double tok_per_s;     // this run so far
    double elapsed_s, eta_s;
    double dropped, maxvio;   // this step, over MoE layers
    double entropy, lse;      // mean router entropy and logsumexp, this step
    int skipped;              // 1: non-finite, the update was skipped (on_nonfinite = skip)
    const RoutingStats *routing;   // this step's routing, for layers.csv
    const RoutingStats *window;    // routing since the last evaluation (dead experts); NULL
                                   // on steps without evaluation
} StepReport;

// One CSV file and its name, for errors.
typedef struct {
    FILE *f;
    char path[RUN_FILE_MAX];
} CsvFile;

typedef struct {
    CsvFile metrics;
    CsvFile experts;
    CsvFile layers;
    int tty;              // progress line redrawn in place
    int log_every;
    int n_domains;
    int line_open;        // a progress line is on screen without its newline
} Metrics;

// Opens the CSV files in run_dir (metrics.csv, experts.csv, layers.csv: one row per step
// and MoE layer) to continue from step from_step: rows of steps >= from_step, and a row
// cut short by a crash or a full disk, are cut off first; a file that is missing or
// empty gets its header. A new run passes 0, a resumed or rolled-back one its
// checkpoint's step. Dies naming the file on any failure.
void metrics_open(Metrics *mt, const char *run_dir, const char **domains, int n_domains,
                  int log_every, long from_step);
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
