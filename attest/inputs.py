"""The one door for input: every file a bundle, pack, policy, challenge, VSA, key or lineage
reference names is opened here.

What passes the door:

- a regular file (no device, FIFO, socket or directory; the last component is never a symlink:
  `O_NOFOLLOW`, and `O_NONBLOCK` so that opening a FIFO never blocks; the type is checked with
  `fstat` on the opened descriptor, so nothing can be swapped in between the check and the read);
- for a name inside a root (a bundle, a pack folder): a plain relative POSIX path (no `..`, `.`,
  empty, absolute, backslash or NUL component), opened one component at a time relative to the
  root's descriptor, every component refusing symlinks, so the file is inside the root;
- each path component at most `MAX_NAME_BYTES` bytes of UTF-8 and the whole path at most
  `MAX_PATH_BYTES`, checked before the operating system sees them (no `ENAMETOOLONG` surprise);
- a size checked with `fstat` before any byte is read, allocated blocks counted as well (a sparse
  file is charged for its apparent size), and at most `max_bytes + 1` bytes read whatever the file
  turns out to hold.

Every refusal and every `OSError` becomes one `InputError` (a `KaiError`) whose message names the
file and the problem; the CLI prints it as one line with exit status 2.

tests/test_door.py keeps raw `open()` / `Path.read_bytes()` / `Path.read_text()` out of the rest of
`attest/` for anything received (an allow-list names the few writers and trusted local reads).
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attest.errors import KaiError

MAX_NAME_BYTES = 255  # one path component (NAME_MAX on Linux and macOS)
MAX_PATH_BYTES = 4000  # a whole path (PATH_MAX is 4096 on Linux, 1024 on macOS: kept below the larger)
MAX_DEPTH = 64  # components of a name inside a root
DEFAULT_MAX_BYTES = 64 << 20  # what a caller that states no bound may read into memory

_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


class InputError(KaiError, ValueError):
    """A file the verifier was asked to read and refuses; the message names the file and the problem."""


class InputMissing(InputError):
    """The file (or a folder on its path) does not exist."""


def _label(path: object, where: str | None) -> str:
    return where or str(path)[:300]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def check_path(path: str | os.PathLike[str], where: str | None = None) -> str:
    """`path` as a string, refused when a component or the whole is too long or it holds a NUL."""
    s = os.fspath(path)
    if not isinstance(s, str):
        s = os.fsdecode(s)
    label = _label(s, where)
    if "\0" in s:
        raise InputError(f"{label}: a NUL byte in the path")
    try:
        b = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InputError(f"{label}: the path is not encodable") from None
    if len(b) > MAX_PATH_BYTES:
        raise InputError(f"{label[:120]}…: path of {len(b)} bytes (the limit is {MAX_PATH_BYTES})")
    for part in b.split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            raise InputError(f"{label[:120]}…: a path component of {len(part)} bytes (the limit is {MAX_NAME_BYTES})")
    return s


def check_name(name: object, where: str | None = None) -> list[str]:
    """The components of a name inside a root (a bundle-relative POSIX path), refused unless it is
    plain: a non-empty string, relative, no `..`/`.`/empty component, no backslash or NUL, bounded."""
    if not isinstance(name, str):
        raise InputError(f"{where or 'a name'}: a path must be a string, found {type(name).__name__}")
    label = where or repr(name[:200])
    parts = name.split("/")
    if not name or "\\" in name or "\0" in name or any(p in ("..", ".", "") for p in parts):
        raise InputError(f"{label}: path leaves the bundle (or its root folder) or is not a plain relative path")
    if len(parts) > MAX_DEPTH:
        raise InputError(f"{label}: {len(parts)} path components (the limit is {MAX_DEPTH})")
    check_path(name, label)
    return parts


def _charge(fd: int, label: str, max_bytes: int | None) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{label}: {_kind(st.st_mode)}, not a regular file")
    if max_bytes is not None:
        allocated = getattr(st, "st_blocks", 0) * 512
        if st.st_size > max_bytes or allocated > max_bytes + (1 << 20):
            raise InputError(f"{label}: {max(st.st_size, allocated)} bytes, which exceeds the {max_bytes}-byte limit")
    return st


def open_fd(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
            max_bytes: int | None = None, where: str | None = None) -> int:
    """A read-only descriptor of the regular file `path` (inside `root` when given: `path` is then a
    name relative to it). The caller closes it. InputError names the file."""
    if root is not None:
        name = os.fspath(path)
        label = where or name
        parts = check_name(name, label)
        check_path(os.path.join(os.fspath(root), name), label)
        try:
            d = os.open(os.fspath(root), _DIR_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            kind = InputMissing if e.errno == errno.ENOENT else InputError
            raise kind(f"{label}: cannot read (its folder {os.fspath(root)}: {e.strerror})") from None
        try:
            for part in parts[:-1]:
                try:
                    nd = os.open(part, _DIR_FLAGS, dir_fd=d)
                except OSError as e:
                    raise _refusal(label, e, part) from None
                os.close(d)
                d = nd
            try:
                fd = os.open(parts[-1], _FLAGS, dir_fd=d)
            except OSError as e:
                raise _refusal(label, e, parts[-1]) from None
        finally:
            os.close(d)
    else:
        label = _label(path, where)
        s = check_path(path, label)
        try:
            fd = os.open(s, _FLAGS)
        except OSError as e:
            raise _refusal(label, e, None) from None
    try:
        _charge(fd, label, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(label: str, e: OSError, part: str | None) -> InputError:
    if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and part is not None):
        return InputError(f"{label}: a symlink or a non-folder on the path ({part or 'the file'}); refused")
    if e.errno == errno.ENOENT:
        return InputMissing(f"{label}: cannot read (not found)")
    return InputError(f"{label}: cannot open ({e.strerror or e})")


def read_bytes(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES,
               root: str | os.PathLike[str] | None = None, where: str | None = None) -> bytes:
    """The whole of a regular file of at most `max_bytes` bytes (at most `max_bytes + 1` are read)."""
    label = where or (os.fspath(path) if root is None else os.fspath(path))
    fd = open_fd(path, root, max_bytes, label)
    try:
        chunks = []
        left = max_bytes + 1
        while left > 0:
            try:
                b = os.read(fd, min(left, 1 << 20))
            except OSError as e:
                raise InputError(f"{label}: cannot read ({e.strerror})") from None
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise InputError(f"{label}: larger than the {max_bytes}-byte limit")
    return data


def read_text(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES,
              root: str | os.PathLike[str] | None = None, where: str | None = None) -> str:
    """`read_bytes` decoded as UTF-8 (InputError when it is not)."""
    data = read_bytes(path, max_bytes, root, where)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where or os.fspath(path)}: not UTF-8 text (byte {e.start})") from None


_READV = hasattr(os, "readv")


class _Bounded(io.RawIOBase):
    """A raw reader over a descriptor that never returns more than `limit + 1` bytes in all."""

    def __init__(self, fd: int, label: str, limit: int | None) -> None:
        self._fd, self._label, self._left = fd, label, (None if limit is None else limit + 1)

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return os.lseek(self._fd, pos, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(b)
        if self._left is not None:
            n = min(n, self._left)
            if n <= 0:
                raise InputError(f"{self._label}: grew past its limit while read")
        try:
            if _READV:  # straight into the caller's buffer: no bytes object allocated and copied per read
                got = os.readv(self._fd, [memoryview(b)[:n]])
            else:
                data = os.read(self._fd, n)
                got = len(data)
                b[:got] = data
        except OSError as e:
            raise InputError(f"{self._label}: cannot read ({e.strerror})") from None
        if self._left is not None:
            self._left -= got
        return got

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


@contextmanager
def open_file(path: str | os.PathLike[str], max_bytes: int | None = None,
              root: str | os.PathLike[str] | None = None, where: str | None = None) -> Iterator[io.BufferedReader]:
    """A buffered binary reader of the regular file, for streaming (hashing, safetensors); never
    yields more than `max_bytes + 1` bytes when a bound is given."""
    label = where or os.fspath(path)
    fd = open_fd(path, root, max_bytes, label)
    raw = _Bounded(fd, label, max_bytes)
    with io.BufferedReader(raw, 1 << 20) as f:
        yield f  # type: ignore[misc]


def is_regular(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> bool:
    """Whether the door would open `path` (a regular file, no symlink, bounded names)."""
    try:
        os.close(open_fd(path, root))
    except InputError:
        return False
    return True


def resolve(root: str | os.PathLike[str], name: str, max_bytes: int | None = None, where: str | None = None) -> Path:
    """`root / name` after the door's checks (a regular file inside `root`, bounded): for readers
    that hand a path to a library; they then open it through `open_file`/`read_bytes` too."""
    os.close(open_fd(name, root, max_bytes, where))
    return Path(root) / name
