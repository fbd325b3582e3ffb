"""Packing: normalized records → fixed-length token sequences, the rows training reads.

Text records are tokenized as `<bos> text <eos>` and concatenated into one token stream per
source, cut every `seq_len` tokens (a document may continue into the next row; only the last row
of a source is padded). An image or audio record is its own row: the placeholder `<image>` or
`<audio>` marks where the encoder's prefix goes, then `<bos> caption <eos>`, truncated or padded to
`seq_len`; the row carries the PNG bytes or samples the placeholder stands for.

Packed rows (PACKED_SCHEMA):

    id        string          "<source>-p<n>", unique within a build
    modality  string          "text" | "image" | "audio"
    tokens    list<int32>     exactly seq_len ids, padded with the tokenizer's pad id
    image     struct?         datasets `Image` storage: {bytes: PNG, path: null} (image rows only)
    audio     struct?         datasets `Audio` storage: {bytes: WAV, path: null} (audio rows only)
    rows      list<string>    ids of the records whose tokens are in this row

with the same `datasets` feature metadata as record shards (data_pipelines.shards).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipelines.shards import MEDIA_TYPE, media, with_features

IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<audio>"
PLACEHOLDERS = (IMAGE_TOKEN, AUDIO_TOKEN)

PACKED_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("modality", pa.string(), nullable=False),
    pa.field("tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("image", MEDIA_TYPE, nullable=True),
    pa.field("audio", MEDIA_TYPE, nullable=True),
    pa.field("rows", pa.list_(pa.string()), nullable=False),
])


def placeholder_ids(sp: Any) -> dict[str, int]:
    """Ids of the media placeholders; the tokenizer must define them as user symbols."""
    ids = {t: sp.piece_to_id(t) for t in PLACEHOLDERS}
    missing = [t for t, i in ids.items() if i == sp.unk_id()]
    if missing:
        raise ValueError(f"tokenizer lacks the placeholder pieces {missing}; train it with data_pipelines.tokenizer")
    return ids


class Packer:
    """Turns records (in order) into packed rows; `origin` tags say which input each row came from."""

    def __init__(self, sp: Any, seq_len: int) -> None:
        if seq_len < 4:
            raise ValueError(f"pack.seq_len must be >= 4, got {seq_len}")
        self.sp, self.seq_len = sp, seq_len
        self.pad, self.bos, self.eos = max(sp.pad_id(), 0), sp.bos_id(), sp.eos_id()
        self.placeholder = placeholder_ids(sp)
        self.stream: list[int] = []            # pending text tokens
        self.stream_rows: list[tuple[str, str]] = []  # (record id, origin) with tokens in `stream`
        self.count = 0

    def _row(self, prefix: str, modality: str, tokens: list[int], rows: list[str], image: bytes | None = None,
             audio: Any = None) -> dict[str, Any]:
        self.count += 1
        return {"id": f"{prefix}-p{self.count - 1:09d}", "modality": modality,
                "tokens": tokens + [self.pad] * (self.seq_len - len(tokens)), "image": image,
                "audio": None if audio is None else np.asarray(audio, dtype=np.float32), "rows": rows}

    def add(self, prefix: str, record: dict[str, Any], origin: str) -> Iterator[tuple[dict[str, Any], list[str]]]:
        """Feed one record; yields (packed row, origins of its tokens) for every row now complete."""
        body = [self.bos, *self.sp.encode(record["text"]), self.eos]
        if record["modality"] == "text":
            self.stream += body
            self.stream_rows.append((record["id"], origin))
            while len(self.stream) >= self.seq_len:
                yield self._cut(prefix)
            return
        token = IMAGE_TOKEN if record["modality"] == "image" else AUDIO_TOKEN
        tokens = [self.placeholder[token], *body][: self.seq_len]
        yield (self._row(prefix, record["modality"], tokens, [record["id"]], record.get("image"), record.get("audio")),
               [origin])

    def _cut(self, prefix: str) -> tuple[dict[str, Any], list[str]]:
        take, self.stream = self.stream[: self.seq_len], self.stream[self.seq_len:]
        rows = self.stream_rows
        # the last record continues into the next row when tokens of it remain
        self.stream_rows = rows[-1:] if self.stream else []
        return self._row(prefix, "text", take, [r for r, _ in rows]), list(dict.fromkeys(o for _, o in rows))

    def finish(self, prefix: str) -> Iterable[tuple[dict[str, Any], list[str]]]:
        """The last, padded text row of a source (if any tokens are pending)."""
        if self.stream:
            rows = self.stream_rows
            take, self.stream, self.stream_rows = self.stream, [], []
            yield self._row(prefix, "text", take, [r for r, _ in rows]), list(dict.fromkeys(o for _, o in rows))


def packed_table(rows: list[dict[str, Any]], sample_rate: int) -> pa.Table:
    image, audio = media(rows, sample_rate)
    return pa.Table.from_pydict({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "modality": pa.array([r["modality"] for r in rows], pa.string()),
        "tokens": pa.array([r["tokens"] for r in rows], pa.list_(pa.int32())),
        "image": image,
        "audio": audio,
        "rows": pa.array([r["rows"] for r in rows], pa.list_(pa.string())),
    }, schema=with_features(PACKED_SCHEMA, sample_rate))


def synthetic_packed_shards(out_dir: Any, tokens: int, seq_len: int, rows_per_shard: int = 65536,
                            vocab: int = 8000, seed: int = 0, source: str = "synthetic") -> list[Any]:
    """Packed text shards of about `tokens` pseudo-random token ids (no tokenizer, no manifest
    chain): the pack stage's schema and writer settings, row groups of ROW_GROUP_ROWS, for sizing
    benchmarks and tests of the reader. Returns the shard paths in order."""
    from pathlib import Path

    from data_pipelines.shards import ROW_GROUP_ROWS, ShardFile

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows = max(1, -(-tokens // seq_len))
    meta = {"name": source, "origin": "synthetic", "license": "CC0-1.0", "collection": "synthetic",
            "collected": "2026-12-07/2026-12-07", "consent": "not applicable", "pii": "none",
            "generator": "data_pipelines.pack.synthetic_packed_shards"}
    paths, done = [], 0
    schema = with_features(PACKED_SCHEMA, 16000)
    while done < rows:
        path = out / f"{source}-{len(paths):05d}.parquet"
        shard = ShardFile(path, schema, meta)
        end = min(rows, done + rows_per_shard)
        for lo in range(done, end, ROW_GROUP_ROWS):
            n = min(ROW_GROUP_ROWS, end - lo)
            values = pa.array(rng.integers(4, vocab, size=n * seq_len, dtype=np.int32))
            tok = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32)), values)
            nulls = pa.nulls(n, MEDIA_TYPE)
            shard.write(pa.Table.from_arrays([
                pa.array([f"{source}-p{i:09d}" for i in range(lo, lo + n)], pa.string()),
                pa.array(["text"] * n, pa.string()), tok, nulls, nulls,
                pa.array([[] for _ in range(n)], pa.list_(pa.string()))], schema=schema))
        shard.close([], {"stage": "pack", "synthetic": True})
        paths.append(path)
        done = end
    return paths
