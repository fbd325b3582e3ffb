"""Bundle archives: `kai-attest verify bundle.tar | bundle.tar.gz` extracts safely, then verifies.

An archive from someone else is hostile input. Only regular files and folders are extracted;
absolute names, `..`, backslashes, NUL, symlinks, hard links, devices and FIFOs are refused, as
are duplicate names (a later member silently replacing an earlier one), more members than the
limit and more bytes than the limit (counted as they are written, not as the headers claim).
Where the standard library has it (Python >= 3.11.4 / 3.12), tarfile's own `data` filter runs on
every member too, as a second opinion. Files are created with O_EXCL | O_NOFOLLOW inside a fresh
temporary folder, so nothing outside it is ever written.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attest.policy import DEFAULT_LIMITS

CHUNK = 1 << 20


class ArchiveError(ValueError):
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
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                members += 1
                if members > max_members:
                    raise ArchiveError(f"{archive}: more than {max_members} members")
                parts = _check_name(archive, m.name)
                rel = "/".join(parts)
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
                    raise ArchiveError(f"{archive}: more than {max_bytes} bytes once extracted")
                src = tar.extractfile(m)
                if src is None:
                    raise ArchiveError(f"{archive}: member {m.name!r} has no data")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as out, src:
                    while chunk := src.read(CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ArchiveError(f"{archive}: more than {max_bytes} bytes once extracted")
                        out.write(chunk)
    except (tarfile.TarError, EOFError, OSError, ValueError, RecursionError) as e:
        if isinstance(e, ArchiveError):
            raise
        why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ArchiveError(f"{archive}: not a readable tar archive ({type(e).__name__}: {why})") from None
    tops = {n.split("/")[0] for n in seen}
    if len(tops) == 1 and not (dest / "chain.jsonl").exists():
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
    """Yield a bundle folder: `path` itself, or a temporary extraction of the archive at `path`
    (removed afterwards). A path that is a file must be a tar archive (ArchiveError otherwise)."""
    if not is_archive(path):
        yield Path(path)
        return
    tmp = tempfile.mkdtemp(prefix="kai-bundle-")
    try:
        yield extract_to(path, tmp, max_bytes, max_members)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
