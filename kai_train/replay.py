"""Replay plug-in: re-run segments from plans the verifier built, report the state each reaches.

    torchrun --nproc_per_node W -m kai_train.replay --plan plan.json --out result.json
    torchrun --nproc_per_node W -m kai_train.replay --plan plans.json --out results/   # {"plans": [...]}

Several plans of one layout (world size, threads, determinism settings) run one after another in
one launch, each with an engine of its own: the process start is paid once.

The plan (attest.verify.replay_plan.build_plan) is everything this process may use: the signed start state
(weights, and AdamW state after the first segment), the training shards and tokenizer, the run's
validated train/DeepSpeed config and model config, and the sampler range. Every file in it was
found through a signed statement and checked against its digest by the verifier before this
process started; nothing here reads the bundle's chain or picks a path by convention. Weights and
optimizer state are safetensors, never pickles. The result is the canonical root of the weights
*and* of the optimizer state reached, so the verifier can close the segment against the next
checkpoint. On CPU in deterministic mode the result is bit-identical to the original run when
that ran on CPU.

Tolerance mode (another world size or hardware class than recorded): the plan also names the
claimed end state (the next checkpoint's files) and, for the second of the verifier's two
replays, the end state the first one dumped. Each rank then reports, for every tensor it owns,
the float64 norms ||reached - claimed||, ||claimed - start||, ||claimed|| and ||reached - other||,
reading those tensors one at a time: the comparison costs O(model / world) per rank, like the
replay. The per-step losses are returned too, so the verifier can name the first step that differs,
and for a mixture of experts each step's routing digest per MoE layer (kai_train.routing), so it can
name the first step and layer whose routing differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kai_train.replay", description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, required=True,
                    help="one plan, or {\"plans\": [...]} of one layout (world size, threads, determinism)")
    ap.add_argument("--out", type=Path, required=True, help="the result file; for several plans a folder "
                    "that gets result-<i>.json for plan i, written as each segment is done")
    a = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from kai_train.extensions import prepare

    prepare()

    import torch
    import torch.distributed as dist

    from kai_train import determinism
    from kai_train import engine as eng

    loaded = json.loads(a.plan.read_text())
    batch = isinstance(loaded, dict) and isinstance(loaded.get("plans"), list)
    plans = loaded["plans"] if batch else [loaded]
    first = plans[0]
    torch.set_num_threads(int(first.get("threads", 1)))  # as the segment's training ran (its record)
    determinism.configure(recorded=first.get("determinism") or {})  # the segment's settings, before the process group
    eng.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    for i, plan in enumerate(plans):
        if world != plan["world_size"]:
            raise SystemExit(f"kai-train replay: segment {plan['segment']} ran on {plan['world_size']} ranks; launch with "
                             "that many")
        result = replay_segment(plan, rank, world)
        if rank == 0:
            out = a.out / f"result-{i}.json" if batch else a.out
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(out)
        dist.barrier()
    return 0


def replay_segment(plan: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    """Replay one plan on this rank; the result (on rank 0; None elsewhere)."""
    import gc

    import torch
    import torch.distributed as dist

    from attest.digest import merkle_root
    from data_pipelines.sampler import make_sampler
    from kai_train import checkpoint as ckpt
    from kai_train import engine as eng
    from kai_train.data import Batches, ShardDataset
    from kai_train.model import ModelConfig
    from kai_train.routing import RoutingLog
    from kai_train.step import train_step
    from kai_train.weights import state_dict_leaves

    train, start = plan["train"], plan["start"]
    mcfg = ModelConfig.from_dict(plan["model"])
    _, engine = eng.setup(mcfg, plan["deepspeed"], train, world)  # the trainer's: partitioned as built under ZeRO-3
    moments = ckpt.SignedTensors([Path(p) for p in start["optimizer"]]) if start.get("optimizer") else None
    ckpt.restore(engine, ckpt.SignedTensors([Path(p) for p in start["weights"]]), moments, start.get("optimizer_step"),
                 start["step"])  # what resume runs too

    data = ShardDataset([Path(p) for p in plan["shards"]], Path(plan["tokenizer"]), train["text_len"])
    want_rows = plan.get("shard_rows")
    if want_rows is not None and data.shard_rows != want_rows:
        raise SystemExit(f"kai-train replay: the shards hold {data.shard_rows[:8]} rows, their signed manifests say "
                         f"{want_rows[:8]}")
    try:
        sampler = make_sampler(plan.get("sampler_kind"), plan["seed"], plan["holdout_every"], data.shard_rows,
                               plan.get("shard_sources"), plan.get("mixture"))
    except ValueError as e:
        raise SystemExit(f"kai-train replay: {e}") from None
    if sampler.num_rows != plan["num_rows"]:
        raise SystemExit(f"kai-train replay: {sampler.num_rows} training rows, the statement says {plan['num_rows']}")
    batches = Batches(data, sampler, rank, world, train["micro_batch"], mcfg.image_size, mcfg.audio_samples)
    position, losses = plan["position_start"], []
    log = RoutingLog(train["micro_batch"], world, engine.device) if engine.module.moe_layers() else None
    for _ in range(start["step"], plan["target_step"]):
        step_losses, _, position = train_step(engine, batches, position, train["grad_accum"], log)
        mean = torch.stack(step_losses).mean()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)  # what the trainer records per step
    batches.close()
    # and, for a mixture of experts, each step's routing digest per MoE layer
    layers, routing = log.segment() if log is not None else ([], [])
    if log is not None:
        log.close()
    # The roots of the state reached, from each rank's share (as the trainer's checkpoints are made).
    weights, moments_reached, opt_step = ckpt.collect_share(engine, rank, world, True)
    stats = None
    if plan.get("compare"):
        stats = compare_share({**weights, **moments_reached}, plan["compare"], start, rank)
    leaves: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object((state_dict_leaves(weights), state_dict_leaves(moments_reached), stats), leaves, dst=0)
    result = None
    if rank == 0:
        assert leaves is not None
        w = {k: v for lw, _, _ in leaves for k, v in lw.items()}
        m = {k: v for _, lm, _ in leaves for k, v in lm.items()}
        result = {"segment": plan["segment"], "step": plan["target_step"], "weights_root": merkle_root(w),
                  "optimizer_root": merkle_root(m), "optimizer_step": opt_step, "position_end": position,
                  "world_size": world, "step_losses": losses}
        if routing:
            result["routing"] = {"layers": layers, "steps": routing}
        if plan.get("compare"):
            result["tensors"] = {k: v for _, _, st in leaves for k, v in (st or {}).items()}
    if hasattr(engine, "destroy"):
        engine.destroy()  # the next segment of a batch builds its own engine
    del engine, weights, moments_reached, leaves
    gc.collect()
    return result


def compare_share(reached: dict[str, Any], compare: dict[str, Any], start: dict[str, Any], rank: int
                  ) -> dict[str, list[float | None]]:
    """For each tensor this rank owns: [||reached - claimed||, ||claimed - start||, ||claimed||,
    ||reached - other|| or None], float64; and this rank's share dumped for the verifier's other replay."""
    import torch

    from kai_train.checkpoint import SignedTensors
    from kai_train.weights import save_weights

    claimed = SignedTensors([Path(p) for p in compare["claimed"]])
    begin = SignedTensors([Path(p) for p in [*start["weights"], *start.get("optimizer", [])]])
    other = SignedTensors([Path(p) for p in compare["other"]]) if compare.get("other") else None
    out: dict[str, list[float | None]] = {}
    for name, r in reached.items():
        r64, c64 = r.double(), claimed[name].double()
        s64 = begin[name].double() if name in begin else torch.zeros_like(c64)  # genesis: no moments yet
        f = float((r64 - other[name].double()).norm()) if other is not None else None
        out[name] = [float((r64 - c64).norm()), float((c64 - s64).norm()), float(c64.norm()), f]
    if compare.get("dump"):
        dump = Path(compare["dump"])
        dump.mkdir(parents=True, exist_ok=True)
        save_weights(reached, dump / f"rank-{rank:05d}.safetensors")
    return out


if __name__ == "__main__":
    sys.exit(main())
