"""Signing back-ends: a real SoftHSM2 token (PKCS#11), keyless and TSA failing fast offline,
and `make_signer` choosing by config.

The token is made the way docs/operators-guide.md#signing tells an operator to: softhsm2-util
initializes it, pkcs11-tool generates an EC P-256 key pair inside it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attest.chain import ChainWriter, read_chain
from attest.digest import sha256_file
from attest.dsse import PAYLOAD_TYPE, pae
from attest.signers import ensure_public_key, make_signer
from attest.signing import PemSigner, PublicKeyVerifier, SignerError, keygen
from attest.statements import subject
from conftest import serve_tsa

REPO = Path(__file__).resolve().parent.parent
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
URI = f"pkcs11:token=kai;object=chain-key?module-path={MODULE}"

needs_softhsm = pytest.mark.skipif(
    not (shutil.which("softhsm2-util") and shutil.which("pkcs11-tool") and Path(MODULE).exists()),
    reason="softhsm2 and opensc are not installed (apt-get install softhsm2 opensc; .ci/run does it)",
)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SoftHSM2 token 'kai' (user PIN 1234) holding an EC P-256 key pair 'chain-key' (id 01)."""
    if not (shutil.which("softhsm2-util") and shutil.which("pkcs11-tool") and Path(MODULE).exists()):
        pytest.skip("softhsm2 and opensc are not installed (apt-get install softhsm2 opensc; .ci/run does it)")
    pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by the module at C_Initialize, in this process and children
    for cmd in (["softhsm2-util", "--init-token", "--free", "--label", "kai", "--pin", "1234", "--so-pin", "5678"],
                ["pkcs11-tool", "--module", MODULE, "--token-label", "kai", "--login", "--pin", "1234",
                 "--keypairgen", "--key-type", "EC:prime256v1", "--label", "chain-key", "--id", "01"]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    yield URI
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


def hsm(uri: str, pin: str = "1234"):
    return make_signer({"backend": "pkcs11", "uri": f"{uri}&pin-value={pin}"})


def shard_chain(run_dir: Path, signer, n: int = 4) -> Path:
    """n data-shard statements over real files, as kai-data writes them."""
    chain = ChainWriter(run_dir / "chain.jsonl", signer, "hsm-run")
    for i in range(n):
        f = run_dir / "data" / f"part-{i}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"rows of shard {i}\n")
        chain.append("data-shard", [subject(f"data/part-{i}.txt", sha256_file(f))], {"manifest": {"shard": f.name}})
    return run_dir / "chain.jsonl"


def verifies(chain: Path, pub_pem: Path) -> bool:
    key = PublicKeyVerifier.from_file(pub_pem)
    entries, torn = read_chain(chain)
    return not torn and all(any(key.verify(pae(PAYLOAD_TYPE, e.payload), s) for _, s in e.signatures) for e in entries)


# ------------------------------------------------------------------ PKCS#11 (SoftHSM2)


@needs_softhsm
def test_chain_signed_by_hsm_key_verifies_with_exported_public_key(token: str, tmp_path: Path) -> None:
    from attest import verify

    signer = hsm(token)
    pub = ensure_public_key(signer, tmp_path / "keys" / "signing-key.pub.pem")
    chain = shard_chain(tmp_path, signer, n=5)
    trusted = PublicKeyVerifier.from_file(pub)
    assert trusted.keyid == signer.keyid  # keyid = sha256 of the DER SubjectPublicKeyInfo, as for PEM keys
    entries, torn = read_chain(chain)
    ctx = verify.Context(root=tmp_path, entries=entries, trusted=[trusted], trusted_from_bundle=False, torn_tail=torn)
    findings = [f for check in (verify.check_statements, verify.check_signatures, verify.check_sequence,
                                verify.check_links, verify.check_subjects) for f in check(ctx)]
    assert findings and all(f.ok for f in findings), [f.line() for f in findings if not f.ok]
    # each signature is DER ECDSA, the same form a PEM key makes
    sig = base64.b64decode(json.loads(chain.read_text().splitlines()[0])["dsseEnvelope"]["signatures"][0]["sig"])
    assert sig[0] == 0x30


@needs_softhsm
def test_hsm_chain_fails_against_another_key(token: str, tmp_path: Path) -> None:
    chain = shard_chain(tmp_path, hsm(token), n=2)
    _, other = keygen(tmp_path / "other")
    assert not verifies(chain, other)


@needs_softhsm
def test_wrong_pin_is_one_clear_line(token: str) -> None:
    # A fresh process, as a trainer is: login state is per token and process, and this one's
    # other tests are logged in.
    code = ("from attest.signers import make_signer\n"
            f"try: make_signer({{'backend': 'pkcs11', 'uri': {token + '&pin-value=0000'!r}}})\n"
            "except ValueError as e: print(e)")
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=60)
    assert p.stdout == "pkcs11: wrong PIN for token 'kai'\n", p.stdout + p.stderr


