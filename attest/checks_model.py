"""Verifier checks on the model: genesis re-derivation, the training trajectory (update norms per
segment), the release, and the replay hook (segment replay plug-ins register in REPLAYERS)."""

from __future__ import annotations

import importlib
import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from attest import trajectory as traj
from attest.bundle import BundlePathError
from attest.chain import Entry
from attest.digest import merkle_root
from attest.findings import (
    CHAIN_NAME,
    UNREADABLE,
    Context,
    Finding,
    as_dict,
    short,
    skipped,
    weights_files,
)
from attest.verify_cache import PARALLEL_BYTES, workers

# Genesis derivers a bundle may name. Never import a module merely because a bundle names it.
DERIVERS = {"kai_train.genesis:derive": "kai_train.genesis", "kai_train.initspec:derive": "kai_train.initspec"}

# Segment replay plug-ins by name (attest.replay registers its replayer here). A replayer gets the Context
# and the checkpoint entries of the segments to replay (chosen by `replay_segments`), and yields
# `replay` findings, one per segment: ok when re-running the segment from W_k on the recorded
# data and config reproduces W_{k+1}'s canonical digest.
Replayer = Callable[["Context", list[Entry]], Iterator["Finding"]]
REPLAYERS: dict[str, Replayer] = {}
DEFAULT_REPLAY_PLUGIN = "kai_train.replay"  # what attest.replay.DEFAULT_PLUGIN names


def check_genesis(ctx: Context) -> Iterator[Finding]:
    """Re-derive the initial weights from the committed recipe, tensor by tensor."""
    gens = ctx.of_kind("genesis")
    if len(gens) != 1:
        yield skipped("genesis", CHAIN_NAME, f"{len(gens)} genesis statements (statement-order reports it)")
        return
    g = gens[0]
    if "signature" in ctx.failed:  # cheap first: no derivation work for a statement nobody vouches for
        yield skipped("genesis", ctx.where(g), "not re-derived: a signature check failed (signature reports it)")
        return
    pred = g.predicate
    recipe = as_dict(pred.get("recipe"))
    if ctx.of_kind("run"):
        want_seed = ctx.run_config.get("seed")
        if recipe.get("seed") != want_seed:
            yield Finding("genesis", False, ctx.where(g), f"seed {want_seed} (run config)", f"seed {recipe.get('seed')}")
            return
    module = DERIVERS.get(str(recipe.get("deriver")))
    if module is None:
        yield Finding("genesis", False, ctx.where(g), f"a known deriver {sorted(DERIVERS)}", repr(recipe.get("deriver"))[:100])
        return
    try:
        mod = importlib.import_module(module)
    except ImportError as ex:
        yield skipped("genesis", ctx.where(g), f"the {recipe.get('name')!r} deriver needs torch: install kai-train[train] "
                      f"to re-derive this genesis ({ex})")
        return
    derive: Callable[[dict[str, Any]], Iterator[tuple[str, str]]] = mod.derive
    # Bounded always: refuse before generating when the recipe's model is larger than the policy allows.
    limit = ctx.policy.limits.get("max_genesis_params", 20_000_000_000)
    counter = getattr(mod, "param_count", None)
    try:
        count = counter(recipe) if counter is not None else None
    except Exception as ex:  # noqa: BLE001 - hostile recipe
        yield Finding("genesis", False, ctx.where(g), "a recipe the deriver accepts", f"{type(ex).__name__}: {str(ex)[:200]}")
        return
    if count is not None and count > limit:
        yield Finding("genesis", False, ctx.where(g), f"at most {limit:,} parameters to re-derive (policy limits.max_genesis_params)",
                      f"{count:,}", detail="raise limits.max_genesis_params in a --policy file to re-derive a genesis this large")
        return
    recorded = as_dict(pred.get("tensors"))
    leaves: dict[str, str] = {}
    try:
        for name, leaf in derive(recipe):
            leaves[name] = leaf
    except Exception as ex:  # noqa: BLE001 - the recipe is hostile input to the deriver: any error is a failure
        yield Finding("genesis", False, ctx.where(g), "a recipe the deriver accepts", f"{type(ex).__name__}: {str(ex)[:200]}")
        return
    differ = sorted(n for n in leaves if as_dict(recorded.get(n)).get("digest") != leaves[n])
    differ += sorted(set(recorded) - set(leaves))
    root = merkle_root(leaves)
    if differ or root != pred.get("weights_root"):
        shown = ", ".join(differ[:4]) + (f" … (+{len(differ) - 4})" if len(differ) > 4 else "")
        yield Finding(
            "genesis", False, ctx.where(g), f"root {short(root)} re-derived from seed {recipe.get('seed')}",
            f"root {short(pred.get('weights_root'))}",
            detail=f"{len(differ)} of {len(leaves)} tensors differ: {traj.by_component(differ)}" + (f" [{shown}]" if differ else ""),
        )
        ctx.facts["genesis_differs"] = differ
        return
    yield Finding("genesis", True, ctx.where(g), detail=f"{len(leaves)} tensors re-derived from seed {recipe.get('seed')}")


