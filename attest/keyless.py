"""Sigstore keyless chain entries: signing (Fulcio certificate + Rekor entry) and offline verification.

Keyless signing ties each chain entry to an OIDC identity (a CI workload, a service account)
instead of a long-lived key: Fulcio issues a 10-minute certificate for an ephemeral key and Rekor
logs the signature, which also gives each entry a trusted time. It needs both services (public,
or a private Sigstore given by `trust_config`) and an OIDC token, so it is for networked
clusters only. Air-gapped clusters use `backend: pem` or `backend: pkcs11`.

Signing is split so that the two service calls are the only network parts: `KeylessSigner` makes
the ephemeral key and its CSR, signs the DSSE envelope, and assembles the Sigstore bundle
(`keyless_bundle`) from what two callables return: `fulcio(csr_pem, token)` (the certificate
chain, leaf first, with its embedded SCT) and `rekor(proposed_entry)` (Rekor's v1 answer: the
canonicalized body, integrated time, SET, inclusion proof and signed checkpoint).
`SigstoreSigner` wires them to Fulcio's and Rekor's REST APIs; tests wire a private Sigstore
instance, so what is tested is what production writes. Each bundle is verified against the
trust root and the signer's own identity before it is written.

Before anything slow (TUF refresh, token exchange) the services are probed in parallel with a
short timeout; an unreachable service fails at once with one line saying what to use instead.

`verify_keyless` is the verifier's side: sigstore-python's public `Verifier.verify_dsse`, offline,
against a trusted root the evaluator pins (`sigstore_trusted_root` in the policy) and an identity
policy (`sigstore_identities`), using only the log material in the bundle (inclusion proof,
signed checkpoint, SET). sigstore is imported lazily.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from attest.dsse import BUNDLE_MEDIA_TYPE, PAYLOAD_TYPE, pae
from attest.signing import SignerError

PUBLIC = {"Fulcio": "https://fulcio.sigstore.dev", "Rekor": "https://rekor.sigstore.dev",
          "TUF": "https://tuf-repo-cdn.sigstore.dev"}
STAGING = {"Fulcio": "https://fulcio.sigstage.dev", "Rekor": "https://rekor.sigstage.dev",
           "TUF": "https://tuf-repo-cdn.sigstage.dev"}
CERT_RENEW_S = 480.0  # a new Fulcio certificate after this many seconds (they are valid for 600)
AIR_GAPPED = "use backend=pem or backend=pkcs11 on air-gapped clusters"


def probe(url: str, timeout_s: float) -> str | None:
    """None when `url` answers at all (any HTTP status), else why not. Bounded by `timeout_s`,
    name resolution included (urllib's own timeout does not cover DNS)."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # the server answered
        except urllib.error.URLError as e:
            result.append(str(getattr(e.reason, "strerror", None) or e.reason))
        except OSError as e:
            result.append(e.strerror or type(e).__name__)
        except ValueError as e:
            result.append(f"bad URL ({e})")

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout_s)
    return result[0] if result else f"no answer within {timeout_s:g} s"


def unreachable(services: dict[str, str], timeout_s: float) -> dict[str, str]:
    """Probe every service at once; return {name: "url: reason"} for those that did not answer."""
    reasons: dict[str, str | None] = {}
    threads = [threading.Thread(target=lambda n=n, u=u: reasons.__setitem__(n, probe(u, timeout_s)), daemon=True)
               for n, u in services.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 0.5)
    return {n: f"{services[n]}: {reasons.get(n) or 'no answer'}" for n in services if reasons.get(n, "x") is not None}


