"""Segment replay from the verifier's side: choose segments, build their plans, run, compare.

The evaluator picks segments at random after receiving the bundle (`--replay N`, reproducible
with `--replay-seed S`; see attest.verify.checks.model.replay_segments), so a team cannot know which
segments will be re-run. The implementation that runs is this verifier's own `kai_train.replay`
(the bundle names none). For each chosen segment the verifier builds a closed plan from signed
statements only (attest.verify.replay_plan: bound files, schema-checked config) and runs the plug-in in a
separate process under torchrun with the world size the segment recorded, on CPU, in a fresh
scratch directory that is also its HOME and TMPDIR, with a minimal environment. The weights and
AdamW state it reaches must equal the next checkpoint's signed roots bit for bit, and it must
consume exactly the recorded sampler range. The plug-in needs torch and DeepSpeed (the `train`
extra); this module imports neither.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attest.plugins import REPLAY_PLUGIN
from attest.verify.replay_plan import PlanError, build_plan

PLUGIN = REPLAY_PLUGIN  # the one implementation this verifier runs
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


MODES = ("auto", "exact", "tolerance")
TOLERANCE_K = 8.0  # accept ||replayed - claimed|| up to K times the floor measured for that tensor
FLOOR_RATIO_MAX = 1e-2  # tolerance decides only when the floor is at most this fraction of the segment's update
DEFAULT_TOLERANCE_WORLDS = (1, 2)  # the two configurations whose difference is the measured floor


def run_plan(plan: dict[str, Any], timeout_s: int = 3600, scratch: Path | None = None
             ) -> tuple[dict[str, Any] | None, str]:
    """Run one plan in a scratch directory (a fresh one unless given); returns (the plug-in's result, error text)."""
    if scratch is None:
        with tempfile.TemporaryDirectory(prefix="kai-replay-") as tmp:
            return run_plan(plan, timeout_s, Path(tmp))
    scratch.mkdir(parents=True, exist_ok=True)
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


def compare(plan: dict[str, Any], result: dict[str, Any], exact: bool = True) -> list[tuple[str, str, str]]:
    """(what, expected, found) for every part of the closed segment the replay did not reproduce;
    without `exact`, only the parts that must agree in any mode (optimizer step, sampler end)."""
    want = plan["expect"]
    rows = [("weights root", want["weights_root"], result.get("weights_root")),
            ("optimizer root", want["optimizer_root"], result.get("optimizer_root"))] if exact else []
    rows += [("optimizer step", want["optimizer_step"], result.get("optimizer_step")),
             ("sampler position_end", plan["position_end"], result.get("position_end"))]
    return [(what, str(w), str(f)) for what, w, f in rows if w != f]


def choose_mode(ctx, target, asked: str) -> tuple[str, str]:
    """("exact" | "tolerance", why) for a segment, from what its checkpoint statement records
    (hardware class, deterministic settings, world size) and the evaluator's `--replay-mode`."""
    from attest.verify.findings import as_dict

    env = as_dict(target.predicate.get("environment"))
    det, hw = as_dict(env.get("determinism")), as_dict(env.get("hardware"))
    accel = det.get("accelerator") if det else ("cpu" if "gpu" in hw and hw.get("gpu") is None else "unrecorded")
    world = as_dict(as_dict(target.predicate.get("data_consumed")).get("sampler")).get("world_size")
    blockers = []
    if accel != "cpu":
        blockers.append(f"trained on {str(accel)[:60]}, replayed on cpu")
    if det and det.get("deterministic_algorithms") is not True:
        blockers.append("deterministic algorithms were off")
    if not (isinstance(world, int) and 1 <= world <= ctx.policy.limits["max_replay_ranks"]):
        blockers.append(f"recorded on {str(world)[:12]} ranks (limits.max_replay_ranks "
                        f"{ctx.policy.limits['max_replay_ranks']})")
    if asked == "tolerance":
        return "tolerance", "asked for (--replay-mode tolerance)"
    if asked == "exact":
        return "exact", "; ".join(blockers) if blockers else "same hardware class and world size as recorded"
    if blockers:
        return "tolerance", "; ".join(blockers)
    return "exact", "same hardware class, world size and deterministic settings as recorded"


def tolerance_decision(a: dict[str, Any], b: dict[str, Any], k: float = TOLERANCE_K,
                       ratio_max: float = FLOOR_RATIO_MAX) -> dict[str, Any]:
    """Accept a claimed end state within tolerance only if, tensor by tensor, both replays sit within
    k times the floor the verifier measured (the two replays' difference) and that floor is far below
    the segment's own update. `a`, `b`: {tensor: [||R-C||, ||C-S||, ||C||, ||R-other||]} of the two replays.

    The floor of a tensor is max(f, r*u): f = ||A - B||, u = ||C - S|| its update over the segment,
    r the median of f/u over all tensors (so a tensor whose two replays happen to agree bit for bit
    still gets the floor its update implies, not zero)."""
    names = sorted(set(a) | set(b))
    if set(a) != set(b) or not names:
        return {"ok": False, "why": f"the replays report different tensors ({len(a)} and {len(b)})"}
    ratios = sorted(b[n][3] / a[n][1] for n in names if a[n][1] > 0 and b[n][3] is not None)
    med = ratios[len(ratios) // 2] if ratios else 0.0
    worst, margin, exceed = "", 0.0, []
    floor2 = update2 = 0.0
    for n in names:
        d, u, f = max(a[n][0], b[n][0]), a[n][1], b[n][3] or 0.0
        floor = max(f, med * u)
        tau = k * floor
        m = d / tau if tau > 0 else (0.0 if d == 0 else math.inf)
        if m > margin:
            worst, margin = n, m
        if m > 1:
            exceed.append(n)
        floor2, update2 = floor2 + floor * floor, update2 + u * u
    floor_ratio = math.sqrt(floor2 / update2) if update2 > 0 else (0.0 if floor2 == 0 else math.inf)
    ok = not exceed and floor_ratio <= ratio_max
    why = (f"{len(exceed)} tensor(s) beyond {k:g}x the measured floor, worst {worst} at {margin:.3g}x" if exceed else
           f"noise floor {floor_ratio:.3g} of the segment's update exceeds {ratio_max:g}: tolerance cannot decide"
           if floor_ratio > ratio_max else "")
    # floor_ratio: ||floor|| / ||update|| over the whole state; drift_budget: the most a claimed state
    # can move per segment, relative to the segment's own update, and still be accepted.
    return {"ok": ok, "why": why, "k": k, "floor_ratio_max": ratio_max, "floor_ratio": floor_ratio,
            "median_floor_ratio": med, "drift_budget": k * floor_ratio, "margin": margin, "worst_tensor": worst,
            "exceeding": exceed[:10], "tensors": len(names)}


def first_divergence(plan: dict[str, Any], losses: Any, other: Any = None, k: float = TOLERANCE_K) -> str:
    """Where the segment's per-step commitments (the signed per-step losses) first differ from the
    replay's: exactly, or (with the other replay's losses) beyond k times the two replays' spread."""
    recorded = plan.get("step_losses")
    if recorded is None:
        return "the checkpoint records no per-step losses: divergence not localized"
    if not isinstance(losses, list) or len(losses) != len(recorded):
        return "the replay returned no per-step losses"
    base = plan["start_step"]
    for i, (want, got) in enumerate(zip(recorded, losses)):
        if other is None:
            differs = want != got
        else:
            spread = max(abs(got - other[i]), 1e-7 * abs(got))
            differs = abs(want - got) > k * spread
        if differs:
            return (f"first diverging step {base + i + 1}: loss {got!r} replayed, {want!r} signed "
                    f"(the weights after step {base + i} or the rows of step {base + i + 1} differ)")
    return (f"all {len(recorded)} per-step losses reproduced: the divergence is in the update of step "
            f"{base + len(recorded)} or in the stored state")


def replayer(ctx, segments) -> Iterator:  # (Context, list[Entry]) -> Iterator[Finding]
    """The verifier's `replay` check body: one finding per chosen segment."""
    from attest.verify.findings import Finding

    ckpts = ctx.of_kind("checkpoint")
    index = {id(e): i for i, e in enumerate(ckpts)}
    facts = ctx.facts.setdefault("replay", [])
    for e in segments:
        k, p = index[id(e)], e.predicate
        label = f"{ctx.where(e)} (step {p.get('step')})"
        mode, why = choose_mode(ctx, e, ctx.replay_mode)
        fact: dict[str, Any] = {"segment": k, "step": p.get("step"), "mode": mode, "mode_reason": why}
        facts.append(fact)
        try:
            plan = build_plan(ctx, k)
            if mode == "exact":
                finding = _exact(ctx, plan, label, fact)
            else:
                finding = _tolerance(ctx, k, label, fact)
        except PlanError as ex:
            finding = Finding("replay", False, label, "a segment whose every input is signed and consistent", str(ex)[:300])
        fact["ok"] = finding.ok
        yield finding


def _exact(ctx, plan: dict[str, Any], label: str, fact: dict[str, Any]):
    from attest.verify.findings import Finding, short

    if plan["world_size"] != plan["recorded_world"]:
        raise PlanError("exact replay runs at the recorded world size")
    fact["worlds"] = [plan["world_size"]]
    result, error = run_plan(plan)
    if error or result is None:
        return Finding("replay", False, label, f"root {short(plan['expect']['weights_root'])}", "no result", error)
    differ = compare(plan, result)
    if plan.get("step_losses") is not None and result.get("step_losses") != plan["step_losses"]:
        differ.append(("per-step losses", "the signed ones", "others"))
    if differ:
        where = fact["first_divergence"] = first_divergence(plan, result.get("step_losses"))
        return Finding("replay", False, label, "; ".join(f"{w} {short(a)}" for w, a, _ in differ),
                       "; ".join(f"{w} {short(b)}" for w, _, b in differ),
                       f"exact mode: re-running segment {plan['segment']} from its signed start state on its logged "
                       f"rows and config does not reproduce the next checkpoint; {where}")
    return Finding("replay", True, label, detail=f"segment {plan['segment']} reproduced bit-exactly (exact mode: "
                   f"weights, optimizer state, per-step losses) on {plan['world_size']} CPU rank(s)")


def _tolerance(ctx, k: int, label: str, fact: dict[str, Any]):
    """Two replays on other configurations (world sizes) than recorded: their difference is the
    noise floor; the claimed end state must sit within it, tensor by tensor."""
    from attest.verify.findings import Finding

    worlds = tuple(ctx.replay_worlds or DEFAULT_TOLERANCE_WORLDS)
    if len(set(worlds)) != 2:
        raise PlanError(f"tolerance mode replays on two different world sizes, not {worlds}")
    fact["worlds"] = list(worlds)
    with tempfile.TemporaryDirectory(prefix="kai-replay-") as tmp:
        results = []
        for i, w in enumerate(worlds):
            plan = build_plan(ctx, k, replay_world=w)
            plan["compare"] = {"claimed": plan["claimed"]}
            if i == 0:
                plan["compare"]["dump"] = str(Path(tmp) / "state-0")
            else:
                plan["compare"]["other"] = sorted(str(f) for f in (Path(tmp) / "state-0").glob("*.safetensors"))
            result, error = run_plan(plan, scratch=Path(tmp) / f"run-{i}")
            if error or result is None or not isinstance(result.get("tensors"), dict):
                return Finding("replay", False, label, f"a tolerance replay on {w} rank(s)", "no result",
                               error or "no per-tensor comparison returned")
            results.append((plan, result))
    (plan_a, a), (_, b) = results
    differ = compare(plan_a, a, exact=False) + compare(plan_a, b, exact=False)
    decision = tolerance_decision(a["tensors"], b["tensors"])
    fact["tolerance"] = {key: v for key, v in decision.items() if key != "ok"}
    fact["bit_exact"] = [r.get("weights_root") == plan_a["expect"]["weights_root"] for _, r in results]
    if differ or not decision["ok"]:
        where = fact["first_divergence"] = first_divergence(plan_a, a.get("step_losses"), b.get("step_losses"))
        what = "; ".join(f"{w} {f} (signed {x})" for w, x, f in differ) or decision["why"]
        return Finding("replay", False, label, f"the next checkpoint within {TOLERANCE_K:g}x the measured noise floor",
                       what[:300], f"tolerance mode on {worlds[0]} and {worlds[1]} rank(s); {where}")
    return Finding("replay", True, label, detail=(
        f"segment {k} reproduced within tolerance on {worlds[0]} and {worlds[1]} rank(s): every tensor within "
        f"{TOLERANCE_K:g}x the measured floor (margin {decision['margin']:.3g}; floor {decision['floor_ratio']:.2g} of "
        f"the segment's update, so at most {decision['drift_budget']:.2g} of it can drift unseen)"))


def register() -> None:
    from attest.verify.checks.model import _DEFAULT_REPLAYER, REPLAYERS

    REPLAYERS[PLUGIN] = replayer
    _DEFAULT_REPLAYER[:] = [replayer]
