#!/usr/bin/env python3
"""`moe sample` through its KV cache against transformers, on the tiny random models of
families_transformers.py (Mixtral, OLMoE with QK-norm over the projections, Qwen2-MoE with
q/k/v biases and a gated shared expert; Qwen3-MoE where transformers >= 4.51 runs it, and
DeepSeek-V2 / -V3, whose cache keeps MLA's latent, where transformers 5 does: by hand as
that script says).

For each FAMILY: `moe import` reads the model, `moe sample --temperature 0` continues two
prompts of different lengths in one batch and dumps its ids and the cached decode's logits
(--dump-logits). Checks: (a) those logits, at every position, against transformers' full
forward over the same ids (max |difference| / max |logit| <= 1e-5); (b) the greedy ids
equal `model.generate(prompt, do_sample=False)`'s, prompt by prompt.

    build/venv-hf/bin/python tests/reference/generate_transformers.py FAMILY...
"""
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from families_transformers import MOE, TOLERANCE, logits_of, random_model, relative  # noqa: E402

PROMPTS = ["The router picks", "MoE"]
NEW = 14   # the longest prompt and its continuation fit max_position_embeddings = 32


def moe(*args):
    run = subprocess.run([MOE] + [str(a) for a in args], capture_output=True, text=True,
                         errors="replace")
    if run.returncode:
        sys.exit(f"moe {' '.join(map(str, args))}: {run.stderr.strip()}")
    return run.stdout


def check(family, tmp):
    hf, ckpt, dump = (os.path.join(tmp, family + s) for s in ("_hf", ".h5", "_gen.h5"))
    model = random_model(family, hf)
    moe("import", hf, ckpt)
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    moe("sample", ckpt, *args, "--tokens", NEW, "--temperature", 0, "--threads", 1,
        "--dump-logits", dump)
    worst, same = 0.0, True
    with h5py.File(dump, "r") as f:
        for i, prompt in enumerate(PROMPTS):
            ids = f[f"{i}/tokens"][()].astype(np.int64)
            ours = f[f"{i}/logits"][()].astype(np.float64)
            worst = max(worst, relative(logits_of(model, ids[None, :-1])[0], ours))
            start = torch.tensor([list(prompt.encode())])
            with torch.no_grad():
                theirs = model.generate(start, max_new_tokens=NEW, do_sample=False,
                                        pad_token_id=0)[0].numpy()
            same &= np.array_equal(theirs, ids)
    print(f"{family:<10} cached decode vs transformers' forward: max |logit diff| / max |logit| "
          f"{worst:.2e}; greedy {NEW} tokens x {len(PROMPTS)} prompts "
          f"{'equal to' if same else 'DIFFER from'} generate()")
    return worst <= TOLERANCE and same


def main(argv):
    if not argv:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        ok = [check(f, tmp) for f in argv]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
