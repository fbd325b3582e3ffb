"""Digests: file sha256, per-tensor digests and the canonical weight digest.

The canonical weight digest identifies a set of weights independently of world size, ZeRO stage
and file layout. Each tensor gets a leaf digest over its name, dtype, shape and raw little-endian
bytes; the root is sha256 over the sorted `name<TAB>leaf<LF>` lines (a one-level Merkle tree, as
in OpenSSF model-signing's resource list). A verifier can re-derive and check one tensor at a time.

Everything here works on bytes: safetensors files are parsed by hand (an 8-byte header length, a
JSON header, raw data), so computing a checkpoint's canonical digest needs no torch.
`hash_safetensors` gives a weights file's sha256 and its tensor leaves in one streamed read; the
trainer and the verifier both use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attest import inputs, jsonread
from attest.errors import KaiError

CHUNK = 1 << 20
LEAF_DOMAIN = b"kai-tensor/v1\n"
ROOT_DOMAIN = b"kai-weights/v1\n"
# A safetensors header above this size is refused (the format itself caps it at 100 MB; a header
# lists about 150 bytes per tensor, so 32 MiB is some 200,000 tensors).
MAX_SAFETENSORS_HEADER = 32 << 20
MAX_TENSORS = 200_000  # tensors in one safetensors file
MAX_RANK = 16  # dimensions of one tensor
# Bytes per element of each safetensors dtype; a header naming any other dtype is refused.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
# From this file size on, the file sha256 of a one-pass hash runs on a second core (hashlib
# releases the GIL); below it a thread costs more than it saves.
PARALLEL_BYTES = 32 << 20


class DigestError(KaiError, ValueError):
    """A file could not be parsed for digesting; the message names the file and the problem."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Streamed sha256 of a file (memory bounded by one chunk)."""
    h = hashlib.sha256()
    with inputs.open_file(path) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _leaf_header(name: str, dtype: str, shape: Iterable[int]) -> bytes:
    meta = {"dtype": dtype, "name": name, "shape": [int(s) for s in shape]}
    return LEAF_DOMAIN + json.dumps(meta, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def tensor_digest(name: str, dtype: str, shape: Iterable[int], chunks: Iterable[bytes]) -> str:
    """Leaf digest of one tensor given its raw little-endian bytes in one or more chunks.

    `dtype` uses safetensors names (F32, BF16, F16, I64, ...).
    """
    h = hashlib.sha256(_leaf_header(name, dtype, shape))
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def merkle_root(leaves: dict[str, str]) -> str:
    """Canonical weight digest: sha256 over sorted `name\\tleaf\\n` lines."""
    h = hashlib.sha256(ROOT_DOMAIN)
    for name in sorted(leaves):
        h.update(f"{name}\t{leaves[name]}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    end: int


def read_safetensors_index(path: str | os.PathLike[str]) -> list[TensorEntry]:
    """Parse and sanity-check a safetensors header without torch, before any tensor byte is read.

    Refused with a DigestError naming the file (and the tensor): a header longer than
    `MAX_SAFETENSORS_HEADER` or than the file; a header that is not strict JSON (attest.jsonread:
    duplicate names, huge numbers, deep nesting); more than `MAX_TENSORS` tensors; an unknown dtype;
    a shape that is not a list of non-negative integers; data offsets outside the data region or
    whose length is not prod(shape) × the dtype's size; and tensors that overlap, alias one byte
    range, leave holes or do not cover the data region exactly (the safetensors specification's own
    rule). So the bulk readers behind it hash every data byte at most once per file. The entries
    come back sorted by their start offset."""
    path = Path(path)
    with inputs.open_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise DigestError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise DigestError(f"{path}: safetensors header length {n} is out of bounds "
                              f"(file of {size} bytes, limit {MAX_SAFETENSORS_HEADER})")
        raw = f.read(n)
    try:
        header = jsonread.loads(raw, f"{path}: safetensors header", MAX_SAFETENSORS_HEADER, max_depth=8)
    except jsonread.JsonReadError as e:
        raise DigestError(str(e)) from None
    if not isinstance(header, dict):
        raise DigestError(f"{path}: safetensors header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise DigestError(f"{path}: safetensors header lists {len(header)} tensors (the limit is {MAX_TENSORS})")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise DigestError(f"{path}: safetensors `__metadata__` is not a JSON object")
    base = 8 + n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise DigestError(f"{path}: tensor {name!r} header entry is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        width = DTYPE_SIZES.get(dtype) if isinstance(dtype, str) else None
        if width is None:
            raise DigestError(f"{path}: tensor {name!r} has unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise DigestError(f"{path}: tensor {name!r} shape is not a list of at most {MAX_RANK} non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in offsets)):
            raise DigestError(f"{path}: tensor {name!r} data_offsets is not a pair of integers")
        lo, hi = offsets
        if not 0 <= lo <= hi or base + hi > size:
            raise DigestError(f"{path}: tensor {name!r} data offsets [{lo}, {hi}) leave the file")
        if math.prod(shape) * width != hi - lo:
            raise DigestError(f"{path}: tensor {name!r} {dtype}{shape} needs {math.prod(shape) * width} bytes, "
                              f"its data offsets [{lo}, {hi}) hold {hi - lo}")
        entries.append(TensorEntry(name, dtype, tuple(shape), base + lo, base + hi))
    entries.sort(key=lambda e: (e.start, e.end))
    pos = base
    for t in entries:
        if t.start != pos:
            what = "overlaps another tensor's bytes" if t.start < pos else "leaves a gap before it"
            raise DigestError(f"{path}: tensor {t.name!r} at [{t.start - base}, {t.end - base}) {what} "
                              "(tensors must cover the data region exactly once)")
        pos = t.end
    if pos != size:
        raise DigestError(f"{path}: tensors end at byte {pos} but the file has {size} "
                          "(tensors must cover the data region exactly once)")
    return entries


def _file_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    with inputs.open_file(path) as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise DigestError(f"{path}: truncated tensor data")
            left -= len(chunk)
            yield chunk


def safetensors_leaves(paths: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """Per-tensor leaf digests of one or more safetensors files (one model split across files)."""
    leaves: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        for e in read_safetensors_index(p):
            if e.name in leaves:
                raise DigestError(f"{p}: tensor {e.name!r} appears in more than one file")
            leaves[e.name] = tensor_digest(e.name, e.dtype, e.shape, _file_range(p, e.start, e.end))
    return leaves


def safetensors_root(paths: Iterable[str | os.PathLike[str]]) -> str:
    return merkle_root(safetensors_leaves(paths))


class _BackgroundSha256:
    """A sha256 fed from a bounded queue by its own thread: the file hash of a large file runs on a
    second core while the reading thread computes the tensor leaves. Memory: 16 chunks at most."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._t = threading.Thread(target=self._run, name="kai-sha256", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            self._h.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._q.put(chunk)

    def hexdigest(self) -> str:
        self.close()
        return self._h.hexdigest()

    def close(self) -> None:
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()


def hash_safetensors(path: str | os.PathLike[str]) -> tuple[str, dict[str, str]]:
    """(file sha256, tensor leaves) of a safetensors file in one sequential read, memory bounded by
    a few chunks. The index has refused overlapping or aliased tensors, so every byte is read once.
    DigestError names the file and the problem."""
    path = Path(path)
    index = read_safetensors_index(path)  # sorted, non-overlapping, covering the data region
    fh: Any = _BackgroundSha256() if path.stat().st_size >= PARALLEL_BYTES else hashlib.sha256()
    leaves: dict[str, str] = {}
    try:
        with inputs.open_file(path) as f:
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
                h = hashlib.sha256(_leaf_header(e.name, e.dtype, e.shape))
                copy_to(e.end, h)
                leaves[e.name] = h.hexdigest()
            while chunk := f.read(CHUNK):  # trailing bytes, if any
                fh.update(chunk)
    finally:
        if isinstance(fh, _BackgroundSha256):
            fh.close()
    return fh.hexdigest(), leaves


def tree_digest(files: dict[str, str | os.PathLike[str]]) -> str:
    """Digest of a set of files by relative name (e.g. the training code): sha256 over sorted
    `name<TAB>sha256<LF>` lines."""
    h = hashlib.sha256(b"kai-tree/v1\n")
    for name in sorted(files):
        h.update(f"{name}\t{sha256_file(files[name])}\n".encode())
    return h.hexdigest()
