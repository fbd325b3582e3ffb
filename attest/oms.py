"""OpenSSF model-signing (OMS v1.0) signatures for checkpoint folders.

Each checkpoint folder (`checkpoints/step-NNNNNN/`) can carry `model.sig`: a Sigstore bundle whose
DSSE payload is an in-toto statement with predicate `https://model_signing/signature/v1.0`. It
lists every file of the folder with its sha256 (`resources`, sorted by name) and, as the single
subject, ROOT = sha256 over the concatenated resource digests. The upstream tool verifies it:

    model_signing verify key --public_key signing-key.pub.pem --signature DIR/model.sig DIR

So a checkpoint can be checked by tools that know nothing of kai-train; the chain's own statements
still carry the canonical weight digest, and `cross_check` ties the two together.

Signing writes that format itself, with any `attest` signer (a PEM key file, a PKCS#11 token),
the bytes upstream's key signer writes: the statement, a DSSE envelope over it, and a Sigstore
bundle whose key hint is sha256 of the public key's PEM text (upstream's choice, not our DER
keyid). Files whose sha256 the caller already holds (the trainer's one-pass hash) are not read
again. tests/test_oms.py checks that upstream's public verifier (`model_signing.verifying`, and
its CLI) accepts what is written. Reading and cross-checking are plain JSON and hashlib, so the
light install can do all of it; model_signing itself is needed only to verify with upstream.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

from attest import jsonread
from attest.digest import sha256_file
from attest.dsse import BUNDLE_MEDIA_TYPE, PAYLOAD_TYPE, pae
from attest.errors import KaiError
from attest.verify.findings import Finding
from attest.signing import PemSigner, PublicKeyVerifier, Signer, SignerError

SIGNATURE_NAME = "model.sig"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MAX_SIG_BYTES = 64 << 20  # a files-mode manifest is ~150 bytes per file
IGNORED_BY_DEFAULT = (".git", ".gitattributes", ".github", ".gitignore")  # upstream's ignore_git_paths


class OmsError(KaiError, ValueError):
    """An OMS signature is unreadable or not a v1.0 files-mode signature; names the file."""


@dataclass
class OmsManifest:
    name: str  # the subject name: the model folder's base name
    root: str  # sha256 over the concatenated resource digests
    resources: dict[str, str]  # file path (POSIX, relative to the folder) -> sha256 hex
    serialization: dict[str, Any]


def sign_checkpoint_dir(checkpoint_dir: Path, key: Path | Signer, sig_name: str = SIGNATURE_NAME,
                        known: Mapping[str, str] | None = None) -> Path:
    """Sign every file of `checkpoint_dir` into `checkpoint_dir/sig_name` (replaced atomically).

    `key` is a PEM private key file (ECDSA P-256, as `kai-attest keygen` writes) or a Signer.
    `known` maps file names (relative to the folder) to the sha256 the caller has just computed
    for them (the trainer's one-pass hash): those files are not read again; the others are."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise OmsError(f"{checkpoint_dir}: not a checkpoint folder")
    signer = PemSigner.from_file(key) if isinstance(key, (str, os.PathLike)) else key
    ignore = [sig_name, *IGNORED_BY_DEFAULT]
    files, odd = _folder_files(checkpoint_dir, set(ignore))
    if odd:
        raise SignerError(f"oms: {checkpoint_dir / odd[0]}: a symlink; a signed folder holds regular files only")
    known = known or {}
    try:
        resources = {rel: known.get(rel) or sha256_file(p) for rel, p in files.items()}
    except OSError as e:
        raise SignerError(f"oms: cannot read {e.filename} ({e.strerror})") from None
    payload = manifest_statement(checkpoint_dir.name, resources, ignore)
    # Written outside the folder, then moved in: a crash never leaves a half signature (or a
    # temporary file that a later signing would hash) inside the folder.
    tmp = checkpoint_dir.parent / f".{checkpoint_dir.name}.{sig_name}.tmp"
    tmp.write_text(json.dumps(oms_bundle(payload, signer), indent=2))
    out = checkpoint_dir / sig_name
    os.replace(tmp, out)
    return out


def manifest_statement(name: str, resources: Mapping[str, str], ignore_paths: list[str]) -> bytes:
    """The in-toto statement of an OMS v1.0 files-mode signature, as upstream serializes it: one
    subject (the folder's name, ROOT = sha256 over the resource digests in name order) and the
    sorted resources with their sha256."""
    ordered = sorted(resources.items())
    root = hashlib.sha256(b"".join(bytes.fromhex(d) for _, d in ordered)).hexdigest()
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": root}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"hash_type": "sha256", "allow_symlinks": False, "ignore_paths": ignore_paths,
                              "method": "files"},
            "resources": [{"name": n, "algorithm": "sha256", "digest": d} for n, d in ordered],
        },
    }
    return json.dumps(statement, indent=2).encode()


