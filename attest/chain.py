"""The append-only, hash-linked chain (`chain.jsonl`): one signed Sigstore bundle per line.

Each statement's predicate carries the chain's `run_id`, its `sequence` (0, 1, 2 ...) and
`previous`, the sha256 of the previous line's bytes (without the newline), so removing,
inserting or reordering lines breaks the links. Appends are a single write of one whole line
followed by fsync; a reader stops at a torn final line (no trailing newline) and reports it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attest import failpoints, inputs, jsonread
from attest.dsse import EnvelopeError, open_bundle, sign_statement
from attest.errors import KaiError
from attest.signing import Signer
from attest.statements import build_statement

# A chain line above this size is refused by the reader (a statement is a few KB to a few MB).
MAX_LINE_BYTES = 64 << 20
MAX_CHAIN_BYTES = 4 << 30  # what read_chain loads at most (the verifier passes its policy's max_chain_bytes)


class ChainError(KaiError, ValueError):
    """The chain file is unreadable or not well formed; the message names file and line."""


@dataclass
class Entry:
    lineno: int  # 1-based line number in the file
    raw: bytes  # the line without its newline
    bundle: dict[str, Any]
    payload: bytes
    signatures: list[tuple[str, bytes]]
    statement: dict[str, Any]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def predicate(self) -> dict[str, Any]:
        p = self.statement.get("predicate")
        return p if isinstance(p, dict) else {}

    @property
    def kind(self) -> str:
        return str(self.predicate.get("kind", ""))


def read_chain(path: str | os.PathLike[str], max_bytes: int = MAX_CHAIN_BYTES) -> tuple[list[Entry], bool]:
    """Parse every whole line. Returns (entries, torn_tail). Raises ChainError on a malformed line:
    each line and its DSSE payload go through the strict reader (attest.jsonread: no duplicate
    keys, bounded integers, finite numbers, bounded nesting)."""
    path = Path(path)
    try:
        data = inputs.read_bytes(path, max_bytes)
    except inputs.InputError as e:
        raise ChainError(f"{e} (the chain)") from None
    lines = data.split(b"\n")
    torn = lines[-1] != b""
    lines = lines[:-1]  # the empty string after the last newline, or the torn tail
    entries = []
    for i, raw in enumerate(lines, start=1):
        if len(raw) > MAX_LINE_BYTES:
            raise ChainError(f"{path}:{i}: line of {len(raw)} bytes exceeds the {MAX_LINE_BYTES}-byte limit")
        try:
            bundle = jsonread.loads(raw, f"{path}:{i}", MAX_LINE_BYTES)
            payload, sigs, st = open_bundle(bundle)
        except jsonread.JsonReadError as e:
            raise ChainError(str(e)) from None
        except EnvelopeError as e:
            raise ChainError(f"{path}:{i}: {e}") from None
        entries.append(Entry(i, raw, bundle, payload, sigs, st))
    return entries, torn


def set_aside_torn_tail(chain: Path) -> bool:
    """Move an interrupted final append out of the chain file. Returns True if there was one."""
    data = chain.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n") + 1
    with open(chain.with_name(chain.name + ".torn"), "ab") as f:
        f.write(data[cut:] + b"\n")
    with open(chain, "r+b") as f:
        f.truncate(cut)
        os.fsync(f.fileno())
    return True


class ChainWriter:
    """Appends signed statements to a chain file; one writer (rank 0) at a time."""

    def __init__(self, path: str | os.PathLike[str], signer: Signer, run_id: str) -> None:
        self.path = Path(path)
        self.signer = signer
        self.run_id = run_id
        self.sequence = 0
        self.previous: str | None = None
        if self.path.exists():
            entries, torn = read_chain(self.path)
            if torn:
                raise ChainError(f"{self.path}: ends in a torn line; run `kai-attest verify` on it first")
            if entries:
                last = entries[-1]
                if last.predicate.get("run_id") != run_id:
                    raise ChainError(
                        f"{self.path}: belongs to run {last.predicate.get('run_id')!r}, not {run_id!r}"
                    )
                self.sequence = int(last.predicate["sequence"]) + 1
                self.previous = last.digest
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, kind: str, subjects: list[dict[str, Any]], predicate: dict[str, Any]) -> dict[str, Any]:
        pred = {**predicate, "run_id": self.run_id, "sequence": self.sequence, "previous": self.previous}
        statement = build_statement(kind, subjects, pred)
        line = json.dumps(sign_statement(statement, self.signer), sort_keys=True, separators=(",", ":")).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line + b"\n")
            if os.environ.get("KAI_FAILPOINT", "").startswith("chain-append-torn"):
                os.write(fd, view[: len(view) // 2])  # half a line reaches the disk, then the process dies
                failpoints.reached("chain-append-torn")
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        failpoints.reached("chain-appended")
        self.previous = hashlib.sha256(line).hexdigest()
        self.sequence += 1
        return statement
