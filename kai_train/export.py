"""Export: safetensors weights (sharded as Hugging Face does) + config.json + tokenizer in RUN_DIR/export/.

Made by the trainer at the end of training, just before it records the release (which names every
file of export/ as a subject and signs the folder in the OpenSSF model-signing format, see
kai_train.provenance.record_release), and on demand from any checkpoint in the chain:

    python -m kai_train.export RUN_DIR [--step N] [--out DIR]

The weights are the checkpoint's own signed files, hard-linked (copied across file systems): one file becomes
`model.safetensors`; a checkpoint written by several ranks becomes `model-00001-of-0000N.safetensors` …
with `model.safetensors.index.json` (`weight_map`: tensor -> file), the Hugging Face convention for
sharded weights. No process consolidates the model, and the export's canonical digest is the one
the chain records. config.json holds the model config a user loads (the genesis recipe's), the
step, that digest, the run id and the tokenizer file's name: facts the chain signs, so exporting
the same checkpoint again gives the same bytes. The tokenizer
is the one the run statement's config names (`tokenizer`), which is the one a `tokenizer`
statement declares.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from attest.chain import read_chain
from attest.digest import safetensors_root

EXPORT_DIR = "export"
MODEL_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.model"


def export_config(model: dict[str, Any] | None, step: int, weights_root: str, run_id: Any,
                  tokenizer: str | None) -> str:
    """The bytes of export/config.json (the verifier parses them; keys and order are fixed here)."""
    config: dict[str, Any] = {
        "architecture": "kai-train MultimodalLM",
        "model": model,
        "step": step,
        "weights_root": weights_root,
        "run_id": run_id,
        "tokenizer": tokenizer,
    }
    return json.dumps(config, indent=2) + "\n"


def export(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write model.safetensors, config.json and the run's tokenizer into `out` (default RUN_DIR/export)."""
    entries, _ = read_chain(run_dir / "chain.jsonl")
    released = [e.predicate.get("step") for e in entries if e.kind == "release"]
    entries = [e for e in entries if e.kind != "release"]  # the export a release names is made before it
    genesis = next((e.predicate for e in entries if e.kind == "genesis"), None)
    run = next((e.predicate for e in entries if e.kind == "run"), None)
    ckpts = {e.predicate["step"]: e.predicate for e in entries if e.kind == "checkpoint"}
    subjects = {e.predicate["step"]: e.statement["subject"] for e in entries if e.kind == "checkpoint"}
    if genesis is None or not ckpts:
        raise ValueError(f"{run_dir / 'chain.jsonl'}: no checkpoint recorded yet")
    step = max(ckpts) if step is None else step
    if step not in ckpts:
        raise ValueError(f"{run_dir / 'chain.jsonl'}: no checkpoint at step {step} (have {sorted(ckpts)})")
    names = [s["name"] for s in subjects[step] if s["name"].endswith(".safetensors")
             and not s["name"].rsplit("/", 1)[1].startswith("optimizer")]
    srcs = [run_dir / n for n in sorted(names)]
    root = safetensors_root(srcs)
    if root != ckpts[step]["weights_root"]:
        raise ValueError(f"{srcs[0].parent}: canonical digest {root[:16]}… differs from the chain's "
                         f"{ckpts[step]['weights_root'][:16]}…")
    run_cfg = (run or {}).get("config")
    tok_name = run_cfg.get("tokenizer") if isinstance(run_cfg, dict) else None
    tokenizer = run_dir / tok_name if isinstance(tok_name, str) and tok_name else run_dir / "tokenizer/tokenizer.model"
    out = out or run_dir / EXPORT_DIR
    if released and step != released[-1] and out.resolve() == (run_dir / EXPORT_DIR).resolve():
        raise ValueError(f"{out}: holds the signed release of step {released[-1]}; export step {step} elsewhere (--out DIR)")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / INDEX_NAME]:  # an earlier export of another layout
        old.unlink(missing_ok=True)
    write_weights(srcs, out)
    if tokenizer.is_file():
        shutil.copy2(tokenizer, out / TOKENIZER_NAME)
    recipe = genesis.get("recipe")
    model = recipe.get("model") if isinstance(recipe, dict) else None  # verify fails a release without one
    (out / CONFIG_NAME).write_text(export_config(model, step, root, entries[0].predicate.get("run_id"),
                                                 TOKENIZER_NAME if tokenizer.is_file() else None))
    return out


def shard_file(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when `dst` is on the same file system (no bytes copied, the signed file itself),
    else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_weights(srcs: list[Path], out: Path) -> None:
    """The checkpoint's weight files in `out`: one as model.safetensors, several as Hugging Face
    shards with their index."""
    from attest.digest import read_safetensors_index

    if len(srcs) == 1:
        link_or_copy(srcs[0], out / MODEL_NAME)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, src in enumerate(srcs):
        name = shard_file(i, len(srcs))
        link_or_copy(src, out / name)
        for t in read_safetensors_index(out / name):
            weight_map[t.name] = name
            total += t.end - t.start
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kai_train.export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--step", type=int, help="checkpoint step (default: the last)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/export)")
    a = p.parse_args(argv)
    try:
        out = export(a.run_dir, a.step, a.out)
    except (ValueError, OSError) as e:
        print(f"kai-train export: error: {e}", file=sys.stderr)
        return 2
    print(f"export: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
