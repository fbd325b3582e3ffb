"""Segment replay from the verifier's side: choose segments, build their plans, run, compare.

The evaluator draws segments at random after receiving the bundle (by default one, `--replay N`,
reproducible with `--replay-seed S`), and the last segment is always added (see
attest.verify.checks.model.replay_segments), so a team cannot know which segments will be re-run.
The implementation that runs is this verifier's own `kai_train.replay` (the bundle names none). For
each chosen segment the verifier builds a closed plan from signed statements only
(attest.verify.replay_plan: bound files, schema-checked config, the segment's own recorded layout,
its cost checked against the policy's limits before launch) and runs the plug-in in a separate
process under torchrun with the world size the segment recorded, on CPU, in a fresh scratch
directory that is also its HOME and TMPDIR, with an environment the evaluator's shell does not
reach (thread counts pinned to what the segment's training recorded). The weights and AdamW state
it reaches must equal the next checkpoint's signed roots bit for bit, and it must consume exactly
the recorded sampler range.

Exact replay comes first for every segment, whatever its statement claims about its hardware.
Only when it does not reproduce the segment do two tolerance replays measure a noise floor; the
segment then fails if the claimed state or a signed per-step loss lies beyond it, and passes only
within the evaluator's drift budget (`--max-drift`); otherwise it is not decided (INCOMPLETE).

A mixture-of-experts segment also signs a digest of each step's routing per MoE layer; a replay that
recomputes other routing is named by the first step and layer that differ. Tolerance mode cannot
bound such a segment (a routing flip moves the state discontinuously, so the difference of two
replays is no noise floor, and the signed routing is a digest, not routing a replay could follow):
an MoE segment that exact replay does not reproduce is not decided, unless the replay reproduced its
whole state bit for bit (then the signed commitments that differ are false: FAIL). The plug-in
needs torch and DeepSpeed (the `train` extra); this module imports neither.
"""

from __future__ import annotations

