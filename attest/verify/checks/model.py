"""Verifier checks on the model: genesis re-derivation, the training trajectory (update norms per
segment), the release, and the replay hook (segment replay plug-ins register in REPLAYERS)."""

from __future__ import annotations

import importlib
import json
import os
import random
from pathlib import Path
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from attest import inputs, jsonread, tool_version
from attest.verify import trajectory as traj
from attest.bundle import BundlePathError, folder_entries
from attest.chain import Entry
from attest.digest import merkle_root
from attest.layout import CHAIN_NAME, EXPORT_AUTO_MAP, EXPORT_CODE_FILES, EXPORT_DIR, EXPORT_TOKENIZER_AUTO_MAP
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

    def delta(pair: tuple[tuple[Entry, int], tuple[Entry, int]]) -> traj.SegmentDelta | str | None:
        (a, _), (b, _) = pair
        try:
            return traj.segment_delta([ctx.files.path(f) for f in weights_files(a)],
                                      [ctx.files.path(f) for f in weights_files(b)])
        except FileNotFoundError as ex:
            return None if ctx.light else str(ex)  # None: held by the team (light bundle)
        except UNREADABLE as ex:
            return str(ex)

    if sum(_bytes_of(ctx, b) for _, (b, _) in pairs) > PARALLEL_BYTES:
        with ThreadPoolExecutor(workers()) as pool:
            deltas = list(pool.map(delta, pairs))
    else:
        deltas = [delta(p) for p in pairs]
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


def _canonical(x: Any) -> str:
    """Parsed values compared strictly (1, 1.0 and true differ): their sorted JSON text."""
    return json.dumps(x, sort_keys=True, allow_nan=True)


def check_release(ctx: Context) -> Iterator[Finding]:
    """The release is mandatory and whole: one release statement, after the last checkpoint, naming
    its step and canonical digest; every file in the bundle's export/ folder is one of its subjects;
    export/model.safetensors has the last checkpoint's canonical digest; export/config.json holds the
    genesis recipe's (and the run config's) model config, that step and digest and the run id; the tokenizer it names is the declared one (same sha256); and the export
    folder carries a model-signing signature when the checkpoint folders do (oms-signature checks it)."""
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
    model, config = f"{EXPORT_DIR}/model.safetensors", f"{EXPORT_DIR}/config.json"
    outside = sorted(n for n in subs if not n.startswith(EXPORT_DIR + "/"))
    if outside:
        bad += 1
        yield Finding("release", False, ctx.where(r), f"subjects inside {EXPORT_DIR}/", ", ".join(outside)[:200])
    signed_ckpts = any(s["name"].endswith("/model.sig") for e in ckpts for s in subjects_of(e))
    index = f"{EXPORT_DIR}/model.safetensors.index.json"
    if index in subs:  # sharded weights (the Hugging Face convention): the index must say what the shards hold
        model = index
        for f in _export_index(ctx, index, [n for n in weights_files(r) if n.startswith(EXPORT_DIR + "/")]):
            bad += 1
            yield f
    for need in [model, config] + ([f"{EXPORT_DIR}/model.sig"] if signed_ckpts else []):
        if need not in subs:
            bad += 1
            yield Finding("release", False, need, "a subject of the release statement", "not named by the release")
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
    try:
        found = list(_export_config(ctx, r, config if config in subs else None, last))
    except (RecursionError, TypeError, ValueError) as ex:  # a hostile model config nested too deep to compare
        found = [Finding("release", False, config, "a model config to compare", f"{type(ex).__name__}: {str(ex)[:100]}")]
    for f in found:
        bad += 1
        yield f
    for f in _export_code(ctx, subs):
        bad += 1
        yield f
    if not bad:
        yield Finding("release", True, ctx.where(r), detail=f"step {last.get('step')}, the last checkpoint; "
                      f"{len(subs)} files of {EXPORT_DIR}/ signed, weights, config and tokenizer bound")


def _export_index(ctx: Context, index: str, shards: list[str]) -> Iterator[Finding]:
    """export/model.safetensors.index.json maps every tensor to the signed shard that holds it, and
    nothing else: what a Hugging Face loader reads is exactly what the release binds."""
    try:
        path = ctx.files.path(index)
        if path.stat().st_size > MAX_EXPORT_CONFIG_BYTES * 64:
            raise ValueError(f"more than {MAX_EXPORT_CONFIG_BYTES * 64} bytes")
        doc = jsonread.loads(inputs.read_bytes(path, MAX_EXPORT_CONFIG_BYTES * 64, where=index), index,
                             MAX_EXPORT_CONFIG_BYTES * 64)
    except FileNotFoundError:
        return  # subject-digest reports the missing subject
    except UNREADABLE as ex:
        yield Finding("release", False, index, "a JSON weight index", f"{type(ex).__name__}: {str(ex)[:150]}")
        return
    wmap = as_dict(doc).get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        yield Finding("release", False, index, "weight_map: tensor -> shard file", type(wmap).__name__)
        return
    held: dict[str, str] = {}
    for shard in shards:
        try:
            for t in ctx.files.leaves([shard]):
                held[t] = shard.rsplit("/", 1)[1]
        except UNREADABLE:
            continue  # weights-digest and the root comparison report it
    if wmap != held:
        diff = sorted(set(wmap.items()) ^ set(held.items()))[:3]
        yield Finding("release", False, index, "weight_map = the tensors each signed shard holds",
                      f"{len(set(wmap.items()) ^ set(held.items()))} entries differ, e.g. {diff}"[:200])


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


