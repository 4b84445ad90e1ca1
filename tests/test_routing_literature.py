"""Does routing behave as the literature says? Tiny runs on the default corpus check
directions only, with generous margins (README, "Router workbench")."""
import csv
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))
BASE = [
    "model.layers=2", "model.d_model=32", "model.heads=2", "model.kv_heads=2",
    "model.seq_len=32", "model.experts=8", "model.expert_ffn_dim=32", "router.top_k=2",
    "train.batch_size=8", "train.steps=300", "train.eval_every=0", "train.threads=1",
    "train.sample_tokens=0", "data.val_tokens=2048", "optim.warmup_steps=10",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    subprocess.run([MOE, "prepare"], cwd=ROOT, check=True, capture_output=True)
    out = tmp_path_factory.mktemp("lit")
    cfg = out / "lit.ini"
    cfg.write_text("[data]\n")

    def run(name, *overrides):
        r = subprocess.run([MOE, "train", str(cfg)] + BASE + list(overrides) +
                           [f"train.out_dir={out}", f"train.name={name}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return list(csv.DictReader(open(out / name / "metrics.csv")))
    return run


def late_mean(rows, col, last=50):
    vals = [float(r[col]) for r in rows[-last:]]
    return sum(vals) / len(vals)


def test_load_balancing_loss_lowers_maxvio(runs):
    without = runs("no_aux", "router.aux_coef=0", "router.z_coef=0")
    with_aux = runs("aux", "router.aux_coef=0.1", "router.z_coef=0")
    assert late_mean(without, "maxvio") > 1.2 * late_mean(with_aux, "maxvio")


def test_z_loss_lowers_router_logsumexp(runs):
    without = runs("no_z", "router.z_coef=0")
    with_z = runs("z", "router.z_coef=0.1")
    assert late_mean(with_z, "lse") < late_mean(without, "lse") - 0.1


def test_capacity_drops_early_dropless_never(runs):
    capped = runs("cap1", "router.capacity_factor=1.0")
    dropless = runs("dropless", "router.capacity_factor=0")
    assert sum(float(r["dropped"]) for r in capped[:20]) / 20 > 0.01
    assert all(float(r["dropped"]) == 0 for r in dropless)


def test_bias_balancing_lowers_maxvio_without_aux_loss(runs):
    plain = runs("plain", "router.aux_coef=0", "router.z_coef=0")
    biased = runs("bias", "router.aux_coef=0", "router.z_coef=0", "router.bias_gamma=0.001")
    assert late_mean(biased, "maxvio") < 0.5 * late_mean(plain, "maxvio")
