"""kai-data's stages as datatrove pipeline steps: one build on datatrove's local executor (tasks and
workers on one machine) or its SLURM executor (job arrays), its memory set by the task layout and
never by the size of the corpus.

The plan (stage: tasks, what one task does):

    ingest        one per source   stages.ingest: raw files → data/ingest/SOURCE-NNNNN.parquet
    seal-ingest   1                sign the ingest shards into the chain
    exact-sigs    executor.tasks   the ingest shards in declared order cut into `tasks` contiguous
                                   groups (the task layout): a content hash per record, sorted, on disk
    exact-find    1                datatrove ExactFindDedups: a k-way merge of the sorted hash files
    near-sigs     executor.tasks   a group's records minus exact duplicates: MinHash signatures of
                                   character shingles (text records), one sorted file per LSH band
    near-buckets  bands            datatrove MinhashDedupBuckets: pairs of records that share a band
    near-cluster  1                datatrove MinhashDedupCluster: union-find over those pairs
    dedup         executor.tasks   each ingest shard → its dedup shard (same name under data/dedup)
    seal-dedup    1                sign the dedup shards; train and sign the tokenizer on its sample
    pack          one per source   stages.pack: data/shards/SOURCE-NNNNN.parquet
    seal-pack     1                sign the packed shards

Only a seal step signs. A task writes its shards and manifests (each atomically) and, when it has
finished, a result file naming them; the seal step reads the result files in task order (declared
source order, then shard index), checks each shard's sha256 against its manifest, refuses a
mismatch, and appends one `data-shard` statement per shard. A task killed midway has no result
file, so nothing it wrote is signed; datatrove reruns the tasks without a completion mark, and a
rerun writes the same bytes (every stage is a pure function of its inputs, parameters and layout).

Dedup follows datatrove's sharded MinHash (signatures → buckets → clusters → filter) with two
choices of kai-data: shingles are the character k-grams of data_pipelines.dedup (Hangul and Latin
alike, no word tokenizer), and the LSH bands and rows are what datasketch derives from
`dedup.threshold` and `dedup.num_perm`, so the same threshold means the same banding as the
in-process Deduper. Pairs that share a band are duplicates without a Jaccard confirmation (the
bench measures the precision). Which copy survives depends on the layout, which every dedup
manifest records (`params.layout`, `task`), so `kai-attest verify --replay-data` reruns the same
plan and gets the same shards.

Memory per task: one row group of records, plus the task's own signatures while they are sorted
(records in the group × bands × rows × 8 bytes), plus a few lines per input file in the merge
steps; the cluster step holds the duplicate pairs only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from datasketch.lsh import _optimal_param
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig

from attest import failpoints
from attest.digest import sha256_file
from attest.errors import KaiError
from data_pipelines import shards, stages
from data_pipelines.dedup import DATATROVE_SCHEME, SHINGLE_HASH, DedupConfig, content_key, shingle_hashes
from data_pipelines.sources import Normalize, Source

ENGINE = DATATROVE_SCHEME  # dedup as this module computes it (recorded as params.scheme)
HASH = HashConfig(precision=64, hash_fc="sha1")  # hashlib: no extra dependency, same on every machine


class SealError(KaiError, ValueError):
    """A task's output cannot be signed: unfinished, or its bytes are not what its manifest says."""


def banding(cfg: DedupConfig) -> tuple[int, int]:
    """(bands, rows per band) for the threshold: datasketch's own choice (equal error weights)."""
    return _optimal_param(cfg.threshold, cfg.num_perm, 0.5, 0.5)


