"""Exact and near-duplicate removal over a stream of normalized records.

- exact: a record whose content (modality, text, image bytes, audio samples) hashes to a key
  already seen is removed, whatever its modality or source;
- near (text records only): MinHash over character k-shingles of the case-folded text, indexed
  in a MinHash LSH (`datasketch`); a candidate the index returns is a duplicate when the estimated
  Jaccard similarity with it is at least `threshold`. Shingles are hashed with a vectorized
  polynomial (SHINGLE_HASH); signatures are datasketch's affine32 MinHash of those hashes,
  computed as one array operation (checked equal to datasketch's own in tests).

The first occurrence in stream order is kept, so the outcome is a pure function of the record
order and the config. State lives in memory: a 32-byte key per record, plus `num_perm` 32-bit
hash values and the LSH band entries per text record (bench/data_ingest.py --dedup measures it).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasketch import MinHash, MinHashLSH
from numpy.lib.stride_tricks import sliding_window_view


SCHEME = "affine32"  # datasketch's permutation scheme, fixed: another scheme gives other signatures
SHINGLE_HASH = "poly1000003-u32"  # how shingles are hashed before MinHash (recorded in dedup params)
DATATROVE_SCHEME = "datatrove-minhash/v1"  # the sharded form on datatrove (data_pipelines.engine)
_POLY = np.uint64(1_000_003)


def fmix32(hv: np.ndarray) -> np.ndarray:
    """The MurmurHash3 32-bit finalizer, the affine32 scheme's pre-mix (uint32 in and out, products
    wrap mod 2^32); tests/test_dedup.py checks signatures equal datasketch's own."""
    hv = hv ^ (hv >> np.uint32(16))
    hv = hv * np.uint32(0x85EBCA6B)
    hv = hv ^ (hv >> np.uint32(13))
    hv = hv * np.uint32(0xC2B2AE35)
    return hv ^ (hv >> np.uint32(16))


MAX_NUM_PERM = 4096  # MinHash permutations (a work bound: the verifier's --replay-data recomputes with them)
MAX_SHINGLE = 1024  # characters per shingle


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8   # estimated Jaccard similarity at or above which two texts are near duplicates
    num_perm: int = 128      # MinHash permutations
    shingle: int = 5         # characters per shingle
    seed: int = 1            # MinHash permutation seed (part of what makes the outcome reproducible)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup.threshold must be in (0, 1], got {self.threshold}")
        for key, lo, hi in (("num_perm", 16, MAX_NUM_PERM), ("shingle", 1, MAX_SHINGLE)):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"dedup.{key} must be a whole number in [{lo}, {hi}], got {str(v)[:40]}")


def content_key(record: dict[str, Any]) -> bytes:
    """sha256 over the record's content, not its id: equal content gives an equal key."""
    h = hashlib.sha256()
    for part in (record["modality"].encode(), record["text"].encode("utf-8"),
                 record.get("image") or b"",
                 b"" if record.get("audio") is None else np.asarray(record["audio"], dtype="<f4").tobytes()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the distinct character k-grams of the case-folded, whitespace-collapsed text
    (code points, so Hangul and Latin alike): a polynomial over each window, vectorized."""
    t = " ".join(text.casefold().split())
    cps = np.frombuffer(t.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    windows = sliding_window_view(cps, min(k, len(cps))) if len(cps) else np.zeros((1, 1), np.uint64)
    powers = _POLY ** np.arange(windows.shape[1] - 1, -1, -1, dtype=np.uint64)  # wraps mod 2^64
    h = (windows * powers).sum(axis=1, dtype=np.uint64)
    return np.unique((h ^ (h >> np.uint64(32))).astype(np.uint32))


class Deduper:
    """Feed records in order with `check`; it says whether each is a duplicate and remembers it if not."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.seen: set[bytes] = set()
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm) if cfg.near else None
        # permutations drawn once from the seed and shared; signatures kept as 32-bit hash values
        self._perms = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME).permutations
        self._a, self._b = (np.asarray(x, dtype=np.uint32) for x in self._perms)
        # signatures of the indexed texts, row i for LSH key i (int keys: a record id would be stored
        # once per band); grown by doubling
        self.signatures = np.zeros((1024, cfg.num_perm), dtype=np.uint32)
        self.indexed = 0
        self.removed: Counter[str] = Counter()

    def signature(self, text: str) -> np.ndarray:
        """The MinHash values datasketch computes for these shingle hashes (`MinHash(hashfunc=identity)
        .update_batch(...)`, scheme affine32: MurmurHash3 finalizer, then a*h+b mod 2^32 per
        permutation, then the minimum), in one (num_perm x shingles) array operation."""
        hv = fmix32(shingle_hashes(text, self.cfg.shingle))
        x = np.multiply.outer(self._a, hv)  # uint32: wraps mod 2^32, as the scheme intends
        x += self._b[:, None]
        return x.min(axis=1)

    def check(self, record: dict[str, Any]) -> str | None:
        """None if `record` is new (and is now remembered), else the reason: "exact" or "near"."""
        key = content_key(record)
        if self.cfg.exact and key in self.seen:
            self.removed["exact"] += 1
            return "exact"
        if self.lsh is not None and record["modality"] == "text":
            sig = self.signature(record["text"])
            m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, hashvalues=sig, permutations=self._perms,
                        scheme=SCHEME)
            if any(float(np.mean(sig == self.signatures[c])) >= self.cfg.threshold for c in sorted(self.lsh.query(m))):
                self.removed["near"] += 1
                return "near"
            if self.indexed == len(self.signatures):
                self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
            self.lsh.insert(self.indexed, m)
            self.signatures[self.indexed] = sig
            self.indexed += 1
        if self.cfg.exact:
            self.seen.add(key)
        return None
