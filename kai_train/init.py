"""Seeded per-tensor initialization ("kai-init/v1"): every initial weight is a pure function of
(seed, tensor name, shape, rule).

Because each tensor has its own generator derived from a hash, the initial weights do not depend
on module construction order, on the global RNG, on world size or on how the model is sharded,
and an offline verifier can re-derive them one tensor at a time (`genesis_tensors`) without
building the model or holding it in memory. The price: renaming a parameter or changing a rule
changes its initial values, which is intended (the rule is part of what is attested).

Normal draws are made in float64 and rounded to float32: torch's float32 randn takes a vectorized
path whose bits differ between CPU capabilities (AVX2 vs scalar), float64 randn does not.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from kai_train.model import ModelConfig, MultimodalLM, RMSNorm
from kai_train.weights import TORCH_TO_ST, tensor_bytes

RECIPE = "kai-init/v1"
BASE_STD = 0.02
# Residual-branch output projections, scaled down by sqrt(2 * depth) as in GPT-2.
RESIDUAL_OUT = ("attn.wo.weight", "mlp.w2.weight")
# Parameters created directly (not inside a Linear/Embedding): position and absent embeddings.
BARE_EMBEDDINGS = ("pos_emb", "absent_image", "absent_audio")

ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def _normal(std: float) -> str:
    return f"normal:{std!r}"  # repr round-trips the float exactly


def init_rules(model: nn.Module) -> dict[str, str]:
    """Rule string for every parameter of `model`, keyed by its name in named_parameters()."""
    rules: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, RMSNorm):
                rule = "ones"
            elif p_name == "bias":
                rule = "zeros"
            elif isinstance(mod, (nn.Linear, nn.Embedding, nn.Conv1d)) and p_name == "weight":
                rule = _normal(BASE_STD)
                if name.endswith(RESIDUAL_OUT):
                    # "<stack>.layers.<i>.attn.wo.weight": depth is the size of that layer list.
                    stack = name.split(".layers.")[0] + ".layers"
                    depth = len(model.get_submodule(stack))
                    rule = _normal(BASE_STD / math.sqrt(2 * depth))
            elif p_name in BARE_EMBEDDINGS:
                rule = _normal(BASE_STD)
            else:
                raise ValueError(f"no init rule for parameter {name!r} of {type(mod).__name__}")
            rules[name] = rule
    return rules


def _tensor_seed(seed: int, name: str, shape: tuple[int, ...], rule: str) -> int:
    key = f"{RECIPE}|{seed}|{name}|{list(shape)}|{rule}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def init_tensor(seed: int, name: str, shape: tuple[int, ...], rule: str) -> torch.Tensor:
    """The initial value of one tensor, float32 on CPU, bit-reproducible."""
    shape = tuple(int(s) for s in shape)
    if rule == "ones":
        return torch.ones(shape, dtype=torch.float32, device="cpu")
    if rule == "zeros":
        return torch.zeros(shape, dtype=torch.float32, device="cpu")
    kind, _, arg = rule.partition(":")
    if kind == "normal":
        try:
            std = float(arg)
        except ValueError:
            raise ValueError(f"init rule {rule!r} for {name!r}: std is not a number") from None
        g = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name, shape, rule))
        x = torch.randn(shape, generator=g, dtype=torch.float64, device="cpu")
        return (x * std).to(torch.float32)
    raise ValueError(f"unknown init rule {rule!r} for {name!r}")


@torch.no_grad()
def apply_init(model: nn.Module, seed: int) -> dict[str, str]:
    """Overwrite every parameter of `model` in place; returns the rules used."""
    rules = init_rules(model)
    for name, p in model.named_parameters():
        p.copy_(init_tensor(seed, name, tuple(p.shape), rules[name]))  # copy_ casts dtype/device
    return rules


def tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, rule) for every parameter, sorted by name; builds the model on meta only."""
    with torch.device("meta"):
        model = MultimodalLM(cfg)
    params = dict(model.named_parameters())
    if set(model.state_dict()) != set(params):
        # Genesis re-derivation covers parameters only; a persistent buffer would go unattested.
        raise ValueError("model state_dict holds entries that are not parameters")
    rules = init_rules(model)
    return [(name, tuple(params[name].shape), rules[name]) for name in sorted(params)]


def genesis_tensors(
    cfg: ModelConfig, seed: int, dtype: str = "F32"
) -> Iterator[tuple[str, str, tuple[int, ...], bytes]]:
    """(name, dtype, shape, raw bytes) of each initial tensor, one at a time, cast to `dtype`.

    Memory is bounded by the largest tensor, so a verifier can re-derive a large model's genesis
    digest on a laptop.
    """
    if dtype not in ST_TO_TORCH:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(ST_TO_TORCH)})")
    for name, shape, rule in tensor_specs(cfg):
        t = init_tensor(seed, name, shape, rule).to(ST_TO_TORCH[dtype])
        yield name, dtype, shape, bytes(tensor_bytes(t))


def build_genesis_model(cfg: ModelConfig, seed: int) -> tuple[MultimodalLM, dict[str, str]]:
    """A float32 CPU model holding the genesis weights, and the rules that made them."""
    model = MultimodalLM(cfg)
    return model, apply_init(model, seed)