import dataclasses
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
# reach it, but a stray LD_PRELOAD, PYTHONSTARTUP, thread count or DeepSpeed variable of the
# evaluator's shell should not change a replay either). Thread counts are set from what the
# segment's training recorded (PINNED_ENV), never passed through.
PASS_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "TORCH_EXTENSIONS_DIR", "SYSTEMROOT")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")
# Fixed whatever the evaluator's shell holds. Math-library switches that change rounding (MKL_CBWR,
# allocator settings) are not passed through at all: the replay runs with the libraries' defaults, as
# training under the operator's guide does; the determinism flags are set by kai_train.determinism.
PINNED_ENV = {"PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


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


def replay_env(scratch: Path, threads: int = 1) -> dict[str, str]:
    """The replay process's whole environment: a few variables passed through, the rest pinned
    (thread counts to the `threads` the segment's training ran with)."""
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update(PINNED_ENV)
    env.update({k: str(threads) for k in THREAD_VARS})
    return {**env, "HOME": str(scratch), "TMPDIR": str(scratch), "DS_ACCELERATOR": "cpu",
            "PYTHONDONTWRITEBYTECODE": "1", "WANDB_MODE": "disabled"}


# auto: exact at the recorded layout, then tolerance when exact does not reproduce; exact: exact only;
# tolerance: exact, and the tolerance replays measured in any case (their figures in the report).
MODES = ("auto", "exact", "tolerance")
TOLERANCE_K = 8.0  # accept ||replayed - claimed|| up to K times the floor measured for that tensor
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
        p = subprocess.run(cmd, env=replay_env(scratch, int(plan.get("threads", 1))), cwd=scratch, capture_output=True, text=True,
                           timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"replay of segment {plan['segment']} exceeded {timeout_s} s"
    if p.returncode != 0 or not out.exists():
        last = [line for line in (p.stderr + p.stdout).splitlines() if line.strip()][-3:]
        return None, f"replay process failed (exit {p.returncode}): " + " | ".join(last)[-500:]
    return read_result(out)


def read_result(out: Path) -> tuple[dict[str, Any] | None, str]:
    """The result file the verifier's own replay process wrote (in its scratch folder): (result, error)."""
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError) as ex:
        return None, f"replay result unreadable ({ex})"
    return (result, "") if isinstance(result, dict) else (None, "replay result is not an object")


def layout_key(plan: dict[str, Any]) -> str:
    """Plans with the same key can share one launch: world size, expert parallelism, threads and
    determinism settings."""
    return json.dumps([plan["world_size"], plan["train"].get("expert_parallel", 1), plan.get("threads", 1),
                       plan.get("determinism")], sort_keys=True)


def run_plans(plans: list[dict[str, Any]], timeout_s: int = 3600) -> list[tuple[dict[str, Any] | None, str]]:
    """Run plans of one layout (`layout_key`) in one launch, the process start paid once; a plan whose
    result that launch did not give (it failed or ran out of time first) runs again on its own, so one
    segment's failure is never another's. Returns (result, error) per plan, in order."""
    if len(plans) < 2:
        return [run_plan(p, timeout_s) for p in plans]
    assert len({layout_key(p) for p in plans}) == 1, "plans of one layout only"
    out: list[tuple[dict[str, Any] | None, str] | None] = [None] * len(plans)
    with tempfile.TemporaryDirectory(prefix="kai-replay-") as tmp:
        scratch = Path(tmp)
        (scratch / "plans.json").write_text(json.dumps({"plans": plans}))
        results = scratch / "results"
        results.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(plans[0]["world_size"]), "-m", PLUGIN, "--plan", str(scratch / "plans.json"), "--out", str(results)]
        try:
            subprocess.run(cmd, env=replay_env(scratch, int(plans[0].get("threads", 1))), cwd=scratch,
                           capture_output=True, text=True, timeout=timeout_s * len(plans), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
        for i in range(len(plans)):
            got, _ = read_result(results / f"result-{i}.json")
            if got is not None:
                out[i] = (got, "")
    return [r if r is not None else run_plan(p, timeout_s) for p, r in zip(plans, out)]


def compare(plan: dict[str, Any], result: dict[str, Any], exact: bool = True) -> list[tuple[str, str, str]]:
    """(what, expected, found) for every part of the closed segment the replay did not reproduce;
    without `exact`, only the parts that must agree in any mode (optimizer step, sampler end)."""
    want = plan["expect"]
    rows = [("weights root", want["weights_root"], result.get("weights_root")),
            ("optimizer root", want["optimizer_root"], result.get("optimizer_root"))] if exact else []
    rows += [("optimizer step", want["optimizer_step"], result.get("optimizer_step")),
             ("sampler position_end", plan["position_end"], result.get("position_end"))]
    return [(what, str(w), str(f)) for what, w, f in rows if w != f]


def claimed_environment(target) -> str:
    """What the segment's checkpoint statement says it ran on (reported, never used to choose a mode)."""
    from attest.verify.findings import as_dict

    env = as_dict(target.predicate.get("environment"))
    det, hw = as_dict(env.get("determinism")), as_dict(env.get("hardware"))
    accel = det.get("accelerator") if det else ("cpu" if "gpu" in hw and hw.get("gpu") is None else "unrecorded")
    return str(accel)[:80]


def tolerance_decision(a: dict[str, Any], b: dict[str, Any], k: float = TOLERANCE_K) -> dict[str, Any]:
    """Whether a claimed end state sits, tensor by tensor, within k times the floor the verifier
    measured (the two replays' difference), and how much drift that admits. `a`, `b`: {tensor:
    [||R-C||, ||C-S||, ||C||, ||R-other||]} of the two replays.

    The floor of a tensor is max(f, r*u): f = ||A - B||, u = ||C - S|| its update over the segment,
    r the median of f/u over all tensors (so a tensor whose two replays happen to agree bit for bit
    still gets the floor its update implies, not zero). `drift_budget` is k × ||floor|| / ||update||
    over the whole state, `tensor_budget` the largest k × floor / update of one tensor: how far, as a
    fraction of the segment's own update, a claimed state could be moved and still sit within. The
    evaluator's --max-drift must bound both for tolerance to accept (`tolerance_outcome`)."""
    names = sorted(set(a) | set(b))
    if set(a) != set(b) or not names:
        return {"ok": False, "why": f"the replays report different tensors ({len(a)} and {len(b)})"}
    ratios = sorted(b[n][3] / a[n][1] for n in names if a[n][1] > 0 and b[n][3] is not None)
    med = ratios[len(ratios) // 2] if ratios else 0.0
    worst, margin, exceed = "", 0.0, []
    floor2 = update2 = 0.0
    tensor_budget, loosest = 0.0, ""
    for n in names:
        d, u, f = max(a[n][0], b[n][0]), a[n][1], b[n][3] or 0.0
        floor = max(f, med * u)
        tau = k * floor
        m = d / tau if tau > 0 else (0.0 if d == 0 else math.inf)
        if m > margin:
            worst, margin = n, m
        if m > 1:
            exceed.append(n)
        tb = tau / u if u > 0 else (0.0 if tau == 0 else math.inf)
        if tb > tensor_budget:
            tensor_budget, loosest = tb, n
        floor2, update2 = floor2 + floor * floor, update2 + u * u
    floor_ratio = math.sqrt(floor2 / update2) if update2 > 0 else (0.0 if floor2 == 0 else math.inf)
    why = f"{len(exceed)} tensor(s) beyond {k:g}x the measured floor, worst {worst} at {margin:.3g}x" if exceed else ""
    return {"ok": not exceed, "why": why, "k": k, "floor_ratio": floor_ratio,
            "median_floor_ratio": med, "drift_budget": k * floor_ratio, "tensor_budget": tensor_budget,
            "loosest_tensor": loosest, "margin": margin, "worst_tensor": worst, "exceeding": exceed[:10],
            "tensors": len(names)}


def losses_within(plan: dict[str, Any], a: Any, b: Any, k: float = TOLERANCE_K) -> tuple[bool | None, str]:
    """The signed per-step losses against two tolerance replays: (True, "") when each sits within k
    times the replays' spread; (False, where it first does not); (None, why) when not checkable."""
    recorded = plan.get("step_losses")
    if recorded is None:
        return None, "the checkpoint records no per-step losses to check"
    if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b) == len(recorded)):
        return None, "a replay returned no per-step losses"
    where = first_divergence(plan, a, b, k)
    return (False, where) if where.startswith("first diverging") else (True, "")


