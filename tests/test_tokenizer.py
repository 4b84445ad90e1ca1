"""Tokenizers (data/tokenizer.h): moe.c's token ids against the reference libraries.

PyPI's `tokenizers` and `sentencepiece` (a venv made by `make deps-test`, driven through
tests/reference/tokenizer_ref.py) train three tokenizers on the default corpus: a
byte-level BPE tokenizer.json with Llama-3's Split regex and ignore_merges, one in Qwen2's
style (NFC, its Split regex), one in GPT-2's style (NFC normaliser, ByteLevel
pre-tokenizer with its regex and a prefix space), and a SentencePiece BPE .model; each
with special tokens. On over 1 MB of mixed text (the
default corpus, Greek, Cyrillic, CJK, Arabic, combining marks, emoji with ZWJ sequences,
whitespace runs, CR LF, special tokens inside the text) `moe tokenize` must give every id
the library gives, and `moe tokenizer decode` the library's text (the input itself where
the tokenizer is lossless). Then runs: a tokenizer travels with the run directory, a
changed or missing copy is refused, `moe sample` decodes with it and `moe route` spells
each token with it."""
import csv
import os
import random
import shutil
import subprocess

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
VENV_PY = os.path.join(BUILD, "venv-tok", "bin", "python")
REF = os.path.join(ROOT, "tests", "reference", "tokenizer_ref.py")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EXTRA = ["Καλημέρα κόσμε, ἀρχὴ ἥμισυ παντός.", "Привет, мир! Съешь же ещё этих булок.",
         "你好，世界。我们在测试分词器。", "こんにちは世界、カタカナとひらがな。",
         "مرحبا بالعالم، هذا اختبار.", "naïve café résumé Zoë", "nai\u0308ve cafe\u0301",
         "🙂🚀👩\u200d👩\u200d👧\u200d👦 🇩🇪 ❤️\u200d🔥", "x\u00a0y\u2003z", "   \t\t  \n\n\n    ",
         "\r\n\r\n", "12345678901234567890", "I'll we've they're DON'T", "\u200b\ufeff",
         "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|><|endoftext|>",
         "a<|im_end|>b", "  <|endoftext|>  ",
         # Pieces past 64 bytes merge through a heap (data/bpe.c): a long word, digit run
         # and whitespace run.
         "".join(random.Random(5).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(900)),
         "7" * 300, " " * 200 + "x", "ab" * 150]


def run(args, check=True, cwd=ROOT):
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, timeout=600)
    if check:
        assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")
    return r


def one_line_error(r):
    assert r.returncode != 0, r.stdout
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("HINT")), lines
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    if not os.path.exists(VENV_PY):
        pytest.fail(f"{VENV_PY} is missing: `make deps-test` makes the tokenizer venv")
    run([MOE, "prepare"])
    d = tmp_path_factory.mktemp("tok")
    corpus = ""
    for dom in ("fortunes", "bible", "python"):
        with open(os.path.join(ROOT, "data/default", dom, "train.txt"), encoding="utf-8") as f:
            corpus += f.read()[:600000]
    (d / "corpus.txt").write_text(corpus, encoding="utf-8")
    rng = random.Random(18)
    parts, pos = [], 0
    while pos < len(corpus):
        k = rng.randint(50, 400)
        parts += [corpus[pos:pos + k], rng.choice(EXTRA)]
        pos += k
    mixed = "".join(parts)
    with open(d / "mixed.txt", "w", encoding="utf-8", newline="") as f:
        f.write(mixed)
    assert len(mixed.encode()) >= 1 << 20
    run([VENV_PY, REF, "train-bpe", d / "corpus.txt", d / "llama3.json", "llama3"])
    run([VENV_PY, REF, "train-bpe", d / "corpus.txt", d / "gpt2.json", "gpt2"])
    run([VENV_PY, REF, "train-bpe", d / "corpus.txt", d / "qwen2.json", "qwen2"])
    run([VENV_PY, REF, "train-spm", d / "corpus.txt", d / "spm"])
    return d


def reference_ids(work, tok):
    out = work / (os.path.basename(tok) + ".ref")
    run([VENV_PY, REF, "encode", tok, work / "mixed.txt", out])
    return np.fromfile(out, dtype="<i4")


def moe_ids(work, tok, suffix):
    out = work / (os.path.basename(tok) + suffix)
    r = run([MOE, "tokenize", tok, work / "mixed.txt", "--out", out])
    if suffix == ".h5":
        with h5py.File(out) as f:
            ids = f["tokens"][:]
    else:
        raw = np.fromfile(out, dtype="<u2")
        header = np.frombuffer(raw[:512].tobytes(), dtype="<i4")
        assert list(header[:3]) == [20240520, 1, len(raw) - 512]
        ids = raw[512:].astype(np.int64)
    return ids, r


