"""Exact resume (each ZeRO stage, 2 ranks), resume on another world size, export + generate,
schedules, and the guards around resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
pytest.importorskip("deepspeed", reason="the train extra; not on the evaluator's light install")

from attest.chain import read_chain
from attest.digest import safetensors_root
from conftest import TRAIN_ARGS, kai_attest, must, prepared_data, torchrun, verify_trusted
from kai_train.engine import lr_lambda

QUIET = ["wandb.mode=disabled"]


def release_root(run_dir: Path) -> str:
    entries, _ = read_chain(run_dir / "chain.jsonl")
    return next(e.predicate["weights_root"] for e in entries if e.kind == "release")


def checkpoint_losses(run_dir: Path) -> list[float]:
    entries, _ = read_chain(run_dir / "chain.jsonl")
    return [e.predicate["metrics"]["loss"] for e in entries if e.kind == "checkpoint"]


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
def test_resume_is_bit_exact_across_two_ranks(zero: str, demo_run: Path, data_run: Path, tmp_path: Path) -> None:
    straight = demo_run
    if zero != "zero2":  # demo_run is the zero2 straight run
        straight = prepared_data(tmp_path / "straight", data_run)
        must(torchrun(straight, 2, f"deepspeed={zero}", *TRAIN_ARGS, *QUIET))
        losses = checkpoint_losses(straight)
        assert losses[-1] < losses[0], f"{zero}: loss did not fall: {losses}"
    split = prepared_data(tmp_path / "split", data_run)
    tracking = [] if zero == "zero2" else QUIET  # one case with wandb offline, as the demo runs
    must(torchrun(split, 2, f"deepspeed={zero}", *TRAIN_ARGS, *tracking, "train.stop_at=2"))
    entries, _ = read_chain(split / "chain.jsonl")
    assert [e.kind for e in entries][-1] == "checkpoint"  # stopped, not released
    p = must(torchrun(split, 2, f"deepspeed={zero}", *TRAIN_ARGS, *tracking))
    assert "resumed at step 2" in p.stdout
    if tracking == []:  # the resumed start continues the same wandb run: one id, recorded in the run folder
        wid = (split / "wandb/run-id").read_text().strip()
        entries, _ = read_chain(split / "chain.jsonl")
        assert {e.predicate["metrics"]["wandb_run"] for e in entries if e.kind == "checkpoint"} == {wid}
        starts = sorted((split / "wandb").glob("offline-run-*"))
        assert len(starts) == 2 and all(d.name.endswith(f"-{wid}") for d in starts), starts
    assert release_root(split) == release_root(straight)
    must(kai_attest("bundle", str(split)))
    must(verify_trusted(split / "bundle"))


@pytest.mark.slow
def test_resume_on_one_rank_after_two_continues_the_chain(data_run: Path, tmp_path: Path) -> None:
    """... in a run folder moved elsewhere in between (its recorded paths name the old place)."""
    first = prepared_data(tmp_path / "run", data_run)
    must(torchrun(first, 2, "deepspeed=zero2", *TRAIN_ARGS, *QUIET, "train.stop_at=2"))
    run = Path(shutil.move(first, tmp_path / "elsewhere"))
    p = must(torchrun(run, 1, "deepspeed=zero2", *TRAIN_ARGS, *QUIET))
    assert "resumed at step 2 from its signed state" in p.stdout and "world size 1" in p.stdout
    entries, _ = read_chain(run / "chain.jsonl")
    ckpts = [e.predicate for e in entries if e.kind == "checkpoint"]
    assert [c["data_consumed"]["sampler"]["world_size"] for c in ckpts] == [2, 1]
    assert ckpts[1]["data_consumed"]["sampler"]["position_start"] == ckpts[0]["data_consumed"]["sampler"]["position_end"]
    must(kai_attest("bundle", str(run)))
    must(verify_trusted(run / "bundle"))


@pytest.mark.slow
def test_resume_after_release_is_refused_with_one_line(demo_run: Path, data_run: Path, tmp_path: Path) -> None:
    import shutil

    run = Path(shutil.copytree(demo_run, tmp_path / "run", ignore=shutil.ignore_patterns("bundle", "wandb")))
    p = torchrun(run, 1, *TRAIN_ARGS, *QUIET)
    assert p.returncode != 0
    assert "already released" in p.stderr


@pytest.mark.slow
def test_export_loads_and_generates(demo_run: Path) -> None:
    from kai_train.generate import generate, load_export

    export = demo_run / "export"
    shards = sorted(export.glob("model*.safetensors"))  # two ranks wrote the checkpoint: a sharded export
    assert [f.name for f in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (export / "model.safetensors.index.json").is_file()
    assert safetensors_root(shards) == release_root(demo_run)
    signed = sorted((demo_run / "checkpoints/step-000004").glob("model*.safetensors"))
    assert all(a.samefile(b) for a, b in zip(shards, signed))  # the signed files themselves, not copies
    model, sp = load_export(export)
    out = generate(model, sp, "a red", max_new_tokens=8)
    # greedy decoding of a 4-step model may stop at eos at once: what it returns must be valid ids
    assert len(out) <= 8 and all(0 <= t < sp.get_piece_size() for t in out)
    # the export is the trained model: its held-out text loss is below the untrained genesis'
    import torch

    from kai_train.init import build_genesis_model

    ids = torch.tensor([[sp.bos_id(), *sp.encode("three plus four is seven"), sp.eos_id()]])
    g, _ = build_genesis_model(model.cfg, 1234)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        trained = ce(model(ids)[0, :-1], ids[0, 1:])
        untrained = ce(g(ids)[0, :-1], ids[0, 1:])
    assert trained < untrained


@pytest.mark.slow
def test_wandb_offline_run_is_written_and_named_in_checkpoints(demo_run: Path) -> None:
    assert any((demo_run / "wandb").glob("offline-run-*"))
    entries, _ = read_chain(demo_run / "chain.jsonl")
    assert all(e.predicate["metrics"]["wandb_run"] for e in entries if e.kind == "checkpoint")


def test_schedules_warm_up_then_decay_to_min_ratio() -> None:
    cos = lr_lambda("cosine", 10, 100, 0.1, 0.2)
    wsd = lr_lambda("wsd", 10, 100, 0.1, 0.2)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(100) == pytest.approx(0.1) and cos(50) < cos(20)
    assert wsd(50) == 1.0 and wsd(79) == 1.0  # stable until the last 20%
    assert wsd(90) == pytest.approx(0.55) and wsd(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="cosine or wsd"):
        lr_lambda("linear", 1, 10, 0.1, 0.2)


@pytest.mark.slow
def test_replay_of_every_segment_reproduces_the_chain_bit_exactly(demo_run: Path) -> None:
    import json

    p = verify_trusted(demo_run / "bundle", "--replay", "all", "--json")
    report = json.loads(p.stdout)
    failed = [f for f in report["findings"] if not f["ok"] and not f["skipped"]]
    assert p.returncode == 0 and not failed, f"exit {p.returncode}: {failed}\n{p.stderr[-2000:]}"
    replays = [f for f in report["findings"] if f["check"] == "replay"]
    assert len(replays) == 2 and all(f["ok"] and not f["skipped"] for f in replays), replays


@pytest.mark.slow
def test_replay_catches_a_checkpoint_swapped_for_weights_of_another_run(demo_run: Path, data_run: Path, tmp_path: Path) -> None:
    """An insider replaces the middle checkpoint's weights by those of a run on other data (same
    genesis, plausible update size) and re-signs everything: replay of that segment differs."""
    import shutil

    from attest.digest import sha256_file
    from attest.oms import sign_checkpoint_dir
    from conftest import resign

    other = prepared_data(tmp_path / "other", data_run)
    must(torchrun(other, 2, "deepspeed=zero2", *TRAIN_ARGS, *QUIET, "train.holdout_every=7"))
    b = Path(shutil.copytree(demo_run / "bundle", tmp_path / "bundle"))
    dst = b / "checkpoints/step-000002"
    for f in (other / "checkpoints/step-000002").glob("*.safetensors"):
        shutil.copy2(f, dst / f.name)
    sign_checkpoint_dir(dst, demo_run / "keys/signing-key.pem")
    swapped = next(e.predicate for e in read_chain(other / "chain.jsonl")[0] if e.kind == "checkpoint")

    def swap(statements: list[dict]) -> None:
        for st in statements:
            pred = st["predicate"]
            if pred["kind"] == "checkpoint" and pred["step"] == 2:
                pred["weights_root"], pred["optimizer"] = swapped["weights_root"], swapped["optimizer"]
                for s in st["subject"]:
                    s["digest"]["sha256"] = sha256_file(b / s["name"])
            if pred["kind"] == "checkpoint" and pred["step"] == 4:
                pred["parent_root"] = swapped["weights_root"]

    resign(b, demo_run / "keys/signing-key.pem", swap)
    p = verify_trusted(b, "--replay", "all")
    assert p.returncode == 1, p.stdout
    failed = {line.split()[1] for line in p.stdout.splitlines() if line.startswith("FAIL")}
    assert "replay" in failed, p.stdout


def test_config_difference_names_the_changed_key_and_ignores_stop_and_tracking() -> None:
    from kai_train.resume import config_difference

    rec = {"seed": 1, "train": {"lr": 3e-3, "stop_at": 2}, "wandb": {"mode": "offline"}, "resume": "auto"}
    assert config_difference(rec, {**rec, "train": {"lr": 3e-3, "stop_at": None}, "wandb": {"mode": "disabled"}}) is None
    assert config_difference(rec, {**rec, "train": {"lr": 1e-3, "stop_at": 2}}) == "train.lr"
    assert config_difference(rec, {**rec, "extra": 1}) == "extra"


def test_a_moved_or_copied_run_folder_compares_equal_and_the_key_path_may_differ() -> None:
    from kai_train.resume import config_difference, relocated

    rec = {"run_dir": "/a/run", "data_dir": "data/shards", "attest": {"key": "/a/run/keys/k.pem", "tsa_url": None},
           "out": ["/a/run/x", "/a/runner/y"], "seed": 1}
    moved = {**rec, "run_dir": "/b/copy/", "attest": {"key": "/b/copy/keys/k.pem", "tsa_url": None},
             "out": ["/b/copy/x", "/a/runner/y"]}
    assert config_difference(relocated(rec), relocated(moved)) is None
    assert relocated(rec)["out"] == ["${run_dir}/x", "/a/runner/y"]  # a sibling folder is not inside the run
    assert config_difference(relocated(rec), relocated({**moved, "out": ["/b/copy/z", "/a/runner/y"]})) == "out"
    # the signer's path may change (its key is checked by fingerprint), its other settings may not
    assert config_difference(rec, {**rec, "attest": {"key": "/keys/k.pem", "tsa_url": None}}) is None
    assert config_difference(rec, {**rec, "attest": {"key": "/a/run/keys/k.pem", "tsa_url": "http://t"}}) == "attest.tsa_url"


@pytest.mark.slow
def test_bf16_mixed_precision_signs_the_fp32_master_state_and_resumes_bit_exactly(data_run: Path, tmp_path: Path) -> None:
    """bf16 on DeepSpeed's CPU accelerator: the forward pass uses bf16 copies, the signed state is the
    optimizer's float32 master weights and moments, and a run resumed from it is bit-identical."""
    import torch

    from kai_train.checkpoint import SignedTensors

    args = [*TRAIN_ARGS, *QUIET, "deepspeed.bf16_on_cpu=true"]
    straight = prepared_data(tmp_path / "straight", data_run)
    must(torchrun(straight, 2, "deepspeed=zero2", *args))
    split = prepared_data(tmp_path / "split", data_run)
    must(torchrun(split, 2, "deepspeed=zero2", *args, "train.stop_at=2"))
    must(torchrun(split, 2, "deepspeed=zero2", *args))
    assert release_root(split) == release_root(straight)
    signed = SignedTensors(sorted((straight / "checkpoints/step-000004").glob("model*.safetensors")))
    name = next(n for n in signed if signed[n].dim() == 2)
    t = signed[name]
    assert t.dtype == torch.float32 and bool((t.to(torch.bfloat16).float() != t).any())  # not a bf16 copy
    must(kai_attest("bundle", str(straight)))
    p = must(verify_trusted(straight / "bundle", "--replay", "all"))
    assert sum(line.startswith("ok    replay") for line in p.stdout.splitlines()) == 2, p.stdout
