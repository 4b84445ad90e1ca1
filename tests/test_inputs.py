"""Bad inputs `moe` once let through: each is refused (or warned about) with one line
naming the file, flag or key and the value."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.path.join(ROOT, "moe")

MODEL = """[model]
layers = 1
d_model = 16
heads = 2
kv_heads = 1
seq_len = 16
experts = 2
expert_ffn_dim = 16
[router]
top_k = 1
[train]
batch_size = 2
threads = 1
steps = 2
eval_every = 0
sample_tokens = 0
[data]
val_tokens = 256
"""


def run_moe(args, check=True):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def one_line_error(run, *expect):
    assert run.returncode != 0, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe: error: "), run.stderr
    for e in expect:
        assert e in lines[0], run.stderr
    return lines[0]


def write_config(path, extra=""):
    text = "the quick brown fox jumps over the lazy dog; " * 40
    data = path.parent / "corpus.txt"
    data.write_text(text)
    path.write_text(MODEL + extra +
                    f"\n[domain text]\nkind = text\ntrain = {data}\nval = {data}\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step run: its directory holds ckpt_000002.h5."""
    tmp = tmp_path_factory.mktemp("inputs")
    cfg = write_config(tmp / "tiny.ini")
    run_moe(["train", cfg, f"train.out_dir={tmp}", "train.name=base"])
    return tmp / "base"


@pytest.mark.parametrize("flag,value", [
    ("--temperature", "nan"), ("--top-p", "nan"), ("--seed", "nan"), ("--tokens", "nan"),
    ("--temperature", "inf"), ("--tokens", "12x"), ("--seed", "-inf"),
])
def test_sample_flags_reject_non_finite(run_dir, flag, value):
    one_line_error(run_moe(["sample", run_dir, flag, value], check=False), f"{flag} {value}")


@pytest.mark.parametrize("args", [
    ["route", "RUN", "--tokens", "nan"],
    ["import", "RUN", "out.h5", "--seq-len", "inf"],
])
def test_count_flags_reject_non_finite(run_dir, args):
    args = [str(run_dir) if a == "RUN" else a for a in args]
    one_line_error(run_moe(args, check=False), f"{args[-2]} {args[-1]}")


@pytest.mark.parametrize("word", ["optim.lr=nan", "optim.lr=inf", "train.seed=nan",
                                  "train.threads=2x", "router.jitter_eps=-nan"])
def test_config_values_reject_non_finite(tmp_path, word):
    cfg = write_config(tmp_path / "c.ini")
    one_line_error(run_moe(["train", cfg, word], check=False), word.replace("=", " = '"))


@pytest.mark.parametrize("command", ["train", "finetune", "ablate"])
def test_directory_as_config_is_refused(tmp_path, command):
    one_line_error(run_moe([command, tmp_path], check=False), f"{tmp_path}: is a directory")


def test_run_directory_still_resumes(run_dir, tmp_path):
    import shutil
    own = tmp_path / "base"   # a copy: resuming writes into the run directory
    shutil.copytree(run_dir, own)
    run_moe(["train", "--resume", own, "train.steps=3"])
    assert (own / "ckpt_000003.h5").is_file()


def test_duplicate_key_warns_with_both_lines(tmp_path):
    cfg = write_config(tmp_path / "dup.ini", "[train]\nseed = 3\nseed = 4\n")
    run = run_moe(["train", cfg, "train.steps=0"], check=False)
    warn = [l for l in run.stderr.splitlines() if "warning" in l]
    first = MODEL.count("\n") + 2
    assert warn == [f"moe: warning: {cfg}:{first + 1}: train.seed is set again (first at "
                    f"{cfg}:{first}); this later value is used"], run.stderr


def test_indented_continuation_is_refused(tmp_path):
    cfg = write_config(tmp_path / "cont.ini", "[train]\nname = a\n  b\n")
    one_line_error(run_moe(["train", cfg], check=False), "cont.ini:",
                   "an indented line continues train.name")


