"""kill -9 at many moments of a run: each time the chain verifies up to its last whole entry, and
`resume=auto` finishes the run with weights bit-identical to a run that was never killed (a prefix
without its release fails only `release`: no release, no from-scratch claim). The
kills at `checkpoint-hashed`, `before-oms`, `oms-signed` and `chain-append-torn` land in the
background worker that records checkpoints while training goes on."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from attest.chain import read_chain
from attest.cli import main as kai_attest_main
from attest.verify.checks.model import NO_RELEASE
from conftest import env, free_port, must, prepared_data, run, torchrun

pytestmark = pytest.mark.slow

ARGS = ["seed=1234", "train.steps=5", "train.ckpt_every=1", "train.micro_batch=4", "train.eval_every=2", "wandb.mode=disabled"]
# (fail point, hit) in the order a run meets them; each kill is followed by verify and a resume.
KILLS = [
    ("chain-appended", 1),     # run statement written, genesis not yet
    ("shard-written", 1),      # a rank's genesis shard on disk, not yet signed
    ("chain-appended", 2),     # genesis recorded, before DeepSpeed starts
    ("step-done", 1),          # mid-segment, nothing saved since genesis
    ("gathered", 1),           # weights gathered for a checkpoint, nothing written
    ("shard-written", 1),      # a rank's checkpoint shard written by its writer thread, no statement
    ("before-oms", 1),         # weights file written, OMS signature not
    ("oms-signed", 1),         # OMS signature written, statement not
    ("checkpoint-hashed", 1),  # in the background worker, training already past the checkpoint
    ("chain-append-torn", 1),  # half a checkpoint statement reached the disk
    ("step-done", 2),          # mid-segment after a resume
    ("release-recorded", 1),   # exported and released, the run not yet finished
]


INTEGRITY = {"signature", "chain-sequence", "chain-link", "subject-digest", "weights-digest", "oms-signature"}


def train(run_dir: Path, failpoint: str | None) -> int:
    e = env()
    if failpoint:
        e["KAI_FAILPOINT"] = failpoint
    else:
        e.pop("KAI_FAILPOINT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "kai_train.train", f"run_dir={run_dir}", "deepspeed=zero2", *ARGS]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent).returncode


def kai_attest_here(*args: str) -> tuple[int, str]:
    """`kai-attest ARGS` in this process (exit status, stdout): the kill loop bundles and verifies
    twelve times, and a fresh interpreter each time would only add its start-up."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = kai_attest_main(list(args))
    return rc, out.getvalue()


def release_root(run_dir: Path) -> str | None:
    entries, _ = read_chain(run_dir / "chain.jsonl")
    return next((e.predicate["weights_root"] for e in entries if e.kind == "release"), None)


def test_kill_at_every_phase_then_verify_and_resume_gives_the_uninterrupted_result(data_run: Path, tmp_path: Path) -> None:
    straight = prepared_data(tmp_path / "straight", data_run)
    assert train(straight, None) == 0
    want = release_root(straight)

    crashed = prepared_data(tmp_path / "crashed", data_run)
    whole_entries = []
    for point, hit in KILLS:
        rc = train(crashed, f"{point}@{hit}")
        assert rc != 0, f"{point}@{hit}: the run was not killed"
        entries, torn = read_chain(crashed / "chain.jsonl")
        assert len(entries) >= (whole_entries[-1] if whole_entries else 0), f"{point}: whole entries were lost"
        whole_entries.append(len(entries))
        rc, out = kai_attest_here("bundle", str(crashed), "--out", str(tmp_path / "b"))
        assert rc == 0, out
        rc, out = kai_attest_here("verify", str(tmp_path / "b"), "--trust", str(crashed / "keys/signing-key.pub.pem"))
        failed = {line.split()[1] for line in out.splitlines() if line.startswith("FAIL")}
        if any(e.kind == "release" for e in entries):
            assert rc == 0, f"after a kill at {point}@{hit} the released chain does not verify:\n{out}"
        elif any(e.kind == "genesis" for e in entries):
            # a prefix of a run still training: everything it wrote verifies; only the release it does
            # not have yet fails (no release, no from-scratch claim), and trajectory while there is no
            # checkpoint to judge
            allowed = {"release"} | (set() if any(e.kind == "checkpoint" for e in entries) else {"trajectory"})
            assert "release" in failed and failed <= allowed and NO_RELEASE in out, \
                f"after a kill at {point}@{hit} the chain prefix does not verify:\n{out}"
        else:  # a run killed before its genesis proves nothing yet, but what it wrote is intact
            assert failed <= {"statement-order", "genesis", "trajectory", "release"}, out
            assert not (INTEGRITY & failed)
        if point == "release-recorded":
            break
    assert release_root(crashed) == want  # every kill, resumed: bit-identical to never killed
    assert (crashed / "chain.jsonl.torn").exists()  # the torn append was set aside, not rewritten
    kinds = [e.kind for e in read_chain(crashed / "chain.jsonl")[0]]
    assert kinds.count("run") == 1 and kinds.count("genesis") == 1
    steps = [e.predicate["step"] for e in read_chain(crashed / "chain.jsonl")[0] if e.kind == "checkpoint"]
    assert steps == [1, 2, 3, 4, 5]  # no gap, no duplicate
    # the export the last kill prevented is made on demand
    must(run([sys.executable, "-m", "kai_train.export", str(crashed)]))
    assert (crashed / "export/model.safetensors.index.json").exists()  # two ranks wrote the shards it copies


def test_resume_with_another_learning_rate_is_refused(data_run: Path, tmp_path: Path) -> None:
    run_dir = prepared_data(tmp_path / "run", data_run)
    must(torchrun(run_dir, 1, *ARGS, "train.stop_at=1"))
    p = torchrun(run_dir, 1, *ARGS, "train.lr=0.01")
    assert p.returncode != 0 and "config key train.lr differs" in p.stderr, p.stderr[-2000:]
