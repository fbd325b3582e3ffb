"""The staged build — ingest → dedup → tokenizer → pack — streaming, resumable, signed as it goes.

Each stage streams its input and writes bounded Parquet shards through a `ShardSink`: a shard is
cut after `rows` rows or `max_mb` MiB, written atomically next to its manifest, and appended to
the chain as a `data-shard` statement before the next one starts. Nothing is held but the shard
being filled (and the dedup index).

Resuming is reading the chain. Shard k of (stage, source) has a fixed name, and every stage is a
pure function of its inputs and parameters, so a rerun recomputes the same rows and writes only
the shards the chain does not hold yet; it refuses (one line) when a recorded shard's parameters
or row count would change. Ingest skips the raw items its recorded shards cover (their manifest's
`positions`) without decoding them; dedup and pack re-stream their inputs to rebuild their state.
"""

from __future__ import annotations

import json
import multiprocessing
from importlib import metadata
import queue
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attest import failpoints
from attest.chain import ChainWriter, read_chain
from attest.digest import sha256_file
from attest.errors import KaiError
from attest.statements import subject
from data_pipelines import shards
from data_pipelines.dedup import SCHEME, SHINGLE_HASH, Deduper, DedupConfig
from data_pipelines.pack import PACKED_SCHEMA, Packer, packed_table
from data_pipelines.sources import Normalize, Source, iter_records
from data_pipelines.tokenizer import train_tokenizer

STAGE_DIRS = {"ingest": "data/ingest", "dedup": "data/dedup", "pack": "data/shards"}


class ResumeConflict(KaiError, ValueError):
    """A rerun would change a shard the chain already records."""


class Build:
    """What every stage shares: the output root, the chain, and what the chain already records."""

    def __init__(self, root: Path, chain: ChainWriter, rows: int, max_mb: float,
                 log: Callable[[str], None] = print) -> None:
        if rows < 1 or max_mb <= 0:
            raise ValueError(f"shards.rows must be >= 1 and shards.max_mb > 0, got {rows}, {max_mb}")
        self.root, self.chain, self.rows, self.max_bytes, self.log = root, chain, rows, int(max_mb * 2**20), log
        self.out = root  # where new shards are written (a replay writes elsewhere)
        self.bounds = {"rows": rows, "max_mb": max_mb}
        for pattern in ("data/*/.*.tmp-*", f"data/*/{shards.MANIFEST_DIR}/.*.tmp-*"):
            for stale in root.glob(pattern):  # left by a build that died mid-shard; never recorded
                stale.unlink()
        self._read_chain(chain.path)

    @classmethod
    def worker(cls, root: Path, chain_path: Path, bounds: dict[str, Any]) -> Build:
        """A Build for a task on any machine: it reads what the chain records, writes shards and
        manifests, and signs nothing (the seal step does, after the task has finished)."""
        b = cls.__new__(cls)
        b.root = b.out = root
        b.chain, b.log = None, lambda s: None  # type: ignore[assignment]
        b.rows, b.max_bytes, b.bounds = int(bounds["rows"]), int(float(bounds["max_mb"]) * 2**20), dict(bounds)
        b._read_chain(chain_path)
        b.record = lambda name, manifest: b.recorded.__setitem__(name, manifest)  # type: ignore[method-assign]
        return b

    def _read_chain(self, path: Path) -> None:
        entries, _ = read_chain(path) if path.exists() else ([], False)
        self.recorded: dict[str, dict[str, Any]] = {}
        self.tokenizer: dict[str, Any] | None = None
        for e in entries:
            if e.kind == "data-shard":
                parquet = next(s["name"] for s in e.statement["subject"] if s["name"].endswith(".parquet"))
                self.recorded[parquet] = e.predicate["manifest"]
            elif e.kind == "tokenizer":
                self.tokenizer = {"subject": e.statement["subject"][0], **e.predicate}

    @classmethod
    def replay(cls, root: Path, out: Path, recorded: dict[str, dict[str, Any]], bounds: dict[str, Any],
               record: Callable[[str, dict[str, Any]], None]) -> Build:
        """A Build that reads the shards `recorded` names under `root` (a bundle), writes what it
        computes under `out`, and hands each shard to `record` instead of signing it."""
        b = cls.__new__(cls)
        b.root, b.out, b.chain, b.log, b.tokenizer = root, out, None, lambda s: None, None
        b.rows, b.max_bytes, b.bounds = int(bounds["rows"]), int(float(bounds["max_mb"]) * 2**20), dict(bounds)
        b.recorded = dict(recorded)

        def keep(name: str, manifest: dict[str, Any]) -> None:
            b.recorded[name] = manifest
            record(name, manifest)

        b.record = keep  # type: ignore[method-assign]
        return b

    def shard_name(self, stage: str, source: str, index: int) -> str:
        return f"{STAGE_DIRS[stage]}/{source}-{index:05d}.parquet"

    def recorded_of(self, stage: str, source: str) -> list[tuple[str, dict[str, Any]]]:
        """Recorded shards of (stage, source) in index order; they must be 0, 1, 2, ... without a gap."""
        out = []
        while (name := self.shard_name(stage, source, len(out))) in self.recorded:
            out.append((name, self.recorded[name]))
        return out

    def record(self, name: str, manifest: dict[str, Any]) -> None:
        """Sign a written shard (file and manifest on disk) into the chain."""
        man = shards.manifest_path(self.root / name)
        self.chain.append("data-shard", [subject(name, manifest["sha256"]),
                                         subject(str(man.relative_to(self.root)), sha256_file(man))],
                          {"manifest": manifest})
        self.recorded[name] = manifest
        src = manifest["source"]
        self.log(f"[kai-data] {name}: {manifest['rows']} rows ({manifest['stage']}, {src['name']}, {src['license']})")

    def input_path(self, name: str) -> Path:
        """A recorded shard to read, after checking that the file still has its recorded digest."""
        path = self.root / name
        want = self.recorded[name]["sha256"]
        if not path.is_file() or sha256_file(path) != want:
            raise ResumeConflict(f"{path}: missing or not the shard the chain records (sha256 {want[:12]}…)")
        return path


