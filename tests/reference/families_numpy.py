#!/usr/bin/python3
"""Independent NumPy implementations of OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and
DeepSeek-V3, to check `moe export` of those families.

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
    DeepSeek-V2 (deepseek_v2), from the DeepSeek-V2 paper (multi-head latent attention,
    section 2.1) and the config keys of transformers' DeepseekV2Config:
        q = q_proj(x), or q_b_proj(RMSNorm_q_a_layernorm(q_a_proj(x))) when q_lora_rank;
        per head qk_nope_head_dim values q_nope then qk_rope_head_dim values q_pe.
        [c_kv, k_pe] = kv_a_proj_with_mqa(x) (kv_lora_rank, then qk_rope_head_dim: one
        RoPE key shared by every head); kv_b_proj(RMSNorm_kv_a_layernorm(c_kv)) gives per
        head k_nope (qk_nope_head_dim) then v (v_head_dim). The two latent norms' epsilon
        is 1e-6 (the config classes' default, not rms_norm_eps).
        RoPE of q_pe and k_pe over interleaved pairs (x_2i, x_2i+1) rotated by position *
        inv_freq_i (the complex-number form of the paper); key = [k_nope, k_pe],
        softmax(q.k * scale + causal mask) v, o_proj of the heads' concatenation.
        scale = 1/sqrt(qk_nope_head_dim + qk_rope_head_dim).
        YaRN (rope_scaling type yarn; the YaRN paper, eqs. 17-21, as transformers' yarn
        rope type computes it): d = qk_rope_head_dim, base = rope_theta,
        s = factor, L = original_max_position_embeddings,
        corr(n) = d ln(L / (2 pi n)) / (2 ln base), low = max(floor(corr(beta_fast)), 0),
        high = min(ceil(corr(beta_slow)), d - 1), ramp_i = clip((i - low) / (high - low),
        0, 1), inv_freq_i = base^(-2i/d) / s * ramp_i + base^(-2i/d) * (1 - ramp_i);
        m(s, a) = 0.1 a ln s + 1 (1 when s <= 1); cos and sin times m(s, mscale) /
        m(s, mscale_all_dim) when both are set and non-zero, else m(s, 1); and scale times
        m(s, mscale_all_dim)^2 when mscale_all_dim is set and non-zero.
        Layers i < first_k_dense_replace: dense SwiGLU mlp.{gate,up,down}_proj of
        intermediate_size. The others: p = softmax(gate(x)); topk_method greedy: the
        num_experts_per_tok largest p; group_limited_greedy: the experts split into n_group
        consecutive groups, a group scored by its largest p, only the topk_group best
        groups' experts compete. The weights are the chosen p (never renormalised) times
        routed_scaling_factor; plus the shared experts, one SwiGLU
        mlp.shared_experts of moe_intermediate_size * n_shared_experts, ungated.
    DeepSeek-V3 (deepseek_v3), from the DeepSeek-V3 paper (section 2.1.2) and
    DeepseekV3Config: as V2 but for the router: s = sigmoid(gate(x)), selection by
    s + e_score_correction_bias: a group scored by the sum of its two best (s + bias), the
    topk_group best groups, the num_experts_per_tok largest (s + bias) among their
    experts; the weights are the chosen s (not s + bias), divided by their sum when
    norm_topk_prob, times routed_scaling_factor. rope_interleave false: rotate-half RoPE.

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


def yarn_mscale(s, a):
    return 1.0 if s <= 1 else 0.1 * a * np.log(s) + 1.0


class DeepseekV2(Family):
    model_type = "deepseek_v2"
    interleaved = True
    latent_eps = 1e-6

    def __init__(self, config, weights):
        Family.__init__(self, config, weights)
        c = config
        self.nope, self.rope_dim = c["qk_nope_head_dim"], c["qk_rope_head_dim"]
        self.v_dim, self.rank = c["v_head_dim"], c["kv_lora_rank"]
        self.scale = 1.0 / np.sqrt(self.nope + self.rope_dim)
        self.rope_scaling = c.get("rope_scaling") or c.get("rope_parameters") or {}
        kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))
        self.yarn = kind == "yarn"
        self.attention_factor = 1.0
        if self.yarn:
            s, m = self.rope_scaling["factor"], self.rope_scaling.get("mscale")
            m_all = self.rope_scaling.get("mscale_all_dim")
            self.attention_factor = yarn_mscale(s, m) / yarn_mscale(s, m_all) if m and m_all \
                else yarn_mscale(s, 1)
            if m_all:
                self.scale *= yarn_mscale(s, m_all) ** 2

    def theta(self):
        return self.c.get("rope_theta") or self.rope_scaling.get("rope_theta")

    def inv_freq(self):
        d, base = self.rope_dim, self.theta()
        plain = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        if not self.yarn:
            return plain
        r = self.rope_scaling
        s, L = r["factor"], r["original_max_position_embeddings"]

        def corr(n):
            return d * np.log(L / (2 * np.pi * n)) / (2 * np.log(base))
        low = max(np.floor(corr(r.get("beta_fast") or 32)), 0)
        high = min(np.ceil(corr(r.get("beta_slow") or 1)), d - 1)
        if high == low:
            high += 0.001
        ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
        return plain / s * ramp + plain * (1 - ramp)

    def rotate(self, x):
        """x (..., T, d): RoPE by position along T, over interleaved pairs or halves."""
        T, d = x.shape[-2], x.shape[-1]
        angle = np.outer(np.arange(T, dtype=np.float64), self.inv_freq())   # (T, d/2)
        cos, sin = np.cos(angle) * self.attention_factor, np.sin(angle) * self.attention_factor
        if self.interleaved:
            a, b = x[..., 0::2], x[..., 1::2]
        else:
            a, b = x[..., : d // 2], x[..., d // 2:]
        ra, rb = a * cos - b * sin, b * cos + a * sin
        out = np.empty_like(x)
        if self.interleaved:
            out[..., 0::2], out[..., 1::2] = ra, rb
        else:
            out[..., : d // 2], out[..., d // 2:] = ra, rb
        return out

    def latent_norm(self, x, name):
        return self.w[name] * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) +
                                           self.latent_eps))

    def attention(self, x, i):
        B, T, _ = x.shape
        H, p = self.heads, f"model.layers.{i}.self_attn."
        if self.c.get("q_lora_rank"):
            q = self.linear(self.latent_norm(self.linear(x, p + "q_a_proj.weight"),
                                             p + "q_a_layernorm.weight"), p + "q_b_proj.weight")
        else:
            q = self.linear(x, p + "q_proj.weight")
        q = q.reshape(B, T, H, self.nope + self.rope_dim).transpose(0, 2, 1, 3)
        ckv = self.linear(x, p + "kv_a_proj_with_mqa.weight")
        c_kv, k_pe = ckv[..., :self.rank], ckv[..., self.rank:]
        kv = self.linear(self.latent_norm(c_kv, p + "kv_a_layernorm.weight"), p + "kv_b_proj.weight")
        kv = kv.reshape(B, T, H, self.nope + self.v_dim).transpose(0, 2, 1, 3)
        k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
        q_pe, k_pe = self.rotate(q[..., self.nope:]), self.rotate(k_pe[:, None])
        scores = (q[..., :self.nope] @ k_nope.transpose(0, 1, 3, 2) +
                  q_pe @ k_pe.transpose(0, 1, 3, 2)) * self.scale          # (B, H, T, T)
        scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, H * self.v_dim)
        return self.linear(out, p + "o_proj.weight")

    def sparse(self, i):
        return i >= self.c.get("first_k_dense_replace", 0)

    def select(self, x, i):
        """(chosen (N, k), weight (N, k)) of the routed experts."""
        logits = self.linear(x, f"model.layers.{i}.mlp.gate.weight")
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        choice = probs.copy()
        if self.c.get("topk_method", "greedy") == "group_limited_greedy":
            choice = self.mask_groups(choice, choice.reshape(len(x), self.c["n_group"], -1).max(-1), 0.0)
        chosen = np.argsort(-choice, axis=-1, kind="stable")[:, :self.c["num_experts_per_tok"]]
        return chosen, np.take_along_axis(probs, chosen, axis=-1)

    def mask_groups(self, choice, group_score, fill):
        """choice (N, E) with every expert outside the topk_group best groups set to fill."""
        n_group = self.c["n_group"]
        best = np.argsort(-group_score, axis=-1, kind="stable")[:, :self.c["topk_group"]]
        keep = np.zeros_like(group_score, dtype=bool)
        np.put_along_axis(keep, best, True, axis=-1)
        keep = np.repeat(keep, choice.shape[1] // n_group, axis=-1)
        return np.where(keep, choice, fill)

    def routed(self, x, i):
        p = f"model.layers.{i}.mlp."
        chosen, weight = self.select(x, i)
        weight = weight * self.c.get("routed_scaling_factor", 1.0)
        out = np.zeros_like(x)
        for e in range(self.c["n_routed_experts"]):
            rows, slot = np.nonzero(chosen == e)
            if len(rows):
                out[rows] += weight[rows, slot][:, None] * self.swiglu(x[rows], f"{p}experts.{e}.")
        if self.c.get("n_shared_experts"):
            out += self.swiglu(x, p + "shared_experts.")
        return out


class DeepseekV3(DeepseekV2):
    model_type = "deepseek_v3"

    def __init__(self, config, weights):
        DeepseekV2.__init__(self, config, weights)
        self.interleaved = config.get("rope_interleave", True)

    def select(self, x, i):
        p = f"model.layers.{i}.mlp.gate."
        s = 1.0 / (1.0 + np.exp(-self.linear(x, p + "weight")))
        choice = s + self.w[p + "e_score_correction_bias"]
        grouped = np.sort(choice.reshape(len(x), self.c["n_group"], -1), axis=-1)
        choice = self.mask_groups(choice, grouped[..., -2:].sum(-1), -np.inf)
        chosen = np.argsort(-choice, axis=-1, kind="stable")[:, :self.c["num_experts_per_tok"]]
        weight = np.take_along_axis(s, chosen, axis=-1)
        if self.c.get("norm_topk_prob", True):
            weight = weight / weight.sum(axis=-1, keepdims=True)
        return chosen, weight


FAMILIES = {f.model_type: f for f in (Olmoe, Qwen2Moe, Qwen3Moe, DeepseekV2, DeepseekV3)}
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
