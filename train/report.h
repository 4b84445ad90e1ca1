// report.h: a run's report page, RUN_DIR/report.html, written at the end of `moe train`
// and `moe finetune` and by `moe report RUN_DIR`.
//
// One self-contained page read from the run's own files: the final numbers (metrics.csv),
// the start-up facts (startup.txt: model, trainable tensors, memory plan), figures of
// training and validation loss per domain, learning rate, the aux losses, dropped
// fraction, MaxVio, router entropy and dead experts over steps, and expert load per MoE
// layer over steps (experts.csv: a step x expert heatmap per layer), then config.ini.
// Figures come from gnuplot (plot.h): report.gp and load.dat beside the page draw
// loss.png, lr.png, aux.png, routing.png, load.png and their SVGs, which the page
// inlines. Without gnuplot the page says why in one line and keeps its tables.
#ifndef MOE_REPORT_H
#define MOE_REPORT_H

#include <stddef.h>

// Writes run_dir/report.html. Returns 0 with msg the line to print (the page, and why
// figures are missing if they are), or -1 with msg the error (one line naming the file).
int report_write_run(const char *run_dir, char *msg, size_t n);
// The end of a training run: the report, or a warning; never stops the run.
void report_after_run(const char *run_dir);

#endif
