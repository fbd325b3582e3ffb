"""Replay plug-in: re-run one logged segment of a bundle and report the canonical digest it reaches.

    torchrun --nproc_per_node W -m kai_train.replay BUNDLE --segment K --out result.json

Segment K runs from checkpoint K-1 (genesis for K = 0) to checkpoint K, with the config of the
bundle's run statement, on the rows its checkpoint statement names, with W = the world size that
statement records. Starting state comes only from files the chain signs: the previous
checkpoint's `model.safetensors` and `optimizer.safetensors` (AdamW moments and step count) —
safetensors, never pickles. On CPU in deterministic mode the result is bit-identical to the
original run when that ran on CPU; the verifier compares it with the recorded digest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def segment_plan(bundle: Path, k: int) -> dict[str, Any]:
    """What segment k needs, read from the chain (torch-free)."""
    from attest.chain import read_chain

    entries, _ = read_chain(bundle / "chain.jsonl")
    run = next(e.predicate for e in entries if e.kind == "run")
    genesis = next(e.predicate for e in entries if e.kind == "genesis")
    ckpts = [e.predicate for e in entries if e.kind == "checkpoint"]
    if not 0 <= k < len(ckpts):
        raise ValueError(f"segment {k} out of range: the chain has {len(ckpts)} checkpoints")
    prev = ckpts[k - 1] if k > 0 else None
    return {"config": run["config"], "model": genesis["recipe"]["model"], "target": ckpts[k], "prev": prev,
            "start_step": prev["step"] if prev else 0,
            "start_weights": f"checkpoints/step-{prev['step'] if prev else 0:06d}/model.safetensors",
            "world_size": ckpts[k]["data_consumed"]["sampler"]["world_size"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kai_train.replay", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--segment", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from attest.bundle import safe_file
    from kai_train import engine as eng
    from kai_train.data import ShardDataset
    from kai_train.evaluate import split_rows
    from kai_train.model import ModelConfig, MultimodalLM
    from kai_train.step import train_step
    from kai_train.weights import state_dict_root

    plan = segment_plan(a.bundle, a.segment)
    deepspeed.init_distributed(dist_backend=eng.backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != plan["world_size"]:
        raise SystemExit(f"kai-train replay: segment {a.segment} ran on {plan['world_size']} ranks; launch with that many")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg, target, prev = plan["config"], plan["target"], plan["prev"]
    train = cfg["train"]
    mcfg = ModelConfig.from_dict(plan["model"])
    model = MultimodalLM(mcfg)
    model.load_state_dict(load_file(safe_file(a.bundle, plan["start_weights"])), strict=True)
    model.grad_checkpointing = bool(train["activation_checkpointing"])
    engine = eng.build_engine(model, cfg["deepspeed"], train, world)
    if prev is not None:
        opt = prev.get("optimizer")
        if not opt:
            raise SystemExit(f"kai-train replay: checkpoint at step {prev['step']} carries no optimizer state")
        eng.load_full_optimizer_state(engine, load_file(safe_file(a.bundle, opt["file"])), int(opt["step"]))
        for _ in range(prev["step"]):
            engine.lr_scheduler.step()

    consumed = target["data_consumed"]
    sampler = consumed["sampler"]
    data = ShardDataset([safe_file(a.bundle, s) for s in consumed["shards"]], safe_file(a.bundle, cfg["tokenizer"]),
                        train["text_len"])
    train_ids, _ = split_rows(len(data), consumed["holdout_every"])
    if len(train_ids) != sampler["num_rows"]:
        raise SystemExit(f"kai-train replay: {len(train_ids)} training rows, the statement says {sampler['num_rows']}")
    position = sampler["position_start"]
    for _ in range(plan["start_step"], target["step"]):
        _, _, position = train_step(engine, data, train_ids, sampler["seed"], position, rank, world,
                                    sampler["micro_batch"], train["grad_accum"], mcfg.image_size, mcfg.audio_samples)
    sd = eng.full_state_dict(engine)
    if rank == 0:
        result = {"segment": a.segment, "step": target["step"], "root": state_dict_root(sd),
                  "position_end": position, "expected_position_end": sampler["position_end"]}
        a.out.write_text(json.dumps(result))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
