"""Expert parallelism on DeepSpeed-MoE: each rank holds 1/ep of every MoE layer's routed experts.

`train.expert_parallel` (ep) splits the routed experts over ep ranks; the rest of the model stays
ZeRO data parallel over every rank. The layout is DeepSpeed's (deepspeed.utils.groups, legacy
order): ranks [g·ep, (g+1)·ep) form an expert-parallel group, rank r holds global experts
[(r mod ep)·E/ep, (r mod ep + 1)·E/ep), and the ranks holding the same experts (equal r mod ep) form
their expert-data-parallel group, over which DeepSpeed's ZeRO 1/2 partitions and reduces those
experts' gradients and optimizer state (the parameters are marked as DeepSpeed MoE parameters and
put in its MoE optimizer groups). ZeRO-3 is refused with ep > 1: DeepSpeed's ZeRO-3 takes only its
own AutoEP layers, which store experts under other names.

Dispatch (`exchange`): every rank routes its own tokens and applies the capacity limit to them, as
without expert parallelism; the kept assignments' rows go to the ranks holding their experts in one
all-to-all (DeepSpeed's collective, variable splits), each holder runs an expert once on its rows from
every rank of the group in rank order, and a second all-to-all brings the outputs back. The tensor
names stay the global ones (`text.layers.3.mlp.experts.17.w1.weight`), so genesis, checkpoints and
their canonical roots do not depend on ep; a checkpoint's expert tensors are written by ranks that
hold them (kai_train.checkpoint.assign).

Gradient scale: an expert's gradient on its holder sums the contributions of the ep ranks whose
tokens it served, and DeepSpeed then averages over the expert-data-parallel group (world/ep ranks),
which gives ep times the gradient of the mean loss that dense parameters get; a hook divides each
expert gradient by ep so that the step is the one the model's loss defines at any ep.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from kai_train.modelspec import ModelConfig

EXPERT_NAME = re.compile(r"\.mlp\.experts\.(\d+)\.")


def size(train: dict[str, Any]) -> int:
    """The configured expert-parallel size (1 when the config predates the setting)."""
    return int(train.get("expert_parallel", 1) or 1)


def problem(cfg: ModelConfig, ep: int, world: int, zero_stage: int) -> str | None:
    """Why `ep` cannot run this model on `world` ranks at this ZeRO stage, or None."""
    if ep == 1:
        return None
    if ep < 1:
        return f"train.expert_parallel={ep}: expected a whole number ≥ 1"
    if not cfg.n_experts:
        return f"train.expert_parallel={ep}: the model has no routed experts (model.n_experts is 0)"
    if cfg.n_experts % ep:
        return f"train.expert_parallel={ep} does not divide model.n_experts={cfg.n_experts}"
    if world % ep:
        return f"train.expert_parallel={ep} does not divide the world size {world}"
    if zero_stage == 3:
        return (f"train.expert_parallel={ep} with ZeRO-3: DeepSpeed's ZeRO-3 does not take expert-parallel "
                "layers of this kind; use deepspeed=zero1 or zero2 (experts are partitioned over their "
                "data-parallel group by ZeRO 1/2), or expert_parallel=1")
    return None


def held(cfg: ModelConfig, ep: int, rank: int) -> range | None:
    """The global ids of the experts rank `rank` holds in each MoE layer (None: all of them)."""
    if ep == 1 or not cfg.n_experts:
        return None
    n = cfg.n_experts // ep
    return range((rank % ep) * n, (rank % ep + 1) * n)


def holders(name: str, cfg: ModelConfig | None, ep: int, world: int) -> list[int]:
    """The ranks that hold tensor `name`: every rank, or for a routed expert's tensor under ep > 1
    the ranks r with r mod ep the expert's slot."""
    m = EXPERT_NAME.search(name) if ep > 1 and cfg is not None and cfg.n_experts else None
    if m is None:
        return list(range(world))
    slot = int(m.group(1)) // (cfg.n_experts // ep)  # type: ignore[union-attr]
    return [r for r in range(world) if r % ep == slot]


