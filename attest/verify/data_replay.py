"""`--replay-data`: recompute a staged build's dedup and pack shards from the bundle's ingest shards
and declared tokenizer, and the tokenizer itself from its declared sample, and compare them with the
shards and the tokenizer the chain declares.

The stages are kai-train's own (data_pipelines.stages; for a build on datatrove, the dedup stages of
data_pipelines.engine on datatrove's local executor with the recorded task layout), run with the
parameters each manifest records, reading only bundle files whose digests the chain signs and writing into a temporary
folder. A shard is reproduced when its sha256 matches, or, where the local pyarrow writes other
bytes for the same rows, when its rows are equal. This proves the training rows follow from the
declared ingest shards by the declared dedup and packing; ingest itself reads raw files that a
bundle does not carry. The tokenizer is trained again (data_pipelines.tokenizer.retrain) with the
parameters its statement records, on the sample those parameters draw from the shards it names,
and must be byte-identical to its subject: a tokenizer trained on other text, or recorded with
other sample parameters, fails naming the tokenizer file. Needs kai-train's data pipelines (the `train` extra); no torch.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attest.bundle import BundlePathError, safe_file
from attest.layout import CHAIN_NAME
from attest.verify.findings import Context, Finding, as_dict, as_list, shard_subjects, skipped, subjects_of

SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # as data_pipelines.sources requires

CHECK = "data-replay"


def _staged(ctx: Context) -> dict[str, dict[str, dict[str, Any]]]:
    """stage → {shard name: manifest}, in chain order."""
    out: dict[str, dict[str, dict[str, Any]]] = {"ingest": {}, "dedup": {}, "pack": {}}
    for e in ctx.of_kind("data-shard"):
        m = as_dict(e.predicate.get("manifest"))
        name = next((s["name"] for s in subjects_of(e) if s["name"].endswith(".parquet")), None)
        if name is not None and m.get("stage") in out:
            out[m["stage"]][name] = m
    return out


def _inside(ctx: Context, name: str) -> bool:
    """A plain relative path to a regular file in the bundle, or to nothing (absent: skipped later)."""
    try:
        safe_file(ctx.root, name)
    except FileNotFoundError:
        return True
    except BundlePathError:
        return False
    return True


# Work budget of --replay-data, charged from the manifests before any stage runs (docs/threat-model.md).
MAX_NUM_PERM = 4096  # MinHash permutations (data_pipelines.dedup.MAX_NUM_PERM)
MAX_SHINGLE = 1024
MAX_TASKS = 1024  # dedup tasks of a datatrove layout
MAX_SHARD_ROWS = 1 << 31
MAX_SHARD_MB = 1 << 16
MAX_SEQ_LEN = 1 << 20


def _whole(where: str, v: Any, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{where} = {str(v)[:40]}: expected a whole number in [{lo}, {hi}]")
    return v


def _charge(dparams: dict[str, Any], pparams: dict[str, Any]) -> None:
    """Refuse a recorded parameter that is of the wrong type or outside the work budget (ValueError)."""
    _whole("dedup num_perm", dparams.get("num_perm"), 16, MAX_NUM_PERM)
    _whole("dedup shingle", dparams.get("shingle"), 1, MAX_SHINGLE)
    layout = dparams.get("layout")
    if layout is not None:
        _whole("dedup layout.tasks", as_dict(layout).get("tasks"), 1, MAX_TASKS)
    for stage, params in (("dedup", dparams), ("pack", pparams)):
        bounds = as_dict(params.get("shards"))
        _whole(f"{stage} shards.rows", bounds.get("rows"), 1, MAX_SHARD_ROWS)
        mb = bounds.get("max_mb")
        if not isinstance(mb, (int, float)) or isinstance(mb, bool) or not 0 < mb <= MAX_SHARD_MB:
            raise ValueError(f"{stage} shards.max_mb = {str(mb)[:40]}: expected a number in (0, {MAX_SHARD_MB}]")
    _whole("pack seq_len", pparams.get("seq_len"), 1, MAX_SEQ_LEN)


def _one(manifests: dict[str, dict[str, Any]], key: str) -> Any:
    values = {repr(m.get(key)) for m in manifests.values()}
    if len(values) != 1:
        raise ValueError(f"the shards of one stage record {len(values)} different {key!r}")
    return next(iter(manifests.values())).get(key)


def check_data_replay(ctx: Context) -> Iterator[Finding]:
    if not getattr(ctx, "replay_data", False):
        yield skipped(CHECK, "", "data replay not run (ask for it with --replay-data)")
        return
    staged = _staged(ctx)
    if not staged["dedup"] or not staged["pack"]:
        yield skipped(CHECK, "", "no staged kai-data build in the chain (no dedup and pack shards)")
        return
    # names and source names come from the bundle: refuse any that would leave it (or the temp folder)
    names = [n for st in staged.values() for n in st]
    sources = {as_dict(m.get("source")).get("name") for st in staged.values() for m in st.values()}
    unsafe = [n for n in names if not _inside(ctx, n)] + [repr(s) for s in sources
                                                         if not isinstance(s, str) or not SOURCE_NAME.fullmatch(s)]
    if unsafe:
        yield Finding(CHECK, False, unsafe[0], "shard paths inside the bundle and plain source names",
                      f"{len(unsafe)} that are not")
        return
    absent = [n for n in names if not (ctx.root / n).is_file()]
    if absent:
        yield skipped(CHECK, "", f"{len(absent)} shard files are not in the bundle (made with --no-data?)")
        return
    try:
        from data_pipelines import stages
        from data_pipelines.dedup import SCHEME, SHINGLE_HASH, DedupConfig
        from data_pipelines.sources import Source
        from data_pipelines.tokenizer import load_tokenizer
    except ImportError as e:
        yield skipped(CHECK, "", f"needs kai-train's data pipelines (pip install 'kai-train[train]'): {e}")
        return
    try:
        yield from _replay(ctx, staged, stages, DedupConfig, SCHEME, SHINGLE_HASH, Source, load_tokenizer)
    except (ValueError, LookupError, TypeError, AttributeError, OSError) as e:
        yield Finding(CHECK, False, "", "the recorded stages to run again", f"{type(e).__name__}: {e}")


def _replay(ctx: Context, staged: dict[str, dict[str, dict[str, Any]]], stages: Any, DedupConfig: Any,
            scheme: str, shingle_hash: str, Source: Any, load_tokenizer: Any) -> Iterator[Finding]:
    import pyarrow.parquet as pq

    dparams, pparams = _one(staged["dedup"], "params"), _one(staged["pack"], "params")
    if not isinstance(dparams, dict) or not isinstance(pparams, dict):
        raise ValueError("the dedup and pack manifests record params as objects")
    if "shards" not in dparams or "shards" not in pparams:
        yield skipped(CHECK, "", "the manifests do not record their shard bounds (built by an older kai-data)")
        return
    _charge(dparams, pparams)
    from data_pipelines.dedup import DATATROVE_SCHEME

    engine: Any = None
    if dparams.get("scheme") == DATATROVE_SCHEME:  # built on datatrove's executors (data_pipelines.engine)
        try:
            from data_pipelines import engine as datatrove_engine
        except ImportError as e:
            yield skipped(CHECK, "", f"dedup recorded by kai-data on datatrove; needs datatrove "
                                     f"(pip install 'kai-train[train]'): {e}")
            return
        engine = datatrove_engine
        scheme = engine.ENGINE
    if (dparams.get("scheme"), dparams.get("shingle_hash")) != (scheme, shingle_hash):
        yield skipped(CHECK, "", f"dedup recorded with MinHash {dparams.get('scheme')}/{dparams.get('shingle_hash')}; "
                                 f"this version computes {scheme}/{shingle_hash}")
        return
    # sources in the order dedup ran (declared order); each with its ingest shards in index order
    order = list(dict.fromkeys(m["source"]["name"] for m in staged["dedup"].values()))
    sources = [Source(n, "", (), next(m["source"] for m in staged["dedup"].values() if m["source"]["name"] == n))
               for n in order]
    inputs = {n: sorted(k for k, m in staged["ingest"].items() if m["source"]["name"] == n) for n in order}
    made: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kai-data-replay-") as tmp:
        b = stages.Build.replay(ctx.root, Path(tmp), staged["ingest"], dparams["shards"],
                                lambda name, m: made.__setitem__(name, m))
        if engine is not None:  # the recorded task layout, on datatrove's local executor
            made.update(engine.replay_dedup(ctx.root, Path(tmp), sources, staged["ingest"], dparams))
        else:
            config = {k: v for k, v in dparams.items() if k not in ("scheme", "shingle_hash", "shards")}
            stages.dedup(b, sources, inputs, DedupConfig(**config))
        tok = pparams["tokenizer"]
        b.rows, b.max_bytes = int(pparams["shards"]["rows"]), int(float(pparams["shards"]["max_mb"]) * 2**20)
        b.bounds = dict(pparams["shards"])
        b.root = ctx.root  # the dedup shards just made are compared below, then read from the bundle
        b.recorded.update(staged["dedup"])
        stages.pack(b, sources, {n: sorted(k for k, m in staged["dedup"].items() if m["source"]["name"] == n)
                                 for n in order}, load_tokenizer(ctx.files.path(tok["name"])), int(pparams["seq_len"]), tok)
        bytes_equal = rows_equal = 0
        bad = 0
        for stage in ("dedup", "pack"):
            want = staged[stage]
            got = {n: m for n, m in made.items() if m.get("stage") == stage}
            for name in sorted(set(want) | set(got)):
                if name not in got or name not in want:
                    bad += 1
                    yield Finding(CHECK, False, name, "declared and recomputed" if name in want else "not recomputed",
                                  "not recomputed" if name in want else "recomputed but not declared")
                elif got[name]["sha256"] == want[name]["sha256"]:
                    bytes_equal += 1
                elif pq.read_table(Path(tmp) / name).equals(pq.read_table(ctx.files.path(name))):
                    rows_equal += 1
                else:
                    bad += 1
                    yield Finding(CHECK, False, name, f"the rows {stage} computes from the declared inputs",
                                  f"other rows ({want[name].get('rows')} declared, {got[name].get('rows')} recomputed)")
    tok_bad, tok_note = _replay_tokenizer(ctx)
    yield from tok_bad
    if not bad and not tok_bad:
        yield Finding(CHECK, True, "", detail=f"{bytes_equal + rows_equal} dedup and pack shards recomputed from "
                      f"{sum(len(v) for v in inputs.values())} ingest shards and the declared tokenizer: "
                      f"{bytes_equal} byte-identical, {rows_equal} with equal rows; {tok_note}")


def _replay_tokenizer(ctx: Context) -> tuple[list[Finding], str]:
    """Train the tokenizer again from its statement's recorded parameters on the declared sample of
    the shards it names (`trained_on`, each a declared shard with that sha256) and compare the bytes
    with its subject. Returns (failures, a note for the passing line)."""
    from data_pipelines.tokenizer import retrain

    toks = ctx.of_kind("tokenizer")
    if len(toks) != 1:
        return [Finding(CHECK, False, CHAIN_NAME, "one tokenizer statement to train again", f"{len(toks)}")], ""
    e = toks[0]
    subs = subjects_of(e)
    if len(subs) != 1:
        return [Finding(CHECK, False, ctx.where(e), "one subject: the tokenizer model file", f"{len(subs)} subjects")], ""
    name, want = subs[0]["name"], subs[0]["sha256"]
    declared = shard_subjects(ctx)
    inputs = []
    for t in as_list(e.predicate.get("trained_on")):
        n, d = as_dict(t).get("name"), as_dict(t).get("sha256")
        if not isinstance(n, str) or n not in declared or declared[n][1] != d or not _inside(ctx, n):
            return [Finding(CHECK, False, name, "trained on declared shards (name and sha256)",
                            f"trained_on {str(n)[:80]!r}")], ""
        try:
            inputs.append(ctx.files.path(n))
        except (FileNotFoundError, BundlePathError) as ex:
            return [Finding(CHECK, False, n, "the tokenizer's training shard in the bundle", str(ex)[:120])], ""
    params = as_dict(e.predicate.get("params"))
    try:
        model, sentences, sample_sha = retrain(inputs, params)
    except ValueError as ex:
        return [Finding(CHECK, False, name, "parameters this version can train the tokenizer with again", str(ex)[:200])], ""
    got = hashlib.sha256(model).hexdigest()
    out = []
    if params.get("sentences") != sentences or params.get("sample_sha256") != sample_sha:
        out.append(Finding(CHECK, False, name, f"the recorded sample ({params.get('sentences')} sentences, "
                           f"sha256 {str(params.get('sample_sha256'))[:16]}…)",
                           f"{sentences} sentences, sha256 {sample_sha[:16]}… drawn from trained_on by the recorded sample"))
    if got != want:
        try:
            from importlib.metadata import version

            here = f"sentencepiece {version('sentencepiece')}"
        except Exception:  # noqa: BLE001 - only for the message
            here = "sentencepiece (version unknown)"
        out.append(Finding(CHECK, False, name, f"sha256 {str(want)[:16]}… (the declared tokenizer)",
                           f"sha256 {got[:16]}… trained again on the declared sample",
                           detail=f"recorded trainer {str(e.predicate.get('trainer'))[:40]}, here {here}"))
    return out, f"tokenizer {name} trained again on {sentences} sentences: byte-identical"
