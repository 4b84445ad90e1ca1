"""`moe sample` (KV cache, greedy, a batch of two prompts) against transformers 4.45.2 on
tiny random Mixtral, OLMoE and Qwen2-MoE models (generate_transformers.py): the cached
decode's logits at every position within 1e-5 of the largest logit of transformers' full
forward, and the greedy ids equal to `generate(do_sample=False)`."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE = os.path.abspath(os.environ.get("MOE_BIN", os.path.join(ROOT, "moe")))
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate_transformers.py")
FAMILIES = ("mixtral", "olmoe", "qwen2_moe")


def test_greedy_generation_equals_transformers(reference_line):
    # No skip: a missing venv is a failure (`make deps-test` makes it).
    python = os.path.join(BUILD, "venv-hf", "bin", "python")
    assert os.path.exists(python), f"{python}: run make deps-test"
    run = subprocess.run([python, SCRIPT, *FAMILIES], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "MOE_BIN": MOE})
    lines = [l for l in run.stdout.splitlines() if l.split(" ")[0] in FAMILIES]
    for line in lines:
        reference_line(line)
    assert run.returncode == 0 and len(lines) == len(FAMILIES), run.stdout + run.stderr[-3000:]
