"""Bundle archives: `kai-attest verify bundle.tar | bundle.tar.gz` extracts safely, then verifies.

An archive from someone else is hostile input. Only plain tar and gzip-compressed tar are read
(recognised by their bytes, not their name); bzip2, xz, zstd and lzip archives are refused with one
line saying so. Only regular files and folders are extracted; absolute names, `..`, backslashes,
NUL, symlinks, hard links, devices, FIFOs and sparse members are refused, as are duplicate names
(a later member silently replacing an earlier one), more members than the limit, GNU long-name and
pax headers above `MAX_META_BYTES` (tarfile would read them into memory whole), and more bytes
than the limit: a member whose declared size would pass the limit is refused before a byte of it
is written, and the bytes actually written are counted as they stream. Where the standard library
has it (Python >= 3.11.4 / 3.12), tarfile's own `data` filter runs on every member too, as a
second opinion. Files are created with O_EXCL | O_NOFOLLOW inside a fresh temporary folder, so
nothing outside it is ever written.

`opened_bundle` also runs the whole verification inside the verifier's scratch folder
(attest.scratch): temp files and library caches go there and are removed afterwards.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attest import inputs
from attest.errors import KaiError
from attest.layout import CHAIN_NAME
from attest.verify.policy import DEFAULT_LIMITS
from attest.scratch import verifier_scratch

CHUNK = 1 << 20
MAX_META_BYTES = 1 << 20  # a GNU long name or a pax header: names and a few attributes
# Leading bytes of the compressed formats refused (name, magic).
REFUSED_COMPRESSION = (("bzip2", b"BZh"), ("xz", b"\xfd7zXZ\x00"), ("zstd", b"\x28\xb5\x2f\xfd"),
                       ("lzip", b"LZIP"), ("zip", b"PK\x03\x04"))
GZIP_MAGIC = b"\x1f\x8b"


class ArchiveError(KaiError, ValueError):
    """The archive is unreadable or holds something the verifier refuses; names archive and member."""


def is_archive(path: str | os.PathLike[str]) -> bool:
    """A bundle is a folder; a file given in its place is taken for an archive (and refused if it is not one)."""
    p = Path(path)
    return p.is_file() and not p.is_symlink()


def _check_name(archive: Path, name: str) -> list[str]:
    if not name or name.startswith("/") or "\\" in name or "\0" in name:
        raise ArchiveError(f"{archive}: member {name!r} is an absolute or not a plain POSIX name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ArchiveError(f"{archive}: member {name!r} leaves the archive folder")
    return parts


class _HeaderBoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses, before tarfile reads them, sparse members and long-name or pax
    headers above MAX_META_BYTES (tarfile reads such a header's whole body into memory)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError(f"member {self.name!r} is a sparse file; only plain files and folders are allowed")
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > MAX_META_BYTES:
            raise ArchiveError(f"a long-name or pax header of {self.size} bytes (the limit is {MAX_META_BYTES})")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _open_mode(archive: Path, f: Any) -> str:
    """'r:' or 'r:gz' from the archive's first bytes; ArchiveError for any other compression."""
    head = f.read(8)
    f.seek(0)
    if head.startswith(GZIP_MAGIC):
        return "r:gz"
    for name, magic in REFUSED_COMPRESSION:
        if head.startswith(magic):
            raise ArchiveError(f"{archive}: a {name}-compressed archive; only .tar and .tar.gz bundles are accepted")
    return "r:"


def extract_to(archive: str | os.PathLike[str], dest: str | os.PathLike[str],
               max_bytes: int = DEFAULT_LIMITS["max_bundle_bytes"],
               max_members: int = DEFAULT_LIMITS["max_archive_members"]) -> Path:
    """Extract `archive` into the (empty, existing) folder `dest`; returns the bundle root in it:
    `dest` itself, or its single top-level folder when the archive holds one."""
    archive, dest = Path(archive), Path(dest)
    data_filter = getattr(tarfile, "data_filter", None)
    seen: set[str] = set()
    written = members = 0
    try:
        with inputs.open_file(archive) as f, tarfile.open(  # type: ignore[call-overload]
                fileobj=f, mode=_open_mode(archive, f), tarinfo=_HeaderBoundedTarInfo) as tar:
            for m in tar:
                members += 1
                if members > max_members:
                    raise ArchiveError(f"{archive}: more than {max_members} members")
                parts = _check_name(archive, m.name)
                rel = "/".join(parts)
                inputs.check_name(rel, f"{archive}: member {rel[:200]!r}")
                if m.issparse():
                    raise ArchiveError(f"{archive}: member {m.name!r} is a sparse file; only plain files and folders are allowed")
                if not (m.isreg() or m.isdir()):
                    what = "symlink" if m.issym() else "hard link" if m.islnk() else "device or FIFO"
                    raise ArchiveError(f"{archive}: member {m.name!r} is a {what}; only files and folders are allowed")
                if rel in seen:
                    raise ArchiveError(f"{archive}: member {rel!r} appears twice")
                seen.add(rel)
                if data_filter is not None:
                    try:
                        data_filter(m, str(dest))
                    except tarfile.FilterError as e:
                        raise ArchiveError(f"{archive}: member {m.name!r} refused ({e})") from None
                target = dest.joinpath(*parts)
                _make_dirs(dest, parts if m.isdir() else parts[:-1])
                if m.isdir():
                    continue
                if m.size > max_bytes - written:
                    raise ArchiveError(f"{archive}: member {m.name!r} of {m.size} bytes would make more than "
                                       f"{max_bytes} bytes once extracted (policy limits.max_bundle_bytes)")
                src = tar.extractfile(m)
                if src is None:
                    raise ArchiveError(f"{archive}: member {m.name!r} has no data")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as out, src:
                    while chunk := src.read(CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ArchiveError(f"{archive}: more than {max_bytes} bytes once extracted "
                                               "(policy limits.max_bundle_bytes)")
                        out.write(chunk)
    except (tarfile.TarError, EOFError, OSError, ValueError, RecursionError, zlib.error) as e:
        if isinstance(e, ArchiveError):
            if not str(e).startswith(str(archive)):  # raised inside tarfile, before a member had a name here
                raise ArchiveError(f"{archive}: {e}") from None
            raise
        why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ArchiveError(f"{archive}: not a readable tar archive ({type(e).__name__}: {why})") from None
    tops = {n.split("/")[0] for n in seen}
    if len(tops) == 1 and not (dest / CHAIN_NAME).exists():
        only = dest / tops.pop()
        if only.is_dir():
            return only
    return dest


def _make_dirs(dest: Path, parts: list[str]) -> None:
    cur = dest
    for part in parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"{cur.relative_to(dest)}: a folder in the archive is also a file")


@contextmanager
def opened_bundle(path: str | os.PathLike[str], max_bytes: int = DEFAULT_LIMITS["max_bundle_bytes"],
                  max_members: int = DEFAULT_LIMITS["max_archive_members"]) -> Iterator[Path]:
    """Yield a bundle folder: `path` itself, or an extraction of the archive at `path` in the
    verifier's scratch folder. A path that is a file must be a tar archive (ArchiveError otherwise).
    While inside, temp files and library caches go to the scratch folder (attest.scratch), which
    is removed afterwards with everything in it."""
    with verifier_scratch() as scratch:
        if not is_archive(path):
            yield Path(path)
            return
        dest = scratch / "bundle"
        dest.mkdir()
        yield extract_to(path, dest, max_bytes, max_members)
