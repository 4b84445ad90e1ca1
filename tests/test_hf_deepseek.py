"""`moe export` / `moe import` for DeepSeek-V2 and DeepSeek-V3 (multi-head latent attention).

model.attention = mla picks DeepSeek; router.score = sigmoid (noaux_tc) makes it V3, else
V2. For each: config.json carries DeepSeek's keys, the tensors are the names transformers'
DeepseekV2/V3ForCausalLM load, the RoPE rows of q_proj / q_b_proj and kv_a_proj_with_mqa
are in DeepSeek's interleaved order (checked here against the checkpoint's rotate-half
order row by row), V3's expert bias is mlp.gate.e_score_correction_bias; export -> import
is bit-identical (the expert bias included) and exports the same bytes again. Configs
moe.c cannot run are refused naming the key, on import and on export. The logits against
an independent NumPy reference: tests/reference/test_families_numpy.py."""
import json
import shutil

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from test_hf import (assert_bit_identical, assert_import_refusals, family_export, one_line_error,
                     run_moe, train)

MLA = ["model.attention=mla", "model.kv_lora_rank=16", "model.qk_nope_dim=8",
       "model.qk_rope_dim=4", "model.v_head_dim=8", "model.norm_eps=1e-6", "model.layers=3",
       "model.first_dense_layers=1", "model.ffn_dim=40", "model.experts=8",
       "model.expert_ffn_dim=12", "model.shared_experts=1", "model.shared_ffn_dim=24",
       "router.groups=4", "router.topk_groups=2", "router.gate_scale=2"]
FAMILIES = {
    # No compressed query, group-limited greedy over softmax scores, YaRN.
    "deepseek_v2": MLA + ["model.q_lora_rank=0", "router.renorm=false",
                          "router.group_score=max", "model.rope_scaling=yarn",
                          "model.rope_factor=4", "model.rope_orig_max_pos=8",
                          "model.rope_mscale=0.707", "model.rope_mscale_all_dim=0.707"],
    # A compressed query, noaux_tc with a bias that balancing has moved off zero.
    "deepseek_v3": MLA + ["model.q_lora_rank=12", "router.score=sigmoid",
                          "router.group_score=top2", "router.expert_bias=true",
                          "router.bias_gamma=0.01", "router.renorm=true"],
}
CLASSES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    return family_export(tmp, request.param, FAMILIES[request.param])