def _weight_sets(ctx: Context) -> list[tuple[Entry, int]]:
    """Genesis then checkpoints, as (entry, step), in chain order."""
    out = [(e, 0) for e in ctx.of_kind("genesis")[:1]]
    out += [(e, e.predicate["step"]) for e in ctx.of_kind("checkpoint") if isinstance(e.predicate.get("step"), int)]
    return out


def _bytes_of(ctx: Context, e: Entry) -> int:
    total = 0
    for f in weights_files(e):
        try:
            total += ctx.files.path(f).stat().st_size
        except (FileNotFoundError, BundlePathError, OSError):
            pass
    return total


def _optimizer(ctx: Context) -> tuple[float | None, float, float, float]:
    """(peak lr, beta1, beta2, weight decay) from the run config, lr also from checkpoint metrics."""
    train = as_dict(ctx.run_config.get("train"))
    lrs = [x for x in [train.get("lr")] + [as_dict(e.predicate.get("metrics")).get("lr") for e in ctx.of_kind("checkpoint")]
           if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0]
    betas = train.get("betas")
    b1, b2 = (float(betas[0]), float(betas[1])) if isinstance(betas, list) and len(betas) == 2 and all(
        isinstance(b, (int, float)) for b in betas) else (0.9, 0.999)
    wd = train.get("weight_decay")
    return (max(lrs) if lrs else None), b1, b2, float(wd) if isinstance(wd, (int, float)) and wd >= 0 else 0.0


