"""Where a run resumes: the last checkpoint that is both in the chain and saved by DeepSpeed.

The chain is the source of truth: a checkpoint counts once its statement is appended (after the
DeepSpeed save and the weights file), so a crash at any moment leaves the last whole checkpoint
to resume from, and the chain continues without a gap or a duplicate. Checkpoint folders that
training wrote while the background worker had not yet recorded them (`ds/step-N`,
`checkpoints/step-N`) are no resume point: the resumed run trains those steps again and rewrites
them. A torn final line (an interrupted append) is moved aside to `chain.jsonl.torn` before
appending resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attest.chain import read_chain, set_aside_torn_tail


class ResumeError(RuntimeError):
    """The run directory cannot be resumed; the message says why and what to do."""


@dataclass(frozen=True)
class ResumePoint:
    step: int  # optimizer steps done
    position: int  # global sampler position reached
    weights_root: str  # canonical digest of the weights at `step`
    genesis_root: str
    tag: str | None  # DeepSpeed checkpoint tag, None when resuming from genesis (no step done)


def ds_tag(step: int) -> str:
    return f"step-{step:06d}"


def find_resume_point(run_dir: Path) -> ResumePoint | None:
    """None for a fresh run (no genesis in the chain yet)."""
    chain = run_dir / "chain.jsonl"
    if not chain.exists():
        return None
    set_aside_torn_tail(chain)
    entries, _ = read_chain(chain)
    kinds = [e.kind for e in entries]
    if "genesis" not in kinds:
        return None
    if "release" in kinds:
        raise ResumeError(f"{chain}: the run was already released; start a new run_dir to train further")
    genesis = entries[kinds.index("genesis")].predicate
    ckpts = [e.predicate for e in entries if e.kind == "checkpoint"]
    if not ckpts:
        return ResumePoint(0, 0, genesis["weights_root"], genesis["weights_root"], None)
    last = ckpts[-1]
    tag = ds_tag(int(last["step"]))
    if not (run_dir / "ds" / tag).is_dir():
        raise ResumeError(f"{run_dir / 'ds' / tag}: DeepSpeed checkpoint of the last chain checkpoint is missing")
    return ResumePoint(int(last["step"]), int(last["data_consumed"]["sampler"]["position_end"]),
                       last["weights_root"], genesis["weights_root"], tag)


def recorded_run_config(run_dir: Path) -> dict | None:
    """The config of a run statement already in the chain (a start that died before its genesis)."""
    chain = run_dir / "chain.jsonl"
    if not chain.exists():
        return None
    entries, _ = read_chain(chain)
    runs = [e.predicate for e in entries if e.kind == "run"]
    return runs[-1]["config"] if runs else None


# Config keys a resumed run may change: where it stops, how it resumes, how it is tracked, and
# whether checkpoints are hashed in the background (the statements are the same either way).
MAY_DIFFER = {"resume", "train.stop_at", "wandb", "attest.background"}


def config_difference(recorded: dict, current: dict, prefix: str = "") -> str | None:
    """The first config key (dotted) whose value differs, ignoring MAY_DIFFER; None when equal.
    A resumed run trains with the recorded config, so the chain's statement stays true."""
    for key in sorted(set(recorded) | set(current)):
        path = f"{prefix}{key}"
        if path in MAY_DIFFER:
            continue
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if (sub := config_difference(a, b, f"{path}.")) is not None:
                return sub
        elif a != b:
            return path
    return None
