// hf.h: a Hugging Face MoE model directory, as transformers writes it, for six families
// (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3): config.json to and
// from [model] and [router],
// and the weights in safetensors files. `moe export` and `moe import`
// (cli/hf_commands.h) are its command lines.
//
// The directory: config.json (the family's config class's keys) and model.safetensors,
// or, past the shard size, model-0000i-of-0000N.safetensors plus
// model.safetensors.index.json ({"metadata": {"total_size": bytes}, "weight_map":
// {tensor: file}}). Tensor shapes are the layout's own ([out, in]); names are the
// layout's (model/layout.h: HF Mixtral names) for Mixtral, and Llama-style MLP names
// (mlp.gate, mlp.experts.<e>.gate_proj, ...) for the other families, mapped one to one
// by hf_name_export and hf_name_import. DeepSeek's files rotate interleaved RoPE pairs,
// moe.c halves: their query and shared-key RoPE rows are permuted on the way in and back
// on the way out (hf_deepseek.c), and DeepSeek-V3's mlp.gate.e_score_correction_bias is
// the model's expert_bias. Every failure dies naming the file and the problem.
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

typedef enum {
    HF_MIXTRAL,
    HF_OLMOE,
    HF_QWEN2_MOE,
    HF_QWEN3_MOE,
    HF_DEEPSEEK_V2,
    HF_DEEPSEEK_V3,
    HF_N_FAMILIES
} HfFamily;

// "Mixtral", ..., "DeepSeek-V3"; the model_type; the architecture class.
const char *hf_family_name(HfFamily f);
const char *hf_family_type(HfFamily f);
const char *hf_family_class(HfFamily f);
// The family of a config.json model_type, or -1.
int hf_family_from_type(const char *model_type);
// The family an export of c writes: multi-head latent attention makes it DeepSeek (V3
// when the router scores with a sigmoid, as noaux_tc does; else V2); q/k/v biases or
// shared experts Qwen2-MoE, QK-norm per head Qwen3-MoE, over the whole projections OLMoE;
// else Mixtral.
HfFamily hf_family_of(const ModelConfig *c);
// A layout name as family f names it, and back (-1: f has no tensor by that name).
void hf_name_export(HfFamily f, const char *name, char *out, size_t n);
int hf_name_import(HfFamily f, const char *hf, char *out, size_t n);
// DeepSeek-V3's per-layer expert bias: its name for decoder layer `layer`, and back (-1:
// not such a name).
void hf_bias_name(int layer, char *out, size_t n);
int hf_bias_layer(const char *hf);

// The first feature of c that its family (hf_family_of) cannot express, described in
// why; returns 0 when there is none.
int hf_export_check(const ModelConfig *c, char *why, size_t n);
// Writes m's weights (as dtype) and config.json (eos_token_id = eos_id, null when
// negative) into dir, created when missing; a new shard starts where the next tensor
// would pass shard_size bytes. A dir that holds
// anything is refused unless force; then, once the new files are written, the export
// files they do not replace (config.json, model*.safetensors,
// model.safetensors.index.json) are removed and every other file is kept. Sets *bytes
// to the weights' size and returns the number of weight files.
size_t hf_export_write(const char *dir, const Model *m, int eos_id, StDType dtype,
                       uint64_t shard_size, int force, uint64_t *bytes);
// Reads the directory into rc (defaults, then what the family fixes, then config.json's keys;
// seq_len > 0 replaces max_position_embeddings) and its weights (F32, BF16 or F16) into m,
// which it initialises on the CPU for one sequence.
void hf_import_read(const char *dir, long seq_len, RunConfig *rc, Model *m);
// Its first half: dir's config.json into rc, as above, without the weights.
void hf_import_config(const char *dir, long seq_len, RunConfig *rc);

#endif