def services_of(trust_config: str | None, staging: bool) -> dict[str, str]:
    """The Fulcio and Rekor URLs a keyless signature needs (from a ClientTrustConfig file when given)."""
    if not trust_config:
        return dict(STAGING if staging else PUBLIC)
    try:
        signing = json.loads(Path(trust_config).read_text())["signingConfig"]
        tlogs = signing["rekorTlogUrls"]
        v1 = [t for t in tlogs if t.get("majorApiVersion", 1) == 1]  # the v1 entries API this signer speaks
        if not v1:
            raise SignerError(f"sigstore: {trust_config}: no Rekor v1 log in signingConfig.rekorTlogUrls")
        return {"Fulcio": signing["caUrls"][0]["url"], "Rekor": v1[0]["url"]}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise SignerError(f"sigstore: {trust_config}: not a Sigstore ClientTrustConfig ({type(e).__name__}: {e})") from None




# The two service calls a keyless signature needs (the network parts).
Fulcio = Callable[[bytes, str], list[bytes]]  # (CSR PEM, OIDC token) -> certificate chain PEMs, leaf first
Rekor = Callable[[dict[str, Any]], dict[str, Any]]  # proposed entry -> Rekor's v1 answer {uuid: entry}


def dsse_entry_request(envelope: dict[str, Any], cert_pem: bytes) -> dict[str, Any]:
    """The Rekor `dsse` 0.0.1 proposed entry for a DSSE envelope signed by the certificate's key."""
    return {"kind": "dsse", "apiVersion": "0.0.1",
            "spec": {"proposedContent": {"envelope": json.dumps(envelope, separators=(",", ":")),
                                         "verifiers": [base64.b64encode(cert_pem).decode()]}}}


def keyless_bundle(cert_der: bytes, envelope: dict[str, Any], rekor_answer: dict[str, Any]) -> dict[str, Any]:
    """The Sigstore bundle (v0.3, protobuf JSON) of a keyless chain entry: the leaf certificate, the
    DSSE envelope and the log entry Rekor answered with (inclusion proof, checkpoint, SET)."""
    if not isinstance(rekor_answer, dict) or len(rekor_answer) != 1:
        raise SignerError("sigstore: Rekor answered with other than one log entry")
    (entry,) = rekor_answer.values()
    try:
        body = json.loads(base64.b64decode(entry["body"]))
        proof = entry["verification"]["inclusionProof"]
        tlog = {
            "logIndex": str(entry["logIndex"]),
            "logId": {"keyId": base64.b64encode(bytes.fromhex(entry["logID"])).decode()},
            "kindVersion": {"kind": body["kind"], "version": body["apiVersion"]},
            "integratedTime": str(entry["integratedTime"]),
            "inclusionPromise": {"signedEntryTimestamp": entry["verification"]["signedEntryTimestamp"]},
            "inclusionProof": {
                "logIndex": str(proof["logIndex"]),
                "rootHash": base64.b64encode(bytes.fromhex(proof["rootHash"])).decode(),
                "treeSize": str(proof["treeSize"]),
                "hashes": [base64.b64encode(bytes.fromhex(h)).decode() for h in proof["hashes"]],
                "checkpoint": {"envelope": proof["checkpoint"]},
            },
            "canonicalizedBody": entry["body"],
        }
    except (KeyError, TypeError, ValueError) as e:
        raise SignerError(f"sigstore: Rekor's answer is not a v1 log entry ({type(e).__name__}: {e})") from None
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"certificate": {"rawBytes": base64.b64encode(cert_der).decode()},
                                 "tlogEntries": [tlog]},
        "dsseEnvelope": envelope,
    }


