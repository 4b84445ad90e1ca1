#!/usr/bin/python3
"""Independent PyTorch reference for moe.c.

Reads a file written by `./moe dump OUT.h5 [section.key=value ...]`, rebuilds the model in
float64 from the stored float32 weights, recomputes the forward pass (logits, cross-entropy,
router selection, capacity drops, auxiliary losses) and every parameter gradient with
autograd, and compares them with what the C code stored.

Router variants (router.select): token-choice top-k (optionally on score + a DeepSeek-V3
expert bias from /state, router.bias_gamma > 0 or router.expert_bias; optionally limited to
the best router.topk_groups of router.groups expert groups, DeepSeek-V2's
group_limited_greedy and V3's noaux_tc; gates times router.gate_scale), expert choice (Zhou
et al. 2022) and hash routing (Roller et al. 2021); load balancing over the batch or per
sequence (router.lb_type); DeepSeek's leading dense layers (model.first_dense_layers).

Written from the model and routing equations (docs/architecture.md, docs/routing.md) and torch's
own ops, never from the C sources: its point is to disagree with the C when the C is wrong.

Usage:
    /usr/bin/python3 tests/reference/torch_moe.py DUMP.h5        # prints a comparison table
    /usr/bin/python3 tests/reference/torch_moe.py DUMP.h5 --all  # every row, not only the worst

Needs Debian's python3-torch (1.13, CPU), python3-h5py and python3-numpy, which live in
/usr/bin/python3, not in the `python3` first on PATH.
"""
import math
import sys
from collections import OrderedDict

import h5py
import numpy as np
import torch
import torch.nn.functional as F

DTYPE = torch.float64
TOLERANCE = 1e-4  # the relative error the tests accept


# ----------------------------------------------------------------------------------------
# Reading a dump


def _attr_str(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        if v.shape == () or v.size == 1:
            return _attr_str(v.reshape(-1)[0])
        raise ValueError(f"config attribute is an array: {v!r}")
    if isinstance(v, np.generic):
        return _attr_str(v.item())
    return str(v)


def _parse_bool(key, s):
    s = s.strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"config key {key}: expected true/false, got {s!r}")


