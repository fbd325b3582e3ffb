"""Standard statements: the release's SLSA Provenance v1 is in the bundle and verified; `verify
--vsa` signs the verdict as a SLSA VSA that `check-vsa` and securesystemslib's DSSE verifier
accept with the evaluator's public key, and that says FAILED for a failing bundle."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from attest.signing import keygen
from attest.layout import SLSA_NAME
from attest.slsa import PROVENANCE_TYPE, VSA_TYPE, envelope_of
from conftest import kai_attest

pytestmark = pytest.mark.slow  # the session's demo training


def payload(path: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(path.read_text())["dsseEnvelope"]["payload"]))


@pytest.fixture()
def bundle(demo_run: Path, tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(demo_run / "bundle", b)
    return b


def export_files(bundle: Path) -> set[str]:
    """Every file of the bundle's export/, export/llama/ included, by bundle name."""
    return {f"export/{p.relative_to(bundle / 'export').as_posix()}" for p in (bundle / "export").rglob("*") if p.is_file()}


def test_release_slsa_provenance_names_every_export_file_and_passes(bundle: Path) -> None:
    st = payload(bundle / SLSA_NAME)
    assert st["predicateType"] == PROVENANCE_TYPE
    names = {s["name"] for s in st["subject"]}
    assert names == export_files(bundle)
    deps = {d["name"] for d in st["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert any(n.endswith(".parquet") for n in deps) and any(n.endswith("tokenizer.model") for n in deps)
    p = kai_attest("verify", str(bundle), "--trust", str(bundle / "keys/signing-key.pub.pem"), "--no-replay")
    assert p.returncode == 4 and "FAIL" not in p.stdout, p.stdout[-3000:]  # replay is test_replay_verdict's
    assert any(line.startswith("ok") and "slsa-provenance" in line for line in p.stdout.splitlines()), p.stdout


def test_slsa_provenance_signed_by_another_key_fails(bundle: Path, tmp_path: Path) -> None:
    from attest.dsse import sign_statement
    from attest.signing import PemSigner

    other, _ = keygen(tmp_path / "other")
    st = payload(bundle / SLSA_NAME)
    (bundle / SLSA_NAME).write_text(json.dumps(sign_statement(st, PemSigner.from_file(other))))
    p = kai_attest("verify", str(bundle), "--trust", str(bundle / "keys/signing-key.pub.pem"))
    assert p.returncode == 1
    assert any("slsa-provenance" in line and "no valid signature" in line for line in p.stdout.splitlines()), p.stdout


def test_vsa_of_a_pass_is_checked_by_check_vsa_and_securesystemslib(bundle: Path, tmp_path: Path) -> None:
    priv, pub = keygen(tmp_path / "evaluator")
    vsa = tmp_path / "vsa.json"
    p = kai_attest("verify", str(bundle), "--trust", str(bundle / "keys/signing-key.pub.pem"),
                   "--vsa", str(vsa), "--sign-key", str(priv))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    st = payload(vsa)
    assert st["predicateType"] == VSA_TYPE and st["predicate"]["verificationResult"] == "PASSED"
    assert {s["name"] for s in st["subject"]} == export_files(bundle)
    c = kai_attest("check-vsa", str(vsa), str(bundle), "--key", str(pub))
    assert c.returncode == 0 and "PASSED" in c.stdout, c.stdout + c.stderr
    assert kai_attest("check-vsa", str(vsa), str(bundle / "export"), "--key", str(pub)).returncode == 0

    sslib = pytest.importorskip("securesystemslib")
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    from attest.signing import PublicKeyVerifier

    key = SSlibKey(PublicKeyVerifier.from_file(pub).keyid, "ecdsa", "ecdsa-sha2-nistp256",
                   {"public": pub.read_text()})
    env = Envelope.from_dict(envelope_of(vsa))
    assert env.verify([key], 1) and sslib  # raises VerificationError when the signature does not hold
    _, other_pub = keygen(tmp_path / "someone-else")
    assert kai_attest("check-vsa", str(vsa), str(bundle), "--key", str(other_pub)).returncode == 1


def test_vsa_of_a_failing_bundle_says_failed_and_check_vsa_exits_1(bundle: Path, tmp_path: Path) -> None:
    priv, pub = keygen(tmp_path / "evaluator")
    (bundle / "export" / "extra.bin").write_bytes(b"unsigned")
    vsa = tmp_path / "vsa.json"
    p = kai_attest("verify", str(bundle), "--trust", str(bundle / "keys/signing-key.pub.pem"),
                   "--vsa", str(vsa), "--sign-key", str(priv))
    assert p.returncode == 1
    st = payload(vsa)
    assert st["predicate"]["verificationResult"] == "FAILED" and "release" in st["predicate"]["failed_checks"]
    c = kai_attest("check-vsa", str(vsa), str(bundle), "--key", str(pub))
    assert c.returncode == 1 and "FAILED" in c.stdout


def test_vsa_needs_a_usable_sign_key_before_verifying(bundle: Path, tmp_path: Path) -> None:
    p = kai_attest("verify", str(bundle), "--vsa", str(tmp_path / "v.json"))
    assert p.returncode == 2 and "--sign-key" in p.stderr
    p = kai_attest("verify", str(bundle), "--vsa", str(tmp_path / "v.json"), "--sign-key", str(tmp_path / "none.pem"))
    assert p.returncode == 2 and "none.pem" in p.stderr and not (tmp_path / "v.json").exists()
