"""Checkpoints, exact resume and single-expert fine-tuning, end to end through `moe`.

The walk-through test follows the README: pretrain on two default domains (fortunes,
bible), pick the experts that serve the third (python) with `moe experts`, fine-tune
only those, and measure every domain before and after."""
import os
import re
import shutil
import subprocess

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))
DEFAULT = os.path.join(ROOT, "data", "default")

MODEL = """
[model]
layers = 2
d_model = 32
heads = 2
kv_heads = 2
seq_len = 32
experts = 4
expert_ffn_dim = 32
[router]
top_k = 2
[train]
batch_size = 8
threads = 1
sample_tokens = 0
eval_every = 0
[data]
val_tokens = 4096
"""


def run_moe(args, check=True):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def domain(name, sub=None):
    sub = sub or name
    return (f"[domain {name}]\nkind = text\ntrain = {DEFAULT}/{sub}/train.txt\n"
            f"val = {DEFAULT}/{sub}/val.txt\n")


@pytest.fixture(scope="module")
def corpus():
    run_moe(["prepare"])
    return DEFAULT


def params(path):
    with h5py.File(path, "r") as f:
        out = {}
        f["model"].visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return out


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_resume_is_bit_identical(tmp_path, corpus):
    cfg = write(tmp_path, "r.ini", MODEL + domain("bible"))
    common = [f"train.out_dir={tmp_path}", "train.steps=6", "train.ckpt_every=3",
              "train.keep=5", "router.noise=shazeer", "train.grad_accum=2"]
    run_moe(["train", cfg, "train.name=full"] + common)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(tmp_path / "full" / "ckpt_000003.h5", part)
    run_moe(["train", "--resume", part])
    a, b = params(tmp_path / "full" / "ckpt_000006.h5"), params(part / "ckpt_000006.h5")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    with h5py.File(tmp_path / "full" / "ckpt_000006.h5") as fa, h5py.File(part / "ckpt_000006.h5") as fb:
        for k in ("optim/m", "optim/v"):
            fa[k].visititems(lambda n, o: None if not isinstance(o, h5py.Dataset)
                             else np.testing.assert_array_equal(o[()], fb[k][n][()]))
    full_rows = open(tmp_path / "full" / "metrics.csv").read().splitlines()
    part_rows = open(part / "metrics.csv").read().splitlines()[1:]   # a new file: header
    loss = lambda row: row.split(",")[2]
    assert [loss(r) for r in full_rows[4:7]] == [loss(r) for r in part_rows], (full_rows, part_rows)


def test_walkthrough_selected_experts(tmp_path, corpus):
    pre_cfg = write(tmp_path, "pre.ini", MODEL + domain("fortunes") + domain("bible"))
    run_moe(["train", pre_cfg, f"train.out_dir={tmp_path}", "train.name=pre", "train.steps=300"])
    base = tmp_path / "pre" / "ckpt_000300.h5"
    ex = run_moe(["experts", base, f"{DEFAULT}/python/train.txt", "--csv", tmp_path / "esft.csv",
                  "finetune.p=0.5"])
    expr = re.search(r"finetune.train = (.*)", ex.stdout).group(1)
    picked = re.findall(r"layers\.(\d+)\.experts\.(\d+)", expr)
    assert picked and len(picked) < 2 * 4, ex.stdout

    def losses(ckpt):
        out = {}
        for d in ("fortunes", "bible", "python"):
            ev = run_moe(["eval", ckpt, f"{DEFAULT}/{d}/val.txt"])
            out[d] = float(re.search(r"^data\s+([\d.]+)", ev.stdout, re.M).group(1))
        return out

    ft_cfg = write(tmp_path, "ft.ini", MODEL + domain("python") +
                   "[optim]\nwarmup_steps = 5\n")
    ft = run_moe(["finetune", ft_cfg, f"finetune.init={base}", f"finetune.train={expr}",
                  f"train.out_dir={tmp_path}", "train.name=ft", "train.steps=150"])
    F, C = 32, 32
    n_train = len(picked) * 3 * F * C
    assert f"{n_train} trainable params, optimizer state {2 * 4 * n_train / 1e6:.2f} MB" in ft.stdout
    before, after = losses(base), losses(tmp_path / "ft" / "ckpt_000150.h5")
    assert after["python"] < before["python"] - 0.05, (before, after)

    a, b = params(base), params(tmp_path / "ft" / "ckpt_000150.h5")
    chosen = {f"layers/{l}/experts/{e}/{w}" for l, e in picked for w in ("w1", "w2", "w3")}
    for k in a:
        if k in chosen:
            assert not np.array_equal(a[k], b[k]), f"{k} was selected but did not change"
        else:
            assert np.array_equal(a[k], b[k]), f"{k} is frozen but changed"


