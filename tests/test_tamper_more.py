"""More tampered bundles (with tests/test_tamper.py: the tamper suite). Most are insider attacks:
the real key, every statement re-signed, every digest and link made consistent; each must still
fail with the right check named. The verifier runs in-process (main()), so torch loads once."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from attest.chain import read_chain
from attest.cli import main
from attest.digest import merkle_root, sha256_file
from attest.oms import sign_checkpoint_dir
from attest.runconfig import render_yaml
from conftest import resign

pytestmark = pytest.mark.slow

ALLOWED = {"allowed_licenses": ["CC0-1.0", "CC-BY-4.0"], "allowed_collection_methods": ["synthetic", "licensed"],
           "synthetic_requires_generator": True}


def verify(capsys: pytest.CaptureFixture[str], b: Path, *extra: str) -> tuple[int, str]:
    rc = main(["verify", str(b), "--trust", str(b / "keys/signing-key.pub.pem"), *extra])
    return rc, capsys.readouterr().out


def failed_checks(capsys: pytest.CaptureFixture[str], b: Path, *extra: str) -> tuple[set[str], str]:
    rc, out = verify(capsys, b, *extra)
    assert rc == 1, f"expected exit 1, got {rc}\n{out}"
    return {line.split()[1] for line in out.splitlines() if line.startswith("FAIL")}, out


def of_kind(statements: list[dict], kind: str) -> list[dict]:
    return [s for s in statements if s["predicate"]["kind"] == kind]


def set_subject(st: dict, name: str, b: Path) -> None:
    for s in st["subject"]:
        if s["name"] == name:
            s["digest"]["sha256"] = sha256_file(b / name)


def weight_files(b: Path, step: int) -> list[Path]:
    """The weights of checkpoint `step`: one file (genesis) or one shard per rank."""
    return sorted((b / f"checkpoints/step-{step:06d}").glob("model*.safetensors"))


def replace_weights(b: Path, key: Path, step: int, sd: dict) -> str:
    """Write `sd` as the weights of checkpoint `step` in its existing files (each keeps its tensors),
    re-sign its OMS signature; returns the new root."""
    from safetensors import safe_open

    from kai_train.weights import save_weights, state_dict_leaves

    for f in weight_files(b, step):
        with safe_open(str(f), "pt") as h:
            names = list(h.keys())
        save_weights({n: sd[n] for n in names}, f)
    sign_checkpoint_dir(b / f"checkpoints/step-{step:06d}", key)
    return merkle_root(state_dict_leaves(sd))


def resubject(st: dict, b: Path) -> None:
    """Every subject's digest from its file as it is now."""
    for s in st["subject"]:
        s["digest"]["sha256"] = sha256_file(b / s["name"])


def load(b: Path, step: int) -> dict:
    from kai_train.checkpoint import SignedTensors

    return dict(SignedTensors(weight_files(b, step)))


def test_insider_borrows_a_trained_vision_encoder_for_genesis_and_genesis_names_its_tensors(bundle, key, capsys) -> None:
    """The Naver case: one component of W0 comes from a trained model; the rest is the honest init."""
    from kai_train.weights import state_dict_leaves

    w0, borrowed = load(bundle, 0), load(bundle, 4)
    vision = sorted(n for n in w0 if n.startswith("vision."))
    sd = {**w0, **{n: borrowed[n] for n in vision}}
    root = replace_weights(bundle, key, 0, sd)
    leaves = state_dict_leaves(sd)

    def borrow(sts: list[dict]) -> None:
        (g,) = of_kind(sts, "genesis")
        resubject(g, bundle)
        g["predicate"]["weights_root"] = root
        for n, t in g["predicate"]["tensors"].items():
            t["digest"] = leaves[n]
        of_kind(sts, "checkpoint")[0]["predicate"]["parent_root"] = root

    resign(bundle, key, borrow)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"genesis"}, out
    line = next(x for x in out.splitlines() if x.startswith("FAIL  genesis"))
    assert f"{len(vision)} of {len(w0)} tensors differ: vision.* {len(vision)} tensors" in line, line
    assert "text." not in line and "speech." not in line


