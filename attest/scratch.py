"""The verifier's own scratch folder, and every library cache pointed into it while a verify runs.

`kai-attest verify` may import torch (the genesis deriver), run a replay under torchrun, or load
the data pipelines; those libraries write caches of their own (torch inductor writes
`$TMPDIR/torchinductor_<user>` as soon as a model is built, triton, matplotlib, numba and
Hugging Face datasets have their own). A verification must leave the evaluator's machine as it
found it, so `verifier_scratch` makes one fresh folder, points `TMPDIR` (and `TEMP`, `TMP`, and
Python's cached `tempfile.tempdir`) and each cache variable in `CACHE_VARS` into it, sets them
before anything is imported or started, restores every variable afterwards and removes the folder.
Subprocesses (a replay) inherit the same variables.

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


@contextmanager
def verifier_scratch(prefix: str = "kai-verify-") -> Iterator[Path]:
    """Yield a fresh folder under the current temp folder; while inside, temp files and library
    caches go into it. Everything is restored and the folder removed on exit, error or not."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
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
