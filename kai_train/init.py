"""Seeded per-tensor initialization: every initial weight is a pure function of
(seed, tensor name, shape, rule) -- and, for "kai-init/v2", of the flat element index.

New runs use "kai-init/v2" (`RECIPE`): a counter-based generator specified bit-exactly
(kai_train/initspec.py, docs/bundle-format.md). `init_slice` makes any contiguous slice of a
tensor's flat elements on any device, bit-identical to the torch-free numpy implementation in
`kai_train.initspec`, so a rank can fill only the part it holds and a verifier needs no torch.
"kai-init/v1" (`RECIPE_V1`) stays available so earlier bundles re-derive where torch exists.

Because each tensor has its own generator derived from a hash, the initial weights do not depend
on module construction order, on the global RNG, on world size or on how the model is sharded,
and an offline verifier can re-derive them one tensor at a time (`genesis_tensors`) without
building the model or holding it in memory. The price: renaming a parameter or changing a rule
changes its initial values, which is intended (the rule is part of what is attested).

v1 normal draws are made in float64 and rounded to float32: torch's float32 randn takes a vectorized
path whose bits differ between CPU capabilities (AVX2 vs scalar), float64 randn does not.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from kai_train import initspec
from kai_train.model import ModelConfig, MultimodalLM, RMSNorm, Router
from kai_train.weights import TORCH_TO_ST, tensor_bytes

RECIPE_V1 = "kai-init/v1"
RECIPE_V2 = initspec.RECIPE
RECIPE = RECIPE_V2  # what new runs use
RECIPES = (RECIPE_V1, RECIPE_V2)
# Elements generated at once by init_slice (its temporaries are ~4 int64 per element): cache-sized
# on CPU, large on an accelerator, where each of the ~80 integer ops is one kernel launch.
SLICE_CHUNK_CPU = 1 << 16
SLICE_CHUNK_DEVICE = 1 << 24
BASE_STD = 0.02
# Residual-branch output projections, scaled down by sqrt(2 * depth) as in GPT-2: attention's
# output and the down projection of every SwiGLU (dense, each routed expert, the shared experts).
RESIDUAL_OUT = ("attn.wo.weight", ".w2.weight")
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
            elif isinstance(mod, (nn.Linear, nn.Embedding, nn.Conv1d, Router)) and p_name == "weight":
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
    key = f"{RECIPE_V1}|{seed}|{name}|{list(shape)}|{rule}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def _mix_torch(x: torch.Tensor) -> torch.Tensor:
    """initspec.mix32 in place on an int64 tensor of values in [0, 2^32): products stay below 2^63
    and values stay non-negative, so `>>` (arithmetic on int64) acts as the logical shift."""
    x ^= x >> 15
    x.mul_(initspec.MIX_C1).bitwise_and_(initspec.M32)
    x ^= x >> 12
    x.mul_(initspec.MIX_C2).bitwise_and_(initspec.M32)
    x ^= x >> 15
    return x


def init_slice(seed: int, name: str, shape: tuple[int, ...], rule: str, start: int = 0, stop: int | None = None,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """Flat elements [start, stop) of one kai-init/v2 tensor as a float32 1-D tensor on `device`,
    bit-identical to `kai_train.initspec.generate` (the specification) on CPU and CUDA alike."""
    shape, start, stop = initspec.slice_bounds(name, shape, start, stop)
    kind, std = initspec.parse_rule(rule, name)
    if kind == "ones":
        return torch.ones(stop - start, dtype=torch.float32, device=device)
    out = torch.zeros(stop - start, dtype=torch.float32, device=device)
    if kind == "zeros":
        return out
    k0, k1 = initspec.tensor_key(seed, name, shape, rule)
    scale = std / (1 << initspec.SCALE_BITS)
    chunk = SLICE_CHUNK_CPU if out.device.type == "cpu" else SLICE_CHUNK_DEVICE
    pos = start
    while pos < stop:
        hi, lo = pos >> 32, pos & initspec.M32
        n = min(chunk, stop - pos, (1 << 32) - lo)
        a = torch.arange(lo, lo + n, dtype=torch.int64, device=device)
        a ^= k0
        _mix_torch(a)
        s = torch.zeros(n, dtype=torch.int64, device=device)
        for d in initspec.block_offsets(k1, hi):
            r = _mix_torch(torch.add(a, d).bitwise_and_(initspec.M32))
            s += r >> 16
            s += r.bitwise_and_(0xFFFF)
        s -= initspec.CENTRE
        z = s.to(torch.float64)  # exact: |z| < 2^20
        out[pos - start:pos - start + n] = z.mul_(scale).to(torch.float32)  # one float64 multiply, then RNE
        pos += n
    return out


def init_tensor(seed: int, name: str, shape: tuple[int, ...], rule: str, recipe: str = RECIPE) -> torch.Tensor:
    """The initial value of one tensor, float32 on CPU, bit-reproducible."""
    shape = tuple(int(s) for s in shape)
    if recipe == RECIPE_V2:
        return init_slice(seed, name, shape, rule).view(shape)
    if recipe != RECIPE_V1:
        raise ValueError(f"unknown init recipe {recipe!r} (known: {', '.join(RECIPES)})")
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
def apply_init(model: nn.Module, seed: int, recipe: str = RECIPE, device: str | torch.device | None = None) -> dict[str, str]:
    """Overwrite every parameter of `model` in place; returns the rules used. kai-init/v2 tensors
    are generated on `device` (default: the parameter's own device) through `init_slice`."""
    rules = init_rules(model)
    for name, p in model.named_parameters():
        if recipe == RECIPE_V2:
            t = init_slice(seed, name, tuple(p.shape), rules[name], device=device or p.device).view(p.shape)
        else:
            t = init_tensor(seed, name, tuple(p.shape), rules[name], recipe)
        p.copy_(t)  # copy_ casts dtype/device
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
    cfg: ModelConfig, seed: int, dtype: str = "F32", recipe: str = RECIPE
) -> Iterator[tuple[str, str, tuple[int, ...], bytes]]:
    """(name, dtype, shape, raw bytes) of each initial tensor, one at a time, cast to `dtype`.

    Memory is bounded by the largest tensor, so a verifier can re-derive a large model's genesis
    digest on a laptop.
    """
    if dtype not in ST_TO_TORCH:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(ST_TO_TORCH)})")
    for name, shape, rule in tensor_specs(cfg):
        t = init_tensor(seed, name, shape, rule, recipe).to(ST_TO_TORCH[dtype])
        yield name, dtype, shape, bytes(tensor_bytes(t))


def genesis_values(seed: int, rules: dict[str, str], recipe: str = RECIPE, device: str | torch.device = "cpu"):
    """kai_train.engine.Values of the genesis: any slice of any tensor's initial value. kai-init/v2
    generates just that slice on `device`; kai-init/v1 (kept to resume older runs) makes the tensor."""
    def values(name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        if recipe == RECIPE_V2:
            return init_slice(seed, name, shape, rules[name], start, stop, device)
        return init_tensor(seed, name, shape, rules[name], recipe).reshape(-1)[start:stop]

    return values


def build_genesis_model(cfg: ModelConfig, seed: int, recipe: str = RECIPE,
                        device: str | torch.device | None = None) -> tuple[MultimodalLM, dict[str, str]]:
    """A float32 CPU model holding the genesis weights, and the rules that made them; kai-init/v2
    values are generated on `device` (e.g. the rank's GPU) and copied in."""
    model = MultimodalLM(cfg)
    return model, apply_init(model, seed, recipe, device)
