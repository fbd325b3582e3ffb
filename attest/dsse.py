"""DSSE envelopes inside Sigstore bundles (v0.3), the on-disk form of every chain entry.

A chain line is a Sigstore bundle whose `dsseEnvelope` carries an in-toto Statement v1. Key-mode
bundles carry only a public-key hint (the keyid) and no transparency-log entries, as OpenSSF
model-signing writes them for key and PKCS#11 signing.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from attest import jsonread
from attest.errors import KaiError
from attest.signing import Signer

PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
MAX_PAYLOAD_BYTES = 64 << 20  # a decoded statement; the chain line holding it has the same bound


class EnvelopeError(KaiError, ValueError):
    """A chain line is not a well-formed bundle/envelope/statement."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_statement(statement: dict[str, Any], signer: Signer) -> dict[str, Any]:
    payload = canonical_json(statement)
    if hasattr(signer, "sign_statement"):  # keyless: Fulcio certificate + Rekor entry
        return signer.sign_statement(payload)
    sig = signer.sign(pae(PAYLOAD_TYPE, payload))
    material: dict[str, Any] = {"publicKey": {"hint": signer.keyid}, "tlogEntries": []}
    if hasattr(signer, "timestamp_verification_data"):  # RFC 3161 timestamp over the signature
        material["timestampVerificationData"] = signer.timestamp_verification_data(sig)
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": material,
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"keyid": signer.keyid, "sig": base64.b64encode(sig).decode()}],
        },
    }


def open_bundle(bundle: Any) -> tuple[bytes, list[tuple[str, bytes]], dict[str, Any]]:
    """Return (payload bytes, [(keyid, sig)], statement) or raise EnvelopeError. Checks shape only;
    the payload is parsed by the strict reader (attest.jsonread)."""
    if not isinstance(bundle, dict) or bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise EnvelopeError(f"not a Sigstore bundle v0.3 (mediaType {_short(bundle, 'mediaType')})")
    env = bundle.get("dsseEnvelope")
    if not isinstance(env, dict) or env.get("payloadType") != PAYLOAD_TYPE:
        raise EnvelopeError("dsseEnvelope missing or payloadType is not in-toto")
    try:
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = [(str(s.get("keyid", "")), base64.b64decode(s["sig"], validate=True)) for s in env["signatures"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise EnvelopeError("dsseEnvelope payload or signatures are malformed") from None
    try:
        statement = jsonread.loads(payload, "DSSE payload", MAX_PAYLOAD_BYTES)
    except jsonread.JsonReadError as e:
        raise EnvelopeError(str(e)) from None
    if not isinstance(statement, dict):
        raise EnvelopeError("DSSE payload is not a JSON object")
    return payload, sigs, statement


def _short(obj: Any, key: str) -> str:
    return repr(obj.get(key))[:80] if isinstance(obj, dict) else type(obj).__name__
