#!/usr/bin/python3
"""Independent NumPy implementations of OLMoE, Qwen2-MoE and Qwen3-MoE, to check
`moe export` of those families.

Each reads a Hugging Face model directory (mixtral_numpy.read_model_dir: its own
safetensors reader) and computes the causal LM's logits in float64. Written from the
transformers model documentation and the equations of its OlmoeForCausalLM,
Qwen2MoeForCausalLM and Qwen3MoeForCausalLM (no cache, no padding), never from moe.c's
sources. What they share with Mixtral (mixtral_numpy.py): the decoder
h += o_proj(attention(input_layernorm(h))); h += mlp(post_attention_layernorm(h)),
RMSNorm, rotate-half RoPE, grouped-query causal attention, SwiGLU experts. What differs:

    OLMoE (model_type olmoe):
        q = q_norm(q_proj(x)), k = k_norm(k_proj(x)): RMSNorm over the whole projection
        (weights of num_heads*head_dim and num_key_value_heads*head_dim), before the
        split into heads and RoPE.
        mlp: p = softmax(gate(x)) over all num_experts; the num_experts_per_tok largest p,
        divided by their sum only when norm_topk_prob; experts
        down_proj(silu(gate_proj(x)) * up_proj(x)) under mlp.experts.<e>.
    Qwen3-MoE (qwen3_moe):
        q and k split into heads of head_dim first, then q_norm / k_norm: RMSNorm over each
        head (weights of head_dim), then RoPE.
        mlp as OLMoE's (norm_topk_prob). Layer i is sparse when i is not in
        mlp_only_layers and (i + 1) % decoder_sparse_step == 0; otherwise a dense SwiGLU
        mlp.{gate,up,down}_proj of intermediate_size.
    Qwen2-MoE (qwen2_moe):
        q, k and v projections with biases (y = x W^T + b); no QK-norm.
        mlp: OLMoE's routed experts (moe_intermediate_size) plus
        sigmoid(shared_expert_gate(x)) * shared_expert(x), shared_expert a SwiGLU of
        shared_expert_intermediate_size and shared_expert_gate a linear map to one value.
        Sparse and dense layers as in Qwen3-MoE.

Usage:
    /usr/bin/python3 tests/reference/families_numpy.py HF_DIR LOGITS.h5
compares with LOGITS.h5 (from `moe eval CKPT DATA --dump-logits LOGITS.h5`) and prints the
largest |difference| relative to the largest |logit|.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixtral_numpy import Mixtral, read_model_dir  # noqa: E402


def silu(a):
    return a / (1.0 + np.exp(-a))


class Family(Mixtral):
    model_type = None

    def __init__(self, config, weights):
        assert config["model_type"] == self.model_type, config["model_type"]
        self.c = config
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        self.heads = config["num_attention_heads"]
        self.kv_heads = config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.heads
        self.eps = config["rms_norm_eps"]

    def norm_weight(self, x, name):
        """RMSNorm over the last axis with weight `name`."""
        return self.w[name] * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps))

    def project(self, x, i, which):
        """The q, k or v projection of x (B, T, C), before any split into heads."""
        return self.linear(x, f"model.layers.{i}.self_attn.{which}_proj.weight")

    def split(self, y, n):
        B, T, _ = y.shape
        return y.reshape(B, T, n, self.head_dim)   # (B, T, heads, D)

    def qk(self, x, i):
        """Query and key heads (B, T, heads, D) before RoPE."""
        return self.split(self.project(x, i, "q"), self.heads), \
            self.split(self.project(x, i, "k"), self.kv_heads)

    def attention(self, x, i):
        B, T, _ = x.shape
        q, k = self.qk(x, i)
        v = self.split(self.project(x, i, "v"), self.kv_heads)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))   # (B, heads, T, D)
        q, k = self.rope(q), self.rope(k)
        group = self.heads // self.kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(self.head_dim)
        scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, self.heads * self.head_dim)
        return self.linear(out, f"model.layers.{i}.self_attn.o_proj.weight")

    def swiglu(self, x, prefix):
        return self.linear(silu(self.linear(x, prefix + "gate_proj.weight")) *
                           self.linear(x, prefix + "up_proj.weight"), prefix + "down_proj.weight")

    def routed(self, x, i):
        """x (N, C): softmax over all experts, top-k, renormalised only by norm_topk_prob."""
        p = f"model.layers.{i}.mlp."
        logits = self.linear(x, p + "gate.weight")
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :self.c["num_experts_per_tok"]]
        weight = np.take_along_axis(probs, chosen, axis=-1)
        if self.c.get("norm_topk_prob", False):
            weight /= weight.sum(axis=-1, keepdims=True)
        out = np.zeros_like(x)
        for e in range(self.c["num_experts"]):
            rows, slot = np.nonzero(chosen == e)
            if len(rows):
                out[rows] += weight[rows, slot][:, None] * self.swiglu(x[rows], f"{p}experts.{e}.")
        return out

    def sparse(self, i):
        step = self.c.get("decoder_sparse_step", 1)
        return i not in (self.c.get("mlp_only_layers") or []) and (i + 1) % step == 0

    def mlp(self, x, i):
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        out = self.routed(flat, i) if self.sparse(i) else self.swiglu(flat, f"model.layers.{i}.mlp.")
        return out.reshape(B, T, C)

    def moe(self, x, i):
        return self.mlp(x, i)


class Olmoe(Family):
    model_type = "olmoe"

    def qk(self, x, i):
        p = f"model.layers.{i}.self_attn."
        q = self.norm_weight(self.project(x, i, "q"), p + "q_norm.weight")
        k = self.norm_weight(self.project(x, i, "k"), p + "k_norm.weight")
        return self.split(q, self.heads), self.split(k, self.kv_heads)

    def sparse(self, i):
        return True


class Qwen3Moe(Family):
    model_type = "qwen3_moe"

    def qk(self, x, i):
        p = f"model.layers.{i}.self_attn."
        q, k = Family.qk(self, x, i)
        return self.norm_weight(q, p + "q_norm.weight"), self.norm_weight(k, p + "k_norm.weight")


class Qwen2Moe(Family):
    model_type = "qwen2_moe"

    def project(self, x, i, which):
        return Family.project(self, x, i, which) + \
            self.w[f"model.layers.{i}.self_attn.{which}_proj.bias"]

    def routed(self, x, i):
        p = f"model.layers.{i}.mlp."
        gate = 1.0 / (1.0 + np.exp(-self.linear(x, p + "shared_expert_gate.weight")))  # (N, 1)
        return Family.routed(self, x, i) + gate * self.swiglu(x, p + "shared_expert.")


FAMILIES = {f.model_type: f for f in (Olmoe, Qwen2Moe, Qwen3Moe)}
FAMILIES["mixtral"] = Mixtral


def compare(hf_dir, logits_h5):
    """Max |ours - theirs| / max |theirs| over every logit of the dumped batch."""
    import h5py
    with h5py.File(logits_h5, "r") as f:
        tokens, theirs = f["tokens"][()], f["logits"][()].astype(np.float64)
    config, weights = read_model_dir(hf_dir)
    ours = FAMILIES[config["model_type"]](config, weights).forward(tokens).reshape(theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    err = compare(sys.argv[1], sys.argv[2])
    print(f"max relative logit error {err:.3e}")
    sys.exit(0 if err <= 1e-5 else 1)
