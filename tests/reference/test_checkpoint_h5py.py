"""A moe.c checkpoint read with h5py alone, against the layout of docs/file-formats.md ("HDF5 checkpoint").

`build/tests/test_checkpoint --only test_export_for_h5py` writes, into $MOE_CKPT_OUT,
c.h5 (a full checkpoint of a tiny model: dense layer 0, MoE layer 1 with Shazeer noise,
four experts and a shared expert, untied lm_head; moments m = w / 2 and v = w * w;
step 42) and slab.h5 (/slab: the model's parameter slab as one flat float32 array). This
test derives every dataset path, shape and slab position from the Hugging Face Mixtral
layout (model/layout.h's documented order) and the config stored in the file itself,
so a wrong name, shape, order or value in our writer fails here without our C reader.

Run: /usr/bin/python3 -m pytest tests/reference/test_checkpoint_h5py.py  (from the repo
root, after `make build/tests/test_checkpoint`)
"""
import os
import subprocess

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# make SANITIZE=1 test builds elsewhere (Makefile) and says where.
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
SUITE = os.path.join(BUILD, "tests", "test_checkpoint")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    if not os.access(SUITE, os.X_OK):
        pytest.fail(f"{SUITE} is missing: build it first (`make build/tests/test_checkpoint` "
                    f"in {ROOT})", pytrace=False)
    out = tmp_path_factory.mktemp("ckpt")
    run = subprocess.run([SUITE, "--only", "test_export_for_h5py"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, MOE_CKPT_OUT=str(out)))
    assert run.returncode == 0, run.stdout + run.stderr
    with h5py.File(out / "slab.h5", "r") as f:
        slab = f["slab"][()]
    with h5py.File(out / "c.h5", "r") as ckpt:
        yield ckpt, slab


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def expected_tensors(cfg):
    """(path below /model, shape) of every parameter, in the slab's order."""
    C, V = int(cfg["model.d_model"]), int(cfg["model.vocab"])
    H, KV = int(cfg["model.heads"]), int(cfg["model.kv_heads"])
    D = C // H
    E = int(cfg["model.experts"])

    def swiglu(prefix, names, F):
        return [(f"{prefix}/{names[0]}", (F, C)), (f"{prefix}/{names[1]}", (F, C)),
                (f"{prefix}/{names[2]}", (C, F))]

    out = [("embed_tokens", (V, C))]
    for l in range(int(cfg["model.layers"])):
        p = f"layers/{l}"
        out += [(f"{p}/input_layernorm", (C,)), (f"{p}/self_attn/q_proj", (H * D, C)),
                (f"{p}/self_attn/k_proj", (KV * D, C)), (f"{p}/self_attn/v_proj", (KV * D, C)),
                (f"{p}/self_attn/o_proj", (C, H * D)), (f"{p}/post_attention_layernorm", (C,))]
        if (l >= int(cfg.get("model.first_dense_layers", "0"))
                and (l + 1) % int(cfg["model.moe_every"]) == 0):
            out.append((f"{p}/router/gate", (E, C)))
            if cfg["router.noise"] == "shazeer":
                out.append((f"{p}/router/noise", (E, C)))
            for j in range(E):
                out += swiglu(f"{p}/experts/{j}", ("w1", "w3", "w2"),
                              int(cfg["model.expert_ffn_dim"]))
            for j in range(int(cfg["model.shared_experts"])):
                out += swiglu(f"{p}/shared_experts/{j}", ("w1", "w3", "w2"),
                              int(cfg["model.shared_ffn_dim"]))
        else:
            out += swiglu(f"{p}/mlp", ("gate_proj", "up_proj", "down_proj"),
                          int(cfg["model.ffn_dim"]))
    out.append(("norm", (C,)))
    if cfg["model.tie_embeddings"] != "true":
        out.append(("lm_head", (V, C)))
    return out


def datasets(group):
    found = {}
    group.visititems(lambda name, obj: found.__setitem__(name, obj)
                     if isinstance(obj, h5py.Dataset) else None)
    return found


def config(ckpt):
    return {k: text(v) for k, v in ckpt["config"].attrs.items()}


def test_root_attributes(export):
    ckpt, _ = export
    a = ckpt.attrs
    assert text(a["format"]) == "moe.c"
    assert int(a["version"]) == 1
    assert text(a["kind"]) == "full"
    assert int(a["step"]) == 42
    assert int(a["tokens_seen"]) == 42 * 4096
    assert int(a["base_fingerprint"]) == 0


def test_config_is_strings_of_every_section(export):
    ckpt, _ = export
    attrs = ckpt["config"].attrs
    assert all(isinstance(v, (bytes, str)) for v in attrs.values())
    sections = {k.split(".")[0] for k in attrs.keys()}
    assert {"model", "router", "train", "optim", "data"} <= sections
    cfg = config(ckpt)
    assert cfg["model.d_model"] == "8" and cfg["router.noise"] == "shazeer"


def test_model_datasets_equal_the_slab(export):
    ckpt, slab = export
    want = expected_tensors(config(ckpt))
    got = datasets(ckpt["model"])
    assert sorted(got) == sorted(path for path, _ in want)
    offset = 0
    for path, shape in want:
        ds = got[path]
        n = int(np.prod(shape))
        assert ds.dtype == np.float32 and ds.shape == shape, path
        assert np.array_equal(ds[()], slab[offset:offset + n].reshape(shape)), path
        offset += n
    assert offset == slab.size


def test_moments_at_the_parameter_paths(export):
    ckpt, _ = export
    model = datasets(ckpt["model"])
    for which in ("m", "v"):
        moments = datasets(ckpt["optim"][which])
        assert sorted(moments) == sorted(model), which
        for path, ds in moments.items():
            w = model[path][()]
            want = w / np.float32(2) if which == "m" else w * w
            assert ds.dtype == np.float32 and np.array_equal(ds[()], want), f"{which}/{path}"


def test_state(export):
    ckpt, _ = export
    state = ckpt["state"]
    assert state["rng"].dtype == np.uint64 and state["rng"].shape == (4,)
    assert len(set(state["rng"][()].tolist())) == 4   # a seeded state, not zeros
    assert state["step"][()].tolist() == [42]
    assert state["tokens_seen"][()].tolist() == [42 * 4096]
    assert state["data_cursor"][()].tolist() == [42]
    assert state["best_val"][()].tolist() == [1.75]


def test_every_dataset_is_one_checksummed_chunk(export):
    ckpt, _ = export
    found = datasets(ckpt)
    assert len(found) > 100
    for name, ds in found.items():
        assert ds.fletcher32, name
        assert ds.chunks == ds.shape, name
