"""NCCL on one GPU: `mpirun -np 1 moe train ... train.device=cuda` against the same run
without MPI. Under an MPI launcher a GPU run sums its gradients through NCCL even at one
rank (dist/nccl.c), so one GPU checks the communicator's set-up (unique id over MPI,
ncclCommInitRank on the rank's GPU), the per-layer all-reduces started during backward on
NCCL's own stream, and the backend's stream waiting for them before the optimizer. A sum
over one rank is the identity, so every weight, moment and loss must be the same bits: a
missing wait shows as the optimizer reading a gradient NCCL is still writing, a wrong
bucket as a layer left unsummed (equal here) or summed twice (doubled).

Expert parallelism needs a GPU per rank (NCCL refuses two ranks on one GPU): at 2 GPUs
EP = 2, at 4 GPUs EP = 2 x DP = 2 with ZeRO-1, each against one GPU running the same
global batch. These have never run (no machine with several GPUs when they were
written, 2026-12-06); their bound is the GPU-against-CPU one of test_cuda_train.py for
the loss (1e-4 relative: the EP run adds its experts' products block by block, another
order of fp32 sums) and 1e-3 of each tensor's largest value for the weights after 10
steps (AdamW's 1/sqrt(v) can enlarge last-bit differences of near-zero gradients; a
lost, doubled or misrouted block moves a weight by the learning rate each step), to be
tightened once measured. Skips, saying why, without a CUDA build, a GPU or mpirun, or
with fewer GPUs than ranks."""
import os
import shutil
import subprocess

import numpy as np
import pytest

from test_cuda_train import MOE, ROOT, config, gpu, losses, params, train  # noqa: F401

# The GPU bundle carries its own mpirun (tests/cuda/gpu_check.sh says where).
MPIRUN = os.environ.get("MOE_MPIRUN") or shutil.which("mpirun")
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_rank_nccl_equals_the_run_without_mpi(gpu, config, tmp_path, precision):
    if MPIRUN is None:
        pytest.skip("mpirun not found (Debian: openmpi-bin; the GPU bundle carries one)")
    words = ["train.steps=10", "train.device=cuda", "train.grad_accum=2",
             f"train.precision={precision}", "router.noise=shazeer"]
    plain = train(config, tmp_path, "plain", *words)
    run = subprocess.run([MPIRUN, "-np", "1", MOE, "train", str(config),
                          f"train.out_dir={tmp_path}", "train.name=nccl", *words],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    line = next((l for l in run.stdout.splitlines() if l.startswith("dist: NCCL")), None)
    assert line, "no NCCL communicator was made:\n" + run.stdout
    print(line)
    a, b = params(plain / "ckpt_000010.h5"), params(tmp_path / "nccl" / "ckpt_000010.h5")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert losses(plain) == losses(tmp_path / "nccl")


def gpu_count():
    """The GPUs nvidia-smi lists (CUDA_VISIBLE_DEVICES applies to ./moe, not to it)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi not found: cannot count the GPUs")
    run = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    return sum(1 for l in run.stdout.splitlines() if l.startswith("GPU "))


@pytest.mark.parametrize("ranks,extra", [(2, []), (4, ["dist.zero=1"])])
def test_expert_parallel_equals_one_gpu(gpu, config, tmp_path, ranks, extra):
    if MPIRUN is None:
        pytest.skip("mpirun not found (Debian: openmpi-bin; the GPU bundle carries one)")
    have = gpu_count()
    if have < ranks:
        pytest.skip(f"{ranks} ranks need {ranks} GPUs (NCCL: one rank per GPU); {have} here")
    words = ["train.steps=10", "train.device=cuda", "train.precision=fp32",
             f"train.grad_accum={ranks}", "router.capacity_factor=1.0"]
    one = train(config, tmp_path, "one", *words)
    run = subprocess.run([MPIRUN, "-np", str(ranks), MOE, "train", str(config),
                          f"train.out_dir={tmp_path}", "train.name=ep", *words,
                          "dist.expert_parallel=2", *extra],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "expert parallel: 2 ranks, each computing 2 of the 4 experts" in run.stdout
    if ranks > 2:   # the expert groups' own communicator
        assert "dist: NCCL communicator of each expert group, 2 rank(s) each" in run.stdout
    l1, l2 = losses(one), losses(tmp_path / "ep")
    assert len(l1) == 10 and len(l2) == 10
    np.testing.assert_allclose(l2, l1, rtol=1e-4)
    a, b = params(one / "ckpt_000010.h5"), params(tmp_path / "ep" / "ckpt_000010.h5")
    assert a.keys() == b.keys()
    assert any(k.startswith("layers/0/experts/") for k in a)
    for k in a:
        scale = max(float(np.max(np.abs(a[k]))), 1e-30)
        err = float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) / scale
        print(f"EP at {ranks} GPUs: {k}: {err:.3g}")
        assert err <= 1e-3, f"{k} differs by {err:.3g} of its largest value"
