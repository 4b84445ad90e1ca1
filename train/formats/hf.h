// hf.h: the Hugging Face Mixtral model directory, as transformers writes it: config.json
// to and from [model] and [router], and the weights in safetensors files. `moe export`
// and `moe import` (cli/hf_commands.h) are its command lines.
//
// The directory: config.json (MixtralConfig keys) and model.safetensors, or, past the
// shard size, model-0000i-of-0000N.safetensors plus model.safetensors.index.json
// ({"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}). Tensor names and
// shapes are the layout's own (model/layout.h: HF Mixtral names, [out, in]), so weights
// map one to one; the care goes into the config and the features Mixtral lacks.
// Every failure dies naming the file and the problem.
#ifndef MOE_HF_H
#define MOE_HF_H

#include <stddef.h>
#include <stdint.h>

#include "../../model/model.h"
#include "../config.h"
#include "safetensors.h"

#define HF_CONFIG "config.json"
#define HF_WEIGHTS "model.safetensors"
#define HF_INDEX "model.safetensors.index.json"
// transformers' default max_shard_size ("5GB").
#define HF_SHARD_DEFAULT 5000000000ull

// The first feature of c that a Mixtral model cannot express, described in why; returns 0
// when there is none.
int hf_export_check(const ModelConfig *c, char *why, size_t n);
// Writes m's weights (as dtype) and config.json into dir, created when missing; a new
// shard starts where the next tensor would pass shard_size bytes. A dir that holds
// anything is refused unless force; then, once the new files are written, the export
// files they do not replace (config.json, model*.safetensors,
// model.safetensors.index.json) are removed and every other file is kept. Sets *bytes
// to the weights' size and returns the number of weight files.
size_t hf_export_write(const char *dir, const Model *m, StDType dtype, uint64_t shard_size,
                       int force, uint64_t *bytes);
// Reads the directory into rc (defaults, then what Mixtral fixes, then config.json's keys;
// seq_len > 0 replaces max_position_embeddings) and its weights (F32, BF16 or F16) into m,
// which it initialises on the CPU for one sequence.
void hf_import_read(const char *dir, long seq_len, RunConfig *rc, Model *m);
// Its first half: dir's config.json into rc, as above, without the weights.
void hf_import_config(const char *dir, long seq_len, RunConfig *rc);

#endif
