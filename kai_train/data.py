"""Training batches from attested Parquet shards: rows by id, decoded into tensors.

The row ids come from `data_pipelines.sampler`; this module only turns ids into tensors. Shards
are read with pyarrow in the order given (the run records that order and each shard's digest),
so row id i means the same row on every rank and in every replay.

Packed shards (data_pipelines.pack: a `tokens` column of exactly text_len ids) are used as they
are; record shards (a `text` column) are tokenized here as `<bos> text <eos>`, cut and padded.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
import torch
from PIL import Image

from data_pipelines.shards import wav_samples


class ShardDataset:
    def __init__(self, shard_paths: list[Path], tokenizer_path: Path, text_len: int) -> None:
        if not shard_paths:
            raise ValueError("no data shards given")
        tables = [pq.read_table(p) for p in shard_paths]
        kinds = {"tokens" in t.schema.names for t in tables}
        if len(kinds) > 1:
            raise ValueError(f"shards {[str(p) for p in shard_paths]} mix packed and record shards")
        self.packed = kinds.pop()
        for path, t in zip(shard_paths, tables):
            if self.packed and t.num_rows and (n := len(t.column("tokens")[0])) != text_len:
                raise ValueError(f"{path}: packed rows hold {n} tokens, but train.text_len is {text_len}")
        table = pa.concat_tables([t.select(["modality", "tokens" if self.packed else "text", "image", "audio"])
                                  for t in tables])
        self.modality = table.column("modality").to_pylist()
        self.text = table.column("tokens" if self.packed else "text").to_pylist()
        self.image = table.column("image").combine_chunks().flatten()[0].to_pylist()  # PNG bytes or None
        self.audio = table.column("audio").combine_chunks().flatten()[0]  # WAV bytes, decoded per batch
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        self.text_len = text_len
        self.pad_id = max(self.sp.pad_id(), 0)

    def __len__(self) -> int:
        return len(self.modality)

    def tokens(self, i: int) -> list[int]:
        if self.packed:
            return self.text[i]
        ids = [self.sp.bos_id(), *self.sp.encode(self.text[i]), self.sp.eos_id()][: self.text_len]
        return ids + [self.pad_id] * (self.text_len - len(ids))

    def batch(self, ids: list[int], image_size: int, audio_samples: int) -> dict[str, torch.Tensor]:
        n = len(ids)
        images = torch.zeros(n, 3, image_size, image_size)
        audio = torch.zeros(n, audio_samples)
        has_image = torch.zeros(n, dtype=torch.bool)
        has_audio = torch.zeros(n, dtype=torch.bool)
        for j, i in enumerate(ids):
            if self.image[i] is not None:
                img = Image.open(io.BytesIO(self.image[i])).convert("RGB").resize((image_size, image_size))
                images[j] = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
                has_image[j] = True
            wav = self.audio[i].as_py()
            if wav is not None:
                a = torch.from_numpy(wav_samples(wav)[:audio_samples])
                audio[j, : a.numel()] = a
                has_audio[j] = True
        tokens = torch.tensor([self.tokens(i) for i in ids], dtype=torch.long)  # (B, T)
        return {"tokens": tokens, "images": images, "audio": audio, "has_image": has_image, "has_audio": has_audio}
