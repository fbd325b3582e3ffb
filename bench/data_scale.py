"""kai-data at scale on datatrove: peak RSS per worker as the corpus grows, throughput with 1 and 2
workers, and dedup precision/recall on planted pairs against the in-process Deduper.

For each size in --sizes (MiB) it writes a synthetic corpus (half Korean, half English documents of
about 1.5 KiB in --sources JSONL sources, with 1% planted exact copies and 1% planted near copies,
a few characters edited), then runs the whole `kai-data` build on datatrove's local executor
(`executor.kind=local`, the tokenizer on a sample of 5000 sentences, which every size fills) once per worker
count in --workers, with ceil(MiB / --mib-per-task) dedup tasks (the layout grows with the corpus
so that a task's share, and with it a worker's memory, stays what the configuration sets). Figures
per run:

- peak RSS per worker: the largest VmHWM any task's worker reached, per stage (each task records it,
  data_pipelines.engine.PeakMemory); with 1 worker the tasks run in the main process, so the
  per-worker figures come from the runs with 2 workers. The main process (seals, tokenizer) apart.
- throughput: corpus MiB per second of the whole build, and the 2-worker / 1-worker ratio at the
  same size, measured in this run.
- dedup: the records each build removed against the planted pairs (a pair is found when exactly
  one of its two records is removed; precision is the share of removed records that are such
  a member). The baseline is today's in-process `Deduper` (data_pipelines.dedup) at the same
  threshold over the same ingest shards, in a child process whose peak RSS is printed too (its
  index grows with the corpus), run for sizes up to --baseline-max MiB.

    python bench/data_scale.py --sizes 32,128 --workers 1,2 [--mib-per-task 8] [--threshold 0.8]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROVENANCE = {"origin": "bench generator", "license": "CC0-1.0", "collection": "synthetic",
              "generator": "bench/data_scale.py (random words, no model)", "collected": "2026-11-30/2026-11-30",
              "consent": "not applicable", "pii": "none"}
HANGUL = "가나다라마바사아자차카타파하거너더러머버서어저처커터퍼허고노도로모보소오조초코토포호구누두루무부수우주추쿠투푸후"

MAIN = r"""
import atexit, sys
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
atexit.register(lambda: print(f"PEAK_MAIN {peak()}", file=sys.stderr))
sys.argv = ["kai-data", *sys.argv[1:]]
from data_pipelines.build import main
main()
"""

BASELINE = r"""
import json, sys
import pyarrow.parquet as pq
from data_pipelines.dedup import Deduper, DedupConfig
from data_pipelines.shards import decode_row
names, threshold = json.loads(sys.argv[1]), float(sys.argv[2])
d, removed = Deduper(DedupConfig(threshold=threshold)), []
for name in names:
    for batch in pq.ParquetFile(name).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            if d.check(decode_row(row)) is not None:
                removed.append(row["id"])
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
print(json.dumps({"removed": removed, "peak": peak}))
"""


def make_corpus(root: Path, mib: int, sources: int, seed: int = 0) -> list[tuple[str, str]]:
    """JSONL sources of about `mib` MiB in total; returns the planted (original id, copy id) pairs."""
    rng = random.Random(seed)
    en = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(5000)]
    ko = ["".join(rng.choices(HANGUL, k=rng.randint(2, 4))) for _ in range(5000)]
    root.mkdir(parents=True)
    files = [open(root / f"web{s}.jsonl", "w", encoding="utf-8") for s in range(sources)]
    lines = [0] * sources
    recent: list[tuple[str, str]] = []  # (id, text) of recent originals, to copy from
    pairs: list[tuple[str, str]] = []
    written, target = 0, mib * 2**20
    while written < target:
        s = rng.randrange(sources)
        u = rng.random()
        if u < 0.01 and recent:          # an exact copy of an earlier document (after normalization)
            orig, text = rng.choice(recent)
            pairs.append((orig, f"web{s}/web{s}.jsonl:{lines[s] + 1}"))
        elif u < 0.02 and recent:        # a near copy: a few characters edited
            orig, text = rng.choice(recent)
            chars = list(text)
            for i in rng.sample(range(len(chars)), 6):
                chars[i] = "x" if chars[i] != "x" else "y"
            text = "".join(chars)
            pairs.append((orig, f"web{s}/web{s}.jsonl:{lines[s] + 1}"))
        else:
            words = ko if rng.random() < 0.5 else en
            text = " ".join(rng.choices(words, k=rng.randint(150, 300) if words is en else rng.randint(250, 450)))
            rid = f"web{s}/web{s}.jsonl:{lines[s] + 1}"
            if rng.random() < 0.05:
                recent.append((rid, text))
                recent = recent[-200:]
        line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        files[s].write(line)
        lines[s] += 1
        written += len(line.encode())
    for f in files:
        f.close()
    return pairs


def write_conf(conf: Path, corpus: Path, sources: int) -> None:
    (conf / "data").mkdir(parents=True)
    spec = {"base_dir": str(corpus), "sources": [{"name": f"web{s}", "path": f"web{s}.jsonl", "format": "jsonl",
                                                  **PROVENANCE} for s in range(sources)]}
    (conf / "data" / "scale.yaml").write_text(yaml.safe_dump(spec))


def build(conf: Path, out: Path, workers: int, tasks: int, threshold: float) -> dict:
    from attest.signing import keygen

    keygen(out / "keys")
    cmd = [sys.executable, "-c", MAIN, "--config-dir", str(conf), "data=scale", f"out_dir={out}", "run_id=scale",
           "executor.kind=local", f"executor.tasks={tasks}", f"executor.workers={workers}",
           f"dedup.threshold={threshold}", "tokenizer.max_sentences=5000", "tokenizer.vocab_size=2000",
           "shards.rows=8192", "pack.seq_len=256"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"kai-data failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    stages = {line.split()[1].rstrip(":"): float(line.split()[-2]) for line in p.stdout.splitlines()
              if line.startswith("[kai-data] ") and line.rstrip().endswith(" s") and " tasks in " in line}
    work = next((out / "work").iterdir())
    rss = {d.name: max(int(f.read_text()) for f in d.iterdir()) for d in (work / "memory").iterdir()}
    main_peak = int(next(line.split()[1] for line in p.stderr.splitlines() if line.startswith("PEAK_MAIN")))
    return {"wall": wall, "stages": stages, "rss": rss, "main": main_peak}


def removed_ids(out: Path) -> tuple[set[str], list[str]]:
    """(ids removed by dedup, ingest shard paths in declared order) from the chain's manifests."""
    from attest.chain import read_chain

    entries, _ = read_chain(out / "chain.jsonl")
    shards = {e.statement["subject"][0]["name"]: e.predicate["manifest"] for e in entries if e.kind == "data-shard"}
    ingest = [n for n, m in shards.items() if m["stage"] == "ingest"]
    ids = lambda names: {i for n in names for i in pq.read_table(out / n, columns=["id"]).column("id").to_pylist()}  # noqa: E731
    return ids(ingest) - ids([n for n, m in shards.items() if m["stage"] == "dedup"]), [str(out / n) for n in ingest]


