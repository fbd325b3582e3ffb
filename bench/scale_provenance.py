"""Provenance at cluster scale, on CPU ranks: what each rank holds, writes and waits for.

    python bench/scale_provenance.py [--model 125m] [--worlds 1 2 4] [--zero zero3 zero1]

For each world size and ZeRO stage it launches `torchrun --nproc_per_node W` on this script (gloo,
DS_ACCELERATOR=cpu) and every rank measures, in one run:

* genesis: wall time and peak RSS after building the kai-init/v2 model the trainer builds;
* one training step (the reference for "blocked per checkpoint");
* a sharded checkpoint (kai_train.checkpoint, what the trainer does): the time the training loop is
  blocked (assembling this rank's share), the bytes this rank writes and hashes, its peak RSS;
* the baseline in the same run, afterwards: every tensor and both moments gathered to rank 0,
  which writes and hashes them alone (what checkpoints cost before they were sharded).

Peak RSS is `ru_maxrss` above the RSS after imports and process start (the "tiny baseline" of
the goal is this fixed cost). Printed: a table per (world, stage) and the ratios the goals name:
peak RSS over the ZeRO-3 share (16 bytes × parameters / world), rank 0 over the median rank in
units of the fp32 model size, bytes per rank over total / world, blocked time over one step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_MEDIA = {"image_size": 32, "patch_size": 8, "audio_samples": 8000}  # the text model dominates


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_main(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    import yaml

    from attest.digest import hash_safetensors
    from kai_train import checkpoint as ckpt
    from kai_train import engine as eng
    from kai_train.init import genesis_values, init_rules
    from kai_train.model import ModelConfig
    from kai_train.weights import save_weights

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = rss_mib()
    out: dict = {"rank": rank, "world": world, "base_mib": base}

    model_cfg = yaml.safe_load((REPO / f"kai_train/conf/model/{args.model}.yaml").read_text())
    mcfg = ModelConfig.from_dict({**model_cfg, **SMALL_MEDIA})
    train = yaml.safe_load((REPO / "kai_train/conf/train/demo.yaml").read_text())
    train.update(micro_batch=1, grad_accum=1)
    zero = yaml.safe_load((REPO / f"kai_train/conf/deepspeed/{args.zero}.yaml").read_text())
    # Genesis as the trainer makes it: build (partitioned under ZeRO-3), engine, fill this rank's values.
    t = time.perf_counter()
    model = eng.build_model(mcfg, zero, train, world)
    rules = init_rules(model)
    engine = eng.build_engine(model, zero, train, world)
    eng.fill(engine, genesis_values(1234, rules))
    out["genesis_s"] = time.perf_counter() - t
    out["genesis_peak_mib"] = peak_mib() - base
    out["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    del model
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, mcfg.vocab_size, (1, train["text_len"]), generator=g)
    images = torch.zeros(1, 3, mcfg.image_size, mcfg.image_size)
    audio = torch.zeros(1, mcfg.audio_samples)
    none = torch.zeros(1, dtype=torch.bool)

    def step() -> None:
        logits = engine(tokens, images, audio, none, none)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                                 tokens[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()

    step()  # warm-up; creates the AdamW state
    dist.barrier()
    t = time.perf_counter()
    step()
    dist.barrier()
    out["step_s"] = time.perf_counter() - t
    out["train_peak_mib"] = peak_mib() - base

    run_dir = Path(args.out) / f"w{world}-{args.zero}"
    # Sharded (what the trainer does): the loop is blocked while this rank's share is assembled.
    dist.barrier()
    t = time.perf_counter()
    weights, moments, opt_step = ckpt.collect_share(engine, rank, world, True)
    out["blocked_s"] = time.perf_counter() - t
    t = time.perf_counter()
    share = ckpt.write_share(run_dir, 1, rank, world, weights, moments, opt_step)  # the writer thread's work
    out["write_hash_s"] = time.perf_counter() - t
    out["bytes"] = sum((run_dir / n).stat().st_size for n in share["files"])
    del weights, moments
    out["ckpt_peak_mib"] = peak_mib() - base
    dist.barrier()

    # Baseline: everything to rank 0, which writes and hashes alone.
    t = time.perf_counter()
    weights, moments, _ = ckpt.collect_share(engine, rank, 1, True)  # world=1: rank 0 owns every tensor
    out["consolidated_blocked_s"] = time.perf_counter() - t
    if rank == 0:
        (run_dir / "consolidated").mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        for name, sd in (("model.safetensors", weights), ("optimizer.safetensors", moments)):
            save_weights(sd, run_dir / "consolidated" / name)
            hash_safetensors(run_dir / "consolidated" / name)
        out["consolidated_write_hash_s"] = time.perf_counter() - t
    out["consolidated_bytes"] = sum(f.stat().st_size for f in (run_dir / "consolidated").glob("*")) if rank == 0 else 0
    del weights, moments
    out["consolidated_peak_mib"] = peak_mib() - base
    dist.barrier()
    Path(args.out, f"w{world}-{args.zero}-rank{rank}.json").write_text(json.dumps(out))


def run_ranks(model: str, zero: str, world: int, tmp: str, env: dict[str, str]) -> list[dict] | None:
    out = Path(tmp, model)
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(29700 + world), __file__, "--rank-mode", "--model", model, "--zero", zero, "--out", str(out)]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"{model} world {world} {zero}: failed\n{p.stderr[-3000:]}", file=sys.stderr)
        return None
    return [json.loads((out / f"w{world}-{zero}-rank{r}.json").read_text()) for r in range(world)]


def drive(args: argparse.Namespace) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    print(f"model {args.model} (media shrunk: {SMALL_MEDIA}) against the tiny preset as the fixed-cost baseline; "
          "CPU ranks, gloo, 1 thread per rank. RSS figures are peaks above the tiny model's, per rank.")
    print("zero    W   params  genesis s  gen peak MiB r0/med  step s  blocked s  /step  write+hash s  MiB/rank  "
          "max/(tot/W)  ckpt peak r0/med  max/(16P/W)  (r0-med)/fp32 | consolidated r0: blocked s  write+hash s  peak")
    with tempfile.TemporaryDirectory() as tmp:
        for zero in args.zero:
            for world in args.worlds:
                base, ranks = run_ranks("tiny", zero, world, tmp, env), run_ranks(args.model, zero, world, tmp, env)
                if not base or not ranks:
                    continue
                p = ranks[0]["params"]
                fp32, share = p * 4 / 2**20, 16 * p / world / 2**20
                total = sum(r["bytes"] for r in ranks)
                gen = [r["genesis_peak_mib"] - b["genesis_peak_mib"] for r, b in zip(ranks, base)]
                peaks = [r["ckpt_peak_mib"] - b["ckpt_peak_mib"] for r, b in zip(ranks, base)]
                med = statistics.median(peaks)
                blocked = max(r["blocked_s"] for r in ranks)
                cons = ranks[0]["consolidated_peak_mib"] - base[0]["consolidated_peak_mib"]
                print(f"{zero:<6} {world:>2} {p / 1e6:7.1f}M {ranks[0]['genesis_s']:9.2f} "
                      f"{gen[0]:9.0f}/{statistics.median(gen):<9.0f} {ranks[0]['step_s']:7.2f} "
                      f"{blocked:9.2f} {blocked / ranks[0]['step_s']:6.2f} {max(r['write_hash_s'] for r in ranks):12.2f} "
                      f"{total / world / 2**20:9.1f} {max(r['bytes'] for r in ranks) / (total / world):11.2f} "
                      f"{peaks[0]:8.0f}/{med:<8.0f} {max(peaks) / share:11.2f} {(peaks[0] - med) / fp32:13.2f} | "
                      f"{ranks[0]['consolidated_blocked_s']:26.2f} {ranks[0].get('consolidated_write_hash_s', 0):13.2f} "
                      f"{cons:5.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="125m")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--zero", nargs="+", default=["zero3", "zero1"])
    ap.add_argument("--rank-mode", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.worlds, args.zero = "tiny", [1], ["zero1"]

    if args.rank_mode:
        args.zero = args.zero[0]
        rank_main(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
