// hf.h: interoperability with Hugging Face. `moe export` writes a checkpoint as a
// transformers Mixtral model directory; `moe import` reads one into a checkpoint that
// `moe finetune` starts from.
//
// The directory: config.json (MixtralConfig keys) and model.safetensors, or, past the
// shard size, model-0000i-of-0000N.safetensors plus model.safetensors.index.json
// ({"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}). Tensor names and
// shapes are the layout's own (model/layout.h: HF Mixtral names, [out, in]), so weights
// map one to one; the care goes into the config and the features Mixtral lacks.
#ifndef MOE_HF_H
#define MOE_HF_H

#define HF_CONFIG "config.json"
#define HF_WEIGHTS "model.safetensors"
#define HF_INDEX "model.safetensors.index.json"
// transformers' default max_shard_size ("5GB").
#define HF_SHARD_DEFAULT 5000000000ull

int export_main(int argc, char **argv);
int import_main(int argc, char **argv);

#endif
