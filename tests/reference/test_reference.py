"""moe.c against the independent PyTorch reference (torch_moe.py), one test per router and
model variant.

Each test runs `./moe dump <tmp>/case.h5 <overrides>` from the repo root, recomputes
everything in float64 with torch, and asserts: top-k selections and capacity keeps equal,
and every relative error (loss, ce, aux losses, logits, every gradient) <= 1e-4.

Run: /usr/bin/python3 -m pytest tests/reference   (from the repo root; MOE_BIN=path to test
another build of the binary)
"""
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_moe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# MOE_BIN overrides the binary (e.g. a build elsewhere); it still runs from the repo root.
MOE = os.path.abspath(os.environ.get("MOE_BIN", os.path.join(ROOT, "moe")))
TOL = torch_moe.TOLERANCE

# Tiny model; every router key set explicitly so a case does not depend on the defaults.
# The aux coefficients are large so that a wrong aux-loss gradient shows in the router
# gradients, not only in the logged values.
BASE = [
    "model.layers=2", "model.d_model=16", "model.heads=4", "model.kv_heads=2",
    "model.vocab=32", "model.seq_len=8", "model.experts=4", "model.expert_ffn_dim=12",
    "model.ffn_dim=20", "model.moe_every=1", "model.shared_experts=0",
    "model.tie_embeddings=false", "model.init_std=0.1", "train.batch_size=3",
    "router.top_k=2", "router.score=softmax", "router.renorm=true", "router.noise=none",
    "router.capacity_factor=0", "router.drop_policy=position",
    "router.aux_coef=1.0", "router.z_coef=1.0", "router.noise_coef=1.0",
]

