"""Light bundles, evaluator challenges and segment packs on synthetic bundles (no torch, no training).

The replay of challenged segments is covered on a real run in test_audit.py; here every other
part of the protocol: what a light bundle leaves out, the draw, the team's packs, and the verifier
refusing packs that do not answer the evaluator's own challenge with signed bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from attest import verify
from attest.bundle import make_bundle as assemble
from attest.challenge import ChallengeError, draw, load_challenge, respond, segment_files
from attest.chain import read_chain
from attest.cli import main
from attest.verify import BundleUnreadable, verify_bundle
from bundlefactory import DERIVER, make_bundle

NO_REPLAY = [c for c in verify.CHECKS if c is not verify.check_replay]


@pytest.fixture(autouse=True)
def _deriver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(verify.DERIVERS, DERIVER, "bundlefactory")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A full synthetic bundle standing in for the team's run directory."""
    root, _ = make_bundle(tmp_path / "run")
    return root


@pytest.fixture
def light(run: Path, tmp_path: Path) -> Path:
    return assemble(run, tmp_path / "light", light=True)


def pub(b: Path) -> str:
    return str(next((b / "keys").glob("*.pub.pem")))


def sizes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_a_light_bundle_leaves_heavy_state_with_the_team_and_is_incomplete_not_a_pass(run: Path, light: Path,
                                                                                     capsys) -> None:
    assert not list(light.glob("checkpoints/**/*.safetensors")) and (light / "export").is_dir()
    assert sizes(light) < sizes(run) / 2
    assert main(["verify", str(light), "--trust", pub(light), "--light"]) == 4
    out = capsys.readouterr().out
    assert "verdict: INCOMPLETE, not a pass" in out.splitlines()[-1] and "FAIL" not in out
    # read as a full bundle, the missing state fails
    assert main(["verify", str(light), "--trust", pub(light)]) == 1


def test_the_light_bundle_size_does_not_grow_with_the_number_of_checkpoints(tmp_path: Path) -> None:
    few, _ = make_bundle(tmp_path / "few", steps=(2, 4))
    many, _ = make_bundle(tmp_path / "many", steps=tuple(range(2, 26, 2)))
    a, b = assemble(few, tmp_path / "a", light=True), assemble(many, tmp_path / "b", light=True)
    grown = sizes(b) - sizes(a)
    assert sizes(many) - sizes(few) > 10 * grown  # what grows is a few hundred bytes of chain per checkpoint
    assert grown < 12 * 2048


def test_the_draw_is_bound_to_the_chain_and_reproducible_only_with_its_seed(light: Path, tmp_path: Path) -> None:
    c1, c2 = draw(light, 3, seed=11), draw(light, 3, seed=11)
    assert c1["segments"] == c2["segments"] and c1["segments_total"] == 6 and len(c1["segments"]) == 4
    assert all(c["segments"][-1]["segment"] == 5 for c in (c1, draw(light, 1), draw(light, 1, seed=3)))  # the last, always
    fresh = {tuple(s["segment"] for s in draw(light, 3)["segments"]) for _ in range(12)}
    assert len(fresh) > 1  # without a seed the evaluator's randomness decides
    entries, _ = read_chain(light / "chain.jsonl")
    first = c1["segments"][0]
    assert first["files"] == segment_files(entries, first["segment"])
    assert any("optimizer" in f or "model" in f or f.endswith(".safetensors") for f in first["files"])
    assert [s["segment"] for s in draw(light, 7)["segments"]] == list(range(6))  # more than there are: every one
    with pytest.raises(ChallengeError, match="must be at least 1"):
        draw(light, 0)


def answered(run: Path, light: Path, tmp_path: Path, k: int = 2) -> tuple[Path, Path]:
    ch = tmp_path / "challenge.json"
    ch.write_text(json.dumps(draw(light, k, seed=5)))
    packs = tmp_path / "packs"
    respond(run, ch, packs)
    return ch, packs


def check(light: Path, ch: Path, packs: Path):
    return verify_bundle(light, [pub(light)], packs=packs, challenge=load_challenge(ch), checks=NO_REPLAY)


