"""A SentencePiece tokenizer trained on our own shards, reproducibly.

The tokenizer is part of the provenance chain (its sha256 is recorded next to the shards it was
trained on), so the same shards must give a byte-identical `.model` file. That takes:

- one thread and no sentence sampling or shuffling (`input_sentence_size=0`,
  `shuffle_input_sentence=False`), so the trainer sees the same sentences in the same order;
- feeding sentences from memory and receiving the model through `model_writer`: the serialized
  TrainerSpec records the input file name and model prefix, so training from a temp file would
  bake a random path into the model bytes.

The sample is declared, not drawn: every `every`-th non-empty text row of the given shards, in
order, up to `max_sentences`. `<image>` and `<audio>` are user-defined pieces: the placeholders
packed rows put where an encoder's prefix goes (data_pipelines.pack).

byte_fallback=True means no text is ever <unk>: Hangul syllables that miss the vocabulary fall back
to UTF-8 bytes. `hard_vocab_limit=False` lets a small corpus produce fewer pieces than asked for;
read the real size from `load_tokenizer(path).get_piece_size()`, not from the config.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import sentencepiece as spm

from data_pipelines.pack import PLACEHOLDERS

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def shard_texts(shard_paths: list[Path], limit: int | None = None, every: int = 1) -> list[str]:
    """Every `every`-th non-empty line of the shards' `text` column, in order, at most `limit`."""
    if every < 1:
        raise ValueError(f"tokenizer.every must be >= 1, got {every}")
    texts: list[str] = []
    seen = 0
    for path in shard_paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
            for text in batch.column(0).to_pylist():
                # SentencePiece trains on lines: a newline inside a document would split it.
                line = " ".join(text.split()) if text else ""
                if not line:
                    continue
                seen += 1
                if (seen - 1) % every:
                    continue
                texts.append(line)
                if limit is not None and len(texts) >= limit:
                    return texts
    return texts


def train_tokenizer(shard_paths: list[Path], out_prefix: Path, vocab_size: int = 512,
                    max_sentences: int | None = None, every: int = 1) -> tuple[Path, dict[str, Any]]:
    """Train on the shards' text; writes `<out_prefix>.model`, returns (path, params).

    `params` holds the SentencePiece training args used plus `sentences`, the number trained on.

    The sample (`max_sentences`, `every`; see `shard_texts`) is deterministic, unlike SentencePiece's
    own random `input_sentence_size` sampling.
    """
    texts = shard_texts([Path(p) for p in shard_paths], max_sentences, every)
    if not texts:
        raise ValueError(f"no text found in shards {[str(p) for p in shard_paths]}")
    params: dict[str, Any] = {
        "model_type": "unigram",
        "vocab_size": vocab_size,
        "hard_vocab_limit": False,
        "character_coverage": 0.9995,  # rare characters go to byte fallback, Hangul stays covered
        "byte_fallback": True,
        "normalization_rule_name": "nmt_nfkc",
        "split_digits": True,  # each digit its own piece, so arithmetic text is not memorized as words
        "user_defined_symbols": list(PLACEHOLDERS),
        "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
        "num_threads": 1,
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        "max_sentence_length": 4192,
    }
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf,
                                   minloglevel=2, **params)
    out = Path(f"{out_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, {**params, "sentences": len(texts), "sample": {"every": every, "max_sentences": max_sentences}}


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    """Load a trained `.model` file."""
    return spm.SentencePieceProcessor(model_file=str(path))
