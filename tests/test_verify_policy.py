"""The verifier's policy, trust, chain-order, trajectory, release, data and archive checks, on small
synthetic bundles (tests/bundlefactory.py): real signatures and safetensors, no torch, fast."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from bundlefactory import DERIVER, ckpt_name, init_weights, make_bundle, statements, write_chain, write_safetensors
from test_signing_backends import local_tsa  # noqa: F401 - the real RFC 3161 TSA fixture

import attest.verify as verify
from attest.verify.checks import chain as checks_chain
from attest.archive import ArchiveError, extract_to
from attest.cli import main
from attest.verify.policy import DEFAULT_REQUIRED, PolicyError, load_policy, parse_policy
from attest.verify.trajectory import adam_ratio_bound, by_component, robust_outliers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def test_deriver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(verify.DERIVERS, DERIVER, "bundlefactory")


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, Path]:
    return make_bundle(tmp_path / "bundle")


def failed(report: verify.Report) -> set[str]:
    return {f.check for f in report.failed}


def policy_file(tmp_path: Path, **fields: object) -> Path:
    p = tmp_path / "policy.json"
    p.write_text(json.dumps(fields))
    return p


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["verify", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------ honest bundle, trust, policy


def test_honest_bundle_without_trust_is_integrity_only_with_exit_3_not_a_pass(bundle, capsys) -> None:
    root, _ = bundle
    rc, out, _ = cli(capsys, str(root))
    assert rc == 3, out
    assert out.splitlines()[-1].startswith("verdict: INTEGRITY ONLY, not a pass")
    assert json.loads(verify.verify_bundle(root).to_json())["verdict"] == "integrity-only"
    for check in ("trajectory", "release", "data-lineage", "data-licence", "genesis"):
        assert any(line.startswith("ok") and check in line for line in out.splitlines()), out
    assert "SKIP  replay" in out and "replay not run" in out


def test_trusted_key_makes_the_verdict_an_identity_verdict(bundle, capsys) -> None:
    root, priv = bundle
    rc, out, _ = cli(capsys, str(root), "--trust", str(priv.parent / "signing-key.pub.pem"))
    # identity established; the synthetic run has no replay implementation, so nothing was recomputed: INCOMPLETE
    assert rc == 4 and "integrity only" not in out.splitlines()[-1].lower()
    assert out.splitlines()[-1].startswith("verdict: INCOMPLETE, not a pass") and "not recomputed" in out.splitlines()[-1]
    assert json.loads(verify.verify_bundle(root, [str(priv.parent / "signing-key.pub.pem")]).to_json())["trust"] == "identity"


def test_policy_key_replaces_the_bundle_key(bundle, tmp_path: Path) -> None:
    """A bundle's own key is never trusted once the policy names keys: another team's key fails."""
    from attest.signing import keygen

    root, _ = bundle
    _, other_pub = keygen(tmp_path / "other")
    pol = load_policy(policy_file(tmp_path, keys=[str(other_pub)]))
    r = verify.verify_bundle(root, policy=pol)
    assert "signature" in failed(r) and r.trust == "identity"


def test_policy_can_pin_the_bundle_key_by_keyid(bundle, tmp_path: Path) -> None:
    from attest.signing import PublicKeyVerifier

    root, priv = bundle
    keyid = PublicKeyVerifier.from_file(priv.parent / "signing-key.pub.pem").keyid
    r = verify.verify_bundle(root, policy=load_policy(policy_file(tmp_path, keys=[f"sha256:{keyid}"])))
    assert r.ok and r.trust == "identity"
    r = verify.verify_bundle(root, policy=load_policy(policy_file(tmp_path, keys=["ab" * 32])))
    assert not r.ok


def test_example_policy_parses_and_unknown_fields_are_refused(tmp_path: Path) -> None:
    pol = load_policy(REPO / "docs/policy.example.json")
    assert pol.allowed_licenses and pol.synthetic_requires_generator and pol.oms["hash_type"] == "sha256"
    assert set(DEFAULT_REQUIRED) <= set(pol.required)
    assert (pol.replay_segments, pol.max_drift, pol.limits["replay_timeout_s"]) == (2, 1e-3, 14400)
    with pytest.raises(PolicyError, match="unknown field"):
        parse_policy({"allowed_licences": ["MIT"]})  # British spelling: a typo must not weaken a policy
    with pytest.raises(PolicyError, match="limits.max_file_bytes"):
        parse_policy({"limits": {"max_file_bytes": -1}})
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(PolicyError, match="broken.json: not valid JSON"):
        load_policy(tmp_path / "broken.json")


def test_bad_policy_file_exits_2_with_one_line(bundle, tmp_path: Path, capsys) -> None:
    root, _ = bundle
    rc, _, err = cli(capsys, str(root), "--policy", str(policy_file(tmp_path, surprise=1)))
    assert rc == 2 and "unknown field" in err and len(err.strip().splitlines()) == 1


def test_required_check_that_is_skipped_fails(bundle, tmp_path: Path) -> None:
    root, _ = bundle
    r = verify.verify_bundle(root, replay=0, policy=load_policy(policy_file(tmp_path, required_checks=["replay"])))
    lines = {f.check: f for f in r.failed}
    assert set(lines) == {"replay"}
    assert "required by policy" in lines["replay"].expected and "replay not run" in lines["replay"].found


def test_a_policy_requiring_an_unknown_check_fails_when_loaded(tmp_path: Path) -> None:
    path = policy_file(tmp_path, required_checks=["replay", "genisis"])
    with pytest.raises(PolicyError, match=r"policy.json: required_checks names 'genisis', not a check of this verifier"):
        load_policy(path)


def test_check_names_are_declared_once_and_every_list_of_checks_uses_them() -> None:
    from attest.verify.checknames import CHECK_NAMES
    from attest.verify.policy import DEFAULT_REQUIRED

    assert len(set(CHECK_NAMES)) == len(CHECK_NAMES)
    assert set(DEFAULT_REQUIRED) | set(verify.BULK.values()) | set(verify.GATE) <= set(CHECK_NAMES)
    with pytest.raises(ValueError, match="undeclared check 'genisis'"):
        verify.Finding("genisis", True)


def test_oms_hash_settings_are_pinned_by_policy(tmp_path: Path) -> None:
    pytest.importorskip("model_signing")
    from attest.oms import sign_checkpoint_dir
    from attest.statements import subject

    root, priv = make_bundle(tmp_path / "b", steps=(2,))

    def add_sig(sts: list[dict]) -> None:
        for st in sts:
            if st["predicate"]["kind"] == "checkpoint":
                sig = sign_checkpoint_dir(root / "checkpoints/step-000002", priv)
                from attest.digest import sha256_file

                st["subject"].append(subject("checkpoints/step-000002/model.sig", sha256_file(sig)))
            if st["predicate"]["kind"] == "release":  # signed checkpoint folders: the export folder is signed too
                sig = sign_checkpoint_dir(root / "export", priv)
                st["subject"].append(subject("export/model.sig", sha256_file(sig)))

    sts = statements(root)
    add_sig(sts)
    write_chain(root, priv, sts)
    assert verify.verify_bundle(root).ok
    r = verify.verify_bundle(root, policy=load_policy(policy_file(tmp_path, oms={"hash_type": "sha512"})))
    assert failed(r) == {"oms-signature"}


# ------------------------------------------------------------------ chain order


def test_shard_declared_after_the_checkpoint_that_consumes_it_fails_order(tmp_path: Path) -> None:
    def late_shard(sts: list[dict]) -> None:
        shard = sts.pop(1)  # the second shard moves after the first checkpoint
        first_ckpt = next(i for i, s in enumerate(sts) if s["predicate"]["kind"] == "checkpoint")
        sts.insert(first_ckpt + 1, shard)

    root, _ = make_bundle(tmp_path / "b", mutate=late_shard)
    r = verify.verify_bundle(root)
    assert "statement-order" in failed(r)
    assert any("uses shards declared before it" in f.expected for f in r.failed)


def test_gap_in_sampler_positions_fails_order(tmp_path: Path) -> None:
    def gap(sts: list[dict]) -> None:
        ck = [s for s in sts if s["predicate"]["kind"] == "checkpoint"][2]
        ck["predicate"]["data_consumed"]["sampler"]["position_start"] += 4

    root, _ = make_bundle(tmp_path / "b", mutate=gap)
    assert failed(verify.verify_bundle(root)) == {"statement-order"}


def test_timestamps_going_backwards_fail(bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rfc3161_client")

    root, _ = bundle
    lines = (root / "chain.jsonl").read_bytes().splitlines()
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    times = {}
    out = []
    for i, raw in enumerate(lines):
        b = json.loads(raw)
        b["verificationMaterial"]["timestampVerificationData"] = {"rfc3161Timestamps": [{"signedTimestamp": f"dG9r{i:04d}"}]}
        sig = base64.b64decode(b["dsseEnvelope"]["signatures"][0]["sig"])
        times[f"dG9r{i:04d}"] = (t0 + timedelta(minutes=i if i != 7 else -5), hashlib.sha256(sig).digest())
        out.append(json.dumps(b, sort_keys=True, separators=(",", ":")).encode())
    (root / "chain.jsonl").write_bytes(b"".join(x + b"\n" for x in out))  # only the timestamps check runs below
    monkeypatch.setattr(checks_chain, "token_time", lambda raw: times[raw])
    r = verify.verify_bundle(root, checks=[verify.check_timestamps])
    assert [f.check for f in r.failed] == ["timestamps"] and "at or after" in r.failed[0].expected
    times["dG9r0007"] = (t0 + timedelta(minutes=7), times["dG9r0007"][1])
    r = verify.verify_bundle(root, checks=[verify.check_timestamps])
    # times in order; the tokens' signatures are checked only against pinned TSA roots (test_timestamps.py)
    assert r.ok and r.findings[0].skipped and r.findings[0].detail.startswith("no TSA roots pinned")


def test_real_rfc3161_tokens_are_read_and_a_moved_token_fails(local_tsa, tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("rfc3161_client")
    from attest.chain import ChainWriter
    from attest.verify.policy import Policy
    from attest.signers import make_signer
    from attest.signing import keygen
    from attest.statements import subject

    priv, pub = keygen(tmp_path / "keys")
    signer = make_signer({"backend": "pem", "key": str(priv), "tsa_url": local_tsa[0], "tsa_timeout_s": 5})
    w = ChainWriter(tmp_path / "b/chain.jsonl", signer, "t")
    for i in range(3):
        w.append("release", [subject(f"w{i}", "00" * 32)], {"step": i, "weights_root": "ab" * 32})
    policy = Policy(tsa_roots=[local_tsa[1]])  # the OpenSSL TSA's CA, pinned
    r = verify.verify_bundle(tmp_path / "b", [str(pub)], policy, checks=[verify.check_timestamps])
    assert r.ok and not r.findings[0].skipped and len(r.facts["timestamps"]) == 3
    lines = [json.loads(x) for x in (tmp_path / "b/chain.jsonl").read_text().splitlines()]
    lines[0]["verificationMaterial"]["timestampVerificationData"] = lines[2]["verificationMaterial"]["timestampVerificationData"]
    (tmp_path / "b/chain.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = verify.verify_bundle(tmp_path / "b", [str(pub)], policy, checks=[verify.check_timestamps])
    # line 1 now carries line 3's token: not over its signature (and, if a second passed, later than line 2's)
    assert (r.failed[0].file, "signature" in r.failed[0].expected) == ("chain.jsonl:1", True)
    assert all("at or after" in f.expected for f in r.failed[1:])


def test_no_timestamps_is_a_skip_not_a_failure(bundle) -> None:
    r = verify.verify_bundle(bundle[0], checks=[verify.check_timestamps])
    assert r.ok and r.findings[0].skipped


# ------------------------------------------------------------------ trajectory


def test_adam_bound_matches_known_values() -> None:
    assert adam_ratio_bound(0.9, 0.95) == pytest.approx(1.165, abs=1e-3)
    assert adam_ratio_bound(0.9, 0.999) == pytest.approx(7.27, abs=1e-2)
    assert adam_ratio_bound(0.9, 0.95, max_steps=1) == pytest.approx(1.0)


def test_weight_swap_in_the_middle_is_a_jump(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", swap_at=6)
    r = verify.verify_bundle(root)
    assert failed(r) == {"trajectory"}
    jumps = [f for f in r.failed if "moved more than any step could" in f.detail]
    assert [f.file for f in jumps] == [ckpt_name(6), ckpt_name(8)]  # into the swap and out of it
    assert [row["segment"] for row in r.facts["trajectory"] if "jump" in row["flags"]] == ["step 4→6", "step 6→8"]


def test_segment_within_the_bound_but_far_above_the_profile_is_an_outlier(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", bump_at=8)
    r = verify.verify_bundle(root)
    assert failed(r) == {"trajectory"}
    (f,) = r.failed
    assert f.file == "step 6→8" and "outlier" in f.detail


def test_profile_test_needs_enough_segments() -> None:
    assert robust_outliers([1.0, 1.1, 50.0]) == []
    assert [i for i, _ in robust_outliers([1.0, 1.1, 0.9, 1.05, 0.95, 50.0])] == [5]
    assert robust_outliers([1.0, 1.2, 0.8, 1.1, 0.9, 2.0]) == []  # a factor 2 is not a jump


def test_components_are_grouped_by_prefix() -> None:
    assert by_component(["vision.a", "vision.b", "text.c", "bias"]) == "vision.* 2 tensors, bias 1 tensor, text.* 1 tensor"


# ------------------------------------------------------------------ release


def test_release_naming_another_step_fails_release(tmp_path: Path) -> None:
    def older(sts: list[dict]) -> None:
        ck = [s for s in sts if s["predicate"]["kind"] == "checkpoint"][-2]
        rel = sts[-1]
        rel["predicate"].update(step=ck["predicate"]["step"], weights_root=ck["predicate"]["weights_root"])
        rel["subject"] = ck["subject"]

    root, _ = make_bundle(tmp_path / "b", mutate=older)
    assert "release" in failed(verify.verify_bundle(root))


def test_export_that_is_not_the_last_checkpoint_fails_release(bundle) -> None:
    root, _ = bundle
    write_safetensors(root / "export/model.safetensors", init_weights(3))
    r = verify.verify_bundle(root)
    # the export is a subject of the release: its digests fail too, and release names the file
    assert failed(r) == {"release", "subject-digest", "weights-digest"}
    assert [f.file for f in r.failed if f.check == "release"] == ["export/model.safetensors"]
    shutil.copy(root / ckpt_name(12), root / "export/model.safetensors")
    assert verify.verify_bundle(root).ok


# ------------------------------------------------------------------ data


def test_licence_outside_the_policy_fails_data_licence(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", licence="LicenseRef-scraped")
    assert verify.verify_bundle(root).ok  # no policy: listed, not judged
    pol = load_policy(policy_file(tmp_path, allowed_licenses=["CC0-1.0", "CC-BY-4.0"]))
    r = verify.verify_bundle(root, policy=pol)
    assert failed(r) == {"data-licence"} and {f.found for f in r.failed} == {"LicenseRef-scraped"}


def test_collection_method_outside_the_policy_fails_data_licence(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", collection="web-crawl")
    pol = load_policy(policy_file(tmp_path, allowed_collection_methods=["synthetic", "licensed"]))
    assert failed(verify.verify_bundle(root, policy=pol)) == {"data-licence"}


def test_synthetic_data_without_generator_fails_when_the_policy_requires_one(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b", generator="")
    assert verify.verify_bundle(root).ok
    pol = load_policy(policy_file(tmp_path, synthetic_requires_generator=True))
    r = verify.verify_bundle(root, policy=pol)
    assert failed(r) == {"data-licence"} and "generator" in r.failed[0].expected


def test_undeclared_consumed_shard_fails_data_lineage(tmp_path: Path) -> None:
    def smuggle(sts: list[dict]) -> None:
        sts[-2]["predicate"]["data_consumed"]["shards"].append("data/shards/undeclared-00000.parquet")

    root, _ = make_bundle(tmp_path / "b", mutate=smuggle)
    r = verify.verify_bundle(root)
    assert failed(r) == {"data-lineage"} and "undeclared" in r.failed[0].found


def test_derived_from_that_does_not_close_fails_data_lineage(tmp_path: Path) -> None:
    def orphan(sts: list[dict]) -> None:
        sts[1]["predicate"]["manifest"]["derived_from"] = [{"path": "raw/foreign.jsonl", "sha256": "cd" * 32}]

    root, _ = make_bundle(tmp_path / "b", mutate=orphan)
    r = verify.verify_bundle(root)
    # the manifest file on disk still says what the builder wrote: both mismatches are named
    assert failed(r) == {"data-lineage"}
    assert any("derived_from[0]" in f.expected for f in r.failed)


# ------------------------------------------------------------------ size limits, paths, archives


def test_subject_path_leaving_the_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("x")

    def escape(sts: list[dict]) -> None:
        sts[2]["subject"] = [{"name": "../secret", "digest": {"sha256": "00" * 32}}]

    root, _ = make_bundle(tmp_path / "b", mutate=escape)
    r = verify.verify_bundle(root)
    assert any(f.check == "subject-digest" and "leaves the bundle" in f.found for f in r.failed)


def test_oversized_inputs_are_refused(bundle, tmp_path: Path, capsys) -> None:
    root, _ = bundle
    pol = load_policy(policy_file(tmp_path, limits={"max_file_bytes": 1024}))
    r = verify.verify_bundle(root, policy=pol)
    assert any(f.check == "subject-digest" and "exceeds" in f.found for f in r.failed)
    rc, _, err = cli(capsys, str(root), "--policy", str(policy_file(tmp_path, limits={"max_bundle_bytes": 1000})))
    assert rc == 2 and "max_bundle_bytes" in err


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_bundle_archives_verify_like_the_folder(bundle, tmp_path: Path, capsys) -> None:
    root, _ = bundle
    for mode, name in (("w", "b.tar"), ("w:gz", "b.tar.gz")):
        with tarfile.open(tmp_path / name, mode) as tar:
            tar.add(root, arcname="bundle")
        rc, out, _ = cli(capsys, str(tmp_path / name), "--trust", str(root / "keys/signing-key.pub.pem"))
        assert rc == 4 and "FAIL" not in out, out  # every check holds; the synthetic run is not replayable: INCOMPLETE
        assert out.rstrip().endswith(str(tmp_path / name))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "device", "duplicate"])
def test_hostile_archive_members_are_refused(kind: str, tmp_path: Path, capsys) -> None:
    info = tarfile.TarInfo({"absolute": "/etc/x", "dotdot": "b/../../x"}.get(kind, "b/chain.jsonl"))
    info.size = 1
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [(info, b"x")]
    if kind == "symlink":
        info.type, info.linkname, info.size = tarfile.SYMTYPE, "/etc/passwd", 0
    elif kind == "hardlink":
        info.type, info.linkname, info.size = tarfile.LNKTYPE, "/etc/passwd", 0
    elif kind == "device":
        info.type, info.size = tarfile.CHRTYPE, 0
    elif kind == "duplicate":
        members.append((info, b"y"))
    arch = _tar(tmp_path / "evil.tar", [(i, d if i.size else None) for i, d in members])
    with pytest.raises(ArchiveError):
        extract_to(arch, (tmp_path / "out").mkdir() or tmp_path / "out")
    assert not Path("/etc/x").exists() and not (tmp_path / "x").exists()
    rc, _, err = cli(capsys, str(arch))
    assert rc == 2 and err.startswith("kai-attest: error:")


def test_archive_limits_on_members_and_bytes(tmp_path: Path) -> None:
    members = []
    for i in range(5):
        info = tarfile.TarInfo(f"b/f{i}")
        info.size = 100
        members.append((info, b"z" * 100))
    arch = _tar(tmp_path / "many.tar.gz", members, "w:gz")
    with pytest.raises(ArchiveError, match="more than 3 members"):
        extract_to(arch, (tmp_path / "o1").mkdir() or tmp_path / "o1", max_members=3)
    with pytest.raises(ArchiveError, match="more than 250 bytes"):
        extract_to(arch, (tmp_path / "o2").mkdir() or tmp_path / "o2", max_bytes=250)


# ------------------------------------------------------------------ replay hook


def test_replay_that_cannot_run_here_is_incomplete_never_a_pass_nor_a_fail(bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    root, priv = bundle
    trust = [str(priv.parent / "signing-key.pub.pem")]
    assert verify.DEFAULT_REPLAY_PLUGIN in verify.REPLAYERS  # kai_train.replay registers on import
    r = verify.verify_bundle(root, trust)  # the default draw; a synthetic run's deriver has no replay implementation
    assert [f.skipped for f in r.findings if f.check == "replay"] == [True]
    assert r.ok and r.verdict == "incomplete" and r.exit_code == 4 and "cannot replay" in r.not_recomputed[0]
    monkeypatch.delitem(verify.REPLAYERS, verify.DEFAULT_REPLAY_PLUGIN)
    r = verify.verify_bundle(root, trust, replay="all")
    (f,) = [f for f in r.findings if f.check == "replay"]
    assert f.skipped and verify.DEFAULT_REPLAY_PLUGIN in f.detail
    assert r.ok and r.verdict == "incomplete" and r.exit_code == 4
    r = verify.verify_bundle(root, trust, replay=0)  # the explicit opt-out: an integrity check, INCOMPLETE
    assert r.verdict == "incomplete" and "--no-replay" in r.verdict_line()


def test_a_bundle_cannot_choose_the_replay_implementation(bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run statement's `replay_plugin` is only noted: an unknown name neither skips replay nor picks code."""
    seen: list[int] = []

    def ours(ctx: verify.Context, segments: list) -> list[verify.Finding]:
        seen.append(len(segments))
        return [verify.Finding("replay", False, "x", "root a", "root b") for _ in segments]

    monkeypatch.setitem(verify.REPLAYERS, verify.DEFAULT_REPLAY_PLUGIN, ours)
    for named in ("evil.module", "kai_train.replay_nothing"):
        root, _ = make_bundle(tmp_path / named, mutate=lambda sts: [s["predicate"].update(replay_plugin=named)
                                                                     for s in sts if "config" in s["predicate"]])
        r = verify.verify_bundle(root, replay="all")
        assert failed(r) == {"replay"} and seen[-1] == 6
        assert any(named in n for n in r.notes)

    seen: list[list[int]] = []

    def fake(ctx: verify.Context, segments: list) -> list[verify.Finding]:
        seen.append([e.predicate["step"] for e in segments])
        return [verify.Finding("replay", e.predicate["step"] != 8, f"step {e.predicate['step']}", "root x", "root y")
                for e in segments]

    monkeypatch.setitem(verify.REPLAYERS, verify.DEFAULT_REPLAY_PLUGIN, fake)
    assert failed(verify.verify_bundle(root, replay="all")) == {"replay"}
    a = verify.verify_bundle(root, replay=2, replay_seed=5)
    b = verify.verify_bundle(root, replay=2, replay_seed=5)
    assert seen[-1] == seen[-2] and len(seen[-1]) in (2, 3) and seen[-1][-1] == 12  # 2 drawn, and the last always
    assert a.facts["replay_requested"]["seed"] == 5 == b.facts["replay_requested"]["seed"]


