"""Trusted time: RFC 3161 tokens in chain lines verified against TSA roots the policy pins.

The TSA is made here: a root CA and a TSA certificate (critical EKU timeStamping) built with
`cryptography`, and a small RFC 3161 responder that writes real TimeStampResponses (CMS SignedData
over a TSTInfo, signed attributes, ESS signing-certificate-v2) with asn1crypto. It is served over
HTTP on 127.0.0.1 so chain lines get their tokens through the real signing path
(`make_signer(tsa_url=…)` → TimestampingSigner → request_timestamp); the verifier's `timestamps`
check then reads those lines. No mocks: every token is signed DER that OpenSSL verifies.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rfc3161_client")
asn1_cms = pytest.importorskip("asn1crypto.cms")
from asn1crypto import algos, core, tsp  # noqa: E402
from asn1crypto import x509 as asn1_x509  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

import attest.verify as verify  # noqa: E402
from attest.chain import ChainWriter  # noqa: E402
from attest.verify.policy import PolicyError, load_policy, parse_policy  # noqa: E402
from attest.signers import make_signer  # noqa: E402
from attest.signing import keygen  # noqa: E402
from attest.statements import subject  # noqa: E402
from conftest import serve_tsa  # noqa: E402

NOW = datetime.now(timezone.utc).replace(microsecond=0)


# ------------------------------------------------------------------ a TSA made here


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn: str, key: Any, issuer: x509.Certificate | None, issuer_key: Any, *, ca: bool,
              eku: list[x509.ObjectIdentifier] | None = None, eku_critical: bool = True,
              valid: tuple[datetime, datetime] = (NOW - timedelta(days=1), NOW + timedelta(days=1))) -> x509.Certificate:
    """A certificate for `key`, issued by `issuer` (None: self-signed)."""
    b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer.subject if issuer else name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(valid[0]).not_valid_after(valid[1])
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=eku_critical)
    return b.sign(issuer_key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class Tsa:
    """An RFC 3161 time-stamping authority: a key, its certificate, the certificates it embeds in
    each token, and a clock (`clock()` gives each token's genTime)."""

    def __init__(self, key: Any, cert: x509.Certificate, embed: list[x509.Certificate],
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.key, self.cert, self.embed, self.clock = key, cert, embed, clock
        self.serials = itertools.count(1)
        self.url = ""

    def token(self, digest: bytes, nonce: int | None = None) -> bytes:
        """A granted TimeStampResponse (DER) over the sha256 digest `digest`."""
        info: dict[str, Any] = {
            "version": "v1", "policy": "1.2.3.4.1", "serial_number": next(self.serials),
            "message_imprint": {"hash_algorithm": {"algorithm": "sha256"}, "hashed_message": digest},
            "gen_time": self.clock().replace(microsecond=0), "accuracy": {"seconds": 1},
        }
        if nonce is not None:
            info["nonce"] = nonce
        tst_der = tsp.TSTInfo(info).dump()
        cert_der = self.cert.public_bytes(serialization.Encoding.DER)
        leaf = asn1_x509.Certificate.load(cert_der)
        signed_attrs = asn1_cms.CMSAttributes([
            {"type": "content_type", "values": ["tst_info"]},
            {"type": "message_digest", "values": [hashlib.sha256(tst_der).digest()]},
            {"type": "signing_certificate_v2", "values": [{"certs": [{"cert_hash": hashlib.sha256(cert_der).digest()}]}]},
        ])
        signature = self.key.sign(signed_attrs.dump(), ec.ECDSA(hashes.SHA256()))
        signer_info = {
            "version": "v1",
            "sid": asn1_cms.SignerIdentifier({"issuer_and_serial_number": {
                "issuer": leaf.issuer, "serial_number": leaf.serial_number}}),
            "digest_algorithm": {"algorithm": "sha256"},
            "signed_attrs": signed_attrs,
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": signature,
        }
        signed_data = asn1_cms.SignedData({
            "version": "v3",
            "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256"})],
            "encap_content_info": {"content_type": "tst_info", "content": core.ParsableOctetString(tst_der)},
            "certificates": [asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER)) for c in self.embed],
            "signer_infos": [signer_info],
        })
        return tsp.TimeStampResp({
            "status": {"status": "granted"},
            "time_stamp_token": {"content_type": "signed_data", "content": signed_data},
        }).dump()

    def answer(self, query: bytes) -> bytes:
        req = tsp.TimeStampReq.load(query)
        nonce = req["nonce"].native
        return self.token(req["message_imprint"]["hashed_message"].native, nonce)

    def serve(self) -> Iterator[Tsa]:
        with serve_tsa(self.answer) as url:
            self.url = url
            yield self


