"""Interrupting a short run at random moments: kill -9, SIGINT, SIGTERM, a full disk (a
file-size limit) and NaN steps. A trial survives when `moe train --resume` then ends
with exactly the weights and CSV rows of an uninterrupted run, or the interruption is a
clean one-line error; it loses something when the newest checkpoint left is older than
the last step completed minus train.ckpt_every, or when any checkpoint is damaged.

`/usr/bin/python3 tests/test_kill_resume.py [KILLS]` prints the tallies per kind."""
import csv
import os
import random
import resource
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import MOE, ROOT, SMALL_MODEL, english, fixture_config, write_domain  # noqa: E402

STEPS, EVERY = 12, 3
WORDS = SMALL_MODEL + ["train.batch_size=2", "train.eval_every=4", "data.val_tokens=512",
                       f"train.steps={STEPS}",
                       f"train.ckpt_every={EVERY}", "train.keep=100"]
TIMING = {"tok_per_s", "elapsed_s"}


def moe(args, **kw):
    return subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


def start(cfg, out, name):
    return subprocess.Popen([MOE, "train", str(cfg)] + WORDS + [f"train.out_dir={out}",
                            f"train.name={name}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def outcome(run_dir):
    """The final weights and the CSV rows without their timing columns."""
    with h5py.File(run_dir / f"ckpt_{STEPS:06d}.h5") as f:
        w = {}
        f["model"].visititems(lambda n, o: w.__setitem__(n, o[()])
                              if isinstance(o, h5py.Dataset) else None)
    tables = {}
    for name in ("metrics.csv", "layers.csv", "experts.csv"):
        tables[name] = [{k: v for k, v in r.items() if k not in TIMING}
                        for r in csv.DictReader(open(run_dir / name))]
    return w, tables


def same(a, b):
    return (a[0].keys() == b[0].keys() and all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
            and a[1] == b[1])


def complete_rows(run_dir):
    try:
        text = (run_dir / "metrics.csv").read_text()
    except FileNotFoundError:
        return 0
    return max(0, text.count("\n") - 1)


def checkpoints_load(run_dir):
    return not newest(run_dir) or moe(["eval", run_dir]).returncode == 0


def newest(run_dir):
    steps = [int(p.stem[5:]) for p in run_dir.glob("ckpt_*.h5")]
    return max(steps, default=0)


def one_line_error(stderr):
    lines = [l for l in stderr.splitlines() if not l.startswith(("HINT:", "moe: warning:"))]
    return len(lines) == 1 and lines[0].startswith("moe: error: ")


def judge(run_dir, reference, rows_before):
    """(survived, lost) after an interruption: resume, compare, check what was kept."""
    lost = newest(run_dir) < rows_before - EVERY or not checkpoints_load(run_dir)
    if newest(run_dir) == STEPS:   # it had finished
        return same(outcome(run_dir), reference), lost
    res = moe(["train", "--resume", run_dir])
    if res.returncode != 0:
        ok = one_line_error(res.stderr) and newest(run_dir) == 0
    else:
        ok = same(outcome(run_dir), reference)
    if not ok or lost:
        print(f"{run_dir.name}: rows {rows_before}, newest {newest(run_dir)}, resume "
              f"{res.returncode}: {res.stderr.strip()[-300:]}", file=sys.stderr)
    return ok, lost


def kill_trial(cfg, out, name, reference, total_s, rng, sig):
    proc = start(cfg, out, name)
    time.sleep(rng.uniform(0, total_s))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    run_dir = out / name
    if not (run_dir / "config.ini").exists():   # killed before the run directory
        return True, False
    if sig != signal.SIGKILL and proc.returncode not in (0, None):
        print(f"{name}: exit {proc.returncode}: {err.strip()[-300:]}", file=sys.stderr)
        return False, False
    if sig != signal.SIGKILL and newest(run_dir) and list(run_dir.glob("*.tmp")):
        return False, False
    return judge(run_dir, reference, complete_rows(run_dir))


def disk_trial(cfg, out, name, reference, limit):
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    run = subprocess.run([MOE, "train", str(cfg)] + WORDS + [f"train.out_dir={out}",
                         f"train.name={name}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, preexec_fn=small_files)
    run_dir = out / name
    if run.returncode == 0 or not one_line_error(run.stderr):
        return False, False
    if not (run_dir / "config.ini").exists() or not newest(run_dir):
        return True, False
    return judge(run_dir, reference, complete_rows(run_dir))


def nan_trial(cfg, out, name, policy):
    run = moe(["train", cfg] + WORDS + [f"train.out_dir={out}", f"train.name={name}",
               "model.init_std=0", "model.norm_eps=0", f"train.on_nonfinite={policy}"])
    run_dir = out / name
    if policy == "skip":
        rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
        return run.returncode == 0 and all(r["skipped"] == "1" for r in rows), False
    return run.returncode != 0 and one_line_error(run.stderr), False


def tally(tmp_path, kills, signals=3, disks=3, seed=1):
    rng = random.Random(seed)
    cfg = fixture_config(tmp_path, {"a": write_domain(tmp_path, "a", english(20000))})
    out = tmp_path / "runs"
    t0 = time.time()
    ref = moe(["train", cfg] + WORDS + [f"train.out_dir={out}", "train.name=ref"])
    assert ref.returncode == 0, ref.stderr
    total_s = time.time() - t0
    reference = outcome(out / "ref")
    sizes = sorted(p.stat().st_size for p in (out / "ref").iterdir())
    results = {}
    for kind, n, run in (
            ("kill -9", kills, lambda i: kill_trial(cfg, out, f"k{i}", reference, total_s, rng,
                                                    signal.SIGKILL)),
            ("SIGINT", signals, lambda i: kill_trial(cfg, out, f"i{i}", reference, total_s, rng,
                                                     signal.SIGINT)),
            ("SIGTERM", signals, lambda i: kill_trial(cfg, out, f"t{i}", reference, total_s,
                                                      rng, signal.SIGTERM)),
            ("disk full", disks, lambda i: disk_trial(cfg, out, f"d{i}", reference,
                                                      rng.randint(sizes[0], sizes[-1]))),
            ("NaN", 3, lambda i: nan_trial(cfg, out, f"n{i}", ("abort", "skip", "rollback")[i]))):
        got = [run(i) for i in range(n)]
        results[kind] = (n, sum(s for s, _ in got), sum(l for _, l in got))
    return results


def test_interruptions_lose_at_most_the_steps_since_the_last_checkpoint(tmp_path):
    for kind, (tried, survived, lost) in tally(tmp_path, kills=20).items():
        assert survived == tried and lost == 0, (kind, tried, survived, lost)


if __name__ == "__main__":
    import pathlib
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        kills = int(sys.argv[1]) if len(sys.argv) > 1 else 20
        print(f"{'kind':10} {'tried':>5} {'survived':>8} {'lost':>4}")
        for kind, (tried, survived, lost) in tally(pathlib.Path(tmp), kills, 5, 5).items():
            print(f"{kind:10} {tried:5} {survived:8} {lost:4}")