@needs_softhsm
def test_pin_from_environment_variable(token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAI_TEST_PIN", "1234")
    assert make_signer({"backend": "pkcs11", "uri": token, "pin_env": "KAI_TEST_PIN"}).keyid == hsm(token).keyid
    monkeypatch.delenv("KAI_TEST_PIN")
    with pytest.raises(SignerError, match=r"no PIN for token=kai;object=chain-key"):
        make_signer({"backend": "pkcs11", "uri": token, "pin_env": "KAI_TEST_PIN"})


@needs_softhsm
@pytest.mark.parametrize("uri, message", [
    (f"pkcs11:token=nope;object=chain-key?module-path={MODULE}&pin-value=1234",
     r"^pkcs11: token 'nope' not found in .*libsofthsm2.so \(tokens: 'kai'\)$"),
    (f"pkcs11:token=kai;object=no-such-key?module-path={MODULE}&pin-value=1234",
     r"^pkcs11: no EC private key token=kai;object=no-such-key on the token$"),
    ("pkcs11:token=kai;object=chain-key?module-path=/nonexistent/libpkcs11.so&pin-value=1234",
     r"^pkcs11: module /nonexistent/libpkcs11.so not found"),
    ("pkcs11:token=kai?module-path=/x.so", r"names no key"),
    ("file:///tmp/key.pem", r"is not a pkcs11: URI"),
])
def test_pkcs11_setup_errors_are_one_clear_line(token: str, uri: str, message: str) -> None:
    with pytest.raises(SignerError, match=message) as e:
        make_signer({"backend": "pkcs11", "uri": uri})
    assert "\n" not in str(e.value)


@needs_softhsm
def test_id_selects_the_key_like_the_label(token: str) -> None:
    by_id = make_signer({"backend": "pkcs11", "uri": f"pkcs11:token=kai;id=%01?module-path={MODULE}&pin-value=1234"})
    assert by_id.keyid == hsm(token).keyid


@needs_softhsm
def test_checkpoint_folder_signed_by_hsm_passes_upstream_model_signing_verify(token: str, tmp_path: Path) -> None:
    pytest.importorskip("model_signing", reason="model-signing is not installed")
    from attest.oms import cross_check, sign_checkpoint_dir

    ckpt = tmp_path / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(os.urandom(4096))
    signer = hsm(token)
    pub = ensure_public_key(signer, tmp_path / "keys" / "signing-key.pub.pem")
    sig = sign_checkpoint_dir(ckpt, signer)
    p = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", "--public_key", str(pub),
                        "--signature", str(sig), str(ckpt)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [f.ok for f in cross_check(sig, ckpt, [PublicKeyVerifier.from_file(pub)])] == [True]


def _kai_data_uses_make_signer() -> bool:
    return "make_signer" in (REPO / "data_pipelines" / "build.py").read_text()


@needs_softhsm
@pytest.mark.skipif(not _kai_data_uses_make_signer(), reason="data_pipelines/build.py does not use make_signer yet")
def test_kai_data_with_attest_pkcs11_signs_the_whole_data_chain_with_the_hsm(token: str, tmp_path: Path) -> None:
    pytest.importorskip("hydra", reason="the train extra; not on the evaluator's light install")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO), KAI_PKCS11_PIN="1234")
    p = subprocess.run([sys.executable, "-m", "data_pipelines.build", f"out_dir={tmp_path}", "attest=pkcs11",
                        f"attest.uri='{token}'"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    pub = tmp_path / "keys" / "signing-key.pub.pem"
    if not pub.exists():  # the public key as the operator exports it from the token
        ensure_public_key(hsm(token), pub)
    entries, _ = read_chain(tmp_path / "chain.jsonl")
    assert {e.kind for e in entries} == {"data-shard", "tokenizer"}
    assert verifies(tmp_path / "chain.jsonl", pub)
    assert {k for e in entries for k, _ in e.signatures} == {hsm(token).keyid}


# ------------------------------------------------------------------ PEM, keyless, TSA, config


def test_make_signer_pem_matches_pem_signer(tmp_path: Path) -> None:
    priv, pub = keygen(tmp_path / "keys")
    signer = make_signer({"backend": "pem", "key": str(priv), "tsa_url": None})
    assert signer.keyid == PemSigner.from_file(priv).keyid
    assert ensure_public_key(signer, pub) == pub  # the key keygen wrote is the signer's


def test_public_key_of_another_key_is_refused(tmp_path: Path) -> None:
    priv, _ = keygen(tmp_path / "a")
    _, other_pub = keygen(tmp_path / "b")
    with pytest.raises(SignerError, match=r"holds key .* but the configured signer's key is"):
        ensure_public_key(make_signer({"backend": "pem", "key": str(priv)}), other_pub)


def test_unknown_backend_is_named() -> None:
    with pytest.raises(SignerError, match=r"unknown back-end 'gpg' \(choose one of pem, pkcs11, sigstore\)"):
        make_signer({"backend": "gpg"})


def test_sigstore_keyless_offline_fails_fast_with_one_line() -> None:
    t0 = time.monotonic()
    with pytest.raises(SignerError) as e:
        make_signer({"backend": "sigstore", "timeout_s": 2})
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert msg.startswith("sigstore keyless signing needs network access to Fulcio and Rekor")
    assert msg.endswith("use backend=pem or backend=pkcs11 on air-gapped clusters") and "\n" not in msg


def test_configured_tsa_that_cannot_be_reached_fails_fast(tmp_path: Path) -> None:
    priv, _ = keygen(tmp_path / "keys")
    for url in ("http://127.0.0.1:9/tsa", "http://tsa.invalid/"):  # closed port; a name that never resolves
        t0 = time.monotonic()
        with pytest.raises(SignerError, match=rf"^tsa: the configured TSA {url} cannot be reached \(.+\)") as e:
            make_signer({"backend": "pem", "key": str(priv), "tsa_url": url, "tsa_timeout_s": 2})
        assert time.monotonic() - t0 < 10 and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def local_tsa(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object, object]:
    """A real RFC 3161 TSA on localhost: OpenSSL's `openssl ts -reply` behind http.server, with a
    test CA and a TSA certificate (EKU timeStamping). Yields (url, CA cert, TSA cert)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not shutil.which("openssl"):
        pytest.skip("the openssl command (which serves as the test TSA) is not installed")
    d = tmp_path_factory.mktemp("tsa")
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn: str, key, issuer: str, issuer_key, ca: bool):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, tsa_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("kai test CA", ca_key, "kai test CA", ca_key, True)
    tsa = cert("kai test TSA", tsa_key, "kai test CA", ca_key, False)
    (d / "tsa.crt").write_bytes(tsa.public_bytes(serialization.Encoding.PEM))
    (d / "tsa.key").write_bytes(tsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    (d / "serial").write_text("01\n")
    (d / "tsa.cnf").write_text(f"[ tsa ]\ndefault_tsa = t\n[ t ]\nserial = {d}/serial\nsigner_cert = {d}/tsa.crt\n"
                               f"signer_key = {d}/tsa.key\nsigner_digest = sha256\ndefault_policy = 1.2.3.4.1\n"
                               "digests = sha256\ness_cert_id_alg = sha256\n")

    def answer(query: bytes) -> bytes:
        return subprocess.run(["openssl", "ts", "-reply", "-config", str(d / "tsa.cnf"), "-queryfile", "/dev/stdin",
                               "-out", "/dev/stdout"], input=query, capture_output=True).stdout

    with serve_tsa(answer) as url:
        yield url, ca, tsa


def test_tsa_timestamps_each_signature_verifiably(local_tsa, tmp_path: Path) -> None:
    from rfc3161_client import VerificationError, VerifierBuilder, decode_timestamp_response

    url, ca, tsa = local_tsa
    priv, _ = keygen(tmp_path / "keys")
    signer = make_signer({"backend": "pem", "key": str(priv), "tsa_url": url, "tsa_timeout_s": 5})
    sig = signer.sign(b"DSSEv1 ...")
    data = signer.timestamp_verification_data(sig)
    (entry,) = data["rfc3161Timestamps"]
    response = decode_timestamp_response(base64.b64decode(entry["signedTimestamp"]))
    verifier = VerifierBuilder().add_root_certificate(ca).tsa_certificate(tsa).build()
    assert verifier.verify_message(response, sig)  # the TSA vouches for this signature at gen_time
    with pytest.raises(VerificationError):
        verifier.verify_message(response, sig[:-1] + bytes([sig[-1] ^ 1]))


@pytest.mark.skipif("timestamp_verification_data" not in (REPO / "attest" / "dsse.py").read_text(),
                    reason="attest/dsse.py does not store TSA timestamps yet")
def test_chain_entries_carry_the_tsa_timestamp_in_the_bundle(local_tsa, tmp_path: Path) -> None:
    priv, pub = keygen(tmp_path / "keys")
    signer = make_signer({"backend": "pem", "key": str(priv), "tsa_url": local_tsa[0]})
    chain = shard_chain(tmp_path, signer, n=2)
    for line in chain.read_text().splitlines():
        material = json.loads(line)["verificationMaterial"]
        assert len(material["timestampVerificationData"]["rfc3161Timestamps"]) == 1
    assert verifies(chain, pub)


def test_signing_config_files_name_every_backend_key() -> None:
    yaml = pytest.importorskip("yaml", reason="the train extra; not on the evaluator's light install")

    for name, keys in {"pem": {"backend", "key", "tsa_url"}, "pkcs11": {"backend", "uri", "pin_env", "tsa_url"}}.items():
        cfg = yaml.safe_load((REPO / "kai_train" / "conf" / "attest" / f"{name}.yaml").read_text())
        assert cfg["backend"] == name and keys <= set(cfg)


def test_backends_import_without_torch_or_optional_signing_libraries() -> None:
    """The evaluator's light install has none of torch, python-pkcs11, model-signing, sigstore."""
    code = ("import sys\n"
            "for m in ('torch', 'pkcs11', 'model_signing', 'sigstore', 'rfc3161_client'): sys.modules[m] = None\n"
            "import attest.signers, attest.pkcs11, attest.keyless, attest.oms\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
