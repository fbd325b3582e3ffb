"""Deterministic execution: the settings training and replay both run under, and their record.

`configure()` is called before the process group and the first kernel, by the trainer and the
replay plug-in alike, and returns what it set; the trainer records it in every checkpoint
statement (`environment.determinism`), which is how the verifier decides whether a segment can be
replayed bit for bit (`exact` mode: same hardware class, same world size, these settings) or only
within a measured noise floor (`tolerance` mode; docs/evaluators-guide.md).

What it pins:
  - torch deterministic algorithms (an op without a deterministic kernel raises);
  - cuBLAS workspace (`CUBLAS_WORKSPACE_CONFIG=:4096:8`, needed for deterministic GEMMs);
  - cuDNN deterministic, no autotuning;
  - attention: the math SDPA kernel only (flash and memory-efficient kernels off);
  - NCCL collectives: one algorithm and protocol (`NCCL_ALGO=Ring`, `NCCL_PROTO=Simple`), so a
    reduction sums in the same order every run. On CPU, gloo's ring allreduce is already fixed.

It records the intra-op thread count too (`threads`): a replay pins its ranks to it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

CUBLAS_WORKSPACE = ":4096:8"
NCCL_SETTINGS = {"NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}


def configure() -> dict[str, Any]:
    """Set every deterministic knob this process controls; returns `record()`."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    for k, v in NCCL_SETTINGS.items():
        os.environ.setdefault(k, v)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if hasattr(torch.backends, "cuda"):
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(True)
    return record()


def accelerator() -> str:
    """The hardware class a replay must match for bit-exactness: "cpu", or "cuda:<device name>"."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{torch.cuda.get_device_name(0)}"


def record() -> dict[str, Any]:
    """The settings in force, as recorded with each checkpoint."""
    return {
        "accelerator": accelerator(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "sdp_kernels": "math" if not torch.backends.cuda.flash_sdp_enabled() else "any",
        "collectives": {k: os.environ.get(k) for k in NCCL_SETTINGS} if accelerator() != "cpu" else "gloo",
        # intra-op threads per rank: CPU reductions split by thread, so a replay runs with as many
        # (attest.verify.replay pins OMP/MKL thread counts to this, whatever the evaluator's shell sets)
        "threads": torch.get_num_threads(),
    }