def new_key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def make_pki(cn: str = "kai test", **leaf: Any) -> tuple[x509.Certificate, Any, Any, x509.Certificate]:
    """(root certificate, root key, TSA key, TSA certificate issued by the root)."""
    root_key, tsa_key = new_key(), new_key()
    root = make_cert(f"{cn} root CA", root_key, None, root_key, ca=True)
    leaf.setdefault("eku", [ExtendedKeyUsageOID.TIME_STAMPING])
    return root, root_key, tsa_key, make_cert(f"{cn} TSA", tsa_key, root, root_key, ca=False, **leaf)


@pytest.fixture(scope="module")
def pki() -> tuple[x509.Certificate, Any, Any, x509.Certificate]:
    return make_pki()


@pytest.fixture
def tsa(pki) -> Iterator[Tsa]:
    root, _, key, cert = pki
    yield from Tsa(key, cert, [cert]).serve()


# ------------------------------------------------------------------ chains, policies, verifying


def write_chain(root: Path, tsa: Tsa, n: int = 3) -> Path:
    """A chain of `n` data-shard lines signed by a PEM key, each timestamped by `tsa` over HTTP."""
    priv, pub = keygen(root.parent / f"{root.name}-keys")
    signer = make_signer({"backend": "pem", "key": str(priv), "tsa_url": tsa.url, "tsa_timeout_s": 5})
    w = ChainWriter(root / "chain.jsonl", signer, "ts-run")
    for i in range(n):
        w.append("data-shard", [subject(f"data/part-{i}.txt", f"{i:02x}" * 32)], {"manifest": {"shard": i}})
    return pub


def policy_file(d: Path, roots: list[x509.Certificate], required: list[str] | None = None,
                intermediates: list[x509.Certificate] | None = None) -> Path:
    """A policy JSON pinning `roots` (one PEM file each, paths relative to the policy)."""
    d.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {"tsa_roots": []}
    for i, c in enumerate(roots):
        (d / f"root-{i}.pem").write_bytes(pem(c))
        raw["tsa_roots"].append(f"root-{i}.pem")
    if intermediates:
        (d / "intermediates.pem").write_bytes(pem(*intermediates))
        raw["tsa_intermediates"] = ["intermediates.pem"]
    if required:
        raw["required_checks"] = required
    (d / "policy.json").write_text(json.dumps(raw))
    return d / "policy.json"


def check(bundle: Path, pub: Path, policy: Path | None) -> verify.Report:
    return verify.verify_bundle(bundle, [str(pub)], load_policy(policy) if policy else None,
                                checks=[verify.check_timestamps])


def lines(bundle: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (bundle / "chain.jsonl").read_text().splitlines()]


def write_lines(bundle: Path, rows: list[dict[str, Any]]) -> None:
    """Chain lines with edited verification material: the DSSE signatures do not cover it."""
    (bundle / "chain.jsonl").write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows))


def token_of(row: dict[str, Any]) -> bytes:
    return base64.b64decode(row["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"][0]["signedTimestamp"])


def set_token(row: dict[str, Any], der: bytes) -> None:
    row["verificationMaterial"]["timestampVerificationData"] = {
        "rfc3161Timestamps": [{"signedTimestamp": base64.b64encode(der).decode()}]}


def signature_of(row: dict[str, Any]) -> bytes:
    return base64.b64decode(row["dsseEnvelope"]["signatures"][0]["sig"])


def fails(r: verify.Report) -> list[tuple[str, str, str]]:
    assert all(f.check == "timestamps" for f in r.failed)
    return [(f.file, f.expected, f.found) for f in r.failed]


# ------------------------------------------------------------------ the cases