def tolerance_outcome(decision: dict[str, Any], losses_ok: bool | None, max_drift: float | None) -> tuple[str, str]:
    """("fail" | "undecided" | "pass", why) for a segment exact replay did not reproduce. A state
    beyond the measured floor, or a signed loss beyond the replays' spread, fails; otherwise it passes
    only when the evaluator set a drift budget (--max-drift) that the measured budgets fit in: a
    config noisier than the evaluator's budget cannot pass, and without a budget tolerance never does."""
    if not decision.get("ok"):
        return "fail", decision.get("why") or "tolerance replays disagree"
    if losses_ok is False:
        return "fail", "a signed per-step loss beyond the replays' spread"
    budget = max(decision["drift_budget"], decision["tensor_budget"])
    measured = (f"tolerance admits drift up to {decision['drift_budget']:.3g} of the segment's update overall and "
                f"{decision['tensor_budget']:.3g} for one tensor ({decision['loosest_tensor'][:60]})")
    if losses_ok is None:
        return "undecided", f"{measured}; per-step losses not checkable"
    if max_drift is None:
        return "undecided", f"{measured}; no drift budget set (--max-drift), so tolerance cannot pass"
    if budget > max_drift:
        return "undecided", f"{measured}: more than the budget {max_drift:g} (--max-drift); this config's own noise is too large to decide"
    return "pass", f"{measured}, within the budget {max_drift:g} (--max-drift)"


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


def layer_label(name: str) -> str:
    """`text.layers.3.mlp` -> `layer 3 (text.layers.3.mlp)`: the decoder block, then the module."""
    import re

    m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
    return f"layer {m.group(1)} ({name[:80]})" if m else f"layer {name[:80]}"


