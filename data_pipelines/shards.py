"""Raw sources → deterministic Parquet shards, each with a JSON manifest.

A shard is what the provenance chain points at, so its bytes must be a pure function of its rows:
the schema is fixed (no inferred types, no pandas metadata), row groups and compression are fixed,
and files are written atomically (temp file + os.replace) so a crash never leaves a half-written
shard next to a manifest that describes a complete one.

Shard rows (one schema for every modality, so a mixed shard stays one table):

    id        string         unique within a build, e.g. "image-img_00001"
    modality  string         "text" | "image" | "audio"
    text      string         the sentence, caption or transcript
    image     binary?        PNG bytes, 32x32 RGB (null unless modality == "image")
    audio     list<float32>? 8000 samples in [-1, 1] at 16 kHz (null unless modality == "audio")

Each `prefix-00000.parquet` gets a `prefix-00000.manifest.json` (format kai-data-shard/v1,
documented by `MANIFEST_KEYS` and `SOURCE_KEYS` below): sha256, size, row and modality counts,
schema, and where the data came from under which licence and consent.

Readers cover the Hugging Face folder conventions the demo corpus uses (jsonl text, imagefolder,
audiofolder) with PIL/numpy/stdlib only; a real collection adds a reader here.
"""

from __future__ import annotations

import io
import json
import os
import wave
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from attest.digest import sha256_file

MANIFEST_FORMAT = "kai-data-shard/v1"
IMAGE_SIZE = 32
SAMPLE_RATE = 16_000
AUDIO_SAMPLES = 8_000
MODALITIES = ("text", "image", "audio")

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("modality", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=True),
    pa.field("audio", pa.list_(pa.float32()), nullable=True),
])
MANIFEST_KEYS = ("kind", "shard", "sha256", "bytes", "rows", "schema", "modality_counts", "source",
                 "derived_from")
SOURCE_KEYS = ("name", "origin", "license", "collection", "collected", "consent", "pii", "generator")
# Fixed writer settings: part of what makes shard bytes reproducible (same pyarrow version).
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "use_dictionary": True,
                                   "write_statistics": True, "data_page_version": "2.0"}


# --- readers -------------------------------------------------------------------------------------

