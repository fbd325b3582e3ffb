"""Training batches from attested Parquet shards: rows by id, read one row group at a time.

The row ids come from the sampler (data_pipelines.sampler.make_sampler); this module turns ids into
tensors. Row id i is the i-th row of the shards concatenated in the order given (the run records
that order and each shard's digest), so it means the same row on every rank and in every replay.

Nothing here loads a shard: `ShardIndex` reads each shard's Parquet footer once (rows per row
group), and a batch reads only the row groups that hold its rows (pread, a few open files kept, the
last row groups decoded kept), then decodes only those rows: tokens, and the PNG or WAV of a media
row only when that row is in the batch. Memory is the index (O(shards) for evenly cut shards) plus
a bounded number of row groups (≤ data_pipelines.shards.ROW_GROUP_BYTES each as kai-data writes
them), whatever the size of the corpus. `Batches` builds a rank's next micro-batches on a background thread.

Packed shards (data_pipelines.pack: a `tokens` column of exactly text_len ids) are used as they
are; record shards (a `text` column) are tokenized here as `<bos> text <eos>`, cut and padded.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
import torch
from PIL import Image

from data_pipelines.shards import wav_samples

OPEN_FILES = 16    # Parquet files kept open (footers parsed)
CACHED_GROUPS = 4  # decoded row groups kept (consecutive rows of a batch often share one)


class ShardIndex:
    """Rows per shard and per row group, from the Parquet footers only (no data page is read).

    Per shard: its first global row and, when its row groups all hold the same number of rows but
    the last (packed text, as kai-data cuts it), that number alone; otherwise the row offsets of its
    groups. So the index costs O(shards) for packed corpora, whatever their row count."""

    def __init__(self, shard_paths: Sequence[Path]) -> None:
        if not shard_paths:
            raise ValueError("no data shards given")
        self.paths = [Path(p) for p in shard_paths]
        starts = [0]
        self.uniform: list[int] = []  # rows per group (all but the last), or 0: see `offsets`
        self.offsets: dict[int, np.ndarray] = {}  # shard → first row of each group within it
        self.groups = 0
        names: set[tuple[str, ...]] = set()
        for i, p in enumerate(self.paths):
            md = pq.read_metadata(p)
            if md.num_row_groups:  # column paths of the row group: `md.schema` would leave a cycle per footer
                names.add(tuple(sorted({md.row_group(0).column(c).path_in_schema.split(".")[0]
                                        for c in range(md.num_columns)})))
            sizes = [md.row_group(j).num_rows for j in range(md.num_row_groups)]
            self.groups += len(sizes)
            if sizes and all(n == sizes[0] for n in sizes[:-1]) and 0 < sizes[-1] <= sizes[0]:
                self.uniform.append(sizes[0])
            else:
                self.uniform.append(0)
                self.offsets[i] = np.cumsum([0, *sizes[:-1]], dtype=np.int64)
            starts.append(starts[-1] + md.num_rows)
        packed = {"tokens" in n for n in names}
        if len(packed) > 1:
            raise ValueError(f"shards {[str(p) for p in self.paths][:8]} mix packed and record shards")
        self.packed = packed.pop() if packed else False
        self.shard_start = np.asarray(starts, dtype=np.int64)  # global first row of each shard, then the total
        self.shard_rows = [int(b - a) for a, b in zip(starts, starts[1:])]

    def __len__(self) -> int:
        return int(self.shard_start[-1])

    def locate(self, row: int) -> tuple[int, int, int]:
        """(shard, row group in it, offset in that group) of global row id `row`."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} outside the {len(self)} rows of the shards")
        shard = int(np.searchsorted(self.shard_start, row, side="right")) - 1
        off = row - int(self.shard_start[shard])
        if self.uniform[shard]:
            g, o = divmod(off, self.uniform[shard])
            return shard, g, o
        offs = self.offsets[shard]
        g = int(np.searchsorted(offs, off, side="right")) - 1
        return shard, g, off - int(offs[g])


