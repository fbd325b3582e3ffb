"""Every exception class kai-train defines derives from attest.errors.KaiError, the one type the entry points
catch; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

from attest.errors import KaiError

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("attest", "data_pipelines", "kai_train")


def _exception_classes() -> list[tuple[str, str]]:
    """(module, class name) of every class in the packages whose name or bases say it is an exception."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and any(
                        "Error" in ast.unparse(b) or "Exception" in ast.unparse(b) for b in node.bases):
                    found.append((module, node.name))
    return found


def test_every_project_exception_is_a_kai_error() -> None:
    classes = _exception_classes()
    assert len(classes) >= 20  # the scan found the project's exceptions (the light install has torch-free ones)
    not_kai = []
    for module, name in classes:
        try:
            mod = importlib.import_module(module)
        except ImportError:  # a torch module on the light install
            continue
        cls = getattr(mod, name)
        if not issubclass(cls, KaiError):
            not_kai.append(f"{module}.{name}")
    assert not_kai == []


def test_input_errors_stay_value_errors() -> None:
    from attest.chain import ChainError
    from attest.jsonread import JsonReadError
    from attest.signing import SigningKeyError

    for cls in (ChainError, JsonReadError, SigningKeyError):
        assert issubclass(cls, KaiError) and issubclass(cls, ValueError)


def test_kai_attest_reports_a_kai_error_as_one_line_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/signing-key.pem").write_text("not a key")
    p = subprocess.run([sys.executable, "-m", "attest.cli", "keygen", str(tmp_path / "keys")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"kai-attest: error: {tmp_path / 'keys/signing-key.pem'}: already exists; refusing to overwrite a signing key"]

