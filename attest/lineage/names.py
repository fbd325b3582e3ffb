"""Name mapping for the lineage test: which component, role and axes each tensor of a model is.

Two models can only be compared where we know what each dimension of a tensor indexes. Every
tensor that a rule here recognises becomes a `Slot`: a component (a decoder block, the token
embedding, the image encoder's patch embedding, a projector, the norm gains of one stack ...), a
role inside it (`attn.q`, `mlp.down`, ...) that is the same across layouts, and one `Axis` per
dimension:

- `unit:NAME`   hidden units private to the component (MLP hidden units, attention rows): any
                permutation of them is an output-preserving transform, so the test matches them;
- `stream:NAME` a residual stream (`text`, `vision`, `speech`), shared by the whole stack: the
                test aligns it by index, and its permutations are the null distribution;
- `fixed:NAME`  an axis the outside world fixes (vocabulary, pixels, positions, mel bins).

Layouts known: ours (kai_train/model.py), Llama/Qwen-style decoders (`model.layers.N.self_attn.
q_proj`), CLIP/SigLIP (`vision_model.encoder.layers.N`), Hugging Face ViT (`vit.encoder.layer.N`),
Qwen2-VL vision (`visual.blocks.N`, fused qkv split in thirds), LLaVA projectors and the Whisper
encoder. A tensor no rule knows is returned in `unmatched`, never guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

FAMILIES = ("text", "vision", "speech")


@dataclass(frozen=True)
class Axis:
    kind: str  # "unit" | "stream" | "fixed"
    name: str


@dataclass(frozen=True)
class Slot:
    """Where one tensor (or a row range of a fused one) sits in the comparison."""

    tensor: str  # the tensor's name in its file
    component: str  # "text.block.3", "vision.embed", "text.norm", ...
    role: str  # "attn.q", "mlp.down", "block.3.attn_norm", ...
    axes: tuple[Axis, ...]  # one per dimension, after squeezing leading 1s
    rows: tuple[int, int] | None = None  # row range of a fused tensor (qkv)
    is_norm: bool = False  # a normalisation gain or bias (init 1 / 0: never a verdict by itself)
    parts: tuple[str, ...] = ()  # tensors joined along the unit axis (a block's experts), `tensor` the first


# Axes of each block role; S is the family's stream, U:x a unit group of the block.
BLOCK_AXES = {
    "attn.q": "U:q S", "attn.k": "U:k S", "attn.v": "U:v S", "attn.o": "S U:o",
    "attn.q.bias": "U:q", "attn.k.bias": "U:k", "attn.v.bias": "U:v", "attn.o.bias": "S",
    "attn.qkv": "U:qkv S", "attn.qkv.bias": "U:qkv",
    "mlp.gate": "U:mlp S", "mlp.up": "U:mlp S", "mlp.down": "S U:mlp",
    "mlp.fc1": "U:mlp S", "mlp.fc1.bias": "U:mlp", "mlp.fc2": "S U:mlp", "mlp.fc2.bias": "S",
}
NORM_ROLES = ("attn_norm", "attn_norm.bias", "mlp_norm", "mlp_norm.bias")

# Per-layer suffix -> role, for each layout. The layer index is the `i` group of the prefix.
OURS_BLOCK = {
    "attn.wq.weight": "attn.q", "attn.wk.weight": "attn.k", "attn.wv.weight": "attn.v",
    "attn.wo.weight": "attn.o", "mlp.w1.weight": "mlp.gate", "mlp.w3.weight": "mlp.up",
    "mlp.w2.weight": "mlp.down", "attn_norm.weight": "attn_norm", "mlp_norm.weight": "mlp_norm",
}
LLAMA_BLOCK = {
    "self_attn.q_proj.weight": "attn.q", "self_attn.k_proj.weight": "attn.k",
    "self_attn.v_proj.weight": "attn.v", "self_attn.o_proj.weight": "attn.o",
    "self_attn.q_proj.bias": "attn.q.bias", "self_attn.k_proj.bias": "attn.k.bias",
    "self_attn.v_proj.bias": "attn.v.bias",
    "mlp.gate_proj.weight": "mlp.gate", "mlp.up_proj.weight": "mlp.up", "mlp.down_proj.weight": "mlp.down",
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
}
CLIP_BLOCK = {
    **{f"self_attn.{x}_proj.{p}": f"attn.{x}{'.bias' if p == 'bias' else ''}"
       for x in "qkv" for p in ("weight", "bias")},
    "self_attn.out_proj.weight": "attn.o", "self_attn.out_proj.bias": "attn.o.bias",
    "mlp.fc1.weight": "mlp.fc1", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2", "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_norm1.weight": "attn_norm", "layer_norm1.bias": "attn_norm.bias",
    "layer_norm2.weight": "mlp_norm", "layer_norm2.bias": "mlp_norm.bias",
}
WHISPER_BLOCK = {
    **{k: v for k, v in CLIP_BLOCK.items() if k.startswith("self_attn.")},
    "fc1.weight": "mlp.fc1", "fc1.bias": "mlp.fc1.bias", "fc2.weight": "mlp.fc2", "fc2.bias": "mlp.fc2.bias",
    "self_attn_layer_norm.weight": "attn_norm", "self_attn_layer_norm.bias": "attn_norm.bias",
    "final_layer_norm.weight": "mlp_norm", "final_layer_norm.bias": "mlp_norm.bias",
}
VIT_BLOCK = {
    **{f"attention.attention.{hf}.{p}": f"attn.{x}{'.bias' if p == 'bias' else ''}"
       for hf, x in (("query", "q"), ("key", "k"), ("value", "v")) for p in ("weight", "bias")},
    "attention.output.dense.weight": "attn.o", "attention.output.dense.bias": "attn.o.bias",
    "intermediate.dense.weight": "mlp.fc1", "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2", "output.dense.bias": "mlp.fc2.bias",
    "layernorm_before.weight": "attn_norm", "layernorm_before.bias": "attn_norm.bias",
    "layernorm_after.weight": "mlp_norm", "layernorm_after.bias": "mlp_norm.bias",
}
QWENVL_BLOCK = {
    "attn.qkv.weight": "attn.qkv", "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.o", "attn.proj.bias": "attn.o.bias",
    "mlp.gate_proj.weight": "mlp.gate", "mlp.up_proj.weight": "mlp.up", "mlp.down_proj.weight": "mlp.down",
    "mlp.fc1.weight": "mlp.fc1", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2", "mlp.fc2.bias": "mlp.fc2.bias",
    "norm1.weight": "attn_norm", "norm2.weight": "mlp_norm",
}

# Llama-style wrappers: plain, LLaVA (`language_model.model.`), newer transformers (`model.language_model.`).
_LM = r"(?:model\.language_model\.|language_model\.model\.|model\.)"
_CLIP = r"(?:model\.)?(?:vision_tower\.)?vision_model\."
_QWENVL = r"(?:model\.)?visual\."
_WHISPER = r"(?:model\.)?encoder\."

# (family, per-layer prefix regex with group i, suffix table)
BLOCK_LAYOUTS: list[tuple[str, str, dict[str, str]]] = [
    *[(f, rf"{f}\.layers\.(?P<i>\d+)\.", OURS_BLOCK) for f in FAMILIES],
    ("text", rf"{_LM}layers\.(?P<i>\d+)\.", LLAMA_BLOCK),
    ("vision", rf"{_CLIP}encoder\.layers\.(?P<i>\d+)\.", CLIP_BLOCK),
    ("vision", r"vit\.encoder\.layer\.(?P<i>\d+)\.", VIT_BLOCK),
    ("vision", rf"{_QWENVL}blocks\.(?P<i>\d+)\.", QWENVL_BLOCK),
    ("speech", rf"{_WHISPER}layers\.(?P<i>\d+)\.", WHISPER_BLOCK),
]

# Whole-name rules outside blocks: (regex, family, component, role, axes). "T" is the text stream,
# "F*" every remaining dimension as fixed axes (conv kernels, pixels), "*" a role of a norm component.
OTHER_RULES: list[tuple[str, str, str, str, str]] = [
    # ours
    (r"text\.tok_emb\.weight", "text", "text.embed", "tok", "F:vocab S"),
    (r"text\.lm_head\.weight", "text", "text.lm_head", "head", "F:vocab S"),
    (r"text\.norm\.weight", "text", "text.norm", "*final", "S"),
    (r"absent_image", "text", "text.absent", "image", "T"),
    (r"absent_audio", "text", "text.absent", "audio", "T"),
    (r"vision\.patch_embed\.weight", "vision", "vision.embed", "patch", "S F*"),
    (r"vision\.patch_embed\.bias", "vision", "vision.embed", "patch.bias", "S"),
    (r"vision\.pos_emb", "vision", "vision.embed", "pos", "F:pos S"),
    (r"speech\.conv1\.weight", "speech", "speech.embed", "conv1", "S F*"),
    (r"speech\.conv1\.bias", "speech", "speech.embed", "conv1.bias", "S"),
    (r"speech\.conv2\.weight", "speech", "speech.embed", "conv2", "S S F*"),
    (r"speech\.conv2\.bias", "speech", "speech.embed", "conv2.bias", "S"),
    (r"speech\.pos_emb", "speech", "speech.embed", "pos", "F:pos S"),
    *[r for f in ("vision", "speech") for r in (
        (rf"{f}\.norm\.weight", f, f"{f}.norm", "*final", "S"),
        (rf"{f}\.proj\.0\.weight", f, f"{f}.projector", "in", "U:proj S"),
        (rf"{f}\.proj\.0\.bias", f, f"{f}.projector", "in.bias", "U:proj"),
        (rf"{f}\.proj\.2\.weight", f, f"{f}.projector", "out", "T U:proj"),
        (rf"{f}\.proj\.2\.bias", f, f"{f}.projector", "out.bias", "T"),
    )],
    # Llama / Qwen decoders
    (rf"{_LM}embed_tokens\.weight", "text", "text.embed", "tok", "F:vocab S"),
    (r"(?:language_model\.)?lm_head\.weight", "text", "text.lm_head", "head", "F:vocab S"),
    (rf"{_LM}norm\.weight", "text", "text.norm", "*final", "S"),
    # CLIP / SigLIP vision towers
    (rf"{_CLIP}embeddings\.patch_embedding\.weight", "vision", "vision.embed", "patch", "S F*"),
    (rf"{_CLIP}embeddings\.patch_embedding\.bias", "vision", "vision.embed", "patch.bias", "S"),
    (rf"{_CLIP}embeddings\.position_embedding\.weight", "vision", "vision.embed", "pos", "F:pos S"),
    (rf"{_CLIP}embeddings\.class_embedding", "vision", "vision.embed", "cls", "S"),
    (rf"{_CLIP}pre_layrnorm\.weight", "vision", "vision.norm", "*pre", "S"),
    (rf"{_CLIP}pre_layrnorm\.bias", "vision", "vision.norm", "*pre.bias", "S"),
    (rf"{_CLIP}post_layernorm\.weight", "vision", "vision.norm", "*final", "S"),
    (rf"{_CLIP}post_layernorm\.bias", "vision", "vision.norm", "*final.bias", "S"),
    # Hugging Face ViT
    (r"vit\.embeddings\.patch_embeddings\.projection\.weight", "vision", "vision.embed", "patch", "S F*"),
    (r"vit\.embeddings\.patch_embeddings\.projection\.bias", "vision", "vision.embed", "patch.bias", "S"),
    (r"vit\.embeddings\.position_embeddings", "vision", "vision.embed", "pos", "F:pos S"),
    (r"vit\.embeddings\.cls_token", "vision", "vision.embed", "cls", "S"),
    (r"vit\.layernorm\.weight", "vision", "vision.norm", "*final", "S"),
    (r"vit\.layernorm\.bias", "vision", "vision.norm", "*final.bias", "S"),
    # Qwen2-VL vision (the patch merger's input mixes 4 tokens per row: left unmatched)
    (rf"{_QWENVL}patch_embed\.proj\.weight", "vision", "vision.embed", "patch", "S F*"),
    (rf"{_QWENVL}merger\.ln_q\.weight", "vision", "vision.norm", "*merger", "S"),
    # LLaVA projector
    (r"(?:model\.)?multi_modal_projector\.linear_1\.weight", "vision", "vision.projector", "in", "U:proj S"),
    (r"(?:model\.)?multi_modal_projector\.linear_1\.bias", "vision", "vision.projector", "in.bias", "U:proj"),
    (r"(?:model\.)?multi_modal_projector\.linear_2\.weight", "vision", "vision.projector", "out", "T U:proj"),
    (r"(?:model\.)?multi_modal_projector\.linear_2\.bias", "vision", "vision.projector", "out.bias", "T"),
    # Whisper encoder
    (rf"{_WHISPER}conv1\.weight", "speech", "speech.embed", "conv1", "S F*"),
    (rf"{_WHISPER}conv1\.bias", "speech", "speech.embed", "conv1.bias", "S"),
    (rf"{_WHISPER}conv2\.weight", "speech", "speech.embed", "conv2", "S S F*"),
    (rf"{_WHISPER}conv2\.bias", "speech", "speech.embed", "conv2.bias", "S"),
    (rf"{_WHISPER}embed_positions\.weight", "speech", "speech.embed", "pos", "F:pos S"),
    (rf"{_WHISPER}layer_norm\.weight", "speech", "speech.norm", "*final", "S"),
    (rf"{_WHISPER}layer_norm\.bias", "speech", "speech.norm", "*final.bias", "S"),
]

_BLOCK_RES = [(f, re.compile(prefix + r"(?P<suffix>.+)"), table) for f, prefix, table in BLOCK_LAYOUTS]
_OTHER_RES: list[tuple[re.Pattern[str], str, str, str, str]] = [
    (re.compile(rx), *rest) for rx, *rest in OTHER_RULES]  # type: ignore[misc]


# Mixture-of-experts blocks (ours): the routed experts and the shared experts of block i are pooled
# into the block's `mlp.gate/up/down` roles, their hidden units joined into one unit group. Matching
# units then ignores which expert a unit sits in, so the test is invariant to the order of experts
# (and of units inside each), and compares an MoE block with a dense block's FFN as well as with
# another MoE block (sparse upcycling copies a dense FFN's units into experts). The router's rows
# are one unit per expert. At most MAX_POOLED_EXPERTS experts per block are pooled (evenly spaced
# ids), which bounds the memory of one comparison.
_EXPERT = re.compile(r"(?P<f>text)\.layers\.(?P<i>\d+)\.mlp\.(?:experts\.(?P<e>\d+)|shared)\.(?P<w>w[123])\.weight")
_EXPERT_ROLE = {"w1": "mlp.gate", "w3": "mlp.up", "w2": "mlp.down"}
_ROUTER = re.compile(r"(?P<f>text)\.layers\.(?P<i>\d+)\.mlp\.router\.(?P<p>weight|bias)")
MAX_POOLED_EXPERTS = 64


def _expert_slots(tensors: dict[str, tuple[int, ...]]) -> tuple[list[Slot], set[str]]:
    """Pooled expert slots of every MoE block, and the tensor names they (and the routers) cover."""
    groups: dict[tuple[str, int, str], list[tuple[int, str]]] = {}
    covered: set[str] = set()
    slots: list[Slot] = []
    for name, shape in tensors.items():
        m = _EXPERT.fullmatch(name)
        if m and len(shape) == 2:
            key = (m["f"], int(m["i"]), _EXPERT_ROLE[m["w"]])
            groups.setdefault(key, []).append((int(m["e"]) if m["e"] is not None else 1 << 30, name))
            covered.add(name)
        r = _ROUTER.fullmatch(name)
        if r:
            covered.add(name)
            spec = "U:router S" if r["p"] == "weight" else "U:router"
            axes = _axes(spec, r["f"], len(shape))
            if axes:
                role = "mlp.router" if r["p"] == "weight" else "mlp.router.bias"
                slots.append(Slot(name, f"{r['f']}.block.{r['i']}", role, axes))
    for (family, i, role), members in groups.items():
        members.sort()
        routed = [n for e, n in members if e < 1 << 30]
        if len(routed) > MAX_POOLED_EXPERTS:
            step = len(routed) / MAX_POOLED_EXPERTS
            routed = [routed[int(k * step)] for k in range(MAX_POOLED_EXPERTS)]
        names = tuple(routed + [n for e, n in members if e >= 1 << 30])
        if len({tensors[n][0 if role == "mlp.down" else 1] for n in names}) > 1:
            continue  # parts may differ in units (shared experts are wider), never in the stream axis
        axes = _axes(BLOCK_AXES[role], family, 2)
        if axes:
            slots.append(Slot(names[0], f"{family}.block.{i}", role, axes, parts=names))
    return slots, covered


def _axes(spec: str, family: str, ndim: int) -> tuple[Axis, ...] | None:
    """Parse an axes spec for a tensor of `ndim` dims (after squeezing); None when it cannot fit."""
    out: list[Axis] = []
    tokens = spec.split()
    for k, tok in enumerate(tokens):
        if tok == "S":
            out.append(Axis("stream", family))
        elif tok == "T":
            out.append(Axis("stream", "text"))
        elif tok.startswith("U:"):
            out.append(Axis("unit", tok[2:]))
        elif tok.startswith("F:"):
            out.append(Axis("fixed", tok[2:]))
        elif tok == "F*":
            if k != len(tokens) - 1:
                raise ValueError(f"F* must come last in {spec!r}")
            out.extend(Axis("fixed", f"dim{j}") for j in range(ndim - len(out)))
        else:
            raise ValueError(f"bad axis token {tok!r} in {spec!r}")
    return tuple(out) if len(out) == ndim else None


def _squeezed_ndim(shape: tuple[int, ...], want: int) -> int:
    """Leading singleton dims (HF ViT's (1, N, w) position table) are dropped to reach `want`."""
    nd = len(shape)
    while nd > want and shape[len(shape) - nd] == 1:
        nd -= 1
    return nd


def _slot_for(name: str, shape: tuple[int, ...]) -> list[Slot] | None:
    for family, rx, table in _BLOCK_RES:
        m = rx.fullmatch(name)
        if not m or m["suffix"] not in table:
            continue
        role, i = table[m["suffix"]], int(m["i"])
        if role in NORM_ROLES:
            axes = _axes("S", family, _squeezed_ndim(shape, 1))
            return [Slot(name, f"{family}.norm", f"block.{i}.{role}", axes, is_norm=True)] if axes else None
        spec = BLOCK_AXES[role]
        axes = _axes(spec, family, _squeezed_ndim(shape, len(spec.split())))
        if axes is None:
            return None
        comp = f"{family}.block.{i}"
        if role.startswith("attn.qkv"):
            # Fused q, k, v (multi-head, equal thirds); a shape that does not split is not guessed at.
            n = shape[-len(axes)]
            if n % 3:
                return None
            tail = role[len("attn.qkv"):]
            return [Slot(name, comp, f"attn.{x}{tail}", (Axis("unit", x), *axes[1:]), (j * n // 3, (j + 1) * n // 3))
                    for j, x in enumerate("qkv")]
        return [Slot(name, comp, role, axes)]
    for rx, family, comp, role, spec in _OTHER_RES:
        if rx.fullmatch(name):
            want = len(spec.split()) if "F*" not in spec else len(shape)
            axes = _axes(spec, family, _squeezed_ndim(shape, want))
            if axes is None:
                return None
            is_norm = role.startswith("*")
            return [Slot(name, comp, role.lstrip("*"), axes, is_norm=is_norm)]
    return None


@dataclass
class ModelMap:
    """component -> role -> Slot, and the tensors no rule matched (name: why)."""

    components: dict[str, dict[str, Slot]]
    unmatched: list[str]


def map_names(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> ModelMap:
    """Map (name, shape) pairs onto components and roles."""
    comps: dict[str, dict[str, Slot]] = {}
    unmatched: list[str] = []
    tensors = sorted(tensors)
    pooled, covered = _expert_slots({n: tuple(s) for n, s in tensors})
    for s in pooled:
        comps.setdefault(s.component, {})[s.role] = s
    for name, shape in tensors:
        if name in covered:
            continue
        slots = _slot_for(name, tuple(shape))
        if slots is None:
            unmatched.append(f"{name} {list(shape)}: no layout rule matches")
            continue
        for s in slots:
            roles = comps.setdefault(s.component, {})
            if s.role in roles:
                unmatched.append(f"{name}: {s.component}/{s.role} already taken by {roles[s.role].tensor}")
                continue
            roles[s.role] = s
    return ModelMap(comps, unmatched)


def component_sort_key(component: str) -> tuple[int, str, int, str]:
    """text before vision before speech; blocks in layer order."""
    family, _, rest = component.partition(".")
    fam = FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)
    order = ("embed", "absent", "block", "lm_head", "norm", "projector")
    head, _, idx = rest.partition(".")
    return (fam, f"{order.index(head) if head in order else 9}{head}", int(idx) if idx.isdigit() else -1, rest)
