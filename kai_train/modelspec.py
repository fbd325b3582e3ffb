"""The model's architecture config and its parameter list, without torch.

`ModelConfig` holds the architecture hyperparameters (kai_train/conf/model/*.yaml). `param_specs` gives the
(name, shape, init rule) of every parameter `kai_train.model.MultimodalLM` creates, as a pure
function of the config: the genesis deriver (`kai_train.initspec`) uses it on an evaluator's
light install, where torch is absent. tests/test_genesis_v2.py checks that it equals the list
read from the torch model (`kai_train.init.tensor_specs`) for every preset.

Parameter names are part of the provenance format: a change to the model's modules must be
mirrored here, and the test above fails until it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

@dataclass
class ModelConfig:
    """Architecture hyperparameters. Defaults equal kai_train/conf/model/tiny.yaml (the config is where
    defaults live; these only let unit tests write `ModelConfig()`)."""

    # text decoder
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 172
    max_seq_len: int = 128  # text tokens only; the modality prefix comes on top
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # image encoder
    image_size: int = 32
    image_channels: int = 3
    patch_size: int = 8
    vision_dim: int = 64
    vision_layers: int = 1
    vision_heads: int = 4
    # speech encoder
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40
    audio_samples: int = 8000
    speech_dim: int = 64
    speech_layers: int = 1
    speech_heads: int = 4
    # mixture of experts in the text decoder (n_experts 0: every block has the dense SwiGLU)
    n_experts: int = 0  # routed experts per MoE block
    n_shared_experts: int = 0  # always-on experts, each moe_hidden wide
    moe_top_k: int = 0  # routed experts per token, 1..8
    moe_hidden: int = 0  # SwiGLU width of one expert (fine-grained: a fraction of ffn_hidden)
    moe_dense_layers: int = 0  # the first this many decoder blocks keep the dense ffn_hidden SwiGLU
    moe_aux_loss_coef: float = 0.0  # weight of the load-balancing loss; 0 = off
    moe_bias_update_rate: float = 0.0  # auxiliary-loss-free balancing: router bias step per optimizer step; 0 = off
    moe_capacity_factor: float = 0.0  # 0 = dropless; > 0: an expert takes <= ceil(cf * tokens * k / E) per micro-batch

    def __post_init__(self) -> None:
        # Sign and range first (a genesis recipe is hostile input to the verifier): a negative
        # vocab_size would make a parameter count come out small while another field is huge.
        for f in fields(self):
            v = getattr(self, f.name)
            zero_ok = f.name.endswith("_layers") or f.name.startswith(("moe_", "n_experts", "n_shared_experts"))
            if f.type == "int":
                lo = 0 if zero_ok else 1
                hi = MAX_LAYERS if f.name.endswith("_layers") else MAX_FIELD
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                    raise ValueError(f"ModelConfig: {f.name}={str(v)[:40]} is outside [{lo}, {hi}]")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v if zero_ok else 0 < v) \
                    or not v < math.inf:
                raise ValueError(f"ModelConfig: {f.name}={str(v)[:40]} must be a {'non-negative' if zero_ok else 'positive'} "
                                 "finite number")
        checks = [
            (self.dim % self.n_heads == 0, "dim must be divisible by n_heads"),
            ((self.dim // self.n_heads) % 2 == 0, "head dim (dim / n_heads) must be even for RoPE"),
            (self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"),
            (self.image_size % self.patch_size == 0, "image_size must be divisible by patch_size"),
            (self.vision_dim % self.vision_heads == 0, "vision_dim must be divisible by vision_heads"),
            (self.speech_dim % self.speech_heads == 0, "speech_dim must be divisible by speech_heads"),
        ]
        if self.n_experts:
            checks += [
                (self.n_experts > 0, "n_experts must be >= 0"),
                (1 <= self.moe_top_k <= min(8, self.n_experts), "moe_top_k must be in 1..min(8, n_experts)"),
                (self.moe_hidden > 0, "moe_hidden must be > 0 with n_experts > 0"),
                (self.n_shared_experts >= 0, "n_shared_experts must be >= 0"),
                (0 <= self.moe_dense_layers <= self.n_layers, "moe_dense_layers must be in 0..n_layers"),
                (self.moe_aux_loss_coef >= 0, "moe_aux_loss_coef must be >= 0"),
                (self.moe_bias_update_rate >= 0, "moe_bias_update_rate must be >= 0"),
                (self.moe_capacity_factor >= 0, "moe_capacity_factor must be >= 0 (0 = dropless)"),
            ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder block i has a mixture of experts (the first moe_dense_layers stay dense)."""
        return self.n_experts > 0 and i >= self.moe_dense_layers

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain mapping (e.g. OmegaConf.to_container of kai_train/conf/model/*.yaml).

        Unknown keys are an error rather than ignored: a misspelt field would otherwise silently
        train the default architecture.
        """
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in known:
                raise ValueError(f"ModelConfig: unknown key {key!r} (known: {', '.join(known)})")
            ftype = known[key].type  # a string: annotations are postponed
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"ModelConfig: {key!r} must be a number, got {value!r}")
            if ftype == "int":
                if value != int(value):
                    raise ValueError(f"ModelConfig: {key!r} must be an integer, got {value!r}")
                value = int(value)
            else:
                value = float(value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_audio_frames(self) -> int:
        return 1 + self.audio_samples // self.hop_length  # torch.stft with center=True

    @property
    def n_audio_tokens(self) -> int:
        n = self.n_audio_frames
        for _ in range(2):  # two Conv1d(kernel=3, stride=2, padding=1)
            n = (n + 2 - 3) // 2 + 1
        return n


def _swiglu_hidden(width: int) -> int:
    """Encoder MLP width: the Llama 8/3 rule rounded up to a multiple of 4 (the decoder's own width
    is a config field; encoder widths are derived so the config stays small)."""
    return 4 * math.ceil(8 * width / 3 / 4)


# ---------------------------------------------------------------------------------------------
# the parameter list

BASE_STD = 0.02
# The parameter list has ~9 entries per layer: a bound on layers keeps a hostile config from making
# the verifier build a list of billions of names before it can count and refuse them.
MAX_LAYERS = 10_000
MAX_FIELD = 1 << 24  # any other integer field (widths, heads, vocabulary, sizes): 16M
Spec = tuple[str, tuple[int, ...], str]


def normal_rule(std: float) -> str:
    """The rule string of a normal init: repr round-trips the float exactly."""
    return f"normal:{std!r}"


def _block(prefix: str, width: int, n_heads: int, n_kv_heads: int, hidden: int, depth: int) -> list[Spec]:
    """One transformer block (kai_train.model.Block): attention with GQA, SwiGLU, two RMSNorms.
    The residual-branch outputs (attn.wo, mlp.w2) get BASE_STD / sqrt(2 * depth), as in GPT-2."""
    hd = width // n_heads
    base, resid = normal_rule(BASE_STD), normal_rule(BASE_STD / math.sqrt(2 * depth))
    return [
        (f"{prefix}.attn.wq.weight", (n_heads * hd, width), base),
        (f"{prefix}.attn.wk.weight", (n_kv_heads * hd, width), base),
        (f"{prefix}.attn.wv.weight", (n_kv_heads * hd, width), base),
        (f"{prefix}.attn.wo.weight", (width, n_heads * hd), resid),
        (f"{prefix}.attn_norm.weight", (width,), "ones"),
        (f"{prefix}.mlp.w1.weight", (hidden, width), base),
        (f"{prefix}.mlp.w3.weight", (hidden, width), base),
        (f"{prefix}.mlp.w2.weight", (width, hidden), resid),
        (f"{prefix}.mlp_norm.weight", (width,), "ones"),
    ]


def _moe(prefix: str, cfg: ModelConfig, depth: int) -> list[Spec]:
    """A mixture-of-experts feed-forward (kai_train.model.MoE) replacing `_block`'s mlp entries: the
    router (weight, selection bias), each routed expert by its global id, the shared experts."""
    base, resid, h = normal_rule(BASE_STD), normal_rule(BASE_STD / math.sqrt(2 * depth)), cfg.moe_hidden
    out: list[Spec] = [(f"{prefix}.router.weight", (cfg.n_experts, cfg.dim), base),
                       (f"{prefix}.router.bias", (cfg.n_experts,), "zeros")]
    experts = [(f"{prefix}.experts.{e}", h) for e in range(cfg.n_experts)]
    if cfg.n_shared_experts:
        experts.append((f"{prefix}.shared", cfg.n_shared_experts * h))
    for name, hidden in experts:
        out += [(f"{name}.w1.weight", (hidden, cfg.dim), base), (f"{name}.w3.weight", (hidden, cfg.dim), base),
                (f"{name}.w2.weight", (cfg.dim, hidden), resid)]
    return out


def _encoder_tail(prefix: str, width: int, dim: int) -> list[Spec]:
    """Final norm and the two-layer projector to the decoder width."""
    return [
        (f"{prefix}.norm.weight", (width,), "ones"),
        (f"{prefix}.proj.0.weight", (dim, width), normal_rule(BASE_STD)),
        (f"{prefix}.proj.0.bias", (dim,), "zeros"),
        (f"{prefix}.proj.2.weight", (dim, dim), normal_rule(BASE_STD)),
        (f"{prefix}.proj.2.bias", (dim,), "zeros"),
    ]


def param_specs(cfg: ModelConfig) -> list[Spec]:
    """(name, shape, init rule) of every parameter of MultimodalLM(cfg), sorted by name.

    Rules: "ones" for RMSNorm weights, "zeros" for biases, "normal:<std>" for every other weight
    (BASE_STD, residual outputs scaled by 1/sqrt(2 * depth of their layer stack)).
    """
    for field in ("n_layers", "vision_layers", "speech_layers"):
        if not 0 <= getattr(cfg, field) <= MAX_LAYERS:
            raise ValueError(f"ModelConfig: {field}={getattr(cfg, field)} is outside [0, {MAX_LAYERS}]")
    n = normal_rule(BASE_STD)
    out: list[Spec] = [("absent_image", (cfg.dim,), n), ("absent_audio", (cfg.dim,), n)]
    vw, sw = cfg.vision_dim, cfg.speech_dim
    out += [
        ("vision.patch_embed.weight", (vw, cfg.image_channels * cfg.patch_size**2), n),
        ("vision.patch_embed.bias", (vw,), "zeros"),
        ("vision.pos_emb", (cfg.n_image_tokens, vw), n),
    ]
    for i in range(cfg.vision_layers):
        out += _block(f"vision.layers.{i}", vw, cfg.vision_heads, cfg.vision_heads, _swiglu_hidden(vw), cfg.vision_layers)
    out += _encoder_tail("vision", vw, cfg.dim)
    out += [
        ("speech.conv1.weight", (sw, cfg.n_mels, 3), n),
        ("speech.conv1.bias", (sw,), "zeros"),
        ("speech.conv2.weight", (sw, sw, 3), n),
        ("speech.conv2.bias", (sw,), "zeros"),
        ("speech.pos_emb", (cfg.n_audio_tokens, sw), n),
    ]
    for i in range(cfg.speech_layers):
        out += _block(f"speech.layers.{i}", sw, cfg.speech_heads, cfg.speech_heads, _swiglu_hidden(sw), cfg.speech_layers)
    out += _encoder_tail("speech", sw, cfg.dim)
    out += [("text.tok_emb.weight", (cfg.vocab_size, cfg.dim), n)]
    for i in range(cfg.n_layers):
        block = _block(f"text.layers.{i}", cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, cfg.n_layers)
        if cfg.is_moe_layer(i):
            block = [s for s in block if ".mlp." not in s[0]] + _moe(f"text.layers.{i}.mlp", cfg, cfg.n_layers)
        out += block
    out += [("text.norm.weight", (cfg.dim,), "ones"), ("text.lm_head.weight", (cfg.vocab_size, cfg.dim), n)]
    return sorted(out)


def param_count(cfg: ModelConfig) -> int:
    """Number of parameter elements of MultimodalLM(cfg)."""
    return sum(math.prod(shape) for _, shape, _ in param_specs(cfg))


_LAYER_NAME = re.compile(r"(text|vision|speech)\.layers\.(\d+)\.(.+)")
_RESIDUAL_OUT = re.compile(r"attn\.wo\.weight|(?:mlp\.(?:experts\.\d+\.|shared\.)?)w2\.weight")


def rules_from_names(names: Iterable[str]) -> dict[str, str]:
    """The init rule of each parameter name of MultimodalLM, from the names alone (what `param_specs`
    gives for the config those names came from): "ones" for norm gains, "zeros" for biases, the
    residual outputs' std from the depth of their stack (its highest layer index + 1). Lets a model
    file without its config be compared with a kai-init genesis (attest.lineage). Names of other
    layouts are left out."""
    names = list(names)
    depth: dict[str, int] = {}
    for n in names:
        if m := _LAYER_NAME.fullmatch(n):
            depth[m[1]] = max(depth.get(m[1], 0), int(m[2]) + 1)
    known = {s[0] for s in param_specs(ModelConfig())} | {"text.norm.weight"}
    out: dict[str, str] = {}
    for n in names:
        m = _LAYER_NAME.fullmatch(n)
        if m:
            suffix = m[3]
            if suffix.endswith("norm.weight"):
                out[n] = "ones"
            elif suffix.endswith(".bias"):
                out[n] = "zeros"
            elif _RESIDUAL_OUT.fullmatch(suffix):
                out[n] = normal_rule(BASE_STD / math.sqrt(2 * depth[m[1]]))
            elif suffix.endswith(".weight"):
                out[n] = normal_rule(BASE_STD)
        elif n in known:
            out[n] = "ones" if n.endswith("norm.weight") else "zeros" if n.endswith(".bias") else normal_rule(BASE_STD)
    return out