def first_routing_difference(plan: dict[str, Any], result: Any) -> str | None:
    """Where the replay's routing digests first differ from the signed ones (step order, then layer
    order within a step): "segment k: routing differs first at step s, layer l (name)"; None when
    every one agrees or the checkpoint signs none (a dense model, or a statement older than them)."""
    want = plan.get("routing")
    if want is None:
        return None
    seg, base = plan["segment"], plan["start_step"]
    got = result.get("routing") if isinstance(result, dict) else None
    if not isinstance(got, dict) or not isinstance(steps := got.get("steps"), list):
        return f"segment {seg}: the replay returned no routing digests"
    if got.get("layers") != want["layers"]:
        return (f"segment {seg}: the replay routes in MoE layers {str(got.get('layers'))[:120]}, the signed "
                f"routing names {str(want['layers'])[:120]}")
    for i, signed in enumerate(want["steps"]):
        replayed = steps[i] if i < len(steps) and isinstance(steps[i], list) else []
        for j, name in enumerate(want["layers"]):
            if j >= len(replayed) or replayed[j] != signed[j]:
                return f"segment {seg}: routing differs first at step {base + i + 1}, {layer_label(name)}"
    if len(steps) != len(want["steps"]):
        return f"segment {seg}: the replay returned routing for {len(steps)} steps, {len(want['steps'])} signed"
    return None


MOE_TOLERANCE = ("tolerance mode cannot bound a mixture-of-experts segment (a routing flip moves the state "
                 "discontinuously, so two replays' difference is no noise floor, and the signed routing is a "
                 "digest, not routing a replay could follow)")


def _moe_not_exact(plan: dict[str, Any], label: str, fact: dict[str, Any], finding, result: Any):
    """An MoE segment where tolerance would run: no tolerance replays. Exact's pass stands; so does its
    failure when the replay produced no result, reached the whole signed state bit for bit (the
    differing signed commitments are then false) or another optimizer step or sampler end (these
    agree in any mode). Otherwise: not decided, saying where the routing first differs."""
    from attest.verify.findings import undecided

    fact["tolerance"] = {"outcome": "not run", "why": MOE_TOLERANCE}
    if finding.ok or result is None or fact.get("state_reproduced") or compare(plan, result, exact=False):
        return finding
    where = fact.get("first_routing_difference") or fact.get("first_divergence") or ""
    return undecided("replay", label, f"exact replay did not reproduce segment {plan['segment']} ({where}); "
                     f"{MOE_TOLERANCE}, so only an exact replay decides it")


def replayer(ctx, segments) -> Iterator:  # (Context, list[Entry]) -> Iterator[Finding]
    """The verifier's `replay` check body: one finding per chosen segment. Every segment is replayed
    exactly at the layout it recorded first, whatever its statement claims about its hardware; only
    when that does not reproduce it (and --replay-mode is not exact) do two tolerance replays measure
    the noise floor, and tolerance then passes only within the evaluator's drift budget."""
    from attest.verify.findings import Finding, undecided
    from attest.verify.replay_plan import ReplayUndecided

    ckpts = ctx.of_kind("checkpoint")
    index = {id(e): i for i, e in enumerate(ckpts)}
    facts = ctx.facts.setdefault("replay", [])
    # every plan first (what it costs is checked before any process starts), then the exact replays of
    # one layout in one launch each
    plans: dict[int, dict[str, Any] | Exception] = {}
    for e in segments:
        try:
            plans[index[id(e)]] = build_plan(ctx, index[id(e)])
        except (ReplayUndecided, PlanError) as ex:
            plans[index[id(e)]] = ex
    exact_results = _exact_batches(ctx, [p for p in plans.values() if isinstance(p, dict)])
    for e in segments:
        k, p = index[id(e)], e.predicate
        label = f"{ctx.where(e)} (step {p.get('step')})"
        fact: dict[str, Any] = {"segment": k, "step": p.get("step"), "mode": "exact",
                                "claimed_hardware": claimed_environment(e)}
        facts.append(fact)
        try:
            plan = plans[k]
            if isinstance(plan, Exception):
                raise plan
            fact["layout"] = {"world_size": plan["world_size"], "grad_accum": plan["train"]["grad_accum"],
                              "micro_batch": plan["train"]["micro_batch"], "threads": plan["threads"]}
            fact["cost"] = plan["cost"]
            fact["determinism"] = plan["determinism"]["mode"]
            finding, result = _exact(ctx, plan, label, fact, exact_results.get(k))
            if plan.get("moe") and (ctx.replay_mode == "tolerance" or (not finding.ok and ctx.replay_mode != "exact")):
                finding = _moe_not_exact(plan, label, fact, finding, result)
            elif ctx.replay_mode == "tolerance" or (not finding.ok and ctx.replay_mode != "exact"):
                exact_ok, tol = finding.ok, _tolerance(ctx, k, label, fact, plan, result)
                if not finding.ok and not tol.ok and not tol.skipped:  # both fail: the exact difference is the precise one
                    finding = Finding("replay", False, label, finding.expected, finding.found,
                                      f"{finding.detail}; tolerance mode fails too ({tol.found}; {tol.detail})"[:900])
                elif not finding.ok:
                    finding = tol
                if fact["determinism"] == "fast" and not exact_ok:  # the run said its kernels were not deterministic
                    finding = dataclasses.replace(finding, detail=(
                        f"trained with determinism=fast (non-deterministic kernels), so decided in tolerance mode; "
                        f"{finding.detail}")[:900])
        except ReplayUndecided as ex:
            finding = undecided("replay", label, str(ex)[:400])
        except PlanError as ex:
            finding = Finding("replay", False, label, "a segment whose every input is signed and consistent", str(ex)[:300])
        fact["ok"] = finding.ok
        fact["outcome"] = "pass" if finding.ok else "undecided" if finding.skipped else "fail"
        yield finding


