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

A layout is a set of parts (`PARTS`): ours (kai_train/model.py), Llama/Qwen2-style decoders
(`model.layers.N.self_attn.q_proj`), CLIP/SigLIP towers (`vision_model.encoder.layers.N`, or bare),
Hugging Face ViT, the Qwen2-VL/Qwen2.5-VL vision tower (`visual.blocks.N`, fused qkv split in thirds,
the patch merger as projector), LLaVA projectors and the Whisper encoder. The parts of a model are
detected from its names, or named (`LAYOUTS`, `--layout`). A tensor no rule knows is returned in
`unmatched`, never guessed at.
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
    view: tuple[int, ...] | None = None  # the shape the tensor is read as (a merger's input: units, merge, width)
    anchor_only: bool = False  # aligns its stream, never compared (NOT_COMPARED)


# Axes of each block role; S is the family's stream, U:x a unit group of the block.
BLOCK_AXES = {
    "attn.q": "U:q S", "attn.k": "U:k S", "attn.v": "U:v S", "attn.o": "S U:o",
    "attn.q.bias": "U:q", "attn.k.bias": "U:k", "attn.v.bias": "U:v", "attn.o.bias": "S",
    "attn.qkv": "U:qkv S", "attn.qkv.bias": "U:qkv",
    "mlp.gate": "U:mlp S", "mlp.up": "U:mlp S", "mlp.down": "S U:mlp",
    "mlp.gate.bias": "U:mlp", "mlp.up.bias": "U:mlp", "mlp.down.bias": "S",
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
    "mlp.gate_proj.bias": "mlp.gate.bias", "mlp.up_proj.bias": "mlp.up.bias", "mlp.down_proj.bias": "mlp.down.bias",
    "norm1.weight": "attn_norm", "norm1.bias": "attn_norm.bias", "norm2.weight": "mlp_norm", "norm2.bias": "mlp_norm.bias",
}

# A layout is the set of *parts* a checkpoint is made of (a decoder, a vision tower, a projector, a
# speech encoder), each with the prefixes its tensors sit under, its block pattern (group i, the layer
# index) with a suffix table, and its whole-name rules. `{P}` in a rule is the part's prefix. A part is
# *detected* when a tensor matches its signature (a front end, or a block tensor no other part names
# alike, so one shard of a sharded checkpoint is read too); `map_names` uses the detected parts only, so two
# parts that name alike (a SigLIP tower and a Whisper encoder saved bare: `encoder.layers.N.self_attn.
# q_proj`) never take each other's tensors. With none detected, every part is tried in order.


@dataclass(frozen=True)
class Part:
    name: str
    family: str
    prefix: str  # regex of the prefixes (alternatives; may be empty)
    block: str  # regex of one block after the prefix, with group i
    table: dict[str, str]  # block suffix -> role
    rules: tuple[tuple[str, str, str, str], ...]  # ({P}-regex, component, role, axes); "*role": a norm
    signature: str  # {P}-regex: any tensor matching it marks the part present


# A role marked "!" is an anchor only: it aligns its stream (a copier who permutes the stream must
# permute it too) but is never compared (a fixed table, the same in every model of the layout).
NOT_COMPARED = "a fixed table, the same in every model of the layout: used to align its stream, not compared"


def _rules(family: str, rows: list[tuple[str, str, str, str]]) -> tuple[tuple[str, str, str, str], ...]:
    return tuple((rx, comp if "." in comp else f"{family}.{comp}", role, spec) for rx, comp, role, spec in rows)