class ShardDataset:
    def __init__(self, shard_paths: list[Path], tokenizer_path: Path, text_len: int) -> None:
        self.index = ShardIndex(shard_paths)
        self.packed = self.index.packed
        self.columns = ["modality", "tokens" if self.packed else "text", "image", "audio"]
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread and the eval on the main thread share the caches
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        self.text_len = text_len
        self.pad_id = max(self.sp.pad_id(), 0)
        if self.packed and len(self.index):
            self._check_len(0)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shard_rows(self) -> list[int]:
        return self.index.shard_rows

    def _check_len(self, row: int) -> None:
        n = len(self._rows([row])[0]["tokens"])
        if n != self.text_len:
            path = self.index.paths[self.index.locate(row)[0]]
            raise ValueError(f"{path}: packed rows hold {n} tokens, but train.text_len is {self.text_len}")

    def _file(self, shard: int) -> pq.ParquetFile:
        f = self._files.pop(shard, None)
        if f is None:
            f = pq.ParquetFile(self.index.paths[shard], memory_map=False)
            while len(self._files) >= OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = f
        return f

    def _group(self, shard: int, group: int) -> pa.Table:
        t = self._groups.pop((shard, group), None)
        if t is None:
            t = self._file(shard).read_row_group(group, columns=self.columns)
            while len(self._groups) >= CACHED_GROUPS:
                self._groups.popitem(last=False)
        self._groups[(shard, group)] = t
        return t

    def _rows(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """The rows `ids`, undecoded media (PNG / WAV bytes or None), in the order given."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for i in ids:
                shard, group, off = self.index.locate(int(i))
                t = self._group(shard, group)
                image, audio = t.column("image")[off], t.column("audio")[off]
                out.append({"modality": t.column("modality")[off].as_py(),
                            "tokens" if self.packed else "text": t.column(self.columns[1])[off].as_py(),
                            "image": image["bytes"].as_py() if image.is_valid else None,
                            "audio": audio["bytes"].as_py() if audio.is_valid else None})
        return out

    def modalities(self, ids: Sequence[int]) -> list[str]:
        return [r["modality"] for r in self._rows(ids)]

    def _tokens(self, row: dict[str, Any]) -> list[int]:
        if self.packed:
            if len(row["tokens"]) != self.text_len:
                raise ValueError(f"a packed row holds {len(row['tokens'])} tokens, but train.text_len is {self.text_len}")
            return row["tokens"]
        ids = [self.sp.bos_id(), *self.sp.encode(row["text"]), self.sp.eos_id()][: self.text_len]
        return ids + [self.pad_id] * (self.text_len - len(ids))

    def tokens(self, i: int) -> list[int]:
        return self._tokens(self._rows([i])[0])

    def batch(self, ids: Sequence[int], image_size: int, audio_samples: int) -> dict[str, Any]:
        """Tensors of rows `ids`; media decoded only for the rows that carry them. `modality` lists each row's."""
        rows = self._rows(ids)
        n = len(rows)
        images = torch.zeros(n, 3, image_size, image_size)
        audio = torch.zeros(n, audio_samples)
        has_image = torch.zeros(n, dtype=torch.bool)
        has_audio = torch.zeros(n, dtype=torch.bool)
        for j, r in enumerate(rows):
            if r["image"] is not None:
                img = Image.open(io.BytesIO(r["image"])).convert("RGB").resize((image_size, image_size))
                images[j] = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
                has_image[j] = True
            if r["audio"] is not None:
                a = torch.from_numpy(wav_samples(r["audio"])[:audio_samples])
                audio[j, : a.numel()] = a
                has_audio[j] = True
        tokens = torch.tensor([self._tokens(r) for r in rows], dtype=torch.long)  # (B, T)
        return {"tokens": tokens, "images": images, "audio": audio, "has_image": has_image, "has_audio": has_audio,
                "modality": [r["modality"] for r in rows]}


class Batches:
    """One rank's micro-batches by global sampler position, the next `depth` built ahead on a thread.

    The micro-step at global position P reads this rank's rows `sampler.rows(P + rank·micro,
    P + (rank+1)·micro)`; the next micro-step starts at P + micro·world."""

    def __init__(self, data: ShardDataset, sampler: Any, rank: int, world: int, micro: int, image_size: int,
                 audio_samples: int, depth: int = 2) -> None:
        self.data, self.sampler = data, sampler
        self.rank, self.world, self.micro = rank, world, micro
        self.image_size, self.audio_samples, self.depth = image_size, audio_samples, depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kai-data") if depth > 0 else None
        self._pending: dict[int, Future[dict[str, Any]]] = {}

    @property
    def pad_id(self) -> int:
        return self.data.pad_id

    def ids(self, position: int) -> list[int]:
        lo = position + self.rank * self.micro
        return self.sampler.rows(lo, lo + self.micro)

    def _make(self, position: int) -> dict[str, Any]:
        return self.data.batch(self.ids(position), self.image_size, self.audio_samples)

    def get(self, position: int) -> dict[str, Any]:
        """The batch at `position`; starts building the following ones."""
        fut = self._pending.pop(position, None)
        for p in [p for p in self._pending if p < position]:  # a jump (resume): drop what is not needed
            self._pending.pop(p).cancel()
        if self._pool is not None:
            stride = self.micro * self.world
            for k in range(1, self.depth + 1):
                q = position + k * stride
                if q not in self._pending:
                    self._pending[q] = self._pool.submit(self._make, q)
        return fut.result() if fut is not None else self._make(position)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pending.clear()