def test_sample_prompt_round_trips_config_ini_and_checkpoint(tmp_path):
    import h5py
    prompt = " two\nlines;\ttab \\\\ end "  # the override escapes its backslash
    cfg = write_config(tmp_path / "p.ini")
    run_moe(["train", cfg, "train.steps=1", f"train.out_dir={tmp_path}", "train.name=a",
             f"train.sample_prompt={prompt}"])
    ini = (tmp_path / "a" / "config.ini").read_text()
    assert "sample_prompt = \\x20two\\nlines\\x3b\\ttab \\\\ end\\x20\n" in ini
    run_moe(["train", tmp_path / "a" / "config.ini", f"train.out_dir={tmp_path}",
             "train.name=b"])
    run_moe(["train", "--resume", tmp_path / "b", "train.steps=2"])
    for run in ("a/ckpt_000001.h5", "b/ckpt_000002.h5"):
        with h5py.File(tmp_path / run) as f:
            stored = f["config"].attrs["train.sample_prompt"]
            stored = stored.decode() if isinstance(stored, bytes) else stored
            assert stored == "\\x20two\\nlines\\x3b\\ttab \\\\ end\\x20", run
    one_line_error(run_moe(["train", cfg, "train.sample_prompt=a\\q"], check=False),
                   "train.sample_prompt = 'a\\q': bad escape at character 2")


def test_value_errors_stay_on_one_line(tmp_path):
    cfg = write_config(tmp_path / "c.ini")
    one_line_error(run_moe(["train", cfg, "train.steps=1\n2"], check=False),
                   "train.steps = '1\\n2': expected an integer")


def test_threads_beyond_what_starts_is_one_line(tmp_path):
    import resource

    def limit_memory():   # 4096 threads' stacks do not fit 3 GB of address space
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    cfg = write_config(tmp_path / "t.ini")
    args = [MOE, "train", str(cfg), f"train.out_dir={tmp_path}", "train.steps=1"]
    base = subprocess.run(args + ["train.threads=1"], capture_output=True, text=True,
                          preexec_fn=limit_memory, timeout=300)
    if base.returncode != 0:
        pytest.skip("moe does not run under a 3 GB address-space limit (sanitizer build?)")
    run = subprocess.run(args + ["train.threads=4096"], capture_output=True, text=True,
                         preexec_fn=limit_memory, timeout=300)
    one_line_error(run, "train.threads = 4096: this machine starts only ")


def test_merge_takes_run_directories(run_dir, tmp_path):
    cfg = write_config(tmp_path / "ft.ini")
    run_moe(["finetune", cfg, f"finetune.init={run_dir}", "finetune.delta=true",
             "finetune.train=router", "train.steps=1", f"train.out_dir={tmp_path}",
             "train.name=delta"])
    out = tmp_path / "merged.h5"
    run = run_moe(["merge", run_dir, tmp_path / "delta", out])
    assert f"merged {tmp_path}/delta/ckpt_000001.h5 onto {run_dir}/ckpt_000002.h5" in run.stdout
    assert out.is_file()


def test_dump_logits_into_a_directory_is_one_line(run_dir, tmp_path):
    one_line_error(run_moe(["eval", run_dir, "--dump-logits", tmp_path], check=False),
                   f"{tmp_path}: cannot create the HDF5 file: Is a directory")


def test_export_refuses_a_non_empty_directory(run_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(run_moe(["export", run_dir, out], check=False),
                   f"{out}: the directory is not empty (it holds notes.txt)")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_export_force_replaces_only_an_earlier_export(run_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("notes.txt", "tokenizer.json", "model-00001-of-00009.safetensors",
                 "model.safetensors.index.json", "model.safetensors"):
        (out / name).write_text("another model")
    run_moe(["export", run_dir, out, "--shard-size", "4000", "--force"])
    shards = sorted(p.name for p in out.glob("model-*"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        shards + ["config.json", "model.safetensors.index.json", "notes.txt", "tokenizer.json"])
    assert (out / "notes.txt").read_text() == "another model"


@pytest.mark.parametrize("words,expect", [
    (["model.d_model=256", "model.expert_ffn_dim=256"], "2.06e+11 parameters need 1651.8 GB"),
    (["model.d_model=4096", "model.heads=32", "model.expert_ffn_dim=14336"],
     "1.85e+14 parameters, more than 1e+12"),
])
def test_model_too_large_is_refused_before_allocating(tmp_path, words, expect):
    cfg = write_config(tmp_path / "big.ini")
    run = subprocess.run([MOE, "train", str(cfg), "model.layers=256", "model.experts=4096"]
                         + words, capture_output=True, text=True, timeout=60)
    one_line_error(run, "model.layers = 256, model.d_model = ", "model.experts = 4096", expect)
