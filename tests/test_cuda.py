"""The CUDA backend: every CUDA op against the CPU op (tests/cuda/test_cuda_ops.c, built as
build/tests/cuda_ops whenever nvcc is found). Skipped, saying why, when this build has no
CUDA backend or the machine has no usable GPU; never reported as passed in that case."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# make SANITIZE=1 test builds elsewhere (Makefile) and says where.
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
BINARY = os.path.join(BUILD, "tests", "cuda_ops")
EXIT_SKIP = 77   # the binary's "no CUDA device" status


def test_cuda_ops_match_cpu():
    if not os.access(BINARY, os.X_OK):
        pytest.skip("CUDA backend not built (nvcc not found at build time)")
    run = subprocess.run([BINARY], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    if run.returncode == EXIT_SKIP:
        reason = next((l for l in out.splitlines() if l.startswith("SKIP:")), out.strip())
        pytest.skip(reason)
    assert run.returncode == 0, out
    assert "FAIL" not in out, out
