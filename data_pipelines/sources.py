"""Declared data sources: validated before any work, then streamed as normalized records.

A data config lists its corpora under `sources:`; each entry is a mapping:

    name        shard prefix and id prefix, [A-Za-z0-9][A-Za-z0-9._-]*, unique
    path        file, glob or folder; relative to base_dir unless absolute
    format      text (a file is a document) | jsonl | parquet | imagefolder | audiofolder
                (folders in the Hugging Face convention: media files + metadata.jsonl rows
                {"file_name": ..., <text_field>: ...})
    license     SPDX license id or expression of known ids, in canonical spelling ("MIT OR Apache-2.0")
    origin, collection, collected, consent, pii     provenance, copied into every shard manifest
    generator   the model or program that produced the data; required when `collection` is synthetic
    text_field  optional, default "text": the jsonl/parquet/metadata.jsonl column holding the text

`check_sources` checks all of that with existence tests and globbing only (no data is read) and
returns `Source`s; `iter_records` streams one source as records {id, modality, text, image, audio}
with text NFC-normalized, images as fixed-size RGB PNG and audio as fixed-length mono float32 at a
fixed rate. Broken items are dropped and counted by reason, never abort a source. Parquet goes
through the Hugging Face `datasets` streaming loader; jsonl and metadata.jsonl are read line by line
(the `datasets` json loader aborts a whole file on one bad line, and its audiofolder loader needs
torchcodec even with decode=False), media are decoded with PIL and soundfile, resampled with soxr.
"""

from __future__ import annotations

import collections
import functools
import glob
import io
import itertools
import json
import math
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import numpy as np

from attest.errors import KaiError
from attest.statements import NO_GENERATOR, SYNTHETIC_MARKERS
from data_pipelines.shards import SOURCE_KEYS

