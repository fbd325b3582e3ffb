"""Insider attacks that need no training run: the key holder re-signs every statement consistently.

Each class of hole gets distinct attacks, each failing with the check named: bounds set by
self-reported numbers (trajectory), the bundle choosing or configuring what replay runs (replay),
and a verdict without an evaluator's trust root (exit 3). Replays of real training segments are in
tests/test_insider_replay.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bundlefactory import DERIVER, LR, make_bundle

import attest.verify as verify
from attest.verify.checks.model import coverage
from attest.verify.replay_plan import DEEPSPEED_SCHEMA, TRAIN_SCHEMA, PlanError, validate
from attest.schedule import Schedule


@pytest.fixture(autouse=True)
def test_deriver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(verify.DERIVERS, DERIVER, "bundlefactory")


def failed(report: verify.Report) -> dict[str, list[verify.Finding]]:
    out: dict[str, list[verify.Finding]] = {}
    for f in report.failed:
        out.setdefault(f.check, []).append(f)
    return out


def kinds(sts: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [s["predicate"] for s in sts if s["predicate"]["kind"] == kind]


def trusted(root: Path, **kw: Any) -> verify.Report:
    return verify.verify_bundle(root, [str(root / "keys/signing-key.pub.pem")], **kw)


# ---------------------------------------------------------------- nothing self-reported sets a bound


def test_an_inflated_reported_lr_no_longer_hides_a_weight_swap(tmp_path: Path) -> None:
    """Before: the AdamW bound took the largest lr any checkpoint reported, so metrics.lr × 1000
    widened it enough to pass another seed's weights in the middle of the run."""
    def inflate(sts: list[dict[str, Any]]) -> None:
        for p in kinds(sts, "checkpoint"):
            p["metrics"]["lr"] = LR * 1000

    root, _ = make_bundle(tmp_path / "b", swap_at=6, mutate=inflate)
    bad = failed(trusted(root))
    assert set(bad) == {"trajectory"}
    assert any("moved more than any step could" in f.detail for f in bad["trajectory"])
    assert sum("metrics.lr" in f.found for f in bad["trajectory"]) == 6


def test_a_reported_lr_the_signed_schedule_does_not_produce_fails_even_without_a_swap(tmp_path: Path) -> None:
    def lie(sts: list[dict[str, Any]]) -> None:
        kinds(sts, "checkpoint")[2]["metrics"]["lr"] = LR * 1.5

    root, _ = make_bundle(tmp_path / "b", mutate=lie)
    bad = failed(trusted(root))
    assert set(bad) == {"trajectory"} and len(bad["trajectory"]) == 1
    assert "the signed schedule after step 6" in bad["trajectory"][0].expected


def test_a_checkpoint_past_the_signed_step_count_fails(tmp_path: Path) -> None:
    """A schedule that ends at step 6 leaves lr at its floor; a checkpoint at step 12 is not part of this run."""
    def shorten(sts: list[dict[str, Any]]) -> None:
        for s in sts:
            if "config" in s["predicate"]:
                s["predicate"]["config"]["train"]["steps"] = 6

    root, _ = make_bundle(tmp_path / "b", mutate=shorten)
    bad = failed(trusted(root))
    assert "trajectory" in bad and any("train.steps 6" in f.expected for f in bad["trajectory"])


def test_a_run_config_without_a_valid_schedule_fails_trajectory_instead_of_skipping_the_bound(tmp_path: Path) -> None:
    def drop(sts: list[dict[str, Any]]) -> None:
        for s in sts:
            if "config" in s["predicate"]:
                del s["predicate"]["config"]["train"]["warmup"]

    root, _ = make_bundle(tmp_path / "b", mutate=drop)
    bad = failed(trusted(root))
    assert set(bad) - {"run-config"} == {"trajectory"} and "train.warmup" in bad["trajectory"][0].found


def test_the_schedule_is_the_trainers_own() -> None:
    pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")
    from kai_train.engine import lr_lambda as trainer_lambda

    train = {"lr": 3e-3, "steps": 30, "warmup": 5, "schedule": "cosine", "min_lr_ratio": 0.1, "decay_frac": 0.2}
    s = Schedule(train)
    f = trainer_lambda("cosine", 5, 30, 0.1, 0.2)
    assert [s.lr(t) for t in range(31)] == [3e-3 * f(t) for t in range(31)]
    assert s.lr_sum(0, 5) == pytest.approx(3e-3 * sum((t + 1) / 5 for t in range(5)))
    with pytest.raises(ValueError, match="train.steps"):
        Schedule({**train, "steps": 10**12})


# ---------------------------------------------------------------- the evaluator's install decides what runs