def test_insider_swaps_weights_at_a_middle_checkpoint_and_trajectory_flags_the_jump(bundle, key, capsys) -> None:
    from kai_train.init import build_genesis_model
    from kai_train.model import ModelConfig

    entries, _ = read_chain(bundle / "chain.jsonl")
    cfg = next(e for e in entries if e.kind == "genesis").predicate["recipe"]["model"]
    foreign, _ = build_genesis_model(ModelConfig.from_dict(cfg), seed=4321)
    root = replace_weights(bundle, key, 2, {n: p.detach() for n, p in foreign.named_parameters()})

    def swap(sts: list[dict]) -> None:
        first, second = of_kind(sts, "checkpoint")
        resubject(first, bundle)
        first["predicate"]["weights_root"] = root
        second["predicate"]["parent_root"] = root

    resign(bundle, key, swap)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"trajectory"}, out
    flagged = [x for x in out.splitlines() if x.startswith("FAIL  trajectory")]
    assert len(flagged) == 2 and all("moved more than any step could" in x for x in flagged), out


def test_shard_file_swapped_after_declaration_fails_subject_digest(bundle, capsys) -> None:
    shutil.copy(bundle / "data/shards/text-00000.parquet", bundle / "data/shards/text-00001.parquet")
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"subject-digest"} and "text-00001.parquet" in out


def test_segment_removed_and_chain_resigned_fails_statement_order(bundle, key, capsys) -> None:
    def drop(sts: list[dict]) -> None:
        first, second = of_kind(sts, "checkpoint")
        second["predicate"]["parent_root"] = first["predicate"]["parent_root"]
        sts.remove(first)

    resign(bundle, key, drop)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"statement-order"}, out
    assert "sampler range starting at 0" in out


@pytest.mark.slow
def test_learning_rate_in_the_run_config_differs_from_the_one_used(bundle, key, capsys) -> None:
    cfg_file = bundle / "config/run.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("  lr: 0.003\n", "  lr: 0.0031\n"))

    def relr(sts: list[dict]) -> None:
        (run,) = of_kind(sts, "run")
        run["predicate"]["config"]["train"]["lr"] = 0.0031
        set_subject(run, "config/run.yaml", bundle)

    resign(bundle, key, relr)
    failed, out = failed_checks(capsys, bundle, "--replay", "all")
    assert "replay" in failed, out


def _edit_manifests(b: Path, key: Path, pick: Callable[[dict], bool], edit: Callable[[dict], None]) -> None:
    """Change the manifests `pick` selects consistently: statements, manifest files and their subject
    digests, every statement re-signed (an insider with the real key)."""
    def mutate(sts: list[dict]) -> None:
        for st in of_kind(sts, "data-shard"):
            m = st["predicate"]["manifest"]
            if not pick(m):
                continue
            edit(m)
            mname = next(x["name"] for x in st["subject"] if x["name"].endswith(".manifest.json"))
            (b / mname).write_text(json.dumps(m, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            set_subject(st, mname, b)

    resign(b, key, mutate)


def _edit_manifest(b: Path, key: Path, source: str, edit: Callable[[dict], None]) -> None:
    """Every shard of `source`, in every stage (a source lied about from the start)."""
    _edit_manifests(b, key, lambda m: m["source"]["name"] == source, edit)


def test_licence_not_allowed_by_the_policy_fails_data_licence(bundle, key, tmp_path, capsys) -> None:
    _edit_manifest(bundle, key, "text", lambda m: m["source"].update(license="LicenseRef-scraped-web"))
    assert verify(capsys, bundle)[0] == 0  # without a policy a licence is listed, not judged
    (tmp_path / "policy.json").write_text(json.dumps(ALLOWED))
    failed, out = failed_checks(capsys, bundle, "--policy", str(tmp_path / "policy.json"))
    assert failed == {"data-licence"} and "LicenseRef-scraped-web" in out


def test_synthetic_source_without_generator_fails_data_licence_under_policy(bundle, key, tmp_path, capsys) -> None:
    _edit_manifest(bundle, key, "images", lambda m: m["source"].update(generator=""))
    (tmp_path / "policy.json").write_text(json.dumps(ALLOWED))
    failed, out = failed_checks(capsys, bundle, "--policy", str(tmp_path / "policy.json"))
    assert failed == {"data-licence"} and "images-00000.parquet" in out and "generator" in out


def test_training_shard_relabelled_with_another_licence_than_its_parents_fails_data_lineage(bundle, key, capsys) -> None:
    # The ingest and dedup shards say what the source really is; the insider relabels only the packed
    # shards that training read, re-signing everything: the lineage walk exposes it.
    _edit_manifests(bundle, key, lambda m: m["stage"] == "pack" and m["source"]["name"] == "text",
                    lambda m: m["source"].update(license="CC0-1.0-relabelled"))
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"data-lineage"} and "CC0-1.0-relabelled" in out and "data/dedup/text-00000.parquet" in out


def test_manifest_file_that_disagrees_with_its_statement_fails_data_lineage(bundle, key, capsys) -> None:
    mname = "data/shards/.manifests/audio-00000.manifest.json"
    m = json.loads((bundle / mname).read_text())
    m["source"]["license"] = "CC-BY-NC-4.0"
    (bundle / mname).write_text(json.dumps(m))

    def redigest(sts: list[dict]) -> None:
        for st in of_kind(sts, "data-shard"):
            set_subject(st, mname, bundle)

    resign(bundle, key, redigest)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"data-lineage"} and mname in out


