"""Segment replay from the verifier's side: choose segments, run the replay plug-in, compare.

The evaluator picks segments at random after receiving the bundle (`--replay N`, reproducible
with `--replay-seed S`; see attest.checks_model.replay_segments), so a team cannot know which
segments will be re-run. Each chosen
segment is re-run by the allow-listed plug-in the run statement names, in a separate process under
torchrun with the world size the segment recorded, on CPU; the canonical digest it reaches must
equal the one the chain records, bit for bit. The plug-in needs torch and DeepSpeed (the `train`
extra); this module itself imports neither.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Plug-ins a run statement may name. Never run a module merely because a bundle names it.
PLUGINS = {"kai_train.replay"}
DEFAULT_PLUGIN = "kai_train.replay"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replay_segment(bundle: Path, segment: int, world_size: int, plugin: str = DEFAULT_PLUGIN,
                   timeout_s: int = 3600) -> tuple[str | None, str]:
    """Run one segment; returns (canonical digest reached or None, error text)."""
    if plugin not in PLUGINS:
        return None, f"replay plug-in {plugin!r} is not allow-listed ({sorted(PLUGINS)})"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
               "--master_port", str(_free_port()), "-m", plugin, str(bundle), "--segment", str(segment), "--out", str(out)]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None, f"replay of segment {segment} exceeded {timeout_s} s"
        if p.returncode != 0 or not out.exists():
            last = [line for line in (p.stderr + p.stdout).splitlines() if line.strip()][-3:]
            return None, f"replay process failed (exit {p.returncode}): " + " | ".join(last)[-500:]
        result = json.loads(out.read_text())
        if result.get("position_end") != result.get("expected_position_end"):
            return None, f"replay consumed positions up to {result.get('position_end')}, the chain says {result.get('expected_position_end')}"
        return str(result["root"]), ""


def replayer(ctx, segments) -> Iterator:  # (Context, list[Entry]) -> Iterator[Finding]
    """The `kai_train.replay` replayer for the verifier's `replay` check: one finding per segment."""
    from attest.findings import Finding, short

    ckpts = ctx.of_kind("checkpoint")
    index = {id(e): i for i, e in enumerate(ckpts)}
    for e in segments:
        k, p = index[id(e)], e.predicate
        sampler = p.get("data_consumed", {}).get("sampler", {}) if isinstance(p.get("data_consumed"), dict) else {}
        world = sampler.get("world_size")
        label = f"{ctx.where(e)} (step {p.get('step')})"
        if not isinstance(world, int) or world < 1:
            yield Finding("replay", False, label, "a recorded world size", repr(world))
            continue
        found, error = replay_segment(ctx.root, k, world, DEFAULT_PLUGIN)
        want = str(p.get("weights_root"))
        if error:
            yield Finding("replay", False, label, f"root {short(want)}", "no result", error)
        elif found != want:
            yield Finding("replay", False, label, f"root {short(want)}", f"root {short(found)}",
                          f"re-running segment {k} on its logged rows and config does not reproduce the checkpoint")
        else:
            yield Finding("replay", True, label, detail=f"segment {k} reproduced bit-exactly on {world} CPU rank(s)")


def register() -> None:
    from attest.checks_model import REPLAYERS

    REPLAYERS[DEFAULT_PLUGIN] = replayer