def _export_code(ctx: Context, subs: dict[str, Any]) -> Iterator[Finding]:
    """The code a user runs when loading export/ with transformers (trust_remote_code) is this
    verifier's own kai-train code, byte for byte, and the auto_maps name only it: a bundle never
    chooses code that runs on a user's machine."""
    for rel in sorted(n for n in subs if n.startswith(EXPORT_DIR + "/") and n.endswith(".py")):
        base = rel.rsplit("/", 1)[-1]
        if rel.count("/") != 1 or base not in EXPORT_CODE_FILES:
            yield Finding("release", False, rel, f"only kai-train's model code ({', '.join(EXPORT_CODE_FILES)})",
                          "another Python file a loader could run")
            continue
        own = _own_code(base)
        try:
            theirs = inputs.read_bytes(ctx.files.path(rel), 16 << 20, where=rel)
        except UNREADABLE as ex:
            yield Finding("release", False, rel, "kai-train's model code", str(ex)[:120])
            continue
        if own is None:
            yield Finding("release", False, rel, f"this verifier's kai_train/{base} to compare with",
                          "kai_train is not installed here")
        elif theirs != own:
            yield Finding("release", False, rel, f"kai_train/{base} of this verifier (kai-train {tool_version()}), "
                          "byte for byte", "other code", "transformers runs this file with trust_remote_code")
    for name, want in ((f"{EXPORT_DIR}/config.json", EXPORT_AUTO_MAP),
                       (f"{EXPORT_DIR}/tokenizer_config.json", EXPORT_TOKENIZER_AUTO_MAP)):
        if name not in subs:
            continue
        try:
            got = as_dict(jsonread.load_file(ctx.files.path(name), 16 << 20)).get("auto_map")
        except UNREADABLE as ex:
            yield Finding("release", False, name, "a readable JSON file", str(ex)[:120])
            continue
        if got is not None and got != want:
            yield Finding("release", False, name, f"auto_map {json.dumps(want)}", json.dumps(got)[:200],
                          "auto_map chooses the code transformers runs")


def _export_config(ctx: Context, r: Entry, name: str | None, last: dict[str, Any]) -> Iterator[Finding]:
    """export/config.json against the chain: model config, step, digest, run id, tokenizer."""
    if name is None:
        return  # reported above: the release does not name it
    try:
        path = ctx.files.path(name)
        if path.stat().st_size > MAX_EXPORT_CONFIG_BYTES:
            raise ValueError(f"more than {MAX_EXPORT_CONFIG_BYTES} bytes")
        cfg = jsonread.loads(inputs.read_bytes(path, MAX_EXPORT_CONFIG_BYTES, where=name), name,
                             MAX_EXPORT_CONFIG_BYTES)  # the strict reader
    except FileNotFoundError:
        return  # subject-digest reports the missing subject
    except UNREADABLE as ex:
        yield Finding("release", False, name, "a JSON export config", f"{type(ex).__name__}: {str(ex)[:150]}")
        return
    if not isinstance(cfg, dict):
        yield Finding("release", False, name, "a JSON object", type(cfg).__name__)
        return
    gens = ctx.of_kind("genesis")
    recipe_model = as_dict(gens[0].predicate.get("recipe")).get("model") if len(gens) == 1 else None
    run_model = ctx.run_config.get("model")
    got = _canonical(cfg.get("model"))
    for what, want in (("the genesis recipe's model config", recipe_model), ("the run config's model", run_model)):
        if want is None or _canonical(want) != got:
            yield Finding("release", False, name, f"model = {what}", "none recorded" if want is None else
                          f"model {_first_difference(want, cfg.get('model'))}")
    expect = {"step": last.get("step"), "weights_root": last.get("weights_root"),
              "run_id": ctx.entries[0].predicate.get("run_id")}
    for key, want in expect.items():
        if _canonical(cfg.get(key)) != _canonical(want):
            yield Finding("release", False, name, f"{key} {short(want)} (the chain)", f"{key} {short(cfg.get(key))}")
    # the tokenizer a user loads with this export is the declared one
    declared = {s["sha256"]: s["name"] for e in ctx.of_kind("tokenizer") for s in subjects_of(e)}
    run_tok = ctx.run_config.get("tokenizer")
    tok = cfg.get("tokenizer")
    if not declared:
        if tok is not None:
            yield Finding("release", False, name, "no tokenizer (the chain declares none)", f"tokenizer {str(tok)[:80]!r}")
        return
    if not isinstance(tok, str) or "/" in tok or tok in ("", ".", ".."):
        yield Finding("release", False, name, "tokenizer: the name of the declared tokenizer's file in export/",
                      repr(tok)[:80])
        return
    tok_file = f"{EXPORT_DIR}/{tok}"
    if tok_file not in {s["name"] for s in subjects_of(r)}:
        yield Finding("release", False, tok_file, "a subject of the release statement", "not named by the release")
        return
    try:
        sha = ctx.files.sha256(tok_file)
    except FileNotFoundError:
        return  # subject-digest reports it
    except UNREADABLE as ex:
        yield Finding("release", False, tok_file, "a readable tokenizer file", str(ex)[:150])
        return
    want_names = [n for n in declared.values() if n == run_tok] or sorted(declared.values())
    want_shas = {d for d, n in declared.items() if n in want_names}
    if sha not in want_shas:
        yield Finding("release", False, tok_file, f"sha256 {short(next(iter(want_shas)))} (the declared tokenizer "
                      f"{want_names[0]})", f"sha256 {short(sha)}")


