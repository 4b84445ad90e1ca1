"""transformers' own classes against moe.c, in `make test`: for Mixtral, OLMoE (64
experts, top-8) and Qwen2-MoE (a gated shared expert, a dense layer), transformers 4.45.2
(the venv `make deps-test` makes over Debian's torch 1.13) builds a tiny random model;
`moe import` reads it and `moe eval` gives transformers' logits within 1e-5 of the largest
logit, and `moe export` of the import gives every tensor back bit for bit and loads in
transformers again (families_transformers.py, `random`); and `moe sample`'s greedy
generation through its KV cache on the same models equals transformers' `generate()`
(generate_transformers.py). Qwen3-MoE needs transformers 4.51 and torch 2, DeepSeek-V2
and -V3 transformers 5 (DeepseekV2/V3ForCausalLM): those scripts by hand, and
test_families_numpy.py here; the DeepSeek test below runs them where the venv's
transformers has the classes and skips saying so where it has not."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE = os.path.abspath(os.environ.get("MOE_BIN", os.path.join(ROOT, "moe")))
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ("mixtral", "olmoe", "qwen2_moe")
DEEPSEEK = ("deepseek_v2", "deepseek_v3")


def venv_python():
    # No skip: a missing venv is a failure (`make deps-test` makes it).
    python = os.path.join(BUILD, "venv-hf", "bin", "python")
    assert os.path.exists(python), f"{python}: run make deps-test"
    return python


def run_per_family(script, args, timeout, reference_line, families=FAMILIES):
    """Runs a reference script in the venv; it prints one line per family, which must all
    come."""
    python = venv_python()
    run = subprocess.run([python, os.path.join(HERE, script), *args, *families], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "MOE_BIN": MOE})
    lines = [l for l in run.stdout.splitlines() if l.split(" ")[0] in families]
    for line in lines:
        reference_line(line)
    assert run.returncode == 0 and len(lines) == len(families), run.stdout + run.stderr[-3000:]


def test_transformers_random_models_import_export(reference_line):
    run_per_family("families_transformers.py", ["random"], 1200, reference_line)


def test_greedy_generation_equals_transformers(reference_line):
    """`moe sample` (KV cache, greedy, a batch of two prompts) on the same tiny random
    models (generate_transformers.py): the cached decode's logits at every position within
    1e-5 of the largest logit of transformers' full forward, and the greedy ids equal to
    `generate(do_sample=False)`."""
    run_per_family("generate_transformers.py", [], 600, reference_line)


def test_transformers_deepseek_random_models_import_export(reference_line):
    """DeepseekV2ForCausalLM and DeepseekV3ForCausalLM tiny random models (MLA with and
    without a compressed query, YaRN, group-limited greedy and noaux_tc routing with a
    drawn expert bias, a dense first layer, shared experts): as the test above."""
    probe = subprocess.run([venv_python(), "-c", "import transformers as t; print(t.__version__, "
                            "hasattr(t, 'DeepseekV2ForCausalLM') and "
                            "hasattr(t, 'DeepseekV3ForCausalLM'))"],
                           capture_output=True, text=True, timeout=300)
    version, has = (probe.stdout.split() + ["?", "False"])[:2]
    if has != "True":
        pytest.skip(f"transformers {version} in build/venv-hf has no DeepseekV2/V3ForCausalLM "
                    "(transformers 5 has): run tests/reference/families_transformers.py random "
                    "deepseek_v2 deepseek_v3 by hand in a transformers 5 venv")
    run_per_family("families_transformers.py", ["random"], 1200, reference_line, DEEPSEEK)
