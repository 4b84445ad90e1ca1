"""`moe export` / `moe import`: Hugging Face Mixtral directories (config.json, safetensors).

Round trips are bit-identical (F32, single file and shards), Python's own `safetensors`
package and `json` read the export, bf16 is round-to-nearest-even, F16 and BF16 import
exactly, every corrupted safetensors header and every config Mixtral cannot express is
refused with one line naming the file or the feature. The logits check against an
independent NumPy Mixtral is tests/reference/test_mixtral_numpy.py."""
import json
import os
import re
import shutil
import struct
import subprocess

import h5py
import numpy as np
import pytest
# Not packaged by Debian 12: `make deps-test` installs it from PyPI. No skip: a missing
# package is a failure here, never a silently skipped check.
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))

MODEL = ["model.layers=2", "model.d_model=32", "model.heads=4", "model.kv_heads=2",
         "model.seq_len=32", "model.experts=4", "model.expert_ffn_dim=48",
         "model.tie_embeddings=false", "router.top_k=2", "train.batch_size=8",
         "train.threads=1", "train.sample_tokens=0", "train.eval_every=0",
         "data.val_tokens=4096"]


def run_moe(args, check=True):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def one_line_error(run):
    assert run.returncode != 0, run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


def family_export(tmp, name, keys):
    """A family's fixture: a 3-step run with its keys and its `moe export`."""
    ckpt = train(tmp, "base", keys, steps=3)
    run_moe(["export", ckpt, tmp / "export"])
    return {"name": name, "tmp": tmp, "ckpt": ckpt, "export": tmp / "export"}


def assert_import_refusals(export, cases, tmp_path):
    """Each (edit of config.json, message) of cases, applied to a copy of the export
    directory, makes `moe import` fail with one line naming config.json and the key."""
    for k, (edit, message) in enumerate(cases):
        out = tmp_path / f"hf{k}"
        shutil.copytree(export, out)
        config = json.loads((out / "config.json").read_text())
        edit(config)
        (out / "config.json").write_text(json.dumps(config))
        err = one_line_error(run_moe(["import", out, tmp_path / "x.h5"], check=False))
        assert message in err and str(out / "config.json") in err, err


def text(n):
    words = ("experts in a mixture each learn a part of the data and a router picks two "
             "of them for every token it reads").split()
    return " ".join(words[(i * 3 + i // 5) % len(words)] for i in range(n // 5))


def train(tmp, name, extra=(), steps=20):
    data = tmp / "text.txt"
    if not data.exists():
        data.write_text(text(20000))
    cfg = tmp / "run.ini"
    cfg.write_text(f"[domain text]\nkind = text\ntrain = {data}\nval = {data}\n")
    run_moe(["train", cfg, f"train.steps={steps}", f"train.out_dir={tmp}",
             f"train.name={name}"] + MODEL + list(extra))
    return tmp / name / f"ckpt_{steps:06d}.h5"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    ckpt = train(tmp, "base")
    run_moe(["export", ckpt, tmp / "export"])
    return {"tmp": tmp, "ckpt": ckpt, "export": tmp / "export", "data": tmp / "text.txt"}


def params(path):
    out = {}
    with h5py.File(path, "r") as f:
        f["model"].visititems(
            lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def hf_name(path):
    """/model dataset path -> Hugging Face tensor name."""
    m = re.fullmatch(r"layers/(\d+)/(.*)", path)
    if not m:
        return {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
                "lm_head": "lm_head.weight"}[path]
    i, rest = m.groups()
    rest = rest.replace("router/gate", "block_sparse_moe.gate")
    rest = re.sub(r"experts/(\d+)/(w\d)", r"block_sparse_moe.experts.\1.\2", rest)
    return f"model.layers.{i}.{rest.replace('/', '.')}.weight"


def assert_bit_identical(a, b):
    pa, pb = params(a), params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype == np.float32 and pa[k].shape == pb[k].shape, k
        assert np.array_equal(pa[k].view(np.uint32), pb[k].view(np.uint32)), k


def expected_names(c):
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not c["tie_word_embeddings"]:
        names.append("lm_head.weight")
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "block_sparse_moe.gate.weight"]
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}block_sparse_moe.experts.{j}.{w}.weight"
                  for j in range(c["num_local_experts"]) for w in ("w1", "w2", "w3")]
    return sorted(names)


# ---- round trips ----------------------------------------------------------------------------

def test_export_import_is_bit_identical(base, tmp_path):
    out = tmp_path / "imported.h5"
    run_moe(["import", base["export"], out])
    assert_bit_identical(base["ckpt"], out)
    with h5py.File(out, "r") as f:
        assert f.attrs["step"] == 0 and "optim" not in f
        cfg = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f["config"].attrs.items()}
    assert cfg["model.seq_len"] == "32" and cfg["model.kv_heads"] == "2"
    assert cfg["model.tie_embeddings"] == "false" and cfg["router.renorm"] == "true"
    # Exporting the import gives the same files, byte for byte: the config maps both ways.
    run_moe(["export", out, tmp_path / "again"])
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (base["export"] / name).read_bytes()


