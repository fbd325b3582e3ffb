"""Rank-0 progress and experiment tracking: a rich progress bar (tokens/s, loss, ETA) on a
terminal, plain log lines otherwise, and wandb.

Throughput is logged as `tokens_per_s` (all ranks), `tokens_per_s_per_device`, and on a GPU
`tflops_per_device` (the model's training FLOPs per step, `kai_train.sizing.flops_per_sample`,
over the wall time) and `mfu` against the device's dense peak (`kai_train.sizing.PEAK_TFLOPS`;
none on a CPU or an unknown device).

wandb runs `offline` by default (it writes under RUN_DIR/wandb and needs no network; sync later
with `wandb sync`). `online` needs an API key (WANDB_API_KEY, or a netrc entry for the wandb host as `wandb login`
writes) and network: without a key the trainer stops with one line before anything is signed
(`check_wandb`); `disabled` turns it off.
"""

from __future__ import annotations

import netrc
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from attest.errors import KaiError


class TrackingError(KaiError, RuntimeError):
    pass


def has_wandb_key() -> bool:
    """WANDB_API_KEY is set, or the netrc file (NETRC or ~/.netrc) holds a password for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def check_wandb(wandb_cfg: dict[str, Any]) -> None:
    """The `wandb` config can work here: a known mode, and a key for `online` (TrackingError)."""
    mode = wandb_cfg.get("mode", "offline")
    if mode not in ("offline", "online", "disabled"):
        raise TrackingError(f"wandb.mode must be offline, online or disabled, got {mode!r}")
    if mode == "online" and not has_wandb_key():
        raise TrackingError("wandb.mode=online needs an API key (WANDB_API_KEY or `wandb login`) and network access; "
                            "use wandb.mode=offline (default) and `wandb sync RUN_DIR/wandb` later")


WANDB_ID_FILE = "wandb/run-id"  # under RUN_DIR: the wandb run id every start of this run reuses
_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def wandb_run_id(run_dir: Path, run_id: str) -> str:
    """The run's wandb id: read from RUN_DIR/wandb/run-id, or drawn (`<run_id>-<8 hex>`, so two runs
    named alike stay two wandb runs) and written there on the first start. A resumed run continues
    the same wandb run (offline, each start writes its own folder; `wandb sync` joins them by id)."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        got = path.read_text().strip()
        if not _WANDB_ID.fullmatch(got):
            raise TrackingError(f"{path}: not a wandb run id ({got[:40]!r}); delete it to draw a new one")
        return got
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", run_id)[:48] or "run"
    new = f"{stem}-{secrets.token_hex(4)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new + "\n")
    return new


class Tracker:
    def __init__(self, wandb_cfg: dict[str, Any], run_dir: Path, run_id: str, config: dict[str, Any],
                 total_steps: int, start_step: int, world: int = 1, flops_per_step: float = 0.0,
                 peak_tflops: float | None = None) -> None:
        """`flops_per_step`: one device's training FLOPs per optimizer step; `peak_tflops`: its dense peak."""
        self.total, self.start = total_steps, start_step
        self.t0 = time.time()
        self.tokens = self.steps = 0
        self.world, self.flops_per_step, self.peak = world, flops_per_step, peak_tflops
        self.run = None
        check_wandb(wandb_cfg)
        mode = wandb_cfg.get("mode", "offline")
        if mode != "disabled":
            import wandb

            self.run = wandb.init(project=wandb_cfg.get("project", "kai-train"), name=run_id,
                                  id=wandb_run_id(run_dir, run_id), dir=str(run_dir), mode=mode, config=config,
                                  resume="allow")
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def step(self, step: int, tokens: int, metrics: dict[str, float], log_every: int) -> None:
        self.tokens, self.steps = self.tokens + tokens, self.steps + 1
        metrics = {**metrics, **self.throughput(time.time() - self.t0)}
        if self.run is not None:
            self.run.log(metrics, step=step)
        rate = metrics["tokens_per_s"]
        info = f"loss {metrics['loss']:.4f}  {rate:,.0f} tok/s"
        if "mfu" in metrics:
            info += f"  {metrics['tflops_per_device']:.1f} TFLOP/s/device  MFU {metrics['mfu']:.1%}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % log_every == 0 or step == self.start + 1:
            print(f"[kai-train] step {step}/{self.total} {info}  lr {metrics['lr']:.2e}", flush=True)

    def throughput(self, elapsed: float) -> dict[str, float]:
        """Tokens/s (all ranks and per device), and TFLOP/s per device and MFU where a peak is known."""
        elapsed = max(elapsed, 1e-9)
        out = {"tokens_per_s": self.tokens / elapsed, "tokens_per_s_per_device": self.tokens / elapsed / self.world}
        if self.peak and self.flops_per_step:
            tflops = self.steps * self.flops_per_step / elapsed / 1e12
            out.update(tflops_per_device=tflops, mfu=tflops / self.peak)
        return out

    def log(self, step: int, metrics: dict[str, float], message: str) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)
        if self.bar is not None:
            self.bar.console.print(f"[kai-train] {message}")
        else:
            print(f"[kai-train] {message}", flush=True)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish()
