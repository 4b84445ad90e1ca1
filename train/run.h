// run.h: what `moe train`, `moe finetune` and the other commands share: loading a
// config from a file or a checkpoint, finding a run's latest checkpoint, and routing
// statistics over data for expert selection.
#ifndef MOE_RUN_H
#define MOE_RUN_H

#include <stddef.h>

#include "../data/loader.h"
#include "../model/model.h"
#include "../model/routing_stats.h"
#include "config.h"

// defaults <- INI file <- override words; dies with a one-line error.
void run_load_config(RunConfig *rc, const char *ini, int n_words, char **words);
// defaults <- the config stored in checkpoint <- override words; dies on error.
void run_load_checkpoint_config(RunConfig *rc, const char *ckpt, int n_words, char **words);
// A checkpoint file, or a run directory's latest ckpt_*.h5; dies when there is none.
void run_resolve_checkpoint(const char *path, char *out, size_t len);
// Applies "section.key=value" words; dies on the first bad one.
void run_apply_overrides(RunConfig *rc, int n_words, char **words);
// A single text domain named `name` reading `path` for both training and validation
// (moe eval / moe experts DATA).
void run_use_text_domain(RunConfig *rc, const char *name, const char *path);
// Routes `batches` training batches of dl through m (no noise, no backward) into rs.
void run_collect_routing(Model *m, DataLoader *dl, int batches, RoutingStats *rs);
// The backend train.device names; dies with the reason when it cannot be had (no CUDA in
// this build, no GPU) or train.precision asks for what it lacks.
const Backend *run_backend(const TrainConfig *tc);
// Sets the OpenMP thread count train.threads asks for (0: leaves the default); dies when
// the machine cannot start that many threads.
void run_set_threads(const TrainConfig *tc);
// Applies train.precision and train.expert_gemm to m (after model_init); dies when the
// backend lacks what they ask for.
void run_set_precision(Model *m, const TrainConfig *tc);
// One line for the start-up message: the device, its precision, and why not CUDA when
// the run is on the CPU.
void run_describe_device(const Model *m, char *buf, size_t n);
// Builds and loads a model from a checkpoint for B sequences (weights only), on the CPU
// (saying so when train.device names another device).
void run_model_from_checkpoint(Model *m, RunConfig *rc, const char *ckpt, size_t B);
// Opens rc's data for m's shape; dies on error.
DataLoader *run_open_data(const RunConfig *rc, const Model *m, uint64_t seed);

#endif
