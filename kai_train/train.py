"""`python -m kai_train.train` (also `kai-train`): the Hydra app run under torchrun.

`Trainer(cfg)`: setup (config checks, distributed, data, resume point, engine) → genesis (seeded init,
recorded before step 1) or the signed state resumed from; `Trainer.fit()`: DeepSpeed steps, held-out
eval, a signed checkpoint statement every `train.ckpt_every` steps, then release and export. Provenance is written by rank 0 only; every rank takes part in the
collectives. `resume=auto` (the default) continues from the last whole checkpoint in the chain,
data position included; a fresh run_dir starts at genesis. Errors the user can fix are raised as
`AppError` (kai_train.app words them as one line; under torchrun `@record` files them).
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict
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


class Trainer:
    """One rank's part of a run, in torchtitan's shape: `Trainer(cfg)` builds everything from the config
    (checks, process group, data, resume point, engine, genesis or signed state, provenance), `fit()`
    runs the steps and calls one method per duty: `train_step`, `evaluate`, `checkpoint`, then `stop`
    (train.stop_at) or `finish` (release and export). Replay (kai_train.replay) builds its engine with
    the same `engine.setup`, restores with the same `checkpoint.restore` and steps with the same
    `kai_train.step.train_step`."""

    def __init__(self, cfg: DictConfig) -> None:

        from attest.digest import sha256_file
        from kai_train import checkpoint as ckpt
        from kai_train import determinism, expert_parallel, genesis
        from kai_train import engine as eng
        from kai_train.data import Batches, ShardDataset
        from kai_train.evaluate import held_out_rows
        from kai_train.init import RECIPE, genesis_values, init_rules
        from kai_train.model import ModelConfig
        from kai_train.provenance import Provenance
        from kai_train.resume import (
            ResumeError,
            LAYOUT_KEYS,
            config_difference,
            discard_unrecorded,
            find_resume_point,
            layout_change,
            recorded_run,
            recorded_run_config,
            relocated,
        )
        from kai_train.tracking import Tracker, check_wandb

        self.cfg, self.t_start = cfg, time.time()
        # What the config alone decides fails here, on every rank, before any work or signature.
        check_wandb(OmegaConf.to_container(cfg.wandb, resolve=True))  # type: ignore[arg-type]
        if cfg.resume not in ("auto", "never"):
            raise AppError(f"resume must be auto or never, got {cfg.resume!r}")
        self.shards = shards = shard_paths(Path(cfg.run_dir), cfg.data_dir)
        try:  # before the process group: NCCL's algorithm is read at its creation
            determinism.configure(cfg.get("determinism", "exact"))
        except determinism.DeterminismError as e:
            raise AppError(str(e)) from e
        eng.init_distributed()
        self.rank, self.world = rank, world = dist.get_rank(), dist.get_world_size()
        self.run_dir = run_dir = Path(cfg.run_dir)
        self.train: dict[str, Any] = OmegaConf.to_container(cfg.train, resolve=True)  # type: ignore[assignment]
        train = self.train

        try:
            self.data = ShardDataset(shards, run_dir / cfg.tokenizer, train["text_len"])
        except ValueError as e:
            raise AppError(str(e)) from e
        self.eval_ids = held_out_rows(len(self.data), train["holdout_every"])
        self.mcfg = mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))  # type: ignore[arg-type]
        if self.data.sp.vocab_size() > mcfg.vocab_size:
            raise AppError(f"tokenizer has {self.data.sp.vocab_size()} pieces, model.vocab_size is {mcfg.vocab_size}")

        # resume point, init recipe (a resumed run keeps the chain's), whether the chain's run config
        # records a sampler (a run begun before sampler kinds keeps the permutation sampler), and the
        # genesis seed with how it was chosen (drawn here when none is given; a resumed run keeps its own)
        box: list[Any] = [None, RECIPE, True, None]
        if rank == 0:
            try:
                box[0] = find_resume_point(run_dir)
                if box[0] is not None:
                    box[1] = genesis.recorded_recipe(run_dir / CHAIN_NAME)
                earlier_cfg = recorded_run_config(run_dir)
                box[2] = earlier_cfg is None or "sampler" in earlier_cfg
                box[3] = genesis.choose_seed(cfg.seed, earlier_cfg)
            except (ResumeError, ValueError) as e:
                raise AppError(str(e)) from e
            if box[0] is not None and cfg.resume == "never":
                raise AppError(f"{run_dir / CHAIN_NAME} already holds a genesis; use resume=auto or a new run_dir")
            discard_unrecorded(run_dir, box[0].step if box[0] is not None else None)  # before any rank writes
        dist.broadcast_object_list(box, src=0)
        resume, recipe_name, self.sampler_recorded, (seed, seed_source) = box
        with open_dict(cfg):
            cfg.seed = seed  # every rank, and every record below, uses the one seed rank 0 chose
        torch.manual_seed(seed)
        self.sampler = make_run_sampler(cfg, shards, self.data.shard_rows, train["holdout_every"],
                                        self.sampler_recorded)
        self.batches = Batches(self.data, self.sampler, rank, world, train["micro_batch"], mcfg.image_size,
                               mcfg.audio_samples)

        # The model, partitioned as it is built under ZeRO-3, then the engine; its values come next:
        # the genesis (a fresh run, or one resumed before its first checkpoint) or the signed state.
        zero = OmegaConf.to_container(cfg.deepspeed, resolve=True)
        self.ep = expert_parallel.size(train)
        if (why := expert_parallel.problem(mcfg, self.ep, world, eng.zero_stage(zero))) is not None:  # type: ignore[arg-type]
            raise AppError(why)
        model, self.engine = eng.setup(mcfg, zero, train, world)  # type: ignore[arg-type]
        engine = self.engine
        whole = eng.canonical_model(mcfg) if self.ep > 1 else model  # a rank holds some experts only
        rules = init_rules(whole)
        rec = genesis.recipe(mcfg, cfg.seed, recipe_name)
        self.writer = ckpt.ShareWriter(run_dir, rank, world, background=bool(cfg.attest.get("background", True)))
        self.start, self.position = 0, 0
        if resume is not None and resume.step > 0:  # any world size, any ZeRO stage: the code replay runs
            ckpt.restore(engine, ckpt.SignedTensors([run_dir / n for n in resume.weights_files]),
                         ckpt.SignedTensors([run_dir / n for n in resume.optimizer_files]), resume.optimizer_step,
                         resume.step)
            self.start, self.position = resume.step, resume.position
            log(f"resumed at step {self.start} from its signed state (sampler position {self.position}, world size {world})")
        else:  # kai-init/v2: each rank generates only what it holds (its partitions under ZeRO-3), on its device
            gen_device = "cpu" if eng.backend() == "gloo" else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            eng.fill(engine, genesis_values(cfg.seed, rules, recipe_name, gen_device))
        self.prov: Provenance | None = None
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if not self.sampler_recorded and isinstance(resolved, dict):  # the recorded config, as it was
            resolved.pop("sampler", None)
        if seed_source is not None and isinstance(resolved, dict):  # "drawn" or "fixed", named by verify
            resolved["seed_source"] = seed_source
        if rank == 0:
            from attest.runconfig import render_yaml
            from attest.signers import ensure_public_key, make_signer

            try:
                signer = make_signer(OmegaConf.to_container(cfg.attest, resolve=True))  # type: ignore[arg-type]
                ensure_public_key(signer, run_dir / KEYS_DIR / PUBLIC_KEY_NAME)
            except KaiError as e:  # SignerError / SigningKeyError: one line naming the key or token
                raise AppError(str(e)) from e
            prov = self.prov = Provenance(run_dir, signer, cfg.run_id, background=bool(cfg.attest.get("background", True)))
            resolved["data_shards"] = [{"name": str(p.relative_to(run_dir)), "sha256": sha256_file(p)} for p in shards]
            earlier = recorded_run_config(run_dir)  # a resumed run, or a start that died before its genesis
            layout_keys = frozenset(f"train.{k}" for k in LAYOUT_KEYS) if resume is not None else frozenset()
            if earlier is not None and (key := config_difference(relocated(earlier), relocated(resolved),
                                                                 also=layout_keys)):
                raise AppError(f"{run_dir / CHAIN_NAME}: config key {key} differs from the run statement's; "
                     "resume with the recorded config or use a new run_dir")
            if earlier is not None and resume is not None:  # grad_accum/micro_batch follow the world size
                run_world = (recorded_run(run_dir) or {}).get("hardware", {}).get("world_size")
                if (why := layout_change(earlier, resolved, run_world, world)) is not None:
                    raise AppError(f"{run_dir / CHAIN_NAME}: {why}")
            if resume is None:
                if earlier is None:
                    (run_dir / CONFIG_NAME).parent.mkdir(parents=True, exist_ok=True)
                    (run_dir / CONFIG_NAME).write_text(render_yaml(resolved))  # what verify compares
                    prov.record_run(resolved, CONFIG_NAME, world)
            elif resume.genesis_recipe != rec:
                raise AppError("this config's genesis differs from the chain's (seed or model changed); use a new run_dir")
            else:
                prov.resume_from(resume.step, resume.weights_root)
        if resume is None:  # the genesis, written and hashed by every rank (its share), recorded by rank 0
            weights, _, _ = ckpt.collect_share(engine, rank, world, with_optimizer=False)
            self.writer.submit(0, weights, {}, None)
            del weights
            if self.prov is not None:
                shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in whole.named_parameters()}
                root = self.prov.record_genesis(world, rec, rules, shapes)
                log(f"genesis {root[:16]}… ({sum(map(math.prod, shapes.values())):,} parameters, "
                    f"seed {seed}{' (drawn)' if seed_source == genesis.SEED_DRAWN else ''})")
        self.tracker = Tracker(OmegaConf.to_container(cfg.wandb, resolve=True), run_dir, cfg.run_id, resolved,
                               train["steps"], self.start, world, *self.flops_and_peak()) if rank == 0 else None
        # The segment since the last checkpoint: where its data began, its per-step losses; the last eval.
        self.seg_start, self.seg_losses, self.last_eval = self.position, [], {}
        self.ckpt_wait: list[float] = []  # seconds each checkpoint held this rank's training loop
        from kai_train.routing import RoutingLog

        self.routing = RoutingLog(train["micro_batch"], world, engine.device) if engine.module.moe_layers() else None

    def fit(self) -> None:
        """Steps `start+1 … train.steps`, an eval every `train.eval_every`, a checkpoint every
        `train.ckpt_every`, then release and export."""
        from kai_train.checkpoint import ShareError
        from kai_train.provenance import ProvenanceError

        train, steps = self.train, self.train["steps"]
        try:
            for step in range(self.start + 1, steps + 1):
                metrics = self.train_step(step)
                if self.eval_ids and train["eval_every"] and (step % train["eval_every"] == 0 or step == steps):
                    self.evaluate(step)
                if step % train["ckpt_every"] == 0 or step == steps:
                    t0 = time.perf_counter()
                    self.checkpoint(step, metrics)
                    self.ckpt_wait.append(time.perf_counter() - t0)
                self.writer.check()
                if train["stop_at"] is not None and step >= train["stop_at"]:
                    self.stop(step)
                    break
            else:
                self.finish()
        except (ProvenanceError, ShareError) as e:  # a writer or the worker failed: nothing more may be recorded
            raise AppError(str(e)) from e
        dist.barrier()

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step on every rank; its loss (mean over micro-batches and ranks) and lr."""
        from attest import failpoints
        from kai_train.step import train_step

        train, engine = self.train, self.engine
        losses, tokens, self.position = train_step(engine, self.batches, self.position, train["grad_accum"], self.routing)
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean)
        metrics = {"loss": float(mean) / self.world, "lr": float(engine.get_lr()[0])}
        self.seg_losses.append(metrics["loss"])  # per-step commitments: a replay names the first step that differs
        if self.tracker:
            self.tracker.step(step, tokens, metrics, train["log_every"])
        if self.prov is not None:
            self.prov.check()
            log_recorded(self.prov, self.tracker, step)
        failpoints.reached("step-done")
        return metrics

    def evaluate(self, step: int) -> None:
        """Held-out loss per modality (kept for the next checkpoint's metrics)."""
        from kai_train.evaluate import held_out_loss

        train = self.train
        self.last_eval = held_out_loss(self.engine, self.data, self.eval_ids, train["micro_batch"],
                                       train["eval_batches"], self.mcfg.image_size, self.mcfg.audio_samples)
        if self.tracker:
            self.tracker.log(step, {f"eval/{k}": v for k, v in self.last_eval.items()},
                             f"eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()))

    def checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        """Each rank hands its share of the float32 master weights and moments to its writer thread
        (written and hashed while training goes on); rank 0 hands the statement to provenance."""
        from attest import failpoints
        from kai_train.checkpoint import collect_share
        from kai_train.provenance import environment, rng_state_digest

        cfg, train, rank, world = self.cfg, self.train, self.rank, self.world
        grad_norm = grad_norm_of(self.engine)
        sources, rng = rng_state_digest()
        rngs: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(rng, rngs, dst=0)
        # a mixture of experts: per step, per MoE layer, the routing digest (a replay names the first
        # step and layer whose routing differs); gathered from every rank here, once per segment
        layers, seg_routing = self.routing.segment() if self.routing is not None else ([], [])
        weights, moments, opt_step = collect_share(self.engine, rank, world, bool(cfg.attest.optimizer_state))
        failpoints.reached("gathered")
        self.writer.submit(step, weights, moments, opt_step)
        del weights, moments
        if self.prov is not None:
            n, seg_start, position = self.sampler.num_rows, self.seg_start, self.position
            consumed = {
                "shards": [str(p.relative_to(self.run_dir)) for p in self.shards],
                "holdout_every": train["holdout_every"],
                "sampler": {"seed": cfg.seed, "num_rows": n, "world_size": world, "micro_batch": train["micro_batch"],
                            "grad_accum": train["grad_accum"],
                            **({"expert_parallel": self.ep} if self.ep > 1 else {}),
                            "epoch_start": seg_start // n, "epoch_end": max(seg_start, position - 1) // n,
                            "position_start": seg_start, "position_end": position},
            }
            if self.sampler.kind is not None:  # runs that record no kind keep their statements as they were
                consumed["sampler"]["kind"] = self.sampler.kind
                if self.sampler.mixture is not None:
                    consumed["sampler"]["mixture"] = dict(self.sampler.mixture)
                    consumed["sampler"]["sources"] = self.sampler.record(seg_start, position)
            m = {**metrics, "grad_norm": grad_norm, **{f"eval_{k}": v for k, v in self.last_eval.items()},
                 "wandb_run": self.tracker.run_id if self.tracker else None}
            extra = {"rng_state": {"sources": sources, "ranks": rngs}, "environment": environment(world, self.attention_shape(),
                                                                                          self.engine.bfloat16_enabled()),
                     "step_losses": self.seg_losses}
            if seg_routing:  # dense statements have none
                from kai_train.routing import ALGORITHM

                extra["routing"] = {"algorithm": ALGORITHM, "layers": layers, "steps": seg_routing}
            self.prov.record_checkpoint(step, world, consumed, m, bool(cfg.attest.optimizer_state), extra)
        self.seg_start, self.seg_losses = self.position, []

    def flops_and_peak(self) -> tuple[float, float | None]:
        """One device's training FLOPs per optimizer step, and its dense peak TFLOP/s (None on a CPU)."""
        from kai_train.sizing import flops_per_sample, peak_tflops

        per_step = flops_per_sample(self.mcfg, self.train["text_len"]) * self.train["micro_batch"] * self.train["grad_accum"]
        from kai_train.determinism import accelerator

        accel = accelerator()
        name = accel.removeprefix("cuda:") if accel != "cpu" else None
        return float(per_step), peak_tflops(name, self.engine.bfloat16_enabled())

    def attention_shape(self) -> tuple[int, int, int, int]:
        """(micro batch, heads, decoder rows, head dim) of the decoder's attention: the shapes the recorded
        attention kernel is chosen for."""
        m = self.mcfg
        return (self.train["micro_batch"], m.n_heads, m.n_image_tokens + m.n_audio_tokens + self.train["text_len"],
                m.dim // m.n_heads)

    def stop(self, step: int) -> None:
        """train.stop_at: every share written and every statement recorded; no release."""
        log(f"stopping at step {step} (train.stop_at); continue with resume=auto")
        self.batches.close()
        if self.routing is not None:
            self.routing.close()
        self.writer.close()
        if self.prov is not None:
            self.prov.close()
            log_recorded(self.prov, self.tracker, step)
        if self.tracker:
            self.tracker.finish({})

    def finish(self) -> None:
        """Every rank's shares written; then rank 0 exports and records the release."""
        from attest import failpoints

        steps, prov, tracker = self.train["steps"], self.prov, self.tracker
        self.batches.close()
        if self.routing is not None:
            self.routing.close()
        self.writer.close()  # every rank's shares written before the release is recorded
        waits: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(sum(self.ckpt_wait) / max(1, len(self.ckpt_wait)), waits, dst=0)
        if prov is not None and tracker is not None:
            tracker.log(steps, {}, "checkpoints held the training loop " + " ".join(f"{w:.3f}" for w in waits or [])
                        + " s each (per rank: assembling its share, the routing digests, the statement)")
            out = prov.record_release()  # exports to run_dir/export first: the release names its files
            log_recorded(prov, tracker, steps)
            failpoints.reached("release-recorded")
            prov.close()
            tracker.log(steps, {}, f"release step {steps} {prov.last_root[:16]}…; export at {out}")
            wall = time.time() - self.t_start
            per = sum(prov.checkpoint_blocked) / max(1, len(prov.checkpoint_blocked))
            tracker.log(steps, {}, f"provenance {prov.blocked:.2f} s of {wall:.2f} s wall ({100 * prov.blocked / wall:.2f}%) "
                                   f"in the training loop, {per:.3f} s per checkpoint; hashing and signing checkpoints "
                                   f"{prov.worker_seconds:.2f} s ({'background' if prov.background else 'inline'})")
            tracker.finish({"chain_head": prov.chain.previous, "weights_root": prov.last_root})


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def fit(cfg: DictConfig) -> None:
    """The Hydra app's task: build the trainer from the config and run it. Started without a launcher
    (no torchrun, no MPI: `kai-train ...`, `kai-train -m ...`), it runs as one rank on this machine, and
    each multirun job gets its own process group."""
    solo = not any(v in os.environ for v in LAUNCHER_VARS)
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if solo:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log("no launcher environment (torchrun, deepspeed, MPI): one rank on this machine")
    fresh = _deepspeed_globals() if solo else {}
    try:
        Trainer(cfg).fit()
    finally:
        if solo:
            if dist.is_initialized():
                dist.destroy_process_group()
            _deepspeed_globals(restore=fresh)  # the next multirun job builds its own groups
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _deepspeed_globals(restore: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """DeepSpeed's process-group caches (deepspeed.utils.groups, deepspeed.comm's backend): a copy of
    their module-level values, or, with `restore`, those values put back, so that a second job in
    one process does not reuse groups of a destroyed process group."""
    import copy
    import types

    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    if restore is not None:
        for mod in (ds_groups, ds_comm):
            for k, v in restore.get(mod.__name__, {}).items():
                setattr(mod, k, copy.copy(v))
        return restore
    keep = (type(None), dict, int, bool, str, list)
    return {mod.__name__: {k: copy.copy(v) for k, v in vars(mod).items()
                           if not k.startswith("__") and isinstance(v, keep) and not isinstance(v, types.ModuleType)}
            for mod in (ds_groups, ds_comm)}


def make_run_sampler(cfg: DictConfig, shards: list[Path], shard_rows: list[int], holdout_every: int,
                     recorded: bool = True) -> Any:
    """The sampler the config names (`sampler.kind`, `sampler.mixture`; a mixture reads each shard's
    source from its manifest). `recorded` False: a run begun before sampler kinds, resumed: the
    permutation sampler it ran with."""
    from data_pipelines.sampler import make_sampler
    from data_pipelines.shards import load_manifest, manifest_path

    scfg = OmegaConf.to_container(cfg.sampler, resolve=True) if recorded else {"kind": None, "mixture": None}
    assert isinstance(scfg, dict)
    sources = None
    try:
        # the footers' row counts are the manifests' (what the chain signs and replay reads): checked
        # here so that a shard rewritten after kai-data fails before training, naming it
        manifests = [load_manifest(manifest_path(p)) if manifest_path(p).is_file() or scfg.get("mixture") else None
                     for p in shards]
        for p, m, n in zip(shards, manifests, shard_rows):
            if m is not None and m.get("rows") != n:
                raise ValueError(f"{p}: {n} rows, its manifest says {m.get('rows')} (rebuild with kai-data)")
        if scfg.get("mixture"):
            sources = [str(m["source"]["name"]) for m in manifests if m is not None]
        return make_sampler(scfg.get("kind"), cfg.seed, holdout_every, shard_rows, sources, scfg.get("mixture"))
    except ValueError as e:
        raise AppError(str(e)) from e


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