def test_tokens_from_the_pinned_tsa_verify(pki, tsa: Tsa, tmp_path: Path) -> None:
    pub = write_chain(tmp_path / "b", tsa)
    r = check(tmp_path / "b", pub, policy_file(tmp_path / "policy", [pki[0]]))
    (f,) = r.findings
    assert r.ok and f.ok and not f.skipped, f.line()
    assert "3 tokens" in f.detail and "monotonic" in f.detail and "CN=kai test TSA" in f.detail
    assert len(r.facts["timestamps"]) == 3 and r.facts["timestamp_authorities"] == ["CN=kai test TSA"]


def test_tokens_from_a_self_made_tsa_fail_naming_each_line(pki, tmp_path: Path) -> None:
    # Same names as the real TSA and its root, other keys: nothing but the pinned root tells them apart.
    fake_root, _, fake_key, fake_cert = make_pki()
    for t in Tsa(fake_key, fake_cert, [fake_cert, fake_root]).serve():
        pub = write_chain(tmp_path / "b", t)
    r = check(tmp_path / "b", pub, policy_file(tmp_path / "policy", [pki[0]]))
    got = fails(r)
    assert [file for file, _, _ in got] == ["chain.jsonl:1", "chain.jsonl:2", "chain.jsonl:3"]
    assert all("pinned in the policy (tsa_roots)" in exp and "not verified" in found for _, exp, found in got)
    # ... and the same chain verifies once its own root is the one pinned
    assert check(tmp_path / "b", pub, policy_file(tmp_path / "policy2", [fake_root])).ok


def test_token_over_another_signature_fails(pki, tsa: Tsa, tmp_path: Path) -> None:
    pub = write_chain(tmp_path / "b", tsa)
    rows = lines(tmp_path / "b")
    # a genuine token of the pinned TSA, but over another signature's digest
    set_token(rows[1], tsa.token(hashlib.sha256(signature_of(rows[0])).digest()))
    write_lines(tmp_path / "b", rows)
    got = fails(check(tmp_path / "b", pub, policy_file(tmp_path / "policy", [pki[0]])))
    assert got[0][:2] == ("chain.jsonl:2", "a timestamp over sha256 of this entry's signature")


