"""One optimizer step, shared by the trainer and the replay plug-in so both run the same math.

Rows come from the global sampler position: each micro-step consumes `micro * world` positions,
rank r taking [position + r*micro, position + (r+1)*micro) (kai_train.data.Batches). The sampler
maps positions to training row ids (held-out rows never), so the data a step reads is a pure
function of the signed config and the position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kai_train.data import Batches


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    # next-token loss over text positions; the image/audio prefix only conditions
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1), ignore_index=pad_id
    )


def train_step(engine, batches: Batches, position: int, accum: int) -> tuple[list[torch.Tensor], int, int]:
    """Run `accum` micro-steps (DeepSpeed steps the optimizer at the boundary).
    Returns (per-micro-step losses, text tokens seen by all ranks, new position)."""
    losses, tokens = [], 0
    for _ in range(accum):
        b = batches.get(position)
        logits = engine(b["tokens"], b["images"], b["audio"], b["has_image"], b["has_audio"])
        loss = loss_fn(logits, b["tokens"], batches.pad_id)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
        tokens += int((b["tokens"] != batches.pad_id).sum()) * batches.world
        position += batches.micro * batches.world
    return losses, tokens, position
