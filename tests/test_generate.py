"""`moe sample` on a small trained byte model: the options' definitions, checked from its
own greedy or seeded runs (the logits and greedy ids against transformers are
tests/reference/test_families_transformers.py, the cache against the full forward
tests/test_decode.c).

A prompt's ids depend on nothing but the prompt, the seed and its index: batching, the
thread count and the other prompts' stops and EOS change none of them; a stop string cuts
the text before its first occurrence in the continuation; an EOS id ends its sequence
there (not printed); top-k 1 is greedy."""
import subprocess

import h5py
import numpy as np
import pytest

from test_hf import MOE, one_line_error, run_moe, train

PROMPTS = ["The experts ", "a router", "x"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train(tmp_path_factory.mktemp("gen"), "base", steps=30)


def sample(ckpt, *args):
    if "--threads" not in args:   # one thread: the machine is shared
        args = (*args, "--threads", 1)
    run = subprocess.run([MOE, "sample", str(ckpt), *map(str, args)], capture_output=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    return run.stdout


def dumped(ckpt, tmp_path, *args):
    """Every prompt's ids from --dump-logits."""
    path = tmp_path / "dump.h5"
    sample(ckpt, *args, "--dump-logits", path)
    with h5py.File(path, "r") as f:
        return [f[f"{i}/tokens"][()] for i in range(len(f))]


def batch(prompts):
    return [a for p in prompts for a in ("--prompt", p)]


SEEDED = ["--tokens", 24, "--temperature", 1.0, "--seed", 5]


def test_one_prompt_prints_its_text_alone(ckpt, tmp_path):
    out = sample(ckpt, "--prompt", "The ", "--tokens", 20, "--temperature", 0)
    ids = dumped(ckpt, tmp_path, "--prompt", "The ", "--tokens", 20, "--temperature", 0)[0]
    assert out == bytes(ids.astype(np.uint8)) + b"\n" and len(ids) == 24


def test_a_batch_gives_each_prompt_what_it_gets_alone(ckpt, tmp_path):
    together = dumped(ckpt, tmp_path, *batch(PROMPTS), *SEEDED)
    for i, p in enumerate(PROMPTS):
        # prompt i draws with seed + i: alone, that is --seed 5 + i
        alone = dumped(ckpt, tmp_path, "--prompt", p, *SEEDED[:-1], 5 + i)[0]
        assert np.array_equal(together[i], alone), p
    threads = dumped(ckpt, tmp_path, *batch(PROMPTS), *SEEDED, "--threads", 2)
    assert all(np.array_equal(a, b) for a, b in zip(together, threads))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    from_file = dumped(ckpt, tmp_path, "--prompts", tmp_path / "prompts.txt", *SEEDED)
    assert all(np.array_equal(a, b) for a, b in zip(together, from_file))
    text = sample(ckpt, *batch(PROMPTS), *SEEDED)
    want = b"".join(b"=== %d/3 ===\n" % (i + 1) + bytes(ids.astype(np.uint8)) + b"\n"
                    for i, ids in enumerate(together))
    assert text == want


def test_top_k_one_is_greedy(ckpt):
    greedy = sample(ckpt, *batch(PROMPTS), "--tokens", 24, "--temperature", 0)
    assert sample(ckpt, *batch(PROMPTS), *SEEDED, "--top-k", 1) == greedy


def test_a_stop_string_cuts_the_continuation(ckpt, tmp_path):
    full = [bytes(ids.astype(np.uint8)) for ids in dumped(ckpt, tmp_path, *batch(PROMPTS),
                                                           *SEEDED)]
    stop = full[0][len(PROMPTS[0]) + 6:len(PROMPTS[0]) + 8]   # two bytes of prompt 0's
    assert all(32 <= c < 127 for c in stop), stop   # a shell word; the seed gives these
    want = []
    for p, text in zip(PROMPTS, full):
        cut = text.find(stop, len(p))
        want.append(text if cut < 0 else text[:cut])
    out = sample(ckpt, *batch(PROMPTS), *SEEDED, "--stop", stop.decode())
    assert out == b"".join(b"=== %d/3 ===\n" % (i + 1) + w + b"\n" for i, w in enumerate(want))
    assert len(want[0]) < len(full[0])


def test_eos_ends_its_sequence_and_the_others_go_on(ckpt, tmp_path):
    full = dumped(ckpt, tmp_path, *batch(PROMPTS), *SEEDED)
    eos = int(full[1][len(PROMPTS[1]) + 3])   # prompt 1's fourth new id
    got = dumped(ckpt, tmp_path, *batch(PROMPTS), *SEEDED, "--eos", eos)
    for p, ids, cut in zip(PROMPTS, full, got):
        new = list(ids[len(p):])
        want = ids[:len(p) + new.index(eos)] if eos in new else ids
        assert np.array_equal(cut, want), p
    assert len(got[1]) == len(PROMPTS[1]) + 3


def test_a_context_past_seq_len_keeps_generating(ckpt, tmp_path):
    ids = dumped(ckpt, tmp_path, "--prompt", "x" * 30, "--tokens", 40, "--temperature", 0)[0]
    assert len(ids) == 70   # model.seq_len = 32: the cache started again from its last half


def test_bad_options_are_refused_in_one_line(ckpt, tmp_path):
    for args, says in [(["--eos", 256], "not below model.vocab = 256"),
                       (["--stop", ""], "empty stop string"),
                       (["--top-k", -1], "--top-k"),
                       (["--prompts", tmp_path / "none.txt"], "cannot read")]:
        assert says in one_line_error(run_moe(["sample", ckpt, *args], check=False))


def test_expert_choice_is_refused(tmp_path):
    # its training run ends without the end-of-run sample, saying why, and exits 0
    ec = train(tmp_path, "ec", ["router.select=expert_choice", "router.capacity_factor=1",
                                "train.sample_tokens=5"], steps=1)
    assert (tmp_path / "ec" / "ckpt_000001.h5").exists()
    line = one_line_error(run_moe(["sample", ec, "--tokens", 3], check=False))
    assert "router.select = expert_choice" in line
