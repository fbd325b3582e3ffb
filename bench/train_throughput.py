"""Training throughput of kai-train's DeepSpeed path against a plain PyTorch loop, same run.

    python bench/train_throughput.py --model tiny --zero 2                 # one process
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 bench/train_throughput.py --model tiny --zero 2

Every path trains the same model (the same genesis weights, `build_genesis_model`) on the same
random batches (tokens, images and audio of the model's shapes, fixed seed) for the same steps:

- deepspeed: `kai_train.engine.build_engine` exactly as `kai_train.train` calls it, with the ZeRO
  config from kai_train/conf/deepspeed/zeroN.yaml and the train config from kai_train/conf/train/demo.yaml;
- plain: the model, `torch.optim.AdamW` with the same parameter groups, LR schedule and gradient
  clipping, `loss.backward()`; no DeepSpeed, no communication;
- ddp (world size > 1 only): plain wrapped in torch's DistributedDataParallel, the PyTorch way to
  train on several ranks, which all-reduces the gradients.

Under torchrun every rank runs every path, so the plain loop on each rank is one process with the
same per-rank batch, contending for the machine exactly as the DeepSpeed ranks do. deepspeed/plain
therefore charges DeepSpeed with its sharding *and* the gradient communication any data-parallel
run pays; deepspeed/ddp isolates what DeepSpeed adds over PyTorch's own data parallelism. Every
rank gets the same batches, so all paths follow the same loss curve (printed as a check).
Timed phases alternate (plain, deepspeed, ddp, plain, ...) `--rounds` times after `--warmup`
untimed steps of each path, so drift in machine speed hits all of them. Tokens are text tokens
(the image and audio prefix rows are not counted), as the trainer's log counts them.

On a GPU it also prints MFU against the bf16 dense peak (--peak-tflops, or a table: H100/H200
989, A100 312, …: kai_train.sizing.PEAK_TFLOPS): by 6·N·tokens/s, and by the model's FLOPs per sample (prefix rows and attention
included, `kai_train.sizing.flops_per_sample`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ZERO_CONFIGS = sorted(p.stem.removeprefix("zero") for p in (REPO / "kai_train/conf/deepspeed").glob("zero*.yaml"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_defaults() -> None:
    """Let `python bench/train_throughput.py` run as a world of one, as torchrun would set it up."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="kai_train/conf/model preset name or YAML path [tiny]")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a model field, e.g. --set dim=256 (repeatable)")
    ap.add_argument("--zero", default="2", choices=ZERO_CONFIGS,
                    help="ZeRO stage: kai_train/conf/deepspeed/zero<ZERO>.yaml [2]")
    ap.add_argument("--train", default="demo", help="kai_train/conf/train preset for lr, clipping, schedule [demo]")
    ap.add_argument("--micro-batch", type=int, default=8, help="samples per rank per step [8]")
    ap.add_argument("--seq-len", type=int, default=32, help="text tokens per sample [32]")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per path per round [10]")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds [3]")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per path first [3]")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder blocks")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 compute (DeepSpeed bf16 / torch.autocast for the plain loop) "
                         "[as the ZeRO config says on GPUs; CPU ranks run fp32]")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU [from table]")
    ap.add_argument("--paths", default="plain,deepspeed,ddp",
                    help="paths to time, comma-separated; each plain path holds its own fp32 model and "
                         "AdamW state (16 bytes/param), so drop some for large models [plain,deepspeed,ddp]")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--determinism", choices=("exact", "fast"), default="exact",
                    help="the trainer's determinism setting (kai_train.determinism) every path runs under [exact]")
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.steps, a.rounds, a.warmup, a.paths = 2, 1, 1, "plain,deepspeed"
    return a


def model_config(args: argparse.Namespace):
    from kai_train.model import ModelConfig
    from kai_train.sizing import load_preset

    cfg = load_preset(args.model).to_dict()
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"train_throughput: error: --set wants FIELD=VALUE, got {item!r}")
        cfg[key] = float(value) if "." in value or "e" in value.lower() else int(value)
    return ModelConfig.from_dict(cfg)


