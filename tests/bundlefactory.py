"""Small synthetic bundles for verifier tests: real signatures and safetensors, no torch, no training.

`make_bundle` writes a bundle folder whose chain has two data shards (the second derived from the
first), a tokenizer, a run, a genesis and a few checkpoints whose weights move like AdamW steps,
and a release with its export/ folder. `derive` re-creates its genesis (tests register it in attest.verify.DERIVERS).
Keyword arguments make the usual tampering easy; `statements`/`write_chain` re-sign any edit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attest.digest import sha256_file, tensor_digest
from attest.runconfig import render_yaml
from attest.dsse import sign_statement
from attest.signing import PemSigner, keygen
from attest.statements import build_statement, subject

DERIVER = "bundlefactory:derive"
SHAPES = {"text.emb": (64, 32), "text.out": (32, 32), "vision.patch": (32, 48), "vision.norm": (32,), "audio.conv": (16, 8)}
LR, BETAS, WD = 1e-3, [0.9, 0.95], 0.1
MODEL = {"vocab_size": 64, "dim": 32}  # the model config the recipe, the run config and export/config.json name


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, Any] = {}
    data = b""
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def init_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (np.ones(s) if n.endswith("norm") else rng.normal(0, 0.02, s)).astype(np.float32) for n, s in SHAPES.items()}


def leaves(w: dict[str, np.ndarray]) -> dict[str, str]:
    return {n: tensor_digest(n, "F32", a.shape, [np.ascontiguousarray(a, dtype="<f4").tobytes()]) for n, a in w.items()}


def merkle(w: dict[str, np.ndarray]) -> str:
    from attest.digest import merkle_root

    return merkle_root(leaves(w))


def derive(recipe: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The test genesis deriver: W0 is a pure function of the recipe's seed."""
    if not isinstance(recipe.get("seed"), int):
        raise ValueError("recipe needs an integer seed")
    yield from leaves(init_weights(recipe["seed"])).items()


def ckpt_name(step: int) -> str:
    return f"checkpoints/step-{step:06d}/model.safetensors"


