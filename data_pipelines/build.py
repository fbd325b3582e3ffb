"""`kai-data`: the Hydra app that turns declared sources into attested training shards.

    kai-data --config-dir DIR data=NAME out_dir=OUT

Every source in `data.sources` is validated before any work (data_pipelines.sources). Then the
stages run in order (data_pipelines.stages): ingest → dedup → tokenizer → pack, each shard and the
tokenizer signed into `OUT/chain.jsonl` as it is written. Running the same command again after a
crash continues where the chain ends. Paths in statements are relative to `out_dir`, the future
bundle root; training reads `out_dir/data/shards`. Configs: kai_train/conf/kai_data.yaml (typed by
kai_train/conf/schema.py); `kai-data --help` lists the common overrides; kai_train.app runs the app
(one-line errors, multirun jobs in `out_dir/N`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from attest.chain import ChainWriter, set_aside_torn_tail
from attest.digest import sha256_file
from attest.progress import Progress
from attest.signers import ensure_public_key, make_signer
from attest.layout import CHAIN_NAME, KEYS_DIR, PUBLIC_KEY_NAME
from data_pipelines import demo_corpus, stages, tokenizer
from data_pipelines.dedup import DedupConfig
from data_pipelines.sources import Normalize, check_sources

STAGE_KEYS = ("shards", "normalize", "dedup", "tokenizer", "pack")
STAGES = ("ingest", "dedup", "tokenizer", "pack")


def build(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir)
    if Path(cfg.run_dir) != out:
        raise ValueError(f"run_dir={cfg.run_dir} differs from out_dir={out}: set out_dir only (run_dir follows it)")
    data: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    base = Path(data.get("base_dir") or os.getcwd())
    if data.get("generate") == "demo":
        demo_corpus.make_demo_corpus(base / "raw", seed=data["seed"], n_text=data["n_text"],
                                     n_image=data["n_image"], n_audio=data["n_audio"])
    sources = check_sources(data.get("sources") or [], base)
    # a data file may set any stage parameter for its corpus; it takes precedence over the defaults
    params = {k: {**OmegaConf.to_container(cfg[k], resolve=True), **(data.get(k) or {})} for k in STAGE_KEYS}
    norm = Normalize(**params["normalize"])
    dedup_cfg = DedupConfig(**params["dedup"])

    signer = make_signer(OmegaConf.to_container(cfg.attest, resolve=True))  # type: ignore[arg-type]
    ensure_public_key(signer, out / KEYS_DIR / PUBLIC_KEY_NAME)
    chain_path = out / CHAIN_NAME
    if chain_path.exists() and set_aside_torn_tail(chain_path):
        print(f"[kai-data] {chain_path}: set aside an interrupted final line (in chain.jsonl.torn)")
    # inline: one step per stage, the stages' log lines print above the bar; on datatrove, one step
    # per executor stage (data_pipelines.engine prints each stage's time)
    kind = cfg.executor.kind
    if kind not in ("inline", "local", "slurm"):
        raise ValueError(f"executor.kind must be inline, local or slurm, got {kind!r}")
    with Progress("kai-data stages", len(STAGES), "stages", cfg.progress) as bar:
        b = stages.Build(out, ChainWriter(chain_path, signer, cfg.run_id), params["shards"]["rows"],
                         params["shards"]["max_mb"], log=bar.note)
        if kind == "inline":
            ingested = stages.ingest_all(b, sources, norm, int(cfg.jobs))
            bar.advance()
            deduped = stages.dedup(b, sources, ingested, dedup_cfg)
            bar.advance()
            model = stages.tokenizer_stage(b, [n for s in sources for n in deduped[s.name]],
                                           Path(cfg.tokenizer_prefix), params["tokenizer"])
            bar.advance()
            packed = stages.pack(b, sources, deduped, tokenizer.load_tokenizer(model), params["pack"]["seq_len"],
                                 {"name": str(model.relative_to(out)), "sha256": sha256_file(model)})
            bar.advance()
        else:
            try:
                from data_pipelines import engine
            except ImportError as e:
                raise ValueError(f"executor.kind={kind} needs datatrove (pip install 'kai-train[train]'): {e}") from None
            plan = engine.Plan(out, sources, norm, dedup_cfg, int(cfg.executor.tasks), params["shards"],
                               params["tokenizer"], Path(cfg.tokenizer_prefix), params["pack"]["seq_len"],
                               OmegaConf.to_container(cfg.attest, resolve=True), cfg.run_id)  # type: ignore[arg-type]
            if kind == "slurm":
                if not out.is_absolute():
                    raise ValueError(f"out_dir={out}: executor.kind=slurm needs an absolute out_dir on a filesystem "
                                     "every node sees (the jobs do not run here)")
                submit = engine.write_slurm(plan, OmegaConf.to_container(cfg.executor.slurm, resolve=True))  # type: ignore[arg-type]
                print(f"[kai-data] sbatch scripts written; submit the stages in order with: bash {submit}")
                return
            sealed = engine.run_local(plan, b, int(cfg.executor.workers))
            bar.advance(len(STAGES))
            ingested, deduped, packed = ({s.name: [n for n in sealed[st] if b.recorded[n]["source"]["name"] == s.name]
                                          for s in sources} for st in ("ingest", "dedup", "pack"))
    for s in sources:
        removed = sum(sum(b.recorded[n]["counts"].values()) for n in deduped[s.name])
        dropped = sum(sum(b.recorded[n]["counts"].values()) for n in ingested[s.name])
        rows = sum(b.recorded[n]["rows"] for n in packed[s.name])
        print(f"[kai-data] {s.name}: {dropped} dropped at ingest, {removed} duplicates removed, "
              f"{rows} packed rows in {len(packed[s.name])} shards")


def main() -> None:
    from kai_train.app import run

    run("kai-data", "kai_data", build, "out_dir", errors=(ValueError, OSError))  # the readers' and stages' bad-input ValueErrors


if __name__ == "__main__":
    main()