def score(removed: set[str], pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """(precision, recall) of `removed` against the planted duplicates. The pairs join into groups
    (a document copied twice is one group of three); a group of n is handled when n - 1 of its
    members are removed, so a removal counts as right up to n - 1 per group."""
    group: dict[str, str] = {}

    def find(x: str) -> str:
        while group.setdefault(x, x) != x:
            x = group[x]
        return x

    for a, b in pairs:
        group[find(a)] = find(b)
    members: dict[str, list[str]] = {}
    for x in list(group):
        members.setdefault(find(x), []).append(x)
    right = sum(min(sum(m in removed for m in ms), len(ms) - 1) for ms in members.values())
    return (right / len(removed) if removed else 1.0), right / sum(len(ms) - 1 for ms in members.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="32,128", help="corpus sizes in MiB, comma-separated")
    ap.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    ap.add_argument("--mib-per-task", type=float, default=8,
                    help="dedup tasks = corpus MiB / this: the layout grows with the corpus, a task's share does not")
    ap.add_argument("--sources", type=int, default=4, help="JSONL sources (ingest and pack tasks)")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--baseline-max", type=int, default=128, help="run the in-process baseline up to this size (MiB)")
    ap.add_argument("--work", type=Path, default=None, help="keep the corpora and builds here")
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.workers, args.baseline_max, args.mib_per_task = "1", "1", 1, 1

    work = args.work or Path(tempfile.mkdtemp(prefix="kai-data-scale-"))
    sizes, workers = [int(x) for x in args.sizes.split(",")], [int(x) for x in args.workers.split(",")]
    print(f"{'MiB':>5} {'w':>2} {'wall s':>7} {'MiB/s':>6}  peak RSS per worker MiB (stage: max)            "
          f"{'main':>5}  dedup P/R (datatrove | in-process, its RSS)")
    for mib in sizes:
        root = work / f"{mib}mib"
        shutil.rmtree(root, ignore_errors=True)
        pairs = make_corpus(root / "corpus", mib, args.sources)
        write_conf(root / "conf", root / "corpus", args.sources)
        walls = {}
        for w in workers:
            tasks = max(1, math.ceil(mib / args.mib_per_task))
            r = build(root / "conf", root / f"out-w{w}", w, tasks, args.threshold)
            walls[w] = r["wall"]
            removed, ingest = removed_ids(root / f"out-w{w}")
            p, rc = score(removed, pairs)
            base = ""
            if w == workers[-1] and mib <= args.baseline_max:
                b = subprocess.run([sys.executable, "-c", BASELINE, json.dumps(ingest), str(args.threshold)],
                                   cwd=REPO, capture_output=True, text=True, check=True)
                res = json.loads(b.stdout)
                bp, brc = score(set(res["removed"]), pairs)
                base = f" | {bp:.3f}/{brc:.3f}, {res['peak'] / 2**20:.0f} MiB"
            rss = ", ".join(f"{k}: {v / 2**20:.0f}" for k, v in sorted(r["rss"].items(), key=lambda kv: -kv[1])[:4])
            print(f"{mib:>5} {w:>2} {r['wall']:>7.1f} {mib / r['wall']:>6.2f}  {rss:<48} {r['main'] / 2**20:>5.0f}  "
                  f"{p:.3f}/{rc:.3f}{base}  ({len(pairs)} planted pairs)", flush=True)
            print(f"      {tasks} dedup tasks; stages (s): {json.dumps(r['stages'])}", flush=True)
        if len(walls) > 1:
            lo, hi = min(walls), max(walls)
            print(f"      throughput {hi} workers / {lo} worker at {mib} MiB: {walls[lo] / walls[hi]:.2f}x", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
