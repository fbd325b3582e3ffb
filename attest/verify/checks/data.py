"""Verifier checks on the training data: lineage (every shard used is declared with that digest,
manifests agree with their statements, `derived_from` closes back to declared shards), licences
(SPDX id, collection method and synthetic generator, judged against the policy) and the sampler
(kind, mixture and per-source counts recomputed from the signed config)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from attest import jsonread
from attest.bundle import shard_manifest_name
from attest.chain import Entry
from attest.layout import CHAIN_NAME
from attest.verify.findings import (
    UNREADABLE,
    Context,
    Finding,
    as_dict,
    as_list,
    shard_subjects,
    short,
    skipped,
    subjects_of,
)
from attest.statements import NO_GENERATOR, SYNTHETIC_MARKERS

MAX_MANIFEST_BYTES = 16 << 20


def _read_json(ctx: Context, name: str) -> Any:
    """A manifest file through the strict reader (JsonReadError names the file and the problem)."""
    return jsonread.load_file(ctx.files.path(name), MAX_MANIFEST_BYTES, where=name)


def check_data_lineage(ctx: Context) -> Iterator[Finding]:
    """Every shard used (by the tokenizer, the run config, a checkpoint) is declared with that digest;
    each shard's manifest file says what its statement says; `derived_from` closes back to shards
    declared earlier."""
    declared = shard_subjects(ctx)
    sources: dict[Any, Any] = {}  # shard sha256 → its manifest's source block
    bad = 0
    shards = 0
    for i, e in enumerate(ctx.entries):
        if e.kind != "data-shard":
            continue
        shards += 1
        manifest = as_dict(e.predicate.get("manifest"))
        subs = subjects_of(e)
        parquet = [s for s in subs if s["name"].endswith(".parquet")]
        mfiles = [s["name"] for s in subs if s["name"].endswith(".json")]
        if len(parquet) != 1 or mfiles != [shard_manifest_name(parquet[0]["name"])]:
            bad += 1
            yield Finding("data-lineage", False, ctx.where(e),
                          "one .parquet shard and its manifest at DIR/.manifests/NAME.manifest.json",
                          f"subjects {[s['name'] for s in subs][:4]}")
        if parquet and manifest.get("sha256") != parquet[0]["sha256"]:
            bad += 1
            yield Finding("data-lineage", False, parquet[0]["name"], f"manifest sha256 {short(parquet[0]['sha256'])} (the subject)",
                          short(manifest.get("sha256")))
        for m in mfiles:
            try:
                on_disk = _read_json(ctx, m)
            except jsonread.JsonReadError as err:
                bad += 1
                yield Finding("data-lineage", False, m, "a manifest file in strict JSON", str(err).removeprefix(f"{m}: "))
                continue
            except UNREADABLE:
                continue  # subject-digest reports it
            if on_disk != manifest:
                bad += 1
                yield Finding("data-lineage", False, m, "the manifest the statement records", "a different manifest file")
        for j, src in enumerate(as_list(manifest.get("derived_from"))):
            want = as_dict(src).get("sha256")
            earlier = [n for n, (k, d) in declared.items() if k < i and d == want]
            if not earlier:
                bad += 1
                yield Finding("data-lineage", False, ctx.where(e), f"derived_from[{j}] a shard declared earlier",
                              f"{as_dict(src).get('path')} sha256 {short(want)} is not one")
            elif (parent := sources.get(want)) is not None and parent != manifest.get("source"):
                # a stage never changes where data came from: a different source block is a relabelled licence
                bad += 1
                yield Finding("data-lineage", False, ctx.where(e),
                              f"the source of derived_from[{j}] ({earlier[0]}): {_source_brief(parent)}",
                              _source_brief(as_dict(manifest.get("source"))))
        if isinstance(manifest.get("sha256"), str):  # a hostile manifest may put a list here
            sources.setdefault(manifest["sha256"], manifest.get("source"))
    uses: list[tuple[Entry, Any, Any]] = []  # (entry, shard name, sha256): as the bundle has them, checked below
    for e in ctx.entries:
        if e.kind == "tokenizer":
            uses += [(e, as_dict(t).get("name"), as_dict(t).get("sha256")) for t in as_list(e.predicate.get("trained_on"))]
        elif e.kind == "checkpoint":
            uses += [(e, n, None) for n in as_list(as_dict(e.predicate.get("data_consumed")).get("shards"))]
        elif e.kind == "run":
            uses += [(e, as_dict(t).get("name"), as_dict(t).get("sha256")) for t in as_list(ctx.run_config.get("data_shards"))]
    missing: dict[str, Entry] = {}
    for e, name, sha in uses:
        if not isinstance(name, str) or name not in declared:
            missing.setdefault(str(name), e)
        elif sha is not None and sha != declared[name][1]:
            bad += 1
            yield Finding("data-lineage", False, ctx.where(e), f"{name} sha256 {short(declared[name][1])} (declared)", f"sha256 {short(sha)}")
    for name, e in missing.items():
        bad += 1
        yield Finding("data-lineage", False, ctx.where(e), f"{name} declared by a data-shard statement", f"undeclared (used by the {e.kind})")
    for finding in [*_accounting(ctx), *_tokenizer_use(ctx)]:
        bad += 1
        yield finding
    if not bad:
        staged = any(as_dict(e.predicate.get("manifest")).get("stage") == "ingest" for e in ctx.of_kind("data-shard"))
        yield Finding("data-lineage", True, "", detail=f"{shards} shards declared; every shard used is declared; lineage closes"
                      + ("; every raw item is kept, dropped or removed exactly once" if staged else ""))


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _tokenizer_use(ctx: Context) -> Iterator[Finding]:
    """The tokenizer the run trained with and the one packed shards were tokenized with are the
    tokenizer a `tokenizer` statement declares (same path and sha256, declared before the shard)."""
    declared: list[tuple[int, str, str]] = []  # (entry index, name, sha256)
    for i, e in enumerate(ctx.entries):
        if e.kind == "tokenizer":
            declared += [(i, s["name"], s["sha256"]) for s in subjects_of(e)]
        elif e.kind == "data-shard":
            used = as_dict(as_dict(as_dict(e.predicate.get("manifest")).get("params")).get("tokenizer"))
            if used and not any(n == used.get("name") and d == used.get("sha256") for _, n, d in declared):
                yield Finding("data-lineage", False, ctx.where(e), "packed with a tokenizer declared earlier",
                              f"{used.get('name')} sha256 {short(used.get('sha256'))}")
    run = ctx.run_config.get("tokenizer")
    runs = ctx.of_kind("run")
    if declared and runs and isinstance(run, str) and run not in {n for _, n, _ in declared}:
        yield Finding("data-lineage", False, ctx.where(runs[0]), "the run's tokenizer to be the declared one",
                      f"{run} (declared: {', '.join(sorted({n for _, n, _ in declared}))})")


def _accounting(ctx: Context) -> Iterator[Finding]:
    """Staged builds (manifests with `stage`): per source, the ingest shards' raw `positions` tile
    [0, n) and each holds rows + dropped = its span; dedup rows + removed = ingest rows."""
    ingest: dict[str, list[tuple[Entry, dict[str, Any]]]] = {}
    dedup_total: dict[str, int] = {}
    for e in ctx.of_kind("data-shard"):
        m = as_dict(e.predicate.get("manifest"))
        src = str(as_dict(m.get("source")).get("name"))
        counts = sum(v for v in as_dict(m.get("counts")).values() if _int(v) is not None)
        rows = _int(m.get("rows")) or 0
        if m.get("stage") == "ingest":
            ingest.setdefault(src, []).append((e, m))
        elif m.get("stage") == "dedup":
            dedup_total[src] = dedup_total.get(src, 0) + rows + counts
    for src, shards in ingest.items():
        end = 0
        kept = 0
        for e, m in shards:
            pos = as_list(m.get("positions"))
            lo, hi = (_int(pos[0]), _int(pos[1])) if len(pos) == 2 else (None, None)
            rows = _int(m.get("rows")) or 0
            dropped = sum(v for v in as_dict(m.get("counts")).values() if _int(v) is not None)
            kept += rows
            if lo != end or hi is None or hi - lo != rows + dropped:
                yield Finding("data-lineage", False, ctx.where(e),
                              f"source {src!r}: raw positions starting at {end}, spanning rows + dropped = {rows + dropped}",
                              f"positions {pos}")
                break
            end = hi
        if src in dedup_total and dedup_total[src] != kept:
            yield Finding("data-lineage", False, ctx.where(shards[-1][0]),
                          f"source {src!r}: dedup rows + removed = the {kept} ingested rows", f"{dedup_total[src]}")


def _source_brief(source: Any) -> str:
    src = as_dict(source)
    return f"{src.get('name')!s} ({src.get('license')!s}, {src.get('collection')!s})"


def _is_synthetic(source: dict[str, Any]) -> bool:
    return any(m in str(source.get("collection", "")).lower() for m in SYNTHETIC_MARKERS)


def check_data_licence(ctx: Context) -> Iterator[Finding]:
    """Every shard's source names an SPDX licence and a collection method that the policy allows;
    synthetic sources disclose their generator when the policy requires it."""
    pol = ctx.policy
    table: list[dict[str, Any]] = []
    trained = {n for t in as_list(ctx.run_config.get("data_shards")) if isinstance(n := as_dict(t).get("name"), str)}
    bad = 0
    for e in ctx.of_kind("data-shard"):
        m = as_dict(e.predicate.get("manifest"))
        src = as_dict(m.get("source"))
        name = next((s["name"] for s in subjects_of(e) if s["name"].endswith(".parquet")), ctx.where(e))
        lic, coll, gen = src.get("license"), src.get("collection"), src.get("generator")
        table.append({"shard": name, "source": str(src.get("name")), "license": str(lic), "collection": str(coll),
                      "rows": m.get("rows") if isinstance(m.get("rows"), int) else 0, "generator": gen,
                      "modality_counts": as_dict(m.get("modality_counts")), "stage": str(m.get("stage") or "—"),
                      "counts": {str(k): v for k, v in as_dict(m.get("counts")).items() if _int(v) is not None},
                      "trained": name in trained})
        if not isinstance(lic, str) or not lic.strip():
            bad += 1
            yield Finding("data-licence", False, name, "an SPDX licence id", repr(lic))
        elif pol.allowed_licenses is not None and lic not in pol.allowed_licenses:
            bad += 1
            yield Finding("data-licence", False, name, f"a licence in {pol.allowed_licenses} (policy)", lic)
        if pol.allowed_collection_methods is not None and coll not in pol.allowed_collection_methods:
            bad += 1
            yield Finding("data-licence", False, name, f"a collection method in {pol.allowed_collection_methods} (policy)", repr(coll))
        if pol.synthetic_requires_generator and _is_synthetic(src) and (
                not isinstance(gen, str) or gen.strip().lower() in NO_GENERATOR):
            bad += 1
            yield Finding("data-licence", False, name, "a disclosed generator for synthetic data (policy)", repr(gen))
    ctx.facts["data"] = table
    if not bad:
        lics: dict[str, int] = {}
        for r in table:
            lics[r["license"]] = lics.get(r["license"], 0) + 1
        judged = "allowed by the policy" if pol.allowed_licenses is not None else "not judged: no licence policy"
        yield Finding("data-licence", True, "", detail=f"{len(table)} shards: " +
                      ", ".join(f"{k} ×{v}" for k, v in sorted(lics.items())) + f" ({judged})")


def check_data_sampler(ctx: Context) -> Iterator[Finding]:
    """The sampler each checkpoint records is the one the signed run config declares (kind, mixture),
    over the training rows the signed shard manifests hold; with a mixture, each checkpoint's
    per-source counts (`sources`: rows, consumed, seen, epochs) are recomputed from the config and
    the positions, never taken from the statement. torch-free, O(Σ weights) per checkpoint."""
    from attest import sampling

    runs, ckpts = ctx.of_kind("run"), ctx.of_kind("checkpoint")
    if len(runs) != 1:
        yield skipped("data-sampler", CHAIN_NAME, f"{len(runs)} run statements (statement-order reports it)")
        return
    cfg = ctx.run_config
    try:
        kind, mixture = sampling.run_sampler(cfg)
    except ValueError as e:
        yield Finding("data-sampler", False, ctx.where(runs[0]), "a sampler this verifier knows", str(e))
        return
    if kind is None:
        marked = [c for c in ckpts if {"kind", "mixture", "sources"} & set(as_dict(as_dict(
            c.predicate.get("data_consumed")).get("sampler")))]
        for c in marked[:1]:
            yield Finding("data-sampler", False, ctx.where(c), "no sampler kind or mixture (the run config records none)",
                          "a sampler kind or mixture in data_consumed.sampler")
        if not marked:
            yield Finding("data-sampler", True, "", detail="the run records no sampler kind: the per-epoch permutation "
                          "sampler of earlier versions, no mixture (its rows are re-derived by replay)")
        return
    declared = shard_subjects(ctx)
    rows: list[int | None] = []
    sources: list[Any] = []
    train = as_dict(cfg.get("train"))
    for t in as_list(cfg.get("data_shards")):
        name = as_dict(t).get("name")
        entry = ctx.entries[declared[name][0]] if isinstance(name, str) and name in declared else None
        m = as_dict(entry.predicate.get("manifest")) if entry is not None else {}
        rows.append(_int(m.get("rows")))
        sources.append(as_dict(m.get("source")).get("name"))
    try:
        counts = [r for r in rows if r is not None and r >= 0]
        if len(counts) != len(rows) or not rows:
            raise ValueError("every training shard declared with a whole number of rows (data-lineage reports which)")
        h, seed = _int(train.get("holdout_every")), _int(cfg.get("seed"))
        if h is None or seed is None:
            raise ValueError(f"train.holdout_every {train.get('holdout_every')!r}, seed {cfg.get('seed')!r}: "
                             "expected whole numbers")
        sampler = sampling.Sampler(seed, h, counts, [str(s) for s in sources], mixture)
    except ValueError as e:
        yield Finding("data-sampler", False, ctx.where(runs[0]), f"a {kind} sampler over the declared training shards",
                      str(e)[:200])
        return
    bad = 0
    for c in ckpts:
        s = as_dict(as_dict(c.predicate.get("data_consumed")).get("sampler"))
        lo, hi = _int(s.get("position_start")), _int(s.get("position_end"))
        want: dict[str, Any] = {"kind": kind, "mixture": mixture, "num_rows": sampler.num_rows}
        if lo is not None and hi is not None and 0 <= lo <= hi:
            want["sources"] = sampler.record(lo, hi)
        else:
            want["position_start, position_end"] = "0 <= start <= end"
        for key, value in want.items():
            got = s.get(key) if "," not in key else [lo, hi]
            if got != value:
                bad += 1
                yield Finding("data-sampler", False, ctx.where(c), f"data_consumed.sampler.{key} {str(value)[:160]} "
                              "(recomputed from the signed run config and shard manifests)", str(got)[:160])
                break
    if bad:
        return
    detail = f"{kind}: {sampler.num_rows} training rows"
    end = _int(as_dict(as_dict(ckpts[-1].predicate.get("data_consumed")).get("sampler")).get("position_end")) if ckpts else 0
    if mixture is not None and end:
        total = sum(mixture.values())
        parts = [f"{r['name']} {100 * r['weight'] / total:.1f}% declared / {100 * r['seen'] / end:.1f}% read "
                 f"({r['seen']} of {r['rows']} rows: {r['epochs']:g} epochs)" for r in sampler.record(0, end) or []]
        detail += f"; mixture over {end} positions, counts recomputed for {len(ckpts)} checkpoints: " + ", ".join(parts)
        ctx.facts["mixture"] = sampler.record(0, end)
    yield Finding("data-sampler", True, "", detail=detail)