def _read_metadata(folder: Path) -> list[dict[str, Any]]:
    """metadata.jsonl rows of an HF image/audio folder; files without a row are ignored."""
    meta = folder / "metadata.jsonl"
    rows = []
    with open(meta, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"file_name": str(row["file_name"]), "text": str(row["text"])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{meta}:{lineno}: expected {{\"file_name\", \"text\"}}: {e}") from e
    return rows


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    for file in files:
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{file}:{lineno}: expected {{\"text\": ...}}: {e}") from e
                yield {"id": f"text-{file.stem}-{lineno:06d}", "modality": "text", "text": str(text),
                       "image": None, "audio": None}


def png_32x32(data_or_path: bytes | Path) -> bytes:
    """Decode any PIL-readable image, convert to RGB 32x32 and re-encode as PNG."""
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as img:
        img = img.convert("RGB")
        if img.size != (IMAGE_SIZE, IMAGE_SIZE):
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return buf.getvalue()


def _read_imagefolder(path: Path) -> Iterator[dict[str, Any]]:
    for row in _read_metadata(path):
        yield {"id": f"image-{Path(row['file_name']).stem}", "modality": "image", "text": row["text"],
               "image": png_32x32(path / row["file_name"]), "audio": None}


def wav_to_samples(path: Path) -> np.ndarray:
    """float32 mono samples of a PCM WAV at 16 kHz, zero-padded or trimmed to 8000 samples."""
    with wave.open(str(path), "rb") as w:
        width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if rate != SAMPLE_RATE:
        # Resampling would need a filter design choice; refuse rather than silently alias.
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} Hz")
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dtype = "<i2" if width == 2 else "<i4"
        x = np.frombuffer(raw, dtype=dtype).astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    out = np.zeros(AUDIO_SAMPLES, dtype=np.float32)
    out[: min(len(x), AUDIO_SAMPLES)] = x[:AUDIO_SAMPLES]
    return out


def _read_audiofolder(path: Path) -> Iterator[dict[str, Any]]:
    for row in _read_metadata(path):
        yield {"id": f"audio-{Path(row['file_name']).stem}", "modality": "audio", "text": row["text"],
               "image": None, "audio": wav_to_samples(path / row["file_name"])}


READERS: dict[str, Callable[[Path], Iterator[dict[str, Any]]]] = {
    "jsonl": _read_jsonl,
    "imagefolder": _read_imagefolder,
    "audiofolder": _read_audiofolder,
}


def read_source(kind: str, path: Path) -> Iterator[dict[str, Any]]:
    """Rows (dicts with the SCHEMA columns) of one raw source; `kind` is a READERS key."""
    if kind not in READERS:
        raise ValueError(f"unknown source kind {kind!r}; known: {sorted(READERS)}")
    return READERS[kind](Path(path))


# --- writing -------------------------------------------------------------------------------------

def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    audio = [None if r.get("audio") is None else np.asarray(r["audio"], dtype=np.float32) for r in rows]
    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "modality": pa.array([r["modality"] for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
        "image": pa.array([r.get("image") for r in rows], pa.binary()),
        "audio": pa.array(audio, pa.list_(pa.float32())),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _validate(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["modality"] not in MODALITIES:
            raise ValueError(f"row {r['id']!r}: unknown modality {r['modality']!r}")
        if (r.get("image") is not None) != (r["modality"] == "image"):
            raise ValueError(f"row {r['id']!r}: image bytes must be set exactly for image rows")
        if (r.get("audio") is not None) != (r["modality"] == "audio"):
            raise ValueError(f"row {r['id']!r}: audio samples must be set exactly for audio rows")
        if r["modality"] == "audio" and len(r["audio"]) != AUDIO_SAMPLES:
            raise ValueError(f"row {r['id']!r}: {len(r['audio'])} audio samples, expected {AUDIO_SAMPLES}")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def schema_description() -> list[dict[str, Any]]:
    """The shard schema as JSON data, as recorded in manifests."""
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in SCHEMA]


def source_record(source: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's `source` block: exactly SOURCE_KEYS, all required (extra config keys dropped)."""
    missing = [k for k in SOURCE_KEYS if k not in source]
    if missing:
        raise ValueError(f"source {source.get('name', '?')!r} lacks {missing}; required: {list(SOURCE_KEYS)}")
    # json round trip: fails here, not mid-build, if a value is not JSON data (e.g. an OmegaConf node).
    return json.loads(json.dumps({k: source[k] for k in SOURCE_KEYS}))


def write_shards(records: Iterable[dict[str, Any]], out_dir: Path, prefix: str, rows_per_shard: int,
                 source: Mapping[str, Any], derived_from: list[dict[str, Any]] | None = None,
                 ) -> list[tuple[Path, dict[str, Any]]]:
    """Write `prefix-00000.parquet`, ... plus manifests; returns [(shard path, manifest)] in order.

    `derived_from` lists the artifacts (e.g. {"path", "sha256"}) the rows were computed from; the
    demo's rows come straight from raw sources, so it is empty.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = source_record(source)
    results: list[tuple[Path, dict[str, Any]]] = []
    it = iter(records)
    while rows := list(islice(it, rows_per_shard)):
        _validate(rows)
        table = _to_table(rows)
        shard = out_dir / f"{prefix}-{len(results):05d}.parquet"
        _atomic_write(shard, lambda p: pq.write_table(table, p, row_group_size=rows_per_shard,
                                                      **PARQUET_OPTIONS))
        counts = Counter(r["modality"] for r in rows)
        manifest = {
            "kind": MANIFEST_FORMAT,
            "shard": shard.name,
            "sha256": sha256_file(shard),
            "bytes": shard.stat().st_size,
            "rows": len(rows),
            "schema": schema_description(),
            "modality_counts": {m: counts.get(m, 0) for m in MODALITIES},
            "source": src,
            "derived_from": list(derived_from or []),
        }
        text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        _atomic_write(manifest_path(shard), lambda p: p.write_text(text, encoding="utf-8"))
        results.append((shard, manifest))
    return results


def manifest_path(shard: Path) -> Path:
    """`x/prefix-00000.parquet` → `x/prefix-00000.manifest.json`."""
    return shard.with_name(shard.name.removesuffix(".parquet") + ".manifest.json")


def load_manifest(path: Path) -> dict[str, Any]:
    """Read a shard manifest; ValueError naming the file if it is not valid kai-data-shard/v1 JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read shard manifest: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: shard manifest must be a JSON object, got {type(data).__name__}")
    missing = [k for k in MANIFEST_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: shard manifest lacks keys {missing}")
    if data["kind"] != MANIFEST_FORMAT:
        raise ValueError(f"{path}: manifest kind {data['kind']!r}, expected {MANIFEST_FORMAT!r}")
    source = data["source"] if isinstance(data["source"], dict) else {}
    missing = [k for k in SOURCE_KEYS if k not in source]
    if missing:
        raise ValueError(f"{path}: manifest source lacks keys {missing}")
    return data
