"""`python -m kai_train.train` (also `kai-train`): the Hydra app run under torchrun.

setup (config checks, distributed, data, resume point) → genesis (seeded init, recorded before step 1)
→ fit (DeepSpeed steps; held-out eval; a signed checkpoint statement every `train.ckpt_every`
steps) → release and export. Provenance is written by rank 0 only; every rank takes part in the
collectives. `resume=auto` (the default) continues from the last whole checkpoint in the chain,
data position included; a fresh run_dir starts at genesis. Errors the user can fix are raised as
`AppError` (kai_train.app words them as one line; under torchrun `@record` files them).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record

from attest.errors import KaiError
from attest.layout import CHAIN_NAME, CONFIG_NAME, KEYS_DIR, PUBLIC_KEY_NAME
from kai_train.app import AppError, run


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[kai-train] {msg}", flush=True)


def shard_paths(run_dir: Path, data_dir: str) -> list[Path]:
    paths = sorted((run_dir / data_dir).glob("*.parquet"))
    if not paths:
        raise AppError(f"no *.parquet shards in {run_dir / data_dir} (run kai-data first)")
    return paths


def fit(cfg: DictConfig) -> None:
    import deepspeed

    from attest.digest import sha256_file
    from kai_train import checkpoint as ckpt
    from kai_train import determinism, genesis
    from kai_train import engine as eng
    from kai_train.data import ShardDataset
    from kai_train.evaluate import split_rows
    from kai_train.init import RECIPE, genesis_values, init_rules
    from kai_train.model import ModelConfig
    from kai_train.provenance import Provenance, ProvenanceError
    from kai_train.resume import (
        ResumeError,
        config_difference,
        discard_unrecorded,
        find_resume_point,
        recorded_run_config,
    )
    from kai_train.tracking import Tracker, check_wandb

    t_start = time.time()
    # What the config alone decides fails here, on every rank, before any work or signature.
    check_wandb(OmegaConf.to_container(cfg.wandb, resolve=True))  # type: ignore[arg-type]
    if cfg.resume not in ("auto", "never"):
        raise AppError(f"resume must be auto or never, got {cfg.resume!r}")
    shards = shard_paths(Path(cfg.run_dir), cfg.data_dir)
    determinism.configure()  # before the process group: NCCL's algorithm is read at its creation
    deepspeed.init_distributed(dist_backend=eng.backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.run_dir)
    train: dict[str, Any] = OmegaConf.to_container(cfg.train, resolve=True)  # type: ignore[assignment]
    torch.manual_seed(cfg.seed)

    try:
        data = ShardDataset(shards, run_dir / cfg.tokenizer, train["text_len"])
    except ValueError as e:
        raise AppError(str(e)) from e
    train_ids, eval_ids = split_rows(len(data), train["holdout_every"])
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))  # type: ignore[arg-type]
    if data.sp.vocab_size() > mcfg.vocab_size:
        raise AppError(f"tokenizer has {data.sp.vocab_size()} pieces, model.vocab_size is {mcfg.vocab_size}")

    box: list[Any] = [None, RECIPE]  # resume point, init recipe (a resumed run keeps the chain's)
    if rank == 0:
        try:
            box[0] = find_resume_point(run_dir)
            if box[0] is not None:
                box[1] = genesis.recorded_recipe(run_dir / CHAIN_NAME)
        except (ResumeError, ValueError) as e:
            raise AppError(str(e)) from e
        if box[0] is not None and cfg.resume == "never":
            raise AppError(f"{run_dir / CHAIN_NAME} already holds a genesis; use resume=auto or a new run_dir")
        discard_unrecorded(run_dir, box[0].step if box[0] is not None else None)  # before any rank writes
    dist.broadcast_object_list(box, src=0)
    resume, recipe_name = box

    # The model, partitioned as it is built under ZeRO-3, then the engine; its values come next:
    # the genesis (a fresh run, or one resumed before its first checkpoint) or the signed state.
    zero = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    model = eng.build_model(mcfg, zero, train, world)  # type: ignore[arg-type]
    model.grad_checkpointing = bool(train["activation_checkpointing"])
    rules = init_rules(model)
    rec = genesis.recipe(mcfg, cfg.seed, recipe_name)
    engine = eng.build_engine(model, zero, train, world)  # type: ignore[arg-type]
    writer = ckpt.ShareWriter(run_dir, rank, world, background=bool(cfg.attest.get("background", True)))
    start, position = 0, 0
    if resume is not None and resume.step > 0:  # any world size, any ZeRO stage: the code replay runs
        ckpt.restore(engine, ckpt.SignedTensors([run_dir / n for n in resume.weights_files]),
                     ckpt.SignedTensors([run_dir / n for n in resume.optimizer_files]), resume.optimizer_step,
                     resume.step)
        start, position = resume.step, resume.position
        log(f"resumed at step {start} from its signed state (sampler position {position}, world size {world})")
    else:  # kai-init/v2: each rank generates only what it holds (its partitions under ZeRO-3), on its device
        gen_device = "cpu" if eng.backend() == "gloo" else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        eng.fill(engine, genesis_values(cfg.seed, rules, recipe_name, gen_device))
    prov = None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank == 0:
        from attest.runconfig import render_yaml
        from attest.signers import ensure_public_key, make_signer

        try:
            signer = make_signer(OmegaConf.to_container(cfg.attest, resolve=True))  # type: ignore[arg-type]
            ensure_public_key(signer, run_dir / KEYS_DIR / PUBLIC_KEY_NAME)
        except KaiError as e:  # SignerError / SigningKeyError: one line naming the key or token
            raise AppError(str(e)) from e
        prov = Provenance(run_dir, signer, cfg.run_id, background=bool(cfg.attest.get("background", True)))
        resolved["data_shards"] = [{"name": str(p.relative_to(run_dir)), "sha256": sha256_file(p)} for p in shards]
        earlier = recorded_run_config(run_dir)  # a resumed run, or a start that died before its genesis
        if earlier is not None and (key := config_difference(earlier, resolved)):
            raise AppError(f"{run_dir / CHAIN_NAME}: config key {key} differs from the run statement's; "
                 "resume with the recorded config or use a new run_dir")
        if resume is None:
            if earlier is None:
                (run_dir / CONFIG_NAME).parent.mkdir(parents=True, exist_ok=True)
                (run_dir / CONFIG_NAME).write_text(render_yaml(resolved))  # what verify compares
                prov.record_run(resolved, CONFIG_NAME, world)
        elif resume.genesis_recipe != rec:
            raise AppError("this config's genesis differs from the chain's (seed or model changed); use a new run_dir")
        else:
            prov.last_root, prov.last_step = resume.weights_root, resume.step
    if resume is None:  # the genesis, written and hashed by every rank (its share), recorded by rank 0
        weights, _, _ = ckpt.collect_share(engine, rank, world, with_optimizer=False)
        writer.submit(0, weights, {}, None)
        del weights
        if prov is not None:
            shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()}
            root = prov.record_genesis(world, rec, rules, shapes)
            log(f"genesis {root[:16]}… ({sum(map(math.prod, shapes.values())):,} parameters, seed {cfg.seed})")
    tracker = Tracker(OmegaConf.to_container(cfg.wandb, resolve=True), run_dir, cfg.run_id, resolved,
                      train["steps"], start) if rank == 0 else None

    try:
        train_loop(cfg, train, engine, data, shards, train_ids, eval_ids, mcfg, run_dir, prov, writer, tracker, start,
                   position, t_start)
    except (ProvenanceError, ckpt.ShareError) as e:  # a writer or the worker failed: nothing more may be recorded
        raise AppError(str(e)) from e
    dist.barrier()


def train_loop(cfg: DictConfig, train: dict[str, Any], engine, data, shards: list[Path], train_ids: list[int],
               eval_ids: list[int], mcfg, run_dir: Path, prov, writer, tracker, start: int, position: int,
               t_start: float) -> None:
    """Steps `start+1 … train.steps`, a checkpoint every `train.ckpt_every`, then release and export."""
    from attest import failpoints
    from kai_train.evaluate import held_out_loss
    from kai_train.checkpoint import collect_share
    from kai_train.provenance import environment, rng_state_digest
    from kai_train.step import train_step

    rank, world = dist.get_rank(), dist.get_world_size()
    micro, accum, steps = train["micro_batch"], train["grad_accum"], train["steps"]
    seg_start, last_eval, seg_losses = position, {}, []
    for step in range(start + 1, steps + 1):
        losses, tokens, position = train_step(engine, data, train_ids, cfg.seed, position, rank, world, micro, accum,
                                              mcfg.image_size, mcfg.audio_samples)
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean)
        metrics = {"loss": float(mean) / world, "lr": float(engine.get_lr()[0])}
        seg_losses.append(metrics["loss"])  # per-step commitments: a replay names the first step that differs
        if tracker:
            tracker.step(step, tokens, metrics, train["log_every"])
        if prov is not None:
            prov.check()
            log_recorded(prov, tracker, step)
        failpoints.reached("step-done")
        if eval_ids and train["eval_every"] and (step % train["eval_every"] == 0 or step == steps):
            last_eval = held_out_loss(engine, data, eval_ids, micro, train["eval_batches"], mcfg.image_size, mcfg.audio_samples)
            if tracker:
                tracker.log(step, {f"eval/{k}": v for k, v in last_eval.items()},
                            f"eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        if step % train["ckpt_every"] == 0 or step == steps:
            grad_norm = grad_norm_of(engine)
            sources, rng = rng_state_digest()
            rngs: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(rng, rngs, dst=0)
            # Each rank keeps its share of the float32 master weights and moments; its writer thread
            # writes and hashes them while training goes on.
            weights, moments, opt_step = collect_share(engine, rank, world, bool(cfg.attest.optimizer_state))
            failpoints.reached("gathered")
            writer.submit(step, weights, moments, opt_step)
            del weights, moments
            if prov is not None:
                consumed = {
                    "shards": [str(p.relative_to(run_dir)) for p in shards],
                    "holdout_every": train["holdout_every"],
                    "sampler": {"seed": cfg.seed, "num_rows": len(train_ids), "world_size": world, "micro_batch": micro,
                                "epoch_start": seg_start // len(train_ids), "epoch_end": max(seg_start, position - 1) // len(train_ids),
                                "position_start": seg_start, "position_end": position},
                }
                m = {**metrics, "grad_norm": grad_norm, **{f"eval_{k}": v for k, v in last_eval.items()},
                     "wandb_run": tracker.run_id if tracker else None}
                extra = {"rng_state": {"sources": sources, "ranks": rngs}, "environment": environment(world),
                         "step_losses": seg_losses}
                prov.record_checkpoint(step, world, consumed, m, bool(cfg.attest.optimizer_state), extra)
            seg_start, seg_losses = position, []
        writer.check()
        if train["stop_at"] is not None and step >= train["stop_at"]:
            log(f"stopping at step {step} (train.stop_at); continue with resume=auto")
            writer.close()
            if prov is not None:
                prov.close()
                log_recorded(prov, tracker, step)
            if tracker:
                tracker.finish({})
            return
    writer.close()  # every rank's shares written before the release is recorded
    if prov is not None and tracker is not None:
        out = prov.record_release()  # exports to run_dir/export first: the release names its files
        log_recorded(prov, tracker, steps)
        failpoints.reached("release-recorded")
        prov.close()
        tracker.log(steps, {}, f"release step {steps} {prov.last_root[:16]}…; export at {out}")
        wall = time.time() - t_start
        per = sum(prov.checkpoint_blocked) / max(1, len(prov.checkpoint_blocked))
        tracker.log(steps, {}, f"provenance {prov.blocked:.2f} s of {wall:.2f} s wall ({100 * prov.blocked / wall:.2f}%) "
                               f"in the training loop, {per:.3f} s per checkpoint; hashing and signing checkpoints "
                               f"{prov.worker_seconds:.2f} s ({'background' if prov.background else 'inline'})")
        tracker.finish({"chain_head": prov.chain.previous, "weights_root": prov.last_root})


def log_recorded(prov, tracker, step: int) -> None:
    for s, root in prov.recorded():
        if tracker:
            tracker.log(step, {}, f"checkpoint step {s} recorded {root[:16]}…")


def grad_norm_of(engine) -> float | None:
    """The global gradient norm of the last optimizer step (before clipping), as DeepSpeed computed it."""
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    g = float(g)
    return g if math.isfinite(g) else None


@record  # under torchrun, an uncaught error goes to the rank's error file and torchrun's summary
def main() -> None:
    from kai_train.extensions import prepare

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    prepare()  # per-environment JIT build folder, stale build locks cleared, before DeepSpeed loads
    run("kai-train", "train", fit, "run_dir")


if __name__ == "__main__":
    main()
