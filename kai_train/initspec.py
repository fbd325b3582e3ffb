"""The "kai-init/v2" genesis recipe without torch: a counter-based generator, exact to the bit.

Every initial weight is a pure function of (seed, tensor name, shape, rule, flat element index),
computed with 32-bit integer operations and one correctly rounded float64 multiply, so this numpy
implementation and the torch one (`kai_train.init.init_slice`, CPU or CUDA) agree bit for bit,
and any contiguous slice of a tensor can be made on its own: a rank initializes only what it
holds, and a verifier streams a tensor in bounded chunks. docs/bundle-format.md ("kai-init/v2")
is the specification; this module follows it step by step:

    key    = first 8 bytes (little-endian) of sha256("kai-init/v2|<seed>|<name>|<shape>|<rule>")
    k0, k1 = key mod 2^32, key >> 32
    mix(x) = x ^= x >> 15; x = x * 0x2C1B3C6D mod 2^32; x ^= x >> 12; x = x * 0x297A2D39 mod 2^32;
             x ^= x >> 15
    element i:  lo, hi = i mod 2^32, i >> 32
                a   = mix(lo ^ k0)
                d_w = mix(mix(hi ^ k1) ^ ((w + 1) * 0x9E3779B9 mod 2^32))      w = 0 .. 5
                r_w = mix((a + d_w) mod 2^32)
                S   = sum over w of (r_w >> 16) + (r_w & 0xFFFF)      12 uniform 16-bit integers
                value = float32(float64(S - 393210) * (std / 65536))  Irwin-Hall, variance ~1

`derive` is the verifier's deriver for this recipe (allow-listed as `kai_train.initspec:derive`
in attest/verify/checks/model.py): names, shapes and rules come from the model config through
`kai_train.modelspec.param_specs`, never from a table in the statement. It imports no torch, so
an evaluator's light install (`pip install kai-train`) re-derives a genesis.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from attest.digest import tensor_digest
from kai_train.modelspec import ModelConfig, param_specs, rules_from_names
from kai_train.modelspec import param_count as modelspec_param_count

RECIPE = "kai-init/v2"
DERIVER = "kai_train.initspec:derive"
M32 = 0xFFFFFFFF
MIX_C1 = 0x2C1B3C6D  # both < 2^31: a 32-bit value times either stays below 2^63 (int64-safe)
MIX_C2 = 0x297A2D39
GOLDEN = 0x9E3779B9
WORDS = 6  # 32-bit words per element, two 16-bit uniforms each
CENTRE = 393210  # 12 * (2^16 - 1) / 2: the mean of the sum of twelve 16-bit uniforms
SCALE_BITS = 16
# Elements per generated chunk: 4 MiB of float32, ~30 MiB of temporaries.
CHUNK = 1 << 20


def mix32(x: int) -> int:
    """The 32-bit mixing hash on one Python int (the reference the array versions follow)."""
    x ^= x >> 15
    x = (x * MIX_C1) & M32
    x ^= x >> 12
    x = (x * MIX_C2) & M32
    return x ^ (x >> 15)


def tensor_key(seed: int, name: str, shape: tuple[int, ...], rule: str) -> tuple[int, int]:
    """(k0, k1): the low and high 32 bits of the tensor's 64-bit key."""
    text = f"{RECIPE}|{int(seed)}|{name}|{[int(s) for s in shape]}|{rule}"
    key = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return key & M32, key >> 32


def block_offsets(k1: int, hi: int) -> list[int]:
    """d_0 .. d_5 for the elements whose index has high word `hi`."""
    h = mix32((hi & M32) ^ k1)
    return [mix32(h ^ (((w + 1) * GOLDEN) & M32)) for w in range(WORDS)]


def parse_rule(rule: str, name: str = "") -> tuple[str, float]:
    """("ones" | "zeros" | "normal", std); ValueError naming the tensor for anything else."""
    if rule in ("ones", "zeros"):
        return rule, 0.0
    kind, _, arg = rule.partition(":")
    if kind != "normal":
        raise ValueError(f"unknown init rule {rule!r} for {name!r}")
    try:
        std = float(arg)
    except ValueError:
        raise ValueError(f"init rule {rule!r} for {name!r}: std is not a number") from None
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"init rule {rule!r} for {name!r}: std must be finite and >= 0")
    return "normal", std


def _mix_np(x: np.ndarray) -> np.ndarray:
    """mix32 in place on a uint32 array (uint32 arithmetic wraps mod 2^32)."""
    x ^= x >> np.uint32(15)
    x *= np.uint32(MIX_C1)
    x ^= x >> np.uint32(12)
    x *= np.uint32(MIX_C2)
    x ^= x >> np.uint32(15)
    return x


