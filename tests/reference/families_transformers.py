#!/usr/bin/env python3
"""transformers' own model classes against moe.c, for the four families moe import and
moe export read and write (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE). Not part of `make test`:
Debian's torch 1.13 runs transformers 4.45 (Mixtral, OLMoE, Qwen2-MoE) but Qwen3-MoE needs
transformers >= 4.51 and torch 2. Run it by hand in a venv, for example

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install torch==2.6.0 transformers==4.51.3 h5py
    /tmp/tf/bin/python tests/reference/families_transformers.py random FAMILY...
    /tmp/tf/bin/python tests/reference/families_transformers.py export HF_DIR LOGITS.h5

`random`: for each FAMILY (mixtral, olmoe, qwen2_moe, qwen3_moe) transformers makes a
tiny random model (norm weights and biases drawn too, so that they matter) and saves it;
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
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:   # RMSNorm weights around 1, biases around 0
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
            elif "gate" in name and "proj" not in name:   # routers: spread the scores
                p.mul_(20.0)
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
