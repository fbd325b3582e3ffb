"""Choosing a signing back-end from config, optional RFC 3161 timestamps, and the run's public key.

`make_signer(cfg)` reads the `attest` config group (kai_train/conf/attest/*.yaml):

    backend: pem       key: PATH                                (attest.signing.PemSigner)
    backend: pkcs11    uri: "pkcs11:token=…;object=…?module-path=…"  pin_env: VAR   (attest.pkcs11)
    backend: sigstore  staging, trust_config, identity_token        (attest.keyless, networked only)
    tsa_url: URL | null    tsa_timeout_s: seconds               (any back-end)

With `tsa_url` set, every signature is sent to that RFC 3161 Time-Stamping Authority and the
signed response goes into the entry's Sigstore bundle at
`verificationMaterial.timestampVerificationData.rfc3161Timestamps[].signedTimestamp` (base64 of
the DER TimeStampResponse, as sigstore-python writes it). The TSA is probed before the run starts,
so a TSA that cannot be reached fails at once, not at the first checkpoint. Key-mode signatures
carry no trusted time otherwise (see docs/operators-guide.md#signing).
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attest.keyless import SigstoreSigner, probe
from attest.signing import SigningKeyError, PemSigner, PublicKeyVerifier, Signer, SignerError

BACKENDS = ("pem", "pkcs11", "sigstore")


def make_signer(cfg: Mapping[str, Any]) -> Signer:
    """The signer the `attest` config asks for; raises SignerError/SigningKeyError with one line."""
    backend = cfg.get("backend")
    if backend == "sigstore" and cfg.get("tsa_url"):
        raise SignerError("attest.tsa_url: keyless signing takes its TSAs from the Sigstore trust config; leave it null")
    signer: Any
    if backend == "pem":
        signer = PemSigner.from_file(_required(cfg, "key"))
    elif backend == "pkcs11":
        from attest.pkcs11 import Pkcs11Signer

        signer = Pkcs11Signer(_required(cfg, "uri"), pin_env=cfg.get("pin_env"))
    elif backend == "sigstore":
        signer = SigstoreSigner(staging=bool(cfg.get("staging")), trust_config=cfg.get("trust_config"),
                                identity_token=cfg.get("identity_token"), timeout_s=float(cfg.get("timeout_s") or 3))
    else:
        raise SignerError(f"attest.backend: unknown back-end {backend!r} (choose one of {', '.join(BACKENDS)})")
    if cfg.get("tsa_url"):
        signer = TimestampingSigner(signer, str(cfg["tsa_url"]), float(cfg.get("tsa_timeout_s") or 5))
    return signer


def _required(cfg: Mapping[str, Any], key: str) -> str:
    value = cfg.get(key)
    if not value:
        raise SignerError(f"attest.{key}: required for backend={cfg.get('backend')}")
    return str(value)


def request_timestamp(tsa_url: str, signature: bytes, timeout_s: float) -> bytes:
    """An RFC 3161 TimeStampResponse (DER) over sha256(signature), checked to answer our request."""
    from rfc3161_client import TimestampRequestBuilder, decode_timestamp_response
    from rfc3161_client.base import HashAlgorithm

    req = TimestampRequestBuilder().hash_algorithm(HashAlgorithm.SHA256).data(signature).nonce(nonce=True).build()
    http = urllib.request.Request(tsa_url, data=req.as_bytes(), method="POST",
                                  headers={"Content-Type": "application/timestamp-query"})
    try:
        with urllib.request.urlopen(http, timeout=timeout_s) as r:
            body = r.read(1 << 20)
    except urllib.error.HTTPError as e:
        raise SignerError(f"tsa: {tsa_url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SignerError(f"tsa: cannot reach {tsa_url} ({getattr(reason, 'strerror', None) or reason})") from None
    try:
        resp = decode_timestamp_response(body)
    except ValueError as e:
        raise SignerError(f"tsa: {tsa_url} sent no RFC 3161 response ({e})") from None
    if resp.status not in (0, 1):  # granted, grantedWithMods
        raise SignerError(f"tsa: {tsa_url} refused the request (status {resp.status}: {resp.status_string})")
    if resp.tst_info.nonce != req.nonce or resp.tst_info.message_imprint.message != req.message_imprint.message:
        raise SignerError(f"tsa: {tsa_url} answered for another request (nonce or digest differs)")
    return resp.as_bytes()


class TimestampingSigner:
    """Wraps a signer; `timestamp_verification_data(sig)` is what goes into the entry's bundle."""

    def __init__(self, inner: Signer, tsa_url: str, timeout_s: float) -> None:
        why = probe(tsa_url, timeout_s)
        if why is not None:
            raise SignerError(f"tsa: the configured TSA {tsa_url} cannot be reached ({why}): run one the cluster "
                              "can reach, or set attest.tsa_url=null to sign without trusted time")
        self.inner, self.tsa_url, self.timeout_s = inner, tsa_url, timeout_s
        self.keyid = inner.keyid

    def sign(self, data: bytes) -> bytes:
        return self.inner.sign(data)

    def public_pem(self) -> bytes:
        return self.inner.public_pem()

    def timestamp_verification_data(self, signature: bytes) -> dict[str, Any]:
        token = request_timestamp(self.tsa_url, signature, self.timeout_s)
        return {"rfc3161Timestamps": [{"signedTimestamp": base64.b64encode(token).decode()}]}


def ensure_public_key(signer: Signer, path: Path) -> Path:
    """Write the signer's public key to `path` (the run's keys/signing-key.pub.pem, which goes
    into the bundle) if absent; refuse if a different key is already there."""
    pem = signer.public_pem()
    if not pem:  # keyless: the identity is in each entry's certificate
        return path
    if path.exists():
        try:
            there = PublicKeyVerifier.from_file(path).keyid
        except SigningKeyError as e:
            raise SignerError(str(e)) from None
        if there != signer.keyid:
            raise SignerError(f"{path}: holds key {there[:16]}…, but the configured signer's key is "
                              f"{signer.keyid[:16]}… (a run is signed by one key; start a new run for a new key)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pem)
    tmp.replace(path)
    return path
