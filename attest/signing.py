"""Signing back-ends behind one small interface.

A `Signer` has a `keyid` and signs bytes; a `Verifier` checks a signature for a keyid. The PEM
back-end (ECDSA P-256 with SHA-256, the default for air-gapped clusters) lives here; the keyid is
the sha256 of the DER SubjectPublicKeyInfo. The other back-ends keep the same interface and the
same signature format: `attest.pkcs11` (a key in an HSM token), `attest.keyless` (Sigstore
Fulcio + Rekor, networked clusters only); `attest.signers.make_signer` picks one from config.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attest import inputs
from attest.errors import KaiError
from attest.layout import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME

MAX_KEY_BYTES = 1 << 20  # a PEM key file read by the verifier or signer



class SigningKeyError(KaiError, ValueError):
    """A key file is missing or unusable; the message names the file."""


class SignerError(KaiError, ValueError):
    """A signing back-end cannot be set up or cannot sign; one line naming the back-end and problem."""


class Signer(Protocol):
    keyid: str

    def sign(self, data: bytes) -> bytes: ...

    def public_pem(self) -> bytes: ...


def keyid_of(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


class PemSigner:
    """ECDSA P-256 private key from a PEM file."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise SigningKeyError(f"signing key must be ECDSA P-256, got {key.curve.name}")
        self._key = key
        self.keyid = keyid_of(key.public_key())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PemSigner:
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(inputs.read_bytes(path, MAX_KEY_BYTES), password=None)
        except inputs.InputMissing:
            raise SigningKeyError(f"{path}: signing key not found (make one with `kai-attest keygen DIR`)") from None
        except inputs.InputError as e:
            raise SigningKeyError(str(e)) from None
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise SigningKeyError(f"{path}: not an unencrypted PEM private key ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SigningKeyError(f"{path}: signing key must be ECDSA P-256")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class PublicKeyVerifier:
    """Verifies ECDSA P-256 signatures for one public key."""

    def __init__(self, key: ec.EllipticCurvePublicKey, source: str = "") -> None:
        self._key = key
        self.keyid = keyid_of(key)
        self.source = source

    @classmethod
    def from_pem(cls, pem: bytes, source: str = "") -> PublicKeyVerifier:
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise SigningKeyError(f"{source}: not a PEM public key ({e})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SigningKeyError(f"{source}: public key must be ECDSA P-256")
        return cls(key, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PublicKeyVerifier:
        path = Path(path)
        try:
            return cls.from_pem(inputs.read_bytes(path, MAX_KEY_BYTES), str(path))
        except inputs.InputError as e:
            raise SigningKeyError(f"{e} (a public key)") from None

    def verify(self, data: bytes, signature: bytes) -> bool:
        try:
            self._key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return True
        except InvalidSignature:
            return False


def keygen(out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new P-256 key pair; refuses to overwrite an existing private key."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    if priv_path.exists():
        raise SigningKeyError(f"{priv_path}: already exists; refusing to overwrite a signing key")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(PemSigner(key).public_pem())
    return priv_path, pub_path
