"""`moe experts` writes its scores beside the checkpoint, or where --csv asks, and
nothing into the working directory it runs from."""
import csv
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))

CONFIG = """
[model]
layers = 2
d_model = 16
heads = 2
kv_heads = 2
seq_len = 16
experts = 4
expert_ffn_dim = 16
[router]
top_k = 2
[train]
batch_size = 4
steps = 2
eval_every = 0
sample_tokens = 0
threads = 1
[data]
val_tokens = 1024
[domain prose]
kind = text
train = {d}/train.txt
val = {d}/val.txt
"""
LAYERS, EXPERTS = 2, 4


def run_moe(args, cwd):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experts")
    words = "the quick brown fox jumps over the lazy dog near the old river".split()
    text = " ".join(words[(i * 5 + i // 4) % len(words)] for i in range(800))
    (tmp / "train.txt").write_text(text)
    (tmp / "val.txt").write_text(text[::-1])
    cfg = tmp / "tiny.ini"
    cfg.write_text(CONFIG.format(d=tmp))
    run_moe(["train", cfg, f"train.out_dir={tmp}", "train.name=run"], cwd=tmp)
    return tmp / "run"


def scores(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == LAYERS * EXPERTS
    assert set(rows[0]) == {"layer", "expert", "token_score", "gate_score", "selected"}
    return rows


@pytest.mark.parametrize("which", ["run directory", "checkpoint file"])
def test_default_csv_beside_checkpoint(tmp_path, run_dir, which):
    ckpt = run_dir if which == "run directory" else max(run_dir.glob("ckpt_*.h5"))
    (run_dir / "esft.csv").unlink(missing_ok=True)
    before = set(os.listdir(run_dir))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = run_moe(["experts", ckpt, run_dir.parent / "val.txt"], cwd=cwd)
    assert os.listdir(cwd) == []
    assert set(os.listdir(run_dir)) == before | {"esft.csv"}
    assert f"scores written to {run_dir}/esft.csv" in run.stdout
    scores(run_dir / "esft.csv")


def test_csv_where_asked(tmp_path, run_dir):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (run_dir / "esft.csv").unlink(missing_ok=True)
    run_moe(["experts", run_dir, run_dir.parent / "val.txt", "--csv", "scores.csv"], cwd=cwd)
    assert os.listdir(cwd) == ["scores.csv"]
    assert not (run_dir / "esft.csv").exists()
    scores(cwd / "scores.csv")