class Config:
    """The resolved config keys the reference needs, parsed from /config."""

    def __init__(self, raw):
        self.raw = dict(raw)

        def get(key, conv=str, default=None):
            if key not in self.raw:
                if default is not None:
                    return default
                raise KeyError(
                    f"dump /config lacks {key!r}; present: {', '.join(sorted(self.raw))}")
            s = self.raw[key]
            if conv is bool:
                return _parse_bool(key, s)
            try:
                return conv(s)
            except ValueError:
                raise ValueError(f"config key {key}: cannot parse {s!r} as {conv.__name__}")

        self.layers = get("model.layers", int)
        self.d_model = get("model.d_model", int)
        self.heads = get("model.heads", int)
        self.kv_heads = get("model.kv_heads", int)
        self.vocab = get("model.vocab", int)
        self.seq_len = get("model.seq_len", int)
        self.moe_every = get("model.moe_every", int)
        self.first_dense_layers = get("model.first_dense_layers", int, 0)
        self.experts = get("model.experts", int)
        self.shared_experts = get("model.shared_experts", int, 0)
        # Hugging Face family features (defaults: what dumps before these keys meant)
        self.qk_norm = get("model.qk_norm", str, "none")
        self.qkv_bias = get("model.qkv_bias", bool, False)
        self.shared_gate = get("model.shared_gate", bool, False)
        self.tie_embeddings = get("model.tie_embeddings", bool)
        self.rope_theta = get("model.rope_theta", float)
        self.norm_eps = get("model.norm_eps", float)
        self.top_k = get("router.top_k", int)
        self.score = get("router.score")
        self.renorm = get("router.renorm", bool)
        self.noise = get("router.noise", str, "none")
        self.capacity_factor = get("router.capacity_factor", float)
        self.drop_policy = get("router.drop_policy", str, "position")
        self.aux_coef = get("router.aux_coef", float)
        self.z_coef = get("router.z_coef", float)
        self.noise_coef = get("router.noise_coef", float) if self.noise == "shazeer" else 0.0
        self.batch_size = get("train.batch_size", int)
        # multi-head latent attention (DeepSeek-V2) and YaRN; defaults: dumps before the keys
        self.attention = get("model.attention", str, "gqa")
        self.q_lora_rank = get("model.q_lora_rank", int, 0)
        self.kv_lora_rank = get("model.kv_lora_rank", int, 0)
        self.qk_nope_dim = get("model.qk_nope_dim", int, 0)
        self.qk_rope_dim = get("model.qk_rope_dim", int, 0)
        self.v_head_dim = get("model.v_head_dim", int, 0)
        self.rope_scaling = get("model.rope_scaling", str, "none")
        self.rope_factor = get("model.rope_factor", float, 1.0)
        self.rope_orig_max_pos = get("model.rope_orig_max_pos", int, 4096)
        self.rope_beta_fast = get("model.rope_beta_fast", float, 32.0)
        self.rope_beta_slow = get("model.rope_beta_slow", float, 1.0)
        self.rope_mscale = get("model.rope_mscale", float, 1.0)
        self.rope_mscale_all_dim = get("model.rope_mscale_all_dim", float, 0.0)
        # router variants; defaults are what dumps written before these keys meant
        self.select = get("router.select", str, "topk")
        self.bias_gamma = get("router.bias_gamma", float, 0.0)
        self.lb_type = get("router.lb_type", str, "batch")
        # DeepSeek routing (n_group, topk_group, routed_scaling_factor)
        self.expert_bias = get("router.expert_bias", bool, False)
        self.groups = get("router.groups", int, 1)
        self.topk_groups = get("router.topk_groups", int, 0) or self.groups
        self.group_score = get("router.group_score", str, "max")
        self.gate_scale = get("router.gate_scale", float, 1.0)
        if self.group_score not in ("max", "top2"):
            raise ValueError(f"router.group_score={self.group_score!r}: reference knows max, "
                             "top2")
        if self.experts % self.groups or not 1 <= self.topk_groups <= self.groups:
            raise ValueError("router.groups must divide experts and topk_groups be in "
                             "1..groups")

        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"router.score={self.score!r}: reference knows softmax, sigmoid")
        if self.noise not in ("none", "jitter", "shazeer"):
            raise ValueError(f"router.noise={self.noise!r}: reference knows none, jitter, shazeer")
        if self.drop_policy not in ("position", "probs"):
            raise ValueError(f"router.drop_policy={self.drop_policy!r}: reference knows "
                             "position, probs")
        if self.select not in ("topk", "expert_choice", "hash"):
            raise ValueError(f"router.select={self.select!r}: reference knows topk, "
                             "expert_choice, hash")
        if self.lb_type not in ("batch", "seq"):
            raise ValueError(f"router.lb_type={self.lb_type!r}: reference knows batch, seq")
        if self.select == "hash" and self.noise != "none":
            raise ValueError("router.select=hash has no router logits to add noise to")
        if self.select != "topk" and (self.noise == "shazeer" or self.has_bias):
            raise ValueError("Shazeer noise and the expert bias are defined for "
                             "router.select=topk only")
        if self.has_bias and self.noise == "shazeer":
            # the Shazeer load loss's threshold (k-th largest noisy logit excluding i) is
            # not defined when the selection is on score + bias: no equation to check
            raise ValueError("router.bias_gamma > 0 with router.noise=shazeer: the reference "
                             "has no definition of the load loss for a biased selection")
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"model.attention={self.attention!r}: reference knows gqa, mla")
        if self.rope_scaling not in ("none", "yarn"):
            raise ValueError(f"model.rope_scaling={self.rope_scaling!r}: reference knows "
                             "none, yarn")
        if self.attention == "gqa" and (self.d_model % self.heads or
                                        self.heads % self.kv_heads):
            raise ValueError("d_model must divide by heads and heads by kv_heads")
        if self.attention == "gqa" and (self.d_model // self.heads) % 2:
            raise ValueError("head dim must be even for RoPE")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"router.top_k={self.top_k} outside 1..experts={self.experts}")

    @property
    def has_router(self):
        """Whether an MoE layer has router weights (a gate); hash routing has none."""
        return self.select != "hash"

    @property
    def has_lb(self):
        """Whether an MoE layer has a load-balancing loss (token-choice learned routers)."""
        return self.select == "topk"

    @property
    def has_bias(self):
        return self.bias_gamma > 0 or self.expert_bias

    @property
    def uses_bias(self):
        return self.select == "topk" and self.has_bias

    @property
    def group_limited(self):
        return self.select == "topk" and self.topk_groups < self.groups

    @property
    def head_dim(self):
        return self.d_model // self.heads

    def is_moe(self, i):
        return i >= self.first_dense_layers and (i + 1) % self.moe_every == 0

    def moe_layers(self):
        return [i for i in range(self.layers) if self.is_moe(i)]


class Dump:
    """Everything in one dump file, as numpy arrays."""

    def __init__(self, path):
        self.path = path
        with h5py.File(path, "r") as f:
            if "config" not in f:
                raise ValueError(f"{path}: no /config group")
            self.config = Config({k: _attr_str(v) for k, v in f["config"].attrs.items()})
            # parameter names are HF's dotted names; tolerate nested groups too
            self.params = self._group(f, "params", dotted=True)
            self.grads = self._group(f, "grads", required=False, dotted=True)
            self.noise = self._group(f, "noise", required=False)
            self.out = self._group(f, "out", required=False)
            self.state = self._group(f, "state", required=False, dotted=True)
            self.tokens = np.asarray(f["batch/tokens"][()], dtype=np.int64)
            self.targets = np.asarray(f["batch/targets"][()], dtype=np.int64)

    @staticmethod
    def _group(f, name, required=True, dotted=False):
        out = OrderedDict()
        if name not in f:
            if required:
                raise ValueError(f"{f.filename}: no /{name} group")
            return out

        def visit(path, obj):
            if isinstance(obj, h5py.Dataset):
                out[path.replace("/", ".") if dotted else path] = np.asarray(obj[()])

        f[name].visititems(visit)
        return out


