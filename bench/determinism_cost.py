"""What `determinism=exact` costs against `determinism=fast`: the DeepSpeed path's tokens/s under each.

    python bench/determinism_cost.py --model tiny --seq-len 128            # one process per setting
    python bench/determinism_cost.py --nproc 2 --seq-len 512               # torchrun, 2 ranks each

Runs bench/train_throughput.py (path `deepspeed`, the trainer's wiring) once per setting, alternating
exact, fast, exact, fast for `--repeats` pairs so that drift in machine speed hits both, and prints
tokens/s per rank of each and the ratio exact / fast (median of the pairs). On a CPU exact pins the
math attention kernel and fast lets torch choose (its flash kernel for these shapes); on a GPU exact
runs the fused kernels with deterministic backward passes and fast anything (kai_train/determinism.py).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "train_throughput.py"


def rate(mode: str, a: argparse.Namespace) -> float:
    args = ["--determinism", mode, "--paths", "deepspeed", "--model", a.model, "--seq-len", str(a.seq_len),
            "--micro-batch", str(a.micro_batch), "--steps", str(a.steps), "--rounds", "1", "--warmup", "1"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc), str(BENCH)]
           if a.nproc > 1 else [sys.executable, str(BENCH)]) + args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
    m = re.search(r"^deepspeed\s+([\d,]+)", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise SystemExit(f"determinism_cost: {mode} run failed (exit {p.returncode}):\n{p.stdout[-1500:]}{p.stderr[-1500:]}")
    return float(m.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="exact/fast pairs [3]")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.seq_len, a.micro_batch, a.steps, a.repeats = 32, 2, 2, 1
    exact, fast = [], []
    for _ in range(a.repeats):
        exact.append(rate("exact", a))
        fast.append(rate("fast", a))
    ratio = statistics.median(e / f for e, f in zip(exact, fast))
    print(f"model {a.model}, {a.nproc} rank(s), micro batch {a.micro_batch} x {a.seq_len} text tokens, {a.repeats} pair(s)")
    print(f"{'setting':<8} {'tok/s/rank (median)':>20}")
    print(f"{'exact':<8} {statistics.median(exact):>20,.0f}")
    print(f"{'fast':<8} {statistics.median(fast):>20,.0f}")
    print(f"ratio exact/fast: {ratio:.3f} (median of pairs)")


if __name__ == "__main__":
    main()
