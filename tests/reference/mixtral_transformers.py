#!/usr/bin/python3
"""transformers' own MixtralForCausalLM on a `moe export` directory against the logits
`moe eval CKPT DATA --dump-logits LOGITS.h5` wrote. Not part of `make test` (Debian ships
no transformers): run it by hand where transformers is installed, e.g. the GPU machine,
or a venv over Debian's torch 1.13 with transformers 4.40 (CPU).

Usage:
    python3 tests/reference/mixtral_transformers.py HF_DIR LOGITS.h5 [cpu|cuda]
prints the largest |difference| and that relative to the largest |logit|.
"""
import sys

import h5py
import numpy as np
import torch
from transformers import MixtralForCausalLM


def main(hf_dir, logits_h5, device="cpu"):
    model = MixtralForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).to(device).eval()
    with h5py.File(logits_h5, "r") as f:
        tokens, ours = f["tokens"][()], f["logits"][()]
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long, device=device)).logits
    diff = np.abs(theirs.float().cpu().numpy().reshape(ours.shape) - ours).max()
    print(f"{hf_dir}: max |logit diff| {diff:.3e}, relative to max |logit| "
          f"{diff / np.abs(ours).max():.3e} (transformers on {device})")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(*sys.argv[1:])
