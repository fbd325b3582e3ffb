"""A private Sigstore instance for tests, built with `cryptography` (no network).

`Instance` holds a Fulcio-like CA (a root and an intermediate) that issues short-lived leaf
certificates for a CSR: the SAN and the OIDC-issuer extensions (1.3.6.1.4.1.57264.1.1 and .1.8),
code-signing EKU, and an embedded SCT signed by a CT log key over the precertificate. Its
Rekor-like log keeps an RFC 6962 Merkle tree of `dsse` 0.0.1 entries and answers a proposed entry
the way Rekor's v1 API does: canonicalized body, integrated time, SET (a signature over the RFC
8785 form of body, time, log id and index) and an inclusion proof with a signed checkpoint.
`trusted_root()` writes the trusted_root.json naming the CA, the log key and the CT key.

`instance.fulcio` and `instance.rekor` are the two service calls attest.keyless.KeylessSigner
takes, so a chain signed here is assembled by the same code as one signed against Fulcio and Rekor.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attest.keyless import OIDC_ISSUER_OID, OIDC_ISSUER_V2_OID

SCT_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
EPOCH = datetime(2020, 1, 1, tzinfo=timezone.utc)


def spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: Any) -> bytes:
    return hashlib.sha256(spki(key)).digest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kai-test"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, key: Any, issuer: tuple[Any, x509.Certificate] | None, days: int = 3650) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    signer_key, signer_cert = issuer if issuer else (key, None)
    b = (x509.CertificateBuilder().subject_name(_name(cn))
         .issuer_name(signer_cert.subject if signer_cert else _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        b = (b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False))
    return b.sign(signer_key, hashes.SHA256())


# ------------------------------------------------------------------ RFC 6962 Merkle tree


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def mth(leaves: list[bytes]) -> bytes:
    """Merkle tree hash over leaf hashes."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def inclusion_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 PATH(m, D[n]), lowest level first."""
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return inclusion_path(m, leaves[:k]) + [mth(leaves[k:])]
    return inclusion_path(m - k, leaves[k:]) + [mth(leaves[:k])]


