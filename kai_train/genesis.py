"""Genesis: the recipe that re-creates the initial weights, and its re-derivation.

The genesis statement commits to (seed, model config, init recipe) and to the canonical digest of
the weights that recipe makes. `derive` is what `kai-attest verify` calls (by the allow-listed
name `kai_train.genesis:derive`) to re-create them one tensor at a time, so memory stays bounded
by the largest tensor whatever the model size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from attest.digest import tensor_digest
from kai_train import init
from kai_train.model import ModelConfig
from kai_train.weights import TORCH_TO_ST

DERIVER = "kai_train.genesis:derive"


def recipe(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    return {"name": init.RECIPE, "seed": int(seed), "model": cfg.to_dict(), "dtype": "F32", "deriver": DERIVER}


def derive(rec: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (tensor name, leaf digest) for every tensor the recipe creates."""
    if rec.get("name") != init.RECIPE:
        raise ValueError(f"unknown init recipe {rec.get('name')!r} (this build knows {init.RECIPE})")
    if not isinstance(rec.get("model"), dict) or not isinstance(rec.get("seed"), int):
        raise ValueError("recipe needs a model config mapping and an integer seed")
    cfg = ModelConfig.from_dict(rec["model"])
    for name, dtype, shape, data in init.genesis_tensors(cfg, rec["seed"], rec.get("dtype", "F32")):
        yield name, tensor_digest(name, dtype, shape, [data])


def tensor_table(sd: dict[str, torch.Tensor], leaves: dict[str, str], rules: dict[str, str]) -> dict[str, Any]:
    """Per-tensor record for the genesis statement: dtype, shape, init rule, leaf digest."""
    return {
        n: {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "rule": rules.get(n, ""), "digest": leaves[n]}
        for n, t in sorted(sd.items())
    }
