"""One optimizer step, shared by the trainer and the replay plug-in so both run the same math.

Rows come from the global sampler position: each micro-step consumes `micro * world` positions,
rank r taking [position + r*micro, position + (r+1)*micro). Row ids index the training rows
(held-out rows removed), so the data a step reads is a pure function of (seed, position).

For a mixture-of-experts model the step adds the blocks' load-balancing losses to the loss it
backpropagates, and after the optimizer step moves each router's selection bias from the expert
loads of the whole step on all ranks (auxiliary-loss-free balancing), so replay moves it alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipelines.sampler import rows_at
from kai_train.data import ShardDataset


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    # next-token loss over text positions; the image/audio prefix only conditions
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1), ignore_index=pad_id
    )


def train_step(engine, data: ShardDataset, train_ids: list[int], seed: int, position: int, rank: int, world: int,
               micro: int, accum: int, image_size: int, audio_samples: int) -> tuple[list[torch.Tensor], int, int]:
    """Run `accum` micro-steps (DeepSpeed steps the optimizer at the boundary).
    Returns (per-micro-step losses, text tokens seen by all ranks, new position)."""
    losses, tokens = [], 0
    loads: dict[str, torch.Tensor] = {}  # assignments per expert of each MoE block over the optimizer step
    for _ in range(accum):
        lo = position + rank * micro
        ids = [train_ids[i] for i in rows_at(seed, len(train_ids), lo, lo + micro)]
        b = data.batch(ids, image_size, audio_samples)
        logits = engine(b["tokens"], b["images"], b["audio"], b["has_image"], b["has_audio"])
        loss = loss_fn(logits, b["tokens"], data.pad_id)
        moe = engine.module.moe_layers()
        # Read right after the forward: recomputation under activation checkpointing reruns it.
        aux = sum((m.aux_loss for m in moe.values()), torch.zeros((), device=loss.device))
        for name, m in moe.items():
            loads[name] = loads[name] + m.load if name in loads else m.load
        engine.backward(loss + aux if moe else loss)
        engine.step()
        losses.append(loss.detach())  # the language-model loss; the balancing loss is not reported in it
        tokens += int((b["tokens"] != data.pad_id).sum()) * world
        position += micro * world
    rate = engine.module.cfg.moe_bias_update_rate
    if loads and rate > 0:
        from kai_train.engine import nudge_router_bias

        nudge_router_bias(engine, {f"{name}.router.bias": load for name, load in loads.items()}, rate)
    return losses, tokens, position
