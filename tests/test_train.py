"""`moe train` end to end on small fixture domains: config errors, overfitting one batch,
validation loss falling on every domain, and the run directory's files."""
import csv
import math
import os
import re
import subprocess

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))

SMALL_MODEL = [
    "model.layers=2", "model.d_model=32", "model.heads=2", "model.kv_heads=1",
    "model.seq_len=32", "model.experts=4", "model.expert_ffn_dim=32", "train.threads=1",
    "train.sample_tokens=0",
]


def run_moe(args, check=True):
    run = subprocess.run([MOE] + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def write_domain(tmp_path, name, text):
    d = tmp_path / name
    d.mkdir()
    (d / "train.txt").write_text(text)
    (d / "val.txt").write_text(text[: len(text) // 4])
    return d


def fixture_config(tmp_path, domains, extra=""):
    lines = []
    for name, d in domains.items():
        lines += [f"[domain {name}]", "kind = text", f"train = {d}/train.txt",
                  f"val = {d}/val.txt", ""]
    path = tmp_path / "run.ini"
    path.write_text("\n".join(lines) + extra)
    return path


def english(n):
    words = ("the quick brown fox jumps over the lazy dog while a small bird sings "
             "in the old tree near the river and the sun goes down").split()
    out, i = [], 0
    while sum(len(w) + 1 for w in out) < n:
        out.append(words[(i * 7 + i // 3) % len(words)])
        i += 1
    return " ".join(out)


def digits(n):
    return "".join(f"{i * 37 % 1000:03d}," for i in range(n // 4))


def code(n):
    block = "def f(x):\n    return x * 2 + 1\n\nfor i in range(10):\n    print(f(i))\n"
    return (block * (n // len(block) + 1))[:n]


@pytest.mark.parametrize("override,expect", [
    (["router.top_k=9"], "router.top_k = 9"),
    (["model.d_modle=64"], "unknown key 'model.d_modle'"),
    (["router.score=softmaxx"], "expected one of softmax|sigmoid"),
    (["model.heads=3"], "model.heads = 3 must divide model.d_model"),
    (["model.experts=2", "router.top_k=3"], "router.top_k = 3 exceeds model.experts = 2"),
    (["router.groups=3"], "router.groups = 3 must divide model.experts = 4"),
    (["router.groups=2", "router.topk_groups=3"], "router.topk_groups = 3 exceeds router.groups = 2"),
    (["router.groups=2", "router.topk_groups=1", "router.top_k=3"],
     "router.top_k = 3 exceeds the 2 experts of router.topk_groups = 1 groups of 2"),
    (["router.groups=4", "router.topk_groups=2", "router.group_score=top2"],
     "router.group_score = top2 needs at least 2 experts per group"),
    (["router.groups=2", "router.topk_groups=1", "router.select=hash"],
     "router.topk_groups = 1 < router.groups = 2 needs router.select = topk"),
    (["router.groups=2", "router.topk_groups=1", "router.noise=shazeer"],
     "router.topk_groups = 1 < router.groups = 2 and router.noise = shazeer do not combine"),
    (["router.expert_bias=true", "router.select=expert_choice"],
     "an expert bias (router.bias_gamma > 0 or router.expert_bias = true) needs router.select"),
    (["model.first_dense_layers=2"], "leaves no MoE layer among model.layers = 2"),
    (["router.gate_scale=0"], "router.gate_scale"),
    # multi-head latent attention: its sizes are required, YaRN needs it
    (["model.attention=mla", "model.kv_lora_rank=8", "model.qk_nope_dim=4",
      "model.v_head_dim=4"], "model.attention = mla needs model.qk_rope_dim > 0"),
    (["model.attention=mla", "model.kv_lora_rank=8", "model.qk_nope_dim=4",
      "model.qk_rope_dim=3", "model.v_head_dim=4"], "model.qk_rope_dim = 3 must be even"),
    (["model.rope_scaling=yarn"], "model.rope_scaling = yarn needs model.attention = mla"),
    (["model.attention=mla", "model.kv_lora_rank=8", "model.qk_nope_dim=4",
      "model.qk_rope_dim=4", "model.v_head_dim=4", "model.qk_norm=head"],
     "model.attention = mla has no q/k/v projections for model.qk_norm"),
    (["train.steps=ten"], "train.steps = 'ten': expected an integer"),
    # A value's newline prints escaped (base/util.c): the error stays one line.
    (["train.steps=1\n0"], "train.steps = '1\\n0': expected an integer"),
    # Nor does a value that holds a hint's own text start a line: only the format's does.
    (["train.steps=1\nHINT: 0"], "train.steps = '1\\nHINT: 0': expected an integer"),
])
def test_config_errors_are_one_line(tmp_path, override, expect):
    cfg = fixture_config(tmp_path, {"a": write_domain(tmp_path, "a", english(4000))})
    run = run_moe(["train", str(cfg)] + SMALL_MODEL + override, check=False)
    assert run.returncode != 0
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and expect in err[0], run.stderr


def test_config_file_error_names_file_and_line(tmp_path):
    cfg = tmp_path / "bad.ini"
    cfg.write_text("[model]\nlayers = 2\nwidth = 64\n")
    run = run_moe(["train", str(cfg)], check=False)
    assert run.returncode != 0
    assert f"{cfg}:3: unknown key 'model.width'" in run.stderr


def test_single_batch_overfits(tmp_path):
    # A domain of exactly seq_len + 1 bytes has one window: every row is the same batch.
    text = "Sphinx of black quartz, judge my vow!"[:33]
    d = tmp_path / "one"
    d.mkdir()
    (d / "train.txt").write_text(text)
    (d / "val.txt").write_text(text + text[1:])   # two windows: one validation batch
    cfg = fixture_config(tmp_path, {"one": d})
    run_moe(["train", str(cfg)] + SMALL_MODEL + [
        "train.batch_size=2", "train.steps=150", "train.eval_every=0", "optim.lr=1e-2",
        "optim.warmup_steps=10", f"train.out_dir={tmp_path}/runs", "train.name=overfit"])
    rows = list(csv.DictReader(open(tmp_path / "runs/overfit/metrics.csv")))
    assert len(rows) == 150
    assert float(rows[-1]["ce"]) < 0.05, rows[-1]


def test_short_run_lowers_every_domain_val_loss(tmp_path):
    domains = {n: write_domain(tmp_path, n, f(40000))
               for n, f in (("english", english), ("digits", digits), ("code", code))}
    cfg = fixture_config(tmp_path, domains)
    run = run_moe(["train", str(cfg)] + SMALL_MODEL + [
        "train.batch_size=8", "train.steps=60", "train.eval_every=30",
        f"train.out_dir={tmp_path}/runs", "train.name=short"])
    evals = re.findall(r"eval step (\d+): val loss (.*) \| mean", run.stdout)
    assert [int(s) for s, _ in evals] == [0, 30, 60], run.stdout
    first = dict(re.findall(r"(\w+) ([\d.]+)", evals[0][1]))
    last = dict(re.findall(r"(\w+) ([\d.]+)", evals[-1][1]))
    assert set(first) == set(domains)
    for name in domains:
        # Before training, near-zero logits give ln(256) nats per byte.
        assert abs(float(first[name]) - math.log(256)) < 0.2, first
        assert float(last[name]) < float(first[name]) - 1.0, (name, first, last)


def test_too_little_validation_data_fails_before_training(tmp_path):
    d = tmp_path / "short"
    d.mkdir()
    (d / "train.txt").write_text(english(4000))
    (d / "val.txt").write_text(english(40))
    cfg = fixture_config(tmp_path, {"short": d})
    run = run_moe(["train", str(cfg)] + SMALL_MODEL + ["train.batch_size=4"], check=False)
    assert run.returncode != 0 and "step 1/" not in run.stdout
    assert "domain short: validation data holds 1 windows" in run.stderr, run.stderr


def test_run_directory_files(tmp_path):
    cfg = fixture_config(tmp_path, {"a": write_domain(tmp_path, "a", english(8000))})
    out = tmp_path / "runs"
    run_moe(["train", str(cfg)] + SMALL_MODEL + [
        "train.batch_size=2", "train.steps=3", "train.eval_every=0",
        f"train.out_dir={out}", "train.name=files"])
    run_dir = out / "files"
    metrics = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(r["step"]) for r in metrics] == [0, 1, 2]
    assert metrics[-1]["val_a"] != "" and metrics[0]["val_a"] == ""
    experts = list(csv.DictReader(open(run_dir / "experts.csv")))
    assert len(experts) == 3 * 2 * 4   # steps x MoE layers x experts
    for step in range(3):
        rows = [r for r in experts if int(r["step"]) == step and r["layer"] == "0"]
        assert sum(int(r["tokens"]) for r in rows) == 2 * 32 * 2   # B*T*k assignments
        assert abs(sum(float(r["fraction"]) for r in rows) - 1.0) < 1e-5
    # The resolved config is a complete config: training again from it works.
    rerun = run_moe(["train", str(run_dir / "config.ini"), "train.steps=1",
                     f"train.out_dir={out}", "train.name=again"])
    assert "step 1/1" in rerun.stdout


def test_kept_activations_equal_the_second_forward(tmp_path):
    """train.keep_activations (one activation set per micro-batch) and the pooling forward
    pass it replaces give the same losses and weights, bit for bit."""
    cfg = fixture_config(tmp_path, {"a": write_domain(tmp_path, "a", english(40000))})
    outputs = {}
    for keep in ("true", "false"):
        run = run_moe(["train", str(cfg)] + SMALL_MODEL + [
            "train.batch_size=4", "train.grad_accum=3", "train.steps=5", "train.eval_every=0",
            "router.noise=shazeer", f"train.keep_activations={keep}",
            f"train.out_dir={tmp_path}/runs", f"train.name={keep}"])
        assert ("activations 3 x" if keep == "true" else "activations 1 x") in run.stdout
        rows = list(csv.DictReader(open(tmp_path / f"runs/{keep}/metrics.csv")))
        ckpt = tmp_path / f"runs/{keep}/ckpt_000005.h5"
        with h5py.File(ckpt) as f:
            weights = {}
            f["model"].visititems(lambda n, o: weights.__setitem__(n, o[()])
                                  if isinstance(o, h5py.Dataset) else None)
        outputs[keep] = ([(r["loss"], r["lb"], r["importance"], r["load"], r["grad_norm"])
                          for r in rows], weights)
    (loss_a, w_a), (loss_b, w_b) = outputs["true"], outputs["false"]
    assert len(loss_a) == 5 and loss_a == loss_b
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        assert np.array_equal(w_a[k], w_b[k]), k


def test_device_errors_and_notes(tmp_path):
    """train.device: a bad name is a one-line error; commands other than train and finetune
    run on the CPU and say so when the config names cuda; bf16 and grouped expert GEMMs on
    the CPU are refused."""
    cfg = fixture_config(tmp_path, {"a": write_domain(tmp_path, "a", english(8000))})
    words = SMALL_MODEL + ["train.steps=2", "train.eval_every=0", f"train.out_dir={tmp_path}",
                           "train.name=dev"]
    bad = run_moe(["train", str(cfg)] + words + ["train.device=gpu"], check=False)
    assert bad.returncode != 0 and "train.device = 'gpu': expected one of cpu|cuda" in bad.stderr
    bf16 = run_moe(["train", str(cfg)] + words + ["train.precision=bf16"], check=False)
    assert bf16.returncode != 0 and "CPU backend computes in fp32 only" in bf16.stderr
    grouped = run_moe(["train", str(cfg)] + words + ["train.expert_gemm=grouped"], check=False)
    assert grouped.returncode != 0 and "train.expert_gemm = grouped: the cpu backend" in grouped.stderr
    run = run_moe(["train", str(cfg)] + words)
    assert "device cpu, fp32" in run.stdout
    ev = run_moe(["eval", str(tmp_path / "dev"), "train.device=cuda"])
    assert "this command runs on the CPU" in ev.stderr and "mean" in ev.stdout
