"""Segment replay from the verifier's side: choose segments, build their plans, run, compare.

The evaluator picks segments at random after receiving the bundle (`--replay N`, reproducible
with `--replay-seed S`; see attest.checks_model.replay_segments), so a team cannot know which
segments will be re-run. The implementation that runs is this verifier's own `kai_train.replay`
(the bundle names none). For each chosen segment the verifier builds a closed plan from signed
statements only (attest.replay_plan: bound files, schema-checked config) and runs the plug-in in a
separate process under torchrun with the world size the segment recorded, on CPU, in a fresh
scratch directory that is also its HOME and TMPDIR, with a minimal environment. The weights and
AdamW state it reaches must equal the next checkpoint's signed roots bit for bit, and it must
consume exactly the recorded sampler range. The plug-in needs torch and DeepSpeed (the `train`
extra); this module imports neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attest.replay_plan import PlanError, build_plan

PLUGIN = "kai_train.replay"  # the one implementation this verifier runs
# What the replay process inherits from the verifier's environment; nothing else (a bundle cannot
# reach it, but a stray LD_PRELOAD, PYTHONSTARTUP or DeepSpeed variable of the evaluator's shell
# should not change a replay either).
PASS_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "SYSTEMROOT")


def plugin_available() -> str | None:
    """None when the replay plug-in and what it needs can be imported here, else why not."""
    import importlib.util

    for mod in (PLUGIN, "torch", "deepspeed"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed (install kai-train[train])"
        except (ImportError, ValueError) as ex:
            return f"{mod}: {ex}"
    return None


def replay_env(scratch: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    return {**env, "HOME": str(scratch), "TMPDIR": str(scratch), "DS_ACCELERATOR": "cpu",
            "PYTHONDONTWRITEBYTECODE": "1", "WANDB_MODE": "disabled"}


def run_plan(plan: dict[str, Any], timeout_s: int = 3600) -> tuple[dict[str, Any] | None, str]:
    """Run one plan in a scratch directory; returns (the plug-in's result, error text)."""
    with tempfile.TemporaryDirectory(prefix="kai-replay-") as tmp:
        scratch = Path(tmp)
        (scratch / "plan.json").write_text(json.dumps(plan))
        out = scratch / "result.json"
        # --standalone: torchrun binds a free local port itself (no window for another process to take it)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(plan["world_size"]),
               "-m", PLUGIN, "--plan", str(scratch / "plan.json"), "--out", str(out)]
        try:
            p = subprocess.run(cmd, env=replay_env(scratch), cwd=scratch, capture_output=True, text=True,
                               timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return None, f"replay of segment {plan['segment']} exceeded {timeout_s} s"
        if p.returncode != 0 or not out.exists():
            last = [line for line in (p.stderr + p.stdout).splitlines() if line.strip()][-3:]
            return None, f"replay process failed (exit {p.returncode}): " + " | ".join(last)[-500:]
        try:
            result = json.loads(out.read_text())
        except ValueError as ex:
            return None, f"replay result unreadable ({ex})"
        return (result, "") if isinstance(result, dict) else (None, "replay result is not an object")


def compare(plan: dict[str, Any], result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, expected, found) for every part of the closed segment the replay did not reproduce."""
    want = plan["expect"]
    rows = [("weights root", want["weights_root"], result.get("weights_root")),
            ("optimizer root", want["optimizer_root"], result.get("optimizer_root")),
            ("optimizer step", want["optimizer_step"], result.get("optimizer_step")),
            ("sampler position_end", plan["position_end"], result.get("position_end"))]
    return [(what, str(w), str(f)) for what, w, f in rows if w != f]


def replayer(ctx, segments) -> Iterator:  # (Context, list[Entry]) -> Iterator[Finding]
    """The verifier's `replay` check body: one finding per chosen segment."""
    from attest.findings import Finding, short

    ckpts = ctx.of_kind("checkpoint")
    index = {id(e): i for i, e in enumerate(ckpts)}
    for e in segments:
        k, p = index[id(e)], e.predicate
        label = f"{ctx.where(e)} (step {p.get('step')})"
        try:
            plan = build_plan(ctx, k)
        except PlanError as ex:
            yield Finding("replay", False, label, "a segment whose every input is signed and consistent", str(ex)[:300])
            continue
        result, error = run_plan(plan)
        if error or result is None:
            yield Finding("replay", False, label, f"root {short(plan['expect']['weights_root'])}", "no result", error)
            continue
        differ = compare(plan, result)
        if differ:
            yield Finding("replay", False, label, "; ".join(f"{w} {short(a)}" for w, a, _ in differ),
                          "; ".join(f"{w} {short(b)}" for w, _, b in differ),
                          f"re-running segment {k} from its signed start state on its logged rows and config does not "
                          "reproduce the next checkpoint")
        else:
            yield Finding("replay", True, label, detail=f"segment {k} reproduced bit-exactly (weights and optimizer "
                          f"state) on {plan['world_size']} CPU rank(s)")


def register() -> None:
    from attest.checks_model import _DEFAULT_REPLAYER, REPLAYERS

    REPLAYERS[PLUGIN] = replayer
    _DEFAULT_REPLAYER[:] = [replayer]