def make_bundle(root: Path, key_dir: Path | None = None, *, steps: tuple[int, ...] = (2, 4, 6, 8, 10, 12),
                seed: int = 7, per_step: float = 0.02, swap_at: int | None = None, bump_at: int | None = None,
                licence: str = "CC0-1.0", collection: str = "synthetic", generator: str | None = "procedural generator",
                release: bool = True, mutate: Callable[[list[dict[str, Any]]], None] | None = None) -> tuple[Path, Path]:
    """Write a bundle at `root`; returns (root, private key path).

    Each segment moves every coordinate by about `per_step` × lr per step (AdamW moves at most
    ≈1.16 × lr). `swap_at`: the weights at that step are replaced by another seed's (a weight swap,
    re-signed consistently). `bump_at`: that segment moves 40× more than the others, still within
    the AdamW bound (an outlier only against the run's own profile)."""
    key_dir = key_dir or root.parent / f"{root.name}-key"
    priv = key_dir / "signing-key.pem"
    if not priv.exists():
        keygen(key_dir)
    (root / "keys").mkdir(parents=True, exist_ok=True)
    (root / "keys/signing-key.pub.pem").write_bytes((key_dir / "signing-key.pub.pem").read_bytes())
    rng = np.random.default_rng(seed + 1)
    st: list[dict[str, Any]] = []

    def add(kind: str, subs: list[dict[str, Any]], pred: dict[str, Any]) -> None:
        st.append(build_statement(kind, subs, {**pred, "run_id": "t", "sequence": 0, "previous": None}))

    shards = []
    for i, src in enumerate(("alpha", "beta")):
        shard = f"data/shards/{src}-00000.parquet"
        (root / shard).parent.mkdir(parents=True, exist_ok=True)
        (root / shard).write_bytes(f"PAR1 fake rows of {src}".encode())
        sha = sha256_file(root / shard)
        derived = [{"path": shards[0][0], "sha256": shards[0][1]}] if i else []
        manifest = {"kind": "kai-data-shard/v1", "shard": Path(shard).name, "sha256": sha, "bytes": 20, "rows": 100 + 50 * i,
                    "schema": [], "modality_counts": {"text": 100 + 50 * i, "image": 0, "audio": 0},
                    # one source: beta is a later stage of alpha, and a stage keeps the source block
                    "source": {"name": "corpus", "origin": "test", "license": licence, "collection": collection,
                               "collected": "2026-01-01/2026-01-02", "consent": "n/a", "pii": "none", "generator": generator},
                    "derived_from": derived}
        mname = shard.replace("shards/", "shards/.manifests/").replace(".parquet", ".manifest.json")
        (root / mname).parent.mkdir(exist_ok=True)
        (root / mname).write_text(json.dumps(manifest, sort_keys=True))
        shards.append((shard, sha))
        add("data-shard", [subject(shard, sha), subject(mname, sha256_file(root / mname))], {"manifest": manifest})
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer/tokenizer.model").write_bytes(b"tok")
    add("tokenizer", [subject("tokenizer/tokenizer.model", sha256_file(root / "tokenizer/tokenizer.model"))],
        {"trainer": "test", "params": {}, "trained_on": [{"name": n, "sha256": s} for n, s in shards]})
    # a constant schedule (wsd without decay): every step's lr is LR
    train = {"lr": LR, "betas": BETAS, "weight_decay": WD, "schedule": "wsd", "warmup": 0, "steps": max(steps, default=1),
             "min_lr_ratio": 1.0, "decay_frac": 0.0}
    config = {"seed": seed, "train": train, "model": dict(MODEL), "tokenizer": "tokenizer/tokenizer.model",
              "data_shards": [{"name": n, "sha256": s} for n, s in shards]}
    (root / "config").mkdir(exist_ok=True)
    (root / "config/run.yaml").write_text(render_yaml(config))
    add("run", [subject("config/run.yaml", sha256_file(root / "config/run.yaml"))],
        {"config": config, "code_digest": "00" * 32, "versions": {}, "hardware": {}})
    w = init_weights(seed)
    write_safetensors(root / ckpt_name(0), w)
    add("genesis", [subject(ckpt_name(0), sha256_file(root / ckpt_name(0)))],
        {"recipe": {"name": "test-init", "seed": seed, "deriver": DERIVER, "model": dict(MODEL)}, "weights_root": merkle(w),
         "tensors": {n: {"digest": d} for n, d in leaves(w).items()}})
    prev_root, prev_step = merkle(w), 0
    for step in steps:
        s = step - prev_step
        scale = per_step * (40 if step == bump_at else rng.uniform(0.8, 1.2))
        w = {n: (a + LR * s * scale * rng.choice([-1.0, 1.0], a.shape)).astype(np.float32) for n, a in w.items()}
        saved = init_weights(seed + 1000) if step == swap_at else w
        write_safetensors(root / ckpt_name(step), saved)
        root_k = merkle(saved)
        add("checkpoint", [subject(ckpt_name(step), sha256_file(root / ckpt_name(step)))],
            {"step": step, "weights_root": root_k, "parent_root": prev_root,
             "data_consumed": {"shards": [n for n, _ in shards], "holdout_every": 0,
                               "sampler": {"seed": seed, "num_rows": 250, "world_size": 1, "micro_batch": 4,
                                           "position_start": prev_step * 4, "position_end": step * 4}},
             "metrics": {"loss": 5.0 / (1 + step / 4), "lr": LR}})
        prev_root, prev_step = root_k, step
    if release and steps:
        add("release", write_export(root, prev_step, prev_root), {"step": prev_step, "weights_root": prev_root})
    if mutate:
        mutate(st)
    write_chain(root, priv, st)
    return root, priv


def write_export(root: Path, step: int, weights_root: str) -> list[dict[str, Any]]:
    """export/ as the trainer writes it (weights of `step`, config.json, tokenizer); its subjects."""
    from kai_train.export import export_config

    (root / "export").mkdir(exist_ok=True)
    shutil.copy(root / ckpt_name(step), root / "export/model.safetensors")
    shutil.copy(root / "tokenizer/tokenizer.model", root / "export/tokenizer.model")
    (root / "export/config.json").write_text(export_config(dict(MODEL), step, weights_root, "t", "tokenizer.model"))
    return [subject(f"export/{n}", sha256_file(root / "export" / n))
            for n in ("config.json", "model.safetensors", "tokenizer.model")]


def write_chain(root: Path, priv: Path, statements: list[dict[str, Any]], relink: bool = True) -> None:
    """Sign `statements` into root/chain.jsonl; with `relink`, sequence and previous are recomputed."""
    signer = PemSigner.from_file(priv)
    out, prev = [], None
    for i, st in enumerate(statements):
        if relink and isinstance(st.get("predicate"), dict):
            st["predicate"].update(sequence=i, previous=prev)
        line = json.dumps(sign_statement(st, signer), sort_keys=True, separators=(",", ":")).encode()
        out.append(line)
        prev = hashlib.sha256(line).hexdigest()
    (root / "chain.jsonl").write_bytes(b"".join(x + b"\n" for x in out))


def statements(root: Path) -> list[dict[str, Any]]:
    from attest.chain import read_chain

    entries, _ = read_chain(root / "chain.jsonl")
    return [e.statement for e in entries]
