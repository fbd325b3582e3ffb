"""OpenSSF model-signing (OMS) signatures of checkpoint folders: the upstream `model_signing`
CLI accepts what we write, rejects a tampered folder, and `cross_check` agrees with it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("model_signing", reason="model-signing is not installed")
torch = pytest.importorskip("torch")

from attest.digest import sha256_file  # noqa: E402
from attest.oms import SIGNATURE_NAME, cross_check, oms_root, read_oms, sign_checkpoint_dir  # noqa: E402
from attest.signing import PublicKeyVerifier, keygen  # noqa: E402
from kai_train.weights import save_weights  # noqa: E402


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(checkpoint folder written by save_weights, its model.sig, the public key)."""
    ckpt = tmp_path / "checkpoints" / "step-000010"
    ckpt.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_weights({"tok.weight": torch.randn(64, 16, generator=g), "norm.weight": torch.ones(16)},
                 ckpt / "model.safetensors")
    priv, pub = keygen(tmp_path / "keys")
    return ckpt, sign_checkpoint_dir(ckpt, priv), pub


def upstream_verify(ckpt: Path, sig: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", "--public_key", str(pub),
                           "--signature", str(sig), str(ckpt)], capture_output=True, text=True, timeout=120)


def test_upstream_model_signing_verify_accepts_a_signed_checkpoint(signed: tuple[Path, Path, Path]) -> None:
    ckpt, sig, pub = signed
    assert sig == ckpt / SIGNATURE_NAME
    p = upstream_verify(ckpt, sig, pub)
    assert p.returncode == 0 and "Verification succeeded" in p.stdout, p.stdout + p.stderr
    assert [f.ok for f in cross_check(sig, ckpt, [PublicKeyVerifier.from_file(pub)])] == [True]
    assert not list(ckpt.parent.glob(".*.tmp"))  # the temporary signature was moved in


def test_oms_root_is_sha256_over_the_resource_digests(signed: tuple[Path, Path, Path]) -> None:
    ckpt, sig, _ = signed
    m = read_oms(sig)
    assert m.name == "step-000010"
    assert m.resources == {"model.safetensors": sha256_file(ckpt / "model.safetensors")}
    assert m.serialization["method"] == "files" and SIGNATURE_NAME in m.serialization["ignore_paths"]
    assert oms_root(sig) == hashlib.sha256(bytes.fromhex(m.resources["model.safetensors"])).hexdigest()


def test_tampered_weights_fail_upstream_verify_and_cross_check(signed: tuple[Path, Path, Path]) -> None:
    ckpt, sig, pub = signed
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    f.write_bytes(bytes(data))
    p = upstream_verify(ckpt, sig, pub)
    assert p.returncode != 0 and "Hash mismatch for" in p.stderr and "model.safetensors" in p.stderr, p.stderr
    (bad,) = cross_check(sig, ckpt)
    assert not bad.ok and bad.file.endswith("model.safetensors") and bad.found == sha256_file(f)


def test_an_unsigned_extra_file_fails_both(signed: tuple[Path, Path, Path]) -> None:
    ckpt, sig, pub = signed
    (ckpt / "optimizer.pt").write_bytes(b"not signed")
    assert upstream_verify(ckpt, sig, pub).returncode != 0
    (bad,) = cross_check(sig, ckpt)
    assert not bad.ok and bad.file.endswith("optimizer.pt") and bad.found == "an unsigned file"


def test_signature_by_another_key_fails_both(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ckpt, sig, _ = signed
    _, other = keygen(tmp_path / "other")
    assert upstream_verify(ckpt, sig, other).returncode != 0
    (bad,) = cross_check(sig, ckpt, [PublicKeyVerifier.from_file(other)])
    assert not bad.ok and bad.found == "no valid signature"


def test_a_widened_ignore_list_is_reported(signed: tuple[Path, Path, Path]) -> None:
    """ignore_paths is signed, but a policy must pin it: a signer could hide files behind it."""
    ckpt, sig, _ = signed
    import base64

    bundle = json.loads(sig.read_text())
    st = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    st["predicate"]["serialization"]["ignore_paths"].append("extra.bin")
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    sig.write_text(json.dumps(bundle))
    (bad,) = cross_check(sig, ckpt)
    assert not bad.ok and bad.found == "extra.bin"


def test_unreadable_signature_is_a_finding_not_an_exception(tmp_path: Path) -> None:
    (tmp_path / "model.sig").write_text("{not json")
    (bad,) = cross_check(tmp_path / "model.sig", tmp_path)
    assert not bad.ok and bad.expected == "an OMS v1.0 signature"


def test_digests_the_caller_computed_are_signed_instead_of_read_again(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-000002"
    ckpt.mkdir()
    save_weights({"w": torch.ones(8)}, ckpt / "model.safetensors")
    (ckpt / "notes.txt").write_text("hashed by upstream")
    priv, pub = keygen(tmp_path / "keys")
    sig = sign_checkpoint_dir(ckpt, priv, known={"model.safetensors": sha256_file(ckpt / "model.safetensors")})
    assert upstream_verify(ckpt, sig, pub).returncode == 0
    assert read_oms(sig).resources["notes.txt"] == sha256_file(ckpt / "notes.txt")
    sig = sign_checkpoint_dir(ckpt, priv, known={"model.safetensors": "00" * 32})  # taken as given, not re-read
    assert read_oms(sig).resources["model.safetensors"] == "00" * 32
    (bad,) = cross_check(sig, ckpt)
    assert not bad.ok and bad.file.endswith("model.safetensors")
