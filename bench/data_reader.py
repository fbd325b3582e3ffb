"""The training reader at corpus scale: peak RSS per rank and reader tokens/s as the corpus grows,
and the sampler's cost per step against the number of rows.

For each size in --tokens it writes synthetic packed shards (data_pipelines.pack.synthetic_packed_shards:
the pack stage's schema and writer settings, --seq-len tokens per row, row groups of 1024 rows),
then starts one child process per size that is one rank of a --world-rank run: it opens the shards
with kai_train.data.ShardDataset (footers only), builds the feistel-v1 sampler, and reads --steps
micro-batches of --micro-batch rows at that rank's positions through kai_train.data.Batches
(prefetch on a background thread), as training does, without a model. The child prints its peak
RSS (VmHWM) after the imports, after opening, and after reading, and the reader's tokens/s.

The sampler table times `Sampler.rows` for one step of --micro-batch × --world rows at a position in
the middle of the corpus, for N = 10^3 … 10^12 training rows (no files: the sampler needs only row
counts), with and without a 3-source mixture.

    python bench/data_reader.py --tokens 10M,100M,1B [--seq-len 256] [--steps 300] [--keep DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_size(s: str) -> int:
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    s = s.strip().upper()
    return int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)


def hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """One rank reading its micro-batches; prints a JSON line."""
    import torch

    from data_pipelines.sampler import make_sampler
    from kai_train.data import Batches, ShardDataset

    torch.set_num_threads(1)
    shards = sorted(Path(args.child).glob("*.parquet"))
    after_import = hwm_mib()
    t0 = time.perf_counter()
    data = ShardDataset(shards, Path(args.tokenizer), args.seq_len)
    sampler = make_sampler("feistel-v1", 1234, 20, data.shard_rows)
    open_s = time.perf_counter() - t0
    after_open = hwm_mib()
    batches = Batches(data, sampler, args.rank, args.world, args.micro_batch, 32, 16000)
    stride = args.micro_batch * args.world
    batches.get(0)  # warm: first files opened
    t0 = time.perf_counter()
    tokens = 0
    for k in range(1, args.steps + 1):
        b = batches.get(k * stride)
        tokens += int(b["tokens"].numel())
    wall = time.perf_counter() - t0
    batches.close()
    print(json.dumps({"rows": len(data), "shards": len(shards), "row_groups": data.index.groups,
                      "open_s": open_s, "rss_import_mib": after_import, "rss_open_mib": after_open,
                      "rss_peak_mib": hwm_mib(), "tokens_per_s": tokens / wall, "steps": args.steps}))


def tokenizer(tmp: Path) -> Path:
    """A tiny sentencepiece model (the reader loads one; packed rows do not use it)."""
    import sentencepiece as spm

    text = tmp / "t.txt"
    text.write_text("\n".join(f"synthetic sentence number {i} for the reader benchmark" for i in range(2000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp / "tok"), vocab_size=64,
                                   model_type="unigram", pad_id=3, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return tmp / "tok.model"


def sampler_table(micro: int, world: int, exps: tuple[int, ...] = (3, 6, 9, 12)) -> list[tuple[int, float, float]]:
    from attest.sampling import Sampler

    out = []
    for exp in exps:
        n = 10**exp
        plain = Sampler(1234, 0, [n])
        mixed = Sampler(1234, 0, [n // 2, n // 3, n - n // 2 - n // 3], ["a", "b", "c"], {"a": 5, "b": 3, "c": 2})
        per = micro * world
        times = []
        for s in (plain, mixed):
            pos = (n // 2 // per) * per
            s.rows(pos, pos + per)  # keys of this epoch / block
            t0 = time.perf_counter()
            reps = 50
            for r in range(reps):
                s.rows(pos + r * per, pos + (r + 1) * per)
            times.append((time.perf_counter() - t0) / reps * 1e3)
        out.append((n, times[0], times[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="10M,100M", help="corpus sizes in tokens (K, M, B suffixes)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--keep", type=Path, help="build corpora here and keep them (default: a temp folder)")
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.steps, args.keep = "200K,1M", 20, None
    if args.child:
        child(args)
        return
    from data_pipelines.pack import synthetic_packed_shards

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}  cpus {os.cpu_count()}  load {os.getloadavg()[0]:.2f}  seq_len {args.seq_len}  "
          f"micro_batch {args.micro_batch}  rank {args.rank} of {args.world}  steps {args.steps}")
    root = args.keep or Path(tempfile.mkdtemp(prefix="kai-reader-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(root)
    print(f"{'tokens':>14} {'rows':>11} {'shards':>6} {'groups':>7} {'write s':>8} {'open s':>7} "
          f"{'RSS import':>10} {'RSS open':>9} {'RSS peak':>9} {'reader tok/s':>13}")
    for size in args.tokens.split(","):
        n = parse_size(size)
        d = root / f"corpus-{size.strip()}"
        t0 = time.perf_counter()
        if not any(d.glob("*.parquet")):
            d.mkdir(exist_ok=True)
            synthetic_packed_shards(d, n, args.seq_len)
        write_s = time.perf_counter() - t0
        p = subprocess.run([sys.executable, __file__, "--child", str(d), "--tokenizer", str(tok),
                            "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                            "--world", str(args.world), "--rank", str(args.rank), "--steps", str(args.steps)],
                           capture_output=True, text=True, cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{n:>14,} {r['rows']:>11,} {r['shards']:>6} {r['row_groups']:>7} {write_s:>8.1f} {r['open_s']:>7.2f} "
              f"{r['rss_import_mib']:>8.0f}Mi {r['rss_open_mib']:>7.0f}Mi {r['rss_peak_mib']:>7.0f}Mi "
              f"{r['tokens_per_s']:>13,.0f}")
    print(f"\nsampler cost per step ({args.micro_batch} x {args.world} rows), ms:")
    print(f"{'N rows':>16} {'no mixture':>11} {'3-source mixture':>17}")
    for n, a, b in sampler_table(args.micro_batch, args.world, (3, 9) if args.smoke else (3, 6, 9, 12)):
        print(f"{n:>16,} {a:>11.3f} {b:>17.3f}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
