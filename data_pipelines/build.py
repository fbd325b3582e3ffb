"""`kai-data`: the Hydra app that turns declared sources into attested shards and a tokenizer.

Sources are validated before any work (every provenance field present, path exists); then each
source is ingested into Parquet shards with manifests, the tokenizer is trained on the shards,
and a signed `data-shard` statement per shard and a `tokenizer` statement are appended to the
run's chain. Paths in statements are relative to `run_dir`, the future bundle root.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from attest.chain import ChainWriter
from attest.digest import sha256_file
from attest.signers import ensure_public_key, make_signer
from attest.signing import PUBLIC_KEY_NAME
from attest.statements import subject
from data_pipelines import demo_corpus, shards, tokenizer

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class SourceError(ValueError):
    """A declared source is incomplete or points nowhere."""


def check_sources(sources: list[dict[str, Any]], run_dir: Path) -> list[tuple[dict[str, Any], Path]]:
    out = []
    for i, src in enumerate(sources):
        name = src.get("name", f"#{i}")
        for key in ("name", "kind", "path", *shards.SOURCE_KEYS):
            if src.get(key) in (None, ""):
                raise SourceError(f"source {name!r}: missing required field {key!r}")
        if src["kind"] not in shards.READERS:
            raise SourceError(f"source {name!r}: unknown kind {src['kind']!r} (known: {sorted(shards.READERS)})")
        path = Path(src["path"]) if Path(src["path"]).is_absolute() else run_dir / src["path"]
        out.append((src, path))
    return out


def build(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    data: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    sources = check_sources(data["sources"], run_dir)
    if data.get("generate") == "demo":
        demo_corpus.make_demo_corpus(run_dir / "raw", seed=data["seed"], n_text=data["n_text"],
                                     n_image=data["n_image"], n_audio=data["n_audio"])
    for src, path in sources:
        if not path.exists():
            raise SourceError(f"source {src['name']!r}: path {path} does not exist")
    signer = make_signer(OmegaConf.to_container(cfg.attest, resolve=True))  # type: ignore[arg-type]
    ensure_public_key(signer, run_dir / "keys" / PUBLIC_KEY_NAME)
    chain = ChainWriter(run_dir / "chain.jsonl", signer, cfg.run_id)
    out_dir = Path(cfg.out_dir)
    written: list[Path] = []
    for src, path in sources:
        for shard, manifest in shards.write_shards(shards.read_source(src["kind"], path), out_dir, src["name"],
                                                   data["rows_per_shard"], src):
            man = shards.manifest_path(shard)
            chain.append("data-shard",
                         [subject(str(shard.relative_to(run_dir)), manifest["sha256"]),
                          subject(str(man.relative_to(run_dir)), sha256_file(man))],
                         {"manifest": manifest})
            written.append(shard)
            print(f"[kai-data] {shard.relative_to(run_dir)}: {manifest['rows']} rows from {src['name']} ({src['license']})")
    model, params = tokenizer.train_tokenizer(written, Path(cfg.tokenizer_prefix), data["vocab_size"],
                                              data.get("tokenizer_sentences"))
    chain.append("tokenizer", [subject(str(model.relative_to(run_dir)), sha256_file(model))],
                 {"trainer": f"sentencepiece {metadata.version('sentencepiece')}", "params": params,
                  "trained_on": [{"name": str(p.relative_to(run_dir)), "sha256": sha256_file(p)} for p in written]})
    print(f"[kai-data] tokenizer {model.relative_to(run_dir)} ({params.get('sentences')} sentences)")


@hydra.main(config_path=CONF_DIR, config_name="kai_data", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        build(cfg)
    except (SourceError, ValueError) as e:
        print(f"kai-data: error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
