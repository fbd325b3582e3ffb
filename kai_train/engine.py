"""DeepSpeed wiring: the engine config, optimizer groups, LR schedule and gathering full weights.

All parallelism lives here; the model stays a plain nn.Module. The DeepSpeed config is composed
from `conf/deepspeed/*.yaml` (ZeRO stage and its options) and `conf/train/*.yaml` (batch sizes,
clipping), so each default has one home.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from attest.schedule import lr_lambda


def backend() -> str:
    """gloo on CPU (DS_ACCELERATOR=cpu or no CUDA), nccl on GPUs."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def ds_config(zero: dict[str, Any], train: dict[str, Any], world_size: int, load_universal: bool = False) -> dict[str, Any]:
    cfg = {
        "checkpoint": {"load_universal": load_universal},
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


def build_engine(model: nn.Module, zero: dict[str, Any], train: dict[str, Any], world_size: int,
                 load_universal: bool = False):
    opt = torch.optim.AdamW(
        param_groups(model, train["weight_decay"]), lr=train["lr"], betas=tuple(train["betas"]), eps=1e-8
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(train["schedule"], train["warmup"], train["steps"], train["min_lr_ratio"], train["decay_frac"])
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(zero, train, world_size, load_universal)
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


def client_state(step: int, position: int) -> dict[str, Any]:
    """What each DeepSpeed checkpoint carries besides engine state. The universal-checkpoint info
    lets `ds_to_universal` convert it when a run resumes on another world size."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {"step": step, "position": position,
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def saved_world_size(tag_dir: Path) -> int:
    """Data-parallel world size a ZeRO checkpoint was saved with (one optimizer shard per rank)."""
    return len(list(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def prepare_universal(ds_dir: Path, tag: str) -> str:
    """Convert `tag` to a universal checkpoint (rank 0, once) and return the tag to load."""
    out = f"{tag}-universal"
    if dist.get_rank() == 0 and not (ds_dir / out).is_dir():
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(ds_dir / tag), "--output_folder", str(ds_dir / out), "--num_extract_workers", "1"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{ds_dir / tag}: conversion to a universal checkpoint failed:\n{p.stderr[-2000:]}")
    dist.barrier()
    return out


def full_optimizer_state(engine) -> tuple[dict[str, torch.Tensor] | None, int]:
    """Consolidated AdamW moments (`exp_avg/<name>`, `exp_avg_sq/<name>`, fp32 CPU) on rank 0 and the
    optimizer step count. Collective: every rank calls it. This is what a replay starts from."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_optimizer_state(engine)
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            t = safe_get_full_optimizer_state(p, key)
            if dist.get_rank() == 0:
                out[f"{key}/{name}"] = t.detach().to("cpu", torch.float32).clone()
    steps = {int(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameter groups disagree on the step count: {sorted(steps)}")
    return (out if dist.get_rank() == 0 else None), (steps.pop() if steps else 0)


def load_full_optimizer_state(engine, state: dict[str, torch.Tensor], step: int) -> None:
    """Inverse of `full_optimizer_state`: scatter consolidated moments into the ZeRO partitions."""
    from deepspeed.utils import safe_set_full_optimizer_state

    # A fresh engine has no AdamW state yet (torch creates it at the first step): create it as
    # torch would, with the recorded step count, then fill the moments partition by partition.
    for flat in _fp32_partitions(engine):
        engine.optimizer.optimizer.state[flat] = {
            "step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    _link_optimizer_state(engine)
    for name, p in engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, state[f"{key}/{name}"], key)


def _fp32_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per parameter group (ZeRO 1/2 and 3 name them differently)."""
    z = engine.optimizer
    flats = getattr(z, "single_partition_of_fp32_groups", None) or getattr(z, "fp32_partitioned_groups_flat", None)
    if flats is None:
        raise RuntimeError(f"unsupported DeepSpeed optimizer wrapper {type(z).__name__}")
    return list(flats)


def _link_optimizer_state(engine) -> None:
    """ZeRO 1/2 link each parameter to its optimizer-state fragments once, after the first group's
    step, so groups stepped later (our no-decay group) stay unlinked. Link them all again."""
    z = engine.optimizer
    if hasattr(z, "_hp_optimizer_states_linked"):
        z._hp_optimizer_states_linked = False
        z._lazy_init_hp_params_optimizer_state()
