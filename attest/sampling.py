"""Which training row a sampler position names: an O(1) pure function, the same in the trainer,
in replay and in the verifier. Standard library only (the evaluator's light install computes it).

Sampler `feistel-v1` (docs/bundle-format.md, "Sampler feistel-v1", has the spec and test vectors):

    permutation     `Feistel(key, n)`: a keyed 4-round Feistel network over [0, 2^(2h)) with
                    2h >= bits(n - 1), cycle-walked into [0, n): a bijection of [0, n), evaluated
                    one index at a time; no permutation is ever held in memory
    streams         without a mixture, one stream "" of every training row; with a mixture
                    {source: weight}, one stream per source (its training rows, in shard order)
    schedule        with a mixture, positions come in blocks of Q = Σ weights; block b places
                    source i (sorted by name) on exactly q_i of its Q slots, in the order of a
                    Feistel permutation keyed by (seed, b, Q): position p = b·Q + j is slot
                    u = perm_b(j); source i owns slots [c_i, c_i + q_i), and p is that source's
                    k-th position with k = b·q_i + (u - c_i)
    stream order    the k-th position of a stream of n rows reads that stream's training row
                    Feistel(key(seed, stream, k // n, n), n)(k mod n): every row once per epoch
    row ids         training rows are the global row ids (shards concatenated in the run's
                    order) not divisible by `holdout_every`; the t-th training row of a stream is
                    found through its shards' training-row counts (bisect), then
                    m = train_before(shard start) + offset, id = m + m // (h - 1) + 1 (h > 1)

Realised per-source counts over any position range follow from whole blocks (q_i each) plus at
most two partial blocks (< Q evaluations each), so the verifier recomputes them in O(Q) whatever
the corpus size, and each differs from the declared share (range length · q_i / Q) by less than
2·q_i.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

FEISTEL_V1 = "feistel-v1"
KINDS = (FEISTEL_V1,)
ROUNDS = 4
MAX_MIXTURE_TOTAL = 4096  # Σ weights: bounds the work of one partial block (< 4096 evaluations, ~20 ms)
MAX_ROWS = 1 << 62


def stream_key(seed: int, stream: str, epoch: int, n: int) -> bytes:
    """The key of stream `stream`'s permutation in `epoch` over its `n` training rows."""
    return hashlib.sha256(f"kai-sampler/{FEISTEL_V1}|{seed}|{stream}|{epoch}|{n}".encode()).digest()


def block_key(seed: int, block: int, total: int) -> bytes:
    """The key of the mixture schedule's permutation of block `block` (Q = `total` slots)."""
    return hashlib.sha256(f"kai-sampler/{FEISTEL_V1}/mixture|{seed}|{block}|{total}".encode()).digest()


