"""What a long run survives: a second run into its directory, a foreign or renamed
checkpoint, a crash between checkpoints, SIGINT and SIGTERM, non-finite steps and
weights, a full disk. Each costs a one-line message and at most the steps since the last
checkpoint; none changes the result of the run that continues."""
import csv
import os
import resource
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from test_train import MOE, ROOT, SMALL_MODEL, english, fixture_config, run_moe, write_domain

FAST = SMALL_MODEL + ["train.batch_size=2", "train.eval_every=0"]


@pytest.fixture
def cfg(tmp_path):
    return fixture_config(tmp_path, {"a": write_domain(tmp_path, "a", english(20000))})


def train(cfg, out, name, *words, check=True):
    return run_moe(["train", str(cfg)] + FAST + [f"train.out_dir={out}", f"train.name={name}"]
                   + list(words), check=check)


def rows(path):
    return list(csv.DictReader(open(path)))


def weights(path):
    out = {}
    with h5py.File(path) as f:
        f["model"].visititems(lambda n, o: out.__setitem__(n, o[()])
                              if isinstance(o, h5py.Dataset) else None)
    return out


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k


def one_error(run):
    lines = [l for l in run.stderr.splitlines()
             if not l.startswith(("HINT:", "moe: warning:"))]
    assert run.returncode != 0 and len(lines) == 1 and lines[0].startswith("moe: error: "), \
        run.stdout + run.stderr
    return lines[0]


# ---- run identity ----------------------------------------------------------------------

def test_second_train_into_a_run_directory_is_refused(tmp_path, cfg):
    train(cfg, tmp_path, "r", "train.steps=2")
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    err = one_error(train(cfg, tmp_path, "r", "train.steps=3", "train.seed=7", check=False))
    assert f"{tmp_path}/r: holds another run" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", "..", "."])
def test_run_name_stays_inside_out_dir(tmp_path, cfg, name):
    err = one_error(train(cfg, tmp_path / "out", name, "train.steps=1", check=False))
    assert f"train.name = '{name}'" in err
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_foreign_and_renamed_checkpoints_are_refused(tmp_path, cfg):
    train(cfg, tmp_path, "mine", "train.steps=4", "train.ckpt_every=2")
    train(cfg, tmp_path, "other", "train.steps=6", "train.ckpt_every=2", "train.seed=5")
    mine = tmp_path / "mine"
    (mine / "ckpt_000006.h5").write_bytes((tmp_path / "other" / "ckpt_000006.h5").read_bytes())
    for cmd in (["train", "--resume", mine, "train.steps=8"], ["eval", mine]):
        err = one_error(run_moe([str(a) for a in cmd], check=False))
        assert f"{mine}/ckpt_000006.h5: written by another run" in err
    (mine / "ckpt_000006.h5").unlink()
    (mine / "ckpt_000002.h5").rename(mine / "ckpt_000008.h5")
    err = one_error(run_moe(["train", "--resume", str(mine), "train.steps=10"], check=False))
    assert "ckpt_000008.h5: holds step 2, not the step its name says (8)" in err


def test_resume_after_a_crash_cuts_every_csv_back(tmp_path, cfg):
    """A crash after step 5 of 6 (checkpoint at 4): the resumed run's CSVs hold each step
    once, with the rows of an uninterrupted run."""
    words = ["train.steps=6", "train.ckpt_every=2", "train.keep=5"]
    train(cfg, tmp_path, "whole", *words)
    train(cfg, tmp_path, "crash", *words)
    crash = tmp_path / "crash"
    (crash / "ckpt_000006.h5").unlink()
    with open(crash / "experts.csv", "a") as f:
        f.write("5,0,1,3")   # a row cut short
    run_moe(["train", "--resume", str(crash)])
    for name, per_step in (("metrics.csv", 1), ("layers.csv", 2), ("experts.csv", 8)):
        got, want = rows(crash / name), rows(tmp_path / "whole" / name)
        assert [int(r["step"]) for r in got] == [s for s in range(6) for _ in range(per_step)]
        skip = {"tok_per_s", "elapsed_s"}
        assert [{k: v for k, v in r.items() if k not in skip} for r in got] == \
               [{k: v for k, v in r.items() if k not in skip} for r in want], name
    assert_same_weights(crash / "ckpt_000006.h5", tmp_path / "whole" / "ckpt_000006.h5")


# ---- signals ---------------------------------------------------------------------------

def start(cfg, out, name, *words):
    args = [MOE, "train", str(cfg)] + FAST + [f"train.out_dir={out}", f"train.name={name}",
                                               "train.batch_size=8"] + list(words)
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_rows(path, n, proc, limit=60):
    t0 = time.time()
    while time.time() - t0 < limit and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) > n:
            return
        time.sleep(0.005)
    raise AssertionError("the run ended or stalled before step %d" % n)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_0(tmp_path, cfg, sig):
    words = ["train.steps=400", "train.ckpt_every=1000"]
    proc = start(cfg, tmp_path, "sig", *words)
    wait_for_rows(tmp_path / "sig" / "metrics.csv", 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"moe: {sig.name}: stopped after step "), err
    step = int(line.split("after step ")[1].split(";")[0])
    ckpt = tmp_path / "sig" / f"ckpt_{step:06d}.h5"
    assert f"checkpoint {ckpt}" in line and ckpt.exists()
    assert not list((tmp_path / "sig").glob("*.tmp"))
    assert len(rows(tmp_path / "sig" / "metrics.csv")) == step
    # Resuming to the end gives the uninterrupted run's weights.
    run_moe(["train", "--resume", str(tmp_path / "sig"), f"train.steps={step + 2}"])
    train(cfg, tmp_path, "whole", f"train.steps={step + 2}", "train.batch_size=8")
    assert_same_weights(tmp_path / "sig" / f"ckpt_{step + 2:06d}.h5",
                        tmp_path / "whole" / f"ckpt_{step + 2:06d}.h5")


