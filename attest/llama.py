"""export/llama/: the text decoder as a standard Llama folder (`LlamaForCausalLM`, no remote code),
rendered from the chain and the released weights by the transform `kai-llama/v1`.

kai-train's decoder is a Llama decoder (RMSNorm, SwiGLU, grouped-query attention, RoPE, no biases,
untied embeddings) up to two differences, both removed exactly here:

- RoPE layout. kai-train rotates adjacent pairs (dimensions 2i, 2i+1 of a head share frequency i);
  transformers' Llama rotates halves (i, i + head_dim/2). The rows of `wq` and `wk` are permuted
  within each head: new row i is old row 2i, new row head_dim/2 + i is old row 2i + 1. Attention
  scores are dot products of q and k, so the same permutation on both leaves them unchanged.
- The modality prefix. A text-only sample is `[absent_image] * n_image_tokens + [absent_audio] *
  n_audio_tokens + [text]` in one causal sequence with RoPE positions from 0, so text logits depend
  on the prefix rows. The two absent vectors become two extra tokens at the end of the vocabulary,
  `<kai_absent_image>` (id vocab_size) and `<kai_absent_audio>` (id vocab_size + 1): their embedding
  rows are the learned vectors, their lm_head rows zeros (a logit of 0, suppressed in
  generation_config.json). tokenizer.json's post-processor puts the prefix before beginning-of-sequence,
  so the text sits at kai-train's positions and the logits are kai-train's text logits.

Everything here is torch-free and reads weights as bytes (row slices of little-endian tensors): the
exporter writes export/llama/ with it and the verifier renders the same bytes to compare, on the
light install too. docs/bundle-format.md states the contract.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from attest import spm
from attest.errors import KaiError

TRANSFORM = "kai-llama/v1"
ABSENT_IMAGE = "<kai_absent_image>"
ABSENT_AUDIO = "<kai_absent_audio>"
UNUSED = "<kai_unused_{}>"  # the model's vocabulary rows the tokenizer has no piece for
CHUNK = 16 << 20  # bytes read at a time from a weight file
# Bounds on what a (possibly hostile) genesis recipe makes the verifier build: a model beyond them has
# no Llama folder, on both sides alike (an honest one is far below: a 256k vocabulary, ~500 prefix rows).
MAX_VOCAB = 1 << 21
MAX_PREFIX = 1 << 16
_WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_INT = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len",
        "image_size", "patch_size", "audio_samples", "hop_length")


class LlamaError(KaiError, ValueError):
    """The model or its weights cannot be written as a Llama folder (the reason is the message)."""


class TensorLike(Protocol):  # attest.digest.TensorEntry
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


def prefix_lengths(model: dict[str, Any]) -> tuple[int, int]:
    """(n_image_tokens, n_audio_tokens) of the model config: kai_train.modelspec's rule, torch-free."""
    n_image = (model["image_size"] // model["patch_size"]) ** 2
    n = 1 + model["audio_samples"] // model["hop_length"]
    for _ in range(2):  # two Conv1d(kernel=3, stride=2, padding=1)
        n = (n + 2 - 3) // 2 + 1
    return n_image, n


def unsupported(model: Any) -> str | None:
    """Why this model config has no Llama form, or None when it has one."""
    if not isinstance(model, dict):
        return "no model config in the genesis recipe"
    for k in _INT:
        v = model.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            return f"model.{k} is not a positive integer"
    for k in ("rope_theta", "norm_eps"):
        v = model.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            return f"model.{k} is not a positive number"
    if model.get("n_experts"):
        return "the decoder has mixture-of-experts blocks, which a Llama folder cannot hold"
    if model["vocab_size"] > MAX_VOCAB:
        return f"model.vocab_size is above {MAX_VOCAB}"
    if model["image_size"] > MAX_PREFIX * model["patch_size"] or sum(prefix_lengths(model)) > MAX_PREFIX:
        return f"the modality prefix is longer than {MAX_PREFIX} rows"
    hd = model["dim"] // model["n_heads"]
    if model["dim"] % model["n_heads"] or hd % 2 or model["n_heads"] % model["n_kv_heads"]:
        return "the attention heads do not divide the width (or the head width is odd)"
    return None


def token_ids(model: dict[str, Any]) -> tuple[int, int]:
    """The ids of <kai_absent_image> and <kai_absent_audio>."""
    return model["vocab_size"], model["vocab_size"] + 1


def prefix_ids(model: dict[str, Any]) -> list[int]:
    """The ids the tokenizer puts before beginning-of-sequence: kai-train's prefix of a text-only sample."""
    img, aud = token_ids(model)
    n_image, n_audio = prefix_lengths(model)
    return [img] * n_image + [aud] * n_audio


# ------------------------------------------------------------------ the json files


def config(model: dict[str, Any], special: dict[str, int], facts: dict[str, Any]) -> str:
    """config.json: transformers' LlamaConfig, then the chain's facts under `kai_train`."""
    n_image, n_audio = prefix_lengths(model)
    img, aud = token_ids(model)
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model["vocab_size"] + 2,
        "hidden_size": model["dim"],
        "intermediate_size": model["ffn_hidden"],
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model["n_kv_heads"],
        "head_dim": model["dim"] // model["n_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": model["max_seq_len"] + n_image + n_audio,
        "rms_norm_eps": float(model["norm_eps"]),
        "rope_theta": float(model["rope_theta"]),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        **special,
        "kai_train": {
            "transform": TRANSFORM,
            **facts,
            "prefix": [{"token": ABSENT_IMAGE, "id": img, "count": n_image},
                       {"token": ABSENT_AUDIO, "id": aud, "count": n_audio}],
        },
    }
    return json.dumps(cfg, indent=2) + "\n"


