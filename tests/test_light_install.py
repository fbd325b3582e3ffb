"""The evaluator's light install (`pip install kai-train`, no extras, no torch) verifies a real
bundle: `make test-light` builds `.venv-light` and runs this torch-free tier (`-m light`) from the
main venv, which trains the demo bundle (tests/conftest.py `demo_run`); every verification here
runs in the light venv's own interpreter, outside the source tree, where torch is absent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIGHT = Path(os.environ.get("KAI_LIGHT_VENV", REPO / ".venv-light"))
pytestmark = pytest.mark.light


@pytest.fixture(scope="module")
def light_bin() -> Path:
    if not (LIGHT / ".installed").exists():
        pytest.skip(f"no light install at {LIGHT}: `make test-light` builds it")
    return LIGHT / "bin"


def light_run(light_bin: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a light-venv command from a folder outside the source tree, without PYTHONPATH: only
    what `pip install kai-train` installed is importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(light_bin / cmd[0]), *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_light_install_has_no_torch_and_imports_the_verifier(light_bin: Path, tmp_path: Path) -> None:
    code = ("import importlib.util, sys, attest.verify, kai_train.initspec, kai_train.modelspec; "
            "print(importlib.util.find_spec('torch') is None, 'torch' in sys.modules, kai_train.initspec.__file__)")
    p = light_run(light_bin, tmp_path, "python", "-c", code)
    assert p.returncode == 0, p.stderr
    absent, imported, where = p.stdout.split()
    assert (absent, imported) == ("True", "False")
    assert str(LIGHT) in where  # the installed package, not the source tree


def verify_json(light_bin: Path, cwd: Path, bundle: Path, key: Path) -> tuple[int, dict, str]:
    p = light_run(light_bin, cwd, "kai-attest", "verify", str(bundle), "--trust", str(key), "--json")
    assert p.stdout, p.stderr
    return p.returncode, json.loads(p.stdout), p.stderr


def genesis_of(report: dict) -> dict:
    (g,) = [f for f in report["findings"] if f["check"] == "genesis"]
    return g


@pytest.mark.slow
def test_light_install_verifies_a_trained_bundle(light_bin: Path, demo_run: Path, tmp_path: Path) -> None:
    rc, report, err = verify_json(light_bin, tmp_path, demo_run / "bundle", demo_run / "keys/signing-key.pub.pem")
    g = genesis_of(report)
    assert g["ok"] and not g["skipped"] and "re-derived" in g["detail"], g
    failed = [f"{f['check']}: {f['expected']} / {f['found']} {f['detail']}" for f in report["findings"]
              if not f["ok"] and not f["skipped"]]
    # every check holds; without torch nothing can be replayed here: INCOMPLETE (exit 4), never FAIL, never PASS
    assert rc == 4 and report["verdict"] == "incomplete" and not failed, f"exit {rc}; failed: {failed}\n{err[-2000:]}"
    (replay,) = [f for f in report["findings"] if f["check"] == "replay"]
    assert replay["skipped"] and "torch is not installed" in replay["detail"], replay


def test_light_install_re_derives_a_v2_genesis_and_names_the_extra_for_v1(light_bin: Path, tmp_path: Path) -> None:
    """A synthetic bundle (tests/bundlefactory.py) with a kai-init/v2 genesis re-derives without
    torch; the same with a kai-init/v1 genesis fails with a line naming kai-train[train]."""
    from bundlefactory import make_bundle
    from test_genesis_v2 import v2_bundle

    from attest.digest import merkle_root
    from kai_train import init
    from kai_train.genesis import recipe
    from kai_train.init import build_genesis_model
    from kai_train.model import ModelConfig
    from kai_train.weights import state_dict_leaves

    root, priv = v2_bundle(tmp_path / "v2")
    _, report, _ = verify_json(light_bin, tmp_path, root, priv.parent / "signing-key.pub.pem")
    g = genesis_of(report)
    assert g["ok"] and "re-derived" in g["detail"], g

    leaves = state_dict_leaves(build_genesis_model(ModelConfig(), 7, init.RECIPE_V1)[0].state_dict())

    def v1(st: list[dict]) -> None:
        s = next(s for s in st if s["predicate"].get("recipe"))
        s["predicate"].update(recipe=recipe(ModelConfig(), 7, init.RECIPE_V1), weights_root=merkle_root(leaves),
                              tensors={n: {"digest": d} for n, d in leaves.items()})

    root, priv = make_bundle(tmp_path / "v1" / "b", steps=(2,), release=False, mutate=v1)
    rc, report, _ = verify_json(light_bin, tmp_path, root, priv.parent / "signing-key.pub.pem")
    g = genesis_of(report)
    assert not g["ok"] and "install kai-train[train]" in g["found"] + g["detail"], g
    assert rc == 1
