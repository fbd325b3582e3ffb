"""The verifier's reading layer: every bundle file is read through `safe_file`, hashed once, in parallel.

Several checks need the same digests (subject-digest the file sha256, weights-digest the per-tensor
leaves of the same safetensors file, oms-signature the sha256 of every file of a checkpoint
folder). `FileDigests` computes the file sha256 and, for safetensors, the tensor leaves in one
sequential read (`attest.digest.hash_safetensors`), and caches both; `prefetch` fills the cache for
many files with a small thread pool (hashlib, numpy and file reads release the GIL), so a full
verify costs about one sha256 pass over the bundle's bytes per core. Two refinements:

- a weights file the chain declares with the same sha256 as another (the export is a copy of the
  last checkpoint's weights) gets its file sha256 alone; when it matches the first copy's, the
  bytes are the same and so are the leaves (otherwise the leaves are computed as for any file);
- other bulk work (the trajectory check's update norms) joins the same pool, and the jobs start
  largest first, so both cores stay busy until the last one ends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from attest.bundle import safe_file
from attest.errors import KaiError
# PARALLEL_BYTES: also the size below which a thread pool costs more than it saves (checks_model uses it).
from attest.digest import PARALLEL_BYTES, DigestError, hash_safetensors, safetensors_leaves, sha256_file


def workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class FileDigests:
    """Cached sha256 and tensor leaves of bundle files, by bundle-relative name."""

    def __init__(self, root: Path, max_file_bytes: int) -> None:
        self.root = root
        self.max_file_bytes = max_file_bytes
        self._sha: dict[str, str] = {}
        self._leaves: dict[str, dict[str, str]] = {}
        self._by_path: dict[str, str] = {}  # absolute path -> sha256, for oms.cross_check
        self._lock = threading.Lock()
        self.overlays: list[Path] = []  # challenge packs: read only for names the bundle lacks

    def path(self, name: str) -> Path:
        """The file's path; FileNotFoundError or BundlePathError (outside, symlink, too big). A name
        the bundle lacks is looked up in the packs (attest.challenge), in order, under the same rules."""
        try:
            return safe_file(self.root, name, self.max_file_bytes)
        except FileNotFoundError:
            for root in self.overlays:
                try:
                    return safe_file(root, name, self.max_file_bytes)
                except FileNotFoundError:
                    continue
            raise

    def _fill(self, name: str) -> None:
        p = self.path(name)
        if name.endswith(".safetensors"):
            try:
                sha, leaves = hash_safetensors(p)
            except DigestError:
                sha, leaves = sha256_file(p), None
            with self._lock:
                if leaves is not None:
                    self._leaves[name] = leaves
                self._sha[name] = sha
                self._by_path[str(p)] = sha
            return
        sha = sha256_file(p)
        with self._lock:
            self._sha[name] = sha
            self._by_path[str(p)] = sha

    def sha256(self, name: str) -> str:
        if name not in self._sha:
            self._fill(name)
        return self._sha[name]

    def leaves(self, names: Iterable[str]) -> dict[str, str]:
        """Tensor leaves of one weight set split over `names` (DigestError naming the file)."""
        out: dict[str, str] = {}
        for n in names:
            if n not in self._leaves:
                self._fill(n)
            if n not in self._leaves:  # unparsable: let the parser name the problem
                safetensors_leaves([self.path(n)])
                raise DigestError(f"{n}: not a readable safetensors file")
            for t, leaf in self._leaves[n].items():
                if t in out:
                    raise DigestError(f"{n}: tensor {t!r} appears in more than one file")
                out[t] = leaf
        return out

    def sha256_of_path(self, path: str | os.PathLike[str]) -> str:
        """For oms.cross_check, which names files by path: cached when already hashed."""
        got = self._by_path.get(str(path))
        return got if got is not None else sha256_file(path)

    def _fill_copy(self, name: str, first: str) -> None:
        """`name`, declared a copy of `first` (already hashed): its sha256, and `first`'s leaves
        when the sha256 matches (same bytes); otherwise the leaves are computed from `name` itself."""
        p = self.path(name)
        sha = sha256_file(p)
        with self._lock:
            same = self._sha.get(first) == sha and first in self._leaves
            if same:
                self._leaves[name] = self._leaves[first]
                self._sha[name] = sha
                self._by_path[str(p)] = sha
        if not same:
            self._fill(name)

    def prefetch(self, subjects: Iterable[tuple[str, str | None]],
                 progress: Callable[[int, int], None] | None = None,
                 jobs: Sequence[tuple[int, Callable[[], None]]] = ()) -> None:
        """Hash many files in parallel; errors are left for the checks to report. `subjects`: (name,
        declared sha256) pairs. `progress(done, total)` hears the bytes hashed so far after each file.
        `jobs`: other bulk work as (bytes it reads, callable), run in the same pool."""
        declared: dict[str, str | None] = {}
        for n, sha in subjects:
            if n not in self._sha:
                declared.setdefault(n, sha)
        sizes: dict[str, int] = {}
        for n in declared:
            try:
                sizes[n] = os.lstat(self.root / n).st_size
            except (OSError, ValueError):
                pass
        total, done = sum(sizes.values()), [0]

        def one(names: list[str]) -> None:
            for i, n in enumerate(names):
                try:
                    self._fill_copy(n, names[0]) if i else self._fill(n)
                except (FileNotFoundError, KaiError, OSError):  # the checks name the problem
                    pass
                if progress is not None:
                    with self._lock:
                        done[0] += sizes.get(n, 0)
                        progress(done[0], total)

        # Weights files declared with one sha256 form one group: the first is hashed in full, then
        # the copies; every other file is a group of its own.
        groups: dict[str, list[str]] = {}
        for n in sorted(declared):
            sha = declared[n]
            groups.setdefault(f"sha256 {sha}" if sha and n.endswith(".safetensors") else f"name {n}", []).append(n)
        work = [(sum(sizes.get(n, 0) for n in g), lambda g=g: one(g)) for g in groups.values()] + list(jobs)
        work.sort(key=lambda w: -w[0])  # largest first: no long job starts last
        if len(work) <= 1 or sum(w[0] for w in work) < PARALLEL_BYTES:
            for _, job in work:
                job()
            return
        with ThreadPoolExecutor(workers()) as pool:
            list(pool.map(lambda w: w[1](), work))