def compare(work, tok, suffix=".h5"):
    ref = reference_ids(work, tok)
    got, r = moe_ids(work, tok, suffix)
    mismatches = int(np.sum(ref[:min(len(ref), len(got))] != got[:min(len(ref), len(got))]))
    print(f"{os.path.basename(tok)}: {len(ref)} ids compared on "
          f"{os.path.getsize(work / 'mixed.txt')} bytes, {mismatches} mismatches; "
          f"{r.stdout.decode().strip()}")
    assert len(got) == len(ref), (len(got), len(ref))
    assert mismatches == 0
    return ref


@pytest.mark.parametrize("name,suffix", [("llama3.json", ".h5"), ("gpt2.json", ".bin"),
                                          ("qwen2.json", ".h5"), ("spm.model", ".h5")])
def test_ids_equal_reference(work, name, suffix):
    compare(work, work / name, suffix)


@pytest.mark.parametrize("name", ["llama3.json", "spm.model"])
def test_decode_encode_is_identity(work, name):
    """Llama-3 style BPE and identity-normalised SentencePiece lose nothing."""
    tok = work / name
    ids = work / (name + ".rt.h5")
    run([MOE, "tokenize", tok, work / "mixed.txt", "--out", ids])
    back = run([MOE, "tokenizer", "decode", tok, ids]).stdout
    assert back == (work / "mixed.txt").read_bytes()


def test_gpt2_style_decodes_as_the_library(work):
    """NFC and the prefix space change the text: the decode must still be the library's."""
    tok = work / "gpt2.json"
    ids = work / "gpt2.rt.bin"
    run([MOE, "tokenize", tok, work / "mixed.txt", "--out", ids])
    back = run([MOE, "tokenizer", "decode", tok, ids]).stdout
    code = ("import sys\nfrom tokenizers import Tokenizer\n"
            "t = Tokenizer.from_file(sys.argv[1])\n"
            "ids = open(sys.argv[2], 'rb').read()[1024:]\n"
            "ids = [int.from_bytes(ids[i:i + 2], 'little') for i in range(0, len(ids), 2)]\n"
            "sys.stdout.buffer.write(t.decode(ids, skip_special_tokens=False).encode())\n")
    ref = run([VENV_PY, "-c", code, tok, ids]).stdout
    assert back == ref


def test_moe_tokenizer_train_loads_in_sentencepiece(work):
    prefix = work / "ours"
    r = run([MOE, "tokenizer", "train", work / "corpus.txt", "--vocab-size", 2000,
             "--out", prefix])
    assert "ours.model" in r.stdout.decode()
    model = str(prefix) + ".model"
    code = ("import sys, sentencepiece as spm\n"
            "print(spm.SentencePieceProcessor(model_file=sys.argv[1]).get_piece_size())\n")
    assert run([VENV_PY, "-c", code, model]).stdout.decode().strip() == "2000"
    compare(work, model)


def test_one_megabyte_takes_seconds(work):
    r = run([MOE, "tokenize", work / "llama3.json", work / "mixed.txt", "--out",
             work / "speed.h5"])
    # The progress line's rate; a loaded 2-core machine still does well over 0.1 MB/s.
    rate = float(r.stderr.decode().strip().rsplit(",", 1)[1].split()[0])
    print(f"tokenize rate {rate} MB/s")
    assert rate > 0.1


@pytest.mark.parametrize("body,needle", [
    ('{"model": {"type": "WordPiece"}}', "model type = WordPiece is not supported"),
    ('{"normalizer": {"type": "NFKC"}, "model": {"type": "BPE"}}',
     "normalizer type = NFKC is not supported"),
    ('{"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": '
     '{"type": "Metaspace"}}', "pre_tokenizer type = Metaspace is not supported"),
    ('not json', "not a tokenizer.json"),
])
def test_unsupported_tokenizer_json_is_refused(tmp_path, body, needle):
    p = tmp_path / "tokenizer.json"
    p.write_text(body)
    (tmp_path / "x.txt").write_text("hello")
    err = one_line_error(run([MOE, "tokenize", p, tmp_path / "x.txt", "--out",
                              tmp_path / "o.h5"], check=False))
    assert str(p) in err and needle in err, err


def test_missing_byte_symbol_is_refused(work, tmp_path):
    import json
    with open(work / "llama3.json", encoding="utf-8") as f:
        j = json.load(f)
    del j["model"]["vocab"]["Ġ"]
    j["model"]["merges"] = []
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(j))
    (tmp_path / "x.txt").write_text("hello")
    err = one_line_error(run([MOE, "tokenize", p, tmp_path / "x.txt", "--out",
                              tmp_path / "o.h5"], check=False))
    assert "lacks the byte-level symbol 'Ġ' of byte 0x20" in err, err


