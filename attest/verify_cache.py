"""The verifier's reading layer: every bundle file is read through `safe_file`, hashed once, in parallel.

Several checks need the same digests (subject-digest the file sha256, weights-digest the per-tensor
leaves of the same safetensors file, oms-signature the sha256 of every file of a checkpoint
folder). `FileDigests` computes the file sha256 and, for safetensors, the tensor leaves in one
sequential read, and caches both; `prefetch` fills the cache for many files with a small thread
pool (hashlib and file reads release the GIL), so a full verify costs about one sha256 pass over
the bundle's bytes per core.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from attest.bundle import BundlePathError, safe_file
from attest.digest import CHUNK, DigestError, read_safetensors_index, safetensors_leaves, sha256_file
from attest.digest import _leaf_header as leaf_header  # noqa: PLC2701 - same package: the leaf format

# Below this many bytes a thread pool costs more than it saves.
PARALLEL_BYTES = 32 << 20


def workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class _BackgroundSha256:
    """A sha256 fed from a queue by its own thread: the file hash of a large file runs on a second
    core while the reading thread computes the tensor leaves (hashlib releases the GIL)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            self._h.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._q.put(chunk)

    def hexdigest(self) -> str:
        self._q.put(None)
        self._t.join()
        return self._h.hexdigest()


def _hash_safetensors(path: Path) -> tuple[str, dict[str, str]]:
    """(file sha256, tensor leaves) in one sequential read when the tensors tile the data area
    in order (every writer does that); otherwise two plain passes."""
    index = sorted(read_safetensors_index(path), key=lambda e: (e.start, e.end))
    if any(a.end > b.start for a, b in zip(index, index[1:])):  # overlapping tensors: hostile or odd
        return sha256_file(path), safetensors_leaves([path])
    if len({e.name for e in index}) != len(index):
        raise DigestError(f"{path}: a tensor name appears twice")
    fh: Any = _BackgroundSha256() if path.stat().st_size >= PARALLEL_BYTES else hashlib.sha256()
    leaves: dict[str, str] = {}
    with open(path, "rb") as f:
        pos = 0

        def copy_to(end: int, h: Any) -> None:
            nonlocal pos
            while pos < end:
                chunk = f.read(min(CHUNK, end - pos))
                if not chunk:
                    raise DigestError(f"{path}: truncated tensor data")
                fh.update(chunk)
                if h is not None:
                    h.update(chunk)
                pos += len(chunk)

        for e in index:
            copy_to(e.start, None)  # header and any padding
            h = hashlib.sha256(leaf_header(e.name, e.dtype, e.shape))
            copy_to(e.end, h)
            leaves[e.name] = h.hexdigest()
        while chunk := f.read(CHUNK):  # trailing bytes, if any
            fh.update(chunk)
    return fh.hexdigest(), leaves


class FileDigests:
    """Cached sha256 and tensor leaves of bundle files, by bundle-relative name."""

    def __init__(self, root: Path, max_file_bytes: int) -> None:
        self.root = root
        self.max_file_bytes = max_file_bytes
        self._sha: dict[str, str] = {}
        self._leaves: dict[str, dict[str, str]] = {}
        self._by_path: dict[str, str] = {}  # absolute path -> sha256, for oms.cross_check
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        """The file's path; FileNotFoundError or BundlePathError (outside, symlink, too big)."""
        return safe_file(self.root, name, self.max_file_bytes)

    def _fill(self, name: str) -> None:
        p = self.path(name)
        if name.endswith(".safetensors"):
            try:
                sha, leaves = _hash_safetensors(p)
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

    def prefetch(self, names: Iterable[str]) -> None:
        """Hash many files in parallel; errors are left for the checks to report."""
        todo = sorted({n for n in names if n not in self._sha})

        def one(n: str) -> None:
            try:
                self._fill(n)
            except (FileNotFoundError, BundlePathError, DigestError, OSError):
                pass

        total = 0
        for n in todo:
            try:
                total += os.lstat(self.root / n).st_size
            except (OSError, ValueError):
                pass
        if len(todo) <= 1 or total < PARALLEL_BYTES:
            for n in todo:
                one(n)
            return
        with ThreadPoolExecutor(workers()) as pool:
            list(pool.map(one, todo))
