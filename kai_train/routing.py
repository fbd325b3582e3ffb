"""Routing commitments: one digest of each optimizer step's expert choices per mixture-of-experts layer.

Routing is discontinuous (a tiny numerical difference flips an expert choice), so a checkpoint
statement signs, for every step of its segment and every MoE layer, a digest of which experts each
token was sent to. A replay that recomputes them names the first step and layer whose routing
differs, before the weights it reaches say only that something did.

`kai-routing/v1`, per step and layer:

- a row digest for each sample (one sampler position) of the step: sha256 over the layer's top-k
  expert indices of that sample's sequence (modality prefix rows included), as little-endian int32,
  token by token, each token's k slots in selection order;
- the step's digest: sha256 over the row digests (32 bytes each) in sampler position order.

Rows are ordered by their global position, not by rank or micro-step, so the digest of a step does
not depend on how its rows were split over ranks and micro-steps when routing is row by row (dropless
routing is: a capacity limit makes one row's routing depend on the rows batched with it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from attest.statements import ROUTING_ALGORITHM as ALGORITHM

__all__ = ["ALGORITHM", "row_digests", "step_digest", "step_routing"]


def row_digests(choices: torch.Tensor, rows: int) -> np.ndarray:
    """choices: (..., rows * seq, k) expert indices of `rows` samples (row-major, as the model
    flattens a batch) -> (..., rows, 32) uint8 row digests."""
    lead, (n, k) = tuple(choices.shape[:-2]), tuple(choices.shape[-2:])
    if n % rows:
        raise ValueError(f"{n} routed tokens do not split into {rows} rows")
    a = choices.detach().to("cpu", torch.int32).numpy().astype("<i4", copy=False).reshape(-1, rows, n // rows * k)
    out = np.empty((a.shape[0], rows, 32), dtype=np.uint8)
    for i in range(a.shape[0]):
        for r in range(rows):
            out[i, r] = np.frombuffer(hashlib.sha256(a[i, r].tobytes()).digest(), dtype=np.uint8)
    return out.reshape(*lead, rows, 32)


def step_digest(rows: np.ndarray | Sequence[bytes]) -> str:
    """The step's digest of one layer from its row digests (32 bytes each) in sampler position order."""
    h = hashlib.sha256()
    for r in rows:
        h.update(bytes(r))
    return h.hexdigest()


def step_routing(per_micro: list[torch.Tensor], micro: int, world: int, device: torch.device) -> list[str]:
    """Every rank's call, once per optimizer step (a collective on `device` when `world` > 1).

    per_micro: for each micro-step of this rank, in order, (layers, micro * seq, k) expert indices
    (on the CPU, copied there without waiting: a CUDA `device` is synchronized first). Returns one
    step digest per layer, the same on every rank: the rows of micro-step m on rank r hold positions
    [P + (m·world + r)·micro, … + micro) (kai_train.data.Batches), so ordering the gathered row
    digests by (micro-step, rank, row) is position order."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    mine = np.stack([row_digests(c, micro) for c in per_micro], axis=1)  # (layers, accum, micro, 32)
    if world > 1:
        t = torch.from_numpy(mine).to(device)
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        every = np.stack([p.cpu().numpy() for p in parts], axis=2)  # (layers, accum, world, micro, 32)
    else:
        every = mine[:, :, None]
    return [step_digest(layer.reshape(-1, 32)) for layer in every]
