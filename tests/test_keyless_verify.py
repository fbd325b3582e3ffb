"""Keyless (Sigstore) chain entries verified offline: a private Sigstore instance built in the test
(tests/sigstore_instance.py: Fulcio-like CA with SCTs, Rekor-like log with checkpoints and SETs)
signs a synthetic bundle's chain through attest.keyless.KeylessSigner, the code path production
signing takes; `kai-attest verify` accepts it only against the trusted root and identity the
policy pins. No network, no torch."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest
from bundlefactory import DERIVER, make_bundle, statements
from sigstore_instance import Instance

import attest.verify as verify
from attest.verify.checks.chain import check_signatures
from attest.cli import main
from attest.dsse import sign_statement
from attest.keyless import KeylessSigner
from attest.verify.policy import PolicyError, load_policy
from attest.signing import SignerError

IDENTITY, ISSUER = "trainer@example.org", "https://oidc.example.org"


@pytest.fixture(autouse=True)
def test_deriver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(verify.DERIVERS, DERIVER, "bundlefactory")


def keyless_chain(root: Path, inst: Instance) -> None:
    """Re-sign root/chain.jsonl keyless, the way attest.chain.ChainWriter signs (sign_statement with
    the configured signer), and drop the bundle's key folder: a keyless run ships no key."""
    signer = KeylessSigner(inst.fulcio, inst.rekor, lambda: "test-token", inst.identity)
    out, prev = [], None
    for i, st in enumerate(statements(root)):
        st["predicate"].update(sequence=i, previous=prev)
        line = json.dumps(sign_statement(st, signer), sort_keys=True, separators=(",", ":")).encode()
        out.append(line)
        prev = hashlib.sha256(line).hexdigest()
    (root / "chain.jsonl").write_bytes(b"".join(x + b"\n" for x in out))
    shutil.rmtree(root / "keys")


def write_policy(folder: Path, inst: Instance, **fields: Any) -> Path:
    """A policy next to a trusted_root.json (named relatively, as an evaluator keeps them)."""
    folder.mkdir(parents=True, exist_ok=True)
    inst.trusted_root(folder / "trusted_root.json")
    doc = {"sigstore_trusted_root": "trusted_root.json",
           "sigstore_identities": [{"identity": IDENTITY, "issuer": ISSUER}], **fields}
    (folder / "policy.json").write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    return folder / "policy.json"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Instance]:
    """One keyless bundle for the module; tests copy it before tampering."""
    root, _ = make_bundle(tmp_path_factory.mktemp("keyless") / "bundle", steps=(2, 4))
    inst = Instance(IDENTITY, ISSUER)
    keyless_chain(root, inst)
    return root, inst


def signature_failures(bundle: Path, policy: Path) -> list[verify.Finding]:
    report = verify.verify_bundle(bundle, policy=load_policy(policy), checks=[check_signatures])
    return [f for f in report.findings if f.check == "signature" and not f.ok]


