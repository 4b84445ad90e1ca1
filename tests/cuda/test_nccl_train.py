"""NCCL on one GPU: `mpirun -np 1 moe train ... train.device=cuda` against the same run
without MPI. Under an MPI launcher a GPU run sums its gradients through NCCL even at one
rank (dist/nccl.c), so one GPU checks the communicator's set-up (unique id over MPI,
ncclCommInitRank on the rank's GPU), the per-layer all-reduces started during backward on
NCCL's own stream, and the backend's stream waiting for them before the optimizer. A sum
over one rank is the identity, so every weight, moment and loss must be the same bits: a
missing wait shows as the optimizer reading a gradient NCCL is still writing, a wrong
bucket as a layer left unsummed (equal here) or summed twice (doubled). Several GPUs
(the sums themselves, ZeRO-1's blocks, the all-to-all) are unmeasured until a machine
has them. Skips, saying why, without a CUDA build, a GPU or mpirun."""
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
