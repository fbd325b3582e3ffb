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
from attest.layout import CHAIN_NAME, EXPORT_AUTO_MAP, EXPORT_CODE_FILES, EXPORT_DIR, EXPORT_TOKENIZER_AUTO_MAP

MODEL_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.model"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
CARD_NAME = "README.md"
# the model code transformers loads with trust_remote_code, copied byte for byte from this package
CODE_FILES = EXPORT_CODE_FILES


def export_config(model: dict[str, Any] | None, step: int, weights_root: str, run_id: Any,
                  tokenizer: str | None, special: dict[str, int] | None = None) -> str:
    """The bytes of export/config.json (the verifier parses them; keys and order are fixed here):
    the chain's facts, then what transformers reads (model_type, auto_map, token ids)."""
    config: dict[str, Any] = {
        "architecture": "kai-train MultimodalLM",
        "model": model,
        "step": step,
        "weights_root": weights_root,
        "run_id": run_id,
        "tokenizer": tokenizer,
        "model_type": "kai_multimodal",
        "architectures": ["KaiForCausalLM"],
        "auto_map": EXPORT_AUTO_MAP,
        "vocab_size": (model or {}).get("vocab_size"),
        "max_position_embeddings": (model or {}).get("max_seq_len"),
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "use_cache": False,
        **(special or {}),
    }
    return json.dumps(config, indent=2) + "\n"


def export(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write model.safetensors, config.json and the run's tokenizer into `out` (default RUN_DIR/export)."""
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
    special = hf_files(out, model or {}, tokenizer.is_file())
    (out / CONFIG_NAME).write_text(export_config(model, step, root, entries[0].predicate.get("run_id"),
                                                 TOKENIZER_NAME if tokenizer.is_file() else None, special))
    (out / CARD_NAME).write_text(model_card(entries, step, root, model or {}, run_cfg if isinstance(run_cfg, dict) else {},
                                            genesis))
    return out


def hf_files(out: Path, model: dict[str, Any], has_tokenizer: bool) -> dict[str, int]:
    """The small files transformers reads beside the weights: the model code (auto_map),
    generation_config.json and tokenizer_config.json. Returns the special token ids for config.json."""
    here = Path(__file__).resolve().parent
    for name in CODE_FILES:
        shutil.copyfile(here / name, out / name)
    special: dict[str, int] = {}
    if has_tokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(out / TOKENIZER_NAME))
        ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
        special = {f"{k}_token_id": v for k, v in ids.items() if k != "unk" and v >= 0}
        tok_cfg: dict[str, Any] = {
            "tokenizer_class": "KaiTokenizer",  # sentencepiece's own encoding (kai_train/tokenization_kai.py)
            "auto_map": EXPORT_TOKENIZER_AUTO_MAP,
            "model_max_length": model.get("max_seq_len"),
            "clean_up_tokenization_spaces": False, "legacy": True,  # sentencepiece encodes the text as it is
            **{f"{k}_token": sp.id_to_piece(v) for k, v in ids.items() if v >= 0},
        }
        (out / TOKENIZER_CONFIG_NAME).write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen = {"do_sample": False, "use_cache": False, "max_new_tokens": 16, **special}
    (out / GENERATION_CONFIG_NAME).write_text(json.dumps(gen, indent=2) + "\n")
    return special


def model_card(entries: list[Any], step: int, root: str, model: dict[str, Any], run_cfg: dict[str, Any],
               genesis: dict[str, Any]) -> str:
    """export/README.md, a Hugging Face model card: licence, the training data by source and
    licence, parameter counts, the chain head, the weights root and how to verify. Every fact comes
    from the signed chain (exporting the same checkpoint again gives the same bytes)."""
    license_ = run_cfg.get("license") or "other"
    sources: dict[tuple[str, str], list[int]] = {}
    for e in entries:  # ingest shards (derived from nothing): the declared sources
        m = e.predicate.get("manifest") if e.kind == "data-shard" else None
        if isinstance(m, dict) and not m.get("derived_from") and isinstance(m.get("source"), dict):
            src = m["source"]
            row = sources.setdefault((str(src.get("name")), str(src.get("license"))), [0, 0])
            row[0] += 1
            row[1] += int(m.get("rows") or 0)
    counts: dict[str, int] = {}
    for name, t in (genesis.get("tensors") or {}).items():
        n = 1
        for d in t.get("shape", []):
            n *= int(d)
        part = {"text": "text decoder", "vision": "image encoder", "speech": "speech encoder"}.get(
            name.split(".", 1)[0], "absent-modality vectors")
        counts[part] = counts.get(part, 0) + n
    head = entries[-1].digest
    licences = sorted({lic for _, lic in sources})
    lines = [
        "---",
        f"license: {license_.lower() if license_ != 'other' else 'other'}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [kai-train, from-scratch, provenance]",
        "---",
        "",
        f"# {run_cfg.get('run_id') or entries[0].predicate.get('run_id')} (kai-train, step {step})",
        "",
        "A multimodal language model (Llama-style text decoder, ViT image encoder, log-mel speech encoder) "
        "trained from freshly initialized weights with kai-train. Every data shard, the tokenizer, the initial "
        "weights and every checkpoint are recorded in a signed, hash-linked provenance chain.",
        "",
        "## Licence",
        "",
        f"Model: `{license_}`" + ("" if run_cfg.get("license") else " (the run config names none)") +
        f". Training data licences: {', '.join(f'`{x}`' for x in licences) or 'none recorded'}.",
        "",
        "## Training data (by source and licence)",
        "",
        "| source | licence | shards | rows |",
        "|---|---|---|---|",
        *[f"| {n} | {lic} | {sh} | {rows} |" for (n, lic), (sh, rows) in sorted(sources.items())],
        "",
        "## Parameters",
        "",
        "| part | parameters |",
        "|---|---|",
        *[f"| {part} | {n:,} |" for part, n in sorted(counts.items())],
        f"| total | {sum(counts.values()):,} |",
        "",
        "## Provenance",
        "",
        f"- weights root (canonical digest of the released weights): `{root}`",
        f"- chain head (sha256 of the last chain line before the release): `{head}`",
        f"- step: {step}; genesis seed: {(genesis.get('recipe') or {}).get('seed')}",
        "",
        "Verify the bundle this export came with (offline, no GPU), and the export folder's OpenSSF "
        "model-signing signature:",
        "",
        "```bash",
        "kai-attest verify BUNDLE --trust signing-key.pub.pem",
        "model_signing verify key --public_key signing-key.pub.pem --signature export/model.sig export",
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(\"export\", trust_remote_code=True)",
        "tok = AutoTokenizer.from_pretrained(\"export\", trust_remote_code=True)",
        "out = model.generate(**tok(\"a red\", return_tensors=\"pt\"), max_new_tokens=16)",
        "```",
        "",
        "The model and tokenizer code (modeling_kai.py, model.py, modelspec.py, tokenization_kai.py) is in this folder and signed with it. "
        "Images (`pixel_values`) and audio (`audio_values`) go to `forward`/`generate` with the prompt starting "
        "with `<image>` / `<audio>`; `python -m kai_train.generate export --image x.png` does the same with "
        "kai-train installed.",
        "",
    ]
    return "\n".join(lines)


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
