"""Data pipelines: raw sources → Parquet shards with manifests → tokenizer → sampler.

- `demo_corpus`  writes a small self-collected multimodal corpus (text, images, audio) from a seed.
- `shards`       reads raw sources and writes deterministic Parquet shards, each with a manifest
                 (sha256, row counts, schema, source licence/consent) that the provenance chain signs.
- `tokenizer`    trains a byte-fallback SentencePiece model on the shards' text, reproducibly.
- `sampler`      maps (seed, epoch, step, rank) to row ids: deterministic, resumable, distributed.

`data_pipelines.build` is the Hydra app that wires these together (`kai-data`).
"""
