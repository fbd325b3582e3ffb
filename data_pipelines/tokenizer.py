"""A SentencePiece tokenizer trained on our own shards, reproducibly.

The tokenizer is part of the provenance chain (its sha256 is recorded next to the shards it was
trained on), so the same shards must give a byte-identical `.model` file. That takes:

- one thread and no sentence sampling or shuffling (`input_sentence_size=0`,
  `shuffle_input_sentence=False`), so the trainer sees the same sentences in the same order;
- feeding sentences from memory and receiving the model through `model_writer`: the serialized
  TrainerSpec records the input file name and model prefix, so training from a temp file would
  bake a random path into the model bytes.

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

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def shard_texts(shard_paths: list[Path], limit: int | None = None) -> list[str]:
    """The `text` column of the shards in the given order, at most `limit` non-empty lines."""
    texts: list[str] = []
    for path in shard_paths:
        for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
            # SentencePiece trains on lines: a newline inside a caption would split it.
            line = " ".join(text.split()) if text else ""
            if line:
                texts.append(line)
                if limit is not None and len(texts) >= limit:
                    return texts
    return texts


def train_tokenizer(shard_paths: list[Path], out_prefix: Path, vocab_size: int = 512,
                    seed_sentences: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Train on the shards' text; writes `<out_prefix>.model`, returns (path, params).

    `params` holds the SentencePiece training args used plus `sentences`, the number trained on.

    `seed_sentences` caps how many sentences are used, taken from the start of the shards in order
    (deterministic, unlike SentencePiece's own random `input_sentence_size` sampling); None = all.
    """
    texts = shard_texts([Path(p) for p in shard_paths], seed_sentences)
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
    return out, {**params, "sentences": len(texts)}


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    """Load a trained `.model` file."""
    return spm.SentencePieceProcessor(model_file=str(path))
