"""Tampered bundles must fail verify (exit 1) with a line naming the failed check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")
from safetensors.torch import load_file

from attest.chain import read_chain
from attest.digest import sha256_file
from attest.oms import sign_checkpoint_dir
from attest.signing import PemSigner, keygen
from conftest import kai_attest, resign
from kai_train.init import build_genesis_model
from kai_train.model import ModelConfig
from kai_train.weights import save_weights, state_dict_leaves

pytestmark = pytest.mark.slow


@pytest.fixture
def bundle(demo_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_run / "bundle", tmp_path / "bundle"))


def lines(b: Path) -> list[bytes]:
    return (b / "chain.jsonl").read_bytes().splitlines(keepends=True)


def set_lines(b: Path, ls: list[bytes]) -> None:
    (b / "chain.jsonl").write_bytes(b"".join(ls))


def failed_checks(b: Path, *extra: str) -> set[str]:
    p = kai_attest("verify", str(b), *extra)
    assert p.returncode == 1, f"expected exit 1, got {p.returncode}\n{p.stdout}\n{p.stderr}"
    return {line.split()[1] for line in p.stdout.splitlines() if line.startswith("FAIL")}


def test_flipped_byte_in_a_checkpoint_fails_subject_and_weights_digest(bundle: Path) -> None:
    f = bundle / "checkpoints/step-000002/model-00000-of-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01
    f.write_bytes(bytes(data))
    assert {"subject-digest", "weights-digest"} <= failed_checks(bundle)


def test_removed_chain_entry_fails_sequence_and_link(bundle: Path) -> None:
    ls = lines(bundle)
    del ls[3]
    set_lines(bundle, ls)
    assert {"chain-sequence", "chain-link"} <= failed_checks(bundle)


def test_inserted_chain_entry_fails_sequence(bundle: Path) -> None:
    ls = lines(bundle)
    ls.insert(4, ls[2])
    set_lines(bundle, ls)
    assert "chain-sequence" in failed_checks(bundle)


def test_reordered_chain_entries_fail_sequence_and_link(bundle: Path) -> None:
    ls = lines(bundle)
    ls[-2], ls[-3] = ls[-3], ls[-2]
    set_lines(bundle, ls)
    assert {"chain-sequence", "chain-link"} <= failed_checks(bundle)


def test_entry_signed_by_another_key_fails_signature(bundle: Path, tmp_path: Path) -> None:
    other, _ = keygen(tmp_path / "other")
    entries, _ = read_chain(bundle / "chain.jsonl")
    forged = PemSigner.from_file(other)
    from attest.dsse import sign_statement

    ls = lines(bundle)
    ls[5] = json.dumps(sign_statement(entries[5].statement, forged), sort_keys=True, separators=(",", ":")).encode() + b"\n"
    set_lines(bundle, ls)
    assert failed_checks(bundle) == {"signature", "chain-link"}


def test_untrusted_bundle_key_fails_signature_against_evaluator_key(bundle: Path, tmp_path: Path) -> None:
    _, evaluator_pub = keygen(tmp_path / "evaluator")
    assert "signature" in failed_checks(bundle, "--trust", str(evaluator_pub))


def test_insider_swaps_genesis_for_another_seed_and_resigns_everything(demo_run: Path, bundle: Path) -> None:
    """The case that matters most: the real key, a consistent chain, but W0 not from the committed seed."""
    entries, _ = read_chain(bundle / "chain.jsonl")
    genesis = next(e for e in entries if e.kind == "genesis").predicate
    model, _ = build_genesis_model(ModelConfig.from_dict(genesis["recipe"]["model"]), seed=999)
    sd = {n: p.detach() for n, p in model.named_parameters()}
    folder = bundle / "checkpoints/step-000000"
    for f in folder.glob("model*.safetensors"):  # each genesis shard keeps its tensors, with other values
        save_weights({n: sd[n] for n in load_file(str(f))}, f)
    sign_checkpoint_dir(folder, demo_run / "keys/signing-key.pem")  # the insider re-signs OMS too
    leaves = state_dict_leaves(sd)
    from attest.digest import merkle_root

    root = merkle_root(leaves)

    def swap(statements: list[dict]) -> None:
        for st in statements:
            p = st["predicate"]
            if p["kind"] == "genesis":
                for s in st["subject"]:
                    s["digest"]["sha256"] = sha256_file(bundle / s["name"])
                p["weights_root"] = root
                for n, t in p["tensors"].items():
                    t["digest"] = leaves[n]
            if p["kind"] == "checkpoint" and p["step"] == 2:
                p["parent_root"] = root

    resign(bundle, demo_run / "keys/signing-key.pem", swap)
    assert failed_checks(bundle) == {"genesis"}


def test_insider_changes_the_seed_in_genesis_only_fails_genesis(demo_run: Path, bundle: Path) -> None:
    def reseed(statements: list[dict]) -> None:
        for st in statements:
            if st["predicate"]["kind"] == "genesis":
                st["predicate"]["recipe"]["seed"] = 999

    resign(bundle, demo_run / "keys/signing-key.pem", reseed)
    assert failed_checks(bundle) == {"genesis"}


def test_missing_checkpoint_file_fails_subject_digest(bundle: Path) -> None:
    (bundle / "checkpoints/step-000004/model-00001-of-00002.safetensors").unlink()
    assert "subject-digest" in failed_checks(bundle)


def test_symlinked_subject_is_refused(bundle: Path, tmp_path: Path) -> None:
    f = bundle / "checkpoints/step-000002/model-00000-of-00002.safetensors"
    outside = tmp_path / "outside.safetensors"
    shutil.move(f, outside)
    f.symlink_to(outside)
    assert "subject-digest" in failed_checks(bundle)


def test_unreadable_bundle_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b/chain.jsonl").write_text("{not json\n")
    p = kai_attest("verify", str(tmp_path / "b"))
    assert p.returncode == 2
    assert "chain.jsonl:1" in p.stderr and len(p.stderr.strip().splitlines()) == 1