def test_keyless_chain_passes_with_pinned_root_and_identity(signed: tuple[Path, Instance], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    bundle, inst = signed
    policy = write_policy(tmp_path / "evaluator", inst)
    report = verify.verify_bundle(bundle, policy=load_policy(policy))
    assert report.failed == [], [f.line() for f in report.failed]
    # identity established; the synthetic run is not replayable here, so not recomputed: INCOMPLETE
    assert (report.verdict, report.trust, report.exit_code) == ("incomplete", "identity", 4)
    (sig,) = [f for f in report.findings if f.check == "signature"]
    assert sig.ok and f"keyless identities {IDENTITY} ({ISSUER})" in sig.detail
    assert report.facts["keyless_entries"] == len(statements(bundle))
    (ts,) = [f for f in report.findings if f.check == "timestamps"]
    assert ts.skipped and "keyless lines carry their log's integrated time" in ts.detail
    assert main(["verify", str(bundle), "--policy", str(policy)]) == 4
    assert "verdict: INCOMPLETE" in capsys.readouterr().out


@pytest.mark.parametrize("identity,issuer,why", [
    ("someone-else@example.org", ISSUER, f"the certificate names {IDENTITY} from {ISSUER}, none of the policy's"),
    (IDENTITY, "https://accounts.other.example", f"the certificate names {IDENTITY} from {ISSUER}, none of the policy's"),
])
def test_keyless_line_of_another_identity_or_issuer_fails(signed: tuple[Path, Instance], tmp_path: Path,
                                                          identity: str, issuer: str, why: str) -> None:
    bundle, inst = signed
    policy = write_policy(tmp_path, inst, sigstore_identities=[{"identity": identity, "issuer": issuer}])
    fails = signature_failures(bundle, policy)
    assert [f.file for f in fails] == [f"chain.jsonl:{i + 1}" for i in range(len(statements(bundle)))]
    assert all(why in f.found for f in fails), fails[0].line()


def test_keyless_entries_from_a_ca_the_root_does_not_name_fail(tmp_path: Path) -> None:
    inst = Instance(IDENTITY, ISSUER)
    policy = write_policy(tmp_path / "evaluator", inst)
    inst.signing_ca = inst.other_ca()  # a look-alike Fulcio: same log, same CT key, another CA
    bundle, _ = make_bundle(tmp_path / "bundle", steps=(2,))
    keyless_chain(bundle, inst)
    fails = signature_failures(bundle, policy)
    assert len(fails) == len(statements(bundle)) and fails[0].file == "chain.jsonl:1"
    assert "certificate chain" in fails[0].found, fails[0].line()


def test_keyless_entry_logged_after_its_certificate_expired_fails(tmp_path: Path) -> None:
    inst = Instance(IDENTITY, ISSUER)
    policy = write_policy(tmp_path / "evaluator", inst)
    inst.time_shift = timedelta(minutes=30)  # an honest log, a late entry: the 10-minute certificate has expired
    bundle, _ = make_bundle(tmp_path / "bundle", steps=(2,))
    keyless_chain(bundle, inst)
    fails = signature_failures(bundle, policy)
    assert len(fails) == len(statements(bundle)) and fails[0].file == "chain.jsonl:1"
    assert "not verified" in fails[0].found and "not valid at validation time" in fails[0].found, fails[0].line()


def _tamper_proof_hash(b: dict[str, Any]) -> None:
    hashes = b["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["hashes"]
    hashes[0] = base64.b64encode(hashlib.sha256(b"another leaf").digest()).decode()


def _tamper_root_hash(b: dict[str, Any]) -> None:  # a root the signed checkpoint does not name
    b["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["rootHash"] = base64.b64encode(b"\x01" * 32).decode()


def _tamper_time(b: dict[str, Any]) -> None:  # the SET covers the integrated time
    t = b["verificationMaterial"]["tlogEntries"][0]
    t["integratedTime"] = str(int(t["integratedTime"]) + 60)  # still within the certificate's 10 minutes


def _tamper_body(b: dict[str, Any]) -> None:  # a log entry for another envelope
    t = b["verificationMaterial"]["tlogEntries"][0]
    body = json.loads(base64.b64decode(t["canonicalizedBody"]))
    body["spec"]["payloadHash"]["value"] = "00" * 32
    t["canonicalizedBody"] = base64.b64encode(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).decode()


def _tamper_checkpoint(b: dict[str, Any]) -> None:  # the checkpoint's note altered under its signature
    cp = b["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["checkpoint"]
    origin, rest = cp["envelope"].split("\n", 1)
    cp["envelope"] = origin + " (edited)\n" + rest


def _tamper_payload(b: dict[str, Any]) -> None:  # another statement under the same signature
    st = json.loads(base64.b64decode(b["dsseEnvelope"]["payload"]))
    st["predicate"]["metrics"] = {"loss": 0.01}
    b["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()


@pytest.mark.parametrize("tamper,why", [
    (_tamper_proof_hash, "inclusion proof"), (_tamper_root_hash, "root hash"), (_tamper_time, "SET"),
    (_tamper_body, "invalid log entry"), (_tamper_checkpoint, "checkpoint"), (_tamper_payload, "signature"),
])
def test_tampered_log_entry_or_envelope_fails_naming_the_line(signed: tuple[Path, Instance], tmp_path: Path,
                                                              tamper: Callable[[dict[str, Any]], None], why: str) -> None:
    src, inst = signed
    bundle = tmp_path / "bundle"
    shutil.copytree(src, bundle)
    lines = (bundle / "chain.jsonl").read_bytes().splitlines()
    b = json.loads(lines[2])
    tamper(b)
    lines[2] = json.dumps(b, sort_keys=True, separators=(",", ":")).encode()
    (bundle / "chain.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))
    fails = signature_failures(bundle, write_policy(tmp_path / "evaluator", inst))
    assert [f.file for f in fails] == ["chain.jsonl:3"], [f.line() for f in fails]
    assert why.lower() in fails[0].found.lower(), fails[0].line()


def test_keyless_chain_without_a_pinned_root_fails_with_one_line(signed: tuple[Path, Instance], tmp_path: Path) -> None:
    bundle, inst = signed
    policy = write_policy(tmp_path, inst, sigstore_trusted_root=None)
    report = verify.verify_bundle(bundle, policy=load_policy(policy))
    fails = [f for f in report.failed if f.check == "signature"]
    assert len(fails) == 1 and report.exit_code == 1
    line = fails[0].line()
    assert "set sigstore_trusted_root in the policy" in line and f"a certificate for {IDENTITY} from {ISSUER}" in line
    assert "\n" not in line and report.trust == "identity"  # the policy named who signs: never integrity-only


def test_policy_trusted_root_is_read_relative_to_the_policy_and_checked(tmp_path: Path) -> None:
    inst = Instance(IDENTITY, ISSUER)
    policy = write_policy(tmp_path / "evaluator", inst)
    assert load_policy(policy).sigstore_trusted_root_path == tmp_path / "evaluator/trusted_root.json"
    (tmp_path / "evaluator/trusted_root.json").write_text('{"mediaType": "not a root"}')
    with pytest.raises(PolicyError, match=r"sigstore_trusted_root .*trusted_root.json: not a Sigstore trusted root"):
        load_policy(policy)
    doc = json.loads(inst.trusted_root(tmp_path / "evaluator/trusted_root.json").read_text())
    doc["ctlogs"] = []
    (tmp_path / "evaluator/trusted_root.json").write_text(json.dumps(doc))
    with pytest.raises(PolicyError, match=r"a trusted root naming no ctlogs"):
        load_policy(policy)
    (tmp_path / "evaluator/trusted_root.json").unlink()
    with pytest.raises(PolicyError, match=r"trusted_root.json: cannot read"):
        load_policy(policy)
    no_ident = write_policy(tmp_path / "other", inst, sigstore_identities=None)
    with pytest.raises(PolicyError, match=r"sigstore_trusted_root needs sigstore_identities"):
        load_policy(no_ident)


def test_a_fulcio_certificate_for_another_key_is_refused_at_signing() -> None:
    inst = Instance(IDENTITY, ISSUER)

    def wrong_key(csr_pem: bytes, token: str) -> list[bytes]:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        cert = inst.issue(ec.generate_private_key(ec.SECP256R1()).public_key())
        return [cert.public_bytes(serialization.Encoding.PEM)]

    signer = KeylessSigner(wrong_key, inst.rekor, lambda: "test-token", IDENTITY)
    with pytest.raises(SignerError, match="certificate is for another key"):
        signer.sign_statement(b"{}")


def test_signer_checks_each_bundle_before_it_is_written(signed: tuple[Path, Instance]) -> None:
    from attest.keyless import verify_keyless

    inst = Instance(IDENTITY, ISSUER)
    other = Instance(IDENTITY, ISSUER)  # the signer trusts another instance's root

    def check(bundle: dict[str, Any]) -> None:
        why = verify_keyless(copy.deepcopy(bundle), _root(other), [(IDENTITY, ISSUER)])
        if why:
            raise SignerError(why)

    with pytest.raises(SignerError, match="certificate chain"):
        KeylessSigner(inst.fulcio, inst.rekor, lambda: "test-token", IDENTITY, check).sign_statement(b"{}")


def _root(inst: Instance) -> Any:
    import tempfile

    from attest.keyless import load_trusted_root

    with tempfile.TemporaryDirectory() as d:
        return load_trusted_root(inst.trusted_root(Path(d) / "trusted_root.json"))


def test_keyless_bundle_without_a_policy_names_the_policy_keys(signed: tuple[Path, Instance],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bundle, _ = signed
    assert main(["verify", str(bundle)]) == 2  # no --trust key, no keys/ folder, no policy: nothing to trust
    err = capsys.readouterr().err
    assert "sigstore_trusted_root and sigstore_identities" in err and len(err.strip().splitlines()) == 1, err
