"""Where DeepSpeed builds its JIT C++ ops, and recovery from a build a kill interrupted.

DeepSpeed compiles C++ ops with torch's cpp_extension at first use (CPU Adam for optimizer
offload; its shared-memory collective is never built here: `kai_train.engine.init_distributed`
turns it off, training does not use it), under a lock *file* in the build folder. A process killed mid-build leaves that file behind and
every later start waits on it forever. Two rules keep a machine usable:

* one build folder per Python environment (`<sys.prefix>/torch_extensions`, unless the user set
  TORCH_EXTENSIONS_DIR), so two venvs never share, or wait on, each other's builds;
* a lock file older than STALE_LOCK_S (a build here takes well under a minute) is a leftover of a
  killed build: it is removed with one line on stderr before DeepSpeed starts.

`prepare()` runs at the top of every entry point that may import DeepSpeed (the trainer, the replay
plug-in), before the import. torch-free.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STALE_LOCK_S = 600.0


def extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def stale_locks(root: Path, now: float | None = None, max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """Build lock files under `root` older than `max_age_s`."""
    now = time.time() if now is None else now
    out = []
    for lock in root.glob("**/lock") if root.is_dir() else ():
        try:
            if now - lock.stat().st_mtime > max_age_s:
                out.append(lock)
        except FileNotFoundError:
            continue  # another process finished its build meanwhile
    return out


def prepare() -> Path:
    """Pin the per-environment build folder and clear stale build locks; returns the folder."""
    root = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    for lock in stale_locks(root):
        try:
            lock.unlink()
            print(f"kai-train: removed {lock}: a JIT build lock left by a killed process "
                  f"(older than {STALE_LOCK_S:.0f} s)", file=sys.stderr)
        except FileNotFoundError:
            pass
    return root