_PROJ = [("in", "U:proj S"), ("in.bias", "U:proj"), ("out", "T U:proj"), ("out.bias", "T")]
PARTS: dict[str, Part] = {p.name: p for p in [
    *[Part(f"kai-{f}", f, "", rf"{f}\.layers\.(?P<i>\d+)\.", OURS_BLOCK, _rules(f, [
        *([(r"text\.tok_emb\.weight", "embed", "tok", "F:vocab S"),
           (r"text\.lm_head\.weight", "lm_head", "head", "F:vocab S"),
           (r"absent_image", "absent", "image", "T"), (r"absent_audio", "absent", "audio", "T")]
          if f == "text" else []),
        *([(r"vision\.patch_embed\.weight", "embed", "patch", "S F*"),
           (r"vision\.patch_embed\.bias", "embed", "patch.bias", "S"), (r"vision\.pos_emb", "embed", "pos", "F:pos S")]
          if f == "vision" else []),
        *([(r"speech\.conv1\.weight", "embed", "conv1", "S F*"), (r"speech\.conv1\.bias", "embed", "conv1.bias", "S"),
           (r"speech\.conv2\.weight", "embed", "conv2", "S S F*"), (r"speech\.conv2\.bias", "embed", "conv2.bias", "S"),
           (r"speech\.pos_emb", "embed", "pos", "F:pos S")] if f == "speech" else []),
        (rf"{f}\.norm\.weight", "norm", "*final", "S"),
        *([(rf"{f}\.proj\.{0 if r.startswith('in') else 2}\.{'bias' if r.endswith('bias') else 'weight'}",
            "projector", r, spec) for r, spec in _PROJ] if f != "text" else []),
    ]), rf"{f}\.(?:layers\.\d+\.attn\.wq\.weight|tok_emb\.weight|patch_embed\.weight|conv1\.weight)")
      for f in FAMILIES],
    # Llama, Qwen2, Mistral decoders: plain (`model.`), LLaVA (`language_model.model.`), newer
    # transformers multimodal (`model.language_model.`), or a bare `LlamaModel`. A tied LM head is not
    # saved: `text.lm_head` is then absent.
    Part("llama", "text", r"(?:model\.language_model\.|language_model\.model\.|model\.|)", r"layers\.(?P<i>\d+)\.",
         LLAMA_BLOCK, _rules("text", [
             (r"{P}embed_tokens\.weight", "embed", "tok", "F:vocab S"),
             (r"(?:language_model\.)?lm_head\.weight", "lm_head", "head", "F:vocab S"),
             (r"{P}norm\.weight", "norm", "*final", "S")]),
         r"{P}(?:embed_tokens\.weight|layers\.\d+\.mlp\.gate_proj\.weight)"),
    # CLIP and SigLIP vision towers (`vision_model.` in CLIP/SigLIP checkpoints, `vision_tower.` in
    # LLaVA, bare for a `SiglipVisionModel` saved by recent transformers)
    Part("clip", "vision", r"(?:model\.)?(?:vision_tower\.)?(?:vision_model\.)?", r"encoder\.layers\.(?P<i>\d+)\.",
         CLIP_BLOCK, _rules("vision", [
             (r"{P}embeddings\.patch_embedding\.weight", "embed", "patch", "S F*"),
             (r"{P}embeddings\.patch_embedding\.bias", "embed", "patch.bias", "S"),
             (r"{P}embeddings\.position_embedding\.weight", "embed", "pos", "F:pos S"),
             (r"{P}embeddings\.class_embedding", "embed", "cls", "S"),
             (r"{P}pre_layrnorm\.weight", "norm", "*pre", "S"), (r"{P}pre_layrnorm\.bias", "norm", "*pre.bias", "S"),
             (r"{P}post_layernorm\.weight", "norm", "*final", "S"),
             (r"{P}post_layernorm\.bias", "norm", "*final.bias", "S")]),
         r"{P}(?:embeddings\.patch_embedding\.weight|encoder\.layers\.\d+\.layer_norm1\.weight)"),
    Part("vit", "vision", r"vit\.", r"encoder\.layer\.(?P<i>\d+)\.", VIT_BLOCK, _rules("vision", [
        (r"{P}embeddings\.patch_embeddings\.projection\.weight", "embed", "patch", "S F*"),
        (r"{P}embeddings\.patch_embeddings\.projection\.bias", "embed", "patch.bias", "S"),
        (r"{P}embeddings\.position_embeddings", "embed", "pos", "F:pos S"),
        (r"{P}embeddings\.cls_token", "embed", "cls", "S"),
        (r"{P}layernorm\.weight", "norm", "*final", "S"), (r"{P}layernorm\.bias", "norm", "*final.bias", "S")]),
        r"{P}embeddings\.patch_embeddings\.projection\.weight"),
    # Qwen2-VL / Qwen2.5-VL vision tower: the Conv3d patch embedding's (C, t, p, p) taps are one fixed
    # axis; the patch merger is the projector, its input rows read `merge` neighbouring tokens, so its
    # columns are viewed as (merge, vision stream) (`MERGER`).
    Part("qwen2-vl-vision", "vision", r"(?:model\.)?(?:visual\.)?", r"blocks\.(?P<i>\d+)\.", QWENVL_BLOCK,
         _rules("vision", [
             (r"{P}patch_embed\.proj\.weight", "embed", "patch", "S F*"),
             (r"{P}merger\.ln_q\.weight", "norm", "*merger", "S"), (r"{P}merger\.ln_q\.bias", "norm", "*merger.bias", "S"),
             (r"{P}merger\.mlp\.0\.weight", "projector", "in", "U:proj F:merge S"),
             (r"{P}merger\.mlp\.0\.bias", "projector", "in.bias", "U:proj"),
             (r"{P}merger\.mlp\.2\.weight", "projector", "out", "T U:proj"),
             (r"{P}merger\.mlp\.2\.bias", "projector", "out.bias", "T")]),
         r"{P}(?:patch_embed\.proj\.weight|blocks\.\d+\.attn\.qkv\.weight)"),
    Part("llava-projector", "vision", r"(?:model\.)?multi_modal_projector\.", "$^", {}, _rules("vision", [
        (rf"{{P}}linear_{1 if r.startswith('in') else 2}\.{'bias' if r.endswith('bias') else 'weight'}",
         "projector", r, spec) for r, spec in _PROJ]), r"{P}linear_1\.weight"),
    # Whisper: the encoder (`model.encoder.` in WhisperForConditionalGeneration, `encoder.` in
    # WhisperModel, bare for a WhisperEncoder); the decoder is a text model of its own, left unmatched.
    Part("whisper", "speech", r"(?:model\.)?(?:encoder\.)?", r"layers\.(?P<i>\d+)\.", WHISPER_BLOCK,
         _rules("speech", [
             (r"{P}conv1\.weight", "embed", "conv1", "S F*"), (r"{P}conv1\.bias", "embed", "conv1.bias", "S"),
             (r"{P}conv2\.weight", "embed", "conv2", "S S F*"), (r"{P}conv2\.bias", "embed", "conv2.bias", "S"),
             (r"{P}embed_positions\.weight", "embed", "!pos", "F:pos S"),
             (r"{P}layer_norm\.weight", "norm", "*final", "S"), (r"{P}layer_norm\.bias", "norm", "*final.bias", "S")]),
         r"{P}(?:conv1\.weight|layers\.\d+\.self_attn_layer_norm\.weight)"),
]}