def test_replay_argument_accepts_a_count_or_all(bundle, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = bundle
    # the synthetic bundle has no real training to replay: a replayer that reproduces every segment
    monkeypatch.setitem(verify.REPLAYERS, verify.DEFAULT_REPLAY_PLUGIN,
                        lambda ctx, segs: [verify.Finding("replay", True, f"step {e.predicate['step']}") for e in segs])
    key = str(root / "keys/signing-key.pub.pem")
    rc, out, _ = cli(capsys, str(root), "--trust", key, "--replay", "all", "--replay-seed", "3")
    assert rc == 0, out
    assert "replay coverage: 6 of 6 segments" in out
    rc, out, _ = cli(capsys, str(root), "--trust", key, "--replay", "2", "--replay-seed", "1")
    assert rc == 0 and re.search("replay coverage: [23] of 6 segments", out) and re.search(r"0\.[68] \(m=1\)", out), out
    assert "PASS (" in out.splitlines()[-1] and "of 6 segments replayed, last included" in out.splitlines()[-1]
    rc, out, _ = cli(capsys, str(root), "--trust", key, "--no-replay")
    assert rc == 4 and "INCOMPLETE" in out.splitlines()[-1] and "--no-replay" in out.splitlines()[-1], out
    with pytest.raises(SystemExit) as e:
        main(["verify", str(root), "--replay", "most"])
    assert e.value.code == 2
