"""moe.c's AdamW (optim/) against torch.optim.AdamW, in the fp32 and the fp64 build.

Each case writes a parameter layout, initial parameters and ten steps of gradients to an
HDF5 file, runs the C optimizer on it through build/tests/optim_ref_{f32,f64} (see
tests/optim_ref.c), and replays the same steps with torch.optim.AdamW (foreach=False),
whose param groups carry the weight decay and learning rate our documentation promises
(model/param_groups.h, the rules the trainer hands AdamW), with the learning rate
schedule of optim/schedule.h written out here and clipping by global norm done by hand
(scale = min(1, clip / norm), as documented: torch's clip_grad_norm_ adds 1e-6 to the
norm). The C run is a pure function of its input file, so cases are independent and
order-free.

Asserts, per case: parameters after every step, final m and v of every trainable tensor,
the pre-clip norms and learning rates within max relative error 1e-5 (fp32) or 1e-6 (fp64);
frozen tensors bit-identical and holding no state.

Run: /usr/bin/python3 -m pytest tests/reference/test_adamw_torch.py  (from the repo root)
"""
import math
import os
import subprocess

import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# make SANITIZE=1 test builds elsewhere (Makefile) and says where.
BUILD = os.environ.get("MOE_BUILD", os.path.join(ROOT, "build"))
BUILDS = {  # precision: (helper binary, numpy dtype, torch dtype, tolerance)
    "f32": ("optim_ref_f32", np.float32, torch.float32, 1e-5),
    "f64": ("optim_ref_f64", np.float64, torch.float64, 1e-6),
}
# ParamKind values, in model/layout.h's order.
KINDS = ["embed", "norm", "attn", "router", "expert", "shared", "dense", "head"]
STEPS = 10

# (kind, rows, cols, trainable): every kind, vectors and matrices, frozen tensors in the
# middle of trainable runs (expert 1 and a norm), a router pair (gate and noise).
TENSORS = [
    ("embed", 11, 6, True), ("norm", 6, 0, True), ("attn", 18, 6, True),
    ("attn", 6, 6, True), ("norm", 6, 0, False), ("router", 4, 6, True),
    ("router", 4, 6, True), ("expert", 5, 6, True), ("expert", 5, 6, True),
    ("expert", 6, 5, True), ("expert", 5, 6, False), ("expert", 5, 6, False),
    ("expert", 6, 5, False), ("shared", 3, 6, True), ("dense", 5, 6, True),
    ("norm", 6, 0, True), ("head", 11, 6, True),
]

# Optimizer keys per case, all set explicitly so a case does not depend on the defaults.
CASES = {
    # Default groups, router at twice the lr, clipping active on some steps and not
    # others, gradients halved (accumulation over two micro-batches).
    "groups_clip": dict(
        keys=dict(lr=1e-2, min_lr_ratio=0.1, warmup_steps=3, beta1=0.9, beta2=0.95,
                  eps=1e-8, weight_decay=0.1, grad_clip=1.0, decay_norms=False,
                  decay_embeddings=False, decay_router=False, router_lr_mult=2.0),
        grad_scale=0.5, total_steps=8),
    # Every tensor decays, no clipping, slower router, a larger eps, no warmup.
    "decay_all_noclip": dict(
        keys=dict(lr=5e-3, min_lr_ratio=0.2, warmup_steps=0, beta1=0.8, beta2=0.99,
                  eps=1e-6, weight_decay=0.3, grad_clip=0.0, decay_norms=True,
                  decay_embeddings=True, decay_router=True, router_lr_mult=0.5),
        grad_scale=1.0, total_steps=12),
}
# Per-step gradient magnitudes: the scaled global norm crosses grad_clip = 1 both ways.
GRAD_STD = [0.02, 0.5, 0.05, 1.0, 0.03, 0.3, 0.08, 2.0, 0.04, 0.6]


def lr_at(k, step, total):
    """optim/schedule.h: linear warmup, cosine to lr * min_lr_ratio at total, then flat."""
    lr, warm, lo = k["lr"], k["warmup_steps"], k["lr"] * k["min_lr_ratio"]
    if step < warm:
        return lr * (step + 1) / warm
    if step >= total:
        return lo
    return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


def decays(k, kind, cols):
    """model/param_groups.h: matrices decay except embed / router unless enabled; vectors
    only with decay_norms."""
    if cols == 0:
        return k["decay_norms"]
    if kind == "embed":
        return k["decay_embeddings"]
    if kind == "router":
        return k["decay_router"]
    return True


def numel(rows, cols):
    return rows * (cols or 1)


def rel_error(c, r):
    """max|c - r| / max|r| over a tensor (inf on a shape mismatch or non-finite c)."""
    c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
    if c.shape != r.shape or not np.all(np.isfinite(c)):
        return float("inf")
    return float(np.max(np.abs(c - r)) / max(float(np.max(np.abs(r))), 1e-30))


def make_inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    total = sum(numel(r, c) for _, r, c, _ in TENSORS)
    params = rng.uniform(-1, 1, total).astype(dtype)
    grads = np.stack([rng.normal(0, s, total) for s in GRAD_STD]).astype(dtype)
    return params, grads


