// checkpoint.h: HDF5 checkpoints (docs/file-formats.md, "HDF5 checkpoint"): save,
// validate, load.
//
// One self-describing HDF5 file per checkpoint, readable with h5py and h5dump:
//   /                  attrs format = "moe.c", version, step, tokens_seen, kind
//                      ("full" or "delta"), base_fingerprint (0 in a full checkpoint),
//                      run_id (the run that wrote it; 0: none)
//   /config            one string attr per resolved key, "section.key" = value
//   /model/...         one dataset per parameter tensor (float32, HF Mixtral shapes):
//                      /model/embed_tokens, /model/layers/<i>/input_layernorm,
//                      /model/layers/<i>/self_attn/{q,k,v,o}_proj,
//                      /model/layers/<i>/post_attention_layernorm,
//                      /model/layers/<i>/router/{gate,noise},
//                      /model/layers/<i>/experts/<j>/{w1,w3,w2},
//                      /model/layers/<i>/shared_experts/<j>/{w1,w3,w2},
//                      /model/layers/<i>/mlp/{gate_proj,up_proj,down_proj},
//                      /model/norm, /model/lm_head
//   /optim/m/..., /optim/v/...   AdamW moments of the trainable tensors, at the path
//                      below /model (/optim/m/layers/0/experts/3/w1)
//   /state/rng (4 uint64), /state/{step, tokens_seen, data_cursor, best_val, lr_scale}
//                      (1 each)
// Every dataset is chunked and carries the fletcher32 checksum filter (so the state's
// scalars are 1-element arrays). A save builds the file in memory (about twice its size
// in host memory), writes it to <path>.tmp, fsyncs it, renames it over <path> and fsyncs
// the directory, so a crash never leaves a half-written file under a good name.
#ifndef MOE_CHECKPOINT_H
#define MOE_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "../../base/rng.h"
#include "../../model/model.h"
#include "../../optim/adamw.h"
#include "../config.h"

#define CKPT_FORMAT "moe.c"
#define CKPT_VERSION 1

// Everything besides weights and optimizer moments that exact resume needs.
typedef struct {
    long step;              // optimizer steps completed
    uint64_t tokens_seen;
    uint64_t data_cursor;   // batches drawn (data_loader_cursor)
    Rng noise_rng;          // router-noise generator
    double best_val;        // best mean validation loss so far (INFINITY if none)
    uint64_t run_id;        // the run directory's identity (0: none)
    double lr_scale;        // learning-rate factor left by rollbacks (0 is taken as 1)
} TrainState;

// The checkpoint path of a parameter ("/model/layers/0/experts/3/w1").
void ckpt_param_path(const ParamInfo *p, char *out, size_t len);

// Writes a checkpoint. opt NULL: no optimizer state. include: one flag per layout tensor
// (NULL: all), for delta checkpoints that hold only trained tensors (then kind = "delta"
// and base_fingerprint identifies the base weights). Returns 0, or -1 with err set; on
// failure the previous file at `path` is untouched.
int ckpt_save(const char *path, RunConfig *rc, const Model *m, const AdamW *opt,
              const TrainState *st, const uint8_t *include, uint64_t base_fingerprint,
              char *err, size_t n);

// Reads the config stored in a checkpoint over rc (after defaults). Also validates the
// file: opens as HDF5, format and version attrs, kind. Returns 0 or -1 with err naming the
// file and the problem.
int ckpt_read_config(const char *path, RunConfig *rc, char *err, size_t n);

// Loads weights (every tensor the file holds; a full checkpoint must hold all of m's)
// into m, optimizer moments into opt when opt is non-NULL (tensors trainable in opt must
// be present), and the train state when st is non-NULL. Checks every dataset's shape and
// its fletcher32 checksum, and that the stored [model] and [router] config equals m's,
// training settings aside (init_std, capacity, drop policy, aux coefficients, jitter)
// (a mismatch names the first differing key and both values), and that every weight,
// expert bias and moment is finite (naming the first tensor that is not). Returns 0 or
// -1 with err.
int ckpt_load(const char *path, Model *m, AdamW *opt, TrainState *st, char *err, size_t n);

// The root attributes step and run_id (0 when the file has none), to check a
// checkpoint against its file name and its run directory. Returns 0 or -1 with err.
int ckpt_read_identity(const char *path, long *step, uint64_t *run_id, char *err, size_t n);

// A 64-bit fingerprint (FNV-1a) of m's weights, to tie a delta to its base.
uint64_t ckpt_fingerprint(const Model *m);
// The base fingerprint stored in a delta checkpoint (0 for a full one).
int ckpt_read_base_fingerprint(const char *path, uint64_t *out, char *err, size_t n);

#endif