def _normal_np(k0: int, offsets: list[int], lo_start: int, n: int, scale: float) -> np.ndarray:
    """Values of n consecutive elements whose low words are lo_start .. lo_start + n - 1 (< 2^32)."""
    a = np.arange(lo_start, lo_start + n, dtype=np.uint32)
    a ^= np.uint32(k0)
    _mix_np(a)
    s = np.zeros(n, dtype=np.uint32)
    r = np.empty(n, dtype=np.uint32)
    for d in offsets:
        np.add(a, np.uint32(d), out=r)
        _mix_np(r)
        s += r >> np.uint32(16)
        r &= np.uint32(0xFFFF)
        s += r
    z = s.astype(np.int64)
    z -= CENTRE
    return (z.astype(np.float64) * scale).astype(np.float32)


def slice_bounds(name: str, shape: tuple[int, ...], start: int, stop: int | None) -> tuple[tuple[int, ...], int, int]:
    """(shape, start, stop) of a slice of a tensor's flat elements, checked; `stop` None is the end."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    stop = numel if stop is None else int(stop)
    start = int(start)
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"slice [{start}, {stop}) is outside tensor {name!r} of {numel} elements")
    return shape, start, stop


def generate(seed: int, name: str, shape: tuple[int, ...], rule: str, start: int = 0, stop: int | None = None,
             chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Flat elements [start, stop) of one tensor, in order, as float32 arrays of at most `chunk`
    elements (a chunk never spans a multiple of 2^32). Memory is bounded by a chunk."""
    shape, start, stop = slice_bounds(name, shape, start, stop)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    kind, std = parse_rule(rule, name)
    if kind != "normal":
        pos = start
        while pos < stop:
            n = min(chunk, stop - pos)
            yield np.ones(n, np.float32) if kind == "ones" else np.zeros(n, np.float32)
            pos += n
        return
    k0, k1 = tensor_key(seed, name, shape, rule)
    scale = std / (1 << SCALE_BITS)
    pos, hi_cached, offsets = start, -1, []
    while pos < stop:
        hi, lo = pos >> 32, pos & M32
        if hi != hi_cached:
            hi_cached, offsets = hi, block_offsets(k1, hi)
        n = min(chunk, stop - pos, (1 << 32) - lo)
        yield _normal_np(k0, offsets, lo, n, scale)
        pos += n


def element(seed: int, name: str, shape: tuple[int, ...], rule: str, i: int) -> float:
    """One element by the specification's formula in plain Python ints (reference for tests)."""
    kind, std = parse_rule(rule, name)
    if kind != "normal":
        return 1.0 if kind == "ones" else 0.0
    k0, k1 = tensor_key(seed, name, shape, rule)
    a = mix32((i & M32) ^ k0)
    s = 0
    for d in block_offsets(k1, i >> 32):
        r = mix32((a + d) & M32)
        s += (r >> 16) + (r & 0xFFFF)
    return float(np.float32(float(s - CENTRE) * (std / (1 << SCALE_BITS))))


# ---------------------------------------------------------------------------------------------
# the deriver


def _config(rec: dict[str, Any]) -> tuple[ModelConfig, int]:
    if rec.get("name") != RECIPE:
        raise ValueError(f"unknown init recipe {rec.get('name')!r} (this deriver knows {RECIPE})")
    seed = rec.get("seed")
    if not isinstance(rec.get("model"), dict) or not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError("recipe needs a model config mapping and an integer seed")
    if rec.get("dtype", "F32") != "F32":
        raise ValueError(f"recipe dtype {rec.get('dtype')!r}: {RECIPE} genesis weights are F32")
    return ModelConfig.from_dict(rec["model"]), seed


def param_count(rec: dict[str, Any]) -> int:
    """Elements the recipe's re-derivation makes (from the model config alone, no generation)."""
    cfg, _ = _config(rec)
    return modelspec_param_count(cfg)


def tensor_chunks(seed: int, name: str, shape: tuple[int, ...], rule: str, chunk: int = CHUNK) -> Iterator[bytes]:
    """Raw little-endian float32 bytes of one whole tensor, chunk by chunk."""
    for arr in generate(seed, name, shape, rule, chunk=chunk):
        yield arr.astype("<f4", copy=False).tobytes()


def derive(rec: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (tensor name, leaf digest) for every tensor of the recipe; memory bounded by a chunk."""
    cfg, seed = _config(rec)
    for name, shape, rule in param_specs(cfg):
        yield name, tensor_digest(name, "F32", shape, tensor_chunks(seed, name, shape, rule))


def recipe(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """The genesis statement's recipe for a v2 genesis."""
    return {"name": RECIPE, "seed": int(seed), "model": cfg.to_dict(), "dtype": "F32", "deriver": DERIVER}


def genesis_arrays(seed: int, tensors: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The kai-init/v2 genesis of `seed` for the named tensors of a MultimodalLM (float32 arrays),
    rules read from the names (`modelspec.rules_from_names`); names of other layouts are left out.
    attest.lineage compares a model with the genesis of a public seed through this."""
    return {n: genesis_array(seed, n, tuple(tensors[n]), r) for n, r in rules_from_names(tensors).items()}


def genesis_array(seed: int, name: str, shape: tuple[int, ...], rule: str) -> np.ndarray:
    """One whole kai-init/v2 tensor as a float32 array."""
    return np.concatenate(list(generate(seed, name, shape, rule))).reshape(shape)