def check_trajectory(ctx: Context) -> Iterator[Finding]:
    """Per segment W_k -> W_{k+1}: the update norm, streamed from the safetensors files, within what
    AdamW can move in that many steps, and not an outlier against the run's other segments."""
    sets = _weight_sets(ctx)
    if len(sets) < 2:
        yield skipped("trajectory", CHAIN_NAME, "no checkpoint after genesis")
        return
    lr_max, b1, b2, wd = _optimizer(ctx)
    try:
        ratio = traj.adam_ratio_bound(b1, b2, max(s for _, s in sets))
    except ValueError as ex:
        ratio, lr_max = 0.0, None
        ctx.notes.append(f"trajectory: {ex}; the optimizer bound is not applied")
    pairs = list(zip(sets, sets[1:]))

    def delta(pair: tuple[tuple[Entry, int], tuple[Entry, int]]) -> traj.SegmentDelta | str:
        (a, _), (b, _) = pair
        try:
            return traj.segment_delta([ctx.files.path(f) for f in weights_files(a)],
                                      [ctx.files.path(f) for f in weights_files(b)])
        except UNREADABLE as ex:
            return str(ex)

    if sum(_bytes_of(ctx, b) for _, (b, _) in pairs) > PARALLEL_BYTES:
        with ThreadPoolExecutor(workers()) as pool:
            deltas = list(pool.map(delta, pairs))
    else:
        deltas = [delta(p) for p in pairs]
    rows: list[dict[str, Any]] = []
    bad = 0
    genesis_failed = "genesis" in ctx.failed
    for ((a, sa), (b, sb)), d in zip(pairs, deltas):
        seg = f"step {sa}→{sb}"
        where = ",".join(weights_files(b)) or ctx.where(b)
        if isinstance(d, str) or not weights_files(a) or not weights_files(b):
            why = d if isinstance(d, str) else "a statement names no weights file"
            yield skipped("trajectory", where, f"{seg} not measured: {why} (weights-digest reports it)")
            continue
        steps = sb - sa
        if steps <= 0:
            yield skipped("trajectory", where, f"{seg} not judged: steps do not increase (statement-order reports it)")
            continue
        metrics = as_dict(b.predicate.get("metrics"))
        row = {"segment": seg, "step_start": sa, "step_end": sb, "steps": steps, "update_norm": d.norm,
               "weight_norm": d.weight_norm, "numel": d.numel, "loss": metrics.get("loss"), "lr": metrics.get("lr"),
               "flags": []}
        rows.append(row)
        if a.kind == "genesis" and genesis_failed:
            row["flags"].append("start is a failed genesis")
            yield skipped("trajectory", where, f"{seg} not judged: its start is not the committed genesis (genesis reports it)")
            continue
        if d.structural:
            bad += 1
            row["flags"].append("tensors changed")
            yield Finding("trajectory", False, where, "the same tensors (names, shapes, dtypes) as the previous weights",
                          f"{len(d.structural)} differ: {traj.by_component(s.split()[0] for s in d.structural)}")
        if lr_max is None:
            continue
        over = [t for t in d.tensors if t.diff_max > traj.coordinate_bound(steps, lr_max, ratio, wd, t.w_max, t.dtype)]
        l2_bound = traj.SLACK * steps * lr_max * (ratio * d.numel ** 0.5 + wd * d.weight_norm)
        row["update_bound"] = l2_bound
        if over or d.norm > l2_bound:
            bad += 1
            row["flags"].append("jump")
            worst = max(over, key=lambda t: t.diff_max / max(1e-30, traj.coordinate_bound(steps, lr_max, ratio, wd, t.w_max, t.dtype)),
                        default=None)
            detail = f"AdamW, lr ≤ {lr_max:g}, |m̂/√v̂| ≤ {ratio:.2f}, {steps} steps"
            if over:
                detail += f"; {len(over)} tensors moved more than any step could: {traj.by_component(t.name for t in over)}"
                if worst is not None:
                    detail += f"; worst {worst.name} max |Δ| {worst.diff_max:.3g}"
            yield Finding("trajectory", False, where, f"‖ΔW‖ ≤ {l2_bound:.3g} over {seg}", f"‖ΔW‖ {d.norm:.3g}", detail=detail)
    # Per-step update per parameter per unit of lr: comparable across segments of one run.
    judged = [r for r in rows if r["numel"] > 0 and "start is a failed genesis" not in r["flags"]]
    for r in judged:
        lr = r["lr"] if isinstance(r["lr"], (int, float)) and not isinstance(r["lr"], bool) and r["lr"] > 0 else 1.0
        r["per_step"] = r["update_norm"] / (r["steps"] * r["numel"] ** 0.5 * lr)
    per_step = [r["per_step"] for r in judged]
    for i, z in traj.robust_outliers(per_step):
        if "jump" in judged[i]["flags"]:
            continue
        bad += 1
        judged[i]["flags"].append("outlier")
        med = sorted(per_step)[len(per_step) // 2]
        yield Finding("trajectory", False, judged[i]["segment"], f"a per-step update like the run's other segments (median {med:.3g})",
                      f"{per_step[i]:.3g} (robust z {z:.1f})", detail="an outlier against the run's own profile")
    ctx.facts["trajectory"] = rows
    if not bad and rows:
        profile = "" if len(rows) >= traj.MIN_PROFILE_SEGMENTS else f"; profile test needs ≥{traj.MIN_PROFILE_SEGMENTS} segments"
        bound = "" if lr_max is not None else "; no lr recorded: optimizer bound not applied"
        yield Finding("trajectory", True, "", detail=f"{len(rows)} segments within the AdamW step bound{profile}{bound}")


def check_release(ctx: Context) -> Iterator[Finding]:
    """The release names the last checkpoint (step and canonical digest), its weights file has that
    digest, and so does export/model.safetensors when the bundle carries one."""
    releases, ckpts = ctx.of_kind("release"), ctx.of_kind("checkpoint")
    last = ckpts[-1].predicate if ckpts else None
    bad = 0
    if len(releases) > 1:
        bad += 1
        yield Finding("release", False, CHAIN_NAME, "at most one release statement", f"{len(releases)}")
    for r in releases[-1:]:
        p = r.predicate
        if last is None:
            bad += 1
            yield Finding("release", False, ctx.where(r), "a checkpoint before the release", "none")
            continue
        if p.get("step") != last.get("step"):
            bad += 1
            yield Finding("release", False, ctx.where(r), f"step {last.get('step')} (the last checkpoint)", f"step {p.get('step')}")
        if p.get("weights_root") != last.get("weights_root"):
            bad += 1
            yield Finding("release", False, ctx.where(r), f"root {short(last.get('weights_root'))} (the last checkpoint)",
                          f"root {short(p.get('weights_root'))}")
        files = weights_files(r)
        try:
            root = merkle_root(ctx.files.leaves(files)) if files else None
        except UNREADABLE:
            root = "unreadable"  # weights-digest reports why
        if root != last.get("weights_root"):
            bad += 1
            yield Finding("release", False, ",".join(files) or ctx.where(r), f"root {short(last.get('weights_root'))} (the last checkpoint)",
                          f"root {short(root)}")
    export = "export/model.safetensors"
    try:
        ctx.files.path(export)
        have_export = True
    except FileNotFoundError:
        have_export = False
    except BundlePathError as ex:
        have_export = False
        bad += 1
        yield Finding("release", False, export, "a regular file inside the bundle", str(ex))
    if have_export and last is not None:
        try:
            root = merkle_root(ctx.files.leaves([export]))
        except UNREADABLE as ex:
            root = f"unreadable ({ex})"
        if root != last.get("weights_root"):
            bad += 1
            yield Finding("release", False, export, f"root {short(last.get('weights_root'))} (the last checkpoint)", f"root {short(root)}")
    if not bad:
        if not releases:
            yield Finding("release", True, "", detail="no release statement (the run was not released)")
        else:
            yield Finding("release", True, ctx.where(releases[-1]),
                          detail=f"step {last and last.get('step')}, the last checkpoint" + (" (and export/)" if have_export else ""))


# ---------------------------------------------------------------- replay (hook)


def replay_plugin(ctx: Context) -> str:
    """The replay plug-in a bundle names (run statement `replay_plugin`), else the default."""
    runs = ctx.of_kind("run")
    named = runs[0].predicate.get("replay_plugin") if runs else None
    return named if isinstance(named, str) and named else DEFAULT_REPLAY_PLUGIN


def replay_segments(ctx: Context) -> list[Entry]:
    """The checkpoints whose segments to replay: all, or N chosen at random by the verifier after
    it received the bundle (seeded by --replay-seed for a reproducible choice)."""
    ckpts = ctx.of_kind("checkpoint")
    if ctx.replay == "all" or ctx.replay is None:
        return ckpts if ctx.replay == "all" else []
    n = max(0, min(int(ctx.replay), len(ckpts)))
    seed = ctx.replay_seed if ctx.replay_seed is not None else int.from_bytes(os.urandom(8), "little")
    ctx.facts["replay_seed"] = seed
    picked = sorted(random.Random(seed).sample(range(len(ckpts)), n))
    return [ckpts[i] for i in picked]


def check_replay(ctx: Context) -> Iterator[Finding]:
    """Re-run chosen segments and compare the result with the next checkpoint (plug-in; see REPLAYERS)."""
    plugin = replay_plugin(ctx)
    if ctx.replay is None:
        yield skipped("replay", "", "replay not run (ask for it with --replay N|all)")
        return
    replayer = REPLAYERS.get(plugin)
    if replayer is None:
        yield skipped("replay", "", f"replay not run: no replayer registered for {plugin!r}")
        return
    segments = replay_segments(ctx)
    ctx.facts["replay_requested"] = {"plugin": plugin, "segments": [e.predicate.get("step") for e in segments],
                                     "seed": ctx.facts.get("replay_seed")}
    yield from replayer(ctx, segments)
