"""Data ingest under a memory budget: docs/s, MB/s and peak RSS against the budget.

Writes a JSONL text corpus of --corpus-mb MB (several times --budget-mb), then runs kai-data's
ingest stage (data_pipelines.stages.ingest: read, normalize, write signed Parquet shards) on it
in a child process with `shards.max_mb` = budget / 8, and a second child that only imports the
same modules and signs one statement (the baseline: what the interpreter and libraries cost
before any data). Peak RSS of each is the child's own high-water mark (VmHWM in /proc/self/status, Linux).
With --dedup, the exact and near dedup stage runs too (it keeps an index in memory: its growth
per document is printed).

    python bench/data_ingest.py [--corpus-mb 1024] [--budget-mb 384] [--dedup]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
from pathlib import Path
from attest.chain import ChainWriter
from attest.signing import PemSigner, keygen
from data_pipelines import stages
from data_pipelines.dedup import DedupConfig
from data_pipelines.sources import Normalize, check_sources
work, max_mb, mode = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
out = work / ("out-" + mode)
priv, _ = keygen(out / "keys")
chain = ChainWriter(out / "chain.jsonl", PemSigner.from_file(priv), "bench")
def peak_mib():  # VmHWM: this process image's high-water RSS (ru_maxrss would include the forked parent)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
if mode == "baseline":
    chain.append("data-shard", [], {"manifest": {}})
    print(json.dumps({"peak_mib": peak_mib()}))
    sys.exit(0)
spec = {"name": "web", "path": str(work / "corpus"), "format": "jsonl", "license": "CC-BY-4.0", "origin": "bench",
        "collection": "crawl", "collected": "2026-01-01/2026-01-31", "consent": "robots.txt honoured", "pii": "none"}
[source] = check_sources([spec], work)
b = stages.Build(out, chain, rows=1_000_000, max_mb=max_mb, log=lambda s: None)
t0 = time.perf_counter()
names = stages.ingest(b, source, Normalize())
t1 = time.perf_counter()
result = {"ingest_s": t1 - t0, "shards": len(names), "rows": sum(b.recorded[n]["rows"] for n in names)}
if mode == "dedup":
    stages.dedup(b, [source], {"web": names}, DedupConfig())
    result["dedup_s"] = time.perf_counter() - t1
print(json.dumps({**result, "peak_mib": peak_mib()}))
"""


def make_corpus(folder: Path, mb: int, seed: int = 0) -> tuple[int, int]:
    """JSONL files of random-word documents (~2 KB each), 64 MB per file; returns (docs, bytes)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(50_000)]
    vocab += ["바다", "하늘", "사람", "시간", "학교", "노래"]
    vocab_arr = np.array(vocab, dtype=object)
    docs = size = 0
    target = mb * 2**20
    part = 0
    while size < target:
        lines = []
        while sum(map(len, lines)) < 64 * 2**20 and size + sum(map(len, lines)) < target:
            words = vocab_arr[rng.integers(len(vocab_arr), size=(256, 300))]
            lines += [json.dumps({"text": " ".join(w)}, ensure_ascii=False) + "\n" for w in words]
        data = "".join(lines).encode("utf-8")
        (folder / f"part-{part:04d}.jsonl").write_bytes(data)
        docs, size, part = docs + len(lines), size + len(data), part + 1
    return docs, size


def child(work: Path, max_mb: float, mode: str) -> tuple[dict, float, float]:
    """Run the child; returns (its JSON result, wall s, peak RSS MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(work), str(max_mb), mode], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed with exit {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return result, wall, result["peak_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-mb", type=int, default=1024)
    ap.add_argument("--budget-mb", type=int, default=384)
    ap.add_argument("--dedup", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    a = ap.parse_args()
    if a.smoke:
        a.corpus_mb, a.budget_mb = 2, 256

    with tempfile.TemporaryDirectory(prefix="kai-ingest-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        docs, size = make_corpus(work / "corpus", a.corpus_mb)
        print(f"corpus: {docs} docs, {size / 2**20:.0f} MiB of JSONL ({size / 2**20 / a.budget_mb:.1f}x the "
              f"{a.budget_mb} MiB budget), made in {time.perf_counter() - t0:.0f} s")
        _, _, base = child(work, a.budget_mb / 8, "baseline")
        mode = "dedup" if a.dedup else "ingest"
        res, wall, peak = child(work, a.budget_mb / 8, mode)
        mb = size / 2**20
        print(f"ingest: {res['rows']} rows in {res['shards']} shards, {res['ingest_s']:.1f} s: "
              f"{res['rows'] / res['ingest_s']:.0f} docs/s, {mb / res['ingest_s']:.1f} MB/s")
        if a.dedup:
            print(f"dedup: {res['dedup_s']:.1f} s, {res['rows'] / res['dedup_s']:.0f} docs/s")
        print(f"peak RSS: baseline (imports + one signature) {base:.0f} MiB; {mode} {peak:.0f} MiB = "
              f"{peak / a.budget_mb:.2f} of the budget, {peak / mb:.3f} of the corpus size; "
              f"above baseline {peak - base:.0f} MiB")
        print(f"within budget: {'yes' if peak <= a.budget_mb else 'NO'}")


if __name__ == "__main__":
    main()
