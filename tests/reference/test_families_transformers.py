"""transformers' own classes against moe.c, in `make test`: for Mixtral, OLMoE (64
experts, top-8) and Qwen2-MoE (a gated shared expert, a dense layer), transformers 4.45.2
(the venv `make deps-test` makes over Debian's torch 1.13) builds a tiny random model;
`moe import` reads it and `moe eval` gives transformers' logits within 1e-5 of the largest
logit, and `moe export` of the import gives every tensor back bit for bit and loads in
transformers again (families_transformers.py, `random`). Qwen3-MoE needs transformers
4.51 and torch 2: that script by hand, and test_families_numpy.py here."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE = os.path.abspath(os.environ.get("MOE_BIN", os.path.join(ROOT, "moe")))
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "families_transformers.py")
FAMILIES = ("mixtral", "olmoe", "qwen2_moe")


def test_transformers_random_models_import_export(reference_line):
    # No skip: a missing venv is a failure (`make deps-test` makes it).
    python = os.path.join(BUILD, "venv-hf", "bin", "python")
    assert os.path.exists(python), f"{python}: run make deps-test"
    run = subprocess.run([python, SCRIPT, "random", *FAMILIES], cwd=ROOT, capture_output=True,
                         text=True, timeout=1200, env={**os.environ, "MOE_BIN": MOE})
    lines = [l for l in run.stdout.splitlines() if l.split(" ")[0] in FAMILIES]
    for line in lines:
        reference_line(line)
    assert run.returncode == 0 and len(lines) == len(FAMILIES), run.stdout + run.stderr[-3000:]
