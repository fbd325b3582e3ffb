"""The wheel works on its own: built from this tree, installed into a fresh venv, and used from a
folder outside the source tree: kai-data, a short 2-rank torchrun training, bundle, verify.

What is under test is the wheel: the packages, the configs inside them (pkg://kai_train.conf), the
entry points and their metadata. Its dependencies (torch, DeepSpeed and the `train` extra) are this
test environment's, reached through a path entry placed after the fresh venv's own site-packages,
so the wheel's kai-train is the one imported and nothing is reinstalled (dependency resolution of
`pip install .` is exercised by the light install that `make test` builds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")
import torch

from conftest import REPO, free_port

pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def test_a_wheel_in_a_fresh_venv_builds_data_trains_under_torchrun_and_verifies(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
        str(REPO)], tmp_path, base)
    wheel = next((tmp_path / "dist").glob("kai_train-*.whl"))
    venv = tmp_path / "venv"
    sh([sys.executable, "-m", "venv", str(venv)], tmp_path, base)
    sh([str(venv / "bin/pip"), "install", "-q", "--no-deps", str(wheel)], tmp_path, base)
    # the dependencies: this environment's site-packages, after the venv's own (a plain path entry:
    # its .pth files, such as the editable kai-train of this checkout, are not processed)
    deps = Path(torch.__file__).resolve().parent.parent
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "zz_test_dependencies.pth").write_text(f"{deps}\n")
    # the JIT-built DeepSpeed op of this environment, copied (never shared: a build lock must not span venvs)
    ext = tmp_path / "torch_extensions"
    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")
    if built.is_dir():
        shutil.copytree(built, ext, ignore=shutil.ignore_patterns("lock"))

    work = tmp_path / "work"  # no source tree here: everything comes from the installed wheel
    work.mkdir()
    env = {**base, "PATH": f"{venv / 'bin'}:{base['PATH']}", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(ext)}
    where = sh(["python", "-c", "import kai_train.conf, data_pipelines, attest; print(kai_train.conf.__file__, "
                "data_pipelines.__file__, attest.__file__)"], work, env)
    assert all(p.startswith(str(venv)) for p in where.stdout.split()), where.stdout
    assert "kai-data: turn declared sources" in sh(["kai-data", "--help"], work, env).stdout

    sh(["kai-attest", "keygen", "run/keys"], work, env)
    sh(["kai-data", "out_dir=run", "data.n_text=80", "data.n_image=8", "data.n_audio=8"], work, env)
    sh(["python", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "kai_train.train", "run_dir=run",
        "train.steps=2", "train.ckpt_every=2", "train.micro_batch=2", "train.eval_every=0", "wandb.mode=disabled"],
       work, env)
    sh(["kai-attest", "bundle", "run"], work, env)
    v = sh(["kai-attest", "verify", "run/bundle", "--trust", "run/keys/signing-key.pub.pem"], work, env)
    assert v.stdout.splitlines()[-1].startswith("verdict: PASS"), v.stdout
