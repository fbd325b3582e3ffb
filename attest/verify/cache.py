"""The verifier's reading layer: every bundle file is read through `safe_file`, hashed once, in parallel.

Several checks need the same digests (subject-digest the file sha256, weights-digest the per-tensor
leaves of the same safetensors file, oms-signature the sha256 of every file of a checkpoint
folder). `FileDigests` computes the file sha256 and, for safetensors, the tensor leaves in one
sequential read (`attest.digest.hash_safetensors`), and caches both; `prefetch` fills the cache for
many files with a small thread pool (hashlib and file reads release the GIL), so a full verify costs
about one sha256 pass over the bundle's bytes per core.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
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

    def prefetch(self, names: Iterable[str], progress: Callable[[int, int], None] | None = None) -> None:
        """Hash many files in parallel; errors are left for the checks to report. `progress(done,
        total)` hears the bytes hashed so far after each file."""
        todo = sorted({n for n in names if n not in self._sha})
        sizes: dict[str, int] = {}
        for n in todo:
            try:
                sizes[n] = os.lstat(self.root / n).st_size
            except (OSError, ValueError):
                pass
        total, done = sum(sizes.values()), [0]

        def one(n: str) -> None:
            try:
                self._fill(n)
            except (FileNotFoundError, KaiError, OSError):  # the checks name the problem
                pass
            if progress is not None:
                with self._lock:
                    done[0] += sizes.get(n, 0)
                    progress(done[0], total)

        if len(todo) <= 1 or total < PARALLEL_BYTES:
            for n in todo:
                one(n)
            return
        with ThreadPoolExecutor(workers()) as pool:
            list(pool.map(one, todo))
