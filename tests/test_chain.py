"""The chain, signatures and bundle paths, without torch or training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attest.bundle import BundlePathError, safe_file
from attest.chain import ChainError, ChainWriter, read_chain
from attest.digest import merkle_root, safetensors_root, tensor_digest
from attest.dsse import PAYLOAD_TYPE, pae
from attest.signing import SigningKeyError, PemSigner, PublicKeyVerifier, keygen
from attest.statements import subject

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def key(tmp_path: Path) -> Path:
    priv, _ = keygen(tmp_path / "keys")
    return priv


def write_chain(path: Path, key: Path, n: int, run_id: str = "r") -> None:
    w = ChainWriter(path, PemSigner.from_file(key), run_id)
    for i in range(n):
        w.append("release", [subject(f"w{i}.safetensors", "00" * 32)], {"step": i, "weights_root": "ab" * 32})


def test_statements_are_signed_sequenced_and_linked(tmp_path: Path, key: Path) -> None:
    write_chain(tmp_path / "c.jsonl", key, 3)
    entries, torn = read_chain(tmp_path / "c.jsonl")
    assert not torn
    assert [e.predicate["sequence"] for e in entries] == [0, 1, 2]
    assert entries[0].predicate["previous"] is None
    assert [e.predicate["previous"] for e in entries[1:]] == [e.digest for e in entries[:-1]]
    v = PublicKeyVerifier.from_file(key.parent / "signing-key.pub.pem")
    assert all(v.verify(pae(PAYLOAD_TYPE, e.payload), e.signatures[0][1]) for e in entries)
    assert not v.verify(pae(PAYLOAD_TYPE, entries[0].payload + b" "), entries[0].signatures[0][1])
    st = entries[0].statement
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert entries[0].bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"


def test_reopened_writer_continues_the_sequence(tmp_path: Path, key: Path) -> None:
    write_chain(tmp_path / "c.jsonl", key, 2)
    write_chain(tmp_path / "c.jsonl", key, 2)
    entries, _ = read_chain(tmp_path / "c.jsonl")
    assert [e.predicate["sequence"] for e in entries] == [0, 1, 2, 3]
    assert entries[2].predicate["previous"] == entries[1].digest


def test_writer_refuses_a_chain_of_another_run(tmp_path: Path, key: Path) -> None:
    write_chain(tmp_path / "c.jsonl", key, 1, run_id="a")
    with pytest.raises(ChainError, match="belongs to run 'a'"):
        write_chain(tmp_path / "c.jsonl", key, 1, run_id="b")


def test_torn_last_line_is_reported_and_whole_lines_kept(tmp_path: Path, key: Path) -> None:
    write_chain(tmp_path / "c.jsonl", key, 2)
    with open(tmp_path / "c.jsonl", "ab") as f:
        f.write(b'{"mediaType": "application/vnd.dev.sig')
    entries, torn = read_chain(tmp_path / "c.jsonl")
    assert torn and len(entries) == 2
    with pytest.raises(ChainError, match="torn line"):
        write_chain(tmp_path / "c.jsonl", key, 1)


def test_malformed_line_names_file_and_line(tmp_path: Path, key: Path) -> None:
    write_chain(tmp_path / "c.jsonl", key, 1)
    with open(tmp_path / "c.jsonl", "ab") as f:
        f.write(b'{"mediaType": "x"}\n')
    with pytest.raises(ChainError, match=r"c\.jsonl:2: not a Sigstore bundle"):
        read_chain(tmp_path / "c.jsonl")


def test_keygen_refuses_to_overwrite_and_key_is_private(tmp_path: Path) -> None:
    priv, _ = keygen(tmp_path)
    assert os.stat(priv).st_mode & 0o077 == 0
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        keygen(tmp_path)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "", "a//b"])
def test_safe_file_refuses_paths_out_of_the_bundle(tmp_path: Path, name: str) -> None:
    with pytest.raises(BundlePathError):
        safe_file(tmp_path, name)


def test_safe_file_refuses_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(BundlePathError, match="symlink"):
        safe_file(tmp_path, "link")


def test_canonical_root_of_hand_written_safetensors_matches_leaf_definition(tmp_path: Path) -> None:
    # a safetensors file written by hand: two F32 tensors, stored in the opposite order to names
    import struct

    a, b = struct.pack("<2f", 1.0, 2.0), struct.pack("<f", 3.0)
    header = {"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    h = json.dumps(header).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b + a)
    want = merkle_root({"a": tensor_digest("a", "F32", [2], [a]), "b": tensor_digest("b", "F32", [1], [b])})
    assert safetensors_root([tmp_path / "m.safetensors"]) == want
    assert want != merkle_root({"a": tensor_digest("a", "F32", [1, 2], [a]), "b": tensor_digest("b", "F32", [1], [b])})


def test_attest_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now raises ImportError
        "import attest.cli, attest.verify, attest.bundle, attest.chain\n"
        "print('ok')"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
