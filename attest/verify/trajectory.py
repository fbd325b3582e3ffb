"""Training-trajectory statistics for the verifier: update norms between checkpoints, without torch.

For a segment W_k -> W_{k+1} the verifier streams both safetensors files tensor by tensor (numpy,
one bounded chunk at a time) and records per tensor ||ΔW||², max |ΔW| and max |W|. Two tests use
them (attest.verify.check_trajectory):

* a hard bound from the optimizer. kai-train trains with AdamW (torch, bias-corrected). One AdamW
  step moves a coordinate by lr_t * (|m̂/(√v̂+ε)| + wd·|w|), and by Cauchy–Schwarz
  |m̂|/√v̂ <= B(β1, β2) = max_t (1-β1)/(1-β1^t) · √(1-β2^t)/√(1-β2) · √(Σ_{j<t} (β1²/β2)^j)
  (≈1.16 for (0.9, 0.95), ≈7.3 for (0.9, 0.999)) whatever the gradients, clipping included. So over
  s steps no coordinate moves more than s · lr_max · (B + wd·max|w|), plus the rounding of the
  stored dtype. A weight swap (another model's tensors in the middle of the run) moves coordinates
  by the weights' own scale, far beyond that;
* a profile test: the per-step update norm of each segment against the run's own segments
  (robust z-score over median/MAD in log space), for swaps small enough to pass the bound.

Neither proves that a segment *was* trained on the declared data: replay does (attest.verify.REPLAYERS).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from io import BufferedReader

import numpy as np

from attest import inputs
from attest.digest import DigestError, TensorEntry, read_safetensors_index

CHUNK_ELEMS = 1 << 18  # 1 MiB of float32: the difference stays in cache for its reductions
# numpy reading of each float dtype; BF16 is widened by hand. Other dtypes (integers, bools) are
# buffers, not trained weights: they are compared for equality only.
FLOAT_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
# Relative rounding of each stored float dtype (half an ulp, doubled for the two ends of a segment).
ROUNDING = {"F64": 2.0**-52, "F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}
SLACK = 2.0  # the bound is already a worst case; this covers an lr peak between two checkpoints
MIN_PROFILE_SEGMENTS = 5
OUTLIER_Z = 5.0  # robust z (log space) above which a segment is an outlier ...
OUTLIER_RATIO = 3.0  # ... and only if its per-step update is also this many times the median


@dataclass
class TensorDelta:
    name: str
    dtype: str
    numel: int
    diff_sq: float  # ||W_{k+1} - W_k||² of this tensor
    diff_max: float  # max |W_{k+1} - W_k|
    w_max: float  # a bound on max(|W_k|, |W_{k+1}|): max|W_k| + max|ΔW|
    w_sq: float  # a bound on max(||W_k||², ||W_{k+1}||²): (||W_k|| + ||ΔW||)²


@dataclass
class SegmentDelta:
    tensors: list[TensorDelta] = field(default_factory=list)
    structural: list[str] = field(default_factory=list)  # tensors added, removed or reshaped

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def norm(self) -> float:
        return math.sqrt(sum(t.diff_sq for t in self.tensors))

    @property
    def weight_norm(self) -> float:
        return math.sqrt(sum(t.w_sq for t in self.tensors))


def adam_ratio_bound(beta1: float, beta2: float, max_steps: int = 100_000) -> float:
    """B(β1, β2): a bound on |m̂_t| / √v̂_t for bias-corrected Adam, over steps 1..max_steps."""
    if not (0 <= beta1 < 1 and 0 < beta2 < 1):
        raise ValueError(f"betas ({beta1}, {beta2}) out of range")
    r = beta1 * beta1 / beta2

    def at(t: int, s: float) -> float:
        return (1 - beta1) / (1 - beta1**t) * math.sqrt((1 - beta2**t) / (1 - beta2)) * math.sqrt(s)

    if r >= 1:  # the sum grows without end: the bound grows with t; take it at the last step
        t = max(1, max_steps)
        try:
            s = float(t) if r == 1 else (r**t - 1) / (r - 1)
        except OverflowError:
            return math.inf
        return max(1.0, at(min(t, 10**9), s))
    best = s = 0.0
    rt = 1.0  # r^(t-1)
    for t in range(1, min(max(1, max_steps), 10**6) + 1):
        s += rt
        rt *= r
        b = at(t, s)
        if b > best:
            best = b
        elif t > 50 and b < best * (1 - 1e-9):
            break  # past its peak: the bound only falls from here
        if rt < 1e-16 and beta2**t < 1e-16 and beta1**t < 1e-16:
            break  # every term has converged
    return best


def coordinate_bound(steps: int, lr_max: float, ratio_bound: float, weight_decay: float, w_max: float,
                     dtype: str) -> float:
    """The most one coordinate can move in `steps` AdamW steps (times SLACK)."""
    rounding = 2 * ROUNDING.get(dtype, 0.0) * w_max
    return SLACK * steps * lr_max * (ratio_bound + weight_decay * w_max) + rounding


def _chunks(f: BufferedReader, e: TensorEntry, numel: int) -> Iterator[np.ndarray]:
    """The tensor's elements, CHUNK_ELEMS at a time, as float32 (float64 for F64); one buffer reused."""
    np_dtype = np.dtype(FLOAT_DTYPES[e.dtype])
    buf = bytearray(min(numel, CHUNK_ELEMS) * np_dtype.itemsize)
    f.seek(e.start)
    for lo in range(0, numel, CHUNK_ELEMS):
        n = min(CHUNK_ELEMS, numel - lo)
        view = memoryview(buf)[: n * np_dtype.itemsize]
        if f.readinto(view) != len(view):
            raise DigestError(f"{f.name}: tensor {e.name!r} data is truncated")
        a = np.frombuffer(view, dtype=np_dtype, count=n)
        if e.dtype == "BF16":
            yield (a.astype(np.uint32) << 16).view(np.float32)
        else:
            yield a if e.dtype in ("F32", "F64") else a.astype(np.float32)


