#!/usr/bin/python3
"""Independent NumPy implementation of the Mixtral forward pass, to check `moe export`.

Reads a Hugging Face model directory (config.json and model.safetensors, or the shards
model.safetensors.index.json names) and computes MixtralForCausalLM's logits in float64.
Written from the transformers documentation of Mixtral and the papers it cites, never from
moe.c's sources; its safetensors reader is its own (json + numpy.frombuffer), so it shares
no code with the C reader and writer it checks.

The model (transformers' MixtralForCausalLM, no cache, no padding):
    h = embed_tokens[ids]
    per layer:
        h = h + o_proj(attention(input_layernorm(h)))
        h = h + moe(post_attention_layernorm(h))
    logits = lm_head(norm(h))            lm_head = embed_tokens when tie_word_embeddings
    RMSNorm(x) = weight * x / sqrt(mean(x^2) + rms_norm_eps)
    attention: q, k, v = q_proj(x), k_proj(x), v_proj(x), split into heads of
        head_dim (default hidden_size / num_attention_heads); RoPE on q and k with the rotate-half
        convention: inv_freq_i = rope_theta^(-2i/head_dim), angle = position * inv_freq,
        cos/sin over [angle, angle], x' = x*cos + rotate_half(x)*sin with
        rotate_half([x1, x2]) = [-x2, x1]; key/value heads repeated so that query head h
        reads key head h // (heads / kv_heads); softmax(q k^T / sqrt(head_dim) + causal
        mask) v; heads concatenated.
    moe (block_sparse_moe): router_logits = gate(x); p = softmax(router_logits); the
        num_experts_per_tok largest p per token, renormalised to sum to 1; output =
        sum over the selected experts j of weight_j * w2(silu(w1(x)) * w3(x)).
    Every linear layer is y = x W^T with W stored [out, in].

Usage:
    /usr/bin/python3 tests/reference/mixtral_numpy.py HF_DIR LOGITS.h5
compares with LOGITS.h5 (from `moe eval CKPT DATA --dump-logits LOGITS.h5`) and prints the
largest |difference| relative to the largest |logit|.
"""
import json
import os
import struct
import sys

import numpy as np

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def read_safetensors(path):
    """{name: float32 array} of one safetensors file (F32, F16 or BF16)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dt = _DTYPES[info["dtype"]]
        raw = np.frombuffer(data, dtype=dt, count=(end - begin) // dt.itemsize,
                            offset=8 + n + begin)
        if info["dtype"] == "BF16":   # bfloat16 is the top half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.astype(np.float32).reshape(info["shape"])
    return out


def read_model_dir(path):
    """(config dict, {tensor name: float32 array}) of a Hugging Face model directory."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return config, read_safetensors(single)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    weights = {}
    for name in files:
        weights.update(read_safetensors(os.path.join(path, name)))
    return config, weights


class Mixtral:
    def __init__(self, config, weights):
        assert config["model_type"] == "mixtral", config["model_type"]
        self.c = config
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        self.heads = config["num_attention_heads"]
        self.kv_heads = config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.heads
        self.eps = config["rms_norm_eps"]

    def linear(self, x, name):
        return x @ self.w[name].T

    def rms_norm(self, x, name):
        return self.w[name] * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps))

    def rope(self, x):
        """x (B, heads, T, D), rotated by position t along T."""
        d = self.head_dim
        inv_freq = 1.0 / (self.c["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
        angle = np.outer(np.arange(x.shape[2], dtype=np.float64), inv_freq)   # (T, D/2)
        emb = np.concatenate([angle, angle], axis=-1)                          # (T, D)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        rotated = np.concatenate([-x2, x1], axis=-1)
        return x * np.cos(emb) + rotated * np.sin(emb)

    def attention(self, x, i):
        B, T, _ = x.shape
        p = f"model.layers.{i}.self_attn."

        def heads(name, n):
            return self.linear(x, p + name).reshape(B, T, n, self.head_dim).transpose(0, 2, 1, 3)

        q = self.rope(heads("q_proj.weight", self.heads))
        k = self.rope(heads("k_proj.weight", self.kv_heads))
        v = heads("v_proj.weight", self.kv_heads)
        group = self.heads // self.kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)   # head h -> h // group
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(self.head_dim)      # (B, H, T, T)
        scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, self.heads * self.head_dim)
        return self.linear(out, p + "o_proj.weight")

    def moe(self, x, i):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        p = f"model.layers.{i}.block_sparse_moe."
        logits = self.linear(x, p + "gate.weight")                              # (N, E)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        k = self.c["num_experts_per_tok"]
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]              # (N, k)
        weight = np.take_along_axis(probs, chosen, axis=-1)
        weight /= weight.sum(axis=-1, keepdims=True)
        out = np.zeros_like(x)
        for e in range(self.c["num_local_experts"]):
            rows, slot = np.nonzero(chosen == e)
            if len(rows) == 0:
                continue
            xe = x[rows]
            a = self.linear(xe, f"{p}experts.{e}.w1.weight")
            silu = a / (1.0 + np.exp(-a))
            y = self.linear(silu * self.linear(xe, f"{p}experts.{e}.w3.weight"),
                            f"{p}experts.{e}.w2.weight")
            out[rows] += weight[rows, slot][:, None] * y
        return out.reshape(B, T, C)

    def forward(self, ids):
        """ids (B, T) int -> logits (B, T, vocab_size), float64."""
        h = self.w["model.embed_tokens.weight"][ids]
        for i in range(self.c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = h + self.attention(self.rms_norm(h, p + "input_layernorm.weight"), i)
            h = h + self.moe(self.rms_norm(h, p + "post_attention_layernorm.weight"), i)
        h = self.rms_norm(h, "model.norm.weight")
        head = "model.embed_tokens.weight" if self.c.get("tie_word_embeddings") else "lm_head.weight"
        return self.linear(h, head)


def compare(hf_dir, logits_h5):
    """Max |ours - theirs| / max |theirs| over every logit of the dumped batch."""
    import h5py
    with h5py.File(logits_h5, "r") as f:
        tokens, theirs = f["tokens"][()], f["logits"][()].astype(np.float64)
    ours = Mixtral(*read_model_dir(hf_dir)).forward(tokens).reshape(theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    err = compare(sys.argv[1], sys.argv[2])
    print(f"max relative logit error {err:.3e}")
    sys.exit(0 if err <= 1e-4 else 1)
