"""Cost of the `signature` check on keyless chain lines against key-signed ones.

Signs N statements keyless through attest.keyless.KeylessSigner against the in-process private
Sigstore of the tests (tests/sigstore_instance.py: CA with SCTs, Merkle-tree log with checkpoints
and SETs), then times verify_keyless (sigstore-python's offline verifier: certificate chain, SCT,
identity, inclusion proof, checkpoint, SET, envelope signature) per line, and, as the baseline in
the same run, the ECDSA check a key-signed line costs. Prints one line of figures.
Usage: `python bench/keyless_verify.py [--entries N] [--statement-bytes B]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from sigstore_instance import Instance  # noqa: E402

from attest.dsse import PAYLOAD_TYPE, pae  # noqa: E402
from attest.keyless import KeylessSigner, load_trusted_root, verify_keyless  # noqa: E402
from attest.signing import PemSigner, PublicKeyVerifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=500)
    ap.add_argument("--statement-bytes", type=int, default=2000)
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    a = ap.parse_args()
    if a.smoke:
        a.entries = 5

    statements = [json.dumps({"n": i, "pad": "x" * a.statement_bytes}).encode() for i in range(a.entries)]
    inst = Instance()
    signer = KeylessSigner(inst.fulcio, inst.rekor, lambda: "test-token", inst.identity)
    t = time.perf_counter()
    bundles = [signer.sign_statement(s) for s in statements]
    sign_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        root = load_trusted_root(inst.trusted_root(Path(d) / "trusted_root.json"))
    idents = [(inst.identity, inst.issuer)]
    verify_keyless(bundles[0], root, idents)  # imports and the verifier's one-time setup
    t = time.perf_counter()
    bad = sum(verify_keyless(b, root, idents) is not None for b in bundles)
    keyless_s = time.perf_counter() - t
    key = ec.generate_private_key(ec.SECP256R1())
    pem, pub = PemSigner(key), PublicKeyVerifier(key.public_key())
    msgs = [pae(PAYLOAD_TYPE, s) for s in statements]
    sigs = [pem.sign(m) for m in msgs]
    t = time.perf_counter()
    bad += sum(not pub.verify(m, s) for m, s in zip(msgs, sigs))
    key_s = time.perf_counter() - t
    n = a.entries
    print(f"{n} lines: keyless verify {keyless_s / n * 1e3:.2f} ms/line ({keyless_s:.2f} s), key-signed "
          f"{key_s / n * 1e3:.3f} ms/line ({key_s:.3f} s), ratio {keyless_s / key_s:.0f}x; keyless signing with "
          f"in-process services {sign_s / n * 1e3:.2f} ms/line; failures {bad}")


if __name__ == "__main__":
    main()