@dataclass
class Plan:
    """Everything a task needs, as plain data: it is pickled into SLURM jobs (no keys, no chain writer)."""

    root: Path                       # out_dir: the chain, data/, tokenizer/
    sources: list[Source]
    norm: Normalize
    dedup: DedupConfig
    tasks: int                       # dedup tasks: the layout
    bounds: dict[str, Any]           # shards.rows, shards.max_mb
    tokenizer: dict[str, Any]        # vocab_size, every, max_sentences
    tokenizer_prefix: Path
    seq_len: int
    signer: dict[str, Any] = field(default_factory=dict)  # the attest config, for the seal steps
    run_id: str = ""
    # a replay reads the shards `recorded` names under `inputs` (a bundle) and writes under `root`
    inputs: Path | None = None
    recorded: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise ValueError(f"executor.tasks must be >= 1, got {self.tasks}")

    @property
    def chain_path(self) -> Path:
        return self.root / "chain.jsonl"

    @property
    def work(self) -> Path:
        """Intermediate state (signatures, duplicate lists, task results, datatrove logs), in a folder
        named by everything that decides it, so a changed config never reuses stale state."""
        key = json.dumps([[(s.record, s.format, str(s.root), len(s.files)) for s in self.sources],
                          asdict(self.norm), asdict(self.dedup), self.tasks, self.bounds, self.tokenizer,
                          self.seq_len], sort_keys=True, default=str)
        return self.root / "work" / hashlib.sha256(key.encode()).hexdigest()[:12]

    def build(self) -> stages.Build:
        if self.recorded is not None and self.inputs is not None:
            return stages.Build.replay(self.inputs, self.root, self.recorded, self.bounds, lambda name, m: None)
        return stages.Build.worker(self.root, self.chain_path, self.bounds)

    def groups(self, b: stages.Build) -> list[list[str]]:
        """The task layout: the recorded ingest shards in declared order, cut into `tasks` contiguous groups."""
        names = [n for s in self.sources for n, _ in b.recorded_of("ingest", s.name)]
        return [names[t * len(names) // self.tasks:(t + 1) * len(names) // self.tasks] for t in range(self.tasks)]

    def dedup_params(self) -> dict[str, Any]:
        bands, rows = banding(self.dedup)
        return {**asdict(self.dedup), "scheme": ENGINE, "shingle_hash": SHINGLE_HASH, "bands": bands, "rows": rows,
                "layout": {"tasks": self.tasks, "groups": "contiguous"}, "shards": dict(self.bounds)}

    def minhash(self) -> MinhashConfig:
        bands, rows = banding(self.dedup)
        return MinhashConfig(n_grams=self.dedup.shingle, num_buckets=bands, hashes_per_bucket=rows,
                             seed=self.dedup.seed, hash_config=HASH)

    def result(self, stage: str, rank: int) -> Path:
        return self.work / "results" / stage / f"{rank:05d}.json"


def _write_result(plan: Plan, stage: str, rank: int, names: list[str]) -> None:
    """Mark a task finished with the shards it produced (atomic: present means whole)."""
    path = plan.result(stage, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"shards": names}))
    os.replace(tmp, path)


# --- pipeline steps -------------------------------------------------------------------------------

class PlanStep(PipelineStep):
    """A pipeline step that reads the build's plan."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan


class IngestTask(PlanStep):
    """Task i ingests source i (resuming after the shards the chain records)."""

    name = "kai-data ingest"

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        names = stages.ingest(self.plan.build(), self.plan.sources[rank], self.plan.norm)
        _write_result(self.plan, "ingest", rank, names)
        return iter(())


class GroupReader(PlanStep):
    """The records of task `rank`'s group of ingest shards, in order, as datatrove Documents: `text` is
    the text of text records and empty for media (no shingles); the record rides in `metadata`."""

    name = "kai-data group reader"

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        b = self.plan.build()
        for name in self.plan.groups(b)[rank]:
            for batch in pq.ParquetFile(b.input_path(name)).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    row = shards.decode_row(row)
                    self.stat_update("records")
                    yield Document(text=row["text"] if row["modality"] == "text" else "", id=row["id"],
                                   metadata={"shard": name, "record": row, "key": content_key(row).hex()})


def record_content(doc: Document) -> str:
    """What exact dedup compares: the content key (modality, text, media bytes), not the id."""
    return doc.metadata["key"]


class CharMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash signatures over data_pipelines.dedup's character shingles (no word
    tokenizer: Hangul and Latin alike); media records (empty text) get no signature."""

    def __init__(self, output_folder: str, config: MinhashConfig) -> None:
        PipelineStep.__init__(self)  # the base __init__ loads a word tokenizer kai-data does not use
        self.output_folder = get_datafolder(output_folder)
        self.config = config
        self.num_hashes = config.num_buckets * config.hashes_per_bucket
        self._parameters = None
        self.skip_existing_sigs = False

    def get_shingles(self, text: str) -> np.ndarray:
        if not text:
            return np.empty((0, 1), dtype=np.uint64)
        return shingle_hashes(text, self.config.n_grams).astype(np.uint64).reshape(-1, 1)


class Tally(PipelineStep):
    """Counts the records of each ingest shard that reach it (here: those exact dedup kept)."""

    name = "kai-data tally"

    def __init__(self) -> None:
        super().__init__()
        self.passed: Counter[str] = Counter()

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in data:
            self.passed[doc.metadata["shard"]] += 1
            yield doc


