"""Deterministic, resumable, distributed sampling: row ids as a pure function of the step.

There is no iterator state to save. The rows a rank reads at a step follow from
(seed, num_rows, world_size, batch_size, step, rank) alone:

    epoch order     epoch_order(seed, e, N): a permutation of 0..N-1 from PCG64([seed, e])
    global stream   the epoch orders concatenated; global position p is row
                    epoch_order(seed, p // N, N)[p % N]
    step s          consumes global positions [s*B*W, (s+1)*B*W)
    rank r          takes the slice [s*B*W + r*B, s*B*W + (r+1)*B) of that block

A step's block may straddle an epoch boundary; it then continues in the next epoch's permutation,
so no row is dropped or repeated within an epoch when N is not a multiple of B*W. Resuming at step
k is `batches(k)`, and `rows_for_steps` tells a checkpoint statement exactly which global positions
a run segment consumed, which a verifier can re-derive with `rows_at`.

That is the sampler of runs whose config records no `sampler.kind` (kept so they replay as they
ran). New runs use `feistel-v1` (attest.sampling): the same global stream and step layout, but the
epoch order is a keyed Feistel permutation evaluated one position at a time, so no process ever
materialises a permutation of the corpus, and an optional signed mixture draws each position from
a declared source. `make_sampler` builds either from what the run config records.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from attest.sampling import FEISTEL_V1, KINDS, Sampler, train_before, train_id


def epoch_order(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    """The permutation of row ids 0..num_rows-1 used in `epoch` (int64)."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_rows)


def rows_at(seed: int, num_rows: int, position_lo: int, position_hi: int) -> np.ndarray:
    """Row ids at global positions [position_lo, position_hi) of the concatenated epoch orders."""
    parts = []
    pos = position_lo
    while pos < position_hi:
        epoch, offset = divmod(pos, num_rows)
        take = min(num_rows - offset, position_hi - pos)
        parts.append(epoch_order(seed, epoch, num_rows)[offset:offset + take])
        pos += take
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class DistributedSampler:
    """One rank's view of the global stream: `batch_size` rows per step for each of `world_size` ranks."""

    def __init__(self, num_rows: int, world_size: int, rank: int, seed: int, batch_size: int) -> None:
        if num_rows < 1 or world_size < 1 or batch_size < 1:
            raise ValueError(f"num_rows, world_size and batch_size must be >= 1, got "
                             f"{num_rows}, {world_size}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.num_rows, self.world_size, self.rank = num_rows, world_size, rank
        self.seed, self.batch_size = seed, batch_size
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, order): a step rarely spans two

    @property
    def positions_per_step(self) -> int:
        """Global batch size B*W."""
        return self.batch_size * self.world_size

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_order(self.seed, epoch, self.num_rows))
        return self._cached[1]

    def rows(self, step: int) -> list[int]:
        """This rank's row ids at global step `step`."""
        lo = step * self.positions_per_step + self.rank * self.batch_size
        out: list[int] = []
        pos = lo
        while pos < lo + self.batch_size:
            epoch, offset = divmod(pos, self.num_rows)
            take = min(self.num_rows - offset, lo + self.batch_size - pos)
            out.extend(self._order(epoch)[offset:offset + take].tolist())
            pos += take
        return out

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, list[int]]]:
        """(global_step, row ids) from `start_step` on, forever across epochs."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        step = start_step
        while True:
            yield step, self.rows(step)
            step += 1

    def rows_for_steps(self, step_lo: int, step_hi: int) -> dict[str, int]:
        """Global positions consumed by all ranks over steps [step_lo, step_hi) (end exclusive)."""
        if not 0 <= step_lo <= step_hi:
            raise ValueError(f"need 0 <= step_lo <= step_hi, got {step_lo}, {step_hi}")
        start, end = step_lo * self.positions_per_step, step_hi * self.positions_per_step
        return {
            "epoch_start": start // self.num_rows,
            "epoch_end": max(start, end - 1) // self.num_rows,  # epoch of the last position consumed
            "position_start": start,
            "position_end": end,
        }

    def state(self, step: int) -> dict[str, int]:
        """Everything needed to resume at `step` (the next step to run) and check the sampler matches."""
        position = step * self.positions_per_step
        return {
            "seed": self.seed,
            "num_rows": self.num_rows,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "step": step,
            "epoch": position // self.num_rows,
            "position": position,
        }


class PermutationSampler:
    """The sampler of runs that record no kind: a numpy permutation of the training rows per epoch
    (one epoch's order cached). Same interface as attest.sampling.Sampler."""

    kind = None
    mixture = None

    def __init__(self, seed: int, holdout_every: int, shard_rows: Sequence[int]) -> None:
        self.seed, self.h = seed, holdout_every
        self.total_rows = sum(int(r) for r in shard_rows)
        self.num_rows = train_before(self.total_rows, holdout_every)
        if self.num_rows < 1:
            raise ValueError("no training rows")
        self._cached: tuple[int, np.ndarray] | None = None

    def rows(self, lo: int, hi: int) -> list[int]:
        out: list[int] = []
        pos = lo
        while pos < hi:
            epoch, offset = divmod(pos, self.num_rows)
            if self._cached is None or self._cached[0] != epoch:
                self._cached = (epoch, epoch_order(self.seed, epoch, self.num_rows))
            take = min(self.num_rows - offset, hi - pos)
            out += [train_id(int(t), self.h) for t in self._cached[1][offset:offset + take]]
            pos += take
        return out

    def record(self, lo: int, hi: int) -> None:
        return None


def make_sampler(kind: str | None, seed: int, holdout_every: int, shard_rows: Sequence[int],
                 shard_sources: Sequence[str] | None = None, mixture: Mapping[str, int] | None = None) -> Any:
    """The sampler a run config records: `kind` None (absent: the permutation sampler of earlier
    runs, no mixture) or `feistel-v1`. ValueError names what does not fit."""
    if kind is None:
        if mixture:
            raise ValueError("a sampler mixture needs sampler.kind feistel-v1")
        return PermutationSampler(seed, holdout_every, shard_rows)
    if kind != FEISTEL_V1:
        raise ValueError(f"sampler.kind {kind!r}: this version knows {list(KINDS)}")
    return Sampler(seed, holdout_every, shard_rows, shard_sources, mixture or None)
