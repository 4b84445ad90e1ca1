"""`moe ablate` end to end on a tiny grid: the table's rows and columns, the figures, a
second invocation skipping finished variants and resuming an interrupted one bit for bit,
and one-line errors for grids that break an ablation's contract."""
import csv
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))

BASE = """
[model]
layers = 2
d_model = 16
heads = 2
kv_heads = 2
seq_len = 16
experts = 4
expert_ffn_dim = 16
[router]
top_k = 2
[train]
batch_size = 4
steps = 6
eval_every = 3
ckpt_every = 3
keep = 5
sample_tokens = 0
[data]
val_tokens = 1024
[domain prose]
kind = text
train = {d}/prose.txt
val = {d}/prose.txt
[domain digits]
kind = text
train = {d}/digits.txt
val = {d}/digits.txt
"""

VARIANTS = """
[variant top2]

[variant top1]
router.top_k = 1
router.renorm = false
"""


def run_moe(args, check=True, env=None):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def prose(n):
    words = ("the quick brown fox jumps over the lazy dog while a small bird sings in the "
             "old tree near the river").split()
    return " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(n // 5))


def write_grid(tmp_path, body):
    (tmp_path / "prose.txt").write_text(prose(6000))
    (tmp_path / "digits.txt").write_text("".join(f"{i * 37 % 1000:03d}," for i in range(1500)))
    grid = tmp_path / "grid.ini"
    grid.write_text(BASE.format(d=tmp_path) + body)
    return grid


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    grid = write_grid(tmp, VARIANTS)
    out = tmp / "out"
    run = run_moe(["ablate", grid, "--jobs", "2", "--out", out])
    return grid, out, run.stdout


def test_table_has_one_row_per_variant(ablation):
    _, out, stdout = ablation
    rows = read_csv(out / "ablation.csv")
    assert [r["variant"] for r in rows] == ["top2", "top1"]
    for r in rows:
        assert r["status"] == "ok"
        for col in ("val_prose", "val_digits", "val_mean", "maxvio_mean", "maxvio_final"):
            assert 0 < float(r[col]) < 100, (col, r)
        assert float(r["tok_per_s"]) > 0
        assert float(r["dropped_pct"]) == 0   # dropless
        assert abs(float(r["val_mean"]) - (float(r["val_prose"]) + float(r["val_digits"])) / 2) < 2e-4
    assert rows[1]["overrides"] == "router.top_k=1 router.renorm=false"
    md = (out / "ablation.md").read_text()
    assert "| variant | prose | digits | val mean | dropped % | MaxVio mean | MaxVio final" in md
    assert md.count("\n| top2 |") == 1 and md.count("\n| top1 |") == 1
    for name in ("top2", "top1"):
        run_dir = out / name
        assert (run_dir / "ckpt_000006.h5").exists() and (run_dir / "metrics.csv").exists()
        assert "done: step 6" in (run_dir / "train.log").read_text()
    assert stdout.count(" start ") == 2 and stdout.count(" done ") == 2


def test_variants_share_data_seed_and_init(ablation):
    _, out, _ = ablation
    base = (out / "base.ini").read_text()
    assert "steps = 6" in base and "seed = 1337" in base
    configs = [(out / n / "config.ini").read_text().splitlines() for n in ("top2", "top1")]
    differ = {a.split(" =")[0] for a, b in zip(*configs) if a != b and a[0] != ";"}
    assert differ == {"top_k", "renorm", "name"}, differ