@pytest.mark.parametrize("section,value,key", [
    ("deepspeed", {"tensorboard": {"enabled": True, "output_path": "/tmp/owned"}}, "deepspeed.tensorboard"),
    ("deepspeed", {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/etc"}}},
     "zero_optimization.offload_param"),
    ("deepspeed", {"flops_profiler": {"enabled": True, "output_file": "/tmp/owned.txt"}}, "deepspeed.flops_profiler"),
    ("deepspeed", {"zero_optimization": {"stage": 7}}, "zero_optimization.stage"),
    ("train", {"data_dir": "/etc"}, "train.data_dir"),
    ("train", {"micro_batch": 10**9}, "train.micro_batch"),
    ("train", {"lr": float("nan")}, "train.lr"),
])
def test_replay_config_outside_the_schema_is_refused_naming_the_key(section: str, value: dict, key: str) -> None:
    schema = DEEPSPEED_SCHEMA if section == "deepspeed" else TRAIN_SCHEMA
    with pytest.raises(PlanError) as e:
        validate(value, schema, f"run config {section}")
    assert key in str(e.value)


def test_the_shipped_deepspeed_and_train_configs_fit_the_replay_schema() -> None:
    """No false alarm: every config the project ships validates (what an honest run records)."""
    yaml = pytest.importorskip("yaml", reason="the train extra; not on the evaluator's light install")

    repo = Path(__file__).resolve().parent.parent
    for f in sorted((repo / "kai_train/conf/deepspeed").glob("*.yaml")):
        validate(yaml.safe_load(f.read_text()), DEEPSPEED_SCHEMA, str(f))
    for f in sorted((repo / "kai_train/conf/train").glob("*.yaml")):
        validate(yaml.safe_load(f.read_text()), TRAIN_SCHEMA, str(f))


# ---------------------------------------------------------------- coverage stated, no key no pass


def test_replay_coverage_is_the_escape_probability_of_a_forgery_confined_to_m_segments() -> None:
    c = coverage(2, 10)
    assert c["escape_probability"]["1"] == pytest.approx(8 / 10)
    assert c["escape_probability"]["2"] == pytest.approx((8 * 7) / (10 * 9))
    assert coverage(10, 10)["escape_probability"]["5"] == 0.0


def test_without_a_trust_root_the_verdict_is_integrity_only_with_its_own_exit_code(tmp_path: Path) -> None:
    root, _ = make_bundle(tmp_path / "b")
    r = verify.verify_bundle(root)
    assert (r.verdict, r.exit_code) == ("integrity-only", 3)
    # trusted: identity established; a synthetic run recomputes nothing, so INCOMPLETE (exit 4), not 3
    assert (trusted(root).verdict, trusted(root).exit_code) == ("incomplete", 4)


def test_nothing_is_hashed_derived_or_replayed_before_the_signatures_verify(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap first: a chain signed by a key nobody trusts makes the verifier read no weights at all."""
    from attest.signing import keygen
    from attest.verify.cache import FileDigests

    root, _ = make_bundle(tmp_path / "b")
    _, other = keygen(tmp_path / "other")
    touched: list[str] = []
    for name in ("sha256", "leaves", "prefetch"):
        real = getattr(FileDigests, name)
        monkeypatch.setattr(FileDigests, name, lambda self, *a, _real=real, _n=name: touched.append(_n) or _real(self, *a))
    r = verify.verify_bundle(root, [str(other)], replay="all")
    assert not touched
    assert "signature" in failed(r)
    held = {f.check for f in r.findings if f.skipped and "unauthenticated input" in f.detail}
    assert held == {"subject-digest", "weights-digest", "oms-signature", "genesis", "trajectory", "release",
                    "data-replay", "replay"}


def test_replay_is_bounded_by_the_policy_not_by_the_rank_count_a_bundle_records(tmp_path: Path) -> None:
    """A segment claiming 512 ranks would make the evaluator's machine start 512 processes."""
    from attest.chain import read_chain
    from attest.verify.findings import Context
    from attest.verify.policy import Policy
    from attest.verify.replay_plan import build_plan

    root, _ = make_bundle(tmp_path / "b", mutate=lambda sts: kinds(sts, "checkpoint")[0]["data_consumed"]["sampler"]
                          .update(world_size=512))
    entries, _ = read_chain(root / "chain.jsonl")
    ctx = Context(root, entries, [], False, False, policy=Policy())
    with pytest.raises(PlanError, match="max_replay_ranks"):
        build_plan(ctx, 0)
    ctx.failed.add("genesis")
    with pytest.raises(PlanError, match="genesis check failed"):
        build_plan(ctx, 0)


@pytest.mark.parametrize(("ep", "words"), [(2, "a divisor of the world size 1 and of the model's 16 experts"),
                                           ("1", "expected a divisor"), (True, "expected a divisor")])
def test_a_segments_expert_parallel_record_must_fit_its_world_and_model(tmp_path: Path, ep: object,
                                                                         words: str) -> None:
    """A hostile `sampler.expert_parallel` is refused by name before any replay process starts."""
    from attest.chain import read_chain
    from attest.verify.findings import Context
    from attest.verify.policy import Policy
    from attest.verify.replay_plan import build_plan

    import yaml

    conf = Path(__file__).resolve().parent.parent / "kai_train/conf"
    train = {**yaml.safe_load((conf / "train/demo.yaml").read_text()), "holdout_every": 0}

    def mutate(sts: list[dict]) -> None:  # a complete run config and a mixture-of-experts model
        kinds(sts, "run")[0]["config"].update(train={**train, **kinds(sts, "run")[0]["config"]["train"]},
                                              deepspeed=yaml.safe_load((conf / "deepspeed/zero2.yaml").read_text()))
        kinds(sts, "genesis")[0]["recipe"]["model"] = yaml.safe_load((conf / "model/moe-cpu.yaml").read_text())
        kinds(sts, "checkpoint")[0]["data_consumed"]["sampler"].update(expert_parallel=ep)

    root, _ = make_bundle(tmp_path / "b", mutate=mutate)
    entries, _ = read_chain(root / "chain.jsonl")
    with pytest.raises(PlanError, match=f"sampler.expert_parallel .*{words}"):
        build_plan(Context(root, entries, [], False, False, policy=Policy()), 0)