class DedupWriter(PipelineStep):
    """Writes each ingest shard of the task's group as its dedup shard: the records that survived,
    with the exact and near removals counted against the shard they came from."""

    name = "kai-data dedup writer"

    def __init__(self, plan: Plan, tally: Tally) -> None:
        super().__init__()
        self.plan, self.tally = plan, tally

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        b = self.plan.build()
        params = self.plan.dedup_params()
        docs = iter(data)
        doc = next(docs, None)
        written = []
        for name in self.plan.groups(b)[rank]:
            out = name.replace(stages.STAGE_DIRS["ingest"] + "/", stages.STAGE_DIRS["dedup"] + "/", 1)
            rate = shards.sample_rate_of(b.root / name)
            file = None if out in b.recorded else shards.ShardFile(b.out / out, shards.with_features(shards.SCHEMA, rate),
                                                                   b.recorded[name]["source"])
            group: list[dict[str, Any]] = []
            kept = group_bytes = 0
            while doc is not None and doc.metadata["shard"] == name:
                record = doc.metadata["record"]
                kept += 1
                if file is not None:
                    group.append(record)
                    group_bytes += stages.record_bytes(record)
                    if len(group) >= shards.ROW_GROUP_ROWS or group_bytes >= shards.ROW_GROUP_BYTES:
                        file.write(shards.records_table(group, rate))
                        group, group_bytes = [], 0
                doc = next(docs, None)
            if file is not None and group:
                file.write(shards.records_table(group, rate))
            passed = self.tally.passed[name]
            counts = {k: v for k, v in (("exact-duplicate", b.recorded[name]["rows"] - passed),
                                        ("near-duplicate", passed - kept)) if v}
            extra = {"stage": "dedup", "params": params, "counts": counts, "task": rank}
            if file is None:
                rec = b.recorded[out]
                for key, now in (("params", params), ("rows", kept), ("counts", counts), ("task", rank)):
                    if rec.get(key) != now:
                        raise stages.ResumeConflict(f"{b.root / out}: recorded with {key} {rec.get(key)!r}, this build "
                                                    f"gives {now!r}; use the recorded config or a new out_dir")
            else:
                file.close([{"path": name, "sha256": b.recorded[name]["sha256"]}], extra)
                failpoints.reached("task-shard-written")
            written.append(out)
        if doc is not None:
            raise ValueError(f"dedup task {rank}: a record of {doc.metadata['shard']} arrived out of order")
        _write_result(self.plan, "dedup", rank, written)
        yield from ()


class PackTask(PlanStep):
    """Task i packs source i's dedup shards with the tokenizer the chain records."""

    name = "kai-data pack"

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        from data_pipelines.tokenizer import load_tokenizer

        b = self.plan.build()
        if b.tokenizer is None:
            raise SealError(f"{self.plan.chain_path}: no tokenizer recorded yet (the dedup stage is not sealed)")
        tok = b.tokenizer["subject"]
        source = self.plan.sources[rank]
        names = stages.pack(b, [source], {source.name: [n for n, _ in b.recorded_of("dedup", source.name)]},
                            load_tokenizer(b.root / tok["name"]), self.plan.seq_len,
                            {"name": tok["name"], "sha256": tok["digest"]["sha256"]})[source.name]
        _write_result(self.plan, "pack", rank, names)
        return iter(())


class PeakMemory(PipelineStep):
    """Last step of every task: records the worker's peak RSS (VmHWM, Linux) in work/memory/STAGE/RANK,
    the figure that must stay flat as the corpus grows."""

    name = "kai-data peak memory"

    def __init__(self, plan: Plan, stage: str) -> None:
        super().__init__()
        self.plan, self.stage = plan, stage

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        yield from data or ()
        try:
            line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return
        path = self.plan.work / "memory" / self.stage / f"{rank:05d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{int(line.split()[1]) * 1024}\n")


class Seal(PipelineStep):
    """The one step that signs: the finished tasks' shards into the chain, in task order."""

    name = "kai-data seal"

    def __init__(self, plan: Plan, stage: str) -> None:
        super().__init__()
        self.plan, self.stage = plan, stage

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        from attest.chain import ChainWriter, set_aside_torn_tail
        from attest.signers import make_signer

        if self.plan.chain_path.exists():
            set_aside_torn_tail(self.plan.chain_path)  # a seal killed mid-append: its line was never whole
        b = stages.Build(self.plan.root, ChainWriter(self.plan.chain_path, make_signer(self.plan.signer), self.plan.run_id),
                         self.plan.bounds["rows"], self.plan.bounds["max_mb"])
        seal(self.plan, b, self.stage)
        return iter(())


