"""`moe export` / `moe import` for OLMoE, Qwen2-MoE and Qwen3-MoE (Mixtral: test_hf.py).

A config's features pick the family: model.qk_norm = full is OLMoE, head is Qwen3-MoE,
q/k/v biases with one sigmoid-gated shared expert are Qwen2-MoE. For each: config.json
carries the family's keys (floats as floats) and the tensors its transformers class
names; export -> import is bit-identical and exports the same bytes again; the imported
checkpoint fine-tunes (gradients through QK-norm, the biases and the gate). Configs moe.c
cannot run are refused naming the key. The logits against an independent NumPy
reference are tests/reference/test_families_numpy.py."""
import json
import shutil
import subprocess

import pytest
from safetensors.numpy import load_file, save_file

from test_hf import (assert_bit_identical, assert_import_refusals, family_export, one_line_error,
                     run_moe)

FAMILIES = {
    "olmoe": ["model.qk_norm=full", "router.renorm=false", "model.experts=8", "router.top_k=8"],
    "qwen3_moe": ["model.qk_norm=head", "model.layers=3", "model.moe_every=2",
                  "model.ffn_dim=40"],
    "qwen2_moe": ["model.qkv_bias=true", "model.shared_experts=1", "model.shared_gate=true",
                  "model.shared_ffn_dim=40", "router.renorm=false"],
}
CLASSES = {"olmoe": "OlmoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM"}
FLOATS = ("rms_norm_eps", "rope_theta", "router_aux_loss_coef", "initializer_range",
          "attention_dropout")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    return family_export(tmp, request.param, FAMILIES[request.param])


def expected_names(c):
    """The tensor names transformers' class for c["model_type"] has."""
    t = c["model_type"]
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        if t == "qwen2_moe":
            names += [f"{p}self_attn.{x}_proj.bias" for x in "qkv"]
        else:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        mlp = ["gate_proj", "up_proj", "down_proj"]
        if t != "olmoe" and (i + 1) % c["decoder_sparse_step"]:
            names += [f"{p}mlp.{w}.weight" for w in mlp]
            continue
        names += [p + "mlp.gate.weight"]
        names += [f"{p}mlp.experts.{e}.{w}.weight" for e in range(c["num_experts"]) for w in mlp]
        if t == "qwen2_moe":
            names += [f"{p}mlp.shared_expert.{w}.weight" for w in mlp]
            names += [p + "mlp.shared_expert_gate.weight"]
    return sorted(names)


def test_config_and_tensor_names_are_the_familys(family):
    text = (family["export"] / "config.json").read_text()
    c = json.loads(text, parse_int=lambda s: ("integer", s))
    assert c["model_type"] == family["name"] and c["architectures"] == [CLASSES[family["name"]]]
    for key in FLOATS:
        assert isinstance(c[key], float), f"{key}: {c[key]}"
    c = json.loads(text)
    assert c["num_experts"] == (8 if family["name"] == "olmoe" else 4)
    assert c["norm_topk_prob"] is (family["name"] == "qwen3_moe")
    if family["name"] != "olmoe":
        assert c["decoder_sparse_step"] == (2 if family["name"] == "qwen3_moe" else 1)
        assert c["mlp_only_layers"] == [] and c["use_sliding_window"] is False
        assert c["moe_intermediate_size"] == 48
    else:
        assert c["intermediate_size"] == 48 and c["clip_qkv"] is None
    if family["name"] == "qwen2_moe":
        assert c["shared_expert_intermediate_size"] == 40
    weights = load_file(str(family["export"] / "model.safetensors"))
    assert sorted(weights) == expected_names(c)
    shapes = {k: v.shape for k, v in weights.items()}
    head = {"olmoe": [(32,), (16,)], "qwen3_moe": [(8,), (8,)]}.get(family["name"])
    if head:   # OLMoE: the whole projections (4 and 2 heads of 8); Qwen3: one head
        assert [shapes["model.layers.0.self_attn.q_norm.weight"],
                shapes["model.layers.0.self_attn.k_norm.weight"]] == head
    else:
        assert shapes["model.layers.0.self_attn.k_proj.bias"] == (16,)
        assert shapes["model.layers.0.mlp.shared_expert_gate.weight"] == (1, 32)