# The names `--layout` accepts: each a tuple of parts (auto: the parts detected from the names).
LAYOUTS: dict[str, tuple[str, ...]] = {
    "kai": ("kai-text", "kai-vision", "kai-speech"),
    "llama": ("llama",), "qwen2": ("llama",),
    "qwen2-vl": ("llama", "qwen2-vl-vision"), "qwen2.5-vl": ("llama", "qwen2-vl-vision"),
    "qwen2-vl-vision": ("qwen2-vl-vision",),
    "siglip": ("clip",), "clip": ("clip",), "vit": ("vit",),
    "llava": ("llama", "clip", "llava-projector"),
    "whisper": ("whisper",),
}
AUTO = "auto"


@dataclass(frozen=True)
class _Compiled:
    part: Part
    block: re.Pattern[str]
    rules: tuple[tuple[re.Pattern[str], str, str, str], ...]
    signature: re.Pattern[str]


def _compile(p: Part) -> _Compiled:
    def sub(rx: str) -> str:
        return rx.replace("{P}", f"(?:{p.prefix})")
    return _Compiled(p, re.compile(f"(?:{p.prefix}){p.block}(?P<suffix>.+)"),
                     tuple((re.compile(sub(rx)), comp, role, spec) for rx, comp, role, spec in p.rules),
                     re.compile(sub(p.signature)))


