"""A signed three-source mixture: trained on 2 ranks, resumed on 1, every segment replayed; the
per-source counts are recomputed by the verifier, and an insider who re-signs other counts or
another mixture is caught."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("deepspeed", reason="the train extra; not on the evaluator's light install")

from attest.chain import read_chain
from attest.runconfig import render_yaml
from attest.sampling import Sampler
from conftest import TRAIN_ARGS, built_once, kai_attest, must, prepared_data, resign, torchrun, verify_trusted

QUIET = ["wandb.mode=disabled"]
MIXTURE = {"text": 5, "images": 3, "audio": 2}
MIX = "sampler.mixture={text:5,images:3,audio:2}"


@pytest.fixture(scope="module")
def mixed_run(data_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    def train(folder: Path) -> None:
        run = prepared_data(folder / "run", data_run)
        must(torchrun(run, 2, "deepspeed=zero2", *TRAIN_ARGS, *QUIET, MIX, "train.stop_at=2"))
        p = must(torchrun(run, 1, "deepspeed=zero2", *TRAIN_ARGS, *QUIET, MIX))
        assert "resumed at step 2" in p.stdout and "world size 1" in p.stdout
        must(kai_attest("bundle", str(run)))

    return built_once(tmp_path_factory, "mixture", train) / "run"


def statements(run: Path) -> list[dict[str, Any]]:
    entries, _ = read_chain(run / "chain.jsonl")
    return [e.predicate for e in entries]


@pytest.mark.slow
def test_a_mixture_run_records_the_counts_it_read_and_replays(mixed_run: Path) -> None:
    sts = statements(mixed_run)
    run = next(s for s in sts if s["kind"] == "run")
    assert run["config"]["sampler"] == {"kind": "feistel-v1", "mixture": MIXTURE}
    ckpts = [s["data_consumed"]["sampler"] for s in sts if s["kind"] == "checkpoint"]
    assert [c["world_size"] for c in ckpts] == [2, 1]
    for c in ckpts:
        assert c["kind"] == "feistel-v1" and c["mixture"] == dict(sorted(MIXTURE.items()))
        assert [s["name"] for s in c["sources"]] == ["audio", "images", "text"]
        assert sum(s["consumed"] for s in c["sources"]) == c["position_end"] - c["position_start"]
        n = c["position_end"]
        for s in c["sources"]:  # the stated bound: within 2·weight of the declared share
            assert abs(s["seen"] - n * s["weight"] / 10) < 2 * s["weight"]
    p = must(verify_trusted(mixed_run / "bundle", "--replay", "all"))
    assert sum(line.startswith("ok    replay") for line in p.stdout.splitlines()) == 2, p.stdout
    line = next(ln for ln in p.stdout.splitlines() if "data-sampler" in ln)
    assert line.startswith("ok") and "text 50.0% declared" in line and "epochs" in line, line


def _copy(mixed_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(mixed_run / "bundle", tmp_path / "bundle"))


@pytest.mark.slow
def test_re_signed_per_source_counts_are_caught(mixed_run: Path, tmp_path: Path) -> None:
    b = _copy(mixed_run, tmp_path)

    def shift(sts: list[dict]) -> None:
        src = [s for s in sts if s["predicate"]["kind"] == "checkpoint"][0]["predicate"]["data_consumed"]["sampler"]["sources"]
        src[0]["consumed"] += 1  # claim one more audio row and one text row fewer
        src[2]["consumed"] -= 1

    resign(b, mixed_run / "keys/signing-key.pem", shift)
    p = verify_trusted(b)
    assert p.returncode == 1
    fail = [ln for ln in p.stdout.splitlines() if ln.startswith("FAIL") and "data-sampler" in ln]
    assert fail and "data_consumed.sampler.sources" in fail[0], p.stdout


@pytest.mark.slow
def test_a_mixture_other_than_the_one_trained_is_caught(mixed_run: Path, tmp_path: Path) -> None:
    """An insider re-signs the whole chain claiming another mixture, with counts recomputed to match
    it: every torch-free check agrees, but replay reads the claimed mixture's rows and does not reach
    the signed weights."""
    b = _copy(mixed_run, tmp_path)
    claimed = {"audio": 1, "images": 1, "text": 8}

    def remix(sts: list[dict]) -> None:
        run = next(s for s in sts if s["predicate"]["kind"] == "run")
        cfg = run["predicate"]["config"]
        cfg["sampler"]["mixture"] = claimed
        (b / "config/run.yaml").write_text(render_yaml(cfg))
        run["subject"][0]["digest"]["sha256"] = hashlib.sha256((b / "config/run.yaml").read_bytes()).hexdigest()
        manifests = {s["subject"][0]["name"]: s["predicate"]["manifest"] for s in sts if s["predicate"]["kind"] == "data-shard"}
        names = [t["name"] for t in cfg["data_shards"]]
        sampler = Sampler(cfg["seed"], cfg["train"]["holdout_every"], [manifests[n]["rows"] for n in names],
                          [manifests[n]["source"]["name"] for n in names], claimed)
        for s in sts:
            if s["predicate"]["kind"] == "checkpoint":
                rec = s["predicate"]["data_consumed"]["sampler"]
                rec["mixture"] = claimed
                rec["sources"] = sampler.record(rec["position_start"], rec["position_end"])

    resign(b, mixed_run / "keys/signing-key.pem", remix)
    p = verify_trusted(b, "--replay", "all")
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    assert any(ln.startswith("ok") and "data-sampler" in ln for ln in lines), p.stdout  # consistent on paper
    assert any(ln.startswith("FAIL") and "replay" in ln for ln in lines), p.stdout  # but not what was trained