class ShardSink:
    """Streams one (stage, source)'s rows into bounded shards, each written and signed in turn.

    Rows reach the open shard a row group at a time. A full shard is closed only when the next row
    arrives (or at `close`), so the drop/removal counts and raw positions up to that row belong to
    it and shards tile the input exactly. A shard the chain already records is not written again:
    its rows are only counted and compared with the record.
    """

    def __init__(self, build: Build, stage: str, source: Source, params: dict[str, Any],
                 to_table: Callable[[list[dict[str, Any]]], pa.Table], schema: pa.Schema, start_index: int = 0,
                 start_pos: int | None = None) -> None:
        self.b, self.stage, self.source = build, stage, source
        # the shard bounds are part of what a stage computes: a replay needs them to cut the same shards
        self.params = json.loads(json.dumps({**params, "shards": build.bounds}))
        self.to_table, self.schema = to_table, schema
        self.index = start_index
        self.file: shards.ShardFile | None = None  # None while re-streaming a recorded shard
        self.group: list[dict[str, Any]] = []
        self.group_bytes = 0
        self.rows = self.bytes = self.tokens = 0
        self.origins: dict[str, None] = {}
        self.counts: Counter[str] = Counter()
        self.first_pos = start_pos  # raw input positions [first_pos, end) of the open shard (ingest only)
        self.written: list[str] = []

    def add(self, row: dict[str, Any], nbytes: int, origins: list[str], pos: int | None = None) -> None:
        if self.rows and (self.rows >= self.b.rows or self.bytes + nbytes > self.b.max_bytes):
            self._finish(end_pos=pos)
        if not self.rows and self.b.shard_name(self.stage, self.source.name, self.index) not in self.b.recorded:
            self.file = shards.ShardFile(self.b.out / self.b.shard_name(self.stage, self.source.name, self.index),
                                         self.schema, self.source.record)
        self.group.append(row)
        self.group_bytes += nbytes
        self.rows, self.bytes = self.rows + 1, self.bytes + nbytes
        if "tokens" in row:
            self.tokens += int(np.count_nonzero(np.asarray(row["tokens"]) != self.params["pad_id"]))
        self.origins.update(dict.fromkeys(origins))
        if len(self.group) >= shards.ROW_GROUP_ROWS or self.group_bytes >= shards.ROW_GROUP_BYTES:
            self._write_group()

    def count(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    def close(self, end_pos: int | None = None) -> list[str]:
        if self.rows:
            self._finish(end_pos)
        elif self.index == 0:
            raise ValueError(f"source {self.source.name!r}: no records left after the {self.stage} stage")
        return self.written

    def _write_group(self) -> None:
        if self.file is not None and self.group:
            self.file.write(self.to_table(self.group))
        self.group, self.group_bytes = [], 0

    def _finish(self, end_pos: int | None) -> None:
        self._write_group()
        name = self.b.shard_name(self.stage, self.source.name, self.index)
        extra: dict[str, Any] = {"stage": self.stage, "params": self.params, "counts": dict(sorted(self.counts.items()))}
        if self.first_pos is not None:
            extra["positions"] = [self.first_pos, end_pos]
        if self.stage == "pack":
            extra["tokens"] = self.tokens
        if self.file is None:
            self._check_same(name, self.b.recorded[name], extra)
        else:
            derived = [{"path": o, "sha256": self.b.recorded[o]["sha256"]} for o in self.origins]
            manifest = self.file.close(derived, extra)
            failpoints.reached("shard-written")
            self.b.record(name, manifest)
        self.written.append(name)
        self.index += 1
        self.file, self.rows, self.bytes, self.tokens, self.origins, self.counts = None, 0, 0, 0, {}, Counter()
        self.first_pos = end_pos

    def _check_same(self, name: str, recorded: dict[str, Any], extra: dict[str, Any]) -> None:
        for key, now in (("params", extra["params"]), ("rows", self.rows), ("counts", extra["counts"])):
            if recorded.get(key) != now:
                raise ResumeConflict(f"{self.b.root / name}: recorded with {key} {recorded.get(key)!r}, "
                                     f"this build gives {now!r}; use the recorded config or a new out_dir")


def record_bytes(r: dict[str, Any]) -> int:
    """Approximate in-memory size of a record, for the shard byte bound."""
    audio = r.get("audio")
    return len(r["text"].encode()) + len(r.get("image") or b"") + (0 if audio is None else 4 * len(audio)) + 64


# --- stages ---------------------------------------------------------------------------------------

def ingest(b: Build, source: Source, norm: Normalize) -> list[str]:
    """Raw source → normalized record shards; resumes after the last recorded shard's raw range."""
    done = b.recorded_of("ingest", source.name)
    start = done[-1][1]["positions"][1] if done else 0
    params = {"normalize": asdict(norm), "format": source.format}
    sink = ShardSink(b, "ingest", source, params, partial(shards.records_table, sample_rate=norm.sample_rate),
                     shards.with_features(shards.SCHEMA, norm.sample_rate), start_index=len(done), start_pos=start)
    stats: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for pos, record in iter_records(source, norm, stats, start=start):
        _move_counts(stats, seen, sink)
        sink.add(record, record_bytes(record), [], pos)
    _move_counts(stats, seen, sink)
    return [n for n, _ in done] + sink.close(end_pos=start + stats["read"])


def ingest_all(b: Build, sources: list[Source], norm: Normalize, jobs: int = 1) -> dict[str, list[str]]:
    """Ingest every source; with jobs > 1, one source per process, `jobs` at a time.

    Workers write shards and manifests; only this process signs, so statements arrive in the
    chain as shards complete (interleaved across sources: resuming goes by shard name, not by
    chain position). A worker's error, or its death, stops the build with one line.
    """
    if jobs <= 1 or len(sources) <= 1:
        return {s.name: ingest(b, s, norm) for s in sources}
    ctx = multiprocessing.get_context("fork")  # workers inherit the Build; nothing to pickle but messages
    messages = ctx.Queue()
    pending, running, out = list(sources), {}, {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                s = pending.pop(0)
                running[s.name] = ctx.Process(target=_ingest_worker, args=(b, s, norm, messages), daemon=True)
                running[s.name].start()
            try:
                kind, name, payload = messages.get(timeout=0.5)
            except queue.Empty:
                dead = [n for n, p in running.items() if p.exitcode is not None and messages.empty()]
                if dead:
                    raise ValueError(f"source {dead[0]!r}: ingest worker died (exit {running[dead[0]].exitcode})") from None
                continue
            if kind == "shard":
                b.record(name, payload)
            elif kind == "done":
                out[name] = payload
                running.pop(name).join()
            else:
                raise ValueError(payload)
    finally:
        for p in running.values():
            p.terminate()
    return {s.name: out[s.name] for s in sources}


def _ingest_worker(b: Build, source: Source, norm: Normalize, messages: Any) -> None:
    b.record = lambda name, manifest: (b.recorded.__setitem__(name, manifest),  # type: ignore[method-assign]
                                       messages.put(("shard", name, manifest)))
    try:
        messages.put(("done", source.name, ingest(b, source, norm)))
    except Exception as e:  # noqa: BLE001 - reported by the parent as one line
        messages.put(("error", source.name, str(e) if isinstance(e, ValueError) else f"source {source.name!r}: {type(e).__name__}: {e}"))


def _move_counts(stats: Counter[str], seen: Counter[str], sink: ShardSink) -> None:
    """Hand the drop counts that grew since the last call to the shard being filled."""
    for k, v in stats.items():
        if k not in ("read", "kept") and v > seen[k]:
            sink.count(k, v - seen[k])
            seen[k] = v


def _stream(b: Build, names: list[str], columns: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of recorded shards in order, a row group at a time (bounded memory)."""
    for name in names:
        pf = pq.ParquetFile(b.input_path(name))
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            for row in batch.to_pylist():
                yield name, shards.decode_row(row)


def dedup(b: Build, sources: list[Source], inputs: dict[str, list[str]], cfg: DedupConfig) -> dict[str, list[str]]:
    """Exact and near-duplicate removal across all sources, in declared order; first occurrence kept."""
    deduper = Deduper(cfg)
    params = {**asdict(cfg), "scheme": SCHEME, "shingle_hash": SHINGLE_HASH}
    out: dict[str, list[str]] = {}
    for source in sources:
        rate = shards.sample_rate_of(b.root / inputs[source.name][0])
        sink = ShardSink(b, "dedup", source, params, partial(shards.records_table, sample_rate=rate),
                         shards.with_features(shards.SCHEMA, rate))
        for origin, row in _stream(b, inputs[source.name]):
            reason = deduper.check(row)
            if reason is None:
                sink.add(row, record_bytes(row), [origin])
            else:
                sink.count(f"{reason}-duplicate")
        out[source.name] = sink.close()
    return out


def pack(b: Build, sources: list[Source], inputs: dict[str, list[str]], sp: Any, seq_len: int,
         tokenizer: dict[str, str]) -> dict[str, list[str]]:
    """Tokenize and pack each source's records into `seq_len`-token rows (see data_pipelines.pack)."""
    params = {"seq_len": seq_len, "tokenizer": tokenizer, "pad_id": max(sp.pad_id(), 0)}
    out: dict[str, list[str]] = {}
    for source in sources:
        packer = Packer(sp, seq_len)
        rate = shards.sample_rate_of(b.root / inputs[source.name][0])
        sink = ShardSink(b, "pack", source, params, partial(packed_table, sample_rate=rate),
                         shards.with_features(PACKED_SCHEMA, rate))
        for origin, row in _stream(b, inputs[source.name]):
            for packed, origins in packer.add(source.name, row, origin):
                sink.add(packed, 4 * seq_len + record_bytes({**packed, "text": ""}), origins)
        for packed, origins in packer.finish(source.name):
            sink.add(packed, 4 * seq_len, origins)
        out[source.name] = sink.close()
    return out


def tokenizer_stage(b: Build, inputs: list[str], prefix: Path, cfg: dict[str, Any]) -> Path:
    """Train the tokenizer on the declared sample of `inputs`, or reuse the one the chain records."""
    trained_on = [{"name": n, "sha256": b.recorded[n]["sha256"]} for n in inputs]
    sample = {"every": cfg["every"], "max_sentences": cfg["max_sentences"]}
    rec = b.tokenizer
    if rec is not None:
        path = b.root / rec["subject"]["name"]
        same = (rec["trained_on"] == trained_on and rec["params"].get("vocab_size") == cfg["vocab_size"]
                and rec["params"].get("sample") == sample)
        if not same:
            raise ResumeConflict(f"{b.chain.path}: records a tokenizer trained on other shards or parameters; "
                                 "use the recorded config or a new out_dir")
        if not path.is_file() or sha256_file(path) != rec["subject"]["digest"]["sha256"]:
            raise ResumeConflict(f"{path}: missing or not the tokenizer the chain records")
        return path
    model, params = train_tokenizer([b.input_path(n) for n in inputs], prefix, cfg["vocab_size"],
                                    cfg["max_sentences"], cfg["every"])
    b.chain.append("tokenizer", [subject(str(model.relative_to(b.root)), sha256_file(model))],
                   {"trainer": f"sentencepiece {metadata.version('sentencepiece')}", "params": params,
                    "trained_on": trained_on})
    b.log(f"[kai-data] tokenizer {model.relative_to(b.root)} ({params['sentences']} sentences)")
    return model