def expected_names(c):
    """The tensor names transformers' DeepseekV2/V3ForCausalLM has for config c."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    mlp = ["gate_proj", "up_proj", "down_proj"]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        a = p + "self_attn."
        names += [a + n + ".weight" for n in ("kv_a_proj_with_mqa", "kv_a_layernorm",
                                              "kv_b_proj", "o_proj")]
        names += [a + n + ".weight" for n in ("q_a_proj", "q_a_layernorm", "q_b_proj")] \
            if c["q_lora_rank"] else [a + "q_proj.weight"]
        if i < c["first_k_dense_replace"]:
            names += [f"{p}mlp.{w}.weight" for w in mlp]
            continue
        names += [p + "mlp.gate.weight"]
        if c["model_type"] == "deepseek_v3":
            names += [p + "mlp.gate.e_score_correction_bias"]
        names += [f"{p}mlp.experts.{e}.{w}.weight" for e in range(c["n_routed_experts"])
                  for w in mlp]
        names += [f"{p}mlp.shared_experts.{w}.weight" for w in mlp]
    return sorted(names)


def test_config_and_tensor_names_are_the_familys(family):
    c = json.loads((family["export"] / "config.json").read_text())
    v3 = family["name"] == "deepseek_v3"
    assert c["model_type"] == family["name"] and c["architectures"] == [CLASSES[family["name"]]]
    assert (c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]) \
        == (16, 8, 4, 8)
    assert c["q_lora_rank"] == (12 if v3 else None)
    assert (c["n_routed_experts"], c["moe_intermediate_size"], c["n_shared_experts"]) == (8, 12, 2)
    assert (c["first_k_dense_replace"], c["intermediate_size"], c["moe_layer_freq"]) == (1, 40, 1)
    assert (c["n_group"], c["topk_group"], c["routed_scaling_factor"]) == (4, 2, 2.0)
    assert c["topk_method"] == ("noaux_tc" if v3 else "group_limited_greedy")
    assert c["scoring_func"] == ("sigmoid" if v3 else "softmax")
    assert c["norm_topk_prob"] is v3
    if v3:
        assert c["rope_interleave"] is True and c["rope_scaling"] is None
    else:
        assert c["rope_scaling"] == {"type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 8, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    weights = load_file(str(family["export"] / "model.safetensors"))
    assert sorted(weights) == expected_names(c)
    if v3:
        assert weights["model.layers.1.mlp.gate.e_score_correction_bias"].shape == (8,)


def test_rope_rows_are_deepseeks_interleaved_pairs(family):
    """File row nope + 2i is moe.c's rope row i and nope + 2i + 1 its row r/2 + i, per
    head; the shared key's rows after the latent likewise; every other row as it is."""
    weights = load_file(str(family["export"] / "model.safetensors"))
    q = "q_b_proj" if family["name"] == "deepseek_v3" else "q_proj"
    with h5py.File(family["ckpt"], "r") as f:
        ours_q = f[f"model/layers/0/self_attn/{q}"][()]
        ours_kv = f["model/layers/0/self_attn/kv_a_proj_with_mqa"][()]
    theirs_q = weights[f"model.layers.0.self_attn.{q}.weight"]
    theirs_kv = weights["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    order = [0, 2, 1, 3]   # file row j holds moe.c's rope row order[j] (r = 4)
    for h in range(4):     # heads of 8 nope + 4 rope rows
        rows = slice(12 * h, 12 * h + 8)
        assert np.array_equal(theirs_q[rows], ours_q[rows])
        assert np.array_equal(theirs_q[12 * h + 8:12 * h + 12], ours_q[12 * h + 8 + np.array(order)])
    assert np.array_equal(theirs_kv[:16], ours_kv[:16])
    assert np.array_equal(theirs_kv[16:], ours_kv[16 + np.array(order)])
    assert not np.array_equal(theirs_kv[16:], ours_kv[16:])


def test_export_import_is_bit_identical(family, tmp_path):
    out = tmp_path / "imported.h5"
    run_moe(["import", family["export"], out])
    assert_bit_identical(family["ckpt"], out)
    if family["name"] == "deepseek_v3":   # the bias moved, and came back
        with h5py.File(out, "r") as f:
            assert np.abs(f["model/layers/1/router/expert_bias"][()]).max() > 0
    run_moe(["export", out, tmp_path / "again"])
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (family["export"] / name).read_bytes()


IMPORT_REFUSED = {
    "deepseek_v2": [
        (lambda c: c.update(attention_bias=True), "attention_bias is true"),
        (lambda c: c.update(moe_layer_freq=2), "moe_layer_freq is not 1"),
        (lambda c: c.update(topk_method="noaux_tc"), "topk_method = noaux_tc"),
        (lambda c: c.update(norm_topk_prob=True), "norm_topk_prob is true"),
        (lambda c: c.update(scoring_func="sigmoid"), "scoring_func = sigmoid"),
        (lambda c: c.update(rms_norm_eps=1e-5), "rms_norm_eps = 1e-05"),
        (lambda c: c["rope_scaling"].update(type="linear"), "rope_scaling type linear"),
        (lambda c: c["rope_scaling"].pop("mscale"), "rope_scaling.mscale_all_dim = 0.707"),
        (lambda c: c["rope_scaling"].update(attention_factor=1.5),
         "rope_scaling.attention_factor is set"),
        (lambda c: c.pop("kv_lora_rank"), "no kv_lora_rank"),
    ],
    "deepseek_v3": [
        (lambda c: c.update(topk_method="greedy"), "topk_method = greedy"),
        (lambda c: c.update(scoring_func="softmax"), "scoring_func = softmax"),
        (lambda c: c.update(mlp_bias=True), "mlp_bias is true"),
        (lambda c: c.update(n_group=3), "router.groups = 3 must divide model.experts = 8"),
    ],
}


def test_import_refuses_what_moe_cannot_run(family, tmp_path):
    assert_import_refusals(family["export"], IMPORT_REFUSED[family["name"]], tmp_path)


def test_import_reads_transformers_5_rope_parameters(family, tmp_path):
    """transformers 5 writes rope_parameters (rope_type, rope_theta, YaRN's keys)."""
    out = tmp_path / "hf"
    shutil.copytree(family["export"], out)
    config = json.loads((out / "config.json").read_text())
    scaling = config.pop("rope_scaling") or {"type": "default"}
    scaling["rope_type"] = scaling.pop("type")
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), **scaling}
    config["head_dim"] = config["qk_rope_head_dim"]
    (out / "config.json").write_text(json.dumps(config))
    run_moe(["import", out, tmp_path / "x.h5"])
    assert_bit_identical(family["ckpt"], tmp_path / "x.h5")


@pytest.mark.parametrize("family", ["deepseek_v3"], indirect=True)
def test_import_leaves_out_multi_token_prediction_modules(family, tmp_path):
    """DeepSeek-V3's files may hold num_nextn_predict_layers MTP modules as the layers after
    the last; transformers leaves them out, and so does moe import (saying so), but a
    tensor past them is still unexpected."""
    out = tmp_path / "hf"
    shutil.copytree(family["export"], out)
    config = json.loads((out / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.3.eh_proj.weight"] = np.ones((32, 64), np.float32)
    save_file(weights, str(out / "model.safetensors"))
    run = run_moe(["import", out, tmp_path / "x.h5"])
    assert "1 tensors of num_nextn_predict_layers = 1" in run.stderr, run.stderr
    assert_bit_identical(family["ckpt"], tmp_path / "x.h5")
    weights["model.layers.4.eh_proj.weight"] = weights.pop("model.layers.3.eh_proj.weight")
    save_file(weights, str(out / "model.safetensors"))
    err = one_line_error(run_moe(["import", out, tmp_path / "y.h5"], check=False))
    assert "unexpected tensor model.layers.4.eh_proj.weight" in err, err


EXPORT_REFUSED = [
    (MLA + ["router.renorm=true"], "router.renorm = true: transformers' DeepseekV2"),
    (MLA + ["router.renorm=false", "router.group_score=top2"], "router.group_score = top2"),
    (MLA + ["router.renorm=false", "model.norm_eps=1e-5"], "model.norm_eps = 1e-05"),
    (MLA + ["router.score=sigmoid", "router.group_score=max"], "router.group_score = max"),
    (MLA + ["router.renorm=false", "model.shared_experts=2"], "model.shared_experts = 2"),
]


@pytest.mark.parametrize("case", range(len(EXPORT_REFUSED)))
def test_export_refuses_what_the_family_cannot_express(tmp_path, case):
    extra, message = EXPORT_REFUSED[case]
    ckpt = train(tmp_path, "run", extra, steps=1)
    err = one_line_error(run_moe(["export", ckpt, tmp_path / "hf"], check=False))
    assert message in err and str(ckpt) in err, err