def test_end_of_sequence_id_goes_out_and_comes_back(base, tmp_path):
    assert json.loads((base["export"] / "config.json").read_text())["eos_token_id"] is None
    ckpt = train(tmp_path, "eos", ["data.eos_id=46"], steps=1)
    run_moe(["export", ckpt, tmp_path / "export"])
    assert json.loads((tmp_path / "export" / "config.json").read_text())["eos_token_id"] == 46
    run_moe(["import", tmp_path / "export", tmp_path / "imported.h5"])
    with h5py.File(tmp_path / "imported.h5", "r") as f:
        assert f["config"].attrs["data.eos_id"] in (46, b"46", "46")


def test_imported_checkpoint_evaluates_and_finetunes_like_the_original(base, tmp_path):
    out = tmp_path / "imported.h5"
    run_moe(["import", base["export"], out])
    # The import keeps moe.c's default [data] and [train] keys: pin what eval reads.
    same = ["data.val_tokens=4096", "train.batch_size=8", "train.threads=1"]
    loss = [re.search(r"^mean\s+(\S+)", run_moe(["eval", c, base["data"]] + same).stdout,
                      re.M).group(1) for c in (base["ckpt"], out)]
    assert loss[0] == loss[1]
    cfg = tmp_path / "ft.ini"
    cfg.write_text(f"[domain text]\nkind = text\ntrain = {base['data']}\nval = {base['data']}\n")
    run_moe(["finetune", cfg, f"finetune.init={out}", "finetune.train=router", "train.steps=2",
             f"train.out_dir={tmp_path}", "train.name=ft", "train.threads=1",
             "train.sample_tokens=0", "data.val_tokens=4096"])
    assert (tmp_path / "ft" / "ckpt_000002.h5").exists()