def test_tampered_token_bytes_fail(pki, tsa: Tsa, tmp_path: Path) -> None:
    pub = write_chain(tmp_path / "b", tsa)
    policy = policy_file(tmp_path / "policy", [pki[0]])
    rows = lines(tmp_path / "b")
    der = token_of(rows[0])
    # Move the signed genTime one year back: the DER still parses, the CMS signature no longer holds.
    stamp = tsp.TimeStampResp.load(der)["time_stamp_token"]["content"]["encap_content_info"]["content"].parsed[
        "gen_time"].dump()
    assert der.count(stamp) == 1
    year = stamp[2:6]
    earlier = stamp[:2] + str(int(year) - 1).encode() + stamp[6:]
    set_token(rows[0], der.replace(stamp, earlier))
    write_lines(tmp_path / "b", rows)
    (got,) = fails(check(tmp_path / "b", pub, policy))
    assert got[0] == "chain.jsonl:1" and "pinned in the policy" in got[1] and "not verified" in got[2]
    # Any single flipped bit anywhere in the token fails the line (unreadable or not verified).
    for pos in range(0, len(der), max(1, len(der) // 40)):
        bent = bytearray(der)
        bent[pos] ^= 0x01
        set_token(rows[0], bytes(bent))
        write_lines(tmp_path / "b", rows)
        r = check(tmp_path / "b", pub, policy)
        assert not r.ok and "chain.jsonl:1" in [f.file for f in r.failed], pos


def test_no_pinned_roots_skips_and_a_policy_requiring_timestamps_fails(tsa: Tsa, tmp_path: Path) -> None:
    pub = write_chain(tmp_path / "b", tsa)
    r = check(tmp_path / "b", pub, None)
    (f,) = r.findings
    assert f.skipped and not f.ok
    assert f.detail.startswith("no TSA roots pinned: timestamp signatures not verified")
    policy = tmp_path / "require.json"
    policy.write_text(json.dumps({"required_checks": ["timestamps"]}))
    (f,) = check(tmp_path / "b", pub, policy).failed
    assert (f.check, f.expected) == ("timestamps", "the check to run (required by policy)")
    assert f.found.startswith("skipped: no TSA roots pinned")


def test_pinned_roots_and_required_timestamps_pass(pki, tsa: Tsa, tmp_path: Path) -> None:
    pub = write_chain(tmp_path / "b", tsa)
    r = check(tmp_path / "b", pub, policy_file(tmp_path / "policy", [pki[0]], required=["timestamps"]))
    assert r.ok and r.findings[0].ok


@pytest.mark.parametrize("leaf", [{"eku": None}, {"eku_critical": False}, {"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}],
                         ids=["no-eku", "eku-not-critical", "code-signing-eku"])
def test_a_certificate_not_for_timestamping_fails(leaf: dict[str, Any], tmp_path: Path) -> None:
    root, _, key, cert = make_pki("odd", **leaf)
    for t in Tsa(key, cert, [cert]).serve():
        pub = write_chain(tmp_path / "b", t, n=1)
    ((file, _, found),) = fails(check(tmp_path / "b", pub, policy_file(tmp_path / "policy", [root])))
    assert file == "chain.jsonl:1" and ("EKU" in found or "purpose" in found.lower() or "unsuitable" in found), found


def test_a_tsa_certificate_expired_at_gen_time_fails(tmp_path: Path) -> None:
    root, _, key, cert = make_pki("expired", valid=(NOW - timedelta(days=10), NOW - timedelta(days=1)))
    for t in Tsa(key, cert, [cert]).serve():
        pub = write_chain(tmp_path / "b", t, n=1)
    ((file, _, found),) = fails(check(tmp_path / "b", pub, policy_file(tmp_path / "policy", [root])))
    assert file == "chain.jsonl:1" and "expired" in found, found


def test_intermediate_ca_from_the_policy_or_the_token(tmp_path: Path) -> None:
    root_key, mid_key, tsa_key = new_key(), new_key(), new_key()
    root = make_cert("kai root CA", root_key, None, root_key, ca=True)
    mid = make_cert("kai intermediate CA", mid_key, root, root_key, ca=True)
    cert = make_cert("kai TSA", tsa_key, mid, mid_key, ca=False, eku=[ExtendedKeyUsageOID.TIME_STAMPING])
    for t in Tsa(tsa_key, cert, [cert]).serve():  # the token does not carry the intermediate
        pub = write_chain(tmp_path / "b", t, n=2)
    assert len(fails(check(tmp_path / "b", pub, policy_file(tmp_path / "p1", [root])))) == 2
    assert check(tmp_path / "b", pub, policy_file(tmp_path / "p2", [root], intermediates=[mid])).ok
    # pinning the intermediate as a root is refused when the policy is read
    (tmp_path / "p3").mkdir()
    (tmp_path / "p3" / "mid.pem").write_bytes(pem(mid))
    with pytest.raises(PolicyError, match=r"tsa_roots\[0\] .*mid\.pem: CN=kai intermediate CA is not a self-signed root"):
        parse_policy({"tsa_roots": ["mid.pem"]}, "p3/policy.json", tmp_path / "p3")


def test_times_going_backwards_along_the_chain_fail(pki, tmp_path: Path) -> None:
    _, _, key, cert = pki
    times = iter([NOW - timedelta(minutes=10), NOW - timedelta(minutes=5), NOW - timedelta(minutes=8)])
    for t in Tsa(key, cert, [cert], clock=lambda: next(times)).serve():
        pub = write_chain(tmp_path / "b", t)
    ((file, expected, _),) = fails(check(tmp_path / "b", pub, policy_file(tmp_path / "policy", [pki[0]])))
    assert file == "chain.jsonl:3" and expected.startswith("a time at or after") and "(line 2)" in expected


def test_a_time_after_the_verification_time_fails(pki, tmp_path: Path) -> None:
    _, _, key, cert = pki
    # The certificate is valid then, so only the verifier's own clock can refuse the time.
    for t in Tsa(key, cert, [cert], clock=lambda: NOW + timedelta(hours=2)).serve():
        pub = write_chain(tmp_path / "b", t, n=1)
    ((file, expected, found),) = fails(check(tmp_path / "b", pub, policy_file(tmp_path / "policy", [pki[0]])))
    assert file == "chain.jsonl:1" and expected.startswith("a time no later than the verification time")
    assert found == (NOW + timedelta(hours=2)).isoformat()


def test_policy_tsa_fields_name_the_file_and_field(pki, tmp_path: Path) -> None:
    where = str(tmp_path / "policy.json")
    with pytest.raises(PolicyError, match=r"policy\.json: tsa_roots\[0\] .*missing\.pem: cannot read"):
        parse_policy({"tsa_roots": ["missing.pem"]}, where, tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(PolicyError, match=r"policy\.json: tsa_intermediates\[0\] .*junk\.pem: not a PEM X\.509"):
        parse_policy({"tsa_intermediates": ["junk.pem"]}, where, tmp_path)
    with pytest.raises(PolicyError, match=r"policy\.json: `tsa_roots` must be a list of non-empty strings"):
        parse_policy({"tsa_roots": "root.pem"}, where, tmp_path)
    (tmp_path / "roots.pem").write_bytes(pem(pki[0], make_pki("other")[0]))  # a PEM bundle of two roots
    assert len(parse_policy({"tsa_roots": ["roots.pem"]}, where, tmp_path).tsa_roots) == 2


def test_example_policy_pins_tsa_roots() -> None:
    example = json.loads((Path(__file__).resolve().parent.parent / "docs" / "policy.example.json").read_text())
    assert isinstance(example.get("tsa_roots"), list) and example["tsa_roots"]


def test_lines_without_a_token_are_named_in_a_note(pki, tsa: Tsa, tmp_path: Path) -> None:
    pub = write_chain(tmp_path / "b", tsa)
    rows = lines(tmp_path / "b")
    del rows[1]["verificationMaterial"]["timestampVerificationData"]
    write_lines(tmp_path / "b", rows)
    r = check(tmp_path / "b", pub, policy_file(tmp_path / "policy", [pki[0]]))
    assert r.ok and "2 tokens" in r.findings[0].detail
    assert any(n.startswith("1 of 3 chain lines carry no RFC 3161 token (first: line 2)") for n in r.notes), r.notes


def test_kai_attest_verify_on_a_whole_timestamped_bundle(pki, tsa: Tsa, tmp_path: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The command an evaluator runs: a complete synthetic bundle whose every line is timestamped."""
    from bundlefactory import DERIVER, make_bundle, statements

    from attest.cli import main
    from attest.dsse import sign_statement

    monkeypatch.setitem(verify.DERIVERS, DERIVER, "bundlefactory")
    root, priv = make_bundle(tmp_path / "bundle")
    signer = make_signer({"backend": "pem", "key": str(priv), "tsa_url": tsa.url, "tsa_timeout_s": 5})
    out, prev = [], None
    for st in statements(root):  # the same statements, signed again with a token on every line
        st["predicate"]["previous"] = prev
        out.append(json.dumps(sign_statement(st, signer), sort_keys=True, separators=(",", ":")).encode())
        prev = hashlib.sha256(out[-1]).hexdigest()
    (root / "chain.jsonl").write_bytes(b"".join(x + b"\n" for x in out))
    pub = str(root / "keys" / "signing-key.pub.pem")

    assert main(["verify", str(root), "--trust", pub, "--policy",
                 str(policy_file(tmp_path / "p1", [pki[0]], required=["timestamps"]))]) == 4  # not replayable: INCOMPLETE
    got = capsys.readouterr().out
    assert f"ok    timestamps        chain.jsonl {len(out)} tokens" in got, got
    other_root = make_pki("other")[0]
    assert main(["verify", str(root), "--trust", pub, "--policy", str(policy_file(tmp_path / "p2", [other_root]))]) == 1
    got = capsys.readouterr().out
    assert got.count("FAIL  timestamps        chain.jsonl:") == len(out), got
    (tmp_path / "p3").mkdir()
    (tmp_path / "p3" / "policy.json").write_text(json.dumps({"tsa_roots": ["nowhere.pem"]}))
    assert main(["verify", str(root), "--trust", pub, "--policy", str(tmp_path / "p3" / "policy.json")]) == 2
    err = capsys.readouterr().err
    assert "policy.json: tsa_roots[0]" in err and "nowhere.pem: cannot read" in err, err
