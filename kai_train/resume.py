"""Where a run resumes: the last checkpoint in the chain, from the signed state it names.

The chain is the source of truth: a checkpoint counts once its statement is appended (after every
rank's shard files and sidecars are written), so a crash at any moment leaves the last whole
checkpoint to resume from, and the chain continues without a gap or a duplicate. The state loaded is
the one the statement signs (its weights and optimizer shard files: float32 master weights, AdamW
moments and step count), at any world size and ZeRO stage; no second copy is kept. Checkpoint
folders and sidecars that training wrote but the chain never recorded are void: `discard_unrecorded`
removes them before any rank writes again, and the resumed run trains those steps again. A torn final
line (an interrupted append) is moved aside to `chain.jsonl.torn` before appending resumes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from attest.chain import read_chain, set_aside_torn_tail
from attest.errors import KaiError
from attest.layout import CHAIN_NAME, CHECKPOINTS_DIR, SIDECARS_DIR, checkpoint_step


class ResumeError(KaiError, RuntimeError):
    """The run directory cannot be resumed; the message says why and what to do."""


@dataclass(frozen=True)
class ResumePoint:
    step: int  # optimizer steps done
    position: int  # global sampler position reached
    weights_root: str  # canonical digest of the weights at `step`
    genesis_root: str
    genesis_recipe: dict  # what re-creates the genesis: a resumed run must be the same recipe
    weights_files: list[str]  # the signed state's shard files (empty when resuming from genesis)
    optimizer_files: list[str]
    optimizer_step: int | None


def find_resume_point(run_dir: Path) -> ResumePoint | None:
    """None for a fresh run (no genesis in the chain yet)."""
    chain = run_dir / CHAIN_NAME
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
    recipe = genesis.get("recipe")
    ckpts = [e.predicate for e in entries if e.kind == "checkpoint"]
    if not ckpts:
        return ResumePoint(0, 0, genesis["weights_root"], genesis["weights_root"], recipe, [], [], None)
    last_entry = [e for e in entries if e.kind == "checkpoint"][-1]
    last = last_entry.predicate
    opt = last.get("optimizer")
    if not isinstance(opt, dict):
        raise ResumeError(f"{chain}: checkpoint at step {last['step']} recorded no optimizer state "
                          "(attest.optimizer_state=false): it cannot be resumed exactly; start a new run_dir")
    names = [s["name"] for s in last_entry.statement["subject"]]
    weights = [n for n in names if n.endswith(".safetensors") and not n.rsplit("/", 1)[1].startswith("optimizer")]
    optimizer = opt["files"] if "files" in opt else [opt["file"]]
    for n in weights + optimizer:
        if not (run_dir / n).is_file():
            raise ResumeError(f"{run_dir / n}: a file of the last recorded checkpoint is missing")
    return ResumePoint(int(last["step"]), int(last["data_consumed"]["sampler"]["position_end"]),
                       last["weights_root"], genesis["weights_root"], recipe, weights, optimizer, int(opt["step"]))


def discard_unrecorded(run_dir: Path, step: int | None) -> None:
    """Remove checkpoint folders after `step` (None: no genesis yet, so all of them) and every
    sidecar: a run killed after writing them but before recording them must not sign them later."""
    shutil.rmtree(run_dir / SIDECARS_DIR, ignore_errors=True)
    for folder in sorted((run_dir / CHECKPOINTS_DIR).glob("step-*")):
        n = checkpoint_step(folder.name)
        if n is None:
            continue
        if step is None or n > step:
            shutil.rmtree(folder)


def recorded_run_config(run_dir: Path) -> dict | None:
    """The config of a run statement already in the chain (a start that died before its genesis)."""
    run = recorded_run(run_dir)
    return run["config"] if run else None


def recorded_run(run_dir: Path) -> dict | None:
    """The predicate of the run statement already in the chain, or None."""
    chain = run_dir / CHAIN_NAME
    if not chain.exists():
        return None
    entries, _ = read_chain(chain)
    runs = [e.predicate for e in entries if e.kind == "run"]
    return runs[-1] if runs else None


def global_batch(layout: dict) -> int | None:
    """world_size × grad_accum × micro_batch: the rows of one optimizer step (None if not all known)."""
    parts = [layout.get(k) for k in ("world_size", "grad_accum", "micro_batch")]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in parts):
        return None
    return parts[0] * parts[1] * parts[2]  # type: ignore[operator]


def layout_change(recorded: dict, current: dict, run_world: int | None, world: int) -> str | None:
    """A resumed run may change `train.grad_accum` and `train.micro_batch` with its world size when
    the global batch (world × grad_accum × micro_batch) stays the run statement's: each checkpoint
    records the layout its segment ran with, and replay runs each segment at its own. Returns why a
    change is refused, or None (no change, or an allowed one)."""
    rt, ct = recorded.get("train", {}), current.get("train", {})
    if all(rt.get(k) == ct.get(k) for k in LAYOUT_KEYS):
        return None
    want = global_batch({"world_size": run_world, "grad_accum": rt.get("grad_accum"), "micro_batch": rt.get("micro_batch")})
    got = global_batch({"world_size": world, "grad_accum": ct.get("grad_accum"), "micro_batch": ct.get("micro_batch")})
    if want is None or got != want:
        return (f"train.grad_accum × train.micro_batch × world size = {got} here, {want} in the run statement: "
                "change grad_accum or micro_batch with the world size only so that the global batch is kept")
    return None


LAYOUT_KEYS = ("grad_accum", "micro_batch")


# Config keys a resumed run may change: where it stops, how it resumes, how it is tracked, whether
# checkpoints are hashed in the background (the statements are the same either way), and the
# determinism mode (each checkpoint records the settings its segment ran under).
MAY_DIFFER = {"resume", "train.stop_at", "wandb", "attest.background", "determinism",
              # how experts are split over ranks: each checkpoint records its segment's (sampler.expert_parallel)
              "train.expert_parallel",
              # where the signer is found: its identity is checked by the public key's fingerprint
              # (keys/signing-key.pub.pem, attest.signers.ensure_public_key), not by a path or URI
              "attest.key", "attest.uri", "attest.pin_env"}
RUN_DIR_MARK = "${run_dir}"


def relocated(cfg: dict) -> dict:
    """`cfg` with `run_dir`, and every string under it, written relative to it ("${run_dir}/..."): the
    config of a run folder that was moved or copied compares equal to the one it recorded."""
    base = str(cfg.get("run_dir", "")).rstrip("/")

    def rel(v: object) -> object:
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rel(x) for x in v]
        if isinstance(v, str) and base and v.rstrip("/") == base:
            return RUN_DIR_MARK
        if isinstance(v, str) and base and v.startswith(base + "/"):
            return RUN_DIR_MARK + v[len(base):]
        return v

    return rel(cfg)  # type: ignore[return-value]


def config_difference(recorded: dict, current: dict, prefix: str = "", also: frozenset[str] = frozenset()
                      ) -> str | None:
    """The first config key (dotted) whose value differs, ignoring MAY_DIFFER (and `also`); None when
    equal. A resumed run trains with the recorded config, so the chain's statement stays true."""
    for key in sorted(set(recorded) | set(current)):
        path = f"{prefix}{key}"
        if path in MAY_DIFFER or path in also:
            continue
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if (sub := config_difference(a, b, f"{path}.", also)) is not None:
                return sub
        elif a != b:
            return path
    return None