@pytest.mark.skipif(shutil.which("gnuplot") is None, reason="gnuplot is not installed")
def test_figures(ablation):
    _, out, _ = ablation
    for png in ("val_loss.png", "maxvio.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_and_resumes_interrupted(ablation):
    grid, out, _ = ablation
    before = {r["variant"]: r for r in read_csv(out / "ablation.csv")}
    top2_metrics = (out / "top2" / "metrics.csv").stat().st_mtime_ns
    run = run_moe(["ablate", grid, "--out", out])
    assert run.stdout.count(" skip ") == 2 and " start " not in run.stdout
    assert (out / "top2" / "metrics.csv").stat().st_mtime_ns == top2_metrics
    # Interrupted after its step-3 checkpoint: resumed, and bit for bit the same run.
    (out / "top1" / "ckpt_000006.h5").unlink()
    run = run_moe(["ablate", grid, "--out", out])
    assert "resume top1 from" in run.stdout and "ckpt_000003.h5" in run.stdout
    assert " skip   top2" in run.stdout
    assert (out / "top2" / "metrics.csv").stat().st_mtime_ns == top2_metrics
    after = {r["variant"]: r for r in read_csv(out / "ablation.csv")}
    assert list(after) == ["top2", "top1"]
    for col in ("val_prose", "val_digits", "val_mean", "maxvio_mean", "maxvio_final",
                "dropped_pct"):
        assert after["top1"][col] == before["top1"][col], col


def test_missing_gnuplot_still_writes_tables(ablation, tmp_path):
    grid, out, _ = ablation
    (out / "ablation.csv").unlink()
    run = run_moe(["ablate", grid, "--out", out], env={**os.environ, "PATH": str(tmp_path)})
    assert "gnuplot not found" in run.stdout
    assert len(read_csv(out / "ablation.csv")) == 2 and (out / "ablation.md").exists()


def test_grid_lists_are_crossed_with_variants(tmp_path):
    grid = write_grid(tmp_path, "[variant a]\nrouter.top_k = 1\n[grid]\n"
                                "router.capacity_factor = 0, 1.0\n")
    run_moe(["ablate", grid, "--out", tmp_path / "out", "train.steps=2"])
    rows = read_csv(tmp_path / "out" / "ablation.csv")
    assert [r["variant"] for r in rows] == ["a+capacity_factor=0", "a+capacity_factor=1.0"]
    assert rows[0]["overrides"] == "router.top_k=1 router.capacity_factor=0"
    assert float(rows[0]["dropped_pct"]) == 0 and float(rows[1]["dropped_pct"]) > 0


# {h}: the line of the body's first section header, {k}: of the line after it.
@pytest.mark.parametrize("body,message", [
    ("[variant a]\ntrain.steps = 10\n", "grid.ini:{k}: train.steps is the same for every variant"),
    ("[variant a]\nrouter.top_kk = 1\n", "grid.ini:{k}: unknown key 'router.top_kk'"),
    ("[grid]\nrouter.top_k = 1, 9\n", "grid.ini:{k}: router.top_k = 9: out of range"),
    ("[grid]\nrouter.top_k = 1, 5\n", "variant top_k=5: router.top_k = 5 exceeds model.experts = 4"),
    ("[grid]\ndomain.prose.weight = 1, 2\n", "grid.ini:{k}: domain.prose.weight is the same"),
    ("[variant a/b]\n", "grid.ini:{h}: variant name 'a/b'"),
    ("[variant a]\n[variant a]\n", "grid.ini:{k}: [variant a] appears twice"),
    ("", "no [variant NAME] or [grid] section"),
])
def test_grid_errors_are_one_line(tmp_path, body, message):
    h = BASE.count("\n") + 1
    message = message.format(h=h, k=h + 1)
    grid = write_grid(tmp_path, body)
    run = run_moe(["ablate", grid, "--out", tmp_path / "out"], check=False)
    assert run.returncode != 0
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


def test_router_grid_trains_every_variant(tmp_path):
    """configs/ablations/router.ini itself, two steps per variant on the default corpus."""
    run_moe(["prepare"])
    run_moe(["ablate", os.path.join(ROOT, "configs", "ablations", "router.ini"), "--jobs", 2,
             "--out", tmp_path, "train.steps=2", "train.batch_size=4", "data.val_tokens=2048"])
    rows = {r["variant"]: r for r in read_csv(tmp_path / "ablation.csv")}
    assert {"top2", "top1", "capacity-1.0", "capacity-1.25", "no-aux", "no-z", "noisy-top2",
            "jitter"} <= set(rows)
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert float(rows["top2"]["dropped_pct"]) == 0 < float(rows["capacity-1.0"]["dropped_pct"])
