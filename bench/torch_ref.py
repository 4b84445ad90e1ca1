#!/usr/bin/python3
"""The CPU peer of `make bench-peer`: trains a moe.c config's model in PyTorch.

Same shapes and the same routing as moe.c (RMSNorm, RoPE, causal attention, softmax
router, top-k with renormalised gates, capacity ceil(k*N*cf/E) per micro-batch with the
`position` drop policy, or dropless; SwiGLU experts; load-balancing and z losses pooled
over the micro-batches of an optimizer step as router.aux_scope = batch does), in
float32, with dense PyTorch ops: index_select to gather each expert's rows, index_add
to combine them. AdamW, random tokens, no data files. Prints the fastest step's tokens/s:

    torch_ref tokens/s: 1234

Usage: /usr/bin/python3 bench/torch_ref.py CONFIG.ini [--steps N] [--threads N]
           [--wait-policy PASSIVE|ACTIVE] [--dropless] [--compile]
--dropless sets router.capacity_factor = 0 (equal work with moe.c's dropless run).
--compile runs the dense parts of the forward through torch.compile (torch 2): each
layer's norms, attention and residual add, and the head with its loss. The MoE part, whose
shapes depend on the routing (nonzero()), runs eager between them: compiling the whole
forward breaks its graph there and inside the layer loop, where torch.compile gives up on
the frame. A torch without torch.compile exits with status 3.
Warm-up steps run until two in a row are within 5% of each other (at most 10), then
--steps timed steps. Any python with torch runs it (Debian's python3-torch 1.13 lives in
/usr/bin/python3).
"""
import argparse
import configparser
import logging
import math
import os
import statistics
import sys
import time


def early_option(name, default):
    """An option that must take effect before torch (and its libgomp) loads."""
    for i, a in enumerate(sys.argv[:-1]):
        if a == name:
            return sys.argv[i + 1]
    return default


