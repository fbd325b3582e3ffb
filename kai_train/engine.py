"""DeepSpeed wiring: the engine config, optimizer groups, the LR schedule, loading optimizer state.

All parallelism lives here; the model stays a plain nn.Module. The DeepSpeed config is composed
from `kai_train/conf/deepspeed/*.yaml` (ZeRO stage and its options) and `kai_train/conf/train/*.yaml` (batch sizes,
clipping), so each default has one home.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
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


def init_distributed() -> None:
    """DeepSpeed's process group (gloo on CPU, NCCL on GPUs), without its shared-memory collective op:
    DeepSpeed uses that op only for inference all-reduce, never in training, yet builds it with a C++
    compiler at the first start on CPU (minutes). Training and replay collectives are
    torch.distributed's either way, so skipping it changes no number."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
    deepspeed.init_distributed(dist_backend=backend())


def ds_config(zero: dict[str, Any], train: dict[str, Any], world_size: int) -> dict[str, Any]:
    cfg = {
        "train_micro_batch_size_per_gpu": train["micro_batch"],
        "gradient_accumulation_steps": train["grad_accum"],
        "train_batch_size": train["micro_batch"] * train["grad_accum"] * world_size,
        "gradient_clipping": train["grad_clip"],
        "steps_per_print": 10**9,  # our own logging reports progress
        "wall_clock_breakdown": False,
        **{k: v for k, v in zero.items() if k != "bf16_on_cpu"},
    }
    if cfg.get("bf16", {}).get("enabled") and backend() == "gloo" and not zero.get("bf16_on_cpu"):
        cfg["bf16"] = {"enabled": False}  # fp32 on CPU ranks, unless asked for (DeepSpeed's CPU accelerator has bf16)
    return cfg


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; leave norms gains, biases and 1-D embeddings undecayed. Under expert
    parallelism the experts' parameters go to DeepSpeed's MoE groups (kai_train.expert_parallel)."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters()):
        dims = len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3 partitions are flat
        (decay if dims >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if any(is_moe_param(p) for p in decay + no_decay):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def build_engine(model: nn.Module, zero: dict[str, Any], train: dict[str, Any], world_size: int):
    opt = torch.optim.AdamW(
        param_groups(model, train["weight_decay"]), lr=train["lr"], betas=tuple(train["betas"]), eps=1e-8
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(train["schedule"], train["warmup"], train["steps"], train["min_lr_ratio"], train["decay_frac"])
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(zero, train, world_size)
    )
    return engine


def load_full_optimizer_state(engine, state: Mapping[str, torch.Tensor], step: int) -> None:
    """Scatter consolidated moments (`exp_avg/<name>`, `exp_avg_sq/<name>`) into the ZeRO partitions."""
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


def zero_stage(zero: dict[str, Any]) -> int:
    return int((zero.get("zero_optimization") or {}).get("stage", 0))


def build_model(mcfg, zero: dict[str, Any], train: dict[str, Any], world_size: int) -> nn.Module:
    """The model, its parameters not yet holding any meaningful value (`fill` writes them). Under
    ZeRO-3 it is partitioned while it is built (deepspeed.zero.Init): a rank allocates its partition
    of each parameter and, transiently, one module's parameters; never the model."""
    from kai_train import expert_parallel
    from kai_train.model import MultimodalLM

    ep = expert_parallel.size(train)
    if (why := expert_parallel.problem(mcfg, ep, world_size, zero_stage(zero))) is not None:
        raise ValueError(why)
    if zero_stage(zero) == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config(zero, train, world_size), dtype=torch.float32):
            return MultimodalLM(mcfg)
    model = MultimodalLM(mcfg, expert_parallel.held(mcfg, ep, dist.get_rank()))
    if ep > 1:
        expert_parallel.attach(model, ep)
    return model


def canonical_model(mcfg) -> nn.Module:
    """The whole model on the meta device (nothing allocated): every tensor under its canonical name,
    whatever this process holds."""
    from kai_train.model import MultimodalLM

    with torch.device("meta"):
        return MultimodalLM(mcfg)


def canonical_shapes(mcfg) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in canonical_model(mcfg).named_parameters()}


def setup(mcfg, zero: dict[str, Any], train: dict[str, Any], world_size: int) -> tuple[nn.Module, Any]:
    """The model and its DeepSpeed engine, built as the trainer and replay both build them; the values
    come next (`fill` for a genesis, `kai_train.checkpoint.restore` for a signed state)."""
    model = build_model(mcfg, zero, train, world_size)
    model.grad_checkpointing = bool(train["activation_checkpointing"])
    return model, build_engine(model, zero, train, world_size)


Values = Callable[[str, tuple[int, ...], int, int], torch.Tensor]  # (name, shape, start, stop) -> float32 1-D


def fill(engine, values: Values) -> None:
    """Write float32 values into every parameter: the module copy (what the forward pass uses; bf16
    under mixed precision) and the optimizer's fp32 master copy (what training continues from and
    what checkpoints sign). Under ZeRO 1/2 each rank writes whole tensors (parameters are
    replicated); under ZeRO-3 only its own partition, so `values` is asked for that slice alone."""
    rank = dist.get_rank()
    for name, p in sorted(engine.module.named_parameters()):
        _fill_one(p, name, values, rank)


def _fill_one(p: nn.Parameter, name: str, values: Values, rank: int) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    if hasattr(p, "ds_tensor"):  # ZeRO-3: elements [rank*size, (rank+1)*size) of the flat tensor, padded
        size = p.ds_tensor.numel()
        start, stop = min(rank * size, p.ds_numel), min((rank + 1) * size, p.ds_numel)
        local = torch.zeros(size, dtype=torch.float32, device=p.ds_tensor.device)
        if stop > start:
            local[: stop - start] = values(name, tuple(p.ds_shape), start, stop).to(local.device)
        with torch.no_grad():
            p.ds_tensor.copy_(local)
            if p.data.numel() == p.ds_numel:  # a persistent (small) parameter also kept whole on every rank
                p.data.copy_(values(name, tuple(p.ds_shape), 0, p.ds_numel).view(p.ds_shape).to(p.device))
        safe_set_local_fp32_param(p, local)
    else:
        full = values(name, tuple(p.shape), 0, p.numel()).view(p.shape)
        with torch.no_grad():
            p.copy_(full)
        safe_set_full_fp32_param(p, full.to(p.device))


def nudge_router_bias(engine, loads: Mapping[str, torch.Tensor], rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3): after an optimizer step, each router's selection
    bias moves by `rate` toward balance, b_e += rate * sign(mean load - load_e).

    `loads` maps each bias parameter's name to this rank's assignments per expert over the step;
    they are summed over ranks first (exact: integer counts in float32), so every rank computes the
    same bias. The new value is written like a restored one, master copy and module copy, so it is
    training state like any weight: checkpointed, in the canonical digest, and replayed."""
    from deepspeed.utils import safe_get_full_fp32_param

    names = sorted(loads)
    total = torch.stack([loads[n].float() for n in names])  # (blocks, E)
    if dist.is_initialized():
        dist.all_reduce(total)
    params = dict(engine.module.named_parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, load in zip(names, total):
        p = params[name]
        old = safe_get_full_fp32_param(p)  # collective under ZeRO-3: every rank walks the same names
        old = (p.detach() if old is None else old).to("cpu", torch.float32).reshape(-1)
        new = old + rate * torch.sign(load.mean() - load).cpu()

        def values(_n: str, _shape: tuple[int, ...], start: int, stop: int, new: torch.Tensor = new) -> torch.Tensor:
            return new[start:stop]

        _fill_one(p, name, values, rank)
