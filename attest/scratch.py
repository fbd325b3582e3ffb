"""The verifier's own scratch folder, and every library cache pointed into it while a verify runs.

`kai-attest verify` may import torch (the genesis deriver), run a replay under torchrun, or load
the data pipelines; those libraries write caches of their own (torch inductor writes
`$TMPDIR/torchinductor_<user>` as soon as a model is built, triton, matplotlib, numba and
Hugging Face datasets have their own). A verification must leave the evaluator's machine as it
found it, so `verifier_scratch` makes one fresh folder, points `TMPDIR` (and `TEMP`, `TMP`, and
Python's cached `tempfile.tempdir`) and each cache variable in `CACHE_VARS` into it, sets them
before anything is imported or started, restores every variable afterwards and removes the folder.
Subprocesses (a replay) inherit the same variables.

The folder is short whatever `TMPDIR` is: libraries put AF_UNIX sockets under `$TMPDIR`
(multiprocessing's `pymp-XXXXXXXX/listener-XXXXXXXX`, used by the data replay's worker pools), and
a socket path holds at most 104 bytes on macOS, 108 on Linux. When the evaluator's temp folder is
longer than `MAX_BASE_CHARS` (a macOS `$TMPDIR` is `/var/folders/xx/…/T/`, 49 characters or more),
the scratch folder goes under `/tmp` instead (removed afterwards all the same).

Left alone on purpose: `TORCH_EXTENSIONS_DIR` and the user's `~/.cache` (compiled DeepSpeed ops
for replay live there; they are not under `$TMPDIR` and rebuilding them on every verify would take
minutes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Environment variable -> sub-folder of the scratch folder.
CACHE_VARS = {
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
    "MPLCONFIGDIR": "matplotlib",
    "NUMBA_CACHE_DIR": "numba",
    "HF_DATASETS_CACHE": "hf-datasets",
    "CUDA_CACHE_PATH": "cuda",
}
TMP_VARS = ("TMPDIR", "TEMP", "TMP")
# The longest temp folder the scratch folder is made under; room is left for the scratch folder's
# own name, multiprocessing's socket folder and socket name (about 60 characters) under 104 bytes.
MAX_BASE_CHARS = 40
SOCKET_PATH_BYTES = 104  # sun_path on macOS (108 on Linux): every socket path under the scratch fits


def short_base() -> str:
    """The temp folder to make scratch folders under: the current one when it is short enough for
    socket paths, else /tmp (or /var/tmp) when writable."""
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) <= MAX_BASE_CHARS:
        return base
    for cand in ("/tmp", "/var/tmp"):
        if os.path.isdir(cand) and os.access(cand, os.W_OK | os.X_OK):
            return cand
    return base


@contextmanager
def verifier_scratch(prefix: str = "kai-verify-") -> Iterator[Path]:
    """Yield a fresh folder under the current temp folder; while inside, temp files and library
    caches go into it. Everything is restored and the folder removed on exit, error or not."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=short_base()))
    saved = {k: os.environ.get(k) for k in (*TMP_VARS, *CACHE_VARS)}
    saved_tempdir = tempfile.tempdir
    try:
        tmp = root / "tmp"
        tmp.mkdir()
        for k in TMP_VARS:
            os.environ[k] = str(tmp)
        for k, sub in CACHE_VARS.items():
            os.environ[k] = str(root / sub)
        tempfile.tempdir = str(tmp)
        yield root
    finally:
        tempfile.tempdir = saved_tempdir
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)
