"""Reference registry: known public checkpoints by name, so `kai-attest lineage --registry FILE
--reference-name NAME` tests against weights an evaluator downloaded, and only against the bytes the
registry names.

A registry is one JSON file (read by the strict reader, attest/jsonread.py):

    {"format": "kai-lineage-registry/v1",
     "references": [{"name": "qwen2-0.5b", "layout": "qwen2",
                     "source": "https://huggingface.co/Qwen/Qwen2-0.5B (revision ...)",
                     "files": [{"path": "model.safetensors", "sha256": "<64 hex digits>"}]}]}

The files of entry NAME are looked for under ROOT/NAME/ (ROOT: `--registry-root`, else the folder that
holds the registry), each opened through the door (attest/inputs.py: a regular file inside that folder,
no symlink), and its sha256 is checked against the registry before any tensor is read. Unknown fields
are refused, so a misspelt field is an error, not an unchecked file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attest import inputs, jsonread
from attest.digest import DigestError, sha256_file
from attest.lineage import LineageInputError, Weights, _index_files
from attest.lineage.names import AUTO, LAYOUTS

FORMAT = "kai-lineage-registry/v1"
MAX_REGISTRY_BYTES = 1 << 20
MAX_ENTRIES = 1024
MAX_FILES = 4096  # per entry (a sharded checkpoint)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = {"name", "layout", "source", "files"}


@dataclass(frozen=True)
class Entry:
    name: str
    layout: str
    source: str  # where to obtain the files (free text, shown in errors)
    files: tuple[tuple[str, str], ...]  # (path inside ROOT/NAME, sha256 hex)


def _fail(where: str, msg: str) -> LineageInputError:
    return LineageInputError(f"{where}: {msg}")


def _entry(obj: Any, where: str, k: int) -> Entry:
    at = f"references[{k}]"
    if not isinstance(obj, dict):
        raise _fail(where, f"`{at}` must be an object, found {jsonread.type_name(obj)}")
    extra = sorted(set(obj) - _ENTRY_FIELDS)
    if extra:
        raise _fail(where, f"`{at}` has unknown field(s) {', '.join(extra)}")
    name = jsonread.field(obj, "name", str, where, at)
    if not _NAME.fullmatch(name):
        raise _fail(where, f"`{at}.name` {name[:80]!r} is not a plain folder name ([A-Za-z0-9._-], at most 128)")
    layout = jsonread.field(obj, "layout", str, where, at)
    if layout != AUTO and layout not in LAYOUTS:
        raise _fail(where, f"`{at}.layout` {layout[:40]!r} is not a known layout ({AUTO}, {', '.join(LAYOUTS)})")
    source = jsonread.field(obj, "source", str, where, at)
    files = jsonread.field(obj, "files", list, where, at)
    if not 0 < len(files) <= MAX_FILES:
        raise _fail(where, f"`{at}.files` must list 1 to {MAX_FILES} files, found {len(files)}")
    out: list[tuple[str, str]] = []
    for j, f in enumerate(files):
        fat = f"{at}.files[{j}]"
        if not isinstance(f, dict) or set(f) != {"path", "sha256"}:
            raise _fail(where, f"`{fat}` must be an object with exactly `path` and `sha256`")
        path = jsonread.field(f, "path", str, where, fat)
        digest = jsonread.field(f, "sha256", str, where, fat)
        try:
            inputs.check_name(path, f"{where}: `{fat}.path`")
        except inputs.InputError as e:
            raise LineageInputError(str(e)) from None
        if not path.endswith(".safetensors"):
            raise _fail(where, f"`{fat}.path` {path[:80]!r} is not a .safetensors file")
        if not _SHA256.fullmatch(digest):
            raise _fail(where, f"`{fat}.sha256` must be 64 lowercase hex digits")
        out.append((path, digest))
    if len({p for p, _ in out}) != len(out):
        raise _fail(where, f"`{at}.files` names a file twice")
    return Entry(name, layout, source, tuple(out))


def read_registry(path: str | Path) -> dict[str, Entry]:
    """The registry's entries by name; any problem is one LineageInputError naming the file and field."""
    where = str(path)
    try:
        doc = jsonread.load_file(path, MAX_REGISTRY_BYTES, where=where)
        fmt = jsonread.field(doc, "format", str, where)
        refs = jsonread.field(doc, "references", list, where)
    except jsonread.JsonReadError as e:
        raise LineageInputError(str(e)) from None
    if fmt != FORMAT:
        raise _fail(where, f"format {fmt[:60]!r}, expected {FORMAT!r}")
    if set(doc) != {"format", "references"}:
        raise _fail(where, f"unknown field(s) {', '.join(sorted(set(doc) - {'format', 'references'}))}")
    if len(refs) > MAX_ENTRIES:
        raise _fail(where, f"{len(refs)} references (the limit is {MAX_ENTRIES})")
    entries: dict[str, Entry] = {}
    for k, obj in enumerate(refs):
        try:
            entry = _entry(obj, where, k)
        except jsonread.JsonReadError as ex:
            raise LineageInputError(str(ex)) from None
        if entry.name in entries:
            raise _fail(where, f"reference {entry.name!r} appears twice")
        entries[entry.name] = entry
    return entries


def open_entry(entry: Entry, root: str | Path, registry: str | Path) -> Weights:
    """The entry's weights, from ROOT/NAME/, each file checked against its recorded sha256 first."""
    folder = Path(root) / entry.name
    files: list[Path] = []
    for name, want in entry.files:
        try:
            p = inputs.resolve(folder, name, where=f"{folder / name} (registry entry {entry.name!r})")
            got = sha256_file(p)
        except (inputs.InputError, DigestError) as e:
            raise LineageInputError(f"{e}; obtain it from {entry.source[:200]}") from None
        except OSError as e:
            raise LineageInputError(f"{folder / name}: cannot read ({e.strerror})") from None
        if got != want:
            raise LineageInputError(f"{p}: sha256 {got}, but {registry} records {want} for {entry.name!r}")
        files.append(p)
    return Weights(entry.name, _index_files(str(folder), files), layout=entry.layout)


def open_references(registry: str | Path, names: list[str], root: str | Path | None = None) -> list[Weights]:
    """The named entries of a registry, opened and checked."""
    entries = read_registry(registry)
    missing = [n for n in names if n not in entries]
    if missing:
        raise _fail(str(registry), f"no reference named {', '.join(map(repr, missing))} "
                    f"(it lists {', '.join(sorted(entries)) or 'none'})")
    base = Path(root) if root is not None else Path(registry).resolve().parent
    return [open_entry(entries[n], base, registry) for n in names]