def of(model: nn.Module) -> int:
    """The expert-parallel size `model` was made with (`attach`); 1 for a model held whole."""
    marker = getattr(model, "expert_parallel", None)
    return int(marker.ep_size) if marker is not None else 1


def group_name(ep: int) -> str:
    return f"ep_size_{ep}"


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks with variable counts (DeepSpeed's all_to_all_single); backward sends the
    gradients back the same way."""

    @staticmethod
    def forward(ctx: Any, group: Any, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        from deepspeed import comm

        ctx.group, ctx.send, ctx.recv = group, send, recv
        out = x.new_empty(sum(recv), x.shape[1])
        comm.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        from deepspeed import comm

        out = grad.new_empty(sum(ctx.send), grad.shape[1])
        comm.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return None, out, None, None


def exchange(moe: nn.Module, rows: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """kai_train.model.MoE.exchange under expert parallelism. rows (S, dim): this rank's kept
    assignments grouped by global expert, kept (E,) their counts; returns the experts' outputs for
    those rows, in the same order."""
    from deepspeed import comm
    from deepspeed.utils import groups

    E, local = moe.n_experts, len(moe.held)
    ep = E // local
    group = groups._get_expert_parallel_group(group_name(ep))
    me = moe.held.start // local
    counts = kept.to(torch.int64)
    every = [torch.empty_like(counts) for _ in range(ep)]
    comm.all_gather(every, counts, group=group)
    table = torch.stack(every).cpu()  # (ep, E): each group rank's kept assignments per expert
    send = counts.cpu().view(ep, local).sum(1).tolist()
    mine = table[:, me * local:(me + 1) * local]  # (ep, local): what each rank sends each of my experts
    recv = mine.sum(1).tolist()
    x = _AllToAll.apply(group, rows, send, recv)  # (sum recv, dim): by source rank, experts in order inside
    sizes = mine.reshape(-1).tolist()
    pieces = list(x.split(sizes))
    outs: list[torch.Tensor] = [x[:0]] * len(pieces)
    for j, e in enumerate(moe.held):
        idx = [s * local + j for s in range(ep)]  # expert e's rows from every source, in rank order
        y = moe.experts[str(e)](torch.cat([pieces[i] for i in idx]))
        for i, part in zip(idx, y.split([sizes[i] for i in idx])):
            outs[i] = part
    return _AllToAll.apply(group, torch.cat(outs), recv, send)


def _marker_class() -> type[nn.Module]:
    """A module DeepSpeed's engine recognises as one of its MoE layers (it then builds its MoE
    optimizer groups and reduces expert gradients over their expert-data-parallel groups). It holds
    nothing and is never called: the routing and dispatch are kai_train.model.MoE's."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertParallel(DeepSpeedMoE):  # type: ignore[misc]
        def __init__(self, num_experts: int, ep: int) -> None:
            nn.Module.__init__(self)  # DeepSpeedMoE's own __init__ would build its gate and experts
            self.num_experts, self.ep_size = num_experts, ep
            self.num_local_experts = num_experts // ep
            self.expert_group_name = group_name(ep)

        def set_deepspeed_parallelism(self, *args: Any, **kwargs: Any) -> None:
            make_groups(self.ep_size)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallel


def make_groups(ep: int) -> None:
    """DeepSpeed's expert-parallel and expert-data-parallel groups for `ep` (once per process group)."""
    from deepspeed.utils import groups

    if group_name(ep) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)


def attach(model: nn.Module, ep: int) -> None:
    """Make `model` (built with `held` experts) expert parallel: the dispatch, DeepSpeed's MoE
    parameter marks, the gradient scale, and the marker module its engine looks for."""
    from kai_train.model import MoE

    make_groups(ep)
    name = group_name(ep)
    n_experts = 0
    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        n_experts = m.n_experts
        m.exchange = exchange
        for p in m.experts.parameters():
            p.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed: an expert parameter ...
            p.group_name = name  # type: ignore[attr-defined]  # ... reduced over this group's data-parallel ranks
            p.register_hook(lambda g, ep=ep: g / ep)
    if n_experts:
        model.add_module("expert_parallel", _marker_class()(n_experts, ep))