CASES = {
    "softmax_top1": ["router.top_k=1", "router.renorm=false"],
    "softmax_top2": ["router.top_k=2", "router.renorm=true"],
    "sigmoid_top2": ["router.score=sigmoid", "router.top_k=2"],
    "shazeer_top2": ["router.noise=shazeer", "router.top_k=2"],
    "jitter": ["router.noise=jitter"],
    "capacity_position": ["router.capacity_factor=1.0", "router.drop_policy=position"],
    "capacity_probs": ["router.capacity_factor=1.0", "router.drop_policy=probs"],
    "dropless": ["router.capacity_factor=0"],
    "shared_experts": ["model.shared_experts=2", "model.shared_ffn_dim=8"],
    # Hugging Face families: QK-norm per head (Qwen3-MoE) and over the whole projections
    # (OLMoE, not renormalised), q/k/v biases with a sigmoid-gated shared expert (Qwen2-MoE)
    "qk_norm_head": ["model.qk_norm=head"],
    "qk_norm_full": ["model.qk_norm=full", "router.renorm=false"],
    "qkv_bias_gated_shared": ["model.qkv_bias=true", "model.shared_experts=1",
                              "model.shared_ffn_dim=8", "model.shared_gate=true",
                              "model.layers=3", "model.moe_every=2"],
    "dense_interleaved": ["model.layers=3", "model.moe_every=2"],
    "tied_embeddings": ["model.tie_embeddings=true"],
    "mha_no_gqa": ["model.kv_heads=4"],
    # hash routing (Roller et al. 2021): no router weights, no lb / z, gates 1/k
    "hash_top2": ["router.select=hash"],
    "hash_top1": ["router.select=hash", "router.top_k=1", "router.renorm=false"],
    "hash_capacity_position": ["router.select=hash", "router.capacity_factor=1.0",
                               "router.drop_policy=position"],
    "hash_capacity_probs": ["router.select=hash", "router.capacity_factor=1.0",
                            "router.drop_policy=probs"],
    "hash_interleaved_shared": ["router.select=hash", "model.layers=3", "model.moe_every=2",
                                "model.shared_experts=1", "model.shared_ffn_dim=8"],
    # expert choice (Zhou et al. 2022): C = min(N, ceil(N*cf/E)), cf = top_k when <= 0
    "ec_cf1_softmax": ["router.select=expert_choice", "router.capacity_factor=1.0"],
    "ec_cf1_sigmoid": ["router.select=expert_choice", "router.capacity_factor=1.0",
                       "router.score=sigmoid"],
    "ec_default_cf": ["router.select=expert_choice", "router.capacity_factor=0"],
    "ec_jitter": ["router.select=expert_choice", "router.capacity_factor=1.0",
                  "router.noise=jitter"],
    "ec_all_tokens": ["router.select=expert_choice", "router.capacity_factor=10"],
    # DeepSeek-V2 multi-head latent attention: 3 heads that do not divide d_model, q/k heads
    # 4 + 4 wide, values 6; then the compressed query path with YaRN (theta 10 and an
    # original context of 16 put the ramp between the two rope pairs; mscale_all_dim != 0
    # changes the softmax scale and the cos/sin factor)
    "mla": ["model.attention=mla", "model.heads=3", "model.kv_lora_rank=6",
            "model.qk_nope_dim=4", "model.qk_rope_dim=4", "model.v_head_dim=6"],
    "mla_q_lora_yarn": ["model.attention=mla", "model.heads=3", "model.q_lora_rank=10",
                        "model.kv_lora_rank=6", "model.qk_nope_dim=4", "model.qk_rope_dim=4",
                        "model.v_head_dim=6", "model.rope_scaling=yarn", "model.rope_theta=10",
                        "model.rope_factor=8", "model.rope_orig_max_pos=16",
                        "model.rope_mscale=0.707", "model.rope_mscale_all_dim=1.0",
                        "model.shared_experts=1", "model.shared_ffn_dim=8"],
    # Head widths past one vector (40: a vector and a part on AVX-512, 32 + 8 and 40 under
    # MLA) and 70 positions (a second block of queries, 6 rows short of a tile): the CPU
    # attention tiles' edges
    "attention_wide_heads": ["model.d_model=80", "model.heads=2", "model.kv_heads=1",
                             "model.seq_len=70"],
    "mla_wide_heads": ["model.attention=mla", "model.heads=2", "model.kv_lora_rank=16",
                       "model.qk_nope_dim=24", "model.qk_rope_dim=8", "model.v_head_dim=40",
                       "model.seq_len=70"],
    # DeepSeek-V3 expert bias: top-k on s + b, gates from s
    "bias_sigmoid_top2": ["router.bias_gamma=0.001", "router.score=sigmoid"],
    "bias_softmax_top2": ["router.bias_gamma=0.001", "router.score=softmax"],
    "bias_softmax_top1_norenorm": ["router.bias_gamma=0.001", "router.top_k=1",
                                   "router.renorm=false"],
    "bias_sigmoid_capacity_probs": ["router.bias_gamma=0.001", "router.score=sigmoid",
                                    "router.capacity_factor=1.0", "router.drop_policy=probs"],
    # DeepSeek routing: V2's group_limited_greedy (group score = its best softmax score,
    # gates not renormalised, times routed_scaling_factor) after a leading dense layer,
    # V3's noaux_tc (sigmoid, a frozen e_score_correction_bias in selection, group score =
    # sum of its two best biased scores, renormalised gates times routed_scaling_factor)
    "ds_v2_group_limited": ["model.experts=8", "router.top_k=3", "router.groups=4",
                            "router.topk_groups=2", "router.group_score=max",
                            "router.renorm=false", "router.gate_scale=2.0", "model.layers=3",
                            "model.first_dense_layers=1", "model.shared_experts=1",
                            "model.shared_ffn_dim=8"],
    "ds_v3_noaux_tc": ["model.experts=8", "router.top_k=3", "router.score=sigmoid",
                       "router.expert_bias=true", "router.groups=4", "router.topk_groups=2",
                       "router.group_score=top2", "router.renorm=true", "router.gate_scale=2.5",
                       "model.layers=3", "model.first_dense_layers=1"],
    "ds_top2_bias_gamma_capacity": ["model.experts=8", "router.groups=4", "router.topk_groups=1",
                                    "router.group_score=top2", "router.bias_gamma=0.001",
                                    "router.capacity_factor=1.0", "router.drop_policy=probs"],
    # per-sequence load balancing
    "lb_seq_top2": ["router.lb_type=seq"],
    "lb_seq_sigmoid_top1": ["router.lb_type=seq", "router.score=sigmoid", "router.top_k=1",
                            "router.renorm=false"],
    "lb_seq_capacity": ["router.lb_type=seq", "router.capacity_factor=1.0"],
    "lb_seq_shazeer": ["router.lb_type=seq", "router.noise=shazeer"],
}