def _tensor_deltas(members: list[tuple[Path, TensorEntry]]) -> list[TensorDelta]:
    """Update statistics of one tensor between each two consecutive weight sets of `members` (same
    name, shape and dtype in each), streaming every set's bytes once, all sets in step."""
    numel = math.prod(members[0][1].shape)
    dtype = members[0][1].dtype
    pairs = len(members) - 1
    diff_sq, diff_max, a_max, a_sq = [0.0] * pairs, [0.0] * pairs, [0.0] * pairs, [0.0] * pairs
    d = np.empty(min(numel, CHUNK_ELEMS), dtype=np.float64 if dtype == "F64" else np.float32)
    with contextlib.ExitStack() as stack, np.errstate(all="ignore"):
        files = [stack.enter_context(inputs.open_file(p)) for p, _ in members]
        for chunks in zip(*(_chunks(f, e, numel) for f, (_, e) in zip(files, members))):
            for j in range(pairs):
                a, dd = chunks[j], d[: len(chunks[j])]
                np.subtract(chunks[j + 1], a, out=dd)
                diff_sq[j] += float(np.dot(dd, dd))
                diff_max[j] = max(diff_max[j], float(dd.max()), -float(dd.min()))
                a_max[j] = max(a_max[j], float(a.max()), -float(a.min()))
                a_sq[j] += float(np.dot(a, a))
    name = members[-1][1].name
    out = []
    for j in range(pairs):
        # A non-finite weight or difference is a jump of its own (nothing trains to inf or NaN and back).
        if not all(math.isfinite(x) for x in (diff_sq[j], diff_max[j], a_max[j], a_sq[j])):
            out.append(TensorDelta(name, dtype, numel, math.inf, math.inf, math.inf, math.inf))
            continue
        # |W_k+1| <= |W_k| + |ΔW|: bounds on the larger of the two weights without a third pass.
        out.append(TensorDelta(name, dtype, numel, diff_sq[j], diff_max[j], a_max[j] + diff_max[j],
                               (math.sqrt(a_sq[j]) + math.sqrt(diff_sq[j])) ** 2))
    return out


def _index(files: Iterable[Path]) -> dict[str, tuple[Path, TensorEntry]]:
    out: dict[str, tuple[Path, TensorEntry]] = {}
    for p in files:
        for e in read_safetensors_index(p):
            out[e.name] = (p, e)
    return out


