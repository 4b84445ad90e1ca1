"""The README's walk-through "Fine-tune an expert of a real model", end to end, on a tiny
random OLMoE that transformers 4.45.2 makes (olmoe_loop.py, in build/venv-hf) with a
Llama-3-style byte-level BPE tokenizer.json that PyPI `tokenizers` trains here:

  moe import -> moe experts (the domain's experts) -> moe finetune finetune.train=auto
  -> moe eval -> moe sample --temperature 0 -> moe export -> AutoTokenizer and
  AutoModelForCausalLM load the export, and generate(do_sample=False) continues the
  prompt token for token as moe sample did.

Also: only the experts the fine-tune chose changed (every other tensor of the export is
bit for bit the transformers model's, and imports back bit for bit), the domain's held-out
loss went down, and `moe route` shows the tokenizer's text of each token."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_hf import params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE = os.path.abspath(os.environ.get("MOE_BIN", os.path.join(ROOT, "moe")))
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
HF_PY = os.path.join(BUILD, "venv-hf", "bin", "python")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "olmoe_loop.py")
DEFAULT = os.path.join(ROOT, "data", "default")
PROMPT, NEW = "def main(", 10
P = 0.2   # finetune.p, the default


def run(args, check=True):
    r = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, timeout=600)
    if check:
        assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")
    return r


def moe(*args):
    return run([MOE, *args]).stdout.decode()


def head(src, dst, n):
    with open(src, encoding="utf-8") as f:
        dst.write_text(f.read()[:n], encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    # No skip: a missing venv is a failure (`make deps-test` makes it).
    assert os.path.exists(HF_PY), f"{HF_PY}: run make deps-test"
    run([MOE, "prepare"])
    d = tmp_path_factory.mktemp("loop")
    corpus = "".join(open(os.path.join(DEFAULT, dom, "train.txt"), encoding="utf-8").read()
                     [:150000] for dom in ("fortunes", "bible", "python"))
    (d / "corpus.txt").write_text(corpus, encoding="utf-8")
    run([HF_PY, SCRIPT, "make", d / "corpus.txt", d / "hf"])
    return d


def esft_selected(rows, p):
    """Per layer, the fewest experts whose token scores (normalised in the layer) reach p."""
    picked = set()
    for layer in {r["layer"] for r in rows}:
        scores = sorted(((float(r["token_score"]), int(r["expert"])) for r in rows
                         if r["layer"] == layer), reverse=True)
        total, kept = sum(s for s, _ in scores), 0.0
        for s, e in scores:
            if kept >= p * total:
                break
            kept += s
            picked.add((int(layer), e))
    return picked


def loss(text):
    return float(re.search(r"^data\s+([\d.]+)", text, re.M).group(1))


def test_finetune_an_expert_of_a_real_model(loop, reference_line):
    d = loop
    domain = head(os.path.join(DEFAULT, "python", "train.txt"), d / "python.txt", 200000)
    held_out = head(os.path.join(DEFAULT, "python", "val.txt"), d / "python_val.txt", 15000)
    out = moe("import", d / "hf", d / "olmoe.h5")
    assert "data.tokenizer = hf-bpe" in out, out

    ex = moe("experts", d / "olmoe.h5", domain, "--csv", d / "esft.csv")
    with open(d / "esft.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 64, len(rows)
    shown = {(int(l), int(e)) for l, e in re.findall(
        r"layers\.(\d+)\.experts\.(\d+)", re.search(r"finetune.train = (.*)", ex).group(1))}
    assert shown == {(int(r["layer"]), int(r["expert"])) for r in rows if r["selected"] == "1"}
    assert shown == esft_selected(rows, P), ex

    (d / "ft.ini").write_text("[train]\nsteps = 40\nbatch_size = 8\nthreads = 1\n"
                              "sample_tokens = 0\n[optim]\nlr = 1e-2\nwarmup_steps = 5\n")
    ft = moe("finetune", d / "ft.ini", f"finetune.init={d / 'olmoe.h5'}", "finetune.train=auto",
             f"domain.python.train={domain}", f"domain.python.val={held_out}",
             f"train.out_dir={d}", "train.name=python")
    expr = re.search(r"finetune.train = auto: .* -> (.*)", ft).group(1)
    chosen = {(int(l), int(e)) for l, e in re.findall(r"layers\.(\d+)\.experts\.(\d+)", expr)}
    # The same batches (the domain's train file, train.seed, train.batch_size): the same pick.
    assert chosen == shown and len(chosen) < 2 * 64, (ex, ft)

    # The route dump spells each token with the tokenizer: the held-out text, escaped.
    moe("route", d / "python", held_out, "--tokens", 40, "--out", d / "route")
    with open(d / "route" / "tokens.csv", newline="", encoding="utf-8") as f:
        cells = [r["char"] for r in csv.DictReader(f) if r["layer"] == "0"]
    text = held_out.read_text(encoding="utf-8")
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    assert len(cells) == 40 and all(cells) and escaped.startswith("".join(cells)), cells

    before = loss(moe("eval", d / "olmoe.h5", held_out))
    after = loss(moe("eval", d / "python", held_out))
    assert after < before, (before, after)

    moe("export", d / "python", d / "export")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (d / "export" / name).exists(), name
    assert (d / "export" / "tokenizer.json").read_bytes() == (d / "hf" / "tokenizer.json").read_bytes()
    theirs, ours = load_file(str(d / "hf" / "model.safetensors")), \
        load_file(str(d / "export" / "model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.", k)
        moved = not np.array_equal(theirs[k].view(np.uint32), ours[k].view(np.uint32))
        assert moved == bool(m and (int(m[1]), int(m[2])) in chosen), k
    moe("import", d / "export", d / "back.h5")
    base, back = params(d / "olmoe.h5"), params(d / "back.h5")
    assert sorted(base) == sorted(back)
    for k in base:
        m = re.match(r"layers/(\d+)/experts/(\d+)/", k)
        moved = not np.array_equal(base[k], back[k])
        assert moved == bool(m and (int(m[1]), int(m[2])) in chosen), k

    # Greedy: transformers on the export against moe sample on the fine-tuned checkpoint,
    # one more token at a time, as bytes (a token's bytes may be part of a character).
    hf = json.loads(run([HF_PY, SCRIPT, "generate", d / "export", PROMPT, NEW]).stdout)
    # AutoTokenizer's class for a tokenizer.json: transformers 5 renamed it.
    assert hf["model"] == "OlmoeForCausalLM"
    assert hf["tokenizer"] in ("PreTrainedTokenizerFast", "TokenizersBackend")
    pieces = [bytes.fromhex(h) for h in hf["pieces"]]
    n_prompt = len(hf["prompt_ids"])
    for k in range(1, NEW + 1):
        got = run([MOE, "sample", d / "python", "--prompt", PROMPT, "--tokens", k,
                   "--temperature", "0"]).stdout
        assert got == b"".join(pieces[:n_prompt + k]) + b"\n", (k, got, hf)
    assert got[:-1].decode(errors="replace") == hf["text"], (got, hf["text"])
    reference_line(f"olmoe loop: held-out python loss {before:.4f} -> {after:.4f} "
                   f"({len(chosen)} of 128 experts fine-tuned); greedy: {NEW} of {NEW} tokens "
                   f"equal to transformers' generate on the export")
