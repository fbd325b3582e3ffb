"""The learning-rate schedule as a pure function of the signed run config.

One home for the schedule: the trainer's LambdaLR (kai_train.engine) multiplies `train.lr` by
`lr_lambda(...)(t)` at optimizer step t, and the verifier recomputes the same numbers from the run
statement's config to bound each segment's update (attest.verify.checks.model.check_trajectory) and to
check the lr a checkpoint reports. Nothing here reads a self-reported metric. torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

SCHEDULES = ("cosine", "wsd")
# Optimizer steps a run config may declare (the largest public pretraining runs take < 2M): bounds
# the verifier's work on a hostile config.
MAX_STEPS = 10**7


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float, decay_frac: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup, then `cosine` to `min_ratio`, or `wsd`
    (warmup-stable-decay: flat at 1, then linear to `min_ratio` over the last `decay_frac` of steps)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be cosine or wsd, got {schedule!r}")
    decay_start = total - int(decay_frac * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "wsd":
            if step < decay_start:
                return 1.0
            return 1.0 - (1.0 - min_ratio) * (step - decay_start) / max(1, total - decay_start)
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


class Schedule:
    """lr at each optimizer step, from a run config's `train` mapping (validated: ValueError names the field)."""

    def __init__(self, train: dict[str, Any]) -> None:
        def num(key: str, lo: float, hi: float, integer: bool = False) -> Any:
            v: Any = train.get(key)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if not ok or isinstance(v, bool) or not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
                raise ValueError(f"train.{key} = {v!r}: expected a {'whole ' if integer else ''}number in [{lo:g}, {hi:g}]")
            return v

        self.peak = float(num("lr", 1e-12, 10.0))
        self.total = num("steps", 1, MAX_STEPS, integer=True)
        warmup = num("warmup", 0, MAX_STEPS, integer=True)
        min_ratio = float(num("min_lr_ratio", 0.0, 1.0))
        decay_frac = float(num("decay_frac", 0.0, 1.0))
        if train.get("schedule") not in SCHEDULES:
            raise ValueError(f"train.schedule = {train.get('schedule')!r}: expected one of {list(SCHEDULES)}")
        self.schedule, self.warmup, self.min_ratio, self.decay_frac = train["schedule"], warmup, min_ratio, decay_frac
        self._f = lr_lambda(train["schedule"], warmup, self.total, min_ratio, decay_frac)

    def lr(self, step: int) -> float:
        """The lr optimizer step `step` (0-based) uses; also what the trainer reports after `step` steps.
        A negative step (only a hostile statement names one) reads as step 0."""
        return self.peak * self._f(max(0, step))

    def lr_sum(self, start: int, end: int) -> float:
        """Σ lr over the optimizer steps start .. end-1: what bounds the movement of a segment.
        Closed form (O(1) whatever the number of steps): the schedule is piecewise linear or cosine."""
        start, end = max(0, start), max(0, end)  # negative steps: none (only a hostile statement names one)
        if end <= start:
            return 0.0
        return self.peak * self._sum(start, end)

    def _sum(self, a: int, b: int) -> float:
        w, total, m = self.warmup, self.total, self.min_ratio
        out = 0.0
        lo, hi = a, min(b, w)  # warmup: (t + 1) / w
        if lo < hi:
            out += (hi * (hi + 1) - lo * (lo + 1)) / 2 / w
        a = max(a, w)
        if a >= b:
            return out
        if self.schedule == "wsd":
            ds = total - int(self.decay_frac * total)
            lo, hi = a, min(b, ds)  # flat at 1
            if lo < hi:
                out += hi - lo
            lo = max(a, ds)
            if lo < b:  # 1 - (1 - m) (t - ds) / span, summed over t in [lo, b)
                span = max(1, total - ds)
                n = b - lo
                first, last = lo - ds, b - 1 - ds
                out += n - (1 - m) * (first + last) * n / 2 / span
            return out
        span = max(1, total - w)
        lo, hi = a, min(b, w + span)  # cosine: m + (1 - m) (1 + cos(pi k / span)) / 2, k = t - w
        if lo < hi:
            k0, k1 = lo - w, hi - w
            x = math.pi / span
            cos_sum = (math.sin(x * (k1 - 0.5)) - math.sin(x * (k0 - 0.5))) / (2 * math.sin(x / 2))
            out += (hi - lo) * m + (1 - m) * 0.5 * ((hi - lo) + cos_sum)
        lo = max(a, w + span)  # past the end of the decay: min_ratio
        if lo < b:
            out += (b - lo) * m
        return out
