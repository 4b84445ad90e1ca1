"""`moe route` on tiny trained checkpoints: usage fractions, co-activation, the token
dump, router saturation, and the default domains and output directory."""
import csv
import os
import shutil
import subprocess

import pytest

from toy_domains import write_toy_domains

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))

CONFIG = """
[model]
layers = 3
d_model = 16
heads = 2
kv_heads = 2
seq_len = 16
experts = 4
expert_ffn_dim = 16
[router]
top_k = 2
capacity_factor = 1.0
[train]
batch_size = 4
steps = 4
eval_every = 0
sample_tokens = 0
[data]
val_tokens = 1024
[domain prose]
kind = text
train = {d}/prose/train.txt
val = {d}/prose/val.txt
[domain digits]
kind = text
train = {d}/digits/train.txt
val = {d}/digits/val.txt
"""
LAYERS, EXPERTS, K = 3, 4, 2


def run_moe(args):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("route")
    write_toy_domains(tmp)
    cfg = tmp / "tiny.ini"
    cfg.write_text(CONFIG.format(d=tmp))
    for seed in (1, 2):
        run_moe(["train", cfg, f"train.out_dir={tmp}", f"train.name=seed{seed}",
                 f"train.seed={seed}", "train.threads=1"])
    return tmp


@pytest.fixture(scope="module")
def routed(runs):
    """Routes prose's validation file through seed1, compared with itself."""
    out = runs / "self"
    run_moe(["route", runs / "seed1", runs / "prose" / "val.txt", "--tokens", 40,
             "--compare", runs / "seed1", "--out", out])
    return out


def test_usage_fractions_sum_to_one_per_layer(routed):
    rows = read_csv(routed / "usage.csv")
    assert {r["domain"] for r in rows} == {"prose"}   # named after the split file's directory
    assert len(rows) == LAYERS * EXPERTS
    for layer in range(LAYERS):
        mine = [r for r in rows if int(r["layer"]) == layer]
        assert abs(sum(float(r["fraction"]) for r in mine) - 1) < 1e-4
        # every token chooses k experts, before capacity
        assert sum(int(r["tokens"]) for r in mine) % K == 0


def test_coactivation_is_symmetric_with_zero_diagonal(routed):
    usage = {(int(r["layer"]), int(r["expert"])): int(r["tokens"])
             for r in read_csv(routed / "usage.csv")}
    tokens = sum(usage[(0, e)] for e in range(EXPERTS)) // K
    rows = read_csv(routed / "coactivation.csv")
    assert len(rows) == LAYERS * EXPERTS
    for layer in range(LAYERS):
        m = [[int(r[f"e{b}"]) for b in range(EXPERTS)]
             for r in rows if int(r["layer"]) == layer]
        for a in range(EXPERTS):
            assert m[a][a] == 0
            assert sum(m[a]) == usage[(layer, a)] * (K - 1)
            for b in range(EXPERTS):
                assert m[a][b] == m[b][a]
        assert sum(map(sum, m)) == tokens * K * (K - 1)


def test_token_dump(routed, runs):
    rows = read_csv(routed / "tokens.csv")
    assert len(rows) == 40 * LAYERS
    text = (runs / "prose" / "val.txt").read_bytes()
    for r in rows:
        offset = int(r["offset"])
        assert offset < 40 and int(r["position"]) == offset % 16
        assert int(r["token"]) == text[offset]
        assert r["char"] == chr(text[offset])
        experts = [int(e) for e in r["experts"].split()]
        gates = [float(g) for g in r["gates"].split()]
        assert len(experts) == len(set(experts)) == K and all(0 <= e < EXPERTS for e in experts)
        assert abs(sum(gates) - 1) < 1e-3 and gates == sorted(gates, reverse=True)
        assert set(r["kept"].split()) <= {"0", "1"}
    assert [int(r["layer"]) for r in rows[:LAYERS]] == list(range(LAYERS))


def test_saturation_against_itself_is_one(routed):
    rows = read_csv(routed / "saturation.csv")
    assert {(r["domain"], r["layer"]) for r in rows} >= {("prose", "all"), ("all", "all")}
    assert all(float(r["saturation"]) == 1.0 for r in rows)


def test_saturation_against_another_seed_is_lower(runs):
    out = runs / "other"
    run = run_moe(["route", runs / "seed1", "--compare", runs / "seed2", "--out", out])
    rows = {(r["domain"], r["layer"]): float(r["saturation"])
            for r in read_csv(out / "saturation.csv")}
    assert 0 < rows[("all", "all")] < 1
    assert {d for d, _ in rows} == {"prose", "digits", "all"}
    assert "router saturation vs" in run.stdout


def test_default_domains_and_output_directory(runs):
    run_moe(["route", runs / "seed2", "--tokens", 0])
    out = runs / "seed2" / "route"
    assert {r["domain"] for r in read_csv(out / "usage.csv")} == {"prose", "digits"}
    assert read_csv(out / "tokens.csv") == []
    assert not (out / "saturation.csv").exists()


@pytest.mark.skipif(shutil.which("gnuplot") is None, reason="gnuplot is not installed")
def test_heatmap_png(routed):
    assert (routed / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
