"""DeepSpeed wiring: the engine config, optimizer groups, LR schedule and gathering full weights.

All parallelism lives here; the model stays a plain nn.Module. The DeepSpeed config is composed
from `conf/deepspeed/*.yaml` (ZeRO stage and its options) and `conf/train/*.yaml` (batch sizes,
clipping), so each default has one home.
"""

from __future__ import annotations

import math
import os
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn


def backend() -> str:
    """gloo on CPU (DS_ACCELERATOR=cpu or no CUDA), nccl on GPUs."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def ds_config(zero: dict[str, Any], train: dict[str, Any], world_size: int) -> dict[str, Any]:
    cfg = {
        "train_micro_batch_size_per_gpu": train["micro_batch"],
        "gradient_accumulation_steps": train["grad_accum"],
        "train_batch_size": train["micro_batch"] * train["grad_accum"] * world_size,
        "gradient_clipping": train["grad_clip"],
        "steps_per_print": 10**9,  # our own logging reports progress
        "wall_clock_breakdown": False,
        **zero,
    }
    if cfg.get("bf16", {}).get("enabled") and backend() == "gloo":
        cfg["bf16"] = {"enabled": False}  # fp32 on CPU
    return cfg


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; leave norms gains, biases and 1-D embeddings undecayed."""
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters()):
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def build_engine(model: nn.Module, zero: dict[str, Any], train: dict[str, Any], world_size: int):
    opt = torch.optim.AdamW(
        param_groups(model, train["weight_decay"]), lr=train["lr"], betas=tuple(train["betas"]), eps=1e-8
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train["warmup"], train["steps"]))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(zero, train, world_size)
    )
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Consolidated fp32 CPU weights on rank 0 (None elsewhere). Collective: every rank calls it."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = {n: p.detach().to("cpu", torch.float32).clone() for n, p in module.named_parameters()} if dist.get_rank() == 0 else None
        return sd
    if dist.get_rank() != 0:
        return None
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in module.named_parameters()}