# The OpenMP wait policy suits one torch and not another: spinning threads starve Debian
# torch 1.13's OpenBLAS pthreads on 2 cores (a small step took 34 s instead of 5 s), while
# a current torch is faster with ACTIVE. bench --peer runs both and keeps the faster.
os.environ["OMP_WAIT_POLICY"] = early_option("--wait-policy", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def read_config(path):
    """The [model] [router] [train] [optim] keys this model needs, with moe.c's defaults."""
    ini = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    ini.read(path)

    def get(section, key, conv, default):
        return conv(ini.get(section, key, fallback=str(default)))

    def boolean(s):
        return s.strip().lower() in ("true", "1", "yes", "on")

    c = argparse.Namespace()
    c.layers = get("model", "layers", int, 2)
    c.d_model = get("model", "d_model", int, 64)
    c.heads = get("model", "heads", int, 4)
    c.kv_heads = get("model", "kv_heads", int, 4)
    c.vocab = get("model", "vocab", int, 256)
    c.seq_len = get("model", "seq_len", int, 64)
    c.experts = get("model", "experts", int, 4)
    c.ffn = get("model", "expert_ffn_dim", int, 64)
    c.tie = get("model", "tie_embeddings", boolean, "true")
    c.rope_theta = get("model", "rope_theta", float, 10000)
    c.norm_eps = get("model", "norm_eps", float, 1e-5)
    c.init_std = get("model", "init_std", float, 0.02)
    c.top_k = get("router", "top_k", int, 2)
    c.renorm = get("router", "renorm", boolean, "true")
    c.capacity_factor = get("router", "capacity_factor", float, 0)
    c.aux_coef = get("router", "aux_coef", float, 0.01)
    c.z_coef = get("router", "z_coef", float, 0.001)
    c.batch_size = get("train", "batch_size", int, 8)
    c.grad_accum = get("train", "grad_accum", int, 1)
    c.lr = get("optim", "lr", float, 1e-3)
    c.weight_decay = get("optim", "weight_decay", float, 0.1)
    for section, key, allowed in (("router", "score", "softmax"), ("router", "noise", "none"),
                                  ("router", "select", "topk"),
                                  ("router", "drop_policy", "position"),
                                  ("model", "shared_experts", "0"), ("model", "moe_every", "1")):
        value = ini.get(section, key, fallback=allowed)
        if value != allowed:
            raise SystemExit(f"torch_ref: {section}.{key} = {value}: only {allowed} is modelled")
    return c


class MoeModel(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        C, H, KV, D = c.d_model, c.heads, c.kv_heads, c.d_model // c.heads
        out_std = c.init_std / math.sqrt(2 * c.layers)

        def param(*shape, std=c.init_std):
            return torch.nn.Parameter(torch.randn(*shape) * std)

        self.embed = param(c.vocab, C)
        self.head = None if c.tie else param(c.vocab, C)
        self.norm = torch.nn.Parameter(torch.ones(C))
        self.blocks = torch.nn.ModuleList()
        for _ in range(c.layers):
            b = torch.nn.Module()
            b.ln1 = torch.nn.Parameter(torch.ones(C))
            b.ln2 = torch.nn.Parameter(torch.ones(C))
            b.wqkv = param((H + 2 * KV) * D, C)
            b.wo = param(C, H * D, std=out_std)
            b.gate = param(c.experts, C)
            b.w1 = param(c.experts, c.ffn, C)
            b.w3 = param(c.experts, c.ffn, C)
            b.w2 = param(c.experts, C, c.ffn, std=out_std)
            self.blocks.append(b)
        half = D // 2
        inv = c.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
        angle = torch.arange(c.seq_len, dtype=torch.float64)[:, None] * inv[None, :]
        self.cos = torch.cos(angle).float()  # (T, D/2)
        self.sin = torch.sin(angle).float()
        self.kept = self.routed = 0  # assignments kept by capacity, of those routed
        mask = torch.ones(c.seq_len, c.seq_len, dtype=torch.bool).triu(1)
        self.register_buffer("mask", mask)

    def rmsnorm(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c.norm_eps) * w

    def rope(self, x):  # (B, heads, T, D), Hugging Face's rotate-half
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        cos, sin = self.cos[: x.shape[2]], self.sin[: x.shape[2]]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def attention(self, x, b):
        c = self.c
        B, T, C = x.shape
        H, KV, D = c.heads, c.kv_heads, C // c.heads
        qkv = (x @ b.wqkv.t()).view(B, T, H + 2 * KV, D).transpose(1, 2)
        q, k, v = qkv[:, :H], qkv[:, H : H + KV], qkv[:, H + KV :]
        q, k = self.rope(q), self.rope(k)
        if KV != H:
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
        return self.attend(q, k, v).transpose(1, 2).reshape(B, T, H * D) @ b.wo.t()

    def attend(self, q, k, v):  # (B, H, T, D) each: causal softmax attention
        T = q.shape[2]
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        p = torch.softmax(s.masked_fill(self.mask[:T, :T], float("-inf")), dim=-1)
        return p @ v

    def moe(self, x, b):
        """y (N, C) and the router statistics the aux losses need."""
        c = self.c
        N, E, k = x.shape[0], c.experts, c.top_k
        logits = x @ b.gate.t()  # (N, E)
        probs = torch.softmax(logits, dim=-1)
        top, idx = probs.topk(k, dim=-1)  # (N, k)
        gates = top / top.sum(-1, keepdim=True) if c.renorm else top
        # position policy: every first choice before any second, then earlier tokens
        flat = idx.t().reshape(-1)  # (k*N), choice-major
        onehot = F.one_hot(flat, E)
        if c.capacity_factor > 0:
            cap = math.ceil(k * N * c.capacity_factor / E)
            keep = ((onehot.cumsum(0) * onehot).sum(-1) <= cap)
        else:
            keep = torch.ones_like(flat, dtype=torch.bool)
        token = torch.arange(N).repeat(k)
        gate = gates.t().reshape(-1)
        y = torch.zeros_like(x)
        for e in range(E):
            sel = ((flat == e) & keep).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            rows = token.index_select(0, sel)
            xe = x.index_select(0, rows)
            h = F.silu(xe @ b.w1[e].t()) * (xe @ b.w3[e].t())
            y = y.index_add(0, rows, (h @ b.w2[e].t()) * gate.index_select(0, sel)[:, None])
        self.kept += int(keep.sum())
        self.routed += keep.numel()
        counts = onehot.sum(0).detach()  # before capacity
        lse = torch.logsumexp(logits, dim=-1)
        return y, counts, probs.mean(0), (lse * lse).mean()

    def forward(self, tokens, targets):
        B, T = tokens.shape
        x = self.embed[tokens]
        stats = []
        for b in self.blocks:
            x, h = self.attention_block(x, b)
            y, counts, pmean, z = self.moe(h.view(B * T, -1), b)
            x = x + y.view(B, T, -1)
            stats.append((counts, pmean, z))
        return self.lm_loss(x, targets), stats

    def attention_block(self, x, b):
        """The residual stream after attention, and the MoE's normalised input."""
        x = x + self.attention(self.rmsnorm(x, b.ln1), b)
        return x, self.rmsnorm(x, b.ln2)

    def lm_loss(self, x, targets):
        logits = self.rmsnorm(x, self.norm) @ (self.embed if self.head is None else self.head).t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def step_loss(model, batches):
    """Total loss of one optimizer step, aux losses pooled over its micro-batches."""
    c = model.c
    E, k, n_tok = c.experts, c.top_k, len(batches) * batches[0][0].numel()
    ce, per_layer = 0.0, None
    for tokens, targets in batches:
        l, stats = model(tokens, targets)
        ce = ce + l / len(batches)
        per_layer = stats if per_layer is None else [
            (a[0] + s[0], a[1] + s[1], a[2] + s[2]) for a, s in zip(per_layer, stats)]
    # per layer E / (k N) sum_i count_i P_i over all N tokens (1.0 when balanced)
    lb = sum(E / (k * n_tok) * (counts.float() * pm / len(batches)).sum()
             for counts, pm, _ in per_layer) / len(per_layer)
    z = sum(zs / len(batches) for _, _, zs in per_layer) / len(per_layer)
    return ce + c.aux_coef * lb + c.z_coef * z


def settle(run_step, limit=10, tolerance=0.05):
    """Warm-up steps until two in a row take times within tolerance; returns how many ran."""
    last = run_step()
    for n in range(2, limit + 1):
        now = run_step()
        if abs(now - last) <= tolerance * min(now, last):
            return n
        last = now
    return limit


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--wait-policy", choices=("PASSIVE", "ACTIVE"), default="PASSIVE")
    ap.add_argument("--dropless", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.compile and not hasattr(torch, "compile"):
        print(f"torch_ref: torch {torch.__version__} has no torch.compile")
        sys.exit(3)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = read_config(args.config)
    if args.dropless:
        c.capacity_factor = 0.0
    model = MoeModel(c)
    if args.compile:  # the dense parts; the MoE's shapes depend on the routing (nonzero())
        # Inductor's C++ builder warns that a CUDA wheel finds no CUDA runtime: noise here.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        model.attention_block = torch.compile(model.attention_block)
        model.lm_loss = torch.compile(model.lm_loss)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    tokens_per_step = c.batch_size * c.seq_len * c.grad_accum

    def run_step():
        batches = [(torch.randint(c.vocab, (c.batch_size, c.seq_len)),
                    torch.randint(c.vocab, (c.batch_size, c.seq_len)))
                   for _ in range(c.grad_accum)]
        model.kept = model.routed = 0
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_loss(model, batches).backward()
        opt.step()
        return time.perf_counter() - t0

    warm = settle(run_step)
    times, kept = [], []
    for _ in range(args.steps):
        times.append(run_step())
        kept.append(model.kept / model.routed)
    best = min(times)
    print(f"torch_ref: {args.config}{' (dropless)' if args.dropless else ''}, torch "
          f"{torch.__version__} {'torch.compile' if args.compile else 'eager'}, {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}, {warm} warm-up steps, fastest of {args.steps} "
          f"steps: {best:.3f} s (median {statistics.median(times):.3f} s), "
          f"{100 * kept[times.index(best)]:.1f}% of assignments kept by capacity")
    print(f"torch_ref tokens/s: {tokens_per_step / best:.0f}")


if __name__ == "__main__":
    main()
