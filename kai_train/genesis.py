"""Genesis: the recipe that re-creates the initial weights, and its re-derivation.

The genesis statement commits to (seed, model config, init recipe) and to the canonical digest of
the weights that recipe makes. New runs record "kai-init/v2", whose deriver is the torch-free
`kai_train.initspec:derive` (memory bounded by one chunk). `derive` here is the deriver of
"kai-init/v1" bundles (allow-listed as `kai_train.genesis:derive`; needs torch): it re-creates
them one tensor at a time, so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


from attest.chain import read_chain
from attest.digest import tensor_digest
from kai_train import init, initspec
from kai_train.model import ModelConfig
from kai_train.modelspec import param_count as param_count_of

DERIVER = "kai_train.genesis:derive"


def recipe(cfg: ModelConfig, seed: int, name: str = init.RECIPE) -> dict[str, Any]:
    """The genesis statement's recipe: kai-init/v2 (the default) or kai-init/v1."""
    if name == init.RECIPE_V2:
        return initspec.recipe(cfg, seed)
    if name != init.RECIPE_V1:
        raise ValueError(f"unknown init recipe {name!r} (known: {', '.join(init.RECIPES)})")
    return {"name": name, "seed": int(seed), "model": cfg.to_dict(), "dtype": "F32", "deriver": DERIVER}


SEED_DRAWN, SEED_FIXED = "drawn", "fixed"
SEED_BITS = 63  # a drawn seed fits a signed 64-bit integer (JSON readers, trackers)


def choose_seed(given: int | None, recorded: Mapping[str, Any] | None) -> tuple[int, str | None]:
    """The genesis seed of a run and how it was chosen (`seed_source`: "drawn" or "fixed").

    A run config already in the chain (a resumed run, or a start that died before its genesis)
    keeps its seed and its source: a resumed run never draws again. Otherwise a given seed is
    "fixed", and none (`seed: null`, the default) draws 63 bits from os.urandom, so two runs that
    leave the seed alone never share initial weights. None as the source: a run recorded before
    seeds were drawn, whose config names no source (resumed as it was)."""
    if recorded is not None and isinstance(recorded.get("seed"), int) and not isinstance(recorded.get("seed"), bool):
        source = recorded.get("seed_source")
        if given is None or given == recorded["seed"]:
            return int(recorded["seed"]), source if isinstance(source, str) else None
        return int(given), SEED_FIXED  # differs from the recorded one: the config check names `seed`
    if given is not None:
        return int(given), SEED_FIXED
    return int.from_bytes(os.urandom(8), "little") >> (64 - SEED_BITS), SEED_DRAWN


def recorded_recipe(chain: Path) -> str:
    """The init recipe name of the genesis already in `chain` (a resumed run re-creates that one)."""
    entries, _ = read_chain(chain)
    gens = [e.predicate for e in entries if e.kind == "genesis"]
    rec = gens[0].get("recipe") if gens else None
    name = rec.get("name") if isinstance(rec, dict) else None
    if name not in init.RECIPES:
        raise ValueError(f"{chain}: genesis recipe {name!r} is not one this build makes ({', '.join(init.RECIPES)})")
    return str(name)


def param_count(rec: dict[str, Any]) -> int:
    """Elements the recipe's re-derivation makes, from its model config alone."""
    if not isinstance(rec.get("model"), dict):
        raise ValueError("recipe needs a model config mapping")
    return param_count_of(ModelConfig.from_dict(rec["model"]))


def derive(rec: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (tensor name, leaf digest) for every tensor the recipe creates."""
    if rec.get("name") == init.RECIPE_V2:
        yield from initspec.derive(rec)
        return
    if rec.get("name") != init.RECIPE_V1:
        raise ValueError(f"unknown init recipe {rec.get('name')!r} (this deriver knows {init.RECIPE_V1})")
    if not isinstance(rec.get("model"), dict) or not isinstance(rec.get("seed"), int):
        raise ValueError("recipe needs a model config mapping and an integer seed")
    cfg = ModelConfig.from_dict(rec["model"])
    for name, dtype, shape, data in init.genesis_tensors(cfg, rec["seed"], rec.get("dtype", "F32"), init.RECIPE_V1):
        yield name, tensor_digest(name, dtype, shape, [data])


def tensor_table(shapes: Mapping[str, tuple[int, ...]], leaves: dict[str, str], rules: dict[str, str]) -> dict[str, Any]:
    """Per-tensor record for the genesis statement: dtype (float32), shape, init rule, leaf digest."""
    return {n: {"dtype": "F32", "shape": list(shapes[n]), "rule": rules.get(n, ""), "digest": leaves[n]}
            for n in sorted(shapes)}