def make_batches(cfg, micro_batch: int, seq_len: int, seed: int, device, n: int = 4) -> list[dict[str, Any]]:
    """n distinct random batches of the model's input shapes, the same on every rank and path."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {
            "tokens": torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), generator=g),
            "images": torch.rand(micro_batch, cfg.image_channels, cfg.image_size, cfg.image_size, generator=g),
            "audio": 0.1 * torch.randn(micro_batch, cfg.audio_samples, generator=g),
            "has_image": torch.ones(micro_batch, dtype=torch.bool),
            "has_audio": torch.ones(micro_batch, dtype=torch.bool),
        }
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _single_process_defaults()
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from kai_train import engine as eng
    from kai_train.init import build_genesis_model
    from kai_train.sizing import flops_per_sample, param_counts, peak_tflops
    from kai_train.step import loss_fn  # the trainer's loss

    from kai_train import determinism

    recorded = determinism.configure(args.determinism)  # as kai_train.train does, before the process group
    eng.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = eng.backend() == "nccl"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)

    cfg = model_config(args)
    if args.seq_len > cfg.max_seq_len:
        raise SystemExit(f"train_throughput: error: --seq-len {args.seq_len} > max_seq_len {cfg.max_seq_len}")
    total_steps = args.warmup + args.rounds * args.steps
    train = OmegaConf.to_container(OmegaConf.load(REPO / "kai_train/conf/train" / f"{args.train}.yaml"), resolve=True)
    train.update(micro_batch=args.micro_batch, grad_accum=1, text_len=args.seq_len, steps=total_steps,
                 activation_checkpointing=args.activation_checkpointing)
    zero = OmegaConf.to_container(OmegaConf.load(REPO / "kai_train/conf/deepspeed" / f"zero{args.zero}.yaml"), resolve=True)
    if args.bf16 is not None:
        zero["bf16"] = {"enabled": args.bf16}
    # what the engine will run: ds_config turns bf16 off on CPU (gloo) ranks
    bf16 = bool(eng.ds_config(zero, train, world)["bf16"]["enabled"]) if "bf16" in zero else False
    # deepspeed path: exactly the trainer's wiring
    ds_model, _ = build_genesis_model(cfg, args.seed)
    ds_model.grad_checkpointing = args.activation_checkpointing
    engine = eng.build_engine(ds_model, zero, train, world)
    batches = make_batches(cfg, args.micro_batch, args.seq_len, args.seed, device)
    pad_id = -100  # random tokens: nothing to ignore
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def plain_trainer(ddp: bool) -> Callable[[dict[str, Any]], torch.Tensor]:
        """The same weights, AdamW groups, LR schedule and clipping as the engine, no DeepSpeed;
        with ddp, torch's DistributedDataParallel all-reduces the gradients."""
        model, _ = build_genesis_model(cfg, args.seed)
        model.grad_checkpointing = args.activation_checkpointing
        model.to(device)
        opt = torch.optim.AdamW(eng.param_groups(model, train["weight_decay"]), lr=train["lr"],
                                betas=tuple(train["betas"]), eps=1e-8)
        # the very LR-multiplier function build_engine made (a pure function of the step)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.lr_scheduler.lr_lambdas[0])
        params = list(model.parameters())
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if on_gpu else None) if ddp else model

        def step(b: dict[str, Any]) -> torch.Tensor:
            with autocast:
                logits = net(b["tokens"], b["images"], b["audio"], b["has_image"], b["has_audio"])
                loss = loss_fn(logits, b["tokens"], pad_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train["grad_clip"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    def ds_step(b: dict[str, Any]) -> torch.Tensor:
        logits = engine(b["tokens"], b["images"], b["audio"], b["has_image"], b["has_audio"])
        loss = loss_fn(logits, b["tokens"], pad_id)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()

    wanted = args.paths.split(",")
    unknown = set(wanted) - {"plain", "deepspeed", "ddp"}
    if unknown:
        raise SystemExit(f"train_throughput: error: unknown path(s) {', '.join(sorted(unknown))}")
    paths: dict[str, Callable[[dict[str, Any]], torch.Tensor]] = {}
    if "plain" in wanted:
        paths["plain"] = plain_trainer(ddp=False)
    if "deepspeed" in wanted:
        paths["deepspeed"] = ds_step
    if "ddp" in wanted and world > 1:
        paths["ddp"] = plain_trainer(ddp=True)
    seconds = dict.fromkeys(paths, 0.0)
    step_i = dict.fromkeys(paths, 0)
    losses: dict[str, list[torch.Tensor]] = {k: [] for k in paths}  # read after timing: no host sync

    def run(name: str, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            losses[name].append(paths[name](batches[step_i[name] % len(batches)]))
            step_i[name] += 1
        sync()
        return time.perf_counter() - t0

    load_before = os.getloadavg()[0]
    for name in paths:
        run(name, args.warmup)
    for _ in range(args.rounds):
        for name in paths:
            seconds[name] += run(name, args.steps)

    # per-rank tokens/s, averaged over ranks
    tokens = args.rounds * args.steps * args.micro_batch * args.seq_len
    names = list(paths)
    rates_t = torch.tensor([tokens / seconds[n] for n in names], dtype=torch.float64)
    dist.all_reduce(rates_t)
    rates = dict(zip(names, (float(r) / world for r in rates_t)))

    if rank == 0:
        counts = param_counts(cfg)
        dev = (torch.cuda.get_device_name(device) if on_gpu
               else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads/rank)")
        print(f"kai-train throughput @ {git_rev()}  torch {torch.__version__}  deepspeed {deepspeed.__version__}")
        print(f"model {args.model}{' ' + ' '.join(args.set) if args.set else ''}: {counts['total']:,} params "
              f"(text {counts['text']:,}, vision {counts['vision']:,}, speech {counts['speech']:,})")
        print(f"batch {args.micro_batch} x {args.seq_len} text tokens per rank (+ {cfg.n_image_tokens} image, "
              f"{cfg.n_audio_tokens} audio prefix rows), ZeRO-{args.zero}, world size {world}, {dev}, "
              f"{'bf16' if bf16 else 'fp32'}, activation checkpointing {'on' if args.activation_checkpointing else 'off'}")
        print(f"determinism={recorded['mode']}: deterministic algorithms {recorded['deterministic_algorithms']}, "
              f"attention kernels {recorded['sdp_kernels']}")
        print(f"timed: {args.rounds} rounds x {args.steps} steps per path after {args.warmup} warmup steps each; "
              f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
        print(f"{'path':<10} {'tok/s/rank':>12} {'ms/step':>9} {'first loss':>11} {'last loss':>10}")
        for name in names:
            ms = 1000 * args.micro_batch * args.seq_len / rates[name]
            print(f"{name:<10} {rates[name]:>12,.0f} {ms:>9.1f} {float(losses[name][0]):>11.4f} "
                  f"{float(losses[name][-1]):>10.4f}")
        if "deepspeed" in rates:
            ratios = [f"deepspeed/{base}: {rates['deepspeed'] / rates[base]:.3f}" for base in ("plain", "ddp")
                      if base in rates]
            print(f"ratio {'   '.join(ratios)}   (deepspeed total {rates['deepspeed'] * world:,.0f} tok/s)")
        if on_gpu and "deepspeed" in rates:
            name = torch.cuda.get_device_name(device)
            peak = args.peak_tflops or peak_tflops(name, bf16=True)
            if peak is None:
                print(f"MFU: unknown peak for {name!r}: pass --peak-tflops")
            else:
                mfu_6n = 6 * counts["total"] * rates["deepspeed"] / (peak * 1e12)
                mfu_model = flops_per_sample(cfg, args.seq_len) * rates["deepspeed"] / args.seq_len / (peak * 1e12)
                note = "" if bf16 else " (an fp32 run, against the bf16 peak)"
                print(f"MFU (deepspeed) vs {peak:g} TFLOP/s{note}: {mfu_6n:.1%} by 6·N·tok/s, "
                      f"{mfu_model:.1%} by model FLOPs (prefix rows + attention)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
