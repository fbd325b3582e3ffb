"""One optimizer step, shared by the trainer and the replay plug-in so both run the same math.

Rows come from the global sampler position: each micro-step consumes `micro * world` positions,
rank r taking [position + r*micro, position + (r+1)*micro). Row ids index the training rows
(held-out rows removed), so the data a step reads is a pure function of (seed, position).
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
    for _ in range(accum):
        lo = position + rank * micro
        ids = [train_ids[i] for i in rows_at(seed, len(train_ids), lo, lo + micro)]
        b = data.batch(ids, image_size, audio_samples)
        logits = engine(b["tokens"], b["images"], b["audio"], b["has_image"], b["has_audio"])
        loss = loss_fn(logits, b["tokens"], data.pad_id)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
        tokens += int((b["tokens"] != data.pad_id).sum()) * world
        position += micro * world
    return losses, tokens, position
