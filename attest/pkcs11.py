"""PKCS#11 signing back-end: an ECDSA P-256 key that never leaves an HSM token.

The key is named by an RFC 7512 URI, for example

    pkcs11:token=kai;object=chain-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin

The token signs a SHA-256 digest we compute (`CKM_ECDSA`, raw r||s); we re-encode the signature
as DER so it verifies exactly like a PEM key's (`attest.signing.PublicKeyVerifier`). The keyid is
the sha256 of the DER SubjectPublicKeyInfo of the token's public key, as for PEM keys, so a
verifier cannot tell (and need not know) which back-end signed.

The PIN comes from the URI (`pin-value`, or `pin-source=file:PATH`) or else from an environment
variable (`pin_env`). python-pkcs11 is imported lazily: the evaluator's light install lacks it.
Every failure is a `SignerError` with one line naming the module, token or key.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attest.signing import SignerError, keyid_of

# RFC 7512 attributes we act on; any other path attribute is refused rather than ignored.
PATH_ATTRS = {"token", "object", "id", "type", "serial", "manufacturer", "model", "library-description",
              "library-manufacturer", "library-version", "slot-description", "slot-id", "slot-manufacturer"}
USED_PATH_ATTRS = {"token", "object", "id", "type", "serial", "manufacturer", "model"}


@dataclass
class Pkcs11Uri:
    """The parts of an RFC 7512 URI that select a module, a token and a key."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    module_path: str | None = None
    pin_value: str | None = None
    pin_source: str | None = None
    ignored: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The key's name for error lines; never the PIN."""
        parts = [f"token={self.token}" if self.token else "", f"object={self.object}" if self.object else "",
                 f"id={self.id.hex()}" if self.id else ""]
        return ";".join(p for p in parts if p) or "(no key selected)"


