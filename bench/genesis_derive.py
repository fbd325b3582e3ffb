"""Genesis re-derivation speed and memory ("kai-init/v2"): what an evaluator's light install spends.

    python bench/genesis_derive.py                      # the 125m preset, numpy deriver + torch slices
    python bench/genesis_derive.py --preset 1b --tensors 40
    python bench/genesis_derive.py --torch-device cuda   # also time init_slice on a GPU

Prints, for the numpy deriver (`kai_train.initspec.derive`, torch-free: what `kai-attest verify`
runs): elements/s for generation alone and with the leaf hashing (sha256 over the float32 bytes,
as the verifier does), peak Python-heap memory (tracemalloc, numpy buffers included) and the
process's peak RSS; then `kai_train.init.init_slice` (torch) elements/s on CPU and, when asked,
on an accelerator; and the time of a whole-genesis re-derivation of every kai_train/conf/model preset
extrapolated per parameter from the measured rate. One core: the deriver is single-threaded.
`--tensors N` derives only the first N tensors (by name) of the preset, for a quick figure.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from attest.digest import tensor_digest  # noqa: E402
from kai_train import initspec  # noqa: E402
from kai_train.modelspec import ModelConfig, param_count, param_specs  # noqa: E402


def preset(name: str) -> ModelConfig:
    return ModelConfig.from_dict(yaml.safe_load((REPO / "kai_train/conf/model" / f"{name}.yaml").read_text()))


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--tensors", type=int, default=0, help="derive only the first N tensors (0: all)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; the best is printed")
    ap.add_argument("--torch-device", default="", help="also time init_slice on this device (e.g. cuda)")
    ap.add_argument("--torch-elements", type=int, default=1 << 24, help="elements per init_slice timing")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch CPU threads for init_slice (1: stable on a shared machine; intra-op threads on a "
                         "busy one cost more than they give)")
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.tensors, args.rounds, args.torch_elements = "tiny", 4, 1, 1 << 12


    cfg = preset(args.preset)
    specs = param_specs(cfg)
    if args.tensors:
        specs = specs[:args.tensors]
    n = sum(math.prod(s) for _, s, _ in specs)
    print(f"commit {commit()}  python {sys.version.split()[0]}  cpus {os.cpu_count()}  "
          f"load {os.getloadavg()[0]:.2f}  chunk {initspec.CHUNK:,} elements")
    print(f"preset {args.preset}: {len(specs)} tensors, {n:,} elements derived")

    def timed(work) -> float:  # the best of --rounds: a shared machine only ever slows a round down
        best = math.inf
        for _ in range(args.rounds):
            t = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - t)
        return best

    def generate_only() -> None:
        for name, shape, rule in specs:
            for _ in initspec.generate(1, name, shape, rule):
                pass

    def derive() -> None:  # the deriver's path: generation, float32 bytes, leaf sha256
        for name, shape, rule in specs:
            tensor_digest(name, "F32", shape, initspec.tensor_chunks(1, name, shape, rule))

    gen = n / timed(generate_only)
    dt = timed(derive)
    rate = n / dt
    tracemalloc.start()
    specs_small = [s for s in specs if math.prod(s[1]) >= 4 * initspec.CHUNK][:2] or specs[:2]
    for name, shape, rule in specs_small:  # memory: tensors of several chunks, traced (numpy buffers included)
        tensor_digest(name, "F32", shape, initspec.tensor_chunks(1, name, shape, rule))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"numpy generate          {gen / 1e6:8.1f} M elements/s")
    print(f"numpy derive (+sha256)  {rate / 1e6:8.1f} M elements/s  ({dt:.1f} s)")
    print(f"peak traced heap        {peak / 2**20:8.1f} MiB  (deriving {', '.join(s[0] for s in specs_small)}; "
          f"bound: one chunk of {initspec.CHUNK:,} elements)")
    print(f"peak RSS of the process {rss:8.1f} MiB  (interpreter, numpy and yaml; measured before torch is imported)")

    try:
        import torch

        from kai_train.init import init_slice
    except ImportError:
        print("torch not installed: init_slice not timed")
    else:
        torch.set_num_threads(args.torch_threads)
        devices = ["cpu"] + ([args.torch_device] if args.torch_device else [])
        for dev in devices:
            m = args.torch_elements
            init_slice(1, "w", (m,), "normal:0.02", 0, min(m, 1 << 16), device=dev)  # warm up
            if dev.startswith("cuda"):
                torch.cuda.synchronize()

            def one(dev: str = dev, m: int = m) -> None:
                init_slice(1, "w", (m,), "normal:0.02", device=dev)
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()

            print(f"torch init_slice {dev:6s} {m / timed(one) / 1e6:8.1f} M elements/s ({m:,} elements, "
                  f"{torch.get_num_threads()} CPU threads)")

    print("whole-genesis re-derivation, extrapolated per parameter at the numpy derive rate (one core):")
    for p in sorted((REPO / "kai_train/conf/model").glob("*.yaml"), key=lambda p: param_count(preset(p.stem))):
        count = param_count(preset(p.stem))
        print(f"  {p.stem:5s} {count:>15,} parameters  {count / rate / 60:7.1f} min")


if __name__ == "__main__":
    main()
