// hf_deepseek.h: what DeepSeek-V2 and -V3 directories add to the other families (hf.h):
// multi-head latent attention, YaRN, DeepSeek routing and dense first layers in
// config.json, and the RoPE rows of the query and shared-key projections, which their
// files hold as interleaved pairs (x0, x1), (x2, x3), ... and moe.c as halves
// (x_i, x_{i+r/2}). The row permutation is exact: the same permutation of q_pe and k_pe
// leaves every q.k product as it was.
#ifndef MOE_HF_DEEPSEEK_H
#define MOE_HF_DEEPSEEK_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "hf.h"

// Refuses what moe.c would compute differently, naming the key.
void hf_deepseek_check(const cJSON *j, HfFamily f, const char *path);
// config.json's DeepSeek keys into rc (after the keys the families share).
void hf_deepseek_config(const cJSON *j, HfFamily f, const char *path, RunConfig *rc);
// DeepSeek-V3's multi-token prediction modules (num_nextn_predict_layers): files may hold
// them as layers num_hidden_layers.. on; moe.c, like transformers' DeepseekV3ForCausalLM,
// predicts the next token only and leaves them out.
int hf_deepseek_mtp_layers(const cJSON *j);
// Whether the file's RoPE rows are interleaved pairs (V2 always; V3 by rope_interleave).
int hf_deepseek_interleaved(const cJSON *j, HfFamily f);

// The first feature of c that DeepSeek family f cannot express, in why; 0 when none.
int hf_deepseek_export_check(const ModelConfig *c, HfFamily f, char *why, size_t n);
// The family's keys of c into j (config.json).
void hf_deepseek_config_out(cJSON *j, const ModelConfig *c, HfFamily f);
// A float field as JSON text that reads back as a float (hf_export.c): the shortest
// digits that round-trip, with ".0" where printf leaves an integer. transformers 5
// validates config fields by type and refuses `0` where its config class declares a float.
void hf_json_add_float(cJSON *j, const char *key, double v);

// Permutes the RoPE rows of layout tensor `name` (rows x cols floats at w) from the
// file's interleaved pairs to moe.c's halves (to_file 0) or back (to_file 1); other
// tensors are left alone.
void hf_deepseek_rope_rows(const ModelConfig *c, const char *name, size_t cols, float *w,
                           int to_file);

#endif
