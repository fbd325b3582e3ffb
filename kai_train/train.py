"""`python -m kai_train.train` (also `kai-train`): the Hydra app run under torchrun.

setup (config, distributed, data) → genesis (seeded init, recorded before step 1) → fit
(DeepSpeed steps, a signed checkpoint statement every `train.ckpt_every` steps) → release.
Provenance is written by rank 0 only; every rank takes part in the collectives.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[kai-train] {msg}", flush=True)


def shard_paths(run_dir: Path, data_dir: str) -> list[Path]:
    paths = sorted((run_dir / data_dir).glob("*.parquet"))
    if not paths:
        raise SystemExit(f"kai-train: error: no *.parquet shards in {run_dir / data_dir} (run kai-data first)")
    return paths


def loss_fn(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    # next-token loss over text positions; the image/audio prefix only conditions
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), ignore_index=pad_id
    )


def fit(cfg: DictConfig) -> None:
    import deepspeed

    from attest.digest import sha256_file
    from data_pipelines.sampler import DistributedSampler
    from kai_train import engine as eng
    from kai_train import genesis
    from kai_train.data import ShardDataset
    from kai_train.init import build_genesis_model
    from kai_train.model import ModelConfig
    from kai_train.provenance import Provenance
    from kai_train.weights import state_dict_leaves

    deepspeed.init_distributed(dist_backend=eng.backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.run_dir)
    train: dict[str, Any] = OmegaConf.to_container(cfg.train, resolve=True)  # type: ignore[assignment]
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    shards = shard_paths(run_dir, cfg.data_dir)
    data = ShardDataset(shards, run_dir / cfg.tokenizer, train["text_len"])
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))  # type: ignore[arg-type]
    if data.sp.vocab_size() > mcfg.vocab_size:
        raise SystemExit(f"kai-train: error: tokenizer has {data.sp.vocab_size()} pieces, model.vocab_size is {mcfg.vocab_size}")

    # Genesis: the same weights on every rank, whatever the world size or ZeRO stage.
    model, rules = build_genesis_model(mcfg, cfg.seed)
    model.grad_checkpointing = bool(train["activation_checkpointing"])
    prov = None
    if rank == 0:
        prov = Provenance(run_dir, Path(cfg.attest.key), cfg.run_id)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["data_shards"] = [{"name": str(p.relative_to(run_dir)), "sha256": sha256_file(p)} for p in shards]
        (run_dir / "config").mkdir(parents=True, exist_ok=True)
        (run_dir / "config/run.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        prov.record_run(resolved, "config/run.yaml", world)
        sd0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        root = prov.record_genesis(sd0, genesis.recipe(mcfg, cfg.seed), genesis.tensor_table(sd0, state_dict_leaves(sd0), rules))
        log(f"genesis {root[:16]}… ({model.num_params():,} parameters, seed {cfg.seed})")

    engine = eng.build_engine(model, OmegaConf.to_container(cfg.deepspeed, resolve=True), train, world)
    micro = train["micro_batch"]
    sampler = DistributedSampler(len(data), world, rank, cfg.seed, micro)
    steps, accum = train["steps"], train["grad_accum"]
    micro_step = 0
    last_ckpt_micro = 0
    t0, tokens_seen = time.time(), 0
    for step in range(1, steps + 1):
        losses = []
        for _ in range(accum):
            b = data.batch(sampler.rows(micro_step), mcfg.image_size, mcfg.audio_samples)
            logits = engine(b["tokens"], b["images"], b["audio"], b["has_image"], b["has_audio"])
            loss = loss_fn(logits, b["tokens"], data.pad_id)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
            tokens_seen += int((b["tokens"] != data.pad_id).sum()) * world
            micro_step += 1
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean)
        mean = float(mean) / world
        if step % train["log_every"] == 0 or step == 1:
            rate = tokens_seen / max(time.time() - t0, 1e-9)
            log(f"step {step}/{steps} loss {mean:.4f} lr {engine.get_lr()[0]:.2e} {rate:,.0f} tok/s")
        if step % train["ckpt_every"] == 0 or step == steps:
            sd = eng.full_state_dict(engine)
            engine.save_checkpoint(str(run_dir / "ds"), tag=f"step-{step:06d}", client_state={"step": step, "micro_step": micro_step})
            if prov is not None:
                consumed = {
                    "shards": [str(p.relative_to(run_dir)) for p in shards],
                    "sampler": {"seed": cfg.seed, "num_rows": len(data), "world_size": world, "micro_batch": micro,
                                **sampler.rows_for_steps(last_ckpt_micro, micro_step)},
                }
                root = prov.record_checkpoint(step, sd, consumed, {"loss": mean, "lr": float(engine.get_lr()[0])})
                log(f"checkpoint step {step} {root[:16]}…")
            last_ckpt_micro = micro_step
    if prov is not None:
        prov.record_release()
    dist.barrier()


@hydra.main(config_path=CONF_DIR, config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    fit(cfg)


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    _hydra_main()


if __name__ == "__main__":
    main()