def test_packs_answering_the_challenge_complete_the_light_bundle(run: Path, light: Path, tmp_path: Path) -> None:
    ch, packs = answered(run, light, tmp_path)
    for p in packs.iterdir():
        manifest = json.loads((p / "pack.json").read_text())
        assert {f["name"] for f in manifest["files"]} == set(segment_files(read_chain(run / "chain.jsonl")[0],
                                                                          manifest["segment"]))
    rep = check(light, ch, packs)
    # every check of the bundle and packs holds; this synthetic run is not replayed (test_audit.py replays a
    # real one), and without a recomputed segment the verdict is INCOMPLETE, never PASS
    assert rep.ok and rep.verdict == "incomplete", [f.line() for f in rep.failed]
    assert rep.not_recomputed and "no segment was replayed" in rep.not_recomputed[0]
    assert rep.facts["challenge"]["segments"] == [s["segment"] for s in load_challenge(ch)["segments"]]
    traj = [f for f in rep.findings if f.check == "trajectory" and f.ok]
    measured = int(traj[0].detail.split()[0])  # the challenged segments (and any two packs adjoin) were measured
    assert traj and 2 <= measured <= 6, traj[0].detail


def test_a_pack_file_that_is_not_the_signed_one_fails_subject_digest(run: Path, light: Path, tmp_path: Path) -> None:
    ch, packs = answered(run, light, tmp_path)
    for shard in sorted(packs.glob("segment-*/checkpoints/**/*.safetensors")):
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.unlink()  # packs may hard-link the run's files: write a new one
        shard.write_bytes(bytes(data))
        rep = check(light, ch, packs)
        # the first pack holding a name is what the verifier reads (subject-digest); a second copy is
        # checked when the packs are opened (challenge): no pack byte goes unchecked
        assert rep.verdict == "fail" and any(f.file.endswith(shard.name) and f.check == "subject-digest"
                                             or f.check == "challenge" and shard.name in f.found
                                             for f in rep.failed), (shard, [x.line() for x in rep.failed])
        shard.unlink()
        data[-1] ^= 1
        shard.write_bytes(bytes(data))


def test_a_pack_that_brings_anything_else_or_lacks_a_file_fails_the_challenge(run: Path, light: Path,
                                                                              tmp_path: Path) -> None:
    ch, packs = answered(run, light, tmp_path)
    seg = sorted(packs.iterdir())[0]
    (seg / "export").mkdir()
    (seg / "export/model.safetensors").write_bytes(b"x")  # a pack never replaces what the bundle holds
    victim = next(seg.glob("checkpoints/**/*.safetensors"))
    victim.unlink()
    rep = check(light, ch, packs)
    lines = [f.found for f in rep.failed if f.check == "challenge"]
    assert any("export/model.safetensors: not a signed file of segment" in x for x in lines), lines
    assert any("missing" in x for x in lines)


def test_packs_for_another_chain_or_without_the_evaluators_challenge_are_refused(run: Path, light: Path,
                                                                                   tmp_path: Path, capsys) -> None:
    ch, packs = answered(run, light, tmp_path)
    other, _ = make_bundle(tmp_path / "other", seed=8)
    other_light = assemble(other, tmp_path / "other-light", light=True)
    rep = check(other_light, ch, packs)
    assert any("another chain" in f.found for f in rep.failed if f.check == "challenge")
    with pytest.raises(ChallengeError, match="another chain"):
        respond(other, ch, tmp_path / "p2")
    with pytest.raises(BundleUnreadable, match="--challenge"):
        verify_bundle(light, [pub(light)], packs=packs)
    assert main(["verify", str(light), "--trust", pub(light), "--packs", str(packs)]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "kai-challenge/v1", "segments": [], "segments": []}')
    assert main(["verify", str(light), "--trust", pub(light), "--packs", str(packs), "--challenge", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_challenge_and_respond_on_the_command_line(run: Path, light: Path, tmp_path: Path, capsys) -> None:
    ch = tmp_path / "c.json"
    assert main(["challenge", str(light), "--segments", "2", "--seed", "1", "--out", str(ch)]) == 0
    assert main(["respond", str(run), str(ch), "--out", str(tmp_path / "packs")]) == 0
    assert len(list((tmp_path / "packs").glob("segment-*/pack.json"))) == 3  # 2 drawn, and the last always
    shutil.rmtree(tmp_path / "packs")
    assert main(["challenge", str(light), "--segments", "99", "--seed", "1", "--out", str(ch)]) == 0  # every one
    assert len(load_challenge(ch)["segments"]) == 6
    assert main(["challenge", str(light), "--segments", "0", "--out", str(ch)]) == 2
    assert "--segments 0" in capsys.readouterr().err
