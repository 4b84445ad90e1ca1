#!/usr/bin/env python3
"""The GPU peer of `make bench-gpu-peer`: a straightforward PyTorch version of a moe.c
config's model, trained on the GPU.

The model of bench/torch_ref.py (same shapes, routing, capacity and pooled aux losses),
on CUDA under bf16 autocast, the way a user would write it: matmuls in bf16, the router's
logits and softmax in fp32, attention through F.scaled_dot_product_attention, experts
looped in Python with index_select to gather each expert's rows and index_add to combine
them. AdamW, random tokens. With --compile the model runs under torch.compile (the
expert loop's data-dependent shapes break the graph there, as they would for a user).
Prints the fastest step's tokens/s:

    torch_gpu_ref tokens/s: 1234

Usage: python3 bench/torch_gpu_ref.py CONFIG.ini [--steps N] [--compile] [--device cpu]
Needs PyTorch 2 with CUDA (the GPU machine's own python3, not Debian's CPU build).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref import MoeModel, read_config, step_loss  # noqa: E402


class GpuMoeModel(MoeModel):
    def __init__(self, c):
        super().__init__(c)
        # Buffers, so that .to("cuda") moves the RoPE tables with the weights.
        cos, sin = self.cos, self.sin
        del self.cos, self.sin
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def rope(self, x):  # (B, heads, T, D), Hugging Face's rotate-half
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        cos = self.cos[: x.shape[2]].to(x.dtype)
        sin = self.sin[: x.shape[2]].to(x.dtype)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def moe(self, x, b):
        """y (N, C) and the router statistics the aux losses need; router in fp32."""
        c = self.c
        N, E, k = x.shape[0], c.experts, c.top_k
        with torch.autocast(x.device.type, enabled=False):
            logits = x.float() @ b.gate.float().t()  # (N, E)
            probs = torch.softmax(logits, dim=-1)
        top, idx = probs.topk(k, dim=-1)
        gates = top / top.sum(-1, keepdim=True) if c.renorm else top
        flat = idx.t().reshape(-1)  # (k*N), choice-major: the position policy's order
        onehot = F.one_hot(flat, E)
        if c.capacity_factor > 0:
            cap = math.ceil(k * N * c.capacity_factor / E)
            keep = (onehot.cumsum(0) * onehot).sum(-1) <= cap
        else:
            keep = torch.ones_like(flat, dtype=torch.bool)
        token = torch.arange(N, device=x.device).repeat(k)
        gate = gates.t().reshape(-1)
        y = torch.zeros_like(x, dtype=torch.float32)
        for e in range(E):
            sel = ((flat == e) & keep).nonzero().squeeze(1)
            rows = token.index_select(0, sel)
            xe = x.index_select(0, rows)
            h = F.silu(xe @ b.w1[e].t()) * (xe @ b.w3[e].t())
            out = (h @ b.w2[e].t()).float() * gate.index_select(0, sel)[:, None]
            y = y.index_add(0, rows, out)
        lse = torch.logsumexp(logits, dim=-1)
        return y.to(x.dtype), onehot.sum(0).detach(), probs.mean(0), (lse * lse).mean()


class _Compiled:
    """The compiled module where step_loss expects the model (it reads .c and calls it)."""

    def __init__(self, fn, c):
        self.fn, self.c = fn, c

    def __call__(self, *a):
        return self.fn(*a)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch_gpu_ref: no CUDA device for PyTorch")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    c = read_config(args.config)
    model = GpuMoeModel(c).to(dev)
    run = _Compiled(torch.compile(model), c) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    tokens_per_step = c.batch_size * c.seq_len * c.grad_accum
    warm = 2 if args.compile else 1
    best = math.inf
    for step in range(args.steps + warm):
        batches = [(torch.randint(c.vocab, (c.batch_size, c.seq_len), device=dev),
                    torch.randint(c.vocab, (c.batch_size, c.seq_len), device=dev))
                   for _ in range(c.grad_accum)]
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = step_loss(run, batches)
        loss.backward()
        opt.step()
        sync()
        if step >= warm:
            best = min(best, time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"torch_gpu_ref: {args.config}, torch {torch.__version__}, {name}, bf16 autocast"
          f"{', torch.compile' if args.compile else ''}, fastest of {args.steps} steps: "
          f"{best:.3f} s")
    print(f"torch_gpu_ref tokens/s: {tokens_per_step / best:.0f}")


if __name__ == "__main__":
    main()