TINY = ["model.layers=1", "model.d_model=32", "model.heads=2", "model.kv_heads=2",
        "model.seq_len=32", "model.experts=2", "model.expert_ffn_dim=32", "router.top_k=1",
        "train.batch_size=2", "train.steps=2", "train.eval_every=0", "train.threads=1",
        "train.sample_tokens=8", "data.val_tokens=256"]


def test_run_keeps_its_tokenizer(work, tmp_path):
    """A run with a tokenizer.json: text domain shorthand with the held-out split, the
    copy in the run directory, sample through it, refusal of a changed or missing copy."""
    text = tmp_path / "mine.txt"
    shutil.copy(work / "mixed.txt", text)
    args = [MOE, "train", "configs/tiny.ini", *TINY, "model.vocab=3000",
            f"train.out_dir={tmp_path}", "train.name=tok", "data.tokenizer=hf-bpe",
            f"data.tokenizer_file={work / 'llama3.json'}", f"domain.mine.text={text}"]
    out = run(args).stdout.decode(errors="replace")
    ids = len(reference_ids(work, work / "llama3.json"))
    held = -(-ids // 10)
    assert (f"domain mine: no val source: its last {held} of {ids} tokens "
            f"(data.val_fraction = 0.1) are held out for validation") in out, out
    run_dir = tmp_path / "tok"
    copy = run_dir / "tokenizer.json"
    assert copy.read_bytes() == (work / "llama3.json").read_bytes()
    s = run([MOE, "sample", run_dir, "--prompt", "Καλημέρα <|endoftext|>", "--tokens", 5,
             "--temperature", 0]).stdout.decode(errors="replace")
    assert s.startswith("Καλημέρα <|endoftext|>"), s
    copy.write_bytes(copy.read_bytes().replace(b'"<|im_end|>"', b'"<|im_stop|>"'))
    err = one_line_error(run([MOE, "sample", run_dir], check=False))
    assert str(copy) in err and "changed since" in err, err
    copy.unlink()
    err = one_line_error(run([MOE, "sample", run_dir], check=False))
    assert str(copy) in err and "missing" in err, err


def test_tokenizer_vocab_beyond_model_is_refused(work, tmp_path):
    err = one_line_error(run([MOE, "train", "configs/tiny.ini", *TINY,
                              f"train.out_dir={tmp_path}", "data.tokenizer=sentencepiece",
                              f"data.tokenizer_file={work / 'spm.model'}"], check=False))
    assert "spm.model: the tokenizer's ids reach 2999, past model.vocab = 256" in err, err


def test_bytes_vocab_text_too_short_to_hold_out(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("x" * 100)
    err = one_line_error(run([MOE, "train", "configs/tiny.ini", *TINY,
                              f"train.out_dir={tmp_path}", f"domain.s.text={text}"],
                             check=False))
    assert "domain s: 100 tokens are too few to hold out data.val_fraction = 0.1" in err, err


AUTO_IDS = ("import sys, array\nfrom transformers import AutoTokenizer\n"
            "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "text = open(sys.argv[2], encoding='utf-8', newline='').read()\n"
            "ids = t(text, add_special_tokens=False)['input_ids']\n"
            "array.array('i', ids).tofile(open(sys.argv[3], 'wb'))\n"
            "print(type(t).__name__)\n")


@pytest.mark.parametrize("kind,name", [("hf-bpe", "llama3.json"), ("sentencepiece", "spm.model")])
def test_export_and_import_carry_the_tokenizer(work, tmp_path, kind, name):
    """moe export writes what AutoTokenizer loads (its ids equal moe's on the mixed text);
    moe import takes the tokenizer back beside the checkpoint, and moe sample uses it."""
    text = tmp_path / "t.txt"
    text.write_text("Καλημέρα κόσμε. " * 400, encoding="utf-8")
    run([MOE, "train", "configs/tiny.ini", *TINY, "model.vocab=3000",
         "model.tie_embeddings=false", "train.sample_tokens=0", f"train.out_dir={tmp_path}",
         "train.name=r", f"data.tokenizer={kind}", f"data.tokenizer_file={work / name}",
         f"domain.t.text={text}"])
    hf = tmp_path / "hf"
    run([MOE, "export", tmp_path / "r", hf])
    copy = "tokenizer.json" if kind == "hf-bpe" else "tokenizer.model"
    assert (hf / copy).read_bytes() == (work / name).read_bytes()
    ids = tmp_path / "auto.i32"
    cls = run([VENV_PY, "-c", AUTO_IDS, hf, work / "mixed.txt", ids]).stdout.decode()
    print(f"AutoTokenizer -> {cls.strip()}")
    ref = np.fromfile(ids, dtype="<i4")
    got, _ = moe_ids(work, hf / copy, ".h5")
    assert len(ref) == len(got) and int(np.sum(ref != got)) == 0
    (tmp_path / "imp").mkdir()
    out = run([MOE, "import", hf, tmp_path / "imp" / "m.h5"]).stdout.decode()
    assert f"tokenizer: {tmp_path / 'imp' / copy} (data.tokenizer = {kind})" in out, out
    assert (tmp_path / "imp" / copy).read_bytes() == (work / name).read_bytes()
    s = run([MOE, "sample", tmp_path / "imp" / "m.h5", "--prompt", "Καλημέρα", "--tokens", 4,
             "--temperature", 0]).stdout.decode(errors="replace")
    assert s.startswith("Καλημέρα"), s


def test_resume_and_finetune_use_the_run_tokenizer(work, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Καλημέρα κόσμε. " * 400, encoding="utf-8")
    base = [MOE, "train", "configs/tiny.ini", *TINY, "model.vocab=3000", "train.sample_tokens=0",
            f"train.out_dir={tmp_path}", "data.tokenizer=sentencepiece",
            f"data.tokenizer_file={work / 'spm.model'}", f"domain.t.text={text}"]
    run(base + ["train.name=a"])
    out = run([MOE, "train", "--resume", tmp_path / "a", "train.steps=3"]).stdout.decode()
    assert "done: step 3," in out, out
    ft = [MOE, "finetune", "configs/tiny.ini", *TINY, "model.vocab=3000", "train.sample_tokens=0",
          f"train.out_dir={tmp_path}", "train.name=f", f"finetune.init={tmp_path / 'a'}",
          f"domain.t.text={text}"]
    run(ft)
    assert (tmp_path / "f" / "tokenizer.model").read_bytes() == (work / "spm.model").read_bytes()
    assert "tokenizer = sentencepiece" in (tmp_path / "f" / "config.ini").read_text()
    err = one_line_error(run(ft[:-1] + ["train.name=g", f"domain.t.text={text}",
                                        "data.tokenizer=hf-bpe",
                                        f"data.tokenizer_file={work / 'llama3.json'}"],
                             check=False))
    assert "llama3.json: not the tokenizer" in err, err


def unescape(cell):
    """The bytes of a tokens.csv char cell (\\n, \\t, \\\\ and \\xNN escapes)."""
    raw, out, i = cell.encode(), bytearray(), 0
    while i < len(raw):
        if raw[i:i + 1] != b"\\":
            out.append(raw[i])
            i += 1
        elif raw[i + 1:i + 2] == b"x":
            out.append(int(raw[i + 2:i + 4], 16))
            i += 4
        else:
            out += {b"n": b"\n", b"t": b"\t", b"\\": b"\\"}[raw[i + 1:i + 2]]
            i += 2
    return bytes(out)


@pytest.mark.parametrize("kind,name", [("hf-bpe", "llama3.json"), ("sentencepiece", "spm.model")])
def test_route_spells_tokens_with_the_tokenizer(work, tmp_path, kind, name):
    """moe route's tokens.csv: each token's text, the spaces SentencePiece puts before
    words included, so that the cells of a window spell its text."""
    text = tmp_path / "t.txt"
    with open(os.path.join(ROOT, "data/default/bible/val.txt"), encoding="utf-8") as f:
        text.write_text(f.read()[:20000], encoding="utf-8")
    run([MOE, "train", "configs/tiny.ini", *TINY, "model.vocab=3000", "train.sample_tokens=0",
         "train.steps=1", f"train.out_dir={tmp_path}", "train.name=r", f"data.tokenizer={kind}",
         f"data.tokenizer_file={work / name}", f"domain.t.text={text}"])
    run([MOE, "route", tmp_path / "r", text, "--tokens", 30, "--out", tmp_path / "route"])
    with open(tmp_path / "route" / "tokens.csv", newline="", encoding="utf-8") as f:
        cells = [r["char"] for r in csv.DictReader(f) if r["layer"] == "0"]
    assert len(cells) == 30 and all(cells), cells
    assert text.read_bytes().startswith(b"".join(unescape(c) for c in cells)), cells


def test_text_and_train_together_are_refused(tmp_path):
    err = one_line_error(run([MOE, "train", "configs/tiny.ini", *TINY,
                              f"train.out_dir={tmp_path}", "domain.x.text=a.txt",
                              "domain.x.train=b.txt"], check=False))
    assert "[domain x]: set train or text, not both" in err, err