def test_export_import_is_bit_identical_and_finetunes(family, tmp_path):
    out = tmp_path / "imported.h5"
    run_moe(["import", family["export"], out])
    assert_bit_identical(family["ckpt"], out)
    run_moe(["export", out, tmp_path / "again"])
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (family["export"] / name).read_bytes()
    data = family["tmp"] / "text.txt"
    cfg = tmp_path / "ft.ini"
    cfg.write_text(f"[domain text]\nkind = text\ntrain = {data}\nval = {data}\n")
    run = run_moe(["finetune", cfg, f"finetune.init={out}", "finetune.train=all",
                   "train.steps=2", f"train.out_dir={tmp_path}", "train.name=ft",
                   "train.threads=1", "train.sample_tokens=0", "data.val_tokens=4096",
                   "train.batch_size=8"])
    assert (tmp_path / "ft" / "ckpt_000002.h5").exists(), run.stdout
    # Every tensor moved, the new ones (QK-norm, biases, the shared expert's gate) included.
    import h5py
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "ft" / "ckpt_000002.h5", "r") as b:
        moved = {}
        a["model"].visititems(lambda n, o: moved.__setitem__(n, (o[()] != b["model"][n][()]).any())
                              if isinstance(o, h5py.Dataset) else None)
    new = [n for n in moved if "norm" in n.split("/")[-1] and "layernorm" not in n
           or n.endswith("_bias") or n.endswith("shared_expert_gate")]
    assert new and all(moved[n] for n in new), {n: moved[n] for n in new}


IMPORT_REFUSED = {
    "olmoe": [
        (lambda c: c.update(clip_qkv=8.0), "clip_qkv is set"),
        (lambda c: c.update(attention_bias=True), "attention_bias is true"),
        (lambda c: c.pop("num_experts"), "no num_experts (every OLMoE config.json has it)"),
    ],
    "qwen3_moe": [
        (lambda c: c.update(use_sliding_window=True), "use_sliding_window is true"),
        (lambda c: c.update(mlp_only_layers=[1]), "mlp_only_layers is not empty"),
        (lambda c: c.update(head_dim=16), "head_dim = 16 differs"),
        (lambda c: c.update(layer_types=["full_attention", "sliding_attention", "full_attention"]),
         "layer_types has sliding_attention"),
    ],
    "qwen2_moe": [
        (lambda c: c.update(shared_expert_intermediate_size=0),
         "shared_expert_intermediate_size = 0: model.shared_ffn_dim"),
        (lambda c: c.update(decoder_sparse_step=0), "decoder_sparse_step = 0: model.moe_every"),
        (lambda c: c.update(qkv_bias=False), "qkv_bias is false"),
    ],
}


def test_import_refuses_what_moe_cannot_run(family, tmp_path):
    assert_import_refusals(family["export"], IMPORT_REFUSED[family["name"]], tmp_path)


def test_import_reads_transformers_5_key_names(family, tmp_path):
    """transformers 5 writes rope_parameters for rope_theta, and Qwen3-MoE's expert count
    as num_local_experts."""
    out = tmp_path / "hf"
    shutil.copytree(family["export"], out)
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    config["num_local_experts"] = config.pop("num_experts")
    config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
    (out / "config.json").write_text(json.dumps(config))
    run_moe(["import", out, tmp_path / "x.h5"])
    assert_bit_identical(family["ckpt"], tmp_path / "x.h5")


def test_import_refuses_another_familys_tensor_names(family, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(family["export"], out)
    weights = load_file(str(out / "model.safetensors"))
    layer = 1 if family["name"] == "qwen3_moe" else 0   # its layer 0 is dense
    name = f"model.layers.{layer}.mlp.gate.weight"
    mixtral = f"model.layers.{layer}.block_sparse_moe.gate.weight"   # Mixtral's name
    weights[mixtral] = weights.pop(name)
    save_file(weights, str(out / "model.safetensors"))
    err = one_line_error(run_moe(["import", out, tmp_path / "x.h5"], check=False))
    assert f"unexpected tensor {mixtral}" in err, err
