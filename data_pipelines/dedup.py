"""Exact and near-duplicate removal over a stream of normalized records.

- exact: a record whose content (modality, text, image bytes, audio samples) hashes to a key
  already seen is removed, whatever its modality or source;
- near (text records only): MinHash over character k-shingles of the case-folded text, indexed
  in a MinHash LSH (`datasketch`); a candidate the index returns is a duplicate when the estimated
  Jaccard similarity with it is at least `threshold`.

The first occurrence in stream order is kept, so the outcome is a pure function of the record
order and the config. State lives in memory: a 32-byte key per record, plus `num_perm` 32-bit
hash values and the LSH bands per text record (about 1 KiB at `num_perm=128`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasketch import MinHash, MinHashLSH


SCHEME = "affine32"  # datasketch's permutation scheme, fixed: another scheme gives other signatures


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
        if self.num_perm < 16 or self.shingle < 1:
            raise ValueError(f"dedup.num_perm must be >= 16 and dedup.shingle >= 1, got {self.num_perm}, {self.shingle}")


def content_key(record: dict[str, Any]) -> bytes:
    """sha256 over the record's content, not its id: equal content gives an equal key."""
    h = hashlib.sha256()
    for part in (record["modality"].encode(), record["text"].encode("utf-8"),
                 record.get("image") or b"",
                 b"" if record.get("audio") is None else np.asarray(record["audio"], dtype="<f4").tobytes()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def shingles(text: str, k: int) -> set[bytes]:
    """Character k-grams of the case-folded, whitespace-collapsed text (works for Hangul and Latin)."""
    t = " ".join(text.casefold().split())
    if len(t) <= k:
        return {t.encode("utf-8")}
    return {t[i:i + k].encode("utf-8") for i in range(len(t) - k + 1)}


class Deduper:
    """Feed records in order with `check`; it says whether each is a duplicate and remembers it if not."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.seen: set[bytes] = set()
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm) if cfg.near else None
        # permutations drawn once from the seed and shared; signatures kept as 32-bit hash values
        self._perms = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME).permutations
        self.signatures: dict[str, np.ndarray] = {}
        self.removed: Counter[str] = Counter()

    def check(self, record: dict[str, Any]) -> str | None:
        """None if `record` is new (and is now remembered), else the reason: "exact" or "near"."""
        key = content_key(record)
        if self.cfg.exact and key in self.seen:
            self.removed["exact"] += 1
            return "exact"
        if self.lsh is not None and record["modality"] == "text":
            m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, permutations=self._perms, scheme=SCHEME)
            m.update_batch(sorted(shingles(record["text"], self.cfg.shingle)))
            sig = m.hashvalues.astype(np.uint32)
            if any(float(np.mean(sig == self.signatures[c])) >= self.cfg.threshold for c in sorted(self.lsh.query(m))):
                self.removed["near"] += 1
                return "near"
            self.lsh.insert(record["id"], m)
            self.signatures[record["id"]] = sig
        if self.cfg.exact:
            self.seen.add(key)
        return None
