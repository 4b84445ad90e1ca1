"""The trainer on the GPU (train.device=cuda) against the same runs on the CPU: fp32 loss
sequence, bf16 products, bit-identical resume, and freezing. Each test skips, saying why,
when this build has no CUDA backend or the machine no usable GPU; none is reported as
passed without running on one.

Tolerances: fp32 on the GPU differs from the CPU only in the order of fp32 sums (cuBLAS
against OpenBLAS, the kernels' reduction trees against OpenMP's), so 20 steps stay within
1e-4 relative. bf16 rounds both operands of every product but the router's to 8
significant bits (relative error up to 2^-9 each, so up to about 4e-3 per product before
sums average it down), and attention runs cuDNN's fused kernel, which also rounds its
probabilities and output to bf16 (the same 2^-9 per value); through 20 steps of AdamW the loss may drift by a few parts per
thousand, and 2e-2 relative is the bound: well above that drift, well below the 0.3 to
1.5 nats a wrong product (a transposed operand, a lost accumulation) moves the loss in the
first steps."""
import csv
import os
import shutil
import subprocess

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# make SANITIZE=1 test builds elsewhere (Makefile) and says where.
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))
CUDA_OPS = os.path.join(BUILD, "tests", "cuda_ops")
EXIT_SKIP = 77

MODEL = """
[model]
layers = 2
d_model = 64
heads = 4
kv_heads = 2
seq_len = 32
experts = 4
expert_ffn_dim = 64
[router]
top_k = 2
[train]
batch_size = 8
sample_tokens = 0
eval_every = 0
[data]
val_tokens = 4096
[domain text]
kind = text
train = {text}
val = {text}
"""


@pytest.fixture(scope="module")
def gpu():
    """Skips the module's tests unless the CUDA op binary finds a usable GPU."""
    if not os.access(CUDA_OPS, os.X_OK):
        pytest.skip("CUDA backend not built (nvcc not found at build time)")
    run = subprocess.run([CUDA_OPS, "--only", "memory"], capture_output=True, text=True,
                         timeout=120)
    if run.returncode == EXIT_SKIP:
        pytest.skip(next((l for l in run.stdout.splitlines() if l.startswith("SKIP:")),
                         run.stdout.strip()))
    assert run.returncode == 0, run.stdout + run.stderr


def run_moe(args):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.fixture
def config(tmp_path):
    text = tmp_path / "text.txt"
    words = "the quick brown fox jumps over the lazy dog, then sleeps by the river. "
    text.write_text("".join(f"{i}: {words}" for i in range(400)))
    path = tmp_path / "run.ini"
    path.write_text(MODEL.format(text=text))
    return path


def losses(run_dir):
    """The loss column (the third) of metrics.csv; a resumed run's file has no header."""
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return [float(r[2]) for r in csv.reader(f) if r and r[0].isdigit()]


def train(config, tmp_path, name, *words):
    run_moe(["train", config, f"train.out_dir={tmp_path}", f"train.name={name}", *words])
    return tmp_path / name


def params(path):
    out = {}
    with h5py.File(path, "r") as f:
        f["model"].visititems(
            lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def relative(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("precision,rtol,expert_gemm", [
    ("fp32", 1e-4, "loop"), ("bf16", 2e-2, "loop"), ("fp32", 1e-4, "grouped"),
    ("bf16", 2e-2, "grouped")])
def test_loss_sequence_matches_cpu(gpu, config, tmp_path, precision, rtol, expert_gemm):
    steps = "train.steps=20"
    cpu = losses(train(config, tmp_path, "cpu", steps))
    dev = losses(train(config, tmp_path, "gpu", steps, "train.device=cuda",
                       f"train.precision={precision}", f"train.expert_gemm={expert_gemm}"))
    assert len(cpu) == len(dev) == 20
    err = relative(dev, cpu)
    print(f"{precision}, {expert_gemm}: max relative loss difference over 20 steps {err:.2e}")
    assert err <= rtol, (cpu, dev)


def memory_line(run):
    return next(l for l in run.stdout.splitlines() if l.startswith("memory ("))


def test_fused_attention_keeps_no_probabilities(gpu, config, tmp_path):
    """bf16 runs cuDNN's fused attention: the activations lose the (B, H, T, T)
    probabilities the fp32 run keeps (2 layers x 8 x 4 x 128 x 128 floats, 4.2 MB, at
    seq_len 128), and the start-up line says which attention runs."""
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = run_moe(["train", config, f"train.out_dir={tmp_path}",
                                   f"train.name={precision}", "train.steps=1",
                                   "model.seq_len=128", "train.device=cuda",
                                   f"train.precision={precision}"])
    assert "plain attention kernels (fp32)" in runs["fp32"].stdout
    if "fused attention (cuDNN)" not in runs["bf16"].stdout:
        pytest.skip("cuDNN's fused attention is unavailable here: " + runs["bf16"].stderr.strip())
    acts = {p: float(memory_line(r).split("activations 1 x ")[1].split(" MB")[0])
            for p, r in runs.items()}
    probs = 2 * 8 * 4 * 128 * 128 * 4 / 1e6
    assert acts["fp32"] - acts["bf16"] >= 0.9 * probs, (memory_line(runs["fp32"]),
                                                        memory_line(runs["bf16"]))
    assert "bf16 weight copy" in memory_line(runs["bf16"])


def test_resume_on_gpu_is_bit_identical(gpu, config, tmp_path):
    words = ["train.steps=6", "train.ckpt_every=3", "train.keep=5", "train.device=cuda",
             "router.noise=shazeer", "train.grad_accum=2"]
    full = train(config, tmp_path, "full", *words)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "ckpt_000003.h5", part)
    run_moe(["train", "--resume", part])
    a, b = params(full / "ckpt_000006.h5"), params(part / "ckpt_000006.h5")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert losses(full)[3:] == losses(part)


def test_freezing_on_gpu(gpu, config, tmp_path):
    base = train(config, tmp_path, "base", "train.steps=5", "train.device=cuda")
    ft = run_moe(["finetune", config, f"finetune.init={base / 'ckpt_000005.h5'}",
                  "finetune.train=layers.1.experts.2", "train.device=cuda",
                  f"train.out_dir={tmp_path}", "train.name=ft", "train.steps=5"])
    n = 3 * 64 * 64
    assert f"{n} trainable params, optimizer state {2 * 4 * n / 1e6:.2f} MB" in ft.stdout
    a, b = params(base / "ckpt_000005.h5"), params(tmp_path / "ft" / "ckpt_000005.h5")
    chosen = {f"layers/1/experts/2/{w}" for w in ("w1", "w2", "w3")}
    for k in a:
        if k in chosen:
            assert not np.array_equal(a[k], b[k]), f"{k} trains but did not change"
        else:
            assert np.array_equal(a[k], b[k]), f"{k} is frozen but changed"