def parse_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 `pkcs11:` URI (path attributes `;`-separated, query attributes `&`-separated)."""
    if not uri.startswith("pkcs11:"):
        raise SignerError(f"pkcs11: {uri.split('?')[0]!r} is not a pkcs11: URI (RFC 7512)")
    path, _, query = uri[len("pkcs11:"):].partition("?")
    out = Pkcs11Uri()
    for attr in filter(None, path.split(";")):
        name, sep, value = attr.partition("=")
        if not sep or name not in PATH_ATTRS:
            raise SignerError(f"pkcs11: unknown URI path attribute {attr.split('=')[0]!r}")
        if name == "id":
            out.id = unquote_to_bytes(value)
        elif name == "type":
            if unquote(value) not in ("private", ""):
                raise SignerError(f"pkcs11: type={unquote(value)} in the URI; a signing key is type=private")
        elif name in USED_PATH_ATTRS:
            setattr(out, name, unquote(value))
        else:
            out.ignored.append(name)
    for attr in filter(None, query.split("&")):
        name, _, value = attr.partition("=")
        if name in ("module-path", "pin-value", "pin-source"):
            setattr(out, name.replace("-", "_"), unquote(value))
        else:
            out.ignored.append(name)
    if out.object is None and out.id is None:
        raise SignerError("pkcs11: the URI names no key (give object=LABEL and/or id=%XX)")
    return out


def _read_pin(u: Pkcs11Uri, pin_env: str | None) -> str:
    if u.pin_value is not None:
        return u.pin_value
    if u.pin_source is not None:
        src = u.pin_source[len("file:"):] if u.pin_source.startswith("file:") else u.pin_source
        try:
            return Path(src).read_text().rstrip("\r\n")
        except OSError as e:
            raise SignerError(f"pkcs11: cannot read pin-source {src} ({e.strerror})") from None
    if pin_env and os.environ.get(pin_env):
        return os.environ[pin_env]
    where = f" or ${pin_env}" if pin_env else ""
    raise SignerError(f"pkcs11: no PIN for {u.describe()} (give pin-source=file:PATH or pin-value= in the URI{where})")


def _token_matches(tok: Any, u: Pkcs11Uri) -> bool:
    return all(want is None or str(getattr(tok, attr, "")).strip() == want
               for attr, want in (("label", u.token), ("serial", u.serial),
                                  ("manufacturer_id", u.manufacturer), ("model", u.model)))


class Pkcs11Signer:
    """ECDSA P-256 signing with a private key held in a PKCS#11 token; one session per signer."""

    def __init__(self, uri: str, pin_env: str | None = None) -> None:
        try:
            import pkcs11
            from pkcs11.util.ec import encode_ec_public_key, encode_ecdsa_signature
        except ImportError:
            raise SignerError("pkcs11: python-pkcs11 is not installed (pip install python-pkcs11)") from None
        self._pkcs11, self._encode_sig = pkcs11, encode_ecdsa_signature
        u = parse_uri(uri)
        if not u.module_path:
            raise SignerError(f"pkcs11: the URI for {u.describe()} has no module-path= (the token's PKCS#11 library)")
        if not Path(u.module_path).is_file():
            raise SignerError(f"pkcs11: module {u.module_path} not found (install the token's PKCS#11 library, "
                              "e.g. apt-get install softhsm2)")
        try:
            lib = pkcs11.lib(u.module_path)
            tokens = [t for t in lib.get_tokens()]
        except pkcs11.PKCS11Error as e:
            raise SignerError(f"pkcs11: cannot load module {u.module_path} ({type(e).__name__}: {e})") from None
        matches = [t for t in tokens if _token_matches(t, u)]
        if not matches:
            have = ", ".join(repr(t.label.strip()) for t in tokens
                             if t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED) or "none"
            raise SignerError(f"pkcs11: token {u.token or u.serial!r} not found in {u.module_path} (tokens: {have})")
        if len(matches) > 1:
            raise SignerError(f"pkcs11: {len(matches)} tokens match {u.describe()}; add serial= to the URI")
        token = matches[0]
        pin = _read_pin(u, pin_env)
        try:
            self._session = token.open(user_pin=pin)
        except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
            raise SignerError(f"pkcs11: wrong PIN for token {token.label.strip()!r}") from None
        except pkcs11.UserAlreadyLoggedIn:
            # Login is per token and process: another signer here holds it, and this session shares it.
            self._session = token.open()
        except pkcs11.PinLocked:
            raise SignerError(f"pkcs11: token {token.label.strip()!r} is locked (too many wrong PINs)") from None
        except pkcs11.PKCS11Error as e:
            raise SignerError(f"pkcs11: cannot log in to token {token.label.strip()!r} ({type(e).__name__})") from None
        try:
            self._key = self._find(pkcs11.ObjectClass.PRIVATE_KEY, u)
            pub = self._find(pkcs11.ObjectClass.PUBLIC_KEY, u)
            public_key = serialization.load_der_public_key(encode_ec_public_key(pub))
        except SignerError:
            self.close()
            raise
        except (pkcs11.PKCS11Error, ValueError) as e:
            self.close()
            raise SignerError(f"pkcs11: cannot read the public key of {u.describe()} ({type(e).__name__}: {e})") from None
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
            self.close()
            raise SignerError(f"pkcs11: key {u.describe()} is not ECDSA P-256")
        self._public_key = public_key
        self.keyid = keyid_of(public_key)
        self.uri = u
        self._lock = threading.Lock()  # a PKCS#11 session runs one operation at a time

    def _find(self, object_class: Any, u: Pkcs11Uri) -> Any:
        p = self._pkcs11
        what = "private" if object_class == p.ObjectClass.PRIVATE_KEY else "public"
        try:
            return self._session.get_key(object_class=object_class, key_type=p.KeyType.EC, label=u.object, id=u.id)
        except p.NoSuchKey:
            raise SignerError(f"pkcs11: no EC {what} key {u.describe()} on the token") from None
        except p.MultipleObjectsReturned:
            raise SignerError(f"pkcs11: several EC {what} keys match {u.describe()}; add id= to the URI") from None

    def sign(self, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        with self._lock:
            try:
                raw = self._key.sign(digest, mechanism=self._pkcs11.Mechanism.ECDSA)
            except self._pkcs11.PKCS11Error as e:
                raise SignerError(f"pkcs11: signing with {self.uri.describe()} failed ({type(e).__name__})") from None
        return self._encode_sig(raw)

    def public_pem(self) -> bytes:
        return self._public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def close(self) -> None:
        session, self._session = getattr(self, "_session", None), None  # type: ignore[assignment]
        if session is not None:
            try:
                session.close()
            except self._pkcs11.PKCS11Error:
                pass

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