# Cases that prove nothing unless capacity drops something: try these seeds in turn.
DROP_CASES = {"capacity_position", "capacity_probs", "hash_capacity_position",
              "hash_capacity_probs", "bias_sigmoid_capacity_probs", "lb_seq_capacity",
              "ds_top2_bias_gamma_capacity"}
SEEDS = [None, 1, 2, 3, 4, 5, 6, 7]


def run_dump(path, overrides):
    if not os.path.isfile(MOE) or not os.access(MOE, os.X_OK):
        pytest.fail(f"{MOE} is missing: build it first (`make` in {ROOT}); the reference "
                    "comparison needs `./moe dump`", pytrace=False)
    cmd = [MOE, "dump", str(path)] + list(overrides)
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(cmd)}` took over 120 s", pytrace=False)
    if run.returncode != 0 or not os.path.isfile(path):
        pytest.fail(f"`{' '.join(cmd)}` failed (exit {run.returncode}):\n"
                    f"{run.stdout}\n{run.stderr}", pytrace=False)


def position_keep_differs(cmp):
    """True when 'position' would keep a different set than the reference's 'probs' keep,
    i.e. the probs policy is actually exercised."""
    out, _ = cmp.ref
    n = out["logits"].shape[0]
    cap = torch_moe.capacity(cmp.cfg, n)
    for r in out["routers"]:
        alt = torch_moe.capacity_keep(r["topk"], r["gates"], cmp.cfg.experts, cap, "position")
        if not bool((alt == r["keep"]).all()):
            return True
    return False


def bias_changes_selection(cmp):
    """True when the expert bias changes some token's selected set (else the bias case
    would pass with the bias ignored)."""
    k = cmp.cfg.top_k
    out, _ = cmp.ref
    for r in out["routers"]:
        biased = r["topk"].sort(dim=1).values
        plain = r["order_unbiased"][:, :k].sort(dim=1).values
        if not bool((biased == plain).all()):
            return True
    return False


def groups_change_selection(cmp):
    """True when limiting the selection to the best groups changes some token's selected
    set (else a group case would pass with the groups ignored)."""
    k = cmp.cfg.top_k
    out, _ = cmp.ref
    for r in out["routers"]:
        grouped = r["topk"].sort(dim=1).values
        plain = r["order_ungrouped"][:, :k].sort(dim=1).values
        if not bool((grouped == plain).all()):
            return True
    return False


def seq_lb_differs(cmp):
    """True when the per-sequence lb differs from the batch-wide one in some layer."""
    out, _ = cmp.ref
    for r in out["routers"]:
        batch = torch_moe.load_balance(r["probs"], r["topk"], cmp.cfg.experts, cmp.cfg.top_k)
        if abs(float(batch) - float(r["lb"])) > 1e-3 * abs(float(batch)):
            return True
    return False


def ec_tokens_per_token(cmp):
    """Experts per token under expert choice, over every MoE layer (a flat list)."""
    out, _ = cmp.ref
    return [int(v) for r in out["routers"] for v in r["keep"].sum(dim=1)]


def not_exercised(case, cmp):
    """Why this dump does not exercise what the case is for (None when it does)."""
    why = []
    if case in DROP_CASES and cmp.dropped == 0:
        why.append("no assignment dropped")
    if case == "capacity_probs" and not position_keep_differs(cmp):
        why.append("probs keeps the same as position")
    if case.startswith("bias_") and not bias_changes_selection(cmp):
        why.append("the expert bias changes no selection")
    if case.startswith("ds_") and not groups_change_selection(cmp):
        why.append("the expert groups change no selection")
    if case.startswith("lb_seq") and not seq_lb_differs(cmp):
        why.append("per-sequence lb equals the batch lb")
    if case.startswith("ec_cf1") or case == "ec_jitter":
        per = ec_tokens_per_token(cmp)
        if min(per) != 0 or max(per) < 2:
            why.append(f"experts per token range {min(per)}..{max(per)}, want 0 and >= 2")
    return "; ".join(why) or None


def check_case_invariants(case, cmp, path):
    """Properties of the new router variants that hold whatever the numbers."""
    cfg = cmp.cfg
    out, _ = cmp.ref
    dump = torch_moe.Dump(str(path))
    n = out["logits"].shape[0]
    if cfg.select == "hash":
        assert "lb" not in dump.out and "z" not in dump.out, "hash: /out/lb or /out/z present"
        assert not any(p.endswith("block_sparse_moe.gate.weight") for p in dump.params)
        # total loss is just the cross-entropy
        assert float(dump.out["loss"]) == pytest.approx(float(dump.out["ce"]), rel=1e-6)
        if cfg.drop_policy == "probs":
            # gates all tie at 1/k, so probs must keep exactly what position keeps
            cap = torch_moe.capacity(cfg, n)
            for r in out["routers"]:
                alt = torch_moe.capacity_keep(r["topk"], r["gates"], cfg.experts, cap,
                                              "position")
                assert bool((alt == r["keep"]).all())
    if cfg.select == "expert_choice":
        assert "lb" not in dump.out, "expert choice: /out/lb present"
        assert "z" in dump.out, "expert choice: /out/z missing"
        cap = torch_moe.expert_choice_capacity(cfg, n)
        for r in out["routers"]:
            # every expert takes exactly C tokens
            assert r["keep"].sum(dim=0).tolist() == [cap] * cfg.experts
        if case.startswith("ec_cf1") or case == "ec_jitter":
            per = ec_tokens_per_token(cmp)
            assert min(per) == 0 and max(per) >= 2, per
        if case == "ec_all_tokens":
            assert cap == n
    if cfg.uses_bias:
        assert all(f"layers.{i}.expert_bias" in dump.state for i in cfg.moe_layers())
        assert bias_changes_selection(cmp)
    if cfg.group_limited:
        G, TG, per = cfg.groups, cfg.topk_groups, cfg.experts // cfg.groups
        for r in out["routers"]:
            # every token's experts lie in at most topk_groups groups
            assert max(len(set((row // per).tolist())) for row in r["topk"]) <= TG < G
    if cfg.first_dense_layers:
        assert min(cfg.moe_layers()) == cfg.first_dense_layers
        assert "model.layers.0.mlp.gate_proj.weight" in dump.params


@pytest.mark.parametrize("case", list(CASES))
def test_reference(case, tmp_path, reference_summary, record_property):
    overrides = BASE + CASES[case]
    cmp = None
    path = None
    tried = []
    for seed in SEEDS:
        ov = overrides + ([f"train.seed={seed}"] if seed is not None else [])
        path = tmp_path / f"case{'' if seed is None else seed}.h5"
        run_dump(path, ov)
        cmp = torch_moe.compare(str(path))
        why = not_exercised(case, cmp)
        if why is None:
            break
        tried.append(f"seed {seed or 'default'}: {why}")
    else:
        pytest.fail(f"{case}: no seed exercised the case, so it proves nothing: "
                    f"{'; '.join(tried)}", pytrace=False)

    worst_name, worst_err = cmp.worst()
    record_property("worst_quantity", worst_name)
    record_property("worst_rel_err", worst_err)
    reference_summary(case, cmp)
    print(cmp.table(all_rows=False))

    failures = cmp.failures(TOL)
    assert not failures, (
        f"{case}: worst {worst_name} = {worst_err:.3e} (tolerance {TOL:g})\n  "
        + "\n  ".join(failures) + "\n" + cmp.table(all_rows=False))
    if case in DROP_CASES:
        assert cmp.dropped > 0
    check_case_invariants(case, cmp, path)


def test_splitmix64_finalizer_vectors():
    """The reference's hash against SplitMix64's published outputs for seed 0 (the
    finalizer of state + golden gamma, i.e. of i * gamma for the i-th output)."""
    gamma = 0x9E3779B97F4A7C15
    want = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    got = [torch_moe.splitmix64_finalizer((i * gamma) & ((1 << 64) - 1)) for i in range(3)]
    assert got == want
    # token ids are taken as uint32: the choices are (h + j) % E
    idx = torch_moe.hash_choices(torch.tensor([0, 5]), 4, 3)
    for row, t in zip(idx.tolist(), (0, 5)):
        h = torch_moe.splitmix64_finalizer(t) % 4
        assert row == [h % 4, (h + 1) % 4, (h + 2) % 4]