def _first_difference(want: Any, got: Any) -> str:
    """The first key where two model configs differ, for the failure line."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            if _canonical(want.get(k, "(absent)")) != _canonical(got.get(k, "(absent)")):
                return f"{k}: {str(got.get(k, '(absent)'))[:40]} (recorded {str(want.get(k, '(absent)'))[:40]})"
    return f"{str(got)[:60]} (recorded {str(want)[:60]})"


# ---------------------------------------------------------------- replay (hook)


def replay_segments(ctx: Context, draw: bool = True) -> list[Entry]:
    """The checkpoints whose segments to replay: all, the challenge's, or N chosen at random by the
    verifier after it received the bundle (seeded by --replay-seed for a reproducible choice).
    `draw=False`: only how many (the first N; nothing drawn or recorded)."""
    ckpts = ctx.of_kind("checkpoint")
    if ctx.replay == "all" or ctx.replay is None:
        return ckpts if ctx.replay == "all" else []
    if isinstance(ctx.replay, list):  # a challenge's segments (attest.challenge), drawn by the evaluator
        return [ckpts[i] for i in sorted(set(ctx.replay)) if 0 <= i < len(ckpts)]
    n = max(0, min(int(ctx.replay), len(ckpts)))
    if not draw:
        return ckpts[:n]
    seed = ctx.replay_seed if ctx.replay_seed is not None else int.from_bytes(os.urandom(8), "little")
    ctx.facts["replay_seed"] = seed
    picked = sorted(random.Random(seed).sample(range(len(ckpts)), n))
    return [ckpts[i] for i in picked]


def check_replay(ctx: Context) -> Iterator[Finding]:
    """Re-run chosen segments and compare the result with the next checkpoint (see REPLAYERS). The
    implementation is this verifier's own; a plug-in the bundle names is only noted."""
    if ctx.replay is None:
        yield skipped("replay", "", "replay not run (ask for it with --replay N|all)")
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
    if missing is not None:
        yield skipped("replay", "", f"replay not run: {missing}")
        return
    segments = replay_segments(ctx)
    total = len(ctx.of_kind("checkpoint"))
    ctx.facts["replay_requested"] = {"plugin": DEFAULT_REPLAY_PLUGIN, "segments": [e.predicate.get("step") for e in segments],
                                     "seed": ctx.facts.get("replay_seed")}
    cov = ctx.facts["replay_coverage"] = coverage(len(segments), total)
    ctx.notes.append(f"replay coverage: {len(segments)} of {total} segments; a forgery confined to m segments escapes "
                     "with probability " + ", ".join(f"{p:.3g} (m={m})" for m, p in cov["escape_probability"].items()))
    assert replayer is not None  # `missing` above returned otherwise
    yield from replayer(ctx, segments)


def coverage(k: int, n: int, spans: tuple[int, ...] = (1, 2, 5)) -> dict[str, Any]:
    """What k segments replayed at random of n say: the probability that a forgery confined to m
    segments (any m of them, chosen by the team before the draw) escapes every replay,
    C(n-m, k) / C(n, k), for a few m."""
    from math import comb

    escape = {str(m): (comb(n - m, k) / comb(n, k) if n and m <= n else 0.0) for m in spans if m <= max(n, 1)}
    return {"replayed": k, "segments": n, "escape_probability": escape}
