"""A bounded reader of the few facts a SentencePiece model file states that the release renders:
its pieces (text, type and score), the special pieces its trainer spec names (unk, bos, eos, pad),
its model type and byte fallback, and its normalizer spec (what export/llama/tokenizer.json states).

The export's tokenizer_config.json, generation_config.json and config.json carry the special token
ids and pieces; the verifier re-renders those files from the declared tokenizer's bytes, on the
light install too, so it reads the model's protobuf wire format itself instead of loading it with
the sentencepiece library (which the light install does not have, and which would parse a hostile
file in C++). The ids follow sentencepiece's own rules (`SentencePieceProcessor.bos_id()` …): the
piece the trainer spec names, if the model holds it with the right type (bos, eos, pad: control;
unk: unknown), else -1. tests/test_release_render.py checks them against sentencepiece.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from attest.errors import KaiError

MAX_MODEL_BYTES = 64 << 20  # a 1M-piece vocabulary is ~20 MB
MAX_PIECES = 4_000_000

# sentencepiece_model.proto: SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec field numbers of the special pieces, with their defaults
_SPECIAL_FIELDS = {45: ("unk", "<unk>"), 46: ("bos", "<s>"), 47: ("eos", "</s>"), 48: ("pad", "<pad>")}
_SPECIAL_TYPE = {"unk": UNKNOWN, "bos": CONTROL, "eos": CONTROL, "pad": CONTROL}
# TrainerSpec.ModelType
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4


# NormalizerSpec fields read: name, precompiled_charsmap (bytes), add_dummy_prefix,
# remove_extra_whitespaces, escape_whitespaces (bools)
_NORMALIZER_FIELDS = {(1, 2), (2, 2), (3, 0), (4, 0), (5, 0)}


class SpmError(KaiError, ValueError):
    """The bytes are not a SentencePiece model this reader understands."""


@dataclass(frozen=True)
class Normalizer:
    """NormalizerSpec: the rule set's name, its compiled character map, and the whitespace handling."""

    name: str = ""
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


@dataclass(frozen=True)
class SpmFacts:
    pieces: tuple[tuple[str, int], ...]  # (piece, type) by id
    special: dict[str, int]  # unk/bos/eos/pad -> id, -1 when the model has none
    scores: tuple[float, ...] = ()  # each piece's score (float32, as stored), by id
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    normalizer: Normalizer = field(default_factory=Normalizer)

    def piece(self, i: int) -> str:
        return self.pieces[i][0]


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(b) or shift > 63:
            raise SpmError("truncated varint")
        c = b[i]
        i += 1
        value |= (c & 0x7F) << shift
        if not c & 0x80:
            return value, i
        shift += 7


def _fields(b: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one protobuf message, in order."""
    out: list[tuple[int, int, int | bytes]] = []
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(b, i)
        elif wire == 1:
            if i + 8 > len(b):
                raise SpmError("truncated fixed64")
            value, i = b[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(b, i)
            if i + n > len(b):
                raise SpmError("truncated length-delimited field")
            value, i = b[i:i + n], i + n
        elif wire == 5:
            if i + 4 > len(b):
                raise SpmError("truncated fixed32")
            value, i = b[i:i + 4], i + 4
        else:
            raise SpmError(f"wire type {wire} of field {num}")
        out.append((num, wire, value))
    return out


def read(model: bytes) -> SpmFacts:
    """The pieces and special ids of a serialized SentencePiece ModelProto."""
    if len(model) > MAX_MODEL_BYTES:
        raise SpmError(f"more than {MAX_MODEL_BYTES} bytes")
    pieces: list[tuple[str, int]] = []
    scores: list[float] = []
    names = {k: default for k, default in _SPECIAL_FIELDS.values()}
    model_type, byte_fallback, normalizer = UNIGRAM, False, Normalizer()
    for num, wire, value in _fields(model):
        if num == 1 and wire == 2:  # ModelProto.pieces
            assert isinstance(value, bytes)
            text, kind, score = "", NORMAL, 0.0
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    assert isinstance(v, bytes)
                    try:
                        text = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise SpmError(f"piece {len(pieces)} is not UTF-8") from None
                elif n == 2 and w == 5:
                    assert isinstance(v, bytes)
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    assert isinstance(v, int)
                    kind = v
            pieces.append((text, kind))
            scores.append(score)
            if len(pieces) > MAX_PIECES:
                raise SpmError(f"more than {MAX_PIECES} pieces")
        elif num == 2 and wire == 2:  # ModelProto.trainer_spec
            assert isinstance(value, bytes)
            for n, w, v in _fields(value):
                if n in _SPECIAL_FIELDS and w == 2:
                    assert isinstance(v, bytes)
                    names[_SPECIAL_FIELDS[n][0]] = v.decode("utf-8", "replace")
                elif n == 3 and w == 0:
                    assert isinstance(v, int)
                    model_type = v
                elif n == 35 and w == 0:
                    byte_fallback = bool(v)
        elif num == 3 and wire == 2:  # ModelProto.normalizer_spec
            assert isinstance(value, bytes)
            spec: dict[int, int | bytes] = {n: v for n, w, v in _fields(value) if (n, w) in _NORMALIZER_FIELDS}
            rules, charsmap = spec.get(1, b""), spec.get(2, b"")
            normalizer = Normalizer(
                name=rules.decode("utf-8", "replace") if isinstance(rules, bytes) else "",
                charsmap=charsmap if isinstance(charsmap, bytes) else b"",
                add_dummy_prefix=bool(spec.get(3, 1)), remove_extra_whitespaces=bool(spec.get(4, 1)),
                escape_whitespaces=bool(spec.get(5, 1)))
    if not pieces:
        raise SpmError("no pieces")
    index: dict[str, int] = {}
    for i, (text, _) in enumerate(pieces):
        index.setdefault(text, i)
    special = {}
    for key, name in names.items():
        i = index.get(name, -1)
        special[key] = i if i >= 0 and pieces[i][1] == _SPECIAL_TYPE[key] else -1
    return SpmFacts(tuple(pieces), special, tuple(scores), model_type, byte_fallback, normalizer)
