"""Data pipelines: declared sources → attested, packed Parquet training shards → sampler.

- `sources`      validates declared sources (SPDX licence, provenance fields, paths) and streams them
                 as normalized records (text NFC, images to fixed-size PNG, audio resampled).
- `shards`       deterministic Parquet shards, each with a manifest the provenance chain signs.
- `dedup`        exact (content hash) and near-duplicate (MinHash LSH) removal.
- `tokenizer`    trains a byte-fallback SentencePiece model on a declared sample, reproducibly.
- `pack`         fixed-length token rows with `<image>`/`<audio>` placeholders.
- `stages`       ingest → dedup → pack, streaming, resumable from the chain, signed as written.
- `sampler`      maps (seed, epoch, step, rank) to row ids: deterministic, resumable, distributed.
- `demo_corpus`  writes a small self-collected multimodal corpus (text, images, audio) from a seed.

`data_pipelines.build` is the Hydra app that wires these together (`kai-data`; docs/data.md).
"""
