"""Held-out loss per modality.

Rows are held out by id (`train.holdout_every`): never trained on, the same on every rank and
in every resume. Each rank evaluates its slice; sums are all-reduced. Every rank runs the same
number of forward passes (ZeRO-3 gathers parameters collectively), padding its slice if short.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipelines.shards import MODALITIES
from kai_train.data import ShardDataset


def held_out_rows(n: int, holdout_every: int) -> range:
    """The held-out row ids among n rows (a lazy range: nothing the size of the corpus is built)."""
    return range(0, n, holdout_every) if holdout_every > 0 else range(0)


@torch.no_grad()
def held_out_loss(engine, data: ShardDataset, ids: Sequence[int], micro_batch: int, batches: int,
                  image_size: int, audio_samples: int) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = ids[rank::world][: micro_batch * batches]
    n_batches = -(-len(ids[0::world][: micro_batch * batches]) // micro_batch)  # rank 0 has the most
    sums = torch.zeros(2, len(MODALITIES), dtype=torch.float64)  # (loss sum, token count) per modality
    engine.eval()
    for b in range(n_batches):
        chunk = list(mine[b * micro_batch : (b + 1) * micro_batch])
        real = len(chunk)
        chunk = chunk + [ids[0]] * (micro_batch - real)  # pad: same forward count on every rank
        batch = data.batch(chunk, image_size, audio_samples)
        logits = engine(batch["tokens"], batch["images"], batch["audio"], batch["has_image"], batch["has_audio"])
        tgt = batch["tokens"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tgt.reshape(-1),
                               ignore_index=data.pad_id, reduction="none").view(tgt.shape)
        mask = (tgt != data.pad_id).double()
        for j in range(real):
            m = MODALITIES.index(batch["modality"][j])
            sums[0, m] += float((loss[j].double() * mask[j]).sum())
            sums[1, m] += float(mask[j].sum())
    engine.train()
    dist.all_reduce(sums)
    return {mod: float(sums[0, i] / sums[1, i]) for i, mod in enumerate(MODALITIES) if sums[1, i] > 0}