def task_count(plan: Plan, stage: str) -> int:
    return len(plan.sources) if stage in ("ingest", "pack") else plan.tasks


def seal(plan: Plan, b: stages.Build, stage: str) -> list[str]:
    """Sign every shard the finished tasks of `stage` wrote, in task order; after dedup, the tokenizer too."""
    failpoints.reached(f"seal-{stage}")
    names: list[str] = []
    for rank in range(task_count(plan, stage)):
        path = plan.result(stage, rank)
        if not path.is_file():
            raise SealError(f"{path}: task {rank} of the {stage} stage has not finished; run kai-data again")
        names += json.loads(path.read_text())["shards"]
    todo = []  # every shard is checked before any is signed: a bad task output leaves the chain as it was
    for name in names:
        if name in b.recorded:  # sealed by an earlier run (its bytes are checked again where it is read)
            continue
        shard = b.root / name
        manifest = shards.load_manifest(shards.manifest_path(shard))
        digest = sha256_file(shard) if shard.is_file() else "missing"
        if digest != manifest["sha256"]:
            raise SealError(f"{shard}: sha256 {digest[:12]}… is not the {manifest['sha256'][:12]}… its manifest "
                            f"records; the {stage} task's output is refused")
        todo.append((name, manifest))
    for name, manifest in todo:
        b.record(name, manifest)
    if stage == "dedup":
        stages.tokenizer_stage(b, names, plan.tokenizer_prefix, plan.tokenizer)
    return names


# --- the plan as datatrove executors --------------------------------------------------------------

def pipelines(plan: Plan) -> list[tuple[str, int, list[PipelineStep]]]:
    """(stage, tasks, steps) in order; see the module docstring."""
    w = plan.work
    exact = ExactDedupConfig(content_getter=record_content, hash_config=HASH)
    mh = plan.minhash()
    tally = Tally()
    stream: list[PipelineStep] = [GroupReader(plan)]
    if plan.dedup.exact:
        stream.append(ExactDedupFilter(str(w / "exact-dups"), config=exact))
    out: list[tuple[str, int, list[PipelineStep]]] = [
        ("ingest", len(plan.sources), [IngestTask(plan)]),
        ("seal-ingest", 1, [Seal(plan, "ingest")]),
    ]
    if plan.dedup.exact:
        out += [("exact-sigs", plan.tasks, [GroupReader(plan), ExactDedupSignature(str(w / "exact-sigs"), config=exact)]),
                ("exact-find", 1, [ExactFindDedups(str(w / "exact-sigs"), str(w / "exact-dups"), config=exact)])]
    near: list[PipelineStep] = []
    if plan.dedup.near:
        out += [("near-sigs", plan.tasks, [*stream, CharMinhashSignature(str(w / "near-sigs"), mh)]),
                ("near-buckets", mh.num_buckets, [MinhashDedupBuckets(str(w / "near-sigs"), str(w / "near-buckets"), config=mh)]),
                ("near-cluster", 1, [MinhashDedupCluster(str(w / "near-buckets"), str(w / "near-remove"), config=mh)])]
        near = [MinhashDedupFilter(str(w / "near-remove"))]
    out += [("dedup", plan.tasks, [*stream, tally, *near, DedupWriter(plan, tally)]),
            ("seal-dedup", 1, [Seal(plan, "dedup")]),
            ("pack", len(plan.sources), [PackTask(plan)]),
            ("seal-pack", 1, [Seal(plan, "pack")])]
    return [(stage, tasks, steps if stage.startswith("seal-") else [*steps, PeakMemory(plan, stage)])
            for stage, tasks, steps in out]


def run_local(plan: Plan, b: stages.Build, workers: int) -> dict[str, list[str]]:
    """Run the plan on datatrove's LocalPipelineExecutor (`workers` tasks at once, forked); the seal
    steps run here, in this process, with `b`'s chain writer. Returns {stage: shards in seal order}."""
    sealed: dict[str, list[str]] = {}
    for stage, tasks, steps in pipelines(plan):
        if stage.startswith("seal-"):
            sealed[stage.removeprefix("seal-")] = seal(plan, b, stage.removeprefix("seal-"))
            continue
        t0 = time.perf_counter()
        LocalPipelineExecutor(steps, tasks=tasks, workers=min(workers, tasks), start_method="fork",
                              logging_dir=str(plan.work / "logs" / stage)).run()
        b.log(f"[kai-data] {stage}: {tasks} tasks in {time.perf_counter() - t0:.1f} s")
        failed = [r for r in range(tasks) if not (plan.work / "logs" / stage / "completions" / f"{r:05d}").exists()]
        if failed:
            raise ValueError(f"{plan.work / 'logs' / stage}: {len(failed)} of {tasks} {stage} tasks failed "
                             f"(first: task {failed[0]}, see its log there); run kai-data again to resume")
    return sealed