_COMPILED = {name: _compile(p) for name, p in PARTS.items()}


def detect_parts(names: Iterable[str]) -> tuple[str, ...]:
    """The parts whose signature some tensor name matches, in PARTS order."""
    names = list(names)
    return tuple(p for p, c in _COMPILED.items() if any(c.signature.fullmatch(n) for n in names))


def layout_parts(layout: str, names: Iterable[str]) -> tuple[str, ...]:
    """The parts `layout` stands for (`auto`: detected from the names, else every part)."""
    if layout == AUTO:
        return detect_parts(names) or tuple(PARTS)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {AUTO}, {', '.join(LAYOUTS)})")
    return LAYOUTS[layout]


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


def _slot_for(name: str, shape: tuple[int, ...], parts: list[_Compiled],
              widths: dict[str, int]) -> list[Slot] | None:
    for c in parts:
        family, table = c.part.family, c.part.table
        m = c.block.fullmatch(name)
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
    for c in parts:
        for rx, comp, role, spec in c.rules:
            if not rx.fullmatch(name):
                continue
            family = c.part.family
            view = None
            if "F:merge" in spec:  # (units, merge * width) viewed as (units, merge, width)
                d = widths.get(family)
                if len(shape) != 2 or not d or shape[1] % d:
                    return None
                view = (shape[0], shape[1] // d, d)
            want = len(spec.split()) if "F*" not in spec else len(shape)
            axes = _axes(spec, family, len(view) if view else _squeezed_ndim(shape, want))
            if axes is None:
                return None
            return [Slot(name, comp, role.lstrip("*!"), axes, is_norm=role.startswith("*"), view=view,
                         anchor_only=role.startswith("!"))]
    return None


@dataclass
class ModelMap:
    """component -> role -> Slot, the tensors no rule matched (name: why), and the parts used."""

    components: dict[str, dict[str, Slot]]
    unmatched: list[str]
    parts: tuple[str, ...] = ()


def map_names(tensors: Iterable[tuple[str, tuple[int, ...]]], layout: str = AUTO) -> ModelMap:
    """Map (name, shape) pairs onto components and roles, with the parts of `layout` (module docstring)."""
    comps: dict[str, dict[str, Slot]] = {}
    unmatched: list[str] = []
    tensors = sorted((n, tuple(s)) for n, s in tensors)
    names = layout_parts(layout, (n for n, _ in tensors))
    parts = [_COMPILED[p] for p in names]
    pooled, covered = _expert_slots(dict(tensors)) if any(p.startswith("kai-") for p in names) else ([], set())
    for s in pooled:
        comps.setdefault(s.component, {})[s.role] = s
    # each stream's width from its patch embedding (a patch merger's input is read through it)
    widths = {s.axes[0].name: shape[0] for name, shape in tensors
              for s in _slot_for(name, shape, parts, {}) or [] if s.role == "patch" and s.axes[0].kind == "stream"}
    for name, shape in tensors:
        if name in covered:
            continue
        slots = _slot_for(name, shape, parts, widths)
        if slots is None:
            unmatched.append(f"{name} {list(shape)}: no rule of layout {'+'.join(names)} matches")
            continue
        for s in slots:
            roles = comps.setdefault(s.component, {})
            if s.role in roles:
                unmatched.append(f"{name}: {s.component}/{s.role} already taken by {roles[s.role].tensor}")
                continue
            roles[s.role] = s
    return ModelMap(comps, unmatched, names)


def component_sort_key(component: str) -> tuple[int, str, int, str]:
    """text before vision before speech; blocks in layer order."""
    family, _, rest = component.partition(".")
    fam = FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)
    order = ("embed", "absent", "block", "lm_head", "norm", "projector")
    head, _, idx = rest.partition(".")
    return (fam, f"{order.index(head) if head in order else 9}{head}", int(idx) if idx.isdigit() else -1, rest)
