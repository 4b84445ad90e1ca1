#!/usr/bin/env python3
"""transformers' own model classes against moe.c, for the six families moe import and
moe export read and write (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3).
Not part of `make test` for all of them: Debian's torch 1.13 runs transformers 4.45
(Mixtral, OLMoE, Qwen2-MoE) but Qwen3-MoE needs transformers >= 4.51 and torch 2, and
DeepseekV2/V3ForCausalLM transformers 5 (its DeepSeek classes: the checks below were run
with 5.25.0 and torch 2). Run it by hand in a venv, for example

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install torch==2.6.0 transformers==4.51.3 h5py
    /tmp/tf/bin/python tests/reference/families_transformers.py random FAMILY...
    /tmp/tf/bin/python tests/reference/families_transformers.py export HF_DIR LOGITS.h5

`random`: for each FAMILY (mixtral, olmoe, qwen2_moe, qwen3_moe, deepseek_v2,
deepseek_v3) transformers makes a tiny random model (norm weights, biases and DeepSeek-V3's
e_score_correction_bias drawn too, so that they matter) and saves it;
`moe import` reads it, `moe eval --dump-logits` runs it on the README's bytes, and its
logits are compared with the transformers model's on the same tokens; `moe export` of the
import must give back every tensor bit for bit and config.json must load again.
`export`: transformers loads a `moe export` directory (no missing or unexpected tensor)
and its logits are compared with the ones `moe eval CKPT DATA --dump-logits` wrote.
Prints max |difference| relative to the largest |logit| per case; exits 1 past 1e-5.
"""
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))
TOLERANCE = 1e-5

COMMON = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6,
              rope_theta=500.0, tie_word_embeddings=False, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
# DeepSeek: every query head its own key (num_key_value_heads = heads); no rope_theta
# beside rope_parameters.
DEEPSEEK = dict(num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=16,
                qk_nope_head_dim=8, intermediate_size=40, moe_intermediate_size=12,
                n_routed_experts=8, n_shared_experts=2, first_k_dense_replace=1, n_group=4,
                topk_group=2, rope_theta=None)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    # The shape: 64 experts, top-8, no renormalisation.
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=16, num_experts=64, num_experts_per_tok=8,
                   norm_topk_prob=False)),
    # Fine-grained experts, a gated shared expert, a dense layer between sparse ones.
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=3, decoder_sparse_step=2, intermediate_size=40,
                       moe_intermediate_size=12, shared_expert_intermediate_size=48,
                       num_experts=8, num_experts_per_tok=4, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=8, intermediate_size=40, moe_intermediate_size=16,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)),
    # MLA without a compressed query, YaRN, a dense first layer, group-limited greedy
    # routing over 4 groups, routed_scaling_factor, two shared experts.
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(DEEPSEEK, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=12,
                         num_experts_per_tok=3, topk_method="group_limited_greedy",
                         norm_topk_prob=False, routed_scaling_factor=1.5,
                         rope_parameters=dict(rope_type="yarn", rope_theta=500.0, factor=4.0,
                                              original_max_position_embeddings=16,
                                              beta_fast=0.5, beta_slow=0.05, mscale=0.707,
                                              mscale_all_dim=0.5))),
    # MLA with a compressed query, noaux_tc with a drawn expert bias, interleaved RoPE.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(DEEPSEEK, q_lora_rank=12, qk_rope_head_dim=4, v_head_dim=8,
                         num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                         rope_interleave=True,
                         rope_parameters=dict(rope_type="default", rope_theta=500.0))),
}


def moe(*args):
    run = subprocess.run([MOE] + [str(a) for a in args], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"moe {' '.join(map(str, args))}: {run.stderr.strip()}")
    return run.stdout


def logits_of(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.double().numpy()


def relative(theirs, ours):
    return float(np.abs(theirs.reshape(ours.shape) - ours).max() / np.abs(ours).max())


def random_model(family, out, **overrides):
    """A tiny random FAMILY model saved in out; overrides: config fields over the table's."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(7)
    kwargs = {**COMMON, **extra, **overrides}
    if kwargs.get("rope_theta", 0) is None:
        del kwargs["rope_theta"]
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:   # RMSNorm weights around 1, biases around 0
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
            elif "gate" in name and "proj" not in name:   # routers: spread the scores
                p.mul_(20.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # DeepSeek-V3's selection bias
                b.copy_(0.1 * torch.randn_like(b))
    model.save_pretrained(out, safe_serialization=True)
    return model


def check_random(family, tmp):
    hf, ckpt, dump = (os.path.join(tmp, family + s) for s in ("_hf", ".h5", "_logits.h5"))
    model = random_model(family, hf)
    moe("import", hf, ckpt)
    moe("eval", ckpt, os.path.join(ROOT, "README.md"), "train.threads=1", "train.batch_size=4",
        "--dump-logits", dump)
    with h5py.File(dump, "r") as f:
        tokens, ours = f["tokens"][()], f["logits"][()].astype(np.float64)
    err = relative(logits_of(model, tokens), ours)
    back = os.path.join(tmp, family + "_back")
    moe("export", ckpt, back)
    theirs, again = load_file(os.path.join(hf, "model.safetensors")), \
        load_file(os.path.join(back, "model.safetensors"))
    same = sorted(theirs) == sorted(again) and all(
        np.array_equal(theirs[k].view(np.uint32), again[k].view(np.uint32)) for k in theirs)
    reloaded = logits_of(transformers.AutoModelForCausalLM.from_pretrained(
        back, torch_dtype=torch.float32).eval(), tokens)
    err_back = relative(reloaded, ours)
    print(f"{family:<10} transformers {transformers.__version__} (torch {torch.__version__}) "
          f"random model vs moe import: max |logit diff| / max |logit| {err:.2e}; "
          f"export of the import {'bit-identical' if same else 'DIFFERS'}, reloaded {err_back:.2e}")
    return err <= TOLERANCE and err_back <= TOLERANCE and same


def check_export(hf_dir, logits_h5):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, torch_dtype=torch.float32, output_loading_info=True)
    missing = {k: v for k, v in info.items() if v}
    with h5py.File(logits_h5, "r") as f:
        tokens, ours = f["tokens"][()], f["logits"][()].astype(np.float64)
    err = relative(logits_of(model.eval(), tokens), ours)
    print(f"{hf_dir}: {type(model).__name__}, transformers {transformers.__version__} (torch "
          f"{torch.__version__}): max |logit diff| / max |logit| {err:.2e}"
          f"{'; loading info ' + str(missing) if missing else ''}")
    return err <= TOLERANCE and not missing


def main(argv):
    if len(argv) >= 2 and argv[0] == "random":
        with tempfile.TemporaryDirectory() as tmp:
            ok = [check_random(f, tmp) for f in argv[1:]]
    elif len(argv) == 3 and argv[0] == "export":
        ok = [check_export(argv[1], argv[2])]
    else:
        sys.exit(__doc__)
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
