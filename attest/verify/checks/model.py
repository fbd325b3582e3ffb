"""Verifier checks on the model: genesis re-derivation, the training trajectory (update norms per
segment), the release, and the replay hook (segment replay plug-ins register in REPLAYERS)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
from pathlib import Path
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from attest import inputs, jsonread
from attest.verify import trajectory as traj
from attest.bundle import BundlePathError, folder_entries
from attest.chain import Entry
from attest.digest import merkle_root
from attest.layout import CHAIN_NAME, EXPORT_DIR
from attest.plugins import DERIVERS, REPLAY_PLUGIN
from attest.schedule import Schedule
from attest.verify.findings import (
    UNREADABLE,
    Context,
    Finding,
    as_dict,
    held_skip,
    short,
    skipped,
    subjects_of,
    weights_files,
)
from attest.verify.cache import PARALLEL_BYTES, workers

# Segment replay plug-ins by name (attest.verify.replay registers its replayer here). A replayer gets the Context
# and the checkpoint entries of the segments to replay (chosen by `replay_segments`), and yields
# `replay` findings, one per segment: ok when re-running the segment from W_k on the recorded
# data and config reproduces W_{k+1}'s canonical digest.
Replayer = Callable[["Context", list[Entry]], Iterator["Finding"]]
REPLAYERS: dict[str, Replayer] = {}
DEFAULT_REPLAY_PLUGIN = REPLAY_PLUGIN
_DEFAULT_REPLAYER: list[Replayer] = []  # the one attest.verify.replay registers (its dependencies are checked before use)


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
    yield Finding("genesis", True, ctx.where(g), detail=f"{len(leaves)} tensors re-derived from seed {recipe.get('seed')}"
                                                        f"{seed_origin(ctx.run_config)}")


def seed_origin(run_config: dict[str, Any]) -> str:
    """How the run chose its genesis seed, as its config records it (`seed_source`): drawn at random
    when the run began (no seed given), or fixed by the operator; nothing for a run that records neither."""
    source = run_config.get("seed_source")
    if source == "drawn":
        return " (drawn at random when the run began)"
    if source == "fixed":
        return " (fixed in the run config)"
    return ""


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


def _optimizer(ctx: Context) -> tuple[Schedule, float, float, float]:
    """(lr schedule, beta1, beta2, weight decay), all from the signed run config: no reported metric
    sets a bound. ValueError names the config field that is missing or out of range."""
    train = as_dict(ctx.run_config.get("train"))
    betas = train.get("betas")
    if not (isinstance(betas, list) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        raise ValueError(f"train.betas = {betas!r}: expected two numbers")
    wd = train.get("weight_decay")
    if not isinstance(wd, (int, float)) or isinstance(wd, bool) or not 0 <= wd <= 10:
        raise ValueError(f"train.weight_decay = {wd!r}: expected a number in [0, 10]")
    return Schedule(train), float(betas[0]), float(betas[1]), float(wd)


def _reported_lr(ctx: Context, e: Entry, sched: Schedule) -> Finding | None:
    """A checkpoint's reported lr must be the schedule's lr after its step (a metric is checked, never trusted)."""
    step, lr = e.predicate.get("step"), as_dict(e.predicate.get("metrics")).get("lr")
    if lr is None:
        return None
    want = sched.lr(step) if isinstance(step, int) else None
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or want is None or abs(lr - want) > 1e-6 * want:
        return Finding("trajectory", False, ctx.where(e), f"metrics.lr {want:.6g} (the signed schedule after step {step})"
                       if want is not None else "a numeric step", f"metrics.lr {str(lr)[:40]}",
                       "a reported learning rate that the run config does not produce")
    return None


WeightPair = tuple[tuple[Entry, int], tuple[Entry, int]]


def _key(pair: WeightPair) -> tuple[int, int]:
    return pair[0][0].lineno, pair[1][0].lineno


def _delta(ctx: Context, pair: WeightPair) -> traj.SegmentDelta | str | None:
    """The update statistics of one segment; a string says why they could not be measured, None that
    its weights are held by the team (light bundle)."""
    return _deltas(ctx, [pair])[_key(pair)]


def _deltas(ctx: Context, window: list[WeightPair]) -> dict[tuple[int, int], traj.SegmentDelta | str | None]:
    """`_delta` of consecutive segments, each weight set read once (attest.verify.trajectory.chain_deltas);
    when a file is missing or unreadable, segment by segment, so that each names its own problem."""
    try:
        sets = [window[0][0], *(b for _, b in window)]
        got = traj.chain_deltas([[ctx.files.path(f) for f in weights_files(e)] for e, _ in sets])
        return {_key(p): d for p, d in zip(window, got)}
    except (FileNotFoundError, *UNREADABLE) as ex:
        if len(window) == 1:
            return {_key(window[0]): None if isinstance(ex, FileNotFoundError) and ctx.light else str(ex)}
    return {k: d for p in window for k, d in _deltas(ctx, [p]).items()}


WINDOW = 8  # segments measured in step: one chunk per weight set in memory


def _windows(pairs: list[WeightPair]) -> list[list[WeightPair]]:
    """Runs of at most WINDOW segments, each starting where the one before it ends."""
    out: list[list[WeightPair]] = []
    for p in pairs:
        if out and len(out[-1]) < WINDOW and out[-1][-1][1][0] is p[0][0]:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def trajectory_jobs(ctx: Context) -> list[tuple[int, Callable[[], None]]]:
    """The trajectory check's bulk work, as (bytes read, job) for the verifier's hashing pool: each
    job measures a few consecutive segments into `ctx.computed["trajectory"]`, where the check finds them."""
    sets = _weight_sets(ctx)
    out = ctx.computed.setdefault("trajectory", {})

    def job(window: list[WeightPair]) -> Callable[[], None]:
        return lambda: out.update(_deltas(ctx, window))

    return [(sum(_bytes_of(ctx, e) for e, _ in [w[0][0], *(b for _, b in w)]), job(w))
            for w in _windows(list(zip(sets, sets[1:])))]


def check_trajectory(ctx: Context) -> Iterator[Finding]:
    """Per segment W_k -> W_{k+1}: the update norm, streamed from the safetensors files, within what
    AdamW can move in that many steps, and not an outlier against the run's other segments."""
    sets = _weight_sets(ctx)
    if len(sets) < 2:
        yield skipped("trajectory", CHAIN_NAME, "no checkpoint after genesis")
        return
    try:
        sched, b1, b2, wd = _optimizer(ctx)
        ratio = traj.adam_ratio_bound(b1, b2, max(s for _, s in sets))
    except ValueError as ex:
        yield Finding("trajectory", False, ctx.where(ctx.of_kind("run")[0]) if ctx.of_kind("run") else CHAIN_NAME,
                      "a run config with a valid AdamW schedule (the bound is derived from it)", str(ex)[:200])
        return
    bad = 0
    for e, _ in sets[1:]:
        wrong = _reported_lr(ctx, e, sched)
        if wrong is not None:
            bad += 1
            yield wrong
    pairs = list(zip(sets, sets[1:]))
    done: dict[tuple[int, int], traj.SegmentDelta | str | None] = ctx.computed.pop("trajectory", {})
    todo = [p for p in pairs if _key(p) not in done]  # all of them unless the verifier's pool measured them
    windows = _windows(todo)
    if len(windows) > 1 and sum(_bytes_of(ctx, b) for _, (b, _) in todo) > PARALLEL_BYTES:
        with ThreadPoolExecutor(workers()) as pool:
            for got in pool.map(lambda w: _deltas(ctx, w), windows):
                done.update(got)
    else:
        for w in windows:
            done.update(_deltas(ctx, w))
    deltas = [done[_key(p)] for p in pairs]
    rows: list[dict[str, Any]] = []
    genesis_failed = "genesis" in ctx.failed
    for ((a, sa), (b, sb)), d in zip(pairs, deltas):
        seg = f"step {sa}→{sb}"
        where = ",".join(weights_files(b)) or ctx.where(b)
        if d is None:
            yield held_skip(ctx, "trajectory", where, f"the weights of {seg}")
            continue
        if isinstance(d, str) or not weights_files(a) or not weights_files(b):
            why = d if isinstance(d, str) else "a statement names no weights file"
            yield skipped("trajectory", where, f"{seg} not measured: {why} (weights-digest reports it)")
            continue
        steps = sb - sa
        if steps <= 0:
            yield skipped("trajectory", where, f"{seg} not judged: steps do not increase (statement-order reports it)")
            continue
        if sb > sched.total:
            bad += 1
            yield Finding("trajectory", False, ctx.where(b), f"a step ≤ train.steps {sched.total} (signed run config)",
                          f"step {sb}", "a checkpoint the signed schedule does not reach")
            continue
        metrics = as_dict(b.predicate.get("metrics"))
        lr_sum = sched.lr_sum(sa, sb)  # the signed schedule's lr summed over the segment's steps
        row: dict[str, Any] = {"segment": seg, "step_start": sa, "step_end": sb, "steps": steps, "update_norm": d.norm,
               "weight_norm": d.weight_norm, "numel": d.numel, "loss": metrics.get("loss"), "lr_sum": lr_sum,
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
        # coordinate_bound is linear in steps × lr: one "step" of the summed lr is the exact schedule.
        over = [t for t in d.tensors if t.diff_max > traj.coordinate_bound(1, lr_sum, ratio, wd, t.w_max, t.dtype)]
        l2_bound = traj.SLACK * lr_sum * (ratio * d.numel ** 0.5 + wd * d.weight_norm)
        row["update_bound"] = l2_bound
        if over or d.norm > l2_bound:
            bad += 1
            row["flags"].append("jump")
            worst = max(over, key=lambda t: t.diff_max / max(1e-30, traj.coordinate_bound(1, lr_sum, ratio, wd, t.w_max, t.dtype)),
                        default=None)
            detail = f"AdamW, Σlr {lr_sum:.4g} over {steps} steps (signed schedule), |m̂/√v̂| ≤ {ratio:.2f}"
            if over:
                detail += f"; {len(over)} tensors moved more than any step could: {traj.by_component(t.name for t in over)}"
                if worst is not None:
                    detail += f"; worst {worst.name} max |Δ| {worst.diff_max:.3g}"
            yield Finding("trajectory", False, where, f"‖ΔW‖ ≤ {l2_bound:.3g} over {seg}", f"‖ΔW‖ {d.norm:.3g}", detail=detail)
    # Per-step update per parameter per unit of lr: comparable across segments of one run.
    judged = [r for r in rows if r["numel"] > 0 and "start is a failed genesis" not in r["flags"]]
    for r in judged:
        r["per_step"] = r["update_norm"] / (max(r["lr_sum"], 1e-30) * r["numel"] ** 0.5)
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
        yield Finding("trajectory", True, "", detail=f"{len(rows)} segments within the AdamW step bound of the signed "
                      f"schedule{profile}")


NO_RELEASE = "no release statement: the from-scratch claim needs a released model"
MAX_EXPORT_CONFIG_BYTES = 1 << 20
MAX_TOKENIZER_BYTES = 256 << 20  # a SentencePiece model read whole to render the release (a 256k vocabulary is ~5 MB)


def _canonical(x: Any) -> str:
    """Parsed values compared strictly (1, 1.0 and true differ): their sorted JSON text."""
    return json.dumps(x, sort_keys=True, allow_nan=True)


def check_release(ctx: Context) -> Iterator[Finding]:
    """The release is mandatory and whole, and export/ is exactly what the chain renders: one release
    statement, after the last checkpoint, naming its step and canonical digest; its subjects are
    export/'s files, and they are exactly the files attest.release renders from the chain (config,
    generation and tokenizer configs, model card, weight index and model code, byte for byte), the
    last checkpoint's weight files and the declared tokenizer (by sha256), and the folder's
    model-signing signature when the checkpoint folders carry one (oms-signature checks it)."""
    releases, ckpts = ctx.of_kind("release"), ctx.of_kind("checkpoint")
    if not releases:
        yield Finding("release", False, CHAIN_NAME, "a release statement naming the exported model", NO_RELEASE)
        for rel, _ in folder_entries(ctx.root, EXPORT_DIR):  # an export no statement binds
            yield Finding("release", False, rel, "a subject of the release statement", "no release statement")
        return
    bad = 0
    if len(releases) > 1:
        bad += 1
        yield Finding("release", False, CHAIN_NAME, "at most one release statement", f"{len(releases)}")
    r = releases[-1]
    p = r.predicate
    if not ckpts:
        yield Finding("release", False, ctx.where(r), "a checkpoint before the release", "none")
        return
    last = ckpts[-1].predicate
    want_root = last.get("weights_root")
    if p.get("step") != last.get("step"):
        bad += 1
        yield Finding("release", False, ctx.where(r), f"step {last.get('step')} (the last checkpoint)", f"step {p.get('step')}")
    if p.get("weights_root") != want_root:
        bad += 1
        yield Finding("release", False, ctx.where(r), f"root {short(want_root)} (the last checkpoint)",
                      f"root {short(p.get('weights_root'))}")
    subs = {s["name"]: s["sha256"] for s in subjects_of(r)}
    outside = sorted(n for n in subs if not n.startswith(EXPORT_DIR + "/"))
    if outside:
        bad += 1
        yield Finding("release", False, ctx.where(r), f"subjects inside {EXPORT_DIR}/", ", ".join(outside)[:200])
    for f in _release_rendered(ctx, r, ckpts[-1], subs):
        bad += 1
        yield f
    # every file a user would load from export/ is bound by the release
    for rel, odd in folder_entries(ctx.root, EXPORT_DIR):
        if odd or rel not in subs:
            bad += 1
            yield Finding("release", False, rel, "a subject of the release statement",
                          "not a regular file" if odd else "a file the release does not name")
    files = weights_files(r)
    try:
        root = merkle_root(ctx.files.leaves(files)) if files else None
    except UNREADABLE as ex:
        root = f"unreadable ({str(ex)[:100]})"
    if files and root != want_root:
        bad += 1
        yield Finding("release", False, ",".join(files), f"root {short(want_root)} (the last checkpoint)", f"root {short(root)}")
    gens = ctx.of_kind("genesis")
    recipe_model = as_dict(gens[0].predicate.get("recipe")).get("model") if len(gens) == 1 else None
    run_model = ctx.run_config.get("model")
    if recipe_model is None or run_model is None or _canonical(recipe_model) != _canonical(run_model):
        bad += 1
        yield Finding("release", False, CHAIN_NAME, "the run config's model = the genesis recipe's model config",
                      "none recorded" if recipe_model is None or run_model is None
                      else f"model {_first_difference(recipe_model, run_model)}")
    if not bad:
        yield Finding("release", True, ctx.where(r), detail=f"step {last.get('step')}, the last checkpoint; "
                      f"{len(subs)} files of {EXPORT_DIR}/ signed, each rendered from the chain or a signed copy")


def release_inputs(ctx: Context, r: Entry, last: Entry, full: bool = False) -> tuple[list[Entry], Any, Any, bool, Any]:
    """What attest.release renders export/ from, as the bundle holds it: the chain before the release,
    the last checkpoint's weight files (sha256 and, for sharded weights, export/'s shard headers),
    the declared tokenizer's bytes and sha256, whether checkpoint folders are model-signed, and
    (`full`, format 3) the tensor entries of every released weight file, None when one is not readable."""
    from attest.digest import read_safetensors_index
    from attest.release import TOKENIZER_NAME, weight_names

    before = ctx.entries[:next((i for i, e in enumerate(ctx.entries) if e is r), len(ctx.entries))]
    ck = {s["name"]: s["sha256"] for s in subjects_of(last)}
    weights = sorted((n, ck[n]) for n in weights_files(last))
    heads: list[tuple[str, list[tuple[str, int]] | None]] = []
    entries: list[Any] | None = [] if full else None
    for (_, sha), name in zip(weights, weight_names(len(weights))):
        tensors = None
        if len(weights) > 1 or full:
            try:
                index = read_safetensors_index(ctx.files.path(f"{EXPORT_DIR}/{name}"))
                tensors = [(t.name, t.end - t.start) for t in index]
                entries = None if entries is None else [*entries, index]
            except UNREADABLE:
                tensors = entries = None  # the comparison names what is not renderable; subject-digest names the file
        heads.append((sha, tensors if len(weights) > 1 else None))
    declared = {s["sha256"]: s["name"] for e in ctx.of_kind("tokenizer") for s in subjects_of(e)}
    tok = None
    if declared:
        run_tok = ctx.run_config.get("tokenizer")
        want = [d for d, n in declared.items() if n == run_tok] or [min(declared, key=lambda d: declared[d])]
        for name in (f"{EXPORT_DIR}/{TOKENIZER_NAME}", declared[want[0]]):
            try:
                data = inputs.read_bytes(ctx.files.path(name), MAX_TOKENIZER_BYTES, where=name) \
                    if ctx.files.sha256(name) == want[0] else None
            except UNREADABLE:
                data = None
            if data is not None:
                tok = (data, want[0])
                break
        if tok is None:
            tok = (b"", want[0])  # its bytes are not here: rendered without ids, and the comparison says so
    signed = any(s["name"].endswith("/model.sig") for e in ctx.of_kind("checkpoint") for s in subjects_of(e))
    return before, heads, tok, signed, entries


def _release_rendered(ctx: Context, r: Entry, last: Entry, subs: dict[str, str]) -> Iterator[Finding]:
    """Render export/ from the chain (attest.release) and compare the release's subjects with it."""
    import hashlib

    from attest.release import EXPORT_FORMAT, LLAMA_FORMAT, render

    fmt = r.predicate.get("export_format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or not 1 <= fmt <= EXPORT_FORMAT:
        yield Finding("release", False, ctx.where(r), f"export_format 1 … {EXPORT_FORMAT} (this verifier renders those)",
                      f"export_format {str(fmt)[:40]}")
        return
    before, heads, tok, signed, tensors = release_inputs(ctx, r, last, full=fmt >= LLAMA_FORMAT)
    step = last.predicate.get("step")
    rendered = render(before, step if isinstance(step, int) else -1, heads, tok, _own_code, signed, fmt, tensors)
    if fmt >= LLAMA_FORMAT and r.predicate.get("text_export") != rendered.text_export:
        yield Finding("release", False, ctx.where(r), f"text_export {json.dumps(rendered.text_export)} (rendered from the chain)",
                      f"text_export {json.dumps(r.predicate.get('text_export'))[:60]}")
    if tok is not None and not tok[0]:
        yield Finding("release", False, f"{EXPORT_DIR}/tokenizer.model", f"the declared tokenizer (sha256 {short(tok[1])})",
                      "its bytes are in neither export/ nor the tokenizer's own path")
    for line in rendered.problems:
        yield Finding("release", False, f"{EXPORT_DIR}/{line.split(':', 1)[0]}", "a file the verifier can render",
                      line.split(": ", 1)[-1][:160])
    ctx.notes.extend(f"release: {n}" for n in rendered.notes)
    expected = {f"{EXPORT_DIR}/{n}" for n in rendered.names()}
    for name in sorted(set(subs) - expected):
        if name.startswith(EXPORT_DIR + "/"):
            yield Finding("release", False, name, f"only the files kai-train renders into {EXPORT_DIR}/ from the chain",
                          "a file the exporter does not write", "a loader may read it")
    for name in sorted(expected - set(subs)):
        if name.split("/", 1)[1] not in rendered.optional:
            yield Finding("release", False, name, "a subject of the release statement", "not named by the release")
    for base, data in sorted(rendered.files.items()):
        name = f"{EXPORT_DIR}/{base}"
        want = hashlib.sha256(data).hexdigest()
        if name in subs and subs[name] != want and not (fmt < 2 and base.endswith(".json") and _same_json(ctx, name, data)):
            yield Finding("release", False, name, f"the bytes rendered from the chain (sha256 {short(want)})",
                          f"sha256 {short(subs[name])}; {_rendered_difference(ctx, name, data)}"[:300])
    for base, sha in sorted(rendered.copies.items()):
        name = f"{EXPORT_DIR}/{base}"
        if name in subs and subs[name] != sha:
            what = "the declared tokenizer" if base.endswith("tokenizer.model") else "the last checkpoint's weight file"
            yield Finding("release", False, name, f"sha256 {short(sha)} ({what})", f"sha256 {short(subs[name])}")
    for base, derived in sorted(rendered.derived.items()):
        name = f"{EXPORT_DIR}/{base}"
        if name not in subs:
            continue
        try:
            want = _derived_sha256(ctx, derived, len(heads))
        except UNREADABLE as ex:  # a ValueError (attest.llama.LlamaError, attest.inputs' errors) among them
            yield Finding("release", False, name, "a file the verifier can compute from the released weights",
                          f"{type(ex).__name__}: {str(ex)[:160]}")
            continue
        if subs[name] != want:
            yield Finding("release", False, name, f"the bytes computed from the released weights by "
                          f"{rendered.text_export} (sha256 {short(want)})", f"sha256 {short(subs[name])}")


def _derived_sha256(ctx: Context, derived: Any, n: int) -> str:
    """sha256 of a file attest.llama computes from export/'s weight files (read by byte range, bounded by
    their checked headers; each is a copy of a signed checkpoint file, which the release check compares)."""
    from attest.release import weight_names

    names = weight_names(n)
    with contextlib.ExitStack() as stack:
        handles: dict[int, Any] = {}

        def read(i: int, offset: int, length: int) -> bytes:
            if i not in handles:
                name = f"{EXPORT_DIR}/{names[i]}"
                handles[i] = stack.enter_context(inputs.open_file(ctx.files.path(name), where=name))
            f = handles[i]
            f.seek(offset)
            data: bytes = f.read(length)
            return data

        sha: str = derived.sha256(read)
        return sha


def _same_json(ctx: Context, name: str, want: bytes) -> bool:
    """Format 1 wrote JSON files with the key order of its inputs: the same values (strictly: 1, 1.0
    and true differ) are the same file to a loader."""
    try:
        path = ctx.files.path(name)
        if path.stat().st_size > MAX_EXPORT_CONFIG_BYTES:
            return False
        return _canonical(jsonread.loads(inputs.read_bytes(path, MAX_EXPORT_CONFIG_BYTES, where=name), name,
                                         MAX_EXPORT_CONFIG_BYTES)) == _canonical(json.loads(want))
    except UNREADABLE:
        return False


def _rendered_difference(ctx: Context, name: str, want: bytes) -> str:
    """Where the file in the bundle departs from the rendering: a JSON key, else a line."""
    try:
        path = ctx.files.path(name)
        if path.stat().st_size > MAX_EXPORT_CONFIG_BYTES:
            return f"more than {MAX_EXPORT_CONFIG_BYTES} bytes"
        got = inputs.read_bytes(path, MAX_EXPORT_CONFIG_BYTES, where=name)
    except UNREADABLE as ex:
        return f"unreadable ({str(ex)[:80]})"
    if name.endswith(".json"):
        try:
            a, b = json.loads(want), jsonread.loads(got, name, MAX_EXPORT_CONFIG_BYTES)
            if isinstance(a, dict) and isinstance(b, dict):
                for k in list(a) + [k for k in b if k not in a]:
                    if _canonical(a.get(k, "(absent)")) != _canonical(b.get(k, "(absent)")):
                        inner = _first_difference(a.get(k), b.get(k)) if isinstance(a.get(k), dict) else \
                            f"{json.dumps(b.get(k, '(absent)'))[:60]} (rendered {json.dumps(a.get(k, '(absent)'))[:60]})"
                        return f"key {k}: {inner}"
        except UNREADABLE:
            pass
    wl, gl = want.decode("utf-8", "replace").splitlines(), got.decode("utf-8", "replace").splitlines()
    for i, (x, y) in enumerate(zip(wl, gl)):
        if x != y:
            return f"line {i + 1}: {y[:60]!r} (rendered {x[:60]!r})"
    return f"{len(gl)} lines (rendered {len(wl)})"


def _own_code(name: str) -> bytes | None:
    """This verifier's own copy of an export code file (kai_train/NAME), read, never imported."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("kai_train")  # a top-level spec: kai_train is not executed
    except (ImportError, ValueError):
        return None
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    try:
        return (Path(where[0]) / name).read_bytes() if where else None
    except OSError:
        return None


def _first_difference(want: Any, got: Any) -> str:
    """The first key where two model configs differ, for the failure line."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            if _canonical(want.get(k, "(absent)")) != _canonical(got.get(k, "(absent)")):
                return f"{k}: {str(got.get(k, '(absent)'))[:40]} (recorded {str(want.get(k, '(absent)'))[:40]})"
    return f"{str(got)[:60]} (recorded {str(want)[:60]})"


# ---------------------------------------------------------------- replay (hook)


def replay_segments(ctx: Context, draw: bool = True) -> list[Entry]:
    """The checkpoints whose segments to replay: all, the challenge's, or N drawn at random by the
    verifier after it received the bundle (seeded by --replay-seed for a reproducible choice) among the
    segments before the last, with the last segment (the one that yields the release) always added. `draw=False`: only how many (the
    first N, plus the last; nothing drawn or recorded)."""
    ckpts = ctx.of_kind("checkpoint")
    if ctx.replay == "all" or not ctx.replay:
        return ckpts if ctx.replay == "all" else []
    if isinstance(ctx.replay, list):  # a challenge's segments (attest.challenge), drawn by the evaluator
        return [ckpts[i] for i in sorted(set(ctx.replay)) if 0 <= i < len(ckpts)]
    # drawn among the segments before the last (which is added anyway), unless it is the only one
    pool = range(len(ckpts) - 1) if len(ckpts) > 1 else range(len(ckpts))
    n = max(0, min(int(ctx.replay), len(pool)))
    if not draw:
        picked = list(range(n))
    else:
        seed = ctx.replay_seed if ctx.replay_seed is not None else int.from_bytes(os.urandom(8), "little")
        ctx.facts["replay_seed"] = seed
        picked = sorted(random.Random(seed).sample(pool, n))
        ctx.facts["replay_drawn"] = list(picked)
    if ckpts and len(ckpts) - 1 not in picked:
        picked.append(len(ckpts) - 1)
    return [ckpts[i] for i in picked]


def _recomputed(ctx: Context, why: str = "", done: list[int] | None = None) -> None:
    """facts["recomputed"]: what replay recomputed (`done`: the segments reproduced), read by
    Report.verdict (no PASS without it)."""
    ckpts = ctx.of_kind("checkpoint")
    reproduced = sorted(set(done or []))
    drawn = ctx.facts.get("replay_drawn")
    if isinstance(ctx.replay, list):
        drawn = sorted(set(ctx.replay))  # the evaluator's challenge
    elif ctx.replay == "all":
        drawn = list(range(len(ckpts)))
    drawn_ok = [i for i in drawn or [] if i in reproduced]
    ctx.facts["recomputed"] = {
        "segments": len(ckpts), "drawn": drawn or [], "reproduced": len(reproduced),
        "reproduced_segments": reproduced, "drawn_reproduced": len(drawn_ok),
        "last_step": ckpts[-1].predicate.get("step") if ckpts else None,
        "last_reproduced": bool(ckpts) and len(ckpts) - 1 in reproduced,
        "escape_probability": escape(reproduced, len(ckpts)), "why": why}
    if not drawn_ok and reproduced:  # the last segment alone, not an evaluator's draw
        ctx.facts["recomputed"]["reproduced"] = 0
        ctx.facts["recomputed"]["why"] = "no segment drawn at random by the evaluator was reproduced"


def check_replay(ctx: Context) -> Iterator[Finding]:
    """Re-run chosen segments and compare the result with the next checkpoint (see REPLAYERS). The
    implementation is this verifier's own; a plug-in the bundle names is only noted. Without a
    recomputed segment the verdict is INCOMPLETE, never PASS (Report.verdict)."""
    from attest.verify.findings import undecided

    if not ctx.replay:
        why = "replay not run (--replay 0 / --no-replay: an integrity check, not a pass)"
        _recomputed(ctx, why)
        yield skipped("replay", "", why)
        return
    if ctx.replay_default and ctx.failed:  # cheap first: the verdict already fails, nothing to recompute
        why = f"replay not run: {', '.join(sorted(ctx.failed))} failed (ask with --replay to replay anyway)"
        _recomputed(ctx, why)
        yield skipped("replay", "", why)
        return
    if ctx.light and not isinstance(ctx.replay, list):  # a light bundle without packs: the state is held
        _recomputed(ctx, "the segments' state is held by the team (light bundle): answer a challenge")
        yield held_skip(ctx, "replay", "", "the start and end state of every segment (replay runs on a challenge's packs)")
        return
    if not ctx.of_kind("checkpoint"):
        _recomputed(ctx, "no checkpoint to replay")
        yield skipped("replay", CHAIN_NAME, "no checkpoint to replay")
        return
    runs = ctx.of_kind("run")
    named = runs[0].predicate.get("replay_plugin") if runs else None
    if named is not None and named != DEFAULT_REPLAY_PLUGIN:
        ctx.notes.append(f"the run statement names replay plug-in {str(named)[:80]!r}: ignored, this verifier replays "
                         f"with its own {DEFAULT_REPLAY_PLUGIN}")
    replayer = REPLAYERS.get(DEFAULT_REPLAY_PLUGIN)
    missing = None if replayer is not None else f"no replay implementation registered ({DEFAULT_REPLAY_PLUGIN})"
    if missing is None and replayer is _DEFAULT_REPLAYER[0]:
        from attest.verify.replay import plugin_available

        missing = plugin_available()
        gens = ctx.of_kind("genesis")
        deriver = as_dict(gens[0].predicate.get("recipe")).get("deriver") if gens else None
        if missing is None and deriver not in DERIVERS:
            missing = f"the genesis deriver {str(deriver)[:60]!r} is not one this verifier's replay runs"
        elif missing is None and not str(DERIVERS[str(deriver)]).startswith("kai_train."):
            missing = f"the genesis deriver {str(deriver)[:60]!r} has no replay implementation here"
    if missing is not None:
        _recomputed(ctx, f"this install cannot replay: {missing}")
        yield undecided("replay", "", f"replay not run: {missing}")
        return
    segments = replay_segments(ctx)
    total = len(ctx.of_kind("checkpoint"))
    ctx.facts["replay_requested"] = {"plugin": DEFAULT_REPLAY_PLUGIN, "segments": [e.predicate.get("step") for e in segments],
                                     "seed": ctx.facts.get("replay_seed")}
    index = {id(e): i for i, e in enumerate(ctx.of_kind("checkpoint"))}
    cov = ctx.facts["replay_coverage"] = {"replayed": len(segments), "segments": total,
                                          "escape_probability": escape(sorted(index[id(e)] for e in segments), total)}
    ctx.notes.append(f"replay coverage: {len(segments)} of {total} segments (the last always among them); a forgery "
                     "confined to m other segments escapes with probability "
                     + ", ".join(f"{p:.3g} (m={m})" for m, p in cov["escape_probability"].items()))
    assert replayer is not None  # `missing` above returned otherwise
    reproduced: list[int] = []
    for i, f in enumerate(replayer(ctx, segments)):  # one finding per segment, in order (the REPLAYERS contract)
        if f.check == "replay" and f.ok and i < len(segments):
            reproduced.append(index[id(segments[i])])
        yield f
    _recomputed(ctx, "", reproduced)


def escape(chosen: list[int], n: int) -> dict[str, float]:
    """Escape probabilities for a replay of `chosen` (segment indices) of n, the last always among them
    and the others drawn at random: a forgery confined to m segments other than the last escapes with
    probability C(n-1-m, j)/C(n-1, j), j the chosen segments other than the last (one in the last never
    escapes a replay that reproduced it)."""
    j = len({i for i in chosen if i != n - 1})
    if n - 1 not in chosen:  # the last not replayed: nothing is said about it
        return coverage(len(set(chosen)), n)["escape_probability"]
    return coverage(j, n - 1)["escape_probability"]


def coverage(k: int, n: int, spans: tuple[int, ...] = (1, 2, 5)) -> dict[str, Any]:
    """What k segments replayed at random of n say: the probability that a forgery confined to m
    segments (any m of them, chosen by the team before the draw) escapes every replay,
    C(n-m, k) / C(n, k), for a few m."""
    from math import comb

    escape = {str(m): (comb(n - m, k) / comb(n, k) if n and m <= n else 0.0) for m in spans if m <= max(n, 1)}
    return {"replayed": k, "segments": n, "escape_probability": escape}
