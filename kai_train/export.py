"""Export: safetensors weights (sharded as Hugging Face does) + config.json + tokenizer in RUN_DIR/export/.

Made by the trainer at the end of training, just before it records the release (which names every
file of export/ as a subject and signs the folder in the OpenSSF model-signing format, see
kai_train.provenance.record_release), and on demand from any checkpoint in the chain:

    python -m kai_train.export RUN_DIR [--step N] [--out DIR]

The weights are the checkpoint's own signed files, hard-linked (copied across file systems): one file becomes
`model.safetensors`; a checkpoint written by several ranks becomes `model-00001-of-0000N.safetensors` …
with `model.safetensors.index.json`, the Hugging Face convention for sharded weights. No process
consolidates the model. export/llama/ holds the text decoder as a standard Llama folder: its
model.safetensors is computed from those files by attest.llama (RoPE rows permuted, the absent-modality
vectors as two extra tokens), its tokenizer.json rendered from the tokenizer. Every other file (config.json, generation_config.json, tokenizer_config.json,
the model card, the model and tokenizer code) is rendered from the chain by attest.release, the same
renderer the verifier runs to compare export/ byte for byte; the tokenizer is the one the run config
names, which a `tokenizer` statement declares.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from attest.chain import read_chain
from attest.digest import read_safetensors_index, safetensors_root
from attest.llama import Weights
from attest.layout import CHAIN_NAME, EXPORT_CODE_FILES, EXPORT_DIR, EXPORT_LLAMA_DIR
from attest.release import (  # noqa: F401 - the names users of this module know
    CARD_NAME,
    CONFIG_NAME,
    EXPORT_FORMAT,
    FORMAT1_OPTIONAL,
    GENERATION_CONFIG_NAME,
    INDEX_NAME,
    MODEL_NAME,
    TOKENIZER_CONFIG_NAME,
    TOKENIZER_NAME,
    export_config,
    model_card,
    render,
    shard_file,
)

# the model code transformers loads with trust_remote_code, copied byte for byte from this package
CODE_FILES = EXPORT_CODE_FILES


def own_code(name: str) -> bytes | None:
    """This package's kai_train/NAME, the code export/ carries."""
    try:
        return (Path(__file__).resolve().parent / name).read_bytes()
    except OSError:
        return None


def export(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write export/ of checkpoint `step` (default: the last) into `out` (default RUN_DIR/export):
    the files attest.release renders from the chain, the checkpoint's weight files and the tokenizer."""
    entries, _ = read_chain(run_dir / CHAIN_NAME)
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
    weights = sorted((s["name"], s["digest"]["sha256"]) for s in subjects[step] if s["name"].endswith(".safetensors")
                     and not s["name"].rsplit("/", 1)[1].startswith("optimizer"))
    srcs = [run_dir / n for n, _ in weights]
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
    tok = None
    if tokenizer.is_file():
        import hashlib

        data = tokenizer.read_bytes()
        tok = (data, hashlib.sha256(data).hexdigest())
    tensors = [read_safetensors_index(src) for src in srcs]
    heads = [(sha, [(t.name, t.end - t.start) for t in ts]) for ts, (_, sha) in zip(tensors, weights)]
    signed = any(s["name"].endswith("/model.sig") for subs in subjects.values() for s in subs)
    rendered = render(entries, step, heads, tok, own_code, signed, tensors=tensors)
    if rendered.problems:
        raise ValueError(f"{out}: cannot render the export: {'; '.join(rendered.problems)}")
    out.mkdir(parents=True, exist_ok=True)
    # what an earlier export of another layout or format wrote (a user's other files in --out stay)
    for old in [*out.glob("model*.safetensors"), out / INDEX_NAME, out / TOKENIZER_NAME, *(out / n for n in FORMAT1_OPTIONAL)]:
        old.unlink(missing_ok=True)
    llama_dir = out / EXPORT_LLAMA_DIR  # rendered whole each time
    if llama_dir.is_dir() and not llama_dir.is_symlink():
        shutil.rmtree(llama_dir)
    write_weights(srcs, out)
    for name in rendered.copies:
        if name.endswith(TOKENIZER_NAME) and tok is not None:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tokenizer, out / name)
    for name, data in rendered.files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    for name, derived in rendered.derived.items():
        write_derived(derived, srcs, out / name)
    return out


def write_derived(derived: Weights, srcs: list[Path], dst: Path) -> None:
    """A file attest.llama computes from the weight files `srcs` (read by byte range), written whole."""
    handles = [p.open("rb") for p in srcs]
    try:
        def read(i: int, offset: int, length: int) -> bytes:
            handles[i].seek(offset)
            return handles[i].read(length)

        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        with tmp.open("wb") as f:
            for chunk in derived.chunks(read):
                f.write(chunk)
        tmp.replace(dst)
    finally:
        for h in handles:
            h.close()


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when `dst` is on the same file system (no bytes copied, the signed file itself),
    else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_weights(srcs: list[Path], out: Path) -> None:
    """The checkpoint's weight files in `out`: one as model.safetensors, several as Hugging Face
    shards (their index is rendered with the other files)."""
    if len(srcs) == 1:
        link_or_copy(srcs[0], out / MODEL_NAME)
        return
    for i, src in enumerate(srcs):
        link_or_copy(src, out / shard_file(i, len(srcs)))


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
