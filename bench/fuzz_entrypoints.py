"""A long fuzz campaign over every `kai-attest` entry point (tests/fuzzharness.py), in parallel.

Each worker is its own process with its own seed, scratch and seeds folder, an address-space limit
(`--max-rss-mib`, also checked as peak RSS after every input) and a wall-time bound per input. It
prints a progress line per worker every 100 inputs and, at the end, the totals: inputs run, inputs
per second, inputs per entry point, exit codes, the peak RSS of any worker and every problem (a
traceback, an "internal error", an input past its time bound, a file left outside the scratch
folder), each with the seed that replays it (`Harness.replay(seed)`). The last line is the verdict.

Usage: `python bench/fuzz_entrypoints.py [--inputs N] [--workers W] [--seed S] [--seconds T] [--smoke]`.
Figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def _worker(args: tuple[int, int, int, float, float, float]) -> dict:
    index, n, seed, wall_s, max_rss_mib, seconds = args
    limit = int(max_rss_mib * 3) << 20  # address space (a little above RSS: libraries map more than they touch)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import fuzzharness

    def progress(t: fuzzharness.Tally) -> None:
        print(f"[worker {index}] {t.line()}", flush=True)

    t = fuzzharness.run(n, seed=seed, wall_s=wall_s, max_rss_mib=max_rss_mib, progress=progress, max_seconds=seconds)
    return {"inputs": t.inputs, "seconds": t.seconds, "by_entry": dict(t.by_entry),
            "by_exit": {str(k): v for k, v in t.by_exit.items()}, "problems": t.problems, "max_rss_mib": t.max_rss_mib,
            "slowest": list(t.slowest)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs in all (split over the workers)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wall-s", type=float, default=60.0, help="time bound of one input")
    ap.add_argument("--max-rss-mib", type=float, default=2048.0)
    ap.add_argument("--seconds", type=float, default=None, help="stop each worker after this long")
    ap.add_argument("--json", metavar="FILE", help="also write the totals as JSON")
    ap.add_argument("--smoke", action="store_true", help="60 inputs on one worker (the test suite runs this)")
    a = ap.parse_args()
    if a.smoke:
        a.inputs, a.workers = 60, 1
    per = -(-a.inputs // a.workers)
    jobs = [(i, per, a.seed * 1000 + i, a.wall_s, a.max_rss_mib, a.seconds or 1e12) for i in range(a.workers)]
    t0 = time.monotonic()
    with mp.get_context("spawn").Pool(a.workers) as pool:
        results = pool.map(_worker, jobs)
    wall = time.monotonic() - t0
    inputs = sum(r["inputs"] for r in results)
    by_entry: Counter = Counter()
    by_exit: Counter = Counter()
    for r in results:
        by_entry.update(r["by_entry"])
        by_exit.update(r["by_exit"])
    problems = [p for r in results for p in r["problems"]]
    peak = max(r["max_rss_mib"] for r in results)
    slowest = max((tuple(r["slowest"]) for r in results), default=(0.0, ""))
    totals = {"inputs": inputs, "wall_s": round(wall, 1), "inputs_per_s": round(inputs / wall, 2),
              "workers": a.workers, "cpus": os.cpu_count(), "by_entry": dict(sorted(by_entry.items())),
              "by_exit": dict(sorted(by_exit.items())), "peak_rss_mib": round(peak), "slowest_s": round(slowest[0], 2),
              "slowest_entry": slowest[1], "problems": len(problems), "seed": a.seed}
    for p in problems[:200]:
        print("PROBLEM", p[:1000])
    print(json.dumps(totals))
    if a.json:
        Path(a.json).write_text(json.dumps({**totals, "problem_lines": problems}, indent=1) + "\n")
    print(f"verdict: {'PASS' if not problems else 'FAIL'} — {inputs} inputs over {len(by_entry)} entry points in "
          f"{wall:.0f} s ({inputs / wall:.1f}/s on {a.workers} workers), peak RSS {peak:.0f} MiB, "
          f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
