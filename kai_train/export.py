"""Export: consolidated safetensors + config.json + tokenizer in RUN_DIR/export/.

Made at the end of training, and on demand from any checkpoint in the chain:

    python -m kai_train.export RUN_DIR [--step N] [--out DIR]

The weights are the checkpoint's consolidated file, so the export's canonical digest is the one
the chain records; config.json names it and the chain head at export time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from attest.chain import read_chain
from attest.digest import safetensors_root


def export(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    entries, _ = read_chain(run_dir / "chain.jsonl")
    genesis = next((e.predicate for e in entries if e.kind == "genesis"), None)
    ckpts = {e.predicate["step"]: e.predicate for e in entries if e.kind == "checkpoint"}
    if genesis is None or not ckpts:
        raise ValueError(f"{run_dir / 'chain.jsonl'}: no checkpoint recorded yet")
    step = max(ckpts) if step is None else step
    if step not in ckpts:
        raise ValueError(f"{run_dir / 'chain.jsonl'}: no checkpoint at step {step} (have {sorted(ckpts)})")
    src = run_dir / f"checkpoints/step-{step:06d}/model.safetensors"
    root = safetensors_root([src])
    if root != ckpts[step]["weights_root"]:
        raise ValueError(f"{src}: canonical digest {root[:16]}… differs from the chain's {ckpts[step]['weights_root'][:16]}…")
    out = out or run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, out / "model.safetensors")
    tokenizer = run_dir / "tokenizer/tokenizer.model"
    if tokenizer.exists():
        shutil.copy2(tokenizer, out / "tokenizer.model")
    config: dict[str, Any] = {
        "architecture": "kai-train MultimodalLM",
        "model": genesis["recipe"]["model"],
        "step": step,
        "weights_root": root,
        "run_id": entries[0].predicate.get("run_id"),
        "chain_head": entries[-1].digest,
        "tokenizer": "tokenizer.model" if tokenizer.exists() else None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


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