def generation_config(model: dict[str, Any], special: dict[str, int]) -> str:
    """Greedy decoding as kai-train's generate; the absent tokens are never generated."""
    return json.dumps({"do_sample": False, "max_new_tokens": 16, **special,
                       "suppress_tokens": list(token_ids(model))}, indent=2) + "\n"


def _added(i: int, content: str) -> dict[str, Any]:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def added_tokens(facts: spm.SpmFacts, model: dict[str, Any]) -> list[dict[str, Any]]:
    """The special tokens: sentencepiece's control and unknown pieces, then the two absent tokens."""
    img, aud = token_ids(model)
    own = [_added(i, p) for i, (p, kind) in enumerate(facts.pieces) if kind in (spm.CONTROL, spm.UNKNOWN)]
    return own + [_added(img, ABSENT_IMAGE), _added(aud, ABSENT_AUDIO)]


def tokenizer_json(facts: spm.SpmFacts, model: dict[str, Any]) -> str:
    """tokenizer.json (Hugging Face tokenizers): the SentencePiece unigram model with its normalizer
    and byte fallback, the vocabulary filled up to the model's rows, the absent tokens, and the
    post-processor that puts kai-train's prefix and beginning-of-sequence before the text."""
    if facts.model_type != spm.UNIGRAM:
        raise LlamaError("the tokenizer is not a SentencePiece unigram model")
    vocab = model["vocab_size"]
    if len(facts.pieces) > vocab:
        raise LlamaError(f"the tokenizer has {len(facts.pieces)} pieces, the model {vocab} rows")
    if facts.special["unk"] < 0:
        raise LlamaError("the tokenizer has no unknown piece")
    low = min(facts.scores) if facts.scores else 0.0
    scores = facts.scores if len(facts.scores) == len(facts.pieces) else (0.0,) * len(facts.pieces)
    pieces: list[list[Any]] = [[p, s] for (p, _), s in zip(facts.pieces, scores)]
    pieces += [[UNUSED.format(i), low] for i in range(len(facts.pieces), vocab)]
    pieces += [[ABSENT_IMAGE, low], [ABSENT_AUDIO, low]]
    norm = facts.normalizer
    normalizers: list[dict[str, Any]] = []
    if norm.charsmap:
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(norm.charsmap).decode()})
    if norm.remove_extra_whitespaces:  # only spaces: sentencepiece leaves other whitespace alone
        normalizers += [{"type": "Replace", "pattern": {"Regex": "\\A +| +\\z"}, "content": ""},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if norm.escape_whitespaces:
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    if norm.add_dummy_prefix:  # Metaspace skips the dummy prefix when the text starts with "▁"; sentencepiece does not
        normalizers.append({"type": "Replace", "pattern": {"Regex": "\\A\u2581"}, "content": "\u2581\u2581"})
    pre: list[dict[str, Any]] = []
    if norm.add_dummy_prefix:
        pre.append({"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": False})
    user = sorted((p for p, kind in facts.pieces if kind == spm.USER_DEFINED), key=lambda p: (-len(p), p))
    if user:  # sentencepiece emits user-defined pieces whole
        pattern = "|".join(re.escape(p) for p in user)
        pre.append({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False})
    decoders: list[dict[str, Any]] = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}]
    if facts.byte_fallback:
        decoders.append({"type": "ByteFallback"})
    if norm.add_dummy_prefix:
        decoders += [{"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]
    elif facts.byte_fallback:
        decoders.append({"type": "Fuse"})
    ids = prefix_ids(model)
    tokens = [pieces[i][0] for i in ids]
    bos = facts.special["bos"]
    if bos >= 0:
        ids, tokens = ids + [bos], tokens + [facts.piece(bos)]
    head = {"SpecialToken": {"id": "<kai_prefix>", "type_id": 0}}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens(facts, model),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre} if pre else None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [head, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [head, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<kai_prefix>": {"id": "<kai_prefix>", "ids": ids, "tokens": tokens}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "Unigram", "unk_id": facts.special["unk"], "vocab": pieces,
                  "byte_fallback": facts.byte_fallback},
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"


def tokenizer_config(facts: spm.SpmFacts, model: dict[str, Any]) -> str:
    """tokenizer_config.json: transformers' own fast tokenizer over tokenizer.json (no remote code)."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model["max_seq_len"] + sum(prefix_lengths(model)),
        "clean_up_tokenization_spaces": False,
        **{f"{k}_token": facts.piece(facts.special[k]) for k in ("bos", "eos", "pad", "unk") if facts.special[k] >= 0},
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                 for t in added_tokens(facts, model)},
    }
    return json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------ the weights


@dataclass(frozen=True)
class Part:
    """Bytes of one output tensor: `rows` rows of `row` bytes from (file, start), in `order` (None:
    as they are; a permutation within each block of `group` rows), or `zeros` zero bytes."""

    file: int = -1
    start: int = 0
    row: int = 0
    rows: int = 0
    order: tuple[int, ...] | None = None
    group: int = 1
    zeros: int = 0

    @property
    def size(self) -> int:
        return self.zeros or self.row * self.rows


@dataclass(frozen=True)
class Weights:
    """model.safetensors of the Llama folder: its header and, tensor by tensor, where the bytes come from."""

    header: bytes
    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(p.size for p in self.parts)

    def chunks(self, read: Callable[[int, int, int], bytes]) -> Iterator[bytes]:
        """The file's bytes; `read(file, offset, length)` reads the released weight file `file`."""
        yield self.header
        for p in self.parts:
            if p.zeros:
                for at in range(0, p.zeros, CHUNK):
                    yield bytes(min(CHUNK, p.zeros - at))
                continue
            per = max(1, CHUNK // max(p.row, 1) // p.group) * p.group
            for first in range(0, p.rows, per):
                n = min(per, p.rows - first)
                data = read(p.file, p.start + first * p.row, n * p.row)
                if len(data) != n * p.row:
                    raise LlamaError("a weight file is shorter than its header says")
                if p.order is None:
                    yield data
                else:
                    view = memoryview(data)
                    yield b"".join(view[(r - first) * p.row:(r - first + 1) * p.row] for r in p.order[first:first + n])

    def sha256(self, read: Callable[[int, int, int], bytes]) -> str:
        h = hashlib.sha256()
        for c in self.chunks(read):
            h.update(c)
        return h.hexdigest()


def rope_order(n_heads: int, head_dim: int) -> tuple[int, ...]:
    """Source row of each output row of wq / wk: interleaved pairs -> halves, head by head."""
    half = head_dim // 2
    return tuple(h * head_dim + (2 * j if j < half else 2 * (j - half) + 1)
                 for h in range(n_heads) for j in range(head_dim))


def weights(model: dict[str, Any], files: Sequence[Sequence[TensorLike]]) -> Weights:
    """The Llama tensors from the released weight files' tensor lists (kai-train's names)."""
    where: dict[str, tuple[int, TensorLike]] = {}
    for i, tensors in enumerate(files):
        for t in tensors:
            where[t.name] = (i, t)
    dim, vocab, hd = model["dim"], model["vocab_size"], model["dim"] // model["n_heads"]
    dtypes: set[str] = set()

    def src(name: str, shape: tuple[int, ...]) -> tuple[int, TensorLike]:
        if name not in where:
            raise LlamaError(f"tensor {name} is not in the released weights")
        i, t = where[name]
        if tuple(t.shape) != shape:
            raise LlamaError(f"tensor {name} has shape {list(t.shape)}, the model config says {list(shape)}")
        if t.dtype not in _WIDTH:
            raise LlamaError(f"tensor {name} has dtype {t.dtype}, not a float type")
        dtypes.add(t.dtype)
        return i, t

    def copy(name: str, shape: tuple[int, ...], heads: int = 0) -> Part:
        """The tensor as it is, or (heads > 0) its rows in RoPE order head by head."""
        i, t = src(name, shape)  # the file holds it with this shape: the order below is bounded by its bytes
        rows = shape[0] if len(shape) > 1 else 1
        order = rope_order(heads, hd) if heads else None
        return Part(file=i, start=t.start, row=(t.end - t.start) // rows, rows=rows, order=order,
                    group=hd if heads else 1)

    out: list[tuple[str, list[int], list[Part]]] = []  # (name, shape, parts)

    def put(name: str, shape: list[int], parts: list[Part]) -> None:
        out.append((name, shape, parts))

    put("model.embed_tokens.weight", [vocab + 2, dim],
        [copy("text.tok_emb.weight", (vocab, dim)), copy("absent_image", (dim,)), copy("absent_audio", (dim,))])
    head = copy("text.lm_head.weight", (vocab, dim))
    put("lm_head.weight", [vocab + 2, dim], [head, Part(zeros=2 * head.row)])
    put("model.norm.weight", [dim], [copy("text.norm.weight", (dim,))])
    nq, nkv, ffn = model["n_heads"], model["n_kv_heads"], model["ffn_hidden"]
    for n in range(model["n_layers"]):
        k, o = f"text.layers.{n}.", f"model.layers.{n}."
        for new, old, shape, heads in (
                ("self_attn.q_proj", "attn.wq", (nq * hd, dim), nq),
                ("self_attn.k_proj", "attn.wk", (nkv * hd, dim), nkv),
                ("self_attn.v_proj", "attn.wv", (nkv * hd, dim), 0),
                ("self_attn.o_proj", "attn.wo", (dim, nq * hd), 0),
                ("mlp.gate_proj", "mlp.w1", (ffn, dim), 0),
                ("mlp.up_proj", "mlp.w3", (ffn, dim), 0),
                ("mlp.down_proj", "mlp.w2", (dim, ffn), 0),
                ("input_layernorm", "attn_norm", (dim,), 0),
                ("post_attention_layernorm", "mlp_norm", (dim,), 0)):
            put(f"{o}{new}.weight", list(shape), [copy(f"{k}{old}.weight", shape, heads)])
    if len(dtypes) != 1:
        raise LlamaError(f"the decoder's tensors have several dtypes ({', '.join(sorted(dtypes))})")
    (dtype,) = dtypes
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    parts: list[Part] = []
    at = 0
    for name, dims, ps in sorted(out, key=lambda x: x[0]):
        size = sum(p.size for p in ps)
        entries[name] = {"dtype": dtype, "shape": dims, "data_offsets": [at, at + size]}
        parts += ps
        at += size
    raw = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return Weights(struct.pack("<Q", len(raw)) + raw, tuple(parts))