def test_checkpoint_consuming_an_undeclared_shard_fails_data_lineage(bundle, key, capsys) -> None:
    resign(bundle, key, lambda sts: of_kind(sts, "checkpoint")[-1]["predicate"]["data_consumed"]["shards"].append(
        "data/shards/private-00000.parquet"))
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"data-lineage"} and "private-00000.parquet" in out


def test_tokenizer_trained_on_an_undeclared_shard_fails_data_lineage(bundle, key, capsys) -> None:
    resign(bundle, key, lambda sts: of_kind(sts, "tokenizer")[0]["predicate"]["trained_on"].append(
        {"name": "data/shards/web-00000.parquet", "sha256": "ab" * 32}))
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"data-lineage"} and "web-00000.parquet" in out


def test_release_naming_a_different_step_fails_release(bundle, key, capsys) -> None:
    def older(sts: list[dict]) -> None:
        first = of_kind(sts, "checkpoint")[0]
        (rel,) = of_kind(sts, "release")
        rel["predicate"].update(step=first["predicate"]["step"], weights_root=first["predicate"]["weights_root"])
        rel["subject"] = [s for s in first["subject"] if s["name"].endswith(".safetensors")]

    resign(bundle, key, older)
    failed, out = failed_checks(capsys, bundle)
    assert "release" in failed, out
    assert "step 4 (the last checkpoint)" in out


def test_export_that_is_not_the_last_checkpoint_fails_release(bundle, capsys) -> None:
    for old, new in zip(weight_files(bundle, 2), sorted((bundle / "export").glob("model*.safetensors"))):
        shutil.copy(old, new)
    failed, out = failed_checks(capsys, bundle)
    # the export is a subject of the release and listed by its model-signing signature: all three say so
    assert failed == {"release", "subject-digest", "weights-digest", "oms-signature"}, out
    assert "FAIL  release           export/model-00001-of-00002.safetensors,export/model-00002-of-00002.safetensors: " \
           "expected root" in out


def test_subject_naming_a_path_outside_the_bundle_is_refused(bundle, key, capsys) -> None:
    def traverse(sts: list[dict]) -> None:
        of_kind(sts, "tokenizer")[0]["subject"].append({"name": "../../keys/signing-key.pem", "digest": {"sha256": "00" * 32}})

    resign(bundle, key, traverse)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"subject-digest"} and "leaves the bundle" in out


def test_hidden_prefix_before_genesis_fails_statement_order(bundle, key, capsys) -> None:
    """The first checkpoint claims its data started mid-stream: training happened before the chain."""
    def prefix(sts: list[dict]) -> None:
        for c in of_kind(sts, "checkpoint"):
            c["predicate"]["data_consumed"]["sampler"]["position_start"] += 160
            c["predicate"]["data_consumed"]["sampler"]["position_end"] += 160

    resign(bundle, key, prefix)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"statement-order"}, out