def run_c(tmp_path, binary, params, grads, case):
    path = os.path.join(BUILD, "tests", binary)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it first (`make build/tests/{binary}` in "
                    f"{ROOT})", pytrace=False)
    src, out = tmp_path / "in.h5", tmp_path / "out.h5"
    with h5py.File(src, "w") as f:
        f["kind"] = np.array([KINDS.index(t[0]) for t in TENSORS], np.int32)
        f["rows"] = np.array([t[1] for t in TENSORS], np.int32)
        f["cols"] = np.array([t[2] for t in TENSORS], np.int32)
        f["trainable"] = np.array([t[3] for t in TENSORS], np.int32)
        f["params"] = params.astype(np.float64)
        f["grads"] = grads.astype(np.float64)
        f["grad_scale"] = np.float64(case["grad_scale"])
        f["total_steps"] = np.int64(case["total_steps"])
    words = [f"optim.{k}={str(v).lower() if isinstance(v, bool) else repr(v)}"
             for k, v in case["keys"].items()]
    run = subprocess.run([path, str(src), str(out)] + words, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    with h5py.File(out, "r") as f:
        return {
            "params": f["params"][()], "norm": f["norm"][()], "lr": f["lr"][()],
            "m": {int(i): f["m"][i][()] for i in f["m"]},
            "v": {int(i): f["v"][i][()] for i in f["v"]},
            "real_bytes": int(f["real_bytes"][()]), "state_bytes": int(f["state_bytes"][()]),
            "trainable_params": int(f["trainable_params"][()]),
        }


def run_torch(params, grads, case, tdtype):
    k = case["keys"]
    tensors, groups, off = [], {}, 0
    for kind, rows, cols, train in TENSORS:
        n = numel(rows, cols)
        shape = (rows, cols) if cols else (rows,)
        p = torch.nn.Parameter(torch.tensor(params[off:off + n], dtype=tdtype).reshape(shape),
                               requires_grad=train)
        tensors.append((p, off, n, train))
        if train:
            key = (decays(k, kind, cols), k["router_lr_mult"] if kind == "router" else 1.0)
            groups.setdefault(key, []).append(p)
        off += n
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": k["weight_decay"] if decay else 0.0, "mult": mult}
         for (decay, mult), ps in groups.items()],
        lr=k["lr"], betas=(k["beta1"], k["beta2"]), eps=k["eps"], foreach=False)
    history, norms, lrs = [], [], []
    for s in range(STEPS):
        for p, o, n, train in tensors:
            if train:
                p.grad = torch.tensor(grads[s, o:o + n], dtype=tdtype).reshape(p.shape) \
                    * case["grad_scale"]
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum())
                             for p, _, _, t in tensors if t))
        if k["grad_clip"] > 0 and norm > k["grad_clip"]:
            for p, _, _, t in tensors:
                if t:
                    p.grad.mul_(k["grad_clip"] / norm)
        lr = lr_at(k, s, case["total_steps"])
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"]
        opt.step()
        history.append(np.concatenate([p.detach().reshape(-1).numpy() for p, *_ in tensors]))
        norms.append(norm)
        lrs.append(lr)
    states = {i: opt.state[p] for i, (p, _, _, t) in enumerate(tensors) if t}
    return {"params": np.stack(history), "norm": np.array(norms), "lr": np.array(lrs),
            "m": {i: st["exp_avg"].reshape(-1).numpy() for i, st in states.items()},
            "v": {i: st["exp_avg_sq"].reshape(-1).numpy() for i, st in states.items()}}


@pytest.mark.parametrize("precision", sorted(BUILDS))
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_adamw_matches_torch(tmp_path, precision, case_name):
    binary, ndtype, tdtype, tol = BUILDS[precision]
    case = CASES[case_name]
    params, grads = make_inputs(ndtype)
    c = run_c(tmp_path, binary, params, grads, case)
    t = run_torch(params, grads, case, tdtype)

    assert c["real_bytes"] == np.dtype(ndtype).itemsize
    trainable = [i for i, x in enumerate(TENSORS) if x[3]]
    n_train = sum(numel(TENSORS[i][1], TENSORS[i][2]) for i in trainable)
    assert c["trainable_params"] == n_train
    assert c["state_bytes"] == 2 * c["real_bytes"] * n_train
    assert sorted(c["m"]) == trainable and sorted(c["v"]) == trainable, "state of frozen"

    if case["keys"]["grad_clip"] > 0:  # the case must exercise both sides of the clip
        clipped = t["norm"] > case["keys"]["grad_clip"]
        assert clipped.any() and not clipped.all(), t["norm"]

    errors = {"lr": rel_error(c["lr"], t["lr"]), "norm": rel_error(c["norm"], t["norm"])}
    off = 0
    for i, (kind, rows, cols, train) in enumerate(TENSORS):
        n = numel(rows, cols)
        cp = c["params"][:, off:off + n]
        if train:
            errors[f"params[{i}] {kind}"] = rel_error(cp, t["params"][:, off:off + n])
            errors[f"m[{i}] {kind}"] = rel_error(c["m"][i], t["m"][i])
            errors[f"v[{i}] {kind}"] = rel_error(c["v"][i], t["v"][i])
        else:
            assert np.array_equal(cp, np.tile(params[off:off + n], (STEPS, 1))), \
                f"frozen tensor {i} ({kind}) changed"
        off += n
    bad = {k: e for k, e in errors.items() if not e <= tol}
    worst = max(errors, key=errors.get)
    assert not bad, f"relative error above {tol:g}: {bad}"
    print(f"{case_name} {precision}: worst relative error {errors[worst]:.2e} ({worst})")
