"""No PASS without recomputation, replay the team cannot steer, and honest runs that never FAIL.

- the default verify replays at least one segment drawn by the evaluator, and always the last one;
  `--no-replay` is an integrity check whose best verdict is INCOMPLETE (exit 4);
- every segment is replayed exactly at its recorded layout first, whatever its statement claims about
  the hardware; tolerance mode applies only when exact fails, and passes only within the drift budget
  the evaluator sets (`--max-drift`), never by default;
- what a replay costs is checked against policy limits before any process starts;
- an honest run resumed 2 → 1 → 2 ranks with the global batch kept (grad_accum changed) replays
  exactly, whatever thread counts the evaluator's shell sets.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from attest.verify.policy import PolicyError, parse_policy
from attest.verify.replay import replay_env, tolerance_outcome
from conftest import free_port, kai_attest, must, prepared_data, resign, run, with_seed

HONEST_DECISION = {"ok": True, "drift_budget": 2e-4, "tensor_budget": 8e-4, "loosest_tensor": "text.emb.weight"}


# ---------------------------------------------------------------- quick: the rules themselves


def test_tolerance_never_passes_without_an_evaluator_budget_and_never_above_it() -> None:
    assert tolerance_outcome(HONEST_DECISION, True, None)[0] == "undecided"
    outcome, why = tolerance_outcome(HONEST_DECISION, True, 1e-4)  # the config's own noise exceeds the budget
    assert outcome == "undecided" and "too large to decide" in why
    assert tolerance_outcome(HONEST_DECISION, True, 1e-3)[0] == "pass"
    assert tolerance_outcome(HONEST_DECISION, False, 1e-3)[0] == "fail"  # a signed loss beyond the replays' spread
    assert tolerance_outcome(HONEST_DECISION, None, 1e-3)[0] == "undecided"  # losses not checkable
    assert tolerance_outcome({"ok": False, "why": "2 tensor(s) beyond"}, True, 1.0)[0] == "fail"


ROUTED = {"layers": ["text.layers.1.mlp", "text.layers.2.mlp"],
          "steps": [["a" * 64, "b" * 64], ["c" * 64, "d" * 64], ["e" * 64, "f" * 64]]}
ROUTED_PLAN = {"segment": 2, "start_step": 6, "routing": ROUTED, "position_end": 48,
               "expect": {"weights_root": "w" * 64, "optimizer_root": "o" * 64, "optimizer_step": 9}}


def test_a_routing_difference_is_named_by_its_first_step_then_layer() -> None:
    import copy

    from attest.verify.replay import first_routing_difference

    assert first_routing_difference(ROUTED_PLAN, {"routing": ROUTED}) is None
    assert first_routing_difference({**ROUTED_PLAN, "routing": None}, {}) is None  # dense, or an older statement
    other = copy.deepcopy(ROUTED)
    other["steps"][2][0] = "0" * 64  # later step, first layer
    other["steps"][1][1] = "0" * 64  # earlier step, second layer: this one is first
    assert first_routing_difference(ROUTED_PLAN, {"routing": other}) == (
        "segment 2: routing differs first at step 8, layer 2 (text.layers.2.mlp)")
    other["steps"] = other["steps"][:1]  # a replay that routed fewer steps
    assert "step 8, layer 1" in (first_routing_difference(ROUTED_PLAN, {"routing": other}) or "")
    assert "no routing digests" in (first_routing_difference(ROUTED_PLAN, {"step_losses": []}) or "")
    assert "MoE layers" in (first_routing_difference(ROUTED_PLAN, {"routing": {**ROUTED, "layers": ["x"]}}) or "")


def test_tolerance_does_not_decide_a_moe_segment_but_a_reproduced_state_with_false_routing_fails() -> None:
    from attest.verify.findings import Finding
    from attest.verify.replay import _moe_not_exact

    failed = Finding("replay", False, "chain.jsonl:9", "weights root", "another")
    diverged = {"weights_root": "x" * 64, "optimizer_root": "y" * 64, "optimizer_step": 9, "position_end": 48}
    where = "segment 2: routing differs first at step 8, layer 2 (text.layers.2.mlp)"
    f = _moe_not_exact(ROUTED_PLAN, "chain.jsonl:9", {"state_reproduced": False, "first_routing_difference": where},
                       failed, diverged)
    assert f.skipped and not f.ok and where in f.detail and "cannot bound a mixture-of-experts segment" in f.detail
    # the whole state reproduced bit for bit: the signed routing is false, and that stays a failure
    reproduced = {**diverged, "weights_root": "w" * 64, "optimizer_root": "o" * 64}
    assert _moe_not_exact(ROUTED_PLAN, "x", {"state_reproduced": True}, failed, reproduced) is failed
    # another optimizer step or sampler end is wrong in any mode; no result is a failure too
    assert _moe_not_exact(ROUTED_PLAN, "x", {}, failed, {**diverged, "position_end": 40}) is failed
    assert _moe_not_exact(ROUTED_PLAN, "x", {}, failed, None) is failed
    ok = Finding("replay", True, "x")
    fact: dict = {}
    assert _moe_not_exact(ROUTED_PLAN, "x", fact, ok, reproduced) is ok and fact["tolerance"]["outcome"] == "not run"


def test_a_checkpoints_routing_has_one_digest_per_layer_for_each_step() -> None:
    from attest.statements import routing_problem

    good = {"algorithm": "kai-routing/v1", **ROUTED}
    assert routing_problem(good, [1.0, 2.0, 3.0]) is None
    assert "3 steps, step_losses 2" in (routing_problem(good, [1.0, 2.0]) or "")
    for bad in ({**good, "algorithm": "v0"}, {**good, "layers": ["a", "a"]}, {**good, "steps": [["a" * 64]]},
                {**good, "steps": [["A" * 64, "b" * 64]]}, {**good, "steps": []}, [good]):
        assert routing_problem(bad) is not None, bad


def test_the_replay_environment_ignores_the_evaluators_thread_settings(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "3", "MKL_CBWR": "AVX2", "LD_PRELOAD": "/x.so"}.items():
        monkeypatch.setenv(k, v)
    env = replay_env(tmp_path, 1)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert "MKL_CBWR" not in env and "LD_PRELOAD" not in env
    assert replay_env(tmp_path, 4)["OMP_NUM_THREADS"] == "4"  # what the segment's training recorded


def test_the_policy_sets_the_default_draw_the_drift_budget_and_replay_limits() -> None:
    p = parse_policy({"replay": {"segments": 3, "max_drift": "0.1%"},
                      "limits": {"max_replay_tokens": 10, "replay_timeout_s": 60}})
    assert (p.replay_segments, p.max_drift, p.limits["max_replay_tokens"], p.limits["replay_timeout_s"]) == (
        3, 1e-3, 10, 60)
    assert parse_policy({}).max_drift is None and parse_policy({}).replay_segments == 1
    for bad in ({"replay": {"max_drift": 2}}, {"replay": {"segments": -1}}, {"replay": {"mode": "tolerance"}}):
        with pytest.raises(PolicyError):
            parse_policy(bad)


def test_resume_may_change_grad_accum_with_the_world_size_only_when_the_global_batch_is_kept() -> None:
    from kai_train.resume import layout_change

    rec = {"train": {"grad_accum": 1, "micro_batch": 4}}
    assert layout_change(rec, {"train": {"grad_accum": 2, "micro_batch": 4}}, 2, 1) is None
    assert layout_change(rec, {"train": {"grad_accum": 1, "micro_batch": 8}}, 2, 1) is None
    assert layout_change(rec, {"train": {"grad_accum": 1, "micro_batch": 4}}, 2, 1) is None  # unchanged: as before
    assert "global batch" in (layout_change(rec, {"train": {"grad_accum": 3, "micro_batch": 4}}, 2, 1) or "")


def test_a_pass_needs_a_drawn_segment_and_the_last_one_reproduced_and_nothing_undecided() -> None:
    from attest.verify.findings import Finding, undecided
    from attest.verify.verifier import Report

    def report(rec: dict | None, *extra: Finding) -> Report:
        return Report("b", [Finding("replay", True, "chain.jsonl:9 (step 4)"), *extra], [], "identity",
                      {"recomputed": rec} if rec is not None else {})

    full = {"reproduced": 2, "last_reproduced": True, "segments": 2, "escape_probability": {"1": 0.0}}
    assert report(full).verdict == "pass" and "2 of 2 segments replayed, last included" in report(full).verdict_line()
    assert report(None).verdict == "incomplete"  # replay did not run at all
    no_last = {**full, "last_reproduced": False, "last_step": 4}
    assert report(no_last).verdict == "incomplete" and "last segment (step 4" in report(no_last).verdict_line()
    none = {**full, "reproduced": 0, "why": "replay not run (--no-replay)"}
    assert report(none).exit_code == 4 and "--no-replay" in report(none).verdict_line()
    open_ = report(full, undecided("replay", "chain.jsonl:8 (step 2)", "within tolerance, no drift budget set"))
    assert open_.verdict == "incomplete" and "no drift budget set" in open_.verdict_line()


# ---------------------------------------------------------------- real runs


def attest_json(bundle: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    p = run([sys.executable, "-m", "attest.cli", "verify", str(bundle), "--trust",
             str(bundle / "keys/signing-key.pub.pem"), "--json", *extra], timeout=900, extra_env=env)
    assert p.stdout.strip(), p.stderr[-3000:]
    return p.returncode, json.loads(p.stdout)


def replay_findings(rep: dict) -> list[dict]:
    return [f for f in rep["findings"] if f["check"] == "replay"]


@pytest.mark.slow
def test_the_default_verify_replays_a_drawn_segment_and_the_last_and_no_replay_is_incomplete(demo_run: Path) -> None:
    rc, rep = attest_json(demo_run / "bundle", "--replay-seed", "7")
    assert rc == 0 and rep["verdict"] == "pass", replay_findings(rep)
    rec = rep["recomputed"]
    assert rec["last_reproduced"] and rec["drawn_reproduced"] >= 1 and rec["segments"] == 2
    assert "segments replayed, last included" in rep["coverage"]
    rc, rep = attest_json(demo_run / "bundle", "--no-replay")
    assert rc == 4 and rep["verdict"] == "incomplete" and "--no-replay" in rep["not_recomputed"][0]


def _claim_gpu(sts: list[dict]) -> None:
    for s in sts:
        if s["predicate"]["kind"] == "checkpoint":
            s["predicate"]["environment"]["determinism"]["accelerator"] = "cuda:NVIDIA H100 80GB HBM3"


@pytest.mark.slow
def test_a_gpu_claim_does_not_choose_tolerance_the_honest_state_replays_exactly(demo_run: Path, tmp_path: Path) -> None:
    b = Path(shutil.copytree(demo_run / "bundle", tmp_path / "bundle"))
    resign(b, demo_run / "keys/signing-key.pem", _claim_gpu)
    rc, rep = attest_json(b, "--replay", "all")
    assert rc == 0, replay_findings(rep)
    assert [x["mode"] for x in rep["facts"]["replay"]] == ["exact", "exact"]
    assert all(x["claimed_hardware"].startswith("cuda:") for x in rep["facts"]["replay"])


@pytest.mark.slow
def test_a_drifted_checkpoint_claiming_a_gpu_never_passes_even_with_a_loose_budget(demo_run: Path,
                                                                                   tmp_path: Path) -> None:
    """The insider moves the last checkpoint 0.6% of its segment's update toward foreign weights and
    claims a GPU: exact replay does not reproduce it; tolerance measures the floor and fails it, with
    an evaluator's drift budget far above the drift (without a budget tolerance never passes at all:
    test_tolerance_never_passes_without_an_evaluator_budget_and_never_above_it)."""
    from test_audit import _drift

    b = Path(shutil.copytree(demo_run / "bundle", tmp_path / "bundle"))
    key = demo_run / "keys/signing-key.pem"
    _drift(b, key, 4, 6e-3)
    resign(b, key, _claim_gpu)
    rc, rep = attest_json(b, "--replay", "1", "--replay-seed", "0", "--max-drift", "0.05")
    assert rc == 1 and rep["verdict"] == "fail", replay_findings(rep)
    last = [x for x in rep["facts"]["replay"] if x["step"] == 4][0]
    assert last["outcome"] == "fail" and last["tolerance"]["exceeding"] and last["tolerance"]["max_drift"] == 0.05


@pytest.mark.slow
def test_replay_cost_is_checked_against_policy_limits_before_any_process_starts(
        demo_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import attest.verify.replay as replay
    from attest.cli import main

    started: list[int] = []

    def never(plan: dict, *a: object, **k: object) -> tuple[None, str]:
        started.append(plan["segment"])  # no process: the test only records which segments would start one
        return None, "not run in this test"

    monkeypatch.setattr(replay, "run_plan", never)
    b = demo_run / "bundle"
    pub = str(b / "keys/signing-key.pub.pem")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"limits": {"max_replay_tokens": 10}}))
    assert main(["verify", str(b), "--trust", pub, "--policy", str(policy), "--replay", "all"]) == 4
    out = capsys.readouterr().out
    assert "limits.max_replay_tokens" in out and "INCOMPLETE" in out.splitlines()[-1] and started == []

    # the team signs a grad_accum of 65,536 for the last segment: refused before launch, not an hour's work
    big = Path(shutil.copytree(b, tmp_path / "bundle"))

    def huge(sts: list[dict]) -> None:
        ck = [s for s in sts if s["predicate"]["kind"] == "checkpoint"][-1]
        sampler = ck["predicate"]["data_consumed"]["sampler"]
        sampler["grad_accum"] = 65536
        sampler["position_end"] = sampler["position_start"] + 2 * 65536 * sampler["micro_batch"] * sampler["world_size"]

    resign(big, demo_run / "keys/signing-key.pem", huge)
    rc = main(["verify", str(big), "--trust", pub, "--replay", "all"])
    out = capsys.readouterr().out
    assert rc in (1, 4) and "limits.max_replay_micro_batches" in out and 1 not in started, out
    assert not any(line.startswith("ok    replay") and "(step 4)" in line for line in out.splitlines()), out

    # a determinism mode the replay does not know is refused by name before launch
    odd = Path(shutil.copytree(b, tmp_path / "odd"))

    def turbo(sts: list[dict]) -> None:
        [s for s in sts if s["predicate"]["kind"] == "checkpoint"][-1]["predicate"]["environment"]["determinism"][
            "mode"] = "turbo"

    resign(odd, demo_run / "keys/signing-key.pem", turbo)
    started.clear()
    rc = main(["verify", str(odd), "--trust", pub, "--replay", "all"])
    out = capsys.readouterr().out
    assert rc == 1 and "environment.determinism.mode 'turbo'" in out and 1 not in started, out


def torchrun_env(run_dir: Path, nproc: int, *overrides: str, env: dict[str, str] | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "kai_train.train", f"run_dir={run_dir}", *with_seed(overrides)]
    return run(cmd, extra_env=env)


WS_ARGS = ["deepspeed=zero2", "train.steps=6", "train.ckpt_every=2", "train.micro_batch=4", "train.log_every=1",
           "train.eval_every=2", "wandb.mode=disabled"]


@pytest.mark.slow
def test_an_honest_run_resumed_2_1_2_ranks_with_the_global_batch_kept_passes_replay_all(data_run: Path,
                                                                                        tmp_path: Path) -> None:
    """The operator's guide: a node lost (2 → 1 ranks), grad_accum doubled to keep the global batch, then
    back on 2 ranks. The 1-rank segment trains with 2 threads (what its statement records). The
    evaluator's shell sets OMP/MKL thread counts of its own. Every segment replays exactly."""
    r = prepared_data(tmp_path / "run", data_run)
    must(torchrun_env(r, 2, *WS_ARGS, "train.grad_accum=1", "train.stop_at=2"))
    p = torchrun_env(r, 1, *WS_ARGS, "train.grad_accum=3", "train.stop_at=4")
    assert p.returncode != 0 and "global batch" in p.stderr, p.stderr[-2000:]  # 1 × 3 × 4 ≠ 2 × 1 × 4
    must(torchrun_env(r, 1, *WS_ARGS, "train.grad_accum=2", "train.stop_at=4", env={"OMP_NUM_THREADS": "2"}))
    must(torchrun_env(r, 2, *WS_ARGS, "train.grad_accum=1"))
    from attest.chain import read_chain

    entries, _ = read_chain(r / "chain.jsonl")
    ckpts = [e.predicate for e in entries if e.kind == "checkpoint"]
    layout = [(c["data_consumed"]["sampler"]["world_size"], c["data_consumed"]["sampler"]["grad_accum"]) for c in ckpts]
    assert layout == [(2, 1), (1, 2), (2, 1)]
    assert [c["environment"]["determinism"]["threads"] for c in ckpts] == [1, 2, 1]
    must(kai_attest("bundle", str(r)))
    rc, rep = attest_json(r / "bundle", "--replay", "all", env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "3"})
    assert rc == 0 and rep["verdict"] == "pass", [f for f in replay_findings(rep) if not f["ok"]]
    assert [x["layout"]["world_size"] for x in rep["facts"]["replay"]] == [2, 1, 2]
    assert all(x["mode"] == "exact" and x["bit_exact"] for x in rep["facts"]["replay"])