def segment_delta(prev_files: Iterable[str | os.PathLike[str]], next_files: Iterable[str | os.PathLike[str]]) -> SegmentDelta:
    """Per-tensor update statistics between two weight sets (each one or more safetensors files).

    Raises attest.digest.DigestError on an unreadable file (weights-digest reports those)."""
    return chain_deltas([prev_files, next_files])[0]


def chain_deltas(sets: Sequence[Iterable[str | os.PathLike[str]]]) -> list[SegmentDelta]:
    """`segment_delta` of every two consecutive weight sets of `sets`, reading each set once: a
    tensor is streamed from all the sets in step (memory: one chunk per set), so a weight set in the
    middle of the run is read once, not once as the end and once as the start of a segment.

    Raises attest.digest.DigestError on an unreadable file (weights-digest reports those)."""
    index = [_index(map(Path, files)) for files in sets]
    segs = [SegmentDelta() for _ in index[1:]]
    compared: list[list[str]] = [[] for _ in segs]  # per segment, the tensors measured, by name
    for k, seg in enumerate(segs):
        prev, nxt = index[k], index[k + 1]
        seg.structural = sorted(set(prev) ^ set(nxt))
        for name in sorted(set(prev) & set(nxt)):
            (_, pe), (_, ne) = prev[name], nxt[name]
            if pe.shape != ne.shape or pe.dtype != ne.dtype:
                seg.structural.append(f"{name} {pe.dtype}{list(pe.shape)} -> {ne.dtype}{list(ne.shape)}")
                continue
            if ne.dtype not in FLOAT_DTYPES:
                continue
            itemsize = np.dtype(FLOAT_DTYPES[ne.dtype]).itemsize
            for path, e in (prev[name], nxt[name]):
                if math.prod(e.shape) * itemsize != e.end - e.start or any(d < 0 for d in e.shape):
                    raise DigestError(f"{path}: tensor {name!r} shape {list(e.shape)} does not match its {e.end - e.start} data bytes")
            compared[k].append(name)
    measured: dict[tuple[str, int], TensorDelta] = {}
    for name in sorted({n for names in compared for n in names}):
        ks = [k for k, names in enumerate(compared) if name in names]  # ascending
        while ks:  # each run of consecutive segments that measure this tensor, all its sets in step
            run = [ks.pop(0)]
            while ks and ks[0] == run[-1] + 1:
                run.append(ks.pop(0))
            members = [index[k][name] for k in range(run[0], run[-1] + 2)]
            measured.update(((name, k), t) for k, t in zip(run, _tensor_deltas(members)))
    for k, seg in enumerate(segs):
        seg.tensors = [measured[(name, k)] for name in compared[k]]
    return segs


def robust_outliers(values: list[float]) -> list[tuple[int, float]]:
    """(index, robust z) of the values that are high outliers against the others, in log space.

    Needs MIN_PROFILE_SEGMENTS values; an outlier must also be OUTLIER_RATIO times the median."""
    if len(values) < MIN_PROFILE_SEGMENTS or any(not (v > 0 and math.isfinite(v)) for v in values):
        return [(i, math.inf) for i, v in enumerate(values) if not math.isfinite(v)]
    logs = [math.log(v) for v in values]
    med = statistics.median(logs)
    mad = statistics.median(abs(x - med) for x in logs) * 1.4826
    out = []
    for i, x in enumerate(logs):
        z = (x - med) / mad if mad > 0 else (math.inf if x > med else 0.0)
        if z > OUTLIER_Z and x - med > math.log(OUTLIER_RATIO):
            out.append((i, z))
    return out


def by_component(names: Iterable[str]) -> str:
    """'vision.* 14 tensors, text.* 2 tensors': names grouped by their first dotted segment."""
    groups: dict[str, int] = {}
    for n in names:
        head = n.split(".", 1)[0] + (".*" if "." in n else "")
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{g} {k} tensor{'s' if k != 1 else ''}" for g, k in sorted(groups.items(), key=lambda x: (-x[1], x[0])))
