"""The release renderer: export/'s exact file set, rendered from the signed chain.

The trainer's exporter (kai_train.export) writes export/ with `render`, and the verifier renders it
again from the bundle's chain and compares: every file of export/ is either rendered here (byte for
byte: config.json, generation_config.json, tokenizer_config.json, the model card README.md, the
weight index, the model and tokenizer code transformers runs) or a copy of a signed file (the last
checkpoint's weight files, the declared tokenizer), or the folder's model-signing signature. Any
other file fails, whatever a loader might do with it (chat templates, tokenizer.json, processor
configs, adapters, custom pipelines): the check is the rendering, never a list of forbidden names.

Torch-free and sentencepiece-free (the light install renders too): the tokenizer's special ids are
read from its bytes by attest.spm, the code files are the verifier's own kai_train sources, read as
bytes, never imported.

export/llama/ (format 3) is the text decoder as a standard Llama folder, rendered by attest.llama
(transform `kai-llama/v1`): its config, generation config and tokenizer files byte for byte, its
model.safetensors from the released weights' bytes, its tokenizer.model a copy of the declared one.

Versions. A release statement states `export_format`. Format 3 (this renderer) requires the exact
set, export/llama/ included; format 2 is the same without export/llama/ (and without the card's
paragraph on it). A release without the key was written by format 1, whose exporter wrote the same bytes for the
files it wrote, up to the key order of JSON objects, but may have left out the loader's optional
files (generation and tokenizer configs, card, code); format 1 therefore compares every file present
(JSON files by their strictly compared values, the rest byte for byte) and tolerates only those
absences (`Rendered.optional`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from attest import llama, spm
from attest.layout import EXPORT_AUTO_MAP, EXPORT_CODE_FILES, EXPORT_LLAMA_DIR, EXPORT_TOKENIZER_AUTO_MAP

EXPORT_FORMAT = 3
LLAMA_FORMAT = 3  # the first format with export/llama/
MODEL_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.model"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_JSON_NAME = "tokenizer.json"  # export/llama/ only
CARD_NAME = "README.md"
SIGNATURE_NAME = "model.sig"  # attest.oms.SIGNATURE_NAME (the folder's model-signing signature)
# Files a format-1 release may leave out (its exporter wrote them only for real tokenizers and runs).
FORMAT1_OPTIONAL = frozenset({GENERATION_CONFIG_NAME, TOKENIZER_CONFIG_NAME, CARD_NAME, *EXPORT_CODE_FILES})


@dataclass
class Rendered:
    """export/ as the chain says it is: names relative to export/."""

    files: dict[str, bytes] = field(default_factory=dict)  # rendered here, byte for byte
    copies: dict[str, str] = field(default_factory=dict)  # name -> sha256 of the signed file it is a copy of
    signature: bool = False  # export/model.sig (checked by the oms-signature check)
    optional: frozenset[str] = frozenset()  # may be absent (format 1 only)
    derived: dict[str, llama.Weights] = field(default_factory=dict)  # computed from the released weight files' bytes
    text_export: str | None = None  # the transform of export/llama/ (attest.llama.TRANSFORM), None without one
    problems: list[str] = field(default_factory=list)  # what could not be rendered: the comparison fails
    notes: list[str] = field(default_factory=list)  # what the rendering had to leave out, consistently on both sides

    def names(self) -> set[str]:
        return set(self.files) | set(self.copies) | set(self.derived) | ({SIGNATURE_NAME} if self.signature else set())


def shard_file(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def weight_names(n: int) -> list[str]:
    """export/'s weight file names for a checkpoint of n weight files (the Hugging Face convention)."""
    return [MODEL_NAME] if n == 1 else [shard_file(i, n) for i in range(n)]


def weight_index(shards: Sequence[Sequence[tuple[str, int]]]) -> str:
    """model.safetensors.index.json of sharded weights: (tensor name, byte length) per shard, in order."""
    names = weight_names(len(shards))
    weight_map = {t: names[i] for i, tensors in enumerate(shards) for t, _ in tensors}
    total = sum(n for tensors in shards for _, n in tensors)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"


def export_config(model: dict[str, Any] | None, step: int, weights_root: str, run_id: Any,
                  tokenizer: str | None, special: dict[str, int] | None = None) -> str:
    """The bytes of export/config.json: the chain's facts, then what transformers reads (model_type,
    auto_map, token ids). Keys and order are fixed here."""
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


def special_ids(facts: spm.SpmFacts | None) -> dict[str, int]:
    """bos/eos/pad token ids for config.json and generation_config.json (those the model has)."""
    if facts is None:
        return {}
    return {f"{k}_token_id": facts.special[k] for k in ("bos", "eos", "pad") if facts.special[k] >= 0}