class Feistel:
    """A keyed bijection of [0, n): index → index in O(1) (expected < 4 network passes)."""

    __slots__ = ("n", "half", "mask", "_rounds")

    def __init__(self, key: bytes, n: int) -> None:
        if not isinstance(n, int) or not 1 <= n <= MAX_ROWS:
            raise ValueError(f"a permutation needs 1 <= n <= 2^62, got {n!r}")
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.n, self.half, self.mask = n, bits // 2, (1 << (bits // 2)) - 1
        self._rounds = [hashlib.sha256(key + bytes([r])) for r in range(ROUNDS)]

    def _pass(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for h in self._rounds:
            f = h.copy()
            f.update(right.to_bytes(8, "little"))
            left, right = right, left ^ (int.from_bytes(f.digest()[:8], "little") & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside [0, {self.n})")
        x = self._pass(i)
        while x >= self.n:  # cycle-walking: stays a bijection of [0, n)
            x = self._pass(x)
        return x


def train_before(x: int, holdout_every: int) -> int:
    """Training rows among global row ids [0, x) (ids divisible by holdout_every are held out)."""
    return x - (-(-x // holdout_every)) if holdout_every > 0 else x


def train_id(m: int, holdout_every: int) -> int:
    """The global row id of the m-th training row (0-based)."""
    if holdout_every <= 0:
        return m
    if holdout_every == 1:
        raise ValueError("holdout_every = 1 holds out every row")
    return m + m // (holdout_every - 1) + 1


class Stream:
    """The training rows of some shards (global row ranges, in run order), t-th row → global id."""

    def __init__(self, name: str, ranges: Sequence[tuple[int, int]], holdout_every: int) -> None:
        self.name, self.h = name, holdout_every
        self.starts: list[int] = []  # train_before(shard start) per shard
        self.cum = [0]  # training rows before each shard of the stream
        for lo, hi in ranges:
            self.starts.append(train_before(lo, holdout_every))
            self.cum.append(self.cum[-1] + train_before(hi, holdout_every) - train_before(lo, holdout_every))
        self.rows = self.cum[-1]

    def row(self, t: int) -> int:
        j = bisect.bisect_right(self.cum, t) - 1
        return train_id(self.starts[j] + t - self.cum[j], self.h)


def check_mixture(mixture: Any) -> dict[str, int]:
    """A declared mixture {source name: positive whole weight}, Σ ≤ 4096; ValueError names the problem."""
    if not isinstance(mixture, Mapping) or not mixture:
        raise ValueError(f"sampler.mixture = {str(mixture)[:80]!r}: expected a mapping of source names to weights")
    out: dict[str, int] = {}
    for name, w in mixture.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"sampler.mixture: source name {str(name)[:40]!r} is not a name")
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ValueError(f"sampler.mixture.{name} = {str(w)[:40]!r}: expected a whole weight >= 1")
        out[name] = w
    if sum(out.values()) > MAX_MIXTURE_TOTAL:
        raise ValueError(f"sampler.mixture: weights add up to {sum(out.values())}, at most {MAX_MIXTURE_TOTAL}")
    return dict(sorted(out.items()))


class Schedule:
    """The mixture's per-position source choice: position → (source index, its k-th position)."""

    def __init__(self, seed: int, weights: Sequence[int]) -> None:
        self.seed, self.q = seed, list(weights)
        self.total = sum(self.q)
        self.c = [0]
        for w in self.q:
            self.c.append(self.c[-1] + w)
        self._block: tuple[int, Feistel] | None = None
        self._prefixes: dict[int, list[int]] = {}  # a checkpoint's start is the previous one's end

    def _perm(self, block: int) -> Feistel:
        got = self._block  # one read: a prefetch thread may swap it meanwhile
        if got is None or got[0] != block:
            got = self._block = (block, Feistel(block_key(self.seed, block, self.total), self.total))
        return got[1]

    def at(self, p: int) -> tuple[int, int]:
        b, j = divmod(p, self.total)
        u = self._perm(b)(j)
        i = bisect.bisect_right(self.c, u) - 1
        return i, b * self.q[i] + u - self.c[i]

    def prefix(self, p: int) -> list[int]:
        """Positions of each source among [0, p)."""
        if p in self._prefixes:
            return list(self._prefixes[p])
        b, r = divmod(p, self.total)
        out = [b * w for w in self.q]
        perm = self._perm(b) if r else None
        for j in range(r):
            assert perm is not None
            out[bisect.bisect_right(self.c, perm(j)) - 1] += 1
        if len(self._prefixes) >= 16:
            self._prefixes.pop(next(iter(self._prefixes)))
        self._prefixes[p] = list(out)
        return out


class Sampler:
    """Sampler feistel-v1 over the training shards of a run.

    `shard_rows`: rows per shard in the run's order; `shard_sources`: each shard's source name
    (needed with a mixture); `mixture`: {source: weight} or None (every training row alike)."""

    kind = FEISTEL_V1

    def __init__(self, seed: int, holdout_every: int, shard_rows: Sequence[int],
                 shard_sources: Sequence[str] | None = None, mixture: Mapping[str, int] | None = None) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed {seed!r}: expected an integer")
        self.seed, self.h = seed, holdout_every
        ranges, g = [], 0
        for r in shard_rows:
            ranges.append((g, g + int(r)))
            g += int(r)
        self.total_rows = g
        if mixture is None:
            self.mixture: dict[str, int] | None = None
            self.streams = [Stream("", ranges, holdout_every)]
            self.schedule: Schedule | None = None
        else:
            self.mixture = check_mixture(mixture)
            if shard_sources is None or len(shard_sources) != len(ranges):
                raise ValueError("a mixture needs the source of every training shard")
            unknown = sorted(set(shard_sources) - set(self.mixture))
            if unknown:
                raise ValueError(f"sampler.mixture has no weight for source(s) {unknown} of the training shards "
                                 f"(mixture: {sorted(self.mixture)})")
            self.streams = [Stream(n, [rg for rg, s in zip(ranges, shard_sources) if s == n], holdout_every)
                            for n in self.mixture]
            self.schedule = Schedule(seed, list(self.mixture.values()))
        empty = [s.name or "(all)" for s in self.streams if s.rows < 1]
        if empty:
            raise ValueError(f"no training rows in source(s) {empty}")
        self.num_rows = sum(s.rows for s in self.streams)
        self._perms: dict[int, tuple[int, Feistel]] = {}

    def _perm(self, i: int, epoch: int) -> Feistel:
        got = self._perms.get(i)
        if got is None or got[0] != epoch:
            s = self.streams[i]
            got = self._perms[i] = (epoch, Feistel(stream_key(self.seed, s.name, epoch, s.rows), s.rows))
        return got[1]

    def row(self, p: int) -> int:
        """The global row id read at position p."""
        if p < 0:
            raise IndexError(f"position {p} < 0")
        i, k = self.schedule.at(p) if self.schedule is not None else (0, p)
        s = self.streams[i]
        epoch, off = divmod(k, s.rows)
        return s.row(self._perm(i, epoch)(off))

    def rows(self, lo: int, hi: int) -> list[int]:
        return [self.row(p) for p in range(lo, hi)]

    def counts(self, lo: int, hi: int) -> list[int]:
        """Positions of each stream among [lo, hi)."""
        if self.schedule is None:
            return [hi - lo]
        a, b = self.schedule.prefix(lo), self.schedule.prefix(hi)
        return [y - x for x, y in zip(a, b)]

    def record(self, lo: int, hi: int) -> list[dict[str, Any]] | None:
        """Per source, what a checkpoint statement records for the segment [lo, hi): `name`, `weight`,
        `rows` (training rows), `consumed` (positions in the segment), `seen` (positions in [0, hi)),
        `epochs` (seen / rows: how many times the source has been read). None without a mixture."""
        if self.mixture is None:
            return None
        seg, seen = self.counts(lo, hi), self.counts(0, hi)
        return [{"name": s.name, "weight": self.mixture[s.name], "rows": s.rows, "consumed": c, "seen": t,
                 "epochs": round(t / s.rows, 6)} for s, c, t in zip(self.streams, seg, seen)]


def run_sampler(cfg: Mapping[str, Any]) -> tuple[str | None, dict[str, int] | None]:
    """(kind, mixture) a signed run config records; (None, None) when it has no `sampler` (the
    permutation sampler of earlier versions); mixture None when it declares none ({} or null). ValueError for anything else this version does not know."""
    if "sampler" not in cfg:
        return None, None
    sc = cfg.get("sampler")
    if not isinstance(sc, Mapping) or set(sc) - {"kind", "mixture"}:
        raise ValueError(f"run config sampler {str(sc)[:80]!r}: expected {{kind, mixture}}")
    if sc.get("kind") not in KINDS:
        raise ValueError(f"run config sampler.kind {str(sc.get('kind'))[:40]!r}: this version knows {list(KINDS)}")
    mixture = check_mixture(sc["mixture"]) if sc.get("mixture") else None  # {} or null: no mixture
    return str(sc["kind"]), mixture
