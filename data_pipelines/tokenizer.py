"""A SentencePiece tokenizer trained on our own shards, reproducibly.

The tokenizer is part of the provenance chain (its sha256 is recorded next to the shards it was
trained on), so the same shards must give a byte-identical `.model` file. That takes:

- one thread and no sentence sampling or shuffling (`input_sentence_size=0`,
  `shuffle_input_sentence=False`), so the trainer sees the same sentences in the same order;
- feeding sentences from memory and receiving the model through `model_writer`: the serialized
  TrainerSpec records the input file name and model prefix, so training from a temp file would
  bake a random path into the model bytes.

The sample is declared, not drawn: every `every`-th non-empty text row of the given shards, in
order, up to `max_sentences` (rule `kai-tok-sample/v1`). The tokenizer statement records the
sample parameters, the rule and a digest of the sample, so that `retrain` (what
`kai-attest verify --replay-data` calls) can train the same file again from the bundle's shards. `<image>` and `<audio>` are user-defined pieces: the placeholders
packed rows put where an encoder's prefix goes (data_pipelines.pack).

byte_fallback=True means no text is ever <unk>: Hangul syllables that miss the vocabulary fall back
to UTF-8 bytes. `hard_vocab_limit=False` lets a small corpus produce fewer pieces than asked for;
read the real size from `load_tokenizer(path).get_piece_size()`, not from the config.
"""

from __future__ import annotations

import hashlib
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


# SentencePiece arguments besides vocab_size, fixed by this version (determinism: one thread, no
# sampling or shuffling). The tokenizer statement records them; `retrain` accepts no others.
TRAINER_ARGS: dict[str, Any] = {
    "model_type": "unigram",
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
# How the training sample is drawn from the shards (shard_texts), recorded so that a verifier knows
# which rule to apply to the recorded `sample` parameters.
SAMPLE_RULE = "kai-tok-sample/v1"
MAX_VOCAB = 1 << 20


def sample_digest(texts: list[str]) -> str:
    """sha256 of the training sample: each sentence UTF-8 encoded and followed by a newline."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    return h.hexdigest()


def _train_bytes(texts: list[str], params: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, minloglevel=2, **params)
    return buf.getvalue()


def train_tokenizer(shard_paths: list[Path], out_prefix: Path, vocab_size: int = 512,
                    max_sentences: int | None = None, every: int = 1) -> tuple[Path, dict[str, Any]]:
    """Train on the shards' text; writes `<out_prefix>.model`, returns (path, params).

    `params` holds the SentencePiece training args used plus what a verifier needs to train it
    again (`retrain`): `sentences` (how many were trained on), `sample` ({every, max_sentences}),
    `sample_rule` (SAMPLE_RULE) and `sample_sha256` (sample_digest of the sentences).

    The sample (`max_sentences`, `every`; see `shard_texts`) is deterministic, unlike SentencePiece's
    own random `input_sentence_size` sampling.
    """
    texts = shard_texts([Path(p) for p in shard_paths], max_sentences, every)
    if not texts:
        raise ValueError(f"no text found in shards {[str(p) for p in shard_paths]}")
    params: dict[str, Any] = {"vocab_size": vocab_size, **TRAINER_ARGS}
    data = _train_bytes(texts, params)
    out = Path(f"{out_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, {**params, "sentences": len(texts), "sample": {"every": every, "max_sentences": max_sentences},
                 "sample_rule": SAMPLE_RULE, "sample_sha256": sample_digest(texts)}


def retrain(shard_paths: list[Path], recorded: dict[str, Any]) -> tuple[bytes, int, str]:
    """Train again from a tokenizer statement's recorded `params` on the shards it names (in its
    `trained_on` order): returns (model bytes, sentences, sample sha256). Only `vocab_size` and the
    sample parameters come from the record; every other SentencePiece argument must be this
    version's (TRAINER_ARGS), so a bundle never chooses what the trainer is called with.
    ValueError names the parameter that is missing or not accepted."""
    if not isinstance(recorded, dict):
        raise ValueError("params: not a mapping")
    if recorded.get("sample_rule") != SAMPLE_RULE:
        raise ValueError(f"params.sample_rule {str(recorded.get('sample_rule'))[:40]!r}: this version applies {SAMPLE_RULE}")
    for k, v in TRAINER_ARGS.items():
        if recorded.get(k) != v or type(recorded.get(k)) is not type(v):
            raise ValueError(f"params.{k} {str(recorded.get(k))[:40]!r}: this version trains with {v!r}")
    extra = sorted(set(recorded) - set(TRAINER_ARGS) - {"vocab_size", "sentences", "sample", "sample_rule", "sample_sha256"})
    if extra:
        raise ValueError(f"params {extra}: not parameters this version knows")
    vocab = recorded.get("vocab_size")
    sample = recorded.get("sample")
    every = sample.get("every") if isinstance(sample, dict) else None
    most = sample.get("max_sentences") if isinstance(sample, dict) else None
    if not _int(vocab) or not 0 < vocab <= MAX_VOCAB:
        raise ValueError(f"params.vocab_size {str(vocab)[:40]!r}: expected an integer in 1..{MAX_VOCAB}")
    if not _int(every) or every < 1 or not (most is None or (_int(most) and most >= 1)):
        raise ValueError(f"params.sample {str(sample)[:80]!r}: expected every >= 1 and max_sentences >= 1 or null")
    texts = shard_texts(list(shard_paths), most, every)
    if not texts:
        raise ValueError("the declared sample holds no text")
    try:
        model = _train_bytes(texts, {"vocab_size": vocab, **TRAINER_ARGS})
    except RuntimeError as e:  # sentencepiece refuses, e.g., a vocabulary the sample cannot fill
        raise ValueError(f"params.vocab_size {vocab}: sentencepiece refused to train ({str(e)[:120]})") from None
    return model, len(texts), sample_digest(texts)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    """Load a trained `.model` file."""
    return spm.SentencePieceProcessor(model_file=str(path))
