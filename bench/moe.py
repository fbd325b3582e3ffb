"""Mixture-of-experts training throughput against a dense model with the same active parameters.

    python bench/moe.py [--steps 8] [--layouts 1x1 2x1 2x2] [--smoke]

Both models train for real through `kai_train.train` under torchrun on CPU ranks (DeepSpeed ZeRO-2,
gloo), with provenance on: genesis, checkpoints hashed and signed, the release. The dense model is
`tiny` with moe-cpu's depth and an ffn_hidden chosen so that its parameter count equals moe-cpu's
*active* parameters (what one token uses), so the difference is what routing and dispatch cost.

Printed per model and rank count: text tokens/s (mean of the steps after the first, as the
trainer logs them), the time the training loop was blocked per checkpoint (the trainer's own
figure, the largest over its ranks: assembling each rank's share, gathering the routing digests and
handing the statement over; hashing and signing run in the background) and the peak RSS of the
largest process (a rank). A layout RxE is R ranks with the routed experts split over E of them
(`train.expert_parallel`; E = 1: every rank holds every expert); the dense twin runs at E = 1 only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def dense_twin_hidden() -> int:
    """ffn_hidden of a dense moe-cpu-deep model whose parameter count is moe-cpu's active count."""
    from kai_train.modelspec import ModelConfig, param_count
    from kai_train.sizing import active_params, load_preset

    moe = load_preset("moe-cpu")
    target = active_params(moe)
    base = {**moe.to_dict(), "n_experts": 0, "n_shared_experts": 0, "moe_top_k": 0, "moe_hidden": 0,
            "moe_dense_layers": 0, "moe_aux_loss_coef": 0.0, "moe_bias_update_rate": 0.0}
    return min(range(4, 4096, 4), key=lambda h: abs(param_count(ModelConfig.from_dict({**base, "ffn_hidden": h})) - target))


def run(data: Path, ranks: int, steps: int, overrides: list[str]) -> dict[str, float]:
    run_dir = Path(tempfile.mkdtemp(prefix="kai-bench-moe-"))
    shutil.rmtree(run_dir)
    shutil.copytree(data, run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(_port()),
           "-m", "kai_train.train", f"run_dir={run_dir}", "deepspeed=zero2", f"train.steps={steps}",
           f"train.ckpt_every={max(1, steps // 2)}", "train.micro_batch=4", "train.log_every=1",
           f"train.eval_every={steps}", "wandb.mode=disabled", *overrides]
    # A wrapper process runs torchrun and reports the peak RSS of its own descendants (the ranks).
    wrap = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(f'PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", wrap, *cmd], cwd=REPO, env=_env(), text=True, capture_output=True)
    peak = re.search(r"PEAK_RSS_KIB (\d+)", p.stdout)
    peak_kib = int(peak.group(1)) if peak else 0
    shutil.rmtree(run_dir, ignore_errors=True)
    if p.returncode:
        raise SystemExit(f"training failed ({' '.join(overrides)}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    rates = [float(m) for m in re.findall(r"step \d+/\d+ loss \S+\s+(\d+) tok/s", p.stdout)]
    blocked = re.search(r"checkpoints held the training loop ([\d. ]+) s each", p.stdout)
    return {"tok_s": sum(rates[1:]) / max(1, len(rates) - 1), "blocked_s": max(map(float, blocked.group(1).split())) if blocked else float("nan"),
            "peak_rss_mib": peak_kib / 1024, "loss": float(re.findall(r"loss (\S+)", p.stdout)[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "2x2"],
                    help="RxE: R ranks, routed experts split over E of them")
    ap.add_argument("--smoke", action="store_true", help="a seconds-sized run (the test suite runs it, so the bench cannot rot)")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.layouts = 2, ["1x1", "2x2"]
    layouts = [tuple(int(x) for x in lay.split("x")) for lay in args.layouts]
    from kai_train.modelspec import param_count
    from kai_train.sizing import active_params, load_preset

    hidden = dense_twin_hidden()
    moe = load_preset("moe-cpu")
    data = Path(tempfile.mkdtemp(prefix="kai-bench-moe-data-"))
    for cmd in ([sys.executable, "-m", "attest.cli", "keygen", str(data / "keys")],
                [sys.executable, "-m", "data_pipelines.build", f"out_dir={data}"]):
        subprocess.run(cmd, cwd=REPO, env=_env(), check=True, capture_output=True)
    models = {
        f"moe-cpu ({moe.n_experts}+{moe.n_shared_experts} top-{moe.moe_top_k}, {param_count(moe):,} params, "
        f"{active_params(moe):,} active)": ["model=moe-cpu"],
        f"dense twin (ffn_hidden {hidden}, {moe.n_layers} layers)": [
            "model=moe-cpu", "model.n_experts=0", "model.n_shared_experts=0", "model.moe_top_k=0", "model.moe_hidden=0",
            "model.moe_dense_layers=0", "model.moe_aux_loss_coef=0.0", "model.moe_bias_update_rate=0.0",
            f"model.ffn_hidden={hidden}"],
    }
    print(f"CPU, {os.cpu_count()} cores, DeepSpeed ZeRO-2 on gloo, provenance on, {args.steps} steps, micro batch 4 per rank\n")
    print("| model | ranks | expert parallel | text tok/s | checkpoint wait s (slowest rank) | peak RSS MiB (largest process) | final loss |")
    print("|---|---|---|---|---|---|---|")
    for ranks, ep in layouts:
        for i, (name, over) in enumerate(models.items()):
            if i and ep > 1:  # the dense twin has no experts to split
                continue
            r = run(data, ranks, args.steps, [*over, f"train.expert_parallel={ep}"])
            print(f"| {name} | {ranks} | {ep} | {r['tok_s']:.0f} | {r['blocked_s']:.3f} | {r['peak_rss_mib']:.0f} | "
                  f"{r['loss']:.3f} |", flush=True)
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
