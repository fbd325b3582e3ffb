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

Off the training step (`RoutingLog`): a step only starts the copy of its choices to the CPU; a
background thread hashes them into row digests (32 bytes a row and layer), and the segment's row
digests of every rank are gathered once, in one collective, when the checkpoint is made.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attest.statements import ROUTING_ALGORITHM as ALGORITHM

__all__ = ["ALGORITHM", "RoutingLog", "row_digests", "step_digest", "step_routing"]


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
    """One optimizer step's digests per layer, computed on the spot (a collective on `device` when
    `world` > 1): what `RoutingLog` computes for each step of a segment, off the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return gather_steps(np.stack([row_digests(c, micro) for c in per_micro], axis=1)[None], world, device)[0]


def gather_steps(mine: np.ndarray, world: int, device: torch.device) -> list[list[str]]:
    """Every rank's call. mine: (steps, layers, accum, micro, 32) this rank's row digests, micro-step
    by micro-step. Returns per step one digest per layer, the same on every rank: the rows of
    micro-step m on rank r hold positions [P + (m·world + r)·micro, … + micro)
    (kai_train.data.Batches), so ordering the gathered row digests by (micro-step, rank, row) is
    position order. The steps are gathered a few at a time, so that no rank holds more than
    GATHER_BYTES of every rank's row digests at once, however long the segment or large the world."""
    import torch.distributed as dist

    if world == 1:
        return [[step_digest(layer.reshape(-1, 32)) for layer in step] for step in mine]
    per_step = max(1, mine[0].nbytes * world) if len(mine) else 1
    chunk = max(1, GATHER_BYTES // per_step)
    out: list[list[str]] = []
    for s in range(0, len(mine), chunk):
        t = torch.from_numpy(np.ascontiguousarray(mine[s:s + chunk])).to(device)
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        every = np.stack([p.cpu().numpy() for p in parts], axis=3)  # (steps, layers, accum, world, micro, 32)
        out += [[step_digest(layer.reshape(-1, 32)) for layer in step] for step in every]
    return out


GATHER_BYTES = 64 << 20  # every rank's row digests held at once while a segment's are gathered


class RoutingLog:
    """One segment's routing commitments, hashed off the training step.

    `add` takes a step's per-micro-step choices (CPU tensors whose copies from the device may still
    be in flight) and returns at once; a background thread waits for the copies and hashes them into
    row digests. `segment` (every rank's call, at a checkpoint) waits for the thread, gathers every
    rank's row digests of the segment in one collective and returns (layers, per step one digest
    per layer), then starts the next segment. A hashing error is raised by the next call."""

    def __init__(self, micro: int, world: int, device: torch.device) -> None:
        self.micro, self.world, self.device = micro, world, device
        self.layers: list[str] = []
        self._steps: list[np.ndarray | None] = []
        self._jobs: queue.Queue[tuple[int, list[torch.Tensor], Any] | None] = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="kai-routing", daemon=True)
        self._thread.start()

    def add(self, layers: list[str], per_micro: list[torch.Tensor]) -> None:
        self._check()
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.layers = layers
        self._steps.append(None)
        self._jobs.put((len(self._steps) - 1, per_micro, event))

    def segment(self) -> tuple[list[str], list[list[str]]]:
        self._jobs.join()
        self._check()
        steps, self._steps = self._steps, []
        if not steps:
            return self.layers, []
        return self.layers, gather_steps(np.stack(steps), self.world, self.device)  # type: ignore[arg-type]

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"routing digests: {type(self._error).__name__}: {self._error}")

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            i, per_micro, event = job
            try:
                if event is not None:
                    event.synchronize()
                self._steps[i] = np.stack([row_digests(c, self.micro) for c in per_micro], axis=1)
            except BaseException as e:  # noqa: BLE001 - raised in the training thread by the next call
                self._error = e
            finally:
                self._jobs.task_done()
        self._jobs.task_done()