@pytest.mark.slow
def test_a_noisy_bf16_config_cannot_hide_a_drift_in_its_own_floor(data_run: Path, tmp_path: Path) -> None:
    """The team's config makes the noise: bf16 on CPU, grad_accum 4, lr 3e-3, and a GPU claim. The last
    checkpoint moved 0.6% of its update toward foreign weights is not bit-exact; within the wide floor
    such a config measures it is at best INCOMPLETE, even with a strict drift budget: never PASS (without
    a budget tolerance never passes: test_audit's honest run in tolerance mode is undecided)."""
    from test_audit import _drift

    r = prepared_data(tmp_path / "run", data_run)
    must(torchrun_env(r, 2, "deepspeed=zero1", "deepspeed.bf16_on_cpu=true", "train.steps=4", "train.ckpt_every=2",
                      "train.micro_batch=2", "train.grad_accum=4", "train.lr=3e-3", "train.log_every=1",
                      "train.eval_every=2", "wandb.mode=disabled"))
    must(kai_attest("bundle", str(r)))
    b = r / "bundle"
    key = r / "keys/signing-key.pem"
    _drift(b, key, 4, 6e-3)
    resign(b, key, _claim_gpu)
    rc, rep = attest_json(b, "--replay", "1", "--replay-seed", "0", "--max-drift", "1e-3")
    assert rc in (1, 4) and rep["verdict"] != "pass", replay_findings(rep)
    last = [x for x in rep["facts"]["replay"] if x["step"] == 4][0]
    assert last["outcome"] in ("fail", "undecided") and not last["bit_exact"] and last["tolerance"]["max_drift"] == 1e-3, last


