"""`moe export` of OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3 against the
independent NumPy models of families_numpy.py: a model trained here with the family's
features (so that QK-norm weights, biases, the shared expert's gate, MLA's latent norms and
DeepSeek-V3's expert bias are no longer at their initial values),
exported, and run by the reference on the batch `moe eval --dump-logits` wrote, gives the
same logits within 1e-5 of the largest logit. transformers' own classes:
families_transformers.py (by hand)."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from families_numpy import compare  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE = os.environ.get("MOE_BIN", os.path.join(ROOT, "moe"))
TOLERANCE = 1e-5

CASES = {
    # The OLMoE shape scaled down: many experts, top-8, no renormalisation.
    "olmoe": ["model.qk_norm=full", "router.renorm=false", "model.experts=16",
              "router.top_k=8", "model.expert_ffn_dim=16", "model.rope_theta=500"],
    # QK-norm per head, renormalised top-2, a dense layer (decoder_sparse_step = 2), GQA.
    "qwen3_moe": ["model.qk_norm=head", "model.layers=3", "model.moe_every=2",
                  "model.ffn_dim=40", "model.heads=4", "model.kv_heads=2"],
    # Fine-grained experts, q/k/v biases, a sigmoid-gated shared expert, tied embeddings.
    "qwen2_moe": ["model.qkv_bias=true", "model.shared_experts=1", "model.shared_gate=true",
                  "model.shared_ffn_dim=48", "model.experts=8", "model.expert_ffn_dim=12",
                  "router.top_k=4", "router.renorm=false", "model.tie_embeddings=true"],
    # MLA without a compressed query, YaRN (a ramp that mixes both frequency kinds),
    # a dense first layer, group-limited greedy routing, a scaling factor, shared experts.
    "deepseek_v2": ["model.attention=mla", "model.heads=4", "model.q_lora_rank=0",
                    "model.kv_lora_rank=16", "model.qk_nope_dim=8", "model.qk_rope_dim=8",
                    "model.v_head_dim=12", "model.norm_eps=1e-6", "model.rope_theta=500",
                    "model.rope_scaling=yarn", "model.rope_factor=16",
                    "model.rope_orig_max_pos=16", "model.rope_beta_fast=0.5",
                    "model.rope_beta_slow=0.05", "model.rope_mscale=0.707",
                    "model.rope_mscale_all_dim=0.5", "model.layers=3",
                    "model.first_dense_layers=1", "model.ffn_dim=40", "model.experts=8",
                    "model.expert_ffn_dim=12", "model.shared_experts=1",
                    "model.shared_ffn_dim=24", "router.top_k=3", "router.renorm=false",
                    "router.groups=4", "router.topk_groups=2", "router.group_score=max",
                    "router.gate_scale=1.5"],
    # MLA with a compressed query, noaux_tc: sigmoid scores, groups by their top two,
    # a trained expert bias (bias balancing on), renormalised gates times 2.5.
    "deepseek_v3": ["model.attention=mla", "model.heads=4", "model.q_lora_rank=12",
                    "model.kv_lora_rank=16", "model.qk_nope_dim=8", "model.qk_rope_dim=4",
                    "model.v_head_dim=8", "model.norm_eps=1e-6", "model.rope_theta=500",
                    "model.layers=3", "model.first_dense_layers=1", "model.ffn_dim=40",
                    "model.experts=8", "model.expert_ffn_dim=12", "model.shared_experts=1",
                    "model.shared_ffn_dim=12", "router.top_k=2", "router.score=sigmoid",
                    "router.expert_bias=true", "router.bias_gamma=0.01", "router.renorm=true",
                    "router.groups=4", "router.topk_groups=2", "router.group_score=top2",
                    "router.gate_scale=2.5"],
}


def text(n):
    words = ("routing sends each token to the experts whose gate scores it highest while "
             "the residual stream carries what the experts add").split()
    return " ".join(words[(i * 5 + i // 7) % len(words)] for i in range(n // 6))


def run_moe(args):
    run = subprocess.run([MOE] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_family_matches_moe_eval(tmp_path, case, reference_line):
    data = tmp_path / "text.txt"
    data.write_text(text(20000))
    cfg = tmp_path / "run.ini"
    cfg.write_text(f"[domain text]\nkind = text\ntrain = {data}\nval = {data}\n")
    run_moe(["train", cfg, "model.layers=2", "model.d_model=32", "model.seq_len=32",
             "model.experts=4", "model.expert_ffn_dim=48", "model.tie_embeddings=false",
             "router.top_k=2", "train.steps=30", "optim.lr=3e-3", "train.batch_size=8",
             "train.threads=1", "train.sample_tokens=0", "train.eval_every=0",
             "data.val_tokens=4096", f"train.out_dir={tmp_path}", "train.name=run"]
            + CASES[case])
    run_moe(["export", tmp_path / "run", tmp_path / "hf"])
    assert f'"model_type":\t"{case}"' in (tmp_path / "hf" / "config.json").read_text()
    run_moe(["eval", tmp_path / "run", data, "train.threads=1", "--dump-logits",
             tmp_path / "logits.h5"])
    err = compare(tmp_path / "hf", tmp_path / "logits.h5")
    reference_line(f"{case + ' (numpy)':<28} max |logit diff| / max |logit| = {err:.2e} "
                   "(numpy float64 vs moe eval float32)")
    assert err <= TOLERANCE, f"{case}: {err:.3e}"
