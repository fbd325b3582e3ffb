"""The bundle format holds: tests/golden/v1/, a bundle written once (tests/golden/make_golden.py) and
checked in, passes `kai-attest verify` of this version, and each tampering of it fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bundlefactory import DERIVER

import attest.verify as verify

GOLDEN = Path(__file__).resolve().parent / "golden" / "v1"


@pytest.fixture(autouse=True)
def _factory_deriver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(verify.DERIVERS, DERIVER, "bundlefactory")


def _verify(root: Path) -> verify.Report:
    return verify.verify_bundle(root, [str(GOLDEN / "keys/signing-key.pub.pem")])


def test_the_golden_bundle_passes_every_check() -> None:
    r = _verify(GOLDEN)
    # every check holds; its synthetic deriver has no replay implementation, so nothing was recomputed
    assert r.ok and r.verdict == "incomplete" and r.exit_code == 4, [f.line() for f in r.failed]
    assert "cannot replay" in r.not_recomputed[0]
    ran = {f.check for f in r.findings if not f.skipped}
    assert {"statement-format", "signature", "chain-sequence", "chain-link", "statement-order", "subject-digest",
            "weights-digest", "run-config", "genesis", "trajectory", "release", "data-lineage", "data-licence"} <= ran


@pytest.mark.parametrize(("path", "edit", "check"), [
    ("checkpoints/step-000002/model.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1]), "subject-digest"),
    ("config/run.yaml", lambda b: b.replace(b"seed: 7", b"seed: 8"), "run-config"),
    ("chain.jsonl", lambda b: b"\n".join(b.split(b"\n")[:3] + b.split(b"\n")[4:]), "chain-sequence"),
])
def test_an_edit_to_the_golden_bundle_fails_its_check(tmp_path: Path, path: str, edit, check: str) -> None:
    root = tmp_path / "b"
    shutil.copytree(GOLDEN, root)
    (root / path).write_bytes(edit((root / path).read_bytes()))
    assert check in {f.check for f in _verify(root).failed}


def test_the_golden_chain_is_the_documented_v1_format() -> None:
    lines = (GOLDEN / "chain.jsonl").read_bytes().splitlines()
    kinds = [json.loads(line)["dsseEnvelope"]["payloadType"] for line in lines]
    assert len(lines) == 8 and set(kinds) == {"application/vnd.in-toto+json"}
    assert json.loads(lines[0])["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