# ----------------------------------------------------------------------------------------
# The model, in float64


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(T, D, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=DTYPE) / D))  # (D/2)
    pos = torch.arange(T, dtype=DTYPE)
    freqs = torch.outer(pos, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def attention(x, P, pre, cfg):
    """x: (B, T, C) normed input. Causal grouped-query attention with HF-style RoPE."""
    B, T, C = x.shape
    H, KV, D = cfg.heads, cfg.kv_heads, cfg.head_dim
    a = pre + "self_attn."

    def proj(name):   # Qwen2-MoE: q, k and v have biases
        b = P[a + f"{name}_proj.bias"] if cfg.qkv_bias else None
        return F.linear(x, P[a + f"{name}_proj.weight"], b)

    q, k, v = proj("q"), proj("k"), proj("v")
    if cfg.qk_norm == "full":   # OLMoE: RMSNorm over the whole projections
        q = rmsnorm(q, P[a + "q_norm.weight"], cfg.norm_eps)
        k = rmsnorm(k, P[a + "k_norm.weight"], cfg.norm_eps)
    q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)
    if cfg.qk_norm == "head":   # Qwen3-MoE: RMSNorm over each head
        q = rmsnorm(q, P[a + "q_norm.weight"], cfg.norm_eps)
        k = rmsnorm(k, P[a + "k_norm.weight"], cfg.norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = rope_cos_sin(T, D, cfg.rope_theta)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    # query head h reads kv head h // (H/KV)
    k = k.repeat_interleave(H // KV, dim=1)
    v = v.repeat_interleave(H // KV, dim=1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    att = att.masked_fill(causal, float("-inf")).softmax(dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, H * D)
    return F.linear(y, P[pre + "self_attn.o_proj.weight"])


def yarn_get_mscale(factor, mscale):
    # YaRN (Peng et al. 2023), eq. for the attention temperature: 0.1 m ln(s) + 1
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_rope(cfg, T):
    """cos, sin (T, Dr) of the MLA rope part: plain RoPE, or YaRN (Peng et al. 2023, as
    DeepSeek-V2 uses it): frequencies blended between theta^(-2i/D) (extrapolation) and the
    same divided by the factor (interpolation) by a linear ramp over the pairs between the
    correction dimensions of beta_fast and beta_slow rotations over the original context;
    cos and sin multiplied by the attention factor."""
    D, theta = cfg.qk_rope_dim, cfg.rope_theta
    pair = torch.arange(0, D, 2, dtype=DTYPE)
    extrapolated = theta ** (-pair / D)
    inv_freq, m = extrapolated, 1.0
    if cfg.rope_scaling == "yarn":
        f = cfg.rope_factor

        def correction_dim(rotations):
            # the pair index whose wavelength fits `rotations` times in the original context
            wavelength = cfg.rope_orig_max_pos / (rotations * 2 * math.pi)
            return D * math.log(wavelength) / (2 * math.log(theta))

        lo = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
        hi = min(math.ceil(correction_dim(cfg.rope_beta_slow)), D - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(D // 2, dtype=DTYPE) - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = extrapolated / f * ramp + extrapolated * (1 - ramp)
        if cfg.rope_mscale and cfg.rope_mscale_all_dim:
            m = yarn_get_mscale(f, cfg.rope_mscale) / yarn_get_mscale(f, cfg.rope_mscale_all_dim)
        else:
            m = yarn_get_mscale(f, 1.0)
    freqs = torch.outer(torch.arange(T, dtype=DTYPE), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * m, emb.sin() * m


def mla_attention(x, P, pre, cfg):
    """x: (B, T, C) normed input. DeepSeek-V2's multi-head latent attention: queries
    from q_proj (or q_a_proj, RMSNorm, q_b_proj), keys and values from a kv_lora_rank
    latent (kv_a_proj_with_mqa, RMSNorm, kv_b_proj) plus one RoPE key shared by all heads."""
    B, T, C = x.shape
    H, Dn, Dr, Dv, R = (cfg.heads, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    a = pre + "self_attn."
    if cfg.q_lora_rank:
        qa = rmsnorm(F.linear(x, P[a + "q_a_proj.weight"]), P[a + "q_a_layernorm.weight"],
                     cfg.norm_eps)
        q = F.linear(qa, P[a + "q_b_proj.weight"])
    else:
        q = F.linear(x, P[a + "q_proj.weight"])
    q = q.view(B, T, H, Dn + Dr).transpose(1, 2)  # (B, H, T, Dn + Dr)
    q_nope, q_pe = q[..., :Dn], q[..., Dn:]
    ckv = F.linear(x, P[a + "kv_a_proj_with_mqa.weight"])  # (B, T, R + Dr)
    latent, k_pe = ckv[..., :R], ckv[..., R:]
    kv = F.linear(rmsnorm(latent, P[a + "kv_a_layernorm.weight"], cfg.norm_eps),
                  P[a + "kv_b_proj.weight"]).view(B, T, H, Dn + Dv).transpose(1, 2)
    k_nope, v = kv[..., :Dn], kv[..., Dn:]
    cos, sin = mla_rope(cfg, T)
    q_pe = q_pe * cos + rotate_half(q_pe) * sin
    k_pe = k_pe.unsqueeze(1)  # (B, 1, T, Dr): one key for every head
    k_pe = k_pe * cos + rotate_half(k_pe) * sin
    qf = torch.cat((q_nope, q_pe), dim=-1)
    kf = torch.cat((k_nope, k_pe.expand(B, H, T, Dr)), dim=-1)
    scale = 1.0 / math.sqrt(Dn + Dr)
    if cfg.rope_scaling == "yarn":
        scale *= yarn_get_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
    att = (qf @ kf.transpose(-2, -1)) * scale
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    att = att.masked_fill(causal, float("-inf")).softmax(dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, H * Dv)
    return F.linear(y, P[a + "o_proj.weight"])


def swiglu(x, w1, w3, w2):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def capacity(cfg, N):
    """Per-expert capacity, or None for dropless."""
    if cfg.capacity_factor <= 0:
        return None
    return int(math.ceil(cfg.top_k * N * cfg.capacity_factor / cfg.experts))


def capacity_keep(idx, gates, E, cap, policy):
    """Which (token, choice) assignments survive capacity.

    idx: (N, k) int64 selected experts; gates: (N, k) gate values (only their order
    matters, for policy 'probs'); cap: per-expert capacity or None (dropless).
    Position order is choice-major: every first choice (tokens in order) before any
    second choice. Returns a bool tensor (N, k).
    """
    N, k = idx.shape
    if cap is None:
        return torch.ones(N, k, dtype=torch.bool)
    keep = torch.zeros(N, k, dtype=torch.bool)
    # assignments in position order
    order = [(j, n) for j in range(k) for n in range(N)]
    if policy == "position":
        used = [0] * E
        for j, n in order:
            e = int(idx[n, j])
            if used[e] < cap:
                used[e] += 1
                keep[n, j] = True
        return keep
    # policy 'probs': per expert keep the cap highest gates, ties by position order
    g = gates.detach()
    per_expert = {e: [] for e in range(E)}
    for pos, (j, n) in enumerate(order):
        per_expert[int(idx[n, j])].append((-float(g[n, j]), pos, n, j))
    for e, lst in per_expert.items():
        lst.sort()
        for _, _, n, j in lst[:cap]:
            keep[n, j] = True
    return keep


def cv_squared(v):
    """Population variance / (mean^2 + 1e-10)."""
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return var / (mean * mean + 1e-10)


def normal_cdf(z):
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


_M64 = (1 << 64) - 1


def splitmix64_finalizer(x):
    """SplitMix64's output function on a 64-bit unsigned integer (Python ints, mod 2^64)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def hash_choices(token_ids, E, k):
    """Hash routing (Roller et al. 2021): token n's j-th expert is (h + j) % E with
    h = splitmix64_finalizer(token id as uint32 widened to 64 bits) % E. Returns (N, k)."""
    rows = []
    for t in token_ids.reshape(-1).tolist():
        h = splitmix64_finalizer(int(t) & 0xFFFFFFFF) % E
        rows.append([(h + j) % E for j in range(k)])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, k)


def expert_choice_capacity(cfg, N):
    """Tokens per expert under expert choice: min(N, ceil(N * cf / E)), cf = top_k when
    capacity_factor <= 0."""
    cf = cfg.capacity_factor if cfg.capacity_factor > 0 else float(cfg.top_k)
    return min(N, int(math.ceil(N * cf / cfg.experts)))


def expert_choice_keep(s, C):
    """Each expert (column of s, (N, E)) takes the C tokens with the highest score, ties to
    the lower token index. Returns a bool (N, E) and the smallest gap, over experts, between
    the C-th and the (C+1)-th score (inf when C == N)."""
    N, E = s.shape
    order = torch.sort(s.detach(), dim=0, descending=True, stable=True).indices  # (N, E)
    keep = torch.zeros(N, E, dtype=torch.bool).scatter(0, order[:C], True)
    margin = float("inf")
    if C < N:
        srt = s.detach().gather(0, order)
        margin = float((srt[C - 1] - srt[C]).min())
    return keep, margin


def expert_counts(idx, E):
    """Assignments per expert in idx (any shape of expert indices), as float64 (E,)."""
    return torch.zeros(E, dtype=DTYPE).scatter_add(
        0, idx.reshape(-1), torch.ones(idx.numel(), dtype=DTYPE))


def load_balance(p, idx, E, k, groups=1):
    """Load-balancing loss E/(k*n) * sum_i count_i * P_i over each of `groups` equal
    consecutive slices of the N tokens (count of idx (N, k) before capacity, P the mean of
    p (N, E) over the slice), averaged over the slices. groups = 1 is the whole batch;
    groups = B is per sequence (lb_type=seq)."""
    N = p.shape[0]
    if N % groups:
        raise ValueError(f"{N} tokens do not split into {groups} sequences")
    n = N // groups
    vals = []
    for g in range(groups):
        sl = slice(g * n, (g + 1) * n)
        count = expert_counts(idx[sl], E)
        vals.append(E / (k * n) * (count * p[sl].mean(dim=0)).sum())
    return torch.stack(vals).mean()


def moe_layer(x, P, pre, cfg, noise, tokens=None, state=None):
    """x: (N, C) normed hidden; tokens: (N,) token ids (hash routing); state: this layer's
    state tensors (expert_bias). Returns y (N, C) and a dict of router results."""
    N, C = x.shape
    E, k = cfg.experts, cfg.top_k
    m = pre + "block_sparse_moe."
    state = state or {}

    def experts_out(combine):
        y = torch.zeros_like(x)
        for e in range(E):
            ex = f"{m}experts.{e}."
            out = swiglu(x, P[ex + "w1.weight"], P[ex + "w3.weight"], P[ex + "w2.weight"])
            y = y + combine[:, e:e + 1] * out
        shared = torch.zeros_like(x)
        for j in range(cfg.shared_experts):
            sx = f"{m}shared_experts.{j}."
            shared = shared + swiglu(x, P[sx + "w1.weight"], P[sx + "w3.weight"],
                                     P[sx + "w2.weight"])
        if cfg.shared_gate:   # Qwen2-MoE: sigmoid(x . w_g) per token scales the shared sum
            shared = torch.sigmoid(F.linear(x, P[m + "shared_expert_gate.weight"])) * shared
        return y + shared

    if cfg.select == "hash":
        # no router: fixed choices, constant gates 1/k, capacity as for top-k (ties of the
        # equal gates under 'probs' follow the position order)
        idx = hash_choices(tokens, E, k)
        gates = torch.full((N, k), 1.0 / k, dtype=DTYPE)
        keep = capacity_keep(idx, gates, E, capacity(cfg, N), cfg.drop_policy)
        combine = torch.zeros(N, E, dtype=DTYPE).scatter_add(1, idx, gates * keep.to(DTYPE))
        res = {"topk": idx, "keep": keep, "gates": gates, "margin": float("inf")}
        return experts_out(combine), res

    xr = x
    if cfg.noise == "jitter":
        xr = x * noise["jitter"]  # multiplicative factors u, already drawn
    clean = F.linear(xr, P[m + "gate.weight"])  # (N, E)
    raw = None
    if cfg.noise == "shazeer":
        raw = F.linear(xr, P[m + "noise.weight"])  # (N, E)
        h = clean + noise["eps"] * F.softplus(raw)
    else:
        h = clean

    if cfg.score == "softmax":
        s = torch.softmax(h, dim=-1)
    else:
        s = torch.sigmoid(h)
    z = (torch.logsumexp(h, dim=-1) ** 2).mean()

    if cfg.select == "expert_choice":
        # Zhou et al. 2022: each expert takes its top-C tokens; gates are the raw scores
        cap = expert_choice_capacity(cfg, N)
        keep, margin = expert_choice_keep(s, cap)
        combine = s * keep.to(DTYPE)
        idx = torch.arange(E, dtype=torch.int64).expand(N, E).clone()
        res = {"z": z, "topk": idx, "keep": keep, "scores": s.detach(), "gates": s.detach(),
               "margin": margin, "capacity": cap}
        return experts_out(combine), res

    # token-choice top-k: selection on s (+ expert bias), largest first, ties to the lower
    # expert index; constant in backward. The bias selects but never weights.
    key = s.detach()
    if cfg.uses_bias:
        if "expert_bias" not in state:
            raise KeyError("an expert bias is in use but the dump has no /state/layers.{i}."
                           "expert_bias")
        key = key + state["expert_bias"].reshape(1, E)
    group_margin = float("inf")
    ungrouped = key
    if cfg.group_limited:
        # DeepSeek: a group's score is its best key (V2) or the sum of its two best (V3);
        # only the experts of the topk_groups best groups stay eligible (ties to the lower
        # group), the others drop out of the selection entirely
        G, TG = cfg.groups, cfg.topk_groups
        grouped = key.view(N, G, E // G)
        if cfg.group_score == "max":
            gs = grouped.max(dim=-1).values
        else:
            gs = grouped.topk(2, dim=-1).values.sum(dim=-1)
        gorder = torch.sort(gs, dim=-1, descending=True, stable=True).indices  # (N, G)
        kept = torch.zeros(N, G, dtype=torch.bool).scatter(1, gorder[:, :TG], True)
        key = key.masked_fill(~kept.repeat_interleave(E // G, dim=1), float("-inf"))
        gss = gs.gather(1, gorder)
        group_margin = float((gss[:, TG - 1] - gss[:, TG]).min())
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # (N, E)
    idx = order[:, :k]
    sel = s.gather(1, idx)  # (N, k)
    # V3's 1e-20 keeps an all-underflowed sigmoid selection finite; routed_scaling_factor
    gates = sel / (sel.sum(dim=-1, keepdim=True) + 1e-20) if cfg.renorm else sel
    gates = gates * cfg.gate_scale

    cap = capacity(cfg, N)
    keep = capacity_keep(idx, gates, E, cap, cfg.drop_policy)

    # combine weights (N, E): kept gates scattered to their experts
    kept_gates = gates * keep.to(DTYPE)
    combine = torch.zeros(N, E, dtype=DTYPE).scatter_add(1, idx, kept_gates)
    y = experts_out(combine)

    # auxiliary losses, unscaled; counts before capacity, on the (biased) selection
    p = s if cfg.score == "softmax" else s / s.sum(dim=-1, keepdim=True)
    lb = load_balance(p, idx, E, k, cfg.batch_size if cfg.lb_type == "seq" else 1)

    sk = key.gather(1, order)
    margin = float((sk[:, k - 1] - sk[:, k]).min()) if k < E else float("inf")
    margin = min(margin, group_margin)
    res = {"lb": lb, "z": z, "topk": idx, "keep": keep, "scores": s.detach(),
           "probs": p.detach(), "order": order, "gates": gates.detach(), "margin": margin}
    if cfg.group_limited:
        res["order_ungrouped"] = torch.sort(ungrouped, dim=-1, descending=True,
                                            stable=True).indices
    if cfg.uses_bias:
        res["order_unbiased"] = torch.sort(s.detach(), dim=-1, descending=True,
                                           stable=True).indices
    if cfg.noise == "shazeer":
        imp = torch.zeros(N, E, dtype=DTYPE).scatter_add(1, idx, gates).sum(dim=0)
        # threshold: the k-th largest noisy value among the other experts
        if k < E:
            h_kth = h.gather(1, order[:, k - 1:k])  # k-th largest overall (N, 1)
            h_next = h.gather(1, order[:, k:k + 1])  # largest outside the top-k
            selected = torch.zeros(N, E, dtype=torch.bool).scatter(1, idx, True)
            thr = torch.where(selected, h_next.expand(N, E), h_kth.expand(N, E))
            prob = normal_cdf((clean - thr) / F.softplus(raw))
        else:
            # k == E: every expert is always selected; its threshold is -inf, P = 1
            prob = torch.ones(N, E, dtype=DTYPE)
        load = prob.sum(dim=0)
        res["importance"] = cv_squared(imp)
        res["load"] = cv_squared(load)
    return y, res


def forward(cfg, P, tokens, targets, noise, state=None):
    """P: name -> float64 tensor. tokens/targets: (B, T) int64 tensors.
    noise: layer index -> {"eps": (N, E)} or {"jitter": (N, C)}.
    state: layer index -> {"expert_bias": (E,)} (float64, no gradient).
    Returns a dict of tensors (loss/ce with graph attached)."""
    state = state or {}
    B, T = tokens.shape
    N, C = B * T, cfg.d_model
    x = F.embedding(tokens, P["model.embed_tokens.weight"])  # (B, T, C)
    routers = []
    for i in range(cfg.layers):
        pre = f"model.layers.{i}."
        attend = mla_attention if cfg.attention == "mla" else attention
        hid = x + attend(rmsnorm(x, P[pre + "input_layernorm.weight"], cfg.norm_eps), P, pre,
                         cfg)
        xn = rmsnorm(hid, P[pre + "post_attention_layernorm.weight"], cfg.norm_eps)
        xn = xn.reshape(N, C)
        if cfg.is_moe(i):
            y, r = moe_layer(xn, P, pre, cfg, noise.get(i, {}), tokens=tokens.reshape(N),
                             state=state.get(i, {}))
            r["layer"] = i
            routers.append(r)
        else:
            y = swiglu(xn, P[pre + "mlp.gate_proj.weight"], P[pre + "mlp.up_proj.weight"],
                       P[pre + "mlp.down_proj.weight"])
        x = hid + y.view(B, T, C)
    x = rmsnorm(x, P["model.norm.weight"], cfg.norm_eps).reshape(N, C)
    head = P["model.embed_tokens.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    logits = F.linear(x, head)  # (N, V)
    ce = F.cross_entropy(logits, targets.reshape(N))

    out = {"logits": logits, "ce": ce, "routers": routers}
    loss = ce
    # each aux loss averages over the MoE layers that have it (hash: none; expert choice: z)
    lbs = [r["lb"] for r in routers if "lb" in r]
    zs = [r["z"] for r in routers if "z" in r]
    if lbs:
        out["lb"] = torch.stack(lbs)
        loss = loss + cfg.aux_coef * out["lb"].mean()
    if zs:
        out["z"] = torch.stack(zs)
        loss = loss + cfg.z_coef * out["z"].mean()
    if routers:
        if cfg.noise == "shazeer":
            imp = torch.stack([r["importance"] for r in routers])
            load = torch.stack([r["load"] for r in routers])
            out["importance"], out["load"] = imp, load
            loss = loss + cfg.noise_coef * (imp + load).mean()
    out["loss"] = loss
    return out


def expected_param_names(cfg):
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.layers):
        pre = f"model.layers.{i}."
        names += [pre + "input_layernorm.weight"]
        if cfg.attention == "mla":
            a = pre + "self_attn."
            if cfg.q_lora_rank:
                names += [a + "q_a_proj.weight", a + "q_a_layernorm.weight",
                          a + "q_b_proj.weight"]
            else:
                names += [a + "q_proj.weight"]
            names += [a + "kv_a_proj_with_mqa.weight", a + "kv_a_layernorm.weight",
                      a + "kv_b_proj.weight", a + "o_proj.weight"]
        else:
            names += [pre + f"self_attn.{p}_proj.weight" for p in "qkvo"]
        if cfg.qkv_bias:
            names += [pre + f"self_attn.{p}_proj.bias" for p in "qkv"]
        if cfg.qk_norm != "none":
            names += [pre + f"self_attn.{p}_norm.weight" for p in "qk"]
        names += [pre + "post_attention_layernorm.weight"]
        if cfg.is_moe(i):
            m = pre + "block_sparse_moe."
            if cfg.has_router:
                names += [m + "gate.weight"]
            if cfg.noise == "shazeer":
                names += [m + "noise.weight"]
            for e in range(cfg.experts):
                names += [f"{m}experts.{e}.{w}.weight" for w in ("w1", "w3", "w2")]
            for j in range(cfg.shared_experts):
                names += [f"{m}shared_experts.{j}.{w}.weight" for w in ("w1", "w3", "w2")]
            if cfg.shared_gate:
                names += [m + "shared_expert_gate.weight"]
        else:
            names += [pre + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    names += ["model.norm.weight"]
    if not cfg.tie_embeddings:
        names += ["lm_head.weight"]
    return names


def noise_from_dump(dump):
    cfg = dump.config
    noise = {}
    for i in cfg.moe_layers():
        if cfg.noise == "shazeer":
            key = f"layers.{i}.eps"
        elif cfg.noise == "jitter":
            key = f"layers.{i}.jitter"
        else:
            continue
        if key not in dump.noise:
            raise KeyError(f"{dump.path}: router.noise={cfg.noise} but no /noise/{key}")
        noise[i] = {key.rsplit(".", 1)[1]: torch.from_numpy(dump.noise[key].astype(np.float64))}
    return noise


def state_from_dump(dump):
    """layer index -> {"expert_bias": float64 (E,)} when the expert bias is in use."""
    cfg = dump.config
    state = {}
    if not cfg.uses_bias:
        return state
    for i in cfg.moe_layers():
        key = f"layers.{i}.expert_bias"
        if key not in dump.state:
            raise KeyError(f"{dump.path}: router.bias_gamma={cfg.bias_gamma:g}, "
                           f"router.expert_bias={cfg.expert_bias} but no /state/{key}")
        b = dump.state[key]
        if b.shape != (cfg.experts,):
            raise ValueError(f"/state/{key} has shape {b.shape}, expected ({cfg.experts},)")
        state[i] = {"expert_bias": torch.from_numpy(b.astype(np.float64))}
    return state


def run_reference(dump):
    """Forward + backward in float64 on a Dump. Returns (outputs, grads, params)."""
    cfg = dump.config
    names = expected_param_names(cfg)
    missing = [n for n in names if n not in dump.params]
    if missing:
        raise KeyError(f"{dump.path}: /params lacks {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing)")
    P = OrderedDict()
    for n, a in dump.params.items():
        P[n] = torch.from_numpy(a.astype(np.float64)).requires_grad_(True)
    tokens = torch.from_numpy(dump.tokens)
    targets = torch.from_numpy(dump.targets)
    if tokens.shape != (cfg.batch_size, cfg.seq_len):
        raise ValueError(f"/batch/tokens shape {tuple(tokens.shape)} != "
                         f"(train.batch_size, model.seq_len) = ({cfg.batch_size}, {cfg.seq_len})")
    out = forward(cfg, P, tokens, targets, noise_from_dump(dump), state_from_dump(dump))
    out["loss"].backward()
    grads = OrderedDict()
    for n, t in P.items():
        grads[n] = t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t)
    return out, grads, P


def reference(path):
    """Load a dump and return (Dump, outputs, grads)."""
    dump = Dump(path)
    out, grads, _ = run_reference(dump)
    return dump, out, grads


# ----------------------------------------------------------------------------------------
# Comparison


def rel_error(c, r):
    """max|c - r| / max(max|r|, 1e-30); inf when shapes differ or c has non-finite values."""
    c = np.asarray(c, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if c.shape != r.shape:
        return float("inf")
    if c.size == 0:
        return 0.0
    if not np.all(np.isfinite(c)):
        return float("inf")
    return float(np.max(np.abs(c - r)) / max(float(np.max(np.abs(r))), 1e-30))


class Comparison:
    """Result of compare(): rel[name] = relative error; exact[name] = (ok, detail)."""

    def __init__(self, path):
        self.path = path
        self.rel = OrderedDict()
        self.exact = OrderedDict()
        self.notes = []
        self.dropped = 0  # assignments the reference drops by capacity
        self.assignments = 0
        self.cfg = None
        self.ref = None  # (outputs, grads) of the reference, for callers that want them

    def worst(self):
        """(name, error) of the worst relative error; an exact mismatch counts as inf."""
        worst = ("-", 0.0)
        for n, e in self.rel.items():
            if not e <= worst[1]:  # also catches nan
                worst = (n, e)
        for n, (ok, _) in self.exact.items():
            if not ok and worst[1] != float("inf"):
                worst = (n, float("inf"))
        return worst

    def failures(self, tol=TOLERANCE):
        bad = [f"{n}: rel err {e:.3e} > {tol:g}" for n, e in self.rel.items() if not e <= tol]
        bad += [f"{n}: {d}" for n, (ok, d) in self.exact.items() if not ok]
        return bad

    def ok(self, tol=TOLERANCE):
        return not self.failures(tol)

    def table(self, tol=TOLERANCE, all_rows=True):
        lines = [f"reference comparison for {self.path}",
                 f"{'quantity':<64} {'rel err':>10}  status"]
        rows = list(self.rel.items())
        n_grads = sum(1 for r in rows if r[0].startswith("grad:"))
        if not all_rows and n_grads > 8:
            lines.append(f"(showing the 8 worst of {n_grads} gradients; --all for every row)")
            rows = [r for r in rows if not r[0].startswith("grad:")] + sorted(
                [r for r in rows if r[0].startswith("grad:")], key=lambda r: -r[1])[:8]
        for n, e in rows:
            lines.append(f"{n:<64} {e:>10.3e}  {'ok' if e <= tol else 'FAIL'}")
        for n, (ok, d) in self.exact.items():
            lines.append(f"{n:<64} {'exact':>10}  {'ok' if ok else 'FAIL'}  {d}")
        for note in self.notes:
            lines.append(f"note: {note}")
        wn, we = self.worst()
        lines.append(f"worst: {wn} = {we:.3e}; reference drops {self.dropped} of "
                     f"{self.assignments} assignments; "
                     f"{'PASS' if self.ok(tol) else 'FAIL'} at tol {tol:g}")
        return "\n".join(lines)


def compare(path):
    """Compare the C outputs stored in a dump with the reference. Returns a Comparison."""
    dump = Dump(path)
    cfg = dump.config
    out, grads, _ = run_reference(dump)
    cmp = Comparison(path)
    cmp.cfg = cfg
    cmp.ref = (out, grads)

    def c_out(key):
        if key not in dump.out:
            cmp.rel[key] = float("inf")
            cmp.notes.append(f"/out/{key} missing from the dump")
            return None
        return dump.out[key]

    for key in ("loss", "ce"):
        c = c_out(key)
        if c is not None:
            cmp.rel[key] = rel_error(np.asarray(c).reshape(()), out[key].detach().numpy())
    aux = ["lb", "z"] + (["importance", "load"] if cfg.noise == "shazeer" else [])
    for key in aux:
        if key in out:
            c = c_out(key)
            if c is not None:
                cmp.rel[key] = rel_error(np.asarray(c).reshape(-1), out[key].detach().numpy())
        elif key in dump.out:
            # e.g. lb under expert choice, lb and z under hash routing: must not be there
            cmp.exact[f"absent:{key}"] = (False, f"/out/{key} present, but the reference "
                                                 "has no such loss in this configuration")
    if out["routers"] and not cfg.has_router:
        gates = [n for n in dump.params if n.endswith("block_sparse_moe.gate.weight")]
        cmp.exact["absent:gate.weight"] = (
            not gates, "no router weights" if not gates else
            f"hash routing but /params has {gates[:2]}")
    c = c_out("logits")
    if c is not None:
        cmp.rel["logits"] = rel_error(c, out["logits"].detach().numpy())

    for r in out["routers"]:
        i = r["layer"]
        ref_topk = r["topk"].numpy()
        ref_keep = r["keep"].numpy().astype(np.int64)
        cmp.dropped += int((ref_keep == 0).sum())
        cmp.assignments += ref_keep.size
        for what, ref in (("topk", ref_topk), ("keep", ref_keep)):
            key = f"{what}/layers.{i}"
            if key not in dump.out:
                cmp.exact[key] = (False, f"/out/{key} missing from the dump")
                continue
            c = np.asarray(dump.out[key]).astype(np.int64)
            if c.shape != ref.shape:
                cmp.exact[key] = (False, f"shape {c.shape} != reference {ref.shape}")
                continue
            diff = np.argwhere(c != ref)
            if len(diff) == 0:
                detail = f"{ref.shape[0]}x{ref.shape[1]} equal"
                if what == "keep":
                    detail += f", {int((ref == 0).sum())} dropped"
                cmp.exact[key] = (True, detail)
            else:
                n, j = diff[0]
                detail = (f"{len(diff)} entries differ; first at token {n} choice {j}: "
                          f"C {c[n].tolist()} vs reference {ref[n].tolist()}")
                if r["margin"] != float("inf"):
                    detail += (f"; smallest gap at the selection boundary in the "
                               f"reference {r['margin']:.3e}")
                cmp.exact[key] = (False, detail)

    for n, g in grads.items():
        key = "grad:" + n
        if n not in dump.grads:
            cmp.rel[key] = float("inf")
            cmp.notes.append(f"/grads/{n} missing from the dump")
            continue
        cmp.rel[key] = rel_error(dump.grads[n], g.numpy())
    extra = sorted(set(dump.grads) - set(grads))
    if extra:
        cmp.notes.append(f"/grads has tensors without a parameter: {extra[:5]}")
    unknown = sorted(set(dump.params) - set(expected_param_names(cfg)))
    if unknown:
        cmp.notes.append(f"/params the reference does not use (gradient taken as 0): "
                         f"{unknown[:5]}")
    return cmp


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        print("usage: /usr/bin/python3 tests/reference/torch_moe.py DUMP.h5 [--all]",
              file=sys.stderr)
        return 2
    cmp = compare(args[0])
    print(cmp.table(all_rows="--all" in argv))
    return 0 if cmp.ok() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