class Instance:
    """Fulcio + CT log + Rekor, in process. `identity`/`issuer`: what the next certificate names."""

    def __init__(self, identity: str = "trainer@example.org", issuer: str = "https://oidc.example.org",
                 cert_minutes: int = 10) -> None:
        self.identity, self.issuer, self.cert_minutes = identity, issuer, cert_minutes
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.root = _ca("kai-test-fulcio-root", self.root_key, None)
        self.ca_key = ec.generate_private_key(ec.SECP384R1())
        self.ca = _ca("kai-test-fulcio-intermediate", self.ca_key, (self.root_key, self.root))
        self.ct_key = ec.generate_private_key(ec.SECP256R1())
        self.log_key = ec.generate_private_key(ec.SECP256R1())
        self.leaves: list[bytes] = []
        self.time_shift = timedelta(0)  # added to the log's integrated time (a late entry)
        self.signing_ca: tuple[Any, x509.Certificate] | None = None  # another CA issues the leaves when set

    # -------------------------------------------------------------- Fulcio

    def issue(self, public_key: Any, *, identity: str | None = None, issuer: str | None = None,
              ca: tuple[Any, x509.Certificate] | None = None) -> x509.Certificate:
        """A leaf certificate for `public_key` with an embedded SCT (precertificate entry)."""
        ca_key, ca_cert = ca or (self.ca_key, self.ca)
        now = datetime.now(timezone.utc)
        ident = identity or self.identity
        san = x509.RFC822Name(ident) if "@" in ident and "://" not in ident else x509.UniformResourceIdentifier(ident)
        iss = (issuer or self.issuer).encode()
        b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_cert.subject)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(now - timedelta(seconds=5)).not_valid_after(now + timedelta(minutes=self.cert_minutes))
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
             .add_extension(x509.SubjectAlternativeName([san]), critical=True)
             .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(OIDC_ISSUER_OID), iss), critical=False)
             .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(OIDC_ISSUER_V2_OID),
                                                       b"\x0c" + _der_len(len(iss)) + iss), critical=False))
        # The SCT signs the certificate without its SCT extension (the precertificate's TBS): build
        # once with a placeholder to get those bytes, then again with the real SCT.
        pre = b.add_extension(x509.UnrecognizedExtension(SCT_OID, _sct_ext(b"\x00" * 8)), critical=False)
        tbs = pre.sign(ca_key, hashes.SHA256()).tbs_precertificate_bytes
        sct = self._sct(tbs, key_id(ca_key.public_key()), now)
        cert = b.add_extension(x509.UnrecognizedExtension(SCT_OID, _sct_ext(sct)), critical=False).sign(ca_key, hashes.SHA256())
        assert cert.tbs_precertificate_bytes == tbs
        return cert

    def _sct(self, tbs: bytes, issuer_key_hash: bytes, when: datetime) -> bytes:
        ms = int(when.timestamp() * 1000)
        entry = issuer_key_hash + struct.pack("!I", len(tbs))[1:] + tbs
        signed = struct.pack("!BBQH", 0, 0, ms, 1) + entry + struct.pack("!H", 0)
        sig = self.ct_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return (b"\x00" + key_id(self.ct_key.public_key()) + struct.pack("!Q", ms) + struct.pack("!H", 0)
                + b"\x04\x03" + struct.pack("!H", len(sig)) + sig)

    def fulcio(self, csr_pem: bytes, token: str) -> list[bytes]:
        """Fulcio's signing-certificate call: the chain (leaf, intermediate, root) as PEM."""
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid and token == "test-token"
        cert = self.issue(csr.public_key(), ca=self.signing_ca)
        chain = [self.signing_ca[1]] if self.signing_ca else [self.ca, self.root]
        return [c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain)]

    def other_ca(self) -> tuple[Any, x509.Certificate]:
        """A CA of the same shape that no trusted root names."""
        key = ec.generate_private_key(ec.SECP384R1())
        return key, _ca("kai-test-fulcio-intermediate", key, None)

    # -------------------------------------------------------------- Rekor

    def rekor(self, proposed: dict[str, Any]) -> dict[str, Any]:
        """Rekor's v1 create-entry call for a `dsse` 0.0.1 proposal."""
        content = proposed["spec"]["proposedContent"]
        envelope = json.loads(content["envelope"])
        body = {"apiVersion": "0.0.1", "kind": "dsse", "spec": {
            "envelopeHash": {"algorithm": "sha256", "value": hashlib.sha256(content["envelope"].encode()).hexdigest()},
            "payloadHash": {"algorithm": "sha256",
                            "value": hashlib.sha256(base64.b64decode(envelope["payload"])).hexdigest()},
            "signatures": [{"signature": s["sig"], "verifier": content["verifiers"][0]} for s in envelope["signatures"]]}}
        return self.log_entry(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())

    def log_entry(self, body: bytes) -> dict[str, Any]:
        self.leaves.append(leaf_hash(body))
        index, size = len(self.leaves) - 1, len(self.leaves)
        integrated = int((datetime.now(timezone.utc) + self.time_shift).timestamp())
        log_id = key_id(self.log_key.public_key()).hex()
        b64body = base64.b64encode(body).decode()
        set_payload = rfc8785.dumps({"body": b64body, "integratedTime": integrated, "logID": log_id, "logIndex": index})
        root = mth(self.leaves)
        return {f"{index:016x}": {
            "body": b64body, "integratedTime": integrated, "logID": log_id, "logIndex": index,
            "verification": {
                "signedEntryTimestamp": base64.b64encode(self.log_key.sign(set_payload, ec.ECDSA(hashes.SHA256()))).decode(),
                "inclusionProof": {"logIndex": index, "treeSize": size, "rootHash": root.hex(),
                                   "hashes": [h.hex() for h in inclusion_path(index, self.leaves)],
                                   "checkpoint": self.checkpoint(size, root)}}}}

    def checkpoint(self, size: int, root: bytes) -> str:
        note = f"rekor.kai-test - 1\n{size}\n{base64.b64encode(root).decode()}\n"
        sig = self.log_key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        hint = key_id(self.log_key.public_key())[:4]
        return f"{note}\n\u2014 rekor.kai-test {base64.b64encode(hint + sig).decode()}\n"

    # -------------------------------------------------------------- trusted root

    def trusted_root(self, path: Path) -> Path:
        start = EPOCH.isoformat().replace("+00:00", "Z")

        def tlog(key: Any, url: str) -> dict[str, Any]:
            return {"baseUrl": url, "hashAlgorithm": "SHA2_256",
                    "publicKey": {"rawBytes": base64.b64encode(spki(key.public_key())).decode(),
                                  "keyDetails": "PKIX_ECDSA_P256_SHA_256", "validFor": {"start": start}},
                    "logId": {"keyId": base64.b64encode(key_id(key.public_key())).decode()}}

        doc = {"mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
               "tlogs": [tlog(self.log_key, "https://rekor.kai-test")],
               "certificateAuthorities": [{
                   "subject": {"organization": "kai-test", "commonName": "kai-test-fulcio"},
                   "uri": "https://fulcio.kai-test",
                   "certChain": {"certificates": [{"rawBytes": base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()}
                                                  for c in (self.ca, self.root)]},
                   "validFor": {"start": start}}],
               "ctlogs": [tlog(self.ct_key, "https://ctfe.kai-test")],
               "timestampAuthorities": []}
        path.write_text(json.dumps(doc, indent=1))
        return path


def _der_len(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else bytes([0x81, n]) if n < 0x100 else bytes([0x82]) + n.to_bytes(2, "big")


def _sct_ext(sct: bytes) -> bytes:
    """The SCT list extension's value: an OCTET STRING holding the TLS-encoded list of one SCT."""
    tls = struct.pack("!H", len(sct) + 2) + struct.pack("!H", len(sct)) + sct
    return b"\x04" + _der_len(len(tls)) + tls