def write_slurm(plan: Plan, slurm: dict[str, Any]) -> Path:
    """Write one sbatch script per stage (datatrove's own script, pickled executor and task list,
    exactly as SlurmPipelineExecutor would submit them) and `submit.sh`, which submits them in order,
    each after the previous one succeeded. Submits nothing; returns the path of submit.sh."""
    import dill
    from dill import CONTENTS_FMODE

    root = plan.work / "slurm"
    lines = ["#!/bin/bash", "# kai-data on SLURM: each stage after the previous one succeeded (afterok)",
             "set -euo pipefail", 'dep=""']
    for stage, tasks, steps in pipelines(plan):
        ex = SlurmPipelineExecutor(steps, tasks=tasks, time=slurm["time"], partition=slurm["partition"],
                                   cpus_per_task=slurm["cpus_per_task"], mem_per_cpu_gb=slurm["mem_per_cpu_gb"],
                                   job_name=f"kai-data-{stage}", venv_path=slurm.get("venv_path"),
                                   sbatch_args=dict(slurm.get("sbatch_args") or {}), logging_dir=str(root / stage),
                                   slurm_logs_folder=str(root / stage / "slurm_logs"), mail_type="NONE")
        with ex.logging_dir.open("executor.pik", "wb") as f:
            dill.dump(deepcopy(ex), f, fmode=CONTENTS_FMODE)
        ex.save_executor_as_json()
        with ex.logging_dir.open("ranks_to_run.json", "w") as f:
            json.dump(list(range(tasks)), f)
        arrays = math.ceil(tasks / ex.max_array_size)
        script = ex.get_launch_file_contents(ex.get_sbatch_args(min(tasks, ex.max_array_size)),
                                             f"srun -l -n 1 launch_pickled_pipeline {ex.logging_dir.resolve_paths('executor.pik')}")
        (root / stage / "launch_script.slurm").write_text(script)
        lines.append("ids=()")
        for offset in range(arrays):  # one job array holds at most max_array_size tasks
            lines.append(f'id=$(sbatch --parsable --export=ALL,RUN_OFFSET={offset} $dep "{root / stage}/launch_script.slurm")')
            lines.append('ids+=("${id%%;*}")')
        lines.append(f'echo "{stage}: ${{ids[*]}}"')
        lines.append('dep="--dependency=afterok:$(IFS=:; echo "${ids[*]}")"')
    path = root / "submit.sh"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


DEDUP_STAGES = ("exact-sigs", "exact-find", "near-sigs", "near-buckets", "near-cluster", "dedup")


def replay_dedup(bundle: Path, out: Path, sources: list[Source], ingest: dict[str, dict[str, Any]],
                 params: dict[str, Any], workers: int = 1) -> dict[str, dict[str, Any]]:
    """Run the dedup stages again, as `params` (a dedup manifest's) records them, on the ingest shards
    `ingest` names under `bundle` (each read only after its sha256 matches), writing under `out`.
    Returns {dedup shard name: manifest} of what it computed. ValueError when the recorded banding
    is not the one this version derives from the recorded threshold."""
    config = DedupConfig(**{k: params[k] for k in ("exact", "near", "threshold", "num_perm", "shingle", "seed")})
    if [params.get("bands"), params.get("rows")] != list(banding(config)):
        raise ValueError(f"dedup recorded with {params.get('bands')} bands of {params.get('rows')} rows; "
                         f"threshold {config.threshold} and num_perm {config.num_perm} give {banding(config)}")
    plan = Plan(out, sources, Normalize(), config, int(params["layout"]["tasks"]), dict(params["shards"]), {},
                out / "tokenizer", 0, inputs=bundle, recorded=dict(ingest))
    for stage, tasks, steps in pipelines(plan):
        if stage in DEDUP_STAGES:
            LocalPipelineExecutor(steps, tasks=tasks, workers=min(workers, tasks), start_method="fork",
                                  logging_dir=str(plan.work / "logs" / stage)).run()
    made = {}
    for rank in range(plan.tasks):
        for name in json.loads(plan.result("dedup", rank).read_text())["shards"]:
            made[name] = shards.load_manifest(shards.manifest_path(out / name))
    return made
