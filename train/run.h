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
// A checkpoint file, or a run directory's latest ckpt_*.h5; dies when there is none or
// when run_check_checkpoint refuses it.
void run_resolve_checkpoint(const char *path, char *out, size_t len);
// Dies unless the checkpoint's stored step equals the one in its name (ckpt_<step>.h5)
// and, when its directory has a run_id, its run id equals that.
void run_check_checkpoint(const char *path);
// The steps of dir's ckpt_<step>.h5 files, ascending, in a malloc'ed array of *n.
long *run_list_checkpoints(const char *dir, size_t *n);
// dir's highest-step ckpt_<step>.h5 into out; -1 when there is none.
int run_latest_checkpoint(const char *dir, char *out, size_t len);

// A run directory's identity: a random nonzero 64-bit id in <dir>/run_id (16 hex
// digits), stamped into every checkpoint the run writes.
uint64_t run_new_id(void);
// 0 with *id, or -1 when dir has no run_id (runs from before identities); dies on a
// malformed one.
int run_read_id(const char *dir, uint64_t *id);
void run_write_id(const char *dir, uint64_t id);
// A file that replaces path only once complete: written to tmp (<path>.tmp, len bytes)
// by the caller, then run_commit_file flushes, syncs and renames it over path. Both die
// with a one-line error naming the file on any failure (a full disk included).
FILE *run_create_file(const char *path, char *tmp, size_t len);
void run_commit_file(FILE *f, const char *tmp, const char *path);
// 1 and the first file a run writes (run_id, config.ini, a CSV, a checkpoint) found in
// dir, or 0 when there is none (or no dir).
int run_dir_find_run_file(const char *dir, char *name, size_t len);
// Removes dir's *.tmp files (left by a save that was killed).
void run_remove_tmp(const char *dir);
// Removes every file a run writes from dir, and *.tmp, so that a run can start afresh.
void run_dir_clear(const char *dir);
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
// Opens rc's data for m's shape, text through rc's tokenizer; dies on error.
DataLoader *run_open_data(const RunConfig *rc, const Model *m, uint64_t seed);

// The tokenizer data.tokenizer and data.tokenizer_file name; dies naming the file when it
// cannot be read or its ids reach past model.vocab.
Tokenizer *run_open_tokenizer(const RunConfig *rc);
// The name a run gives its copy of the tokenizer file: tokenizer.json (hf-bpe),
// tokenizer.model (sentencepiece); NULL for bytes.
const char *run_tokenizer_name(int kind);
// Copies data.tokenizer_file into dir under run_tokenizer_name (unless it is that copy),
// and points rc at the copy with its CRC-32 in data.tokenizer_crc32. Dies when dir
// already holds a different file of that name. Nothing for bytes.
void run_save_tokenizer(RunConfig *rc, const char *dir);
// The file's CRC-32 (zlib) as 8 hex digits; -1 when it cannot be read.
int run_file_crc32(const char *path, char out[16]);
// A config read from checkpoint ckpt: points data.tokenizer_file at the copy beside it,
// dying when that file is missing or its CRC-32 differs from data.tokenizer_crc32.
void run_find_tokenizer(RunConfig *rc, const char *ckpt);

#endif
