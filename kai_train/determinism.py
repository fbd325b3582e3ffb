"""Deterministic execution: the settings training and replay both run under, and their record.

`configure(mode)` is called before the process group and the first kernel, by the trainer and the
replay plug-in alike, and returns what it set; the trainer records it in every checkpoint
statement (`environment.determinism`), and a replay configures itself from that record, so a
segment is replayed under the settings it was trained under.

Two modes (`determinism=` in the training config):

  exact (default): every kernel deterministic, so a segment can be replayed bit for bit.
    - torch deterministic algorithms, strict on CUDA (an op without a deterministic kernel
      raises instead of warning): this is also what makes PyTorch's flash and memory-efficient
      attention run their deterministic backward passes;
    - cuBLAS workspace (`CUBLAS_WORKSPACE_CONFIG=:4096:8`, needed for deterministic GEMMs);
    - cuDNN deterministic, no autotuning;
    - attention: on CUDA the fast fused kernels (flash, cuDNN, memory-efficient; math only where
      none applies), on CPU the math SDPA kernel only;
    - NCCL collectives: one algorithm and protocol (`NCCL_ALGO=Ring`, `NCCL_PROTO=Simple`), so a
      reduction sums in the same order every run. On CPU, gloo's ring allreduce is already fixed.
  fast: nothing pinned (any attention kernel, cuDNN autotuning, NCCL's own choice). Its record
    says so; the verifier does not expect such a segment to replay bit for bit and decides it in
    tolerance mode (docs/evaluators-guide.md).

The record names the attention kernel SDPA picks for the model's own shapes (`attention_kernel`,
`sdp_choice`) and the intra-op thread count (`threads`): a replay pins its ranks to it. A record
without `mode` (bundles made before there was a choice) is `exact` with the math kernel, which is
what those runs used.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from attest.errors import KaiError

CUBLAS_WORKSPACE = ":4096:8"
NCCL_SETTINGS = {"NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}
MODES = ("exact", "fast")
# torch's SDPBackend numbering (torch._fused_sdp_choice)
SDP_BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


class DeterminismError(KaiError, ValueError):
    pass


def _sdp(flash: bool, efficient: bool, cudnn: bool) -> None:
    torch.backends.cuda.enable_flash_sdp(flash)
    torch.backends.cuda.enable_mem_efficient_sdp(efficient)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    torch.backends.cuda.enable_math_sdp(True)


def configure(mode: str = "exact", recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Set the knobs of `mode` (or of a checkpoint's `recorded` settings, for a replay); returns `record()`."""
    if recorded is not None:
        mode = str(recorded.get("mode", "exact"))
    if mode not in MODES:
        raise DeterminismError(f"determinism must be one of {', '.join(MODES)}, got {mode!r}")
    cpu = accelerator() == "cpu"
    if mode == "exact":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        for k, v in NCCL_SETTINGS.items():
            os.environ.setdefault(k, v)
        torch.use_deterministic_algorithms(True, warn_only=cpu)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        if cpu or (recorded is not None and recorded.get("sdp_kernels") == "math"):
            _sdp(False, False, False)  # CPU, and the record of a run that used the math kernel
        else:
            _sdp(True, True, True)
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = not cpu
        _sdp(True, True, True)
    global _MODE
    _MODE = mode
    return record()


_MODE = "exact"


def accelerator() -> str:
    """The hardware class a replay must match for bit-exactness: "cpu", or "cuda:<device name>"."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{torch.cuda.get_device_name(0)}"


def _enabled_sdp() -> str:
    on = [name for name, flag in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                  ("efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                  ("cudnn", getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)()))
          if flag]
    return ",".join(on) if on else "math"


def attention_kernel(batch: int, heads: int, rows: int, head_dim: int, dtype: torch.dtype = torch.float32,
                     device: str | None = None) -> str:
    """The SDPA kernel torch picks, under the settings in force, for causal attention of these shapes."""
    dev = device or ("cpu" if accelerator() == "cpu" else "cuda")
    q = torch.empty(batch, heads, rows, head_dim, dtype=dtype, device=dev)
    try:
        choice = int(torch._fused_sdp_choice(q, q, q, is_causal=True))
    except (RuntimeError, AttributeError):
        return "unknown"
    return SDP_BACKENDS.get(choice, f"backend {choice}")


def record(shapes: tuple[int, int, int, int] | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The settings in force, as recorded with each checkpoint; with the model's attention `shapes`
    (micro batch, heads, decoder rows, head dim), the kernel SDPA picks for them."""
    out = {
        "mode": _MODE,
        "accelerator": accelerator(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "sdp_kernels": _enabled_sdp(),
        "collectives": {k: os.environ.get(k) for k in NCCL_SETTINGS} if accelerator() != "cpu" else "gloo",
        # intra-op threads per rank: CPU reductions split by thread, so a replay runs with as many
        # (attest.verify.replay pins OMP/MKL thread counts to this, whatever the evaluator's shell sets)
        "threads": torch.get_num_threads(),
    }
    if shapes is not None:
        out["attention_kernel"] = attention_kernel(*shapes, dtype=dtype)
    return out