def test_python_safetensors_and_json_read_the_export(base):
    config = json.loads((base["export"] / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert {k: config[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "vocab_size",
        "max_position_embeddings", "tie_word_embeddings", "torch_dtype")} == {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "vocab_size": 256, "max_position_embeddings": 32,
        "tie_word_embeddings": False, "torch_dtype": "float32"}
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000
    assert config["router_aux_loss_coef"] == 0.01 and config["output_router_logits"] is False
    weights = load_file(str(base["export"] / "model.safetensors"))
    assert sorted(weights) == expected_names(config)
    theirs = {hf_name(k): v for k, v in params(base["ckpt"]).items()}
    assert sorted(theirs) == sorted(weights)
    for name, w in weights.items():
        assert w.dtype == np.float32 and np.array_equal(w, theirs[name]), name
    with safe_open(str(base["export"] / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}


# MixtralConfig's float fields. transformers 5 validates types strictly and refuses an
# integer such as `"router_jitter_noise": 0` where the class declares a float.
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "router_aux_loss_coef", "router_jitter_noise",
                "initializer_range", "attention_dropout")


def test_every_float_field_is_written_as_a_float(base):
    text = (base["export"] / "config.json").read_text()
    config = json.loads(text, parse_int=lambda s: ("integer", s))
    for key in FLOAT_FIELDS:
        assert isinstance(config[key], float), f"{key}: {config[key]}"
    assert config["router_jitter_noise"] == 0.0 and config["attention_dropout"] == 0.0
    assert config["rope_theta"] == 10000.0
    assert config["num_hidden_layers"] == ("integer", "2")


def test_tied_export_omits_lm_head(tmp_path):
    ckpt = train(tmp_path, "tied", ["model.tie_embeddings=true"], steps=2)
    run_moe(["export", ckpt, tmp_path / "hf"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    names = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in names and sorted(names) == expected_names(config)
    run_moe(["import", tmp_path / "hf", tmp_path / "back.h5"])
    assert_bit_identical(ckpt, tmp_path / "back.h5")


def test_sharded_export_round_trips_and_indexes_every_tensor(base, tmp_path):
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")   # an earlier single-file export
    run_moe(["export", base["ckpt"], out, "--shard-size", "20000", "--force"])
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    config = json.loads((out / "config.json").read_text())
    assert sorted(index["weight_map"]) == expected_names(config)
    total = 0
    for name in files:
        with safe_open(str(out / name), "np") as f:
            keys = sorted(f.keys())
            assert keys == sorted(k for k, v in index["weight_map"].items() if v == name)
            sizes = [f.get_tensor(k).nbytes for k in keys]
        total += sum(sizes)
        assert sum(sizes) <= 20000 or len(keys) == 1   # only a tensor over the limit is alone
    assert index["metadata"]["total_size"] == total
    run_moe(["import", out, tmp_path / "back.h5"])
    assert_bit_identical(base["ckpt"], tmp_path / "back.h5")
    # And back to one file: the index goes, so transformers cannot read a stale one.
    run_moe(["export", base["ckpt"], out, "--force"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


# ---- bf16 and f16 -------------------------------------------------------------------------

# float32 bit patterns around bf16's rounding boundary, and their round-to-nearest-even.
BF16_CASES = {
    0x3F808000: 0x3F80,   # tie, even below: stays
    0x3F818000: 0x3F82,   # tie, odd below: rounds up to even
    0x3F808001: 0x3F81,   # just above the tie
    0x3F807FFF: 0x3F80,   # just below the tie
    0xBF818000: 0xBF82,   # negative tie
    0x7F7FFFFF: 0x7F80,   # the largest float rounds to infinity
    0x00018000: 0x0002,   # subnormal tie, odd below
    0x80000000: 0x8000,   # -0
}


def rne_bf16(w):
    u = w.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def raw_tensors(path):
    """{name: (dtype, shape, raw bytes)} read with json and struct alone."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def test_bf16_export_rounds_to_nearest_even(base, tmp_path):
    ckpt = tmp_path / "specials.h5"
    shutil.copy(base["ckpt"], ckpt)
    specials = np.array(list(BF16_CASES), dtype=np.uint32).view(np.float32)
    with h5py.File(ckpt, "r+") as f:   # h5py recomputes the fletcher32 checksum
        f["model/embed_tokens"][0, :len(specials)] = specials
    run_moe(["export", ckpt, tmp_path / "bf16", "--dtype", "bf16"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    raw = raw_tensors(tmp_path / "bf16" / "model.safetensors")
    weights = {hf_name(k): v for k, v in params(ckpt).items()}
    assert sorted(raw) == sorted(weights)
    for name, (dtype, shape, data) in raw.items():
        assert dtype == "BF16" and shape == list(weights[name].shape), name
        assert np.array_equal(np.frombuffer(data, "<u2"), rne_bf16(weights[name]).ravel()), name
    embed = np.frombuffer(raw["model.embed_tokens.weight"][2], "<u2")
    assert embed[:len(specials)].tolist() == list(BF16_CASES.values())
    # Import widens bf16 exactly (the low 16 bits are zero).
    run_moe(["import", tmp_path / "bf16", tmp_path / "back.h5"])
    for k, v in params(tmp_path / "back.h5").items():
        widened = (rne_bf16(weights[hf_name(k)]).astype(np.uint32) << 16)
        assert np.array_equal(v.view(np.uint32), widened), k


def test_f16_import_is_exact(base, tmp_path):
    weights = load_file(str(base["export"] / "model.safetensors"))
    half = {k: v.astype(np.float16) for k, v in weights.items()}
    # Subnormals, the largest half and -0 through the decoder.
    half["model.embed_tokens.weight"][0, :4] = np.array([6e-8, 1e-5, 65504, -0.0], np.float16)
    out = tmp_path / "f16"
    out.mkdir()
    shutil.copy(base["export"] / "config.json", out)
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    run_moe(["import", out, tmp_path / "back.h5"])
    for k, v in params(tmp_path / "back.h5").items():
        want = half[hf_name(k)].astype(np.float32)
        assert np.array_equal(v.view(np.uint32), want.view(np.uint32)), k


# ---- corrupted safetensors files ----------------------------------------------------------

def st_file(header, data, pad=True):
    """A safetensors file from a header (dict or raw bytes) and a data area."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def st_parts(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def by_offset(header):
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])


def retiled(header, data, drop=(), add=None, reshape=None):
    """Rewrites a valid file without the tensors in drop, plus add = (name, dtype, shape,
    bytes), or with reshape = (name, shape) over the same bytes."""
    tensors = [(k, header[k]["dtype"], header[k]["shape"],
                data[header[k]["data_offsets"][0]:header[k]["data_offsets"][1]])
               for k in by_offset(header) if k not in drop]
    if add:
        tensors.append(add)
    out, at, blob = {"__metadata__": {"format": "pt"}}, 0, b""
    for name, dtype, shape, raw in tensors:
        if reshape and name == reshape[0]:
            shape = reshape[1]
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        at += len(raw)
        blob += raw
    return st_file(out, blob)


def edit(header, fn):
    h = json.loads(json.dumps(header))
    fn(h)
    return h


def shift(h, name, by):
    h[name]["data_offsets"] = [o + by for o in h[name]["data_offsets"]]


def corrupt(case, header, data):
    first, second, last = by_offset(header)[0], by_offset(header)[1], by_offset(header)[-1]
    w1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    dup = json.dumps(header)[:-1] + ", " + json.dumps({first: header[first]})[1:]
    return {
        "short": lambda: b"\x10\x00\x00\x00\x00",
        "absurd": lambda: struct.pack("<Q", 1 << 40) + b"{}      ",
        "past-end": lambda: struct.pack("<Q", 5000) + b"{}      ",
        "not-json": lambda: st_file(b"{not json", data),
        "not-object": lambda: st_file(b"[1, 2, 3]", data),
        "after-json": lambda: st_file(json.dumps(header).encode() + b" x", data),
        "unknown-dtype": lambda: st_file(edit(header, lambda h: h[first].update(dtype="Q4_K")), data),
        "size-mismatch": lambda: st_file(edit(header, lambda h: h[first].update(shape=[2, 2])), data),
        "outside": lambda: st_file(edit(header, lambda h: shift(h, last, 4)), data),
        "truncated": lambda: st_file(header, data[:-100]),
        "overlap": lambda: st_file(edit(header, lambda h: shift(h, second, -4)), data),
        "hole": lambda: st_file(edit(header, lambda h: shift(h, last, 4)), data + b"\0" * 4),
        "trailing": lambda: st_file(header, data + b"\0" * 8),
        "duplicate": lambda: st_file(dup.encode(), data),
        "missing": lambda: retiled(header, data, drop=["model.norm.weight"]),
        "unexpected": lambda: retiled(header, data, add=(
            "model.layers.0.self_attn.rotary_emb.inv_freq", "F32", [4], b"\0" * 16)),
        "shape-vs-config": lambda: retiled(header, data, reshape=(w1, [32, 48])),
    }[case]()


CORRUPT = {
    "short": "5 bytes: shorter than the 8-byte header length",
    "absurd": "header length 1099511627776 is absurd",
    "past-end": "header length 5000 exceeds the 8 bytes after the length field",
    "not-json": "header is not valid JSON",
    "not-object": "header is not a JSON object",
    "after-json": "header has bytes after its JSON value",
    "unknown-dtype": "dtype 'Q4_K' is not F32, BF16 or F16",
    "size-mismatch": "shape [2, 2] as F32 needs 16 bytes but data_offsets",
    "outside": "lie outside the data area",
    "truncated": "lie outside the data area",
    "overlap": "overlap",
    "hole": "belong to no tensor",
    "trailing": "(trailing bytes)",
    "duplicate": "appears twice in the header",
    "missing": "tensor model.norm.weight is missing",
    "unexpected": "unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq",
    "shape-vs-config": "has shape [32, 48], config.json implies [48, 32]",
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupted_safetensors_is_refused(base, tmp_path, case):
    header, data = st_parts(base["export"] / "model.safetensors")
    out = tmp_path / "hf"
    out.mkdir()
    shutil.copy(base["export"] / "config.json", out)
    (out / "model.safetensors").write_bytes(corrupt(case, header, data))
    err = one_line_error(run_moe(["import", out, tmp_path / "x.h5"], check=False))
    assert CORRUPT[case] in err, err
    assert (str(out) in err), err   # names the file (or, for a missing tensor, the directory)
    assert not (tmp_path / "x.h5").exists()


def test_inconsistent_index_is_refused(base, tmp_path):
    out = tmp_path / "sharded"
    run_moe(["export", base["ckpt"], out, "--shard-size", "20000"])
    path = out / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    wm["model.norm.weight"], wm["model.embed_tokens.weight"] = (
        wm["model.embed_tokens.weight"], wm["model.norm.weight"])
    path.write_text(json.dumps(index))
    err = one_line_error(run_moe(["import", out, tmp_path / "x.h5"], check=False))
    assert "which does not hold it" in err and str(path) in err, err
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    path.write_text(json.dumps(index))
    err = one_line_error(run_moe(["import", out, tmp_path / "x.h5"], check=False))
    assert "does not name a file in" in err, err


# ---- what Mixtral cannot express ------------------------------------------------------------

# A config's features pick the family it exports as (QK-norm per head: Qwen3-MoE, over
# the whole projections: OLMoE, biases or shared experts: Qwen2-MoE, else Mixtral).
REFUSED = {
    "shared": (["model.shared_experts=1"], "Qwen2-MoE",
               "model.shared_gate = false: Qwen2-MoE gates its shared expert"),
    "two-shared": (["model.shared_experts=2", "model.shared_gate=true", "model.qkv_bias=true"],
                   "Qwen2-MoE", "model.shared_experts = 2: Qwen2-MoE has exactly one"),
    "qwen2-no-bias": (["model.shared_experts=1", "model.shared_gate=true"], "Qwen2-MoE",
                      "model.qkv_bias = false: Qwen2-MoE's q, k and v projections have biases"),
    "qwen2-qk-norm": (["model.shared_experts=1", "model.shared_gate=true", "model.qkv_bias=true",
                       "model.qk_norm=head"], "Qwen2-MoE",
                      "model.qk_norm = head: Qwen2-MoE has no QK-norm"),
    "olmoe-dense": (["model.qk_norm=full", "model.moe_every=2"], "OLMoE",
                    "model.moe_every = 2: OLMoE has no dense layers"),
    "qwen3-sigmoid": (["model.qk_norm=head", "router.score=sigmoid"], "Qwen3-MoE",
                      "router.score = sigmoid: Qwen3-MoE scores experts with a softmax"),
    "sigmoid": (["router.score=sigmoid"], "Mixtral", "router.score = sigmoid: Mixtral scores experts with a softmax"),
    "shazeer": (["router.noise=shazeer"], "Mixtral", "router.noise = shazeer: Mixtral has no learned noise"),
    "dense": (["model.moe_every=2"], "Mixtral", "model.moe_every = 2: Mixtral has no dense layers"),
    "no-renorm": (["router.renorm=false"], "Mixtral", "router.renorm = false: Mixtral always renormalises"),
    "no-renorm-top1": (["router.renorm=false", "router.top_k=1"], "Mixtral", "with top_k = 1 its gate is 1.0"),
    "hash": (["router.select=hash"], "Mixtral", "router.select = hash: Mixtral routes by token-choice top-k"),
    "expert-bias": (["router.bias_gamma=0.001"], "Mixtral", "router.bias_gamma = 0.001: Mixtral has no expert-selection bias"),
    "frozen-bias": (["router.expert_bias=true"], "Mixtral", "router.expert_bias = true: Mixtral has no expert-selection bias"),
    "groups": (["router.groups=2", "router.topk_groups=1"], "Mixtral",
               "router.topk_groups = 1 < router.groups = 2: Mixtral has no group-limited routing"),
    "gate-scale": (["router.gate_scale=2.5"], "Mixtral", "router.gate_scale = 2.5: Mixtral does not scale its gates"),
    "first-dense": (["model.first_dense_layers=1"], "Mixtral",
                    "model.first_dense_layers = 1: Mixtral has no leading dense layers"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_export_refuses_what_its_family_cannot_express(tmp_path, case):
    extra, family, message = REFUSED[case]
    ckpt = train(tmp_path, case, extra, steps=1)
    err = one_line_error(run_moe(["export", ckpt, tmp_path / "hf"], check=False))
    assert f"cannot export as {family}" in err and message in err and str(ckpt) in err, err
    assert not (tmp_path / "hf").exists()


def test_export_warns_that_capacity_is_dropped(tmp_path):
    ckpt = train(tmp_path, "cap", ["router.capacity_factor=1.25"], steps=1)
    run = run_moe(["export", ckpt, tmp_path / "hf"])
    assert "router.capacity_factor = 1.25 is not exported" in run.stderr


IMPORT_REFUSED = {
    "model-type": (lambda c: c.update(model_type="llama"), "model_type 'llama' is not"),
    "missing-key": (lambda c: c.pop("hidden_size"), "no hidden_size"),
    "top-k": (lambda c: c.update(num_experts_per_tok=9), "num_experts_per_tok = 9: router.top_k = 9"),
    "window": (lambda c: c.update(sliding_window=16), "sliding_window = 16 is shorter than the context (32 tokens)"),
    "rope-scaling": (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling is set"),
    "activation": (lambda c: c.update(hidden_act="gelu"), "hidden_act is not \"silu\""),
    "head-dim": (lambda c: c.update(head_dim=16), "head_dim = 16 differs from hidden_size / num_attention_heads = 8"),
    "not-integer": (lambda c: c.update(num_hidden_layers=2.5), "num_hidden_layers is not an integer"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_REFUSED))
def test_import_refuses_configs_moe_cannot_run(base, tmp_path, case):
    fn, message = IMPORT_REFUSED[case]
    out = tmp_path / "hf"
    shutil.copytree(base["export"], out)
    config = json.loads((out / "config.json").read_text())
    fn(config)
    (out / "config.json").write_text(json.dumps(config))
    err = one_line_error(run_moe(["import", out, tmp_path / "x.h5"], check=False))
    assert message in err and str(out / "config.json") in err, err


def test_import_within_a_sliding_window_with_seq_len(base, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(base["export"], out)
    config = json.loads((out / "config.json").read_text())
    config["sliding_window"] = 16
    (out / "config.json").write_text(json.dumps(config))
    run_moe(["import", out, tmp_path / "x.h5", "--seq-len", "16"])
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert f["config"].attrs["model.seq_len"] in (b"16", "16")