def test_ingest_shard_hiding_raw_items_fails_data_lineage(bundle, key, capsys) -> None:
    # An insider shrinks an ingest shard's raw range, as if items between two shards never existed.
    _edit_manifests(bundle, key, lambda m: m["shard"] == "text-00001.parquet" and m["stage"] == "ingest",
                    lambda m: m["positions"].__setitem__(0, m["positions"][0] + 3))
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"data-lineage"} and "source 'text': raw positions starting at 64" in out


def test_training_shards_packed_with_an_undeclared_tokenizer_fail_data_lineage(bundle, key, capsys) -> None:
    # The packed shards claim a tokenizer other than the one the chain declares (e.g. a foreign one).
    _edit_manifests(bundle, key, lambda m: m["stage"] == "pack" and m["source"]["name"] == "audio",
                    lambda m: m["params"]["tokenizer"].update(sha256="ab" * 32))
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"data-lineage"} and "packed with a tokenizer declared earlier" in out and "abababab" in out


def test_packed_rows_that_do_not_follow_from_the_declared_inputs_fail_data_replay(bundle, key, capsys) -> None:
    # An insider swaps a row of a training shard for other tokens and makes every record agree:
    # manifest, statement, run config. Only recomputing the stage shows the rows are not what
    # packing the declared dedup shards with the declared tokenizer gives.
    import pyarrow.parquet as pq

    from data_pipelines import shards

    name = "data/shards/text-00001.parquet"
    table = pq.read_table(bundle / name)
    tokens = table.column("tokens").to_pylist()
    tokens[3] = [2] + [7] * 30 + [3]
    table = table.set_column(table.schema.get_field_index("tokens"), "tokens", [tokens])
    pq.write_table(table, bundle / name, **shards.PARQUET_OPTIONS)
    sha = sha256_file(bundle / name)

    def swap(sts: list[dict]) -> None:
        for st in sts:
            kind = st["predicate"]["kind"]
            if kind == "data-shard" and any(x["name"] == name for x in st["subject"]):
                m = st["predicate"]["manifest"]
                m["sha256"], m["bytes"] = sha, (bundle / name).stat().st_size
                mname = next(x["name"] for x in st["subject"] if x["name"].endswith(".manifest.json"))
                (bundle / mname).write_text(json.dumps(m, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
                set_subject(st, mname, bundle)
                set_subject(st, name, bundle)
            elif kind == "run":
                for s in st["predicate"]["config"]["data_shards"]:
                    if s["name"] == name:
                        s["sha256"] = sha
                (bundle / "config/run.yaml").write_text(render_yaml(st["predicate"]["config"]))  # what a person reads
                set_subject(st, "config/run.yaml", bundle)

    resign(bundle, key, swap)
    rc, out = verify(capsys, bundle)
    assert rc == 0, out  # every record agrees
    failed, out = failed_checks(capsys, bundle, "--replay-data")
    assert failed == {"data-replay"} and name in out
    assert "data-replay" in out and "byte-identical" not in out


def test_the_honest_bundle_recomputes_every_dedup_and_pack_shard_byte_for_byte(bundle, capsys) -> None:
    rc, out = verify(capsys, bundle, "--replay-data")
    line = next(x for x in out.splitlines() if " data-replay " in x)
    n = len(list((bundle / "data/dedup").glob("*.parquet"))) + len(list((bundle / "data/shards").glob("*.parquet")))
    assert rc == 0 and line.startswith("ok") and f"{n} dedup and pack shards recomputed" in line
    assert f"{n} byte-identical" in line
    rc, out = verify(capsys, bundle)
    assert "SKIP  data-replay" in out  # only when asked


def test_data_replay_refuses_a_source_name_that_would_leave_its_folder(bundle, key, capsys) -> None:
    _edit_manifest(bundle, key, "audio", lambda m: m["source"].update(name="../../escaped"))
    failed, out = failed_checks(capsys, bundle, "--replay-data")
    assert "data-replay" in failed and "plain source names" in out
    assert not (bundle.parent / "escaped").exists() and not list(bundle.parent.parent.glob("escaped*"))
