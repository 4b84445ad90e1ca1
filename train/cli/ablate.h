// ablate.h: `moe ablate GRID.ini [--jobs N] [--out DIR] [section.key=value ...]`: one
// training run per variant of a base config, all with the same data, seed, init and token
// budget, then one table and two figures comparing them. Override words change the base
// (train.steps=20 for a quick trial of a grid).
//
// A grid file is a normal config (the base every variant shares) plus either or both of
//   [variant NAME]   one run per section: its "section.key = value" lines override the base
//   [grid]           "section.key = v1, v2, ..." lists: every combination (full factorial),
//                    crossed with the [variant] sections when there are some; the runs are
//                    named NAME+key=v1+key2=w1 (key without its section)
// Variants may not change what an ablation holds fixed: train.steps, batch_size,
// grad_accum, seed, eval_every, model.seq_len, vocab, [data] and [domain] keys (and
// train.name, out_dir and threads, which ablate sets).
//
// Output DIR (default <train.out_dir>/<grid file's base name>):
//   base.ini                 the resolved base config every variant starts from
//   <variant>/               a normal run directory, plus train.log (the child's output)
//   ablation.csv, ablation.md, val_loss.png, maxvio.png (+ their .dat and plots.gp)
#ifndef MOE_ABLATE_H
#define MOE_ABLATE_H

#include "../config.h"

typedef struct {
    char *name;
    char **words; // (n_words) "section.key=value" applied over the base, in order
    int n_words;
    int failed; // its training run exited with an error
} AblateVariant;

int ablate_main(int argc, char **argv);

// ablate_report.c: reads each variant's <out>/<name>/metrics.csv (and layers.csv when
// present) and writes <out>/ablation.csv, ablation.md and the figures.
// `note` (how many ran, at what parallelism, the wall time) goes into ablation.md.
void ablate_report(const char *out, const char *grid_path, const RunConfig *base,
                   const AblateVariant *v, int n, const char *note);
// The mean validation loss of a run's last evaluation, or NAN when there is none.
double ablate_final_val(const char *run_dir);

#endif