class KeylessSigner:
    """Keyless signer over two service calls: each statement becomes a Sigstore bundle with a
    Fulcio certificate (for an ephemeral P-256 key, renewed every CERT_RENEW_S) and a Rekor entry.
    `token()` gives the OIDC token; `check(bundle)` (when given) verifies each bundle before it
    is returned, raising SignerError."""

    def __init__(self, fulcio: Fulcio, rekor: Rekor, token: Callable[[], str], identity: str,
                 check: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._fulcio, self._rekor, self._token, self._check = fulcio, rekor, token, check
        self.identity = identity
        self.keyid = f"sigstore:{identity}"
        self._key: Any = None
        self._cert: Any = None
        self._since = 0.0

    def _certificate(self) -> tuple[Any, Any]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        # Fulcio certificates live 10 minutes: a key and its certificate are renewed before that,
        # so an expired certificate is never used.
        fresh = self._cert is not None and time.monotonic() - self._since <= CERT_RENEW_S and \
            datetime.now(timezone.utc) < self._cert.not_valid_after_utc
        if not fresh:
            key = ec.generate_private_key(ec.SECP256R1())
            csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
            chain = self._fulcio(csr.public_bytes(serialization.Encoding.PEM), self._token())
            try:
                cert = x509.load_pem_x509_certificate(chain[0])
            except (IndexError, ValueError) as e:
                raise SignerError(f"sigstore: Fulcio sent no usable certificate ({type(e).__name__}: {e})") from None
            if cert.public_key() != key.public_key():
                raise SignerError("sigstore: Fulcio's certificate is for another key than the request's")
            self._key, self._cert, self._since = key, cert, time.monotonic()
        return self._key, self._cert

    def sign_statement(self, statement_json: bytes) -> dict[str, Any]:
        """Sign the statement's exact bytes; returns the Sigstore bundle (v0.3) as a JSON object."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key, cert = self._certificate()
        sig = key.sign(pae(PAYLOAD_TYPE, statement_json), ec.ECDSA(hashes.SHA256()))
        envelope = {"payload": base64.b64encode(statement_json).decode(), "payloadType": PAYLOAD_TYPE,
                    "signatures": [{"sig": base64.b64encode(sig).decode()}]}
        answer = self._rekor(dsse_entry_request(envelope, cert.public_bytes(serialization.Encoding.PEM)))
        bundle = keyless_bundle(cert.public_bytes(serialization.Encoding.DER), envelope, answer)
        if self._check is not None:
            self._check(bundle)
        return bundle

    def sign(self, data: bytes) -> bytes:
        raise SignerError("sigstore: keyless signing makes whole bundles (sign_statement), not bare signatures")

    def public_pem(self) -> bytes:
        return b""  # no long-lived key: the identity is in each entry's certificate


def _post_json(url: str, body: dict[str, Any], headers: dict[str, str], timeout_s: float, service: str) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read(16 << 20))
    except urllib.error.HTTPError as e:
        why = e.read(300).decode(errors="replace")
        raise SignerError(f"sigstore: {service} {url} answered HTTP {e.code} ({why})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        why = str(getattr(reason, "strerror", None) or reason)
        raise SignerError(f"sigstore: cannot reach {service} {url} ({why})") from None
    except ValueError:
        raise SignerError(f"sigstore: {service} {url} answered with other than JSON") from None


def fulcio_http(base_url: str, timeout_s: float) -> Fulcio:
    """Fulcio's v2 REST API: POST /api/v2/signingCert."""
    def call(csr_pem: bytes, token: str) -> list[bytes]:
        got = _post_json(base_url.rstrip("/") + "/api/v2/signingCert",
                         {"certificateSigningRequest": base64.b64encode(csr_pem).decode()},
                         {"Authorization": f"Bearer {token}", "Accept": "application/pem-certificate-chain"},
                         timeout_s, "Fulcio")
        try:
            return [c.encode() for c in got["signedCertificateEmbeddedSct"]["chain"]["certificates"]]
        except (KeyError, TypeError, AttributeError):
            raise SignerError("sigstore: Fulcio's answer holds no certificate chain with an embedded SCT") from None
    return call


def rekor_http(base_url: str, timeout_s: float) -> Rekor:
    """Rekor's v1 REST API: POST /api/v1/log/entries."""
    def call(proposed: dict[str, Any]) -> dict[str, Any]:
        got = _post_json(base_url.rstrip("/") + "/api/v1/log/entries", proposed, {}, timeout_s, "Rekor")
        if not isinstance(got, dict):
            raise SignerError("sigstore: Rekor's answer is not a JSON object")
        return got
    return call


class SigstoreSigner(KeylessSigner):
    """Keyless signing against Fulcio and Rekor (public, staging, or a private Sigstore's
    ClientTrustConfig): probes the services, loads the trust root, takes the OIDC token."""

    def __init__(self, *, staging: bool = False, trust_config: str | None = None,
                 identity_token: str | None = None, timeout_s: float = 3.0) -> None:
        services = services_of(trust_config, staging)
        down = unreachable(services, timeout_s)
        if down:
            raise SignerError(
                f"sigstore keyless signing needs network access to Fulcio and Rekor (unreachable: "
                f"{'; '.join(down.values())}): {AIR_GAPPED}")
        try:
            from sigstore.models import ClientTrustConfig
        except ImportError:
            raise SignerError("sigstore: sigstore-python is not installed (pip install sigstore)") from None
        try:
            if trust_config:
                trust = ClientTrustConfig.from_json(Path(trust_config).read_text())
            else:
                trust = ClientTrustConfig.staging() if staging else ClientTrustConfig.production()
            root = trust.trusted_root
        except Exception as e:  # sigstore raises many types here (TUF, network, parsing)
            raise SignerError(f"sigstore: cannot load the trust root ({type(e).__name__}: {e})") from None
        self._raw_token = identity_token
        token = self._identity()
        identity, issuer = token.identity, token.federated_issuer

        def check(bundle: dict[str, Any]) -> None:
            why = verify_keyless(bundle, root, [(identity, issuer)])
            if why:
                raise SignerError(f"sigstore: the signed entry does not verify against the trust root: {why}")

        super().__init__(fulcio_http(services["Fulcio"], max(timeout_s, 30.0)),
                         rekor_http(services["Rekor"], max(timeout_s, 30.0)),
                         lambda: str(self._identity()), identity, check)

    def _identity(self) -> Any:
        from sigstore.oidc import IdentityError, IdentityToken, detect_credential

        raw = self._raw_token or os.environ.get("SIGSTORE_ID_TOKEN")
        try:
            raw = raw or detect_credential()
        except IdentityError as e:
            raise SignerError(f"sigstore: cannot get an ambient OIDC identity ({e})") from None
        if not raw:
            raise SignerError("sigstore: no OIDC identity token (set SIGSTORE_ID_TOKEN, pass attest.identity_token, "
                              "or run where ambient credentials exist, e.g. GitHub Actions with id-token: write)")
        try:
            token = IdentityToken(raw)
        except Exception as e:
            raise SignerError(f"sigstore: the OIDC identity token is not usable ({type(e).__name__}: {e})") from None
        if not token.in_validity_period():
            raise SignerError("sigstore: the OIDC identity token has expired; give a fresh one")
        return token


# ------------------------------------------------------------------ verification (offline)


def is_keyless(bundle: dict[str, Any]) -> bool:
    """A chain line signed keyless: its verification material is a certificate, not a key hint."""
    material = bundle.get("verificationMaterial")
    return isinstance(material, dict) and ("certificate" in material or "x509CertificateChain" in material)


def load_trusted_root(path: Path, max_bytes: int = 1 << 20) -> Any:
    """A Sigstore trusted_root.json (sigstore.models.TrustedRoot); ValueError says what is wrong."""
    from sigstore.models import TrustedRoot
    from sigstore_models.trustroot import v1 as trustroot_v1

    from attest import inputs

    try:
        raw = inputs.read_bytes(path, max_bytes, where=str(path))
    except inputs.InputError as e:  # the caller names the file: the problem alone
        raise ValueError(str(e).removeprefix(f"{path}: ")) from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        root = TrustedRoot(trustroot_v1.TrustedRoot.from_json(raw))
    except Exception as e:
        raise ValueError(f"not a Sigstore trusted root ({type(e).__name__}: {_one_line(str(e))[:200]})") from None
    # A root that names no CA, no Rekor log or no CT log verifies nothing.
    missing = [k for k in ("certificateAuthorities", "tlogs", "ctlogs") if not doc.get(k)]
    if missing:
        raise ValueError(f"a trusted root naming no {', no '.join(missing)}: keyless entries cannot verify against it")
    return root


def verify_keyless(bundle: dict[str, Any], trusted_root: Any, identities: list[tuple[str, str]]) -> str | None:
    """None when sigstore-python's verifier accepts the bundle's DSSE envelope against
    `trusted_root` and one of `identities` ((SAN, OIDC issuer) pairs), offline; else why not, in
    one line. Checked: the certificate chains to a CA of the root at the log's integrated time,
    its embedded SCT by a CT log of the root, the identity and issuer, the inclusion proof against
    a checkpoint signed by a Rekor key of the root, the SET, the time within the certificate's
    validity, the envelope's signature, and that the log entry is this envelope's."""
    from sigstore.errors import Error
    from sigstore.models import Bundle
    from sigstore.verify import Verifier
    from sigstore.verify.policy import AnyOf, Identity

    if not identities:
        return "no identity to verify against"
    try:
        parsed = Bundle.from_json(json.dumps(bundle))
        policy = AnyOf([Identity(identity=i, issuer=iss) for i, iss in identities])
        kind, payload = _verifier(trusted_root, Verifier).verify_dsse(parsed, policy)
    except Error as e:
        if str(e).startswith(f"0 of {len(identities)} policies"):  # AnyOf: no identity matched
            return f"the certificate names {certificate_identity(bundle)}, none of the policy's sigstore_identities"
        return _one_line(str(e))
    except Exception as e:
        return _one_line(f"{type(e).__name__}: {e}")
    if kind != PAYLOAD_TYPE:
        return f"payload type {kind!r}, not {PAYLOAD_TYPE}"
    envelope = bundle.get("dsseEnvelope")
    if not isinstance(envelope, dict) or base64.b64decode(str(envelope.get("payload", ""))) != payload:
        return "the verified payload is not the envelope's"
    return None


_VERIFIERS: dict[int, tuple[Any, Any]] = {}


def _verifier(trusted_root: Any, cls: Any) -> Any:
    """One sigstore Verifier per trusted root (it loads the root's certificates once)."""
    hit = _VERIFIERS.get(id(trusted_root))
    if hit is None or hit[0] is not trusted_root:
        hit = _VERIFIERS[id(trusted_root)] = (trusted_root, cls(trusted_root=trusted_root))
    return hit[1]


def certificate_identity(bundle: dict[str, Any]) -> str:
    """The SAN(s) and OIDC issuer a keyless line's certificate names (unverified: for messages)."""
    from cryptography import x509

    try:
        der = base64.b64decode(bundle["verificationMaterial"]["certificate"]["rawBytes"])
        cert = x509.load_der_x509_certificate(der)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for t in (x509.RFC822Name, x509.UniformResourceIdentifier) for v in sans.get_values_for_type(t)]
        try:
            ext: Any = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(OIDC_ISSUER_OID)).value
            issuer = ext.value.decode()  # an UnrecognizedExtension: its raw bytes
        except x509.ExtensionNotFound:
            issuer = "no issuer"
        return f"{','.join(names) or 'no SAN'} from {issuer}"
    except Exception:
        return "an unreadable certificate"


OIDC_ISSUER_OID = "1.3.6.1.4.1.57264.1.1"  # Fulcio's OIDC issuer extension (raw bytes)
OIDC_ISSUER_V2_OID = "1.3.6.1.4.1.57264.1.8"  # the same, as a DER UTF8String


def _one_line(s: str) -> str:
    s = " ".join(s.split())
    return s[:400] + "…" if len(s) > 400 else s