def oms_bundle(payload: bytes, signer: Signer) -> dict[str, Any]:
    """The Sigstore bundle (v0.3) an OMS key signature is: a DSSE envelope over `payload` and, as
    the key hint, sha256 of the signer's public key PEM text (upstream's choice, not our keyid)."""
    sig = signer.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": hashlib.sha256(signer.public_pem()).hexdigest()},
                                 "tlogEntries": []},
        "dsseEnvelope": {"payload": base64.b64encode(payload).decode(), "payloadType": PAYLOAD_TYPE,
                         "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}]},
    }


def _load(sig_path: Path) -> tuple[bytes, list[bytes], dict[str, Any]]:
    """(payload, signatures, statement) of an OMS bundle; shape checks only. The file and its DSSE
    payload go through the strict reader (attest.jsonread)."""
    where = str(sig_path)
    try:
        bundle = jsonread.load_file(sig_path, MAX_SIG_BYTES)
        env = jsonread.field(bundle, "dsseEnvelope", dict, where)
        ptype = jsonread.field(env, "payloadType", str, where, "dsseEnvelope")
        if ptype != PAYLOAD_TYPE:
            raise OmsError(f"{sig_path}: payloadType {ptype[:80]!r} is not in-toto")
        payload_b64 = jsonread.field(env, "payload", str, where, "dsseEnvelope")
        sigs = []
        for i, s in enumerate(jsonread.field(env, "signatures", list, where, "dsseEnvelope")):
            sigs.append(jsonread.field(s, "sig", str, where, f"dsseEnvelope.signatures[{i}]"))
        try:
            payload = base64.b64decode(payload_b64, validate=True)
            sig_bytes = [base64.b64decode(s, validate=True) for s in sigs]
        except ValueError:
            raise OmsError(f"{sig_path}: dsseEnvelope payload or a signature is not base64") from None
        statement = jsonread.loads(payload, f"{sig_path}: DSSE payload", MAX_SIG_BYTES)
    except jsonread.JsonReadError as e:
        raise OmsError(str(e)) from None
    if not isinstance(statement, dict):
        raise OmsError(f"{sig_path}: DSSE payload is not a JSON object")
    return payload, sig_bytes, statement


def read_oms(sig_path: Path) -> OmsManifest:
    """The subject and resources of an OMS v1.0 signature (files or shards serialization). Every
    field is type-checked: OmsError names the file and the field."""
    sig_path = Path(sig_path)
    where = str(sig_path)
    _, _, st = _load(sig_path)
    try:
        ptype = st.get("predicateType")
        if ptype != PREDICATE_TYPE:
            raise OmsError(f"{sig_path}: predicateType {str(ptype)[:80]!r}, expected {PREDICATE_TYPE}")
        subjects = jsonread.field(st, "subject", list, where)
        if len(subjects) != 1:
            raise OmsError(f"{sig_path}: field `subject` must hold exactly one subject, found {len(subjects)}")
        name = jsonread.field(subjects[0], "name", str, where, "subject[0]")
        digest = jsonread.field(subjects[0], "digest", dict, where, "subject[0]")
        root = jsonread.field(digest, "sha256", str, where, "subject[0].digest")
        pred = jsonread.field(st, "predicate", dict, where)
        resources = {}
        for i, r in enumerate(jsonread.field(pred, "resources", list, where, "predicate")):
            at = f"predicate.resources[{i}]"
            rname = jsonread.field(r, "name", str, where, at)
            algorithm = jsonread.field(r, "algorithm", str, where, at)
            if algorithm != "sha256":
                raise OmsError(f"{sig_path}: resource {rname[:200]} hashed with {algorithm[:40]}, not sha256")
            if rname in resources:
                raise OmsError(f"{sig_path}: resource {rname[:200]} is listed twice")
            resources[rname] = jsonread.field(r, "digest", str, where, at)
        ser = jsonread.field(pred, "serialization", dict, where, "predicate")
        for key, kind in (("method", str), ("hash_type", str), ("allow_symlinks", bool)):
            jsonread.field(ser, key, kind, where, "predicate.serialization", required=False)
        jsonread.str_list(ser, "ignore_paths", where, "predicate.serialization", required=False)
        return OmsManifest(name, root, resources, dict(ser))
    except jsonread.JsonReadError as e:
        raise OmsError(str(e)) from None