def tokenizer_config(facts: spm.SpmFacts, model: dict[str, Any]) -> str:
    """tokenizer_config.json: kai-train's KaiTokenizer (sentencepiece's own encoding) and its special pieces."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "KaiTokenizer",  # kai_train/tokenization_kai.py
        "auto_map": EXPORT_TOKENIZER_AUTO_MAP,
        "model_max_length": model.get("max_seq_len"),
        "clean_up_tokenization_spaces": False, "legacy": True,  # sentencepiece encodes the text as it is
        **{f"{k}_token": facts.piece(facts.special[k]) for k in ("bos", "eos", "pad", "unk") if facts.special[k] >= 0},
    }
    return json.dumps(cfg, indent=2) + "\n"


def generation_config(special: dict[str, int]) -> str:
    return json.dumps({"do_sample": False, "use_cache": False, "max_new_tokens": 16, **special}, indent=2) + "\n"


def model_card(entries: Sequence[Any], step: int, root: str, model: dict[str, Any], run_cfg: dict[str, Any],
               genesis: dict[str, Any], text_export: bool = False) -> str:
    """export/README.md, a Hugging Face model card: licence, the training data by source and
    licence, parameter counts, the chain head, the weights root and how to verify. Every fact comes
    from the signed chain."""
    license_ = str(run_cfg.get("license") or "other")
    sources: dict[tuple[str, str], list[int]] = {}
    for e in entries:  # ingest shards (derived from nothing): the declared sources
        m = e.predicate.get("manifest") if e.kind == "data-shard" else None
        if isinstance(m, dict) and not m.get("derived_from") and isinstance(m.get("source"), dict):
            src = m["source"]
            row = sources.setdefault((str(src.get("name")), str(src.get("license"))), [0, 0])
            row[0] += 1
            rows = m.get("rows")
            row[1] += rows if isinstance(rows, int) and not isinstance(rows, bool) else 0
    counts: dict[str, int] = {}
    tensors = genesis.get("tensors")
    for name, t in (tensors.items() if isinstance(tensors, dict) else ()):
        n = 1
        shape = t.get("shape") if isinstance(t, dict) else None
        for d in shape if isinstance(shape, list) else []:
            n *= d if isinstance(d, int) and not isinstance(d, bool) else 0
        part = {"text": "text decoder", "vision": "image encoder", "speech": "speech encoder"}.get(
            str(name).split(".", 1)[0], "absent-modality vectors")
        counts[part] = counts.get(part, 0) + n
    head = entries[-1].digest
    licences = sorted({lic for _, lic in sources})
    recipe: dict[str, Any] = genesis["recipe"] if isinstance(genesis.get("recipe"), dict) else {}
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
        f"- step: {step}; genesis seed: {recipe.get('seed')}",
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
    if text_export:
        lines += [
            "## The text decoder as a Llama model",
            "",
            f"`{EXPORT_LLAMA_DIR}/` holds the text decoder as a standard `LlamaForCausalLM` (no remote code), its "
            "weights computed from the ones above by the transform `kai-llama/v1` (RoPE rows permuted for "
            "transformers' layout; the learned absent-image and absent-audio vectors as two extra tokens that "
            "its tokenizer puts before every text, as kai-train does for a text-only input):",
            "",
            "```python",
            f"model = AutoModelForCausalLM.from_pretrained(\"export/{EXPORT_LLAMA_DIR}\")",
            f"tok = AutoTokenizer.from_pretrained(\"export/{EXPORT_LLAMA_DIR}\")",
            "```",
            "",
        ]
    return "\n".join(lines)


def render(entries: Sequence[Any], step: int, weights: Sequence[tuple[str, Sequence[tuple[str, int]] | None]],
           tokenizer: tuple[bytes, str] | None, code: Callable[[str], bytes | None], signed: bool,
           fmt: int = EXPORT_FORMAT, tensors: Sequence[Sequence[llama.TensorLike]] | None = None) -> Rendered:
    """export/ of checkpoint `step`: `entries` is the chain before the release (genesis, run, that
    checkpoint among them); `weights` the checkpoint's weight files in name order, each as (sha256,
    (tensor, byte length) list or None when its header is not at hand); `tokenizer` the declared
    tokenizer's (bytes, sha256) or None; `code(name)` this installation's kai_train/NAME bytes;
    `signed`: the checkpoint folders carry model-signing signatures, so export/ does too; `tensors`
    (format 3) each weight file's tensor entries (attest.digest.read_safetensors_index), from which
    export/llama/model.safetensors is computed, or None when they are not at hand."""
    out = Rendered(signature=signed, optional=FORMAT1_OPTIONAL if fmt < 2 else frozenset())
    ckpts = {e.predicate.get("step"): e.predicate for e in entries  # a hostile step may be unhashable
             if e.kind == "checkpoint" and isinstance(e.predicate.get("step"), (int, str, float, type(None)))}
    genesis: dict[str, Any] = next((e.predicate for e in entries if e.kind == "genesis"), {})
    run: dict[str, Any] = next((e.predicate for e in entries if e.kind == "run"), {})
    run_cfg: dict[str, Any] = run["config"] if isinstance(run.get("config"), dict) else {}
    recipe: dict[str, Any] = genesis["recipe"] if isinstance(genesis.get("recipe"), dict) else {}
    model = recipe.get("model") if isinstance(recipe.get("model"), dict) else None
    root = str((ckpts.get(step) or {}).get("weights_root"))
    names = weight_names(len(weights)) if weights else []
    for name, (sha, _) in zip(names, weights):
        out.copies[name] = sha
    if len(weights) > 1:
        heads = [t for _, t in weights]
        if all(t is not None for t in heads):
            out.files[INDEX_NAME] = weight_index([t for t in heads if t is not None]).encode()
        else:
            out.problems.append(f"{INDEX_NAME}: a weight file's header is not at hand to render the index")
    facts = None
    if tokenizer is not None:
        data, sha = tokenizer
        out.copies[TOKENIZER_NAME] = sha
        try:
            facts = spm.read(data)
        except spm.SpmError as e:  # the declared tokenizer is not a SentencePiece model: no ids to state
            out.notes.append(f"{TOKENIZER_NAME}: not a SentencePiece model ({str(e)[:80]}): no special token ids")
    special = special_ids(facts)
    out.files[CONFIG_NAME] = export_config(model, step, root, entries[0].predicate.get("run_id") if entries else None,
                                           TOKENIZER_NAME if tokenizer is not None else None, special).encode()
    out.files[GENERATION_CONFIG_NAME] = generation_config(special).encode()
    if facts is not None:
        out.files[TOKENIZER_CONFIG_NAME] = tokenizer_config(facts, model or {}).encode()
    if fmt >= LLAMA_FORMAT:
        render_llama(out, model, step, root, entries[0].predicate.get("run_id") if entries else None,
                     special, facts, tokenizer, tensors)
    if entries:
        out.files[CARD_NAME] = model_card(entries, step, root, model or {}, run_cfg, genesis,
                                          out.text_export is not None).encode()
    for name in EXPORT_CODE_FILES:
        src = code(name)
        if src is None:
            out.problems.append(f"{name}: kai_train/{name} is not installed here to render the model code")
        else:
            out.files[name] = src
    return out


def render_llama(out: Rendered, model: dict[str, Any] | None, step: int, root: str, run_id: Any,
                 special: dict[str, int], facts: spm.SpmFacts | None, tokenizer: tuple[bytes, str] | None,
                 tensors: Sequence[Sequence[llama.TensorLike]] | None) -> None:
    """export/llama/ into `out` (attest.llama): nothing, with a note, for a model a Llama folder cannot hold."""
    d = EXPORT_LLAMA_DIR
    reason = llama.unsupported(model)
    if reason is not None or model is None:
        out.notes.append(f"{d}/: no Llama folder: {reason}")
        return
    out.text_export = llama.TRANSFORM
    out.files[f"{d}/{CONFIG_NAME}"] = llama.config(
        model, special, {"step": step, "weights_root": root, "run_id": run_id}).encode()
    out.files[f"{d}/{GENERATION_CONFIG_NAME}"] = llama.generation_config(model, special).encode()
    if facts is not None and tokenizer is not None:
        try:
            files = {TOKENIZER_JSON_NAME: llama.tokenizer_json(facts, model).encode(),
                     TOKENIZER_CONFIG_NAME: llama.tokenizer_config(facts, model).encode()}
        except llama.LlamaError as e:
            out.notes.append(f"{d}/{TOKENIZER_JSON_NAME}: {e}: no tokenizer in the Llama folder")
        else:
            out.files.update({f"{d}/{n}": data for n, data in files.items()})
            out.copies[f"{d}/{TOKENIZER_NAME}"] = tokenizer[1]
    if tensors is None:
        out.problems.append(f"{d}/{MODEL_NAME}: the released weight files' headers are not at hand to compute it")
        return
    try:
        out.derived[f"{d}/{MODEL_NAME}"] = llama.weights(model, tensors)
    except llama.LlamaError as e:
        out.problems.append(f"{d}/{MODEL_NAME}: {e}")