def _timeout(ctx) -> int:
    return int(ctx.policy.limits.get("replay_timeout_s", 3600))


def _exact_batches(ctx, plans: list[dict[str, Any]]) -> dict[int, tuple[dict[str, Any] | None, str]]:
    """segment -> (result, error) of its exact replay, the plans of one layout run in one launch."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for plan in plans:
        if plan["world_size"] == plan["recorded_world"]:
            groups.setdefault(layout_key(plan), []).append(plan)
    out: dict[int, tuple[dict[str, Any] | None, str]] = {}
    for group in groups.values():
        for plan, got in zip(group, run_plans(group, _timeout(ctx))):
            out[plan["segment"]] = got
    return out


def _exact(ctx, plan: dict[str, Any], label: str, fact: dict[str, Any],
           done: tuple[dict[str, Any] | None, str] | None = None):
    """(finding, the replay's result or None) for one exact replay at the recorded layout (`done`: its
    result, when it ran in a batch)."""
    from attest.verify.findings import Finding, short
    from attest.verify.replay_plan import ReplayUndecided

    if plan["world_size"] != plan["recorded_world"]:
        raise PlanError("exact replay runs at the recorded world size")
    fact["worlds"] = [plan["world_size"]]
    result, error = done if done is not None else run_plan(plan, _timeout(ctx))
    if error or result is None:
        if "exceeded" in error:  # the policy's time limit, not a wrong segment
            raise ReplayUndecided(f"{error} (policy limits.replay_timeout_s; raise it to replay this segment)")
        return Finding("replay", False, label, f"root {short(plan['expect']['weights_root'])}", "no result", error), None
    differ = compare(plan, result)
    fact["state_reproduced"] = not differ
    routing = first_routing_difference(plan, result)
    if routing is not None:  # named first: the routing of a mixture of experts diverges before its state does
        fact["first_routing_difference"] = routing
        differ.insert(0, ("routing", "signed", "other"))
    if plan.get("step_losses") is not None and result.get("step_losses") != plan["step_losses"]:
        differ.append(("per-step losses", "the signed ones", "others"))
    fact["bit_exact"] = not differ
    if differ:
        where = fact["first_divergence"] = first_divergence(plan, result.get("step_losses"))
        return Finding("replay", False, label, "; ".join(f"{w} {short(a)}" for w, a, _ in differ),
                       "; ".join(f"{w} {short(b)}" for w, _, b in differ),
                       (f"{routing}; " if routing else "") + f"exact mode: re-running segment {plan['segment']} from "
                       f"its signed start state on its logged rows and config does not reproduce the next checkpoint; "
                       f"{where}"), result
    lay = fact["layout"]
    what = "weights, optimizer state, per-step losses" + (", routing per MoE layer" if plan.get("routing") else "")
    return Finding("replay", True, label, detail=f"segment {plan['segment']} reproduced bit-exactly (exact mode: "
                   f"{what}) at its recorded layout: {plan['world_size']} CPU "
                   f"rank(s), grad_accum {lay['grad_accum']}, micro_batch {lay['micro_batch']}, "
                   + (f"experts split over {ep} ranks, " if (ep := plan["train"].get("expert_parallel", 1)) > 1 else "")
                   + f"{lay['threads']} thread(s) per rank"), result


def _tolerance(ctx, k: int, label: str, fact: dict[str, Any], exact_plan: dict[str, Any], exact_result: Any):
    """Two replays on other configurations (world sizes) than recorded: their difference is the
    noise floor; the claimed end state must sit within it, tensor by tensor, and the signed per-step
    losses within the replays' spread; then `tolerance_outcome` decides against the drift budget."""
    from attest.verify.findings import Finding, undecided

    worlds = tuple(ctx.replay_worlds or DEFAULT_TOLERANCE_WORLDS)
    if len(set(worlds)) != 2:
        raise PlanError(f"tolerance mode replays on two different world sizes, not {worlds}")
    fact["tolerance_worlds"] = list(worlds)
    with tempfile.TemporaryDirectory(prefix="kai-replay-") as tmp:
        results = []
        for i, w in enumerate(worlds):
            plan = build_plan(ctx, k, replay_world=w)
            plan["compare"] = {"claimed": plan["claimed"]}
            if i == 0:
                plan["compare"]["dump"] = str(Path(tmp) / "state-0")
            else:
                plan["compare"]["other"] = sorted(str(f) for f in (Path(tmp) / "state-0").glob("*.safetensors"))
            result, error = run_plan(plan, _timeout(ctx), scratch=Path(tmp) / f"run-{i}")
            if error or result is None or not isinstance(result.get("tensors"), dict):
                return Finding("replay", False, label, f"a tolerance replay on {w} rank(s)", "no result",
                               error or "no per-tensor comparison returned")
            results.append((plan, result))
    (plan_a, a), (_, b) = results
    differ = compare(plan_a, a, exact=False) + compare(plan_a, b, exact=False)
    decision = tolerance_decision(a["tensors"], b["tensors"])
    losses_ok, loss_where = losses_within(plan_a, a.get("step_losses"), b.get("step_losses"))
    outcome, why = tolerance_outcome(decision, losses_ok, ctx.max_drift)
    if differ:
        outcome, why = "fail", "; ".join(f"{w} {f} (signed {x})" for w, x, f in differ)
    fact["tolerance"] = {key: v for key, v in decision.items() if key != "ok"}
    fact["tolerance"].update({"max_drift": ctx.max_drift, "losses_within_spread": losses_ok, "outcome": outcome})
    fact["tolerance_bit_exact"] = [r.get("weights_root") == plan_a["expect"]["weights_root"] for _, r in results]
    if not fact.get("bit_exact"):  # the segment's mode is the one that decided it
        fact["mode"] = "tolerance" if outcome == "pass" else "exact, then tolerance"
    where = loss_where or fact.get("first_divergence") or first_divergence(plan_a, a.get("step_losses"), b.get("step_losses"))
    if outcome == "fail":
        fact["first_divergence"] = where
        return Finding("replay", False, label, f"the next checkpoint within {TOLERANCE_K:g}x the measured noise floor "
                       "and the signed per-step losses within the replays' spread", why[:300],
                       f"exact replay differs, tolerance mode on {worlds[0]} and {worlds[1]} rank(s); {where}")
    if outcome == "undecided":
        return undecided("replay", label, f"exact replay did not reproduce segment {k} (claimed hardware "
                         f"{fact['claimed_hardware']}); within tolerance on {worlds[0]} and {worlds[1]} rank(s), but "
                         f"{why}")
    return Finding("replay", True, label, detail=(
        f"segment {k} not bit-exact; reproduced within tolerance on {worlds[0]} and {worlds[1]} rank(s): every tensor "
        f"within {TOLERANCE_K:g}x the measured floor (margin {decision['margin']:.3g}), per-step losses within the "
        f"replays' spread; {why}"))


def register() -> None:
    from attest.verify.checks.model import _DEFAULT_REPLAYER, REPLAYERS

    REPLAYERS[PLUGIN] = replayer
    _DEFAULT_REPLAYER[:] = [replayer]
