"""Runs every C test suite (build/tests/test_*) under pytest, one pytest test per C test.

Each suite binary is a cmocka group: `--list` names its tests and `--only NAME` runs one.
"""
import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# make SANITIZE=1 test builds elsewhere (Makefile) and says where.
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
SUITES = sorted(glob.glob(os.path.join(BUILD, "tests", "test_*")))


def _cases():
    cases = []
    for suite in SUITES:
        if suite.endswith(".d") or not os.access(suite, os.X_OK):
            continue
        names = subprocess.run([suite, "--list"], capture_output=True, text=True, check=True)
        for name in names.stdout.split():
            cases.append(pytest.param(suite, name, id=f"{os.path.basename(suite)}::{name}"))
    return cases


@pytest.mark.parametrize("suite,name", _cases())
def test_c(suite, name):
    run = subprocess.run([suite, "--only", name], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout + run.stderr   # cmocka prints its verdict on stderr
    assert "[  PASSED  ] 1 test(s)." in out, out
