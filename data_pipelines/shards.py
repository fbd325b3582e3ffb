"""Deterministic Parquet shards, each with a JSON manifest: the unit the provenance chain names.

A shard's bytes are a pure function of its rows: the schema is fixed (no inferred types, no pandas
metadata), row groups and compression are fixed, and files are written atomically (temp file +
os.replace) so a crash never leaves a half-written shard next to a manifest describing a whole one.

Record shards (the ingest and dedup stages; one schema for every modality):

    id        string         unique within a build, e.g. "images-cat.png"
    modality  string         "text" | "image" | "audio"
    text      string         the document, caption or transcript (normalized)
    image     struct?        {bytes: PNG at the configured size, path: null} (null unless modality == "image")
    audio     struct?        {bytes: WAV, mono float32 in [-1, 1] at the configured rate, path: null}
                             (null unless "audio")

The media columns are the Hugging Face `datasets` storage of `Image()` and `Audio()`, and every
shard carries the `datasets` feature metadata (schema key `huggingface`, `Audio` with its
sampling rate), so `load_dataset("parquet", ...)` decodes images and audio without being told.
In memory, stages see `image` as PNG bytes and `audio` as a float32 array (`decode_row`).

Packed shards (the pack stage, what training reads) are described in data_pipelines.pack.

Each `x/NAME-00000.parquet` gets `x/.manifests/NAME-00000.manifest.json` (format kai-data-shard/v1:
the keys in MANIFEST_KEYS, the `source` block in SOURCE_KEYS, plus the stage's fields; see
docs/data.md). The hidden folder keeps manifests out of `pyarrow.dataset(x)` and `load_dataset(x)`.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attest.bundle import MANIFEST_DIR
from attest.digest import sha256_file

MANIFEST_FORMAT = "kai-data-shard/v1"
ROW_GROUP_ROWS = 1024           # a row group is cut at whichever bound comes first
ROW_GROUP_BYTES = 8 * 2**20
MODALITIES = ("text", "image", "audio")

MEDIA_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image/Audio storage
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("modality", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("image", MEDIA_TYPE, nullable=True),
    pa.field("audio", MEDIA_TYPE, nullable=True),
])
MANIFEST_KEYS = ("kind", "shard", "sha256", "bytes", "rows", "schema", "modality_counts", "source",
                 "derived_from")
SOURCE_KEYS = ("name", "origin", "license", "collection", "collected", "consent", "pii", "generator")
# Fixed writer settings: part of what makes shard bytes reproducible (same pyarrow version).
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "use_dictionary": True,
                                   "write_statistics": True, "data_page_version": "2.0"}


# --- media and feature metadata ------------------------------------------------------------------

def wav_bytes(samples: Any, rate: int) -> bytes:
    """Mono float32 samples as a WAV file (IEEE float, fmt + fact + data): fixed bytes for fixed samples."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    n = len(data) // 4
    fmt = struct.pack("<HHIIHHH", 3, 1, rate, 4 * rate, 4, 32, 0)  # IEEE float, mono, 32-bit, cbSize 0
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, n)
            + b"data" + struct.pack("<I", len(data)) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def wav_samples(data: bytes) -> np.ndarray:
    """The samples of a WAV file written by `wav_bytes` (ValueError for any other layout)."""
    if data[:4] != b"RIFF" or data[8:16] != b"WAVEfmt " or struct.unpack_from("<HH", data, 20) != (3, 1):
        raise ValueError("audio: not a mono IEEE-float WAV written by kai-data")
    off = 12
    while off + 8 <= len(data):
        tag, size = data[off:off + 4], struct.unpack_from("<I", data, off + 4)[0]
        if tag == b"data":
            return np.frombuffer(data, dtype="<f4", count=size // 4, offset=off + 8).astype(np.float32)
        off += 8 + size
    raise ValueError("audio: WAV without a data chunk")


def with_features(schema: pa.Schema, sample_rate: int) -> pa.Schema:
    """`schema` with the `datasets` feature metadata: Image/Audio for the media columns, Value and
    List for the rest (written by hand: the format is stable, the `datasets` import is not needed)."""
    def feature(t: pa.DataType) -> dict[str, Any]:
        if pa.types.is_list(t):
            return {"feature": feature(t.value_type), "_type": "List"}
        return {"dtype": {"int32": "int32", "float": "float32", "string": "string"}[str(t)], "_type": "Value"}

    features = {f.name: ({"_type": "Image"} if f.name == "image" else
                         {"_type": "Audio", "sampling_rate": int(sample_rate)} if f.name == "audio" else feature(f.type))
                for f in schema}
    meta = json.dumps({"info": {"features": features}}, sort_keys=True)
    return schema.with_metadata({"huggingface": meta})


def sample_rate_of(path: Path) -> int:
    """The audio sampling rate a shard's feature metadata declares."""
    meta = pq.read_schema(path).metadata or {}
    try:
        return int(json.loads(meta[b"huggingface"])["info"]["features"]["audio"]["sampling_rate"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: no audio sampling rate in the shard's feature metadata") from e


def media(rows: list[dict[str, Any]], sample_rate: int) -> tuple[pa.Array, pa.Array]:
    """The image and audio columns (datasets storage) of in-memory rows."""
    image = [None if r.get("image") is None else {"bytes": r["image"], "path": None} for r in rows]
    audio = [None if r.get("audio") is None else {"bytes": wav_bytes(r["audio"], sample_rate), "path": None}
             for r in rows]
    return pa.array(image, MEDIA_TYPE), pa.array(audio, MEDIA_TYPE)


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row read from a shard, with media as the stages hold it: PNG bytes and float32 samples."""
    if row.get("image") is not None:
        row["image"] = row["image"]["bytes"]
    if row.get("audio") is not None:
        row["audio"] = wav_samples(row["audio"]["bytes"])
    return row


# --- writing -------------------------------------------------------------------------------------

def records_table(rows: list[dict[str, Any]], sample_rate: int) -> pa.Table:
    """Normalized records (SCHEMA columns) as a table; checks modality and media columns agree."""
    _validate(rows)
    image, audio = media(rows, sample_rate)
    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "modality": pa.array([r["modality"] for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
        "image": image,
        "audio": audio,
    }
    return pa.Table.from_pydict(columns, schema=with_features(SCHEMA, sample_rate))


def _validate(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["modality"] not in MODALITIES:
            raise ValueError(f"row {r['id']!r}: unknown modality {r['modality']!r}")
        if (r.get("image") is not None) != (r["modality"] == "image"):
            raise ValueError(f"row {r['id']!r}: image bytes must be set exactly for image rows")
        if (r.get("audio") is not None) != (r["modality"] == "audio"):
            raise ValueError(f"row {r['id']!r}: audio samples must be set exactly for audio rows")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def schema_description(schema: pa.Schema = SCHEMA) -> list[dict[str, Any]]:
    """A shard schema as JSON data, as recorded in manifests."""
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def source_record(source: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's `source` block: exactly SOURCE_KEYS, all required (extra config keys dropped)."""
    missing = [k for k in SOURCE_KEYS if k not in source]
    if missing:
        raise ValueError(f"source {source.get('name', '?')!r} lacks {missing}; required: {list(SOURCE_KEYS)}")
    # json round trip: fails here, not mid-build, if a value is not JSON data (e.g. an OmegaConf node).
    return json.loads(json.dumps({k: source[k] for k in SOURCE_KEYS}))


class ShardFile:
    """One shard written a row group at a time (bounded memory), then closed into place with its manifest.

    Rows go to a temp file beside `path`; `close` moves it to `path` and writes the manifest, each
    step atomic, so a crash leaves either nothing or a whole shard. `abandon` removes the temp file.
    """

    def __init__(self, path: Path, schema: pa.Schema, source: Mapping[str, Any]) -> None:
        self.path, self.schema = Path(path), schema
        self.source = source_record(source)  # refuse before writing anything
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.writer = pq.ParquetWriter(self.tmp, schema, **PARQUET_OPTIONS)
        self.rows = 0
        self.modalities: Counter[str] = Counter()

    def write(self, table: pa.Table) -> None:
        """Append `table` as one row group (callers keep groups to ROW_GROUP_ROWS / ROW_GROUP_BYTES)."""
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows
        self.modalities.update(table.column("modality").to_pylist())

    def close(self, derived_from: list[dict[str, Any]], extra: Mapping[str, Any]) -> dict[str, Any]:
        """Finish the file and its manifest; returns the manifest.

        `derived_from` lists the shards ({"path", "sha256"}) the rows were computed from; `extra`
        holds the stage's own fields (stage, params, counts, positions, tokens).
        """
        self.writer.close()
        os.replace(self.tmp, self.path)
        manifest = {
            "kind": MANIFEST_FORMAT,
            "shard": self.path.name,
            "sha256": sha256_file(self.path),
            "bytes": self.path.stat().st_size,
            "rows": self.rows,
            "schema": schema_description(self.schema),
            "modality_counts": {m: self.modalities.get(m, 0) for m in MODALITIES},
            "source": self.source,
            "derived_from": list(derived_from),
            **extra,
        }
        text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        man = manifest_path(self.path)
        man.parent.mkdir(exist_ok=True)
        _atomic_write(man, lambda p: p.write_text(text, encoding="utf-8"))
        return manifest

    def abandon(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(table: pa.Table, path: Path, source: Mapping[str, Any], derived_from: list[dict[str, Any]],
                extra: Mapping[str, Any]) -> dict[str, Any]:
    """Write a whole table as one shard (row groups of ROW_GROUP_ROWS) with its manifest."""
    shard = ShardFile(path, table.schema, source)
    for batch in table.to_batches(max_chunksize=ROW_GROUP_ROWS):
        shard.write(pa.Table.from_batches([batch], schema=table.schema))
    return shard.close(derived_from, extra)


def manifest_path(shard: Path) -> Path:
    """`x/prefix-00000.parquet` → `x/.manifests/prefix-00000.manifest.json`."""
    return shard.parent / MANIFEST_DIR / (shard.name.removesuffix(".parquet") + ".manifest.json")


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
