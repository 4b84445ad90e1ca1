"""`moe plan CONFIG [key=value ...]`: the memory plan of a run, computed without allocating
it, equals what `moe train` allocates and prints at start-up for the same config (every
figure: parameters, gradients, AdamW state of what trains, activations and their
gradients), for a DeepSeek-V3-shaped model trained whole and with only some experts
trainable; and it counts DeepSeek-V2-Lite's parameters as published (15.7B) without
allocating them."""
import re

from test_hf import MODEL, run_moe, text

CONFIG = MODEL + ["model.d_model=64", "model.expert_ffn_dim=96", "model.attention=mla", "model.q_lora_rank=12", "model.kv_lora_rank=16",
                  "model.qk_nope_dim=8", "model.qk_rope_dim=4", "model.v_head_dim=8",
                  "model.layers=3", "model.first_dense_layers=1", "model.ffn_dim=40",
                  "model.experts=16", "model.shared_experts=1", "model.shared_ffn_dim=24",
                  "router.score=sigmoid", "router.expert_bias=true", "router.groups=4",
                  "router.topk_groups=2", "router.group_score=top2"]
FIGURES = ("parameters", "gradients", "optimizer state", "activations 1 x",
           "their gradients")


def figures(line, unit):
    return [float(re.search(rf"{name} ([0-9.]+) {unit}", line).group(1)) for name in FIGURES]


def test_plan_equals_the_start_up_allocation(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(text(20000))
    cfg = tmp_path / "run.ini"
    cfg.write_text(f"[domain text]\nkind = text\ntrain = {data}\nval = {data}\n")
    for k, train in enumerate(["all", "layers.*.experts.1,layers.*.experts.6"]):
        words = CONFIG + [f"finetune.train={train}"]
        plan = run_moe(["plan", cfg] + words).stdout
        run_moe(["train", cfg, "train.steps=1", f"train.out_dir={tmp_path}",
                 f"train.name=run{k}"] + words)
        startup = (tmp_path / f"run{k}" / "startup.txt").read_text()
        planned = figures(plan, "MB")
        assert figures(next(l for l in startup.splitlines() if l.startswith("memory")),
                       "MB") == planned, (plan, startup)
        count = r"(\d+) trainable params"
        assert re.search(count, plan).group(1) == re.search(count, startup).group(1)
        assert planned[0] > 1 and planned[3] > 1, plan   # figures of some size
        if k:   # AdamW state for two experts of sixteen per MoE layer
            assert planned[2] < planned[0] / 2, plan


def test_plan_counts_deepseek_v2_lite_without_allocating_it():
    run = run_moe(["plan", "configs/deepseek-v2-lite.ini", "finetune.train=experts"])
    assert "15.71B params" in run.stdout and "parameters 62825.9 MB" in run.stdout, run.stdout