def test_second_sigint_exits_at_once(tmp_path, cfg):
    proc = start(cfg, tmp_path, "twice", "train.steps=400", "model.d_model=64",
                 "train.batch_size=32")
    wait_for_rows(tmp_path / "twice" / "metrics.csv", 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)   # a signal sent while the same one is pending would merge with it
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "second SIGINT: stopped at once" in err, err


# ---- non-finite values -----------------------------------------------------------------

NAN_MODEL = ["model.init_std=0", "model.norm_eps=0"]   # rmsnorm of zeros: 0/0 every step


def test_nonfinite_step_aborts_by_default(tmp_path, cfg):
    err = one_error(train(cfg, tmp_path, "nan", "train.steps=4", *NAN_MODEL, check=False))
    assert err == ("moe: error: step 1: non-finite loss (-nan); stopped "
                   "(train.on_nonfinite = abort)")
    assert not list((tmp_path / "nan").glob("ckpt_*.h5"))


def test_skipped_steps_are_counted_and_leave_the_expert_bias(tmp_path, cfg):
    run = train(cfg, tmp_path, "skip", "train.steps=3", "train.on_nonfinite=skip",
                "router.bias_gamma=0.01", *NAN_MODEL)
    warnings = [l for l in run.stderr.splitlines() if "update skipped" in l]
    assert warnings[0] == ("moe: warning: step 1: non-finite loss (-nan); update skipped "
                           "(train.on_nonfinite = skip)") and len(warnings) == 3
    assert [r["skipped"] for r in rows(tmp_path / "skip" / "metrics.csv")] == ["1", "1", "1"]
    with h5py.File(tmp_path / "skip" / "ckpt_000003.h5") as f:
        for layer in (0, 1):
            assert not f[f"model/layers/{layer}/router/expert_bias"][()].any()


def poison(path, tensor="model/norm", scale=None):
    """Finite weights whose logits overflow (scale), or an infinity (no scale)."""
    with h5py.File(path, "r+") as f:
        d = f[tensor]
        if scale is None:
            d[0] = np.inf
        else:
            d[...] = scale


def test_rollback_is_bounded_and_cuts_the_csvs(tmp_path, cfg):
    train(cfg, tmp_path, "rb", "train.steps=4", "train.ckpt_every=2")
    poison(tmp_path / "rb" / "ckpt_000004.h5", "model/embed_tokens", 3e38)
    run = run_moe(["train", "--resume", str(tmp_path / "rb"), "train.steps=8",
                   "train.on_nonfinite=rollback"], check=False)
    warnings = [l for l in run.stderr.splitlines() if "rolled back" in l]
    assert len(warnings) == 3 and "rolled back to" in warnings[0]
    assert "ckpt_000004.h5 (step 4), learning rate x0.5 (rollback 1 of at most 3)" in warnings[0]
    assert "learning rate x0.25 (rollback 2 of at most 3)" in warnings[1]
    err = one_error(run)
    assert err.startswith("moe: error: step 5: non-finite ") and "after 3 rollbacks to" in err
    assert [int(r["step"]) for r in rows(tmp_path / "rb" / "metrics.csv")] == [0, 1, 2, 3]


def test_rollback_needs_a_checkpoint(tmp_path, cfg):
    err = one_error(train(cfg, tmp_path, "rb0", "train.steps=3", "train.on_nonfinite=rollback",
                          *NAN_MODEL, check=False))
    assert "train.on_nonfinite = rollback, but the run has no checkpoint yet" in err


def test_nonfinite_weights_are_refused_on_load(tmp_path, cfg):
    train(cfg, tmp_path, "inf", "train.steps=2")
    ckpt = tmp_path / "inf" / "ckpt_000002.h5"
    poison(ckpt)
    err = one_error(run_moe(["eval", str(ckpt)], check=False))
    assert err == (f"moe: error: {ckpt}: tensor /model/norm holds a non-finite value "
                   "(inf at index 0)")


# ---- full disk -------------------------------------------------------------------------

def test_full_disk_names_the_csv_and_keeps_the_checkpoints(tmp_path, cfg):
    train(cfg, tmp_path, "full", "train.steps=40", "train.ckpt_every=20")
    run_dir = tmp_path / "full"
    saved = {p.name: p.read_bytes() for p in run_dir.glob("ckpt_*.h5")}
    # Room for config.ini, the other CSVs and a few bytes more of experts.csv, the largest.
    limit = (run_dir / "experts.csv").stat().st_size + 100
    assert limit > (run_dir / "config.ini").stat().st_size + 100

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = subprocess.run([MOE, "train", "--resume", str(run_dir), "train.steps=50"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    err = one_error(run)
    assert err.startswith(f"moe: error: {run_dir}/experts.csv: cannot write: File too large")
    assert {p.name: p.read_bytes() for p in run_dir.glob("ckpt_*.h5")} == saved
    # With room again, the run resumes from its last checkpoint and ends with each row once.
    run_moe(["train", "--resume", str(run_dir), "train.steps=42"])
    assert [int(r["step"]) for r in rows(run_dir / "experts.csv")] == \
           [s for s in range(42) for _ in range(8)]