# Local files only: `datasets` must never reach for the Hub (read when `datasets` is imported).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FORMATS = ("text", "jsonl", "parquet", "imagefolder", "audiofolder")
FOLDER_FORMATS = ("imagefolder", "audiofolder")
REQUIRED = ("name", "path", "format", "license", "origin", "collection", "collected", "consent", "pii")
MANIFEST_SOURCE_KEYS = SOURCE_KEYS  # the manifest `source` block (data_pipelines.shards)
METADATA = "metadata.jsonl"
# Files a folder `path` contributes, by format (case-insensitive suffix; hidden entries skipped).
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "text": (".txt",),
    "jsonl": (".jsonl",),
    "parquet": (".parquet",),
    "imagefolder": (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"),
    "audiofolder": (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"),
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MAGIC = re.compile(r"[*?[]")
_ESCAPED = re.compile(r"\[[*?[]\]")  # glob.escape's form of a literal * ? [


class SourceError(KaiError, ValueError):
    """A declared source is invalid; the message is one line: "source 'NAME': problem"."""


@dataclass(frozen=True)
class Source:
    name: str
    format: str
    files: tuple[Path, ...]  # sorted; folders: metadata.jsonl first, then the media files
    record: dict[str, Any]   # the manifest `source` block: exactly MANIFEST_SOURCE_KEYS
    text_field: str = "text"
    root: Path = Path(".")   # ids hold file paths relative to this folder


@dataclass
class Normalize:
    image_size: int = 32       # RGB, image_size x image_size, PNG
    sample_rate: int = 16000   # mono, resampled to this rate
    audio_samples: int = 8000  # zero-padded or trimmed to this many float32 samples
    unicode: str = "NFC"       # text normal form: NFC keeps what was written; NFKC also folds
                               # compatibility forms (full-width Latin, half-width jamo, circled digits)

    def __post_init__(self) -> None:
        if self.unicode not in ("NFC", "NFKC"):
            raise ValueError(f"normalize: unicode must be NFC or NFKC, got {self.unicode!r}")
        for key in ("image_size", "sample_rate", "audio_samples"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"normalize: {key} must be a positive integer, got {value!r}")


# --- validation ----------------------------------------------------------------------------------

def check_sources(sources: Sequence[Mapping[str, Any]], base_dir: Path) -> list[Source]:
    """Validate every declared source before any work; raise SourceError on the first problem."""
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or not sources:
        raise SourceError("sources: expected a non-empty list of source mappings")
    out: list[Source] = []
    for i, spec in enumerate(sources):
        source = _check_one(spec, i, Path(base_dir))
        if any(s.name == source.name for s in out):
            raise SourceError(f"source {source.name!r}: duplicate name (field 'name' must be unique)")
        out.append(source)
    return out


def _check_one(spec: Any, index: int, base_dir: Path) -> Source:
    if not isinstance(spec, Mapping):
        raise SourceError(f"source '#{index}': expected a mapping, got {type(spec).__name__}")
    name = str(spec["name"]) if _present(spec.get("name")) else f"#{index}"
    fail = functools.partial(_fail, name)
    _check_fields(spec, fail)
    if not _NAME.fullmatch(spec["name"]):
        fail(f"field 'name' must match {_NAME.pattern} (it prefixes shard files and ids)")
    if spec["format"] not in FORMATS:
        fail(f"field 'format' is {spec['format']!r}; expected one of {', '.join(FORMATS)}")
    _check_license(spec["license"], fail)
    synthetic = any(m in spec["collection"].lower() for m in SYNTHETIC_MARKERS)
    generator = spec.get("generator")
    if synthetic and (not isinstance(generator, str) or generator.strip().lower() in NO_GENERATOR):
        fail(f"collection {spec['collection']!r} requires field 'generator' (the model or program that made the data)")
    text_field = spec.get("text_field", "text")
    if not isinstance(text_field, str) or not text_field:
        fail(f"field 'text_field' must be a non-empty string, got {text_field!r}")
    root, files = _resolve_files(spec["format"], str(spec["path"]), base_dir, fail)
    record = {k: spec.get(k) for k in MANIFEST_SOURCE_KEYS}
    record["generator"] = generator if _present(generator) else None
    return Source(spec["name"], spec["format"], files, record, text_field, root)


def _fail(name: str, problem: str) -> NoReturn:
    raise SourceError(f"source {name!r}: {problem}")


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _check_fields(spec: Mapping[str, Any], fail: Callable[[str], NoReturn]) -> None:
    """Required fields present and non-empty; provenance values are strings (so JSON-safe)."""
    for key in REQUIRED:
        if not _present(spec.get(key)):
            fail(f"missing required field {key!r}")
        if key != "path" and not isinstance(spec[key], str):
            fail(f"field {key!r} must be a string, got {type(spec[key]).__name__} {spec[key]!r}")
    if not isinstance(spec["path"], (str, os.PathLike)):
        fail(f"field 'path' must be a string, got {type(spec['path']).__name__}")
    generator = spec.get("generator")
    if generator is not None and not isinstance(generator, str):
        fail(f"field 'generator' must be a string, got {type(generator).__name__} {generator!r}")


@functools.lru_cache(maxsize=1)
def _spdx() -> Any:
    from license_expression import get_spdx_licensing
    return get_spdx_licensing()


def _check_license(expression: str, fail: Callable[[str], NoReturn]) -> None:
    """An SPDX expression of known ids, written exactly as SPDX spells it (policies match strings)."""
    try:
        info = _spdx().validate(expression, strict=True)
        errors, normalized = info.errors, info.normalized_expression
    except Exception as e:  # license-expression can fail internally on malformed input ("MIT AND")
        errors, normalized = [f"{type(e).__name__}: {e}"], None
    if errors or not normalized:
        detail = "; ".join(errors) if errors else "empty expression"
        fail(f"field 'license' {expression!r} is not a valid SPDX license id or expression ({detail})")
    if normalized != expression:
        fail(f"field 'license' {expression!r} is not in canonical SPDX form; write {normalized!r}")


def _resolve_files(fmt: str, raw: str, base_dir: Path, fail: Callable[[str], NoReturn],
                   ) -> tuple[Path, tuple[Path, ...]]:
    """(root, sorted input files) of a path, glob or folder; existence checks and globbing only."""
    absolute = Path(raw).is_absolute()
    path = Path(raw) if absolute else base_dir / raw
    if _MAGIC.search(raw):  # only `raw` is a pattern: base_dir may contain [ ] * ? literally
        root = (Path() if absolute else base_dir).joinpath(*_literal_prefix(raw))
        matches = glob.glob(raw, recursive=True) if absolute else glob.glob(raw, root_dir=base_dir, recursive=True)
        files = [p for p in (Path(m) if absolute else base_dir / m for m in matches) if p.is_file()]
    elif path.is_dir():
        root, files = path, _walk(path, EXTENSIONS[fmt])
    else:
        root, files = path.parent, [path] if path.is_file() else []
    if not files and not path.is_dir():
        fail(f"field 'path' {raw!r} matches nothing (resolved: {path})")
    files = sorted(files, key=lambda p: _rel(p, root))
    if fmt in FOLDER_FORMATS:
        if not (path.is_dir() and (path / METADATA).is_file()):
            fail(f"field 'path' {raw!r}: format {fmt!r} needs a folder with {METADATA}; none at {path / METADATA}")
        files = [path / METADATA, *files]
    elif not files:
        fail(f"field 'path' {raw!r} is a folder with no {'/'.join(EXTENSIONS[fmt])} files (resolved: {path})")
    return root, tuple(files)


def _literal_prefix(pattern: str) -> list[str]:
    """The parts of a glob before its first wildcard (glob.escape'd ones unescaped): ids are relative to it."""
    parts = itertools.takewhile(lambda part: not _MAGIC.search(_ESCAPED.sub("", part)), Path(pattern).parts)
    return [_ESCAPED.sub(lambda m: m.group(0)[1], part) for part in parts]


def _walk(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files under root with one of the extensions, skipping hidden files and folders."""
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(folder, n) for n in names if not n.startswith(".") and n.lower().endswith(extensions)]
    return out


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# --- records -------------------------------------------------------------------------------------

class Drop(str):
    """Why an item was dropped ("empty", "bad-json", ...): a str subclass, so never confused with text."""


Item = tuple[int, dict[str, Any] | Drop]  # (position, record or drop reason)


def iter_records(source: Source, norm: Normalize, stats: collections.Counter, start: int = 0,
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (position, record) in a deterministic order; positions < start are skipped undecoded.

    `position` counts raw input items (text: files; jsonl: lines; parquet: rows; folders:
    metadata.jsonl lines) across `source.files` in order. Dropped items are counted in
    stats[reason]; stats["read"] counts items looked at and stats["kept"] items yielded.
    """
    for position, item in _READERS[source.format](source, norm, start):
        stats["read"] += 1
        if isinstance(item, Drop):
            stats[str(item)] += 1
            continue
        stats["kept"] += 1
        yield position, item


def normalize_text(s: str, form: str = "NFC") -> str:
    """NFC (or NFKC); CRLF/CR -> LF; horizontal whitespace runs -> one space; no trailing spaces; <= 1 blank line."""
    s = unicodedata.normalize(form, s).replace("\r\n", "\n").replace("\r", "\n")
    s = _HSPACE.sub(" ", s)
    if " \n" in s:
        s = _TRAILING.sub("\n", s)
    if "\n\n\n" in s:
        s = _BLANKS.sub("\n\n", s)
    return s.strip()


# Horizontal whitespace worth rewriting: a run of 2+, or one that is not a plain space (single
# spaces, the common case, are left alone: this is the hot loop of text ingest).
_HSPACE = re.compile(r"[^\S\n]{2,}|[^\S \n]")
_TRAILING = re.compile(r" +\n")
_BLANKS = re.compile(r"\n{3,}")


def _record(rid: str, modality: str, text: str, image: bytes | None = None,
            audio: np.ndarray | None = None) -> dict[str, Any]:
    return {"id": rid, "modality": modality, "text": text, "image": image, "audio": audio}


def _text_items(source: Source, norm: Normalize, start: int) -> Iterator[Item]:
    for position, path in enumerate(source.files):
        if position >= start:
            yield position, _text_document(source, path, norm.unicode)


def _text_document(source: Source, path: Path, form: str) -> dict[str, Any] | Drop:
    try:
        text = normalize_text(path.read_bytes().decode("utf-8").removeprefix("\ufeff"), form)
    except UnicodeDecodeError:
        return Drop("not-utf8")
    return _record(f"{source.name}/{_rel(path, source.root)}", "text", text) if text else Drop("empty")


def _jsonl_items(source: Source, norm: Normalize, start: int) -> Iterator[Item]:
    position = -1
    for path in source.files:
        prefix = f"{source.name}/{_rel(path, source.root)}"
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                position += 1
                if position < start:
                    continue
                row = _json_line(line, lineno)
                text = row if isinstance(row, Drop) else _text_of(row, source.text_field, norm.unicode)
                yield position, text if isinstance(text, Drop) else _record(f"{prefix}:{lineno}", "text", text)


def _json_line(line: bytes, lineno: int) -> dict[str, Any] | Drop:
    """A JSON object from one jsonl line, or the drop reason."""
    if lineno == 1:
        line = line.removeprefix(b"\xef\xbb\xbf")
    if not line.strip():
        return Drop("empty")
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return Drop("not-utf8")
    except (ValueError, RecursionError):
        return Drop("bad-json")
    return row if isinstance(row, dict) else Drop("bad-json")


def _text_of(row: Mapping[str, Any], field: str, form: str) -> str | Drop:
    """The normalized text of a row, or the drop reason."""
    value = row.get(field)
    if not isinstance(value, str):
        return Drop("missing-text")
    return normalize_text(value, form) or Drop("empty")


def _parquet_items(source: Source, norm: Normalize, start: int) -> Iterator[Item]:
    import pyarrow.parquet as pq
    offset = 0
    for path in source.files:
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
            _fail(source.name, f"cannot read parquet file {path}: {e}".replace("\n", " "))
        if source.text_field not in meta.schema.to_arrow_schema().names:
            _fail(source.name, f"field 'text_field' {source.text_field!r} is not a column of {path}")
        rows = meta.num_rows
        if offset + rows > start:
            skip = max(0, start - offset)
            prefix = f"{source.name}/{_rel(path, source.root)}"
            for row, example in enumerate(_hf_parquet(path, source.text_field).skip(skip), skip):
                text = _text_of(example, source.text_field, norm.unicode)
                yield offset + row, text if isinstance(text, Drop) else _record(f"{prefix}:{row}", "text", text)
        offset += rows


def _hf_parquet(path: Path, column: str) -> Any:
    """One Parquet file as a streaming `datasets` IterableDataset of its text column."""
    import datasets
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    return datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=True,
                                 columns=[column], cache_dir=_hf_cache_dir())


_HF_CACHE: list[tempfile.TemporaryDirectory] = []


def _hf_cache_dir() -> str:
    """Where `datasets` may put its lock files: a temp dir removed at exit, never a source folder."""
    if not _HF_CACHE:
        _HF_CACHE.append(tempfile.TemporaryDirectory(prefix="kai-data-hf-"))
    return _HF_CACHE[0].name


def _folder_items(source: Source, norm: Normalize, start: int) -> Iterator[Item]:
    meta = source.files[0]
    with open(meta, "rb") as f:
        for position, line in enumerate(f):
            if position >= start:
                yield position, _folder_record(source, norm, meta.parent, position + 1, line)


def _folder_record(source: Source, norm: Normalize, folder: Path, lineno: int, line: bytes,
                   ) -> dict[str, Any] | Drop:
    row = _json_line(line, lineno)
    if isinstance(row, Drop):
        return row
    name = row.get("file_name")
    if not isinstance(name, str) or not _inside(name):
        return Drop("bad-file-name")
    text = _text_of(row, source.text_field, norm.unicode)
    if isinstance(text, Drop):
        return text
    path = folder / name
    if not path.is_file():
        return Drop("missing-file")
    rid = f"{source.name}/{name}#{lineno}"
    if source.format == "imagefolder":
        png = image_png(path.read_bytes(), norm.image_size)
        return _record(rid, "image", text, image=png) if png is not None else Drop("broken-image")
    audio = audio_samples(path, norm.sample_rate, norm.audio_samples)
    return _record(rid, "audio", text, audio=audio) if audio is not None else Drop("broken-audio")


def _inside(name: str) -> bool:
    """A metadata file_name must stay inside its folder: relative, no '..' (backslashes count as '/')."""
    p = PurePosixPath(name.replace("\\", "/"))
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts


def image_png(data: bytes, size: int) -> bytes | None:
    """Any PIL-readable image as RGB size x size PNG bytes (EXIF orientation applied); None if broken."""
    from PIL import Image, ImageOps
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster for photos
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except Exception:  # undecodable input raises many types (OSError, SyntaxError, struct.error, ...)
        return None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def audio_samples(path: Path, rate: int, samples: int) -> np.ndarray | None:
    """Mono float32 at `rate`, zero-padded or trimmed to `samples`; None if soundfile cannot read it."""
    import soundfile as sf
    import soxr
    try:
        with sf.SoundFile(path) as f:
            src_rate = f.samplerate
            # Decode only what the output needs, plus 100 ms so the resampler's edge stays outside.
            x = f.read(math.ceil(samples * src_rate / rate) + src_rate // 10, dtype="float32", always_2d=True)
    except Exception:  # sf.LibsndfileError, RuntimeError, OSError, ...
        return None
    if x.size == 0:
        return None
    mono = np.nan_to_num(x.mean(axis=1, dtype=np.float32))
    if src_rate != rate:
        mono = soxr.resample(mono, src_rate, rate, quality="HQ")
    out = np.zeros(samples, dtype=np.float32)
    n = min(samples, len(mono))
    out[:n] = np.clip(mono[:n], -1.0, 1.0)
    return out


_READERS: dict[str, Callable[[Source, Normalize, int], Iterator[Item]]] = {
    "text": _text_items,
    "jsonl": _jsonl_items,
    "parquet": _parquet_items,
    "imagefolder": _folder_items,
    "audiofolder": _folder_items,
}
