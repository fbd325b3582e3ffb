"""One optimizer step, shared by the trainer and the replay plug-in so both run the same math.

Rows come from the global sampler position: each micro-step consumes `micro * world` positions,
rank r taking [position + r*micro, position + (r+1)*micro) (kai_train.data.Batches). The sampler
maps positions to training row ids (held-out rows never), so the data a step reads is a pure
function of the signed config and the position.

For a mixture-of-experts model the step adds the blocks' load-balancing losses to the loss it
backpropagates, and after the optimizer step moves each router's selection bias from the expert
loads of the whole step on all ranks (auxiliary-loss-free balancing), so replay moves it alike, and
its expert choices go to a RoutingLog (kai_train.routing), which hashes them off the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kai_train.data import Batches
from kai_train.routing import RoutingLog


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    # next-token loss over text positions; the image/audio prefix only conditions
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1), ignore_index=pad_id
    )


def train_step(engine, batches: Batches, position: int, accum: int, routing: RoutingLog | None = None
               ) -> tuple[list[torch.Tensor], int, int]:
    """Run `accum` micro-steps (DeepSpeed steps the optimizer at the boundary).
    Returns (per-micro-step losses, text tokens seen by all ranks, new position); a mixture of
    experts' choices go to `routing`, which hashes them off the step (kai_train.routing)."""
    losses, tokens = [], 0
    loads: dict[str, torch.Tensor] = {}  # assignments per expert of each MoE block over the optimizer step
    choices: list[torch.Tensor] = []  # per micro-step, (layers, tokens, k) chosen experts, on the CPU
    for _ in range(accum):
        b = batches.get(position)
        logits = engine(b["tokens"], b["images"], b["audio"], b["has_image"], b["has_audio"])
        loss = loss_fn(logits, b["tokens"], batches.pad_id)
        moe = engine.module.moe_layers()
        # Read right after the forward: recomputation under activation checkpointing reruns it.
        aux = sum((m.aux_loss for m in moe.values()), torch.zeros((), device=loss.device))
        for name, m in moe.items():
            loads[name] = loads[name] + m.load if name in loads else m.load
        if moe:  # copied without waiting (a CUDA device is synchronized once, at the end of the step)
            choices.append(torch.stack([m.routing for m in moe.values()]).to(torch.int32).to("cpu", non_blocking=True))
        engine.backward(loss + aux if moe else loss)
        engine.step()
        losses.append(loss.detach())  # the language-model loss; the balancing loss is not reported in it
        tokens += int((b["tokens"] != batches.pad_id).sum()) * batches.world
        position += batches.micro * batches.world
    if choices and routing is not None:
        routing.add(list(engine.module.moe_layers()), choices)
    rate = engine.module.cfg.moe_bias_update_rate
    if loads and rate > 0:
        from kai_train.engine import nudge_router_bias

        nudge_router_bias(engine, {f"{name}.router.bias": load for name, load in loads.items()}, rate)
    return losses, tokens, position
