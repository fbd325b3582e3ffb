"""DeepSpeed's JIT build folder is per environment, and a build lock left by a killed process is
cleared instead of making every later start wait forever."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kai_train import extensions


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "py311_cpu/deepspeed_shm_comm/lock", tmp_path / "py311_cpu/other_op/lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    then = time.time() - extensions.STALE_LOCK_S - 60
    os.utime(old, (then, then))
    assert extensions.prepare() == tmp_path
    assert not old.exists() and fresh.exists()
    assert str(old) in capsys.readouterr().err


def test_without_a_setting_the_build_folder_belongs_to_the_python_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    code = "from kai_train.extensions import prepare; import os; prepare(); print(os.environ['TORCH_EXTENSIONS_DIR'])"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert Path(p.stdout.strip()) == Path(sys.prefix) / "torch_extensions"