@pytest.mark.slow
def test_steered_adam_moments_fail_the_segment_that_signs_them(demo_run: Path, tmp_path: Path) -> None:
    """The insider moves checkpoint 2's exp_avg 0.1% of its own size toward other values and re-signs
    (optimizer root, subjects, model-signing signature): segment 0 no longer closes at the signed
    moments: exact replay differs, and tolerance finds the moments beyond the floor: FAIL, even with a
    generous drift budget."""
    import torch
    from safetensors.torch import load_file

    from attest.digest import merkle_root, safetensors_leaves, sha256_file
    from attest.oms import sign_checkpoint_dir
    from kai_train.weights import save_weights

    b = Path(shutil.copytree(demo_run / "bundle", tmp_path / "bundle"))
    key = demo_run / "keys/signing-key.pem"
    folder = b / "checkpoints/step-000002"
    gen = torch.Generator().manual_seed(7)
    for shard in sorted(folder.glob("optimizer*.safetensors")):
        sd = load_file(str(shard))
        for name, t in sd.items():
            if name.startswith("exp_avg/") and t.numel() > 1:
                sd[name] = t + 1e-3 * t.norm() * torch.randn(t.shape, generator=gen) / t.numel() ** 0.5
        save_weights(sd, shard)
    sign_checkpoint_dir(folder, key)
    root = merkle_root(safetensors_leaves(sorted(folder.glob("optimizer*.safetensors"))))

    def resha(sts: list[dict]) -> None:
        ck = next(s for s in sts if s["predicate"]["kind"] == "checkpoint" and s["predicate"]["step"] == 2)
        for s in ck["subject"]:
            s["digest"]["sha256"] = sha256_file(b / s["name"])
        ck["predicate"]["optimizer"]["root"] = root

    resign(b, key, resha)
    rc, rep = attest_json(b, "--replay", "all", "--max-drift", "0.5")
    bad = [f for f in replay_findings(rep) if not f["ok"] and not f["skipped"]]
    assert rc == 1 and any(f["file"].endswith("(step 2)") for f in bad), replay_findings(rep)
    seg0 = rep["facts"]["replay"][0]
    assert seg0["outcome"] == "fail" and any(t.startswith("exp_avg/") for t in seg0["tolerance"]["exceeding"])
