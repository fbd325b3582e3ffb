"""Canonical digest and atomic saving of in-memory weights.

The digest of a state dict held in memory equals `attest.digest.safetensors_root` of the same
dict saved with `save_weights`: both hash each tensor's name, safetensors dtype name, shape and
raw little-endian bytes (attest/digest.py defines the format). So the trainer can digest what it
is about to write, and a verifier can digest the file without torch, and the two must agree.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from attest.digest import merkle_root, tensor_digest

# torch dtype -> safetensors dtype name (the name that goes into each leaf digest).
TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

if sys.byteorder != "little":  # tensor_bytes returns native order; the format is little-endian
    raise ImportError("kai_train.weights requires a little-endian host")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw bytes of `t` in row-major order, as safetensors stores them (any dtype, 0-dim too)."""
    flat = t.detach().cpu().contiguous().reshape(-1)  # 0-dim -> (1,), views become contiguous
    return memoryview(flat.view(torch.uint8).numpy())  # uint8 view: numpy has no bf16


def st_dtype(t: torch.Tensor) -> str:
    try:
        return TORCH_TO_ST[t.dtype]
    except KeyError:
        raise ValueError(f"dtype {t.dtype} has no safetensors name") from None


def state_dict_leaves(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {
        name: tensor_digest(name, st_dtype(t), tuple(t.shape), [tensor_bytes(t)])
        for name, t in sd.items()
    }


def state_dict_root(sd: Mapping[str, torch.Tensor]) -> str:
    """Canonical weight digest of a state dict; equals safetensors_root of its saved file."""
    return merkle_root(state_dict_leaves(sd))


def save_weights(sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write `sd` as one safetensors file atomically (temp file in the same folder, then rename),
    so a crash never leaves a half-written file under the final name."""
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in sd.items()}
    # Not mkstemp: its 0600 mode would carry over to the final file. The pid keeps ranks apart.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
