"""`moe export` against an independent NumPy Mixtral (mixtral_numpy.py): a model trained
here, exported, and run by the reference on the batch `moe eval --dump-logits` wrote, gives
the same logits within 1e-4 of the largest logit."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixtral_numpy import compare  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))
TOLERANCE = 1e-4

# Both exportable shapes: grouped-query attention with an untied head and top-2 routing,
# and tied embeddings with top-1 (a gate of exactly 1.0) after training with jitter.
CASES = {
    "gqa-untied-top2": ["model.heads=4", "model.kv_heads=2", "model.tie_embeddings=false",
                        "router.top_k=2", "model.rope_theta=500"],
    "tied-top1-jitter": ["model.heads=2", "model.kv_heads=2", "model.tie_embeddings=true",
                         "router.top_k=1", "router.noise=jitter"],
}


def text(n):
    words = ("routing sends each token to the experts whose gate scores it highest while "
             "the residual stream carries what the experts add").split()
    return " ".join(words[(i * 5 + i // 7) % len(words)] for i in range(n // 6))


def run_moe(args):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_mixtral_matches_moe_eval(tmp_path, case, reference_line):
    data = tmp_path / "text.txt"
    data.write_text(text(20000))
    cfg = tmp_path / "run.ini"
    cfg.write_text(f"[domain text]\nkind = text\ntrain = {data}\nval = {data}\n")
    run_moe(["train", cfg, "model.layers=2", "model.d_model=32", "model.seq_len=32",
             "model.experts=4", "model.expert_ffn_dim=48", "train.steps=30",
             "train.batch_size=8", "train.threads=1", "train.sample_tokens=0",
             "train.eval_every=0", "data.val_tokens=4096", f"train.out_dir={tmp_path}",
             "train.name=run"] + CASES[case])
    run_moe(["export", tmp_path / "run", tmp_path / "hf"])
    run_moe(["eval", tmp_path / "run", data, "train.threads=1", "--dump-logits",
             tmp_path / "logits.h5"])
    err = compare(tmp_path / "hf", tmp_path / "logits.h5")
    reference_line(f"{'mixtral ' + case:<28} max |logit diff| / max |logit| = {err:.2e} "
                   "(numpy float64 vs moe eval float32)")
    assert err <= TOLERANCE, f"{case}: {err:.3e}"
