"""The walking skeleton for real: kai-data, torchrun with 2 CPU ranks and DeepSpeed, bundle, verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attest.chain import read_chain
from conftest import kai_attest, must, prepared_data, torchrun, verify_trusted

pytestmark = pytest.mark.slow


STRICT = ["oms-signature", "run-config", "trajectory", "release", "data-lineage", "data-licence", "data-replay",
          "replay"]


def entries_of(run_dir: Path, kind: str) -> list[dict]:
    entries, _ = read_chain(run_dir / "chain.jsonl")
    return [e.predicate for e in entries if e.kind == kind]


def test_honest_two_rank_bundle_verifies_with_exit_0(demo_run: Path) -> None:
    p = verify_trusted(demo_run / "bundle")
    assert p.returncode == 0, p.stdout + p.stderr
    for check in ("signature", "chain-link", "subject-digest", "weights-digest", "genesis"):
        assert any(line.startswith("ok") and check in line for line in p.stdout.splitlines()), p.stdout
    assert "verdict: PASS" in p.stdout


def test_chain_records_data_tokenizer_run_genesis_checkpoints_release_in_order(demo_run: Path) -> None:
    entries, torn = read_chain(demo_run / "chain.jsonl")
    kinds = [e.kind for e in entries]
    assert not torn
    assert kinds[-1] == "release" and kinds.count("genesis") == 1
    assert kinds.index("tokenizer") < kinds.index("run") < kinds.index("genesis") < kinds.index("checkpoint")
    steps = [p["step"] for p in entries_of(demo_run, "checkpoint")]
    assert steps == [2, 4]
    run = entries_of(demo_run, "run")[0]
    assert run["hardware"]["world_size"] == 2
    assert run["config"]["deepspeed"]["zero_optimization"]["stage"] == 2


def test_checkpoint_records_the_sampler_range_each_segment_consumed(demo_run: Path) -> None:
    ckpts = entries_of(demo_run, "checkpoint")
    ranges = [(c["data_consumed"]["sampler"]["position_start"], c["data_consumed"]["sampler"]["position_end"]) for c in ckpts]
    # 2 ranks x micro_batch 4 x 2 steps per segment, back to back
    assert ranges == [(0, 16), (16, 32)]


def test_checkpoint_records_grad_norm_rng_state_and_environment(demo_run: Path) -> None:
    for c in entries_of(demo_run, "checkpoint"):
        assert c["metrics"]["grad_norm"] > 0
        assert c["rng_state"]["sources"][0] == "torch_cpu" and len(c["rng_state"]["ranks"]) == 2
        assert c["environment"]["hardware"]["world_size"] == 2 and c["environment"]["versions"]["deepspeed"] != "absent"


def test_the_demo_trains_without_compiling_an_op(demo_run: Path) -> None:
    """DeepSpeed's shared-memory op (inference all-reduce only) is not built: no C++ compile on the
    demo's path, in the JIT build folder the demo ran with."""
    built = list((demo_run.parent / "torch_extensions").rglob("*.so"))
    assert built == [], built


def test_loss_falls_over_the_run(demo_run: Path) -> None:
    losses = [c["metrics"]["loss"] for c in entries_of(demo_run, "checkpoint")]
    assert losses[-1] < losses[0]


def test_json_report_lists_every_check(demo_run: Path) -> None:
    p = must(verify_trusted(demo_run / "bundle", "--json"))
    report = json.loads(p.stdout)
    assert report["verdict"] == "pass"
    assert {f["check"] for f in report["findings"]} >= {"signature", "chain-sequence", "genesis", "weights-digest"}


@pytest.mark.parametrize("nproc,zero,determinism", [(1, "zero1", "exact"), (2, "zero1", "fast"), (2, "zero3", "exact"),
                                                    (2, "zero3_offload", "exact")])
def test_genesis_digest_is_the_same_for_any_rank_count_and_zero_stage(
    nproc: int, zero: str, determinism: str, demo_run: Path, data_run: Path, tmp_path: Path
) -> None:
    run_dir = prepared_data(tmp_path / "run", data_run)
    must(torchrun(run_dir, nproc, f"deepspeed={zero}", "train.steps=2", "train.ckpt_every=1", "train.micro_batch=4",
                  "wandb.mode=disabled", f"determinism={determinism}"))
    assert entries_of(run_dir, "genesis")[0]["weights_root"] == entries_of(demo_run, "genesis")[0]["weights_root"]
    # each checkpoint records the determinism mode and the attention kernel SDPA chose (on CPU: math
    # when exact, any kernel when fast); a fast segment that replays bit for bit on CPU still passes
    for c in entries_of(run_dir, "checkpoint"):
        det = c["environment"]["determinism"]
        assert det["mode"] == determinism and det["deterministic_algorithms"] == (determinism == "exact")
        assert det["sdp_kernels"] == ("math" if determinism == "exact" else "flash,efficient,cudnn")
        assert det["attention_kernel"] in (("math",) if determinism == "exact" else ("math", "flash"))
    # and the run passes the strictest verification, with no false alarm: every check required,
    # every segment replayed (closed at both ends), the data recomputed (once: every case trains on
    # the same shards)
    must(kai_attest("bundle", str(run_dir)))
    policy = tmp_path / "strict.json"
    data = nproc == 1
    required = STRICT if data else [c for c in STRICT if c != "data-replay"]
    policy.write_text(json.dumps({"keys": [str(run_dir / "keys/signing-key.pub.pem")], "required_checks": required}))
    p = must(kai_attest("verify", str(run_dir / "bundle"), "--policy", str(policy), "--replay", "all",
                        *["--replay-data"] * data))
    assert sum(line.startswith("ok    replay") for line in p.stdout.splitlines()) == 2, p.stdout