def oms_root(sig_path: Path) -> str:
    """The OMS subject digest: the checkpoint folder's ID in other documents."""
    return read_oms(sig_path).root


def _folder_files(checkpoint_dir: Path, ignored: set[str]) -> tuple[dict[str, Path], list[str]]:
    """Regular files under the folder by POSIX relative name, and anything else found (symlinks...)."""
    files, odd = {}, []
    for p in sorted(checkpoint_dir.rglob("*")):
        rel = p.relative_to(checkpoint_dir).as_posix()
        if rel.split("/")[0] in ignored or rel in ignored:
            continue
        if p.is_symlink():
            odd.append(rel)
        elif p.is_file():
            files[rel] = p
    return files, odd


def cross_check(oms_sig: Path, checkpoint_dir: Path, trusted: list[PublicKeyVerifier] | None = None,
                where: str | None = None, sha256: Callable[[Path], str] = sha256_file) -> list[Finding]:
    """Check an OMS signature against the folder's files: every listed file present with that sha256,
    no unlisted file, ROOT = sha256(concatenated digests); with `trusted`, a valid signature by one
    of those keys. Returns failures, or one passing finding. Never raises on bad content."""
    oms_sig, checkpoint_dir = Path(oms_sig), Path(checkpoint_dir)
    label, check = where or str(oms_sig), "oms-signature"
    try:
        payload, sigs, _ = _load(oms_sig)
        m = read_oms(oms_sig)
    except OmsError as e:
        return [Finding(check, False, label, "an OMS v1.0 signature", str(e).removeprefix(f"{oms_sig}: "))]
    out: list[Finding] = []
    ser = m.serialization
    if ser.get("method") != "files" or ser.get("hash_type") != "sha256" or ser.get("allow_symlinks"):
        out.append(Finding(check, False, label, "files serialization, sha256, no symlinks",
                              f"method {ser.get('method')}, hash_type {ser.get('hash_type')}, "
                              f"allow_symlinks {ser.get('allow_symlinks')}"))
    ignore = {str(p) for p in ser.get("ignore_paths") or []}
    # A signer may exclude only its own signature file and upstream's git paths; anything else
    # would let a file sit in the folder unsigned.
    extra_ignores = sorted(ignore - {oms_sig.name, *IGNORED_BY_DEFAULT})
    if extra_ignores:
        out.append(Finding(check, False, label, f"ignore_paths within {oms_sig.name} and git paths",
                              ", ".join(extra_ignores)))
    root = hashlib.sha256(b"".join(bytes.fromhex(d) for _, d in sorted(m.resources.items()))).hexdigest() \
        if all(_is_hex(d) for d in m.resources.values()) else "not hex"
    if root != m.root:
        out.append(Finding(check, False, label, f"subject digest {root}", m.root))
    files, odd = _folder_files(checkpoint_dir, ignore | {oms_sig.name, *IGNORED_BY_DEFAULT})
    for rel in odd:
        out.append(Finding(check, False, f"{checkpoint_dir}/{rel}", "a regular file", "a symlink"))
    for rel in sorted(set(m.resources) - set(files)):
        out.append(Finding(check, False, f"{checkpoint_dir}/{rel}", f"sha256 {m.resources[rel]}", "no such file"))
    for rel in sorted(set(files) - set(m.resources)):
        out.append(Finding(check, False, f"{checkpoint_dir}/{rel}", "no file the signature does not list",
                              "an unsigned file"))
    for rel in sorted(set(files) & set(m.resources)):
        got = sha256(files[rel])
        if got != m.resources[rel]:
            out.append(Finding(check, False, f"{checkpoint_dir}/{rel}", f"sha256 {m.resources[rel]}", got))
    if trusted is not None:
        msg = pae(PAYLOAD_TYPE, payload)
        if not any(k.verify(msg, s) for k in trusted for s in sigs):
            out.append(Finding(check, False, label, "a signature by " + ",".join(k.keyid[:16] for k in trusted),
                                  "no valid signature"))
    if not out:
        out.append(Finding(check, True, label, detail=f"{len(m.resources)} files, root {m.root[:16]}…"))
    return out


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
        return len(s) == 64
    except ValueError:
        return False