def test_delta_merge_equals_full_finetune(tmp_path, corpus):
    pre_cfg = write(tmp_path, "pre.ini", MODEL + domain("bible"))
    run_moe(["train", pre_cfg, f"train.out_dir={tmp_path}", "train.name=pre", "train.steps=4"])
    base = tmp_path / "pre" / "ckpt_000004.h5"
    ft_cfg = write(tmp_path, "ft.ini", MODEL + domain("python"))
    sel = ["finetune.train=layers.*.experts.1, router", "train.steps=5", f"finetune.init={base}",
           f"train.out_dir={tmp_path}"]
    run_moe(["finetune", ft_cfg, "train.name=full"] + sel)
    run_moe(["finetune", ft_cfg, "train.name=delta", "finetune.delta=true"] + sel)
    delta = tmp_path / "delta" / "ckpt_000005.h5"
    with h5py.File(delta) as f:
        assert f.attrs["kind"] in (b"delta", "delta")
        names = []
        f["model"].visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(names) == sorted(
            [f"layers/{l}/experts/1/{w}" for l in (0, 1) for w in ("w1", "w2", "w3")] +
            [f"layers/{l}/router/gate" for l in (0, 1)])
    merged = tmp_path / "merged.h5"
    run_moe(["merge", base, delta, merged])
    a, b = params(merged), params(tmp_path / "full" / "ckpt_000005.h5")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    other = tmp_path / "other" / "ckpt_000004.h5"
    run_moe(["train", pre_cfg, f"train.out_dir={tmp_path}", "train.name=other", "train.steps=4",
             "train.seed=7"])
    bad = run_moe(["merge", other, delta, tmp_path / "bad.h5"], check=False)
    assert bad.returncode != 0 and "was not trained from" in bad.stderr
    assert not (tmp_path / "bad.h5").exists()
    # The full fine-tune is a full checkpoint: no base fingerprint, so merge refuses it as a
    # delta and export takes it.
    full = tmp_path / "full" / "ckpt_000005.h5"
    with h5py.File(full) as f:
        assert f.attrs["kind"] in (b"full", "full") and f.attrs["base_fingerprint"] == 0
    bad = run_moe(["merge", base, full, tmp_path / "bad.h5"], check=False)
    assert bad.returncode != 0 and "is not a delta checkpoint" in bad.stderr
    run_moe(["export", full, tmp_path / "hf"])
    assert (tmp_path / "hf" / "config.json").exists()


def test_selector_errors_are_one_line(tmp_path, corpus):
    pre_cfg = write(tmp_path, "pre.ini", MODEL + domain("bible"))
    run_moe(["train", pre_cfg, f"train.out_dir={tmp_path}", "train.name=pre", "train.steps=1"])
    base = tmp_path / "pre" / "ckpt_000001.h5"
    for expr, msg in (("layers.9.experts.1", "layers.9"), ("experts.x", "experts.x"),
                      ("layers.0.experts.7", "experts.7")):
        run = run_moe(["finetune", pre_cfg, f"finetune.init={base}", f"finetune.train={expr}",
                       f"train.out_dir={tmp_path}", "train.name=bad"], check=False)
        assert run.returncode != 0 and msg in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr


def test_finetune_refuses_other_architecture(tmp_path, corpus):
    pre_cfg = write(tmp_path, "pre.ini", MODEL + domain("bible"))
    run_moe(["train", pre_cfg, f"train.out_dir={tmp_path}", "train.name=pre", "train.steps=1"])
    base = tmp_path / "pre" / "ckpt_000001.h5"
    run = run_moe(["finetune", pre_cfg, f"finetune.init={base}", "model.d_model=64",
                   f"train.out_dir={tmp_path}", "train.name=bad"], check=False)
    assert run.returncode != 0 and "d_model" in run.stderr, run.stderr
    # Training settings are not architecture: a fine-tune may change them.
    run_moe(["finetune", pre_cfg, f"finetune.init={base}", "router.aux_coef=0.05",
             "router.capacity_factor=1.0", f"train.out_dir={tmp_path}", "train.name=ok",
             "train.steps=1"])


def test_finetune_keeps_the_expert_biases_it_was_trained_with(tmp_path, corpus):
    cfg = write(tmp_path, "pre.ini", MODEL + domain("bible"))
    run_moe(["train", cfg, f"train.out_dir={tmp_path}", "train.name=pre", "train.steps=2",
             "router.score=sigmoid", "router.bias_gamma=0.01"])
    base = tmp_path / "pre" / "ckpt_000002.h5"
    ft = ["finetune", cfg, f"finetune.init={base}", f"train.out_dir={tmp_path}", "train.steps=1",
          "router.score=sigmoid"]
    bad = run_moe(ft + ["train.name=nobias", "router.bias_gamma=0"], check=False)
    err = bad.stderr.strip().splitlines()
    assert bad.returncode != 0 and len(err) == 1, bad.stderr
    assert "trained with expert biases" in err[0] and str(base) in err[0]
    run_moe(ft + ["train.name=slow", "router.bias_gamma=0.0001"])
    run_moe(ft + ["train.name=frozen", "router.bias_gamma=0", "router.expert_bias=true"])
