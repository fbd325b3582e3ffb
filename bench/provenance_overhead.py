"""Provenance overhead: what the chain costs a training run, and how fast checkpoints are hashed.

1. Trains the demo twice (2 CPU ranks, DeepSpeed ZeRO-2, default checkpoint cadence) from the same
   shards: once recording each checkpoint inside the training loop (`attest.background=false`, as
   before the background worker), once with the background worker (the default). Reads the
   trainer's own account: wall time the training loop spent in provenance (saving, and hashing and
   signing where it waits for them) over the run's wall time, per checkpoint, and the time spent
   hashing and signing checkpoints.
2. Hashes the same synthetic checkpoint folder (random safetensors of --mb MB) several ways in one
   run: kai-train's one-pass hash (file sha256 + tensor leaves of the canonical digest), the former
   two passes, OpenSSF model-signing's file hashing (`model_signing.hashing`), and raw sha256 of
   the bytes; prints throughput and ratios.
3. Per-tensor digest algorithms on the same bytes: hashlib sha256 against blake3 (one thread, and
   `max_threads=AUTO`).

    python bench/provenance_overhead.py [--mb 400] [--skip-train] [--train-args "model.dim=256 ..."]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ACCOUNT = re.compile(r"provenance ([\d.]+) s of ([\d.]+) s wall \(([\d.]+)%\) in the training loop, ([\d.]+) s per "
                     r"checkpoint; hashing and signing checkpoints ([\d.]+) s \((\w+)\)")


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{p.stderr[-2000:]}")
    return p


def train_overhead(tmp: Path, overrides: list[str]) -> list[str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    data = tmp / "data"
    _run([sys.executable, "-m", "attest.cli", "keygen", str(data / "keys")], env)
    _run([sys.executable, "-m", "data_pipelines.build", f"out_dir={data}"], env)
    out = []
    for background in ("false", "true"):
        run = tmp / f"run-{background}"
        shutil.copytree(data, run)  # shards, tokenizer and their statements; no training yet
        p = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kai_train.train",
                  f"run_dir={run}", "wandb.mode=disabled", f"attest.background={background}", *overrides], env)
        m = ACCOUNT.search(p.stdout)
        if not m:
            raise SystemExit("the trainer did not report its provenance time")
        where = "background worker" if m[6] == "background" else "in the loop     "
        out.append(f"training, checkpoints recorded {where}: provenance {m[1]} s of {m[2]} s wall = {m[3]}%, "
                   f"loop blocked {1000 * float(m[4]):.0f} ms per checkpoint, hashing + signing checkpoints {m[5]} s")
    size = sum(f.stat().st_size for f in (tmp / "run-true" / "checkpoints" / "step-000010").glob("*.safetensors"))
    return [f"demo{' ' + ' '.join(overrides) if overrides else ''}: 30 steps, checkpoint every 10 (+ genesis), 2 ranks "
            f"ZeRO-2, {size / 1e6:.1f} MB written per checkpoint (weights + optimizer state); goal <= 1%", *out]


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def hashing(tmp: Path, mb: int) -> list[str]:
    import torch
    from model_signing import hashing as oms_hashing

    from attest.digest import hash_safetensors, safetensors_root, sha256_file
    from kai_train.weights import save_weights

    folder = tmp / "ckpt"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = mb * (1 << 20) // 4 // 16
    save_weights({f"layer.{i}.weight": torch.from_numpy(rng.standard_normal(n, dtype=np.float32)) for i in range(16)},
                 folder / "model.safetensors")
    f = folder / "model.safetensors"
    size = f.stat().st_size
    raw = best_of(lambda: sha256_file(f))  # one streamed pass
    one = best_of(lambda: hash_safetensors(f))
    two = best_of(lambda: (safetensors_root([f]), sha256_file(f)))
    oms = best_of(lambda: oms_hashing.Config().use_file_serialization().hash(folder))
    mbs = lambda s: size / s / 1e6  # noqa: E731
    return [f"checkpoint hashing, {size / 1e6:.0f} MB folder (best of 3):",
            f"  raw sha256, one pass          {mbs(raw):8.0f} MB/s",
            f"  kai-train one pass            {mbs(one):8.0f} MB/s   ratio vs model_signing {oms / one:.2f}  (file sha256 + tensor leaves, one read)",
            f"  kai-train two passes (before) {mbs(two):8.0f} MB/s   ratio vs model_signing {oms / two:.2f}",
            f"  model_signing (files)         {mbs(oms):8.0f} MB/s"]


def digest_algorithms(mb: int) -> list[str]:
    """Per-tensor digest candidates over the same 16 tensors of mb MB in all, 1 MiB updates."""
    try:
        import blake3
    except ImportError:
        return ["per-tensor digests: blake3 is not installed (pip install blake3)"]
    rng = np.random.default_rng(1)
    tensors = [memoryview(rng.bytes(mb * (1 << 20) // 16)) for _ in range(16)]
    size = sum(len(t) for t in tensors)

    def digest_all(new) -> None:
        for t in tensors:
            h = new()
            for i in range(0, len(t), 1 << 20):
                h.update(t[i:i + (1 << 20)])
            h.hexdigest()

    rows = [("sha256 (hashlib)", hashlib.sha256), ("blake3, 1 thread", blake3.blake3),
            ("blake3, max_threads=AUTO", lambda: blake3.blake3(max_threads=blake3.blake3.AUTO))]
    out = [f"per-tensor digests, {size / 1e6:.0f} MB in 16 tensors (best of 3):"]
    for name, new in rows:
        out.append(f"  {name:<26}{size / best_of(lambda: digest_all(new)) / 1e6:8.0f} MB/s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--train-args", default="", help="trainer overrides, e.g. a larger model: 'model.dim=256 model.n_layers=8'")
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    a = ap.parse_args()
    if a.smoke:
        a.mb = 4

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as t:
        lines = [] if a.skip_train else train_overhead(Path(t), a.train_args.split())
        for line in lines + hashing(Path(t), a.mb) + digest_algorithms(a.mb):
            print(line, flush=True)


if __name__ == "__main__":
    main()
