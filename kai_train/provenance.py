"""Provenance hooks of a training run (rank 0 only): run, genesis, checkpoint and release
statements appended to the run's chain.

The trainer calls these at the points where the facts exist; this module turns them into signed
statements and knows nothing of DeepSpeed. Weights are written as safetensors under
`checkpoints/step-NNNNNN/model.safetensors` so that subjects are bundle-relative paths.
"""

from __future__ import annotations

import functools
import os
import platform
import time
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from attest import failpoints
from attest.chain import ChainWriter
from attest.digest import merkle_root, sha256_file, tree_digest
from attest.oms import sign_checkpoint_dir
from attest.signing import Signer
from attest.statements import subject
from kai_train.weights import save_weights, state_dict_leaves

REPO_ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("attest", "data_pipelines", "kai_train", "conf")
LIBRARIES = ("torch", "deepspeed", "numpy", "pyarrow", "sentencepiece", "safetensors", "hydra-core", "cryptography")


def weights_name(step: int) -> str:
    return f"checkpoints/step-{step:06d}/model.safetensors"


def optimizer_name(step: int) -> str:
    return f"checkpoints/step-{step:06d}/optimizer.safetensors"


def code_digest() -> str:
    """Digest of the training code and configs this run executes."""
    files = {
        str(p.relative_to(REPO_ROOT)): p
        for d in CODE_DIRS
        for p in (REPO_ROOT / d).rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    return tree_digest(files)


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def hardware(world_size: int) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": platform.machine(), "cpu_count": os.cpu_count(), "gpu": gpu, "world_size": world_size}


def _timed(method):
    """Add the method's wall time to `self.seconds`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    return wrapper


class Provenance:
    def __init__(self, run_dir: Path, signer: Signer, run_id: str, oms: bool = True) -> None:
        self.run_dir = run_dir
        self.chain = ChainWriter(run_dir / "chain.jsonl", signer, run_id)
        # OpenSSF model-signing signature in each checkpoint folder (key back-ends; keyless has its own bundle)
        self.oms = oms and not hasattr(signer, "sign_statement")
        self.last_root: str | None = None
        self.last_step = 0
        self.seconds = 0.0  # wall time spent here: saving, hashing, signing (the provenance overhead)

    def _weights_subjects(
        self, step: int, sd: Mapping[str, torch.Tensor], optimizer: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        name = weights_name(step)
        (self.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        folder = (self.run_dir / name).parent
        for stale in folder.glob(".*.tmp"):  # left by a write a crash interrupted; not part of the checkpoint
            stale.unlink()
        save_weights(sd, self.run_dir / name)
        failpoints.reached("weights-saved")
        subjects = [subject(name, sha256_file(self.run_dir / name))]
        if optimizer is not None:  # consolidated AdamW moments: what a replay of the next segment starts from
            opt = optimizer_name(step)
            save_weights(optimizer, self.run_dir / opt)
            subjects.append(subject(opt, sha256_file(self.run_dir / opt)))
        if self.oms:
            failpoints.reached("before-oms")
            sig = sign_checkpoint_dir(folder, self.chain.signer)
            failpoints.reached("oms-signed")
            subjects.append(subject(str(sig.relative_to(self.run_dir)), sha256_file(sig)))
        return subjects, state_dict_leaves(sd)

    @_timed
    def record_run(self, config: dict[str, Any], config_file: str, world_size: int) -> None:
        self.chain.append(
            "run",
            [subject(config_file, sha256_file(self.run_dir / config_file))],
            {"config": config, "code_digest": code_digest(), "versions": library_versions(), "hardware": hardware(world_size),
             "replay_plugin": "kai_train.replay"},
        )

    @_timed
    def record_genesis(self, sd: Mapping[str, torch.Tensor], recipe: dict[str, Any], tensors: dict[str, Any]) -> str:
        subs, leaves = self._weights_subjects(0, sd)
        root = merkle_root(leaves)
        self.chain.append("genesis", subs, {"recipe": recipe, "weights_root": root, "tensors": tensors})
        self.last_root = root
        return root

    @_timed
    def record_checkpoint(
        self, step: int, sd: Mapping[str, torch.Tensor], data_consumed: dict[str, Any], metrics: dict[str, float],
        optimizer: Mapping[str, torch.Tensor] | None = None, optimizer_step: int | None = None,
    ) -> str:
        subs, leaves = self._weights_subjects(step, sd, optimizer)
        root = merkle_root(leaves)
        pred = {"step": step, "weights_root": root, "parent_root": self.last_root, "data_consumed": data_consumed,
                "metrics": metrics}
        if optimizer is not None:
            pred["optimizer"] = {"file": optimizer_name(step), "step": optimizer_step, "root": merkle_root(state_dict_leaves(optimizer))}
        self.chain.append("checkpoint", subs, pred)
        self.last_root, self.last_step = root, step
        return root

    @_timed
    def record_release(self) -> None:
        name = weights_name(self.last_step)
        self.chain.append(
            "release", [subject(name, sha256_file(self.run_dir / name))], {"step": self.last_step, "weights_root": self.last_root}
        )
